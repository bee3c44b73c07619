"""Answer scoring and reward shaping.

Modes:
- ``math_verify``: the last ``\\boxed{}`` of the model's text is judged against the label with
  math-verify (fractions vs decimals, leading zeros, units, sets, ...). math-verify's own time limit uses
  ``signal.alarm`` and fails off the main thread, so judging runs in a small pool of persistent worker
  processes (their main thread keeps math-verify's limit working) and the caller enforces a hard deadline:
  a worker that overruns is killed and replaced, and the call returns ``timed_out=True`` on time, from
  any thread. Plain numbers are compared exactly in-process first (the common case for DAPO/AIME labels)
  and results are cached, which keeps thousands of scores per second on two cores.
- ``dapo_strict``: the reference's strict boxed string match (the last ``\\boxed{}`` within the final
  ``strict_tail_chars`` characters must equal the label character for character).

Shaping (as the reference): a correct answer earns ``correct_reward``; a wrong one earns
``wrong_reward + (calls - tool_bonus_free_calls) * tool_bonus_per_call`` capped at ``wrong_reward_cap``
(below ``correct_reward``); no answer at all earns the wrong-answer reward minus ``no_answer_penalty``.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import queue
import re
import select
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from retool.parsing import extract_answer

log = logging.getLogger(__name__)

ScoreMode = Literal["math_verify", "dapo_strict"]


class RewardConfig(BaseModel):
    """Every knob of answer scoring and shaping (params.yaml ``reward:``)."""

    model_config = ConfigDict(extra="forbid")

    mode: ScoreMode = Field(
        default="math_verify", description="math_verify | dapo_strict (reference's string match)"
    )
    correct_reward: float = Field(default=1.0, description="reward of a correct answer")
    wrong_reward: float = Field(
        default=-1.0, description="base reward of a wrong answer (before the tool bonus)"
    )
    tool_bonus_per_call: float = Field(default=0.05, ge=0.0, description="wrong answers: bonus per tool call")
    tool_bonus_free_calls: int = Field(
        default=2, ge=0, description="calls subtracted before the bonus (reference: 2)"
    )
    wrong_reward_cap: float = Field(default=-0.6, description="a wrong answer never earns more than this")
    no_answer_penalty: float = Field(
        default=0.1, ge=0.0, description="no \\boxed{} answer: wrong reward minus this"
    )
    require_boxed: bool = Field(default=True, description="math_verify: only a \\boxed{} answer counts")
    strict_tail_chars: int = Field(
        default=100, ge=1, description="dapo_strict: look for \\boxed{} in this many final chars"
    )
    timeout_s: float = Field(default=2.0, gt=0.0, description="hard time limit of one math-verify judgement")
    math_verify_timeout_s: float | None = Field(
        default=1.0,
        gt=0.0,
        description="math-verify's own limit inside a worker (None: rely on timeout_s alone)",
    )
    workers: int = Field(default=2, ge=1, le=64, description="math-verify worker processes")
    cache_size: int = Field(default=65536, ge=0, description="cached (answer, label) judgements")

    @model_validator(mode="after")
    def _check(self) -> RewardConfig:
        if self.wrong_reward_cap >= self.correct_reward:
            raise ValueError(
                f"reward.wrong_reward_cap ({self.wrong_reward_cap}) must be below reward.correct_reward "
                f"({self.correct_reward}): a wrong answer may never earn as much as a correct one"
            )
        return self


@dataclass
class Reward:
    """One scored response. ``pred`` is the extracted answer (None when there is none)."""

    score: float
    correct: bool
    pred: str | None
    timed_out: bool = False


# ---------------------------------------------------------------------------------------------------
# Exact comparison of plain numbers (no math-verify needed)

_INT_RE = re.compile(r"[+-]?\d+")
_THOUSANDS_RE = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+")
_DEC_RE = re.compile(r"[+-]?(?:\d+\.\d*|\.\d+)")
_FRAC_RE = re.compile(r"([+-]?)\\[dt]?frac\{([+-]?\d+)\}\{([+-]?\d+)\}")
_SLASH_RE = re.compile(r"([+-]?\d+)/(\d+)")
_TEXT_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")


def _plain_number(s: str) -> tuple[Fraction, bool] | None:
    """(value, is_integer_literal) for a plain integer, decimal or simple fraction; None otherwise."""
    t = s.strip().strip("$").replace("\\!", "").replace("\\,", "").replace(" ", "")
    t = t.removesuffix(".")
    if not t:
        return None
    try:
        if _INT_RE.fullmatch(t):
            return Fraction(int(t)), True
        if _THOUSANDS_RE.fullmatch(t):
            return Fraction(int(t.replace(",", ""))), True
        if _DEC_RE.fullmatch(t):
            return Fraction(t), False
        m = _FRAC_RE.fullmatch(t)
        if m and int(m.group(3)) != 0:
            value = Fraction(int(m.group(2)), int(m.group(3)))
            return (-value if m.group(1) == "-" else value), False
        m = _SLASH_RE.fullmatch(t)
        if m and int(m.group(2)) != 0:
            return Fraction(int(m.group(1)), int(m.group(2))), False
    except (ValueError, ZeroDivisionError, OverflowError):
        return None
    return None


def fast_judge(pred: str, label: str) -> bool | None:
    """Decide without math-verify when both sides are plain numbers: equal values are correct;
    different integers are wrong. Anything else (decimals that math-verify would round, expressions,
    text) returns None and goes to math-verify."""
    if len(pred) > 64 or len(label) > 64:
        return None
    a, b = _plain_number(pred), _plain_number(label)
    if a is None or b is None:
        return None
    if a[0] == b[0]:
        return True
    if a[1] and b[1]:
        return False
    return None


# ---------------------------------------------------------------------------------------------------
# math-verify in worker processes under a hard deadline


def _worker_main() -> None:
    """Worker loop (``python -c`` entry): judge JSON lines ``[pred, label]`` from stdin with math-verify
    in this process's main thread, where its signal-based time limit works; answer ``[correct, error]``."""
    import json as _json
    import logging as _logging
    import os as _os
    import sys as _sys

    out = _os.fdopen(_os.dup(1), "w", buffering=1)
    _os.dup2(2, 1)  # anything a library prints goes to stderr, never into the protocol
    _logging.disable(_logging.WARNING)
    from math_verify import parse, verify

    mv_timeout = float(_os.environ.get("RETOOL_MV_TIMEOUT", "0") or 0)
    limit = max(1, int(round(mv_timeout))) if mv_timeout > 0 else None
    gold_cache: OrderedDict[str, Any] = OrderedDict()

    def _parse(text: str, boxed: bool = True) -> Any:
        return parse("\\boxed{" + text + "}" if boxed else text, parsing_timeout=limit)  # type: ignore[arg-type]

    def _judge(pred: str, label: str, boxed: bool) -> bool:
        gold = gold_cache.get(label)
        if gold is None:
            gold = _parse(label)
            gold_cache[label] = gold
            if len(gold_cache) > 4096:
                gold_cache.popitem(last=False)
        if not gold:
            return pred.strip() == label.strip()
        if bool(verify(gold, _parse(pred, boxed), timeout_seconds=limit)):
            return True
        stripped = _TEXT_RE.sub(lambda m: m.group(1) if re.search(r"\d", m.group(1)) else "", pred).strip()
        if stripped != pred and stripped:
            return bool(verify(gold, _parse(stripped), timeout_seconds=limit))
        return False

    out.write("ready\n")
    for line in _sys.stdin:
        try:
            pred, label, boxed = _json.loads(line)
            reply: list[Any] = [_judge(pred, label, boxed), None]
        except Exception as exc:  # a parse error is a wrong answer, not a crash
            reply = [False, f"{type(exc).__name__}: {exc}"]
        out.write(_json.dumps(reply) + "\n")


