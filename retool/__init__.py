"""ReTool pipeline domain library."""
