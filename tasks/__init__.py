"""Prefect tasks: one per pipeline stage, thin wrappers that run the stage through DVC."""