_STARTUP_TIMEOUT_S = 120.0


class _Worker:
    """One worker process and a deadline-aware line reader on its stdout."""

    def __init__(self, mv_timeout: float | None) -> None:
        env = dict(os.environ, RETOOL_MV_TIMEOUT=str(mv_timeout or 0), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from retool.reward import _worker_main; _worker_main()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._in = self.proc.stdin
        self._fd = self.proc.stdout.fileno()
        self._buf = b""

    def send(self, pred: str, label: str, boxed: bool) -> None:
        self._in.write((json.dumps([pred, label, boxed]) + "\n").encode())
        self._in.flush()

    def readline(self, timeout_s: float) -> str | None:
        """The next line, or None when none arrives within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self._fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(self._fd, 65536)
            if not chunk:
                raise EOFError("math-verify worker exited")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.wait(timeout=5)
        except Exception:
            pass
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                if stream:
                    stream.close()
            except Exception:
                pass


class VerifyPool:
    """Persistent math-verify worker processes; ``judge`` is thread-safe and returns within the
    deadline (None means timed out: the overrunning worker is killed and replaced)."""

    def __init__(self, workers: int = 2, mv_timeout: float | None = 1.0) -> None:
        self._mv_timeout = mv_timeout
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._all: set[_Worker] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._started = threading.Event()
        for _ in range(workers):
            threading.Thread(target=self._spawn, daemon=True, name="retool-verify-spawn").start()

    def _spawn(self) -> None:
        worker = _Worker(self._mv_timeout)
        try:  # importing math-verify takes a second or two; the deadline covers judging only
            ready = worker.readline(_STARTUP_TIMEOUT_S) == "ready"
        except (EOFError, OSError):
            ready = False
        if not ready:
            log.error("a math-verify worker failed to start")
            worker.kill()
            return
        with self._lock:
            if self._closed:
                worker.kill()
                return
            self._all.add(worker)
        self._idle.put(worker)
        self._started.set()

    def _replace(self, worker: _Worker) -> None:
        """Kill an overrunning worker and start a new one, off the caller's path."""
        with self._lock:
            self._all.discard(worker)

        def _work() -> None:
            worker.kill()
            self._spawn()

        threading.Thread(target=_work, daemon=True, name="retool-verify-respawn").start()

    def judge(
        self, pred: str, label: str, timeout_s: float, boxed: bool = True
    ) -> tuple[bool | None, str | None]:
        """(correct, error) within ``timeout_s`` from the call, waiting for a free worker included
        (only the pool's first start-up is not counted); correct is None when the time ran out."""
        if self._closed:
            raise RuntimeError("VerifyPool is closed")
        if not self._started.wait(_STARTUP_TIMEOUT_S):
            raise RuntimeError("no math-verify worker became available (workers fail to start?)")
        deadline = time.monotonic() + timeout_s
        try:
            worker = self._idle.get(timeout=timeout_s)
        except queue.Empty:
            return None, f"no free worker within {timeout_s}s"
        try:
            worker.send(pred, label, boxed)
            line = worker.readline(max(deadline - time.monotonic(), 0.0))
            if line is not None:
                correct, error = json.loads(line)
                self._idle.put(worker)
                return bool(correct), error
        except (EOFError, OSError, ValueError) as exc:
            self._replace(worker)
            return False, f"worker failed: {exc}"
        self._replace(worker)
        return None, f"timed out after {timeout_s}s"

    def close(self) -> None:
        with self._lock:
            self._closed = True
            workers = list(self._all)
            self._all.clear()
        for worker in workers:
            worker.kill()


_POOLS: dict[tuple[int, float | None], VerifyPool] = {}
_POOLS_LOCK = threading.Lock()
_CACHE: OrderedDict[tuple[str, str, bool], bool] = OrderedDict()
_CACHE_LOCK = threading.Lock()


def get_pool(config: RewardConfig) -> VerifyPool:
    """The shared worker pool for these settings (started on first use, stopped at exit)."""
    key = (config.workers, config.math_verify_timeout_s)
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None:
            pool = VerifyPool(config.workers, config.math_verify_timeout_s)
            _POOLS[key] = pool
        return pool


def shutdown_pools() -> None:
    """Stop every worker process (also runs at interpreter exit)."""
    with _POOLS_LOCK:
        pools = list(_POOLS.values())
        _POOLS.clear()
    for pool in pools:
        pool.close()


atexit.register(shutdown_pools)


def judge(
    pred: str, label: str, config: RewardConfig | None = None, *, boxed: bool = True
) -> tuple[bool, bool]:
    """(correct, timed_out) of an answer against a label under math-verify. ``boxed=False`` hands
    free text to math-verify (it finds the answer itself)."""
    config = config or RewardConfig()
    decided = fast_judge(pred, label) if boxed else None
    if decided is not None:
        return decided, False
    key = (pred, label, boxed)
    if config.cache_size:
        with _CACHE_LOCK:
            hit = _CACHE.get(key)
            if hit is not None:
                _CACHE.move_to_end(key)
                return hit, False
    correct, error = get_pool(config).judge(pred, label, config.timeout_s, boxed)
    if correct is None:
        log.warning("math-verify timed out judging %.80r against %.80r", pred, label)
        return False, True
    if error:
        log.debug("math-verify error on %.80r: %s", pred, error)
    if config.cache_size:
        with _CACHE_LOCK:
            _CACHE[key] = correct
            if len(_CACHE) > config.cache_size:
                _CACHE.popitem(last=False)
    return correct, False


# ---------------------------------------------------------------------------------------------------
# The reference's strict boxed match


def _strict_last_boxed(text: str) -> str | None:
    idx = text.rfind("\\boxed{")
    if idx < 0:
        return None
    depth = 0
    for i in range(idx, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[idx + len("\\boxed{") : i]
    return None


def shaped_reward(correct: bool, has_answer: bool, num_tool_calls: int, config: RewardConfig) -> float:
    """The shaped scalar reward (see the module docstring)."""
    if correct:
        return config.correct_reward
    wrong = min(
        config.wrong_reward_cap,
        config.wrong_reward + (num_tool_calls - config.tool_bonus_free_calls) * config.tool_bonus_per_call,
    )
    return round(wrong if has_answer else wrong - config.no_answer_penalty, 9)


def score(
    response: str,
    label: str,
    mode: str | None = None,
    config: RewardConfig | None = None,
    *,
    num_tool_calls: int = 0,
) -> Reward:
    """Score a response (the model's text) against a label. ``mode`` overrides ``config.mode``.
    Safe from any thread; never takes longer than ``config.timeout_s`` judging (plus waiting for a
    free worker when many threads score at once)."""
    config = config or RewardConfig()
    mode = mode or config.mode
    if not isinstance(label, str):
        raise TypeError(f"label must be a string, got {type(label).__name__}")
    if mode == "dapo_strict":
        pred = _strict_last_boxed(response[-config.strict_tail_chars :])
        correct = pred is not None and pred == label
        return Reward(shaped_reward(correct, pred is not None, num_tool_calls, config), correct, pred)
    if mode != "math_verify":
        raise ValueError(f"unknown reward mode {mode!r}: expected 'math_verify' or 'dapo_strict'")
    pred = extract_answer(response)
    boxed = pred is not None
    candidate = pred
    if candidate is None and not config.require_boxed:
        candidate = response[-300:].strip() or None
    if candidate is None:
        return Reward(shaped_reward(False, False, num_tool_calls, config), False, None)
    correct, timed_out = judge(candidate, label.strip(), config, boxed=boxed)
    return Reward(shaped_reward(correct, True, num_tool_calls, config), correct, candidate, timed_out)


async def ascore(
    response: str,
    label: str,
    mode: str | None = None,
    config: RewardConfig | None = None,
    *,
    num_tool_calls: int = 0,
) -> Reward:
    """``score`` without blocking the event loop."""
    pred = extract_answer(response)
    cfg = config or RewardConfig()
    if (mode or cfg.mode) == "dapo_strict" or pred is None or fast_judge(pred, label.strip()) is not None:
        return score(response, label, mode, config, num_tool_calls=num_tool_calls)
    return await asyncio.to_thread(score, response, label, mode, config, num_tool_calls=num_tool_calls)


def warmup(config: RewardConfig | None = None) -> float:
    """Start the worker pool and judge once (so the first real score does not pay start-up);
    returns the seconds it took."""
    start = time.perf_counter()
    cfg = config or RewardConfig()
    get_pool(cfg).judge("\\frac{1}{2}", "0.5", max(30.0, cfg.timeout_s))
    return time.perf_counter() - start
