"""Prefect flows of the ReTool pipeline; deployments are declared in prefect.yaml."""
