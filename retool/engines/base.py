"""The Engine protocol every backend implements, and a bounded retry helper.

The episode loop (retool.rollout) only ever talks to an Engine: token ids in, token ids and their
log-probabilities out. Token ids are the ground truth; ``Generation.text`` is their decoding.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "abort"]
T = TypeVar("T")


@dataclass
class SamplingParams:
    """Per-call sampling settings (SGLang's names, so they map onto its /generate one to one)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 512
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Generation:
    """One engine call's output.

    A generation stopped by a stop string INCLUDES the stop string's tokens in ``token_ids``; one
    stopped by an end-of-turn token includes that token. ``logprobs`` has one entry per token.
    """

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    text: str = ""

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.logprobs):
            raise EngineError(
                f"engine returned {len(self.token_ids)} tokens but {len(self.logprobs)} logprobs",
                retryable=False,
            )


@runtime_checkable
class Engine(Protocol):
    """What the episode loop needs from an inference engine. Many episodes call ``generate``
    concurrently; an engine may batch concurrent calls."""

    tokenizer: Any  # a transformers PreTrainedTokenizerBase (chat template, encode/decode)

    async def generate(self, input_ids: list[int], params: SamplingParams) -> Generation: ...


class EngineError(RuntimeError):
    """An engine call failed. ``retryable`` says whether trying again can help (a dropped
    connection or an overloaded server can; a malformed request cannot)."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


def backoff_delay(attempt: int, base_s: float, max_s: float) -> float:
    """Exponential backoff with full jitter: attempt 0 waits up to ``base_s``."""
    return random.uniform(0.5, 1.0) * min(max_s, base_s * (2**attempt))


async def retry_async(
    fn: Callable[[], Awaitable[T]],
    *,
    attempts: int,
    base_delay_s: float = 0.5,
    max_delay_s: float = 8.0,
    retry_if: Callable[[BaseException], bool] | None = None,
    what: str = "call",
) -> T:
    """Await ``fn()`` up to ``attempts`` times, sleeping with jittered exponential backoff between
    tries. Errors that ``retry_if`` rejects (default: EngineError with retryable=False) and
    cancellation propagate at once; the last error propagates after the final attempt."""
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")

    def _default_retry_if(exc: BaseException) -> bool:
        return not (isinstance(exc, EngineError) and not exc.retryable)

    should_retry = retry_if or _default_retry_if
    for attempt in range(attempts):
        try:
            return await fn()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if attempt + 1 >= attempts or not should_retry(exc):
                raise
            delay = backoff_delay(attempt, base_delay_s, max_delay_s)
            log.warning(
                "%s failed (%s: %s); retry %d/%d in %.2fs",
                what,
                type(exc).__name__,
                exc,
                attempt + 1,
                attempts - 1,
                delay,
            )
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")
