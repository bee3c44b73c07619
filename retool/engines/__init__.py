"""Inference engines behind one small protocol: SGLang over HTTP (GPU) and local transformers (CPU)."""

from retool.engines.base import (
    Engine,
    EngineError,
    FinishReason,
    Generation,
    SamplingParams,
    retry_async,
)

__all__ = ["Engine", "EngineError", "FinishReason", "Generation", "SamplingParams", "retry_async"]
