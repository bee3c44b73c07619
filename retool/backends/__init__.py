"""Compute backends: slime (GPU cluster) and local (CPU)."""
