"""The multi-turn episode loop: generate, run the tool calls, append the observation, continue.

One loop for every backend (SGLang over HTTP inside slime's rollout workers, local transformers on CPU).
Token ids are the ground truth: the prompt is tokenized once, model tokens come from the engine as they
were sampled, observation tokens are appended with loss-mask 0 and log-probability 0, so ids, logprobs and
loss mask always have the same length and the next turn continues from exactly the trained tokens.
Everything is async: tool calls run in the sandbox while other episodes generate.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from retool.engines.base import Engine, EngineError, Generation, SamplingParams, retry_async
from retool.parsing import CALL_STOP_STRINGS, ToolCall, last_answer_position, parse_tool_calls
from retool.prompts import (
    DEFAULT_SYSTEM_PROMPT,
    RenderedPrompt,
    ToolTurnRenderer,
    build_prompt,
    decode_ids,
    encode_text,
    format_interpreter,
)
from retool.reward import Reward, RewardConfig, ascore

log = logging.getLogger(__name__)

EpisodeStatus = Literal["completed", "truncated", "aborted"]
StopReason = Literal[
    "answer",  # the model gave a final \boxed{} answer and ended its turn
    "end_of_turn",  # the model ended its turn without an answer or a call
    "length",  # a turn hit its max_new_tokens without closing a call
    "context",  # the context budget ran out (generation or an observation was cut)
    "max_turns",
    "max_tool_calls",
    "abort",  # the engine aborted the request (e.g. the trainer stopped the rollout)
    "engine_error",  # the engine kept failing after the retries
]


class RolloutConfig(BaseModel):
    """Budgets and sampling of one episode (params.yaml ``rollout:``; defaults = the tiny CPU profile)."""

    model_config = ConfigDict(extra="forbid")

    max_turns: int = Field(default=8, ge=1, description="generation calls per episode")
    max_tool_calls: int = Field(default=8, ge=0, description="tool calls per episode (malformed calls count)")
    max_context_tokens: int = Field(
        default=2048, ge=2, description="prompt + response tokens, observations included"
    )
    max_response_tokens: int | None = Field(
        default=None,
        ge=1,
        description="response tokens (model + observations); None: only the context budget",
    )
    max_new_tokens: int = Field(default=512, ge=1, description="per turn; clamped to the remaining budget")
    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=-1, description="-1: no top-k")
    stop_at_tool_call: bool = Field(
        default=True, description="end a turn as soon as </tool_call> or </code> closes"
    )
    markdown_fallback: bool = Field(
        default=True, description="run a bare ```python block when no tagged call is present"
    )
    system_prompt: str | None = Field(default=DEFAULT_SYSTEM_PROMPT, description="None: no system message")
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="e.g. {enable_thinking: false}"
    )
    engine_retries: int = Field(
        default=2, ge=0, description="retries of a failed engine call before aborting"
    )
    engine_backoff_s: float = Field(default=0.5, ge=0.0, description="first retry delay (doubles, jittered)")
    engine_backoff_max_s: float = Field(default=8.0, ge=0.0)
    concurrency: int = Field(default=64, ge=1, description="episodes in flight in run_episodes / evaluate")

    @model_validator(mode="after")
    def _check(self) -> RolloutConfig:
        if self.max_response_tokens is not None and self.max_response_tokens >= self.max_context_tokens:
            # harmless, but almost always a unit mistake
            log.debug("max_response_tokens >= max_context_tokens: the context budget binds first")
        return self

    def sampling(self, max_new_tokens: int | None = None) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_new_tokens=self.max_new_tokens if max_new_tokens is None else max_new_tokens,
        )


@dataclass
class ToolCallRecord:
    """One executed (or rejected) call: what ran, how it went, how long it took."""

    name: str
    arguments: dict[str, Any]
    fmt: str  # tool_call | code | markdown
    status: str  # ok | error | timeout | memory | invalid (malformed call or unknown tool)
    error: str | None  # parse error, when the call could not be read
    observation: str
    duration_s: float  # wall time of the tool call as the loop saw it
    turn: int
    char_pos: int  # offset of the call in the episode's response_text
    token_pos: int  # offset (in response tokens) of the turn that made the call

    @property
    def code(self) -> str:
        value = self.arguments.get("code")
        return value if isinstance(value, str) else ""

    @property
    def code_lines(self) -> int:
        return sum(1 for line in self.code.splitlines() if line.strip())


@dataclass
class TurnRecord:
    gen_tokens: int
    obs_tokens: int
    finish_reason: str
    gen_time_s: float
    tool_time_s: float
    max_new_tokens: int


@dataclass
class Episode:
    """A finished episode. ``len(response_ids) == len(logprobs) == len(loss_mask)`` always."""

    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]
    loss_mask: list[int]
    response_text: str
    tool_calls: list[ToolCallRecord]
    status: EpisodeStatus
    reward: Reward | None
    num_turns: int
    label: str | None
    stop_reason: StopReason
    prompt_text: str = ""
    model_text: str = ""  # the model's own text (observations left out): the answer is read from here
    group: str | None = None  # episodes of one prompt share a group (pass@k, GRPO groups)
    error: str | None = None
    turns: list[TurnRecord] = field(default_factory=list)
    gen_time_s: float = 0.0
    tool_time_s: float = 0.0
    wall_time_s: float = 0.0
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tool_calls(self) -> int:
        return len(self.tool_calls)

    @property
    def response_length(self) -> int:
        return len(self.response_ids)

    @property
    def pred(self) -> str | None:
        return self.reward.pred if self.reward else None

    def sample_row(self) -> dict[str, Any]:
        """A flat row for an eval samples table."""
        return {
            "group": self.group,
            "prompt": self.prompt_text,
            "response": self.response_text,
            "label": self.label,
            "pred": self.pred,
            "correct": bool(self.reward.correct) if self.reward else None,
            "reward": self.reward.score if self.reward else None,
            "status": self.status,
            "stop_reason": self.stop_reason,
            "num_turns": self.num_turns,
            "num_tool_calls": self.num_tool_calls,
            "tool_calls": [
                {
                    "fmt": c.fmt,
                    "status": c.status,
                    "code": c.code,
                    "error": c.error,
                    "duration_s": c.duration_s,
                }
                for c in self.tool_calls
            ],
            "response_tokens": self.response_length,
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _end_token_ids(tokenizer: Any) -> list[int]:
    """End-of-turn ids: the tokenizer's eos and ChatML's <|im_end|> when the vocabulary has it."""
    ids: list[int] = []
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        ids.append(eos)
    elif isinstance(eos, list):
        ids.extend(int(i) for i in eos)
    try:
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    except Exception:
        im_end = None
    unk = getattr(tokenizer, "unk_token_id", None)
    if isinstance(im_end, int) and im_end >= 0 and im_end != unk and im_end not in ids:
        ids.append(im_end)
    return ids


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return decode_ids(tokenizer, list(ids))


def _trim_point(tokenizer: Any, token_ids: list[int], text: str, char_end: int) -> int:
    """The fewest leading tokens whose decoding covers ``text[:char_end]`` (so text after a closed
    call is dropped at token granularity)."""
    lo, hi = 1, len(token_ids)
    target = text[:char_end]
    while lo < hi:
        mid = (lo + hi) // 2
        if _decode(tokenizer, token_ids[:mid]).startswith(target):
            hi = mid
        else:
            lo = mid + 1
    return lo


async def _execute(tools: Any, call: ToolCall) -> tuple[str, str, float]:
    """(status, observation, seconds) of one call; never raises."""
    start = time.perf_counter()
    if call.error is not None:
        if call.fmt == "tool_call":
            hint = (
                'Write the call as <tool_call>\n{"name": "code_interpreter", "arguments": {"code": "..."}}\n'
                "</tool_call>."
            )
        else:
            hint = "Write the code as <code>\n```python\n...\n```\n</code>."
        return "invalid", f"Error: the tool call could not be read: {call.error}. {hint}", 0.0
    if tools is None:
        return "invalid", "Error: no tools are available in this episode.", 0.0
    try:
        outcome = await tools.acall(call.name, call.arguments)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # a registry must not raise, but one bad call never kills the episode
        log.exception("tool call raised")
        return "error", f"Error: the tool failed: {type(exc).__name__}: {exc}", time.perf_counter() - start
    return str(outcome.status), str(outcome.observation), time.perf_counter() - start


def _coerce_prompt(
    engine: Engine, prompt: str | list[dict[str, Any]] | RenderedPrompt, config: RolloutConfig, tools: Any
) -> RenderedPrompt:
    if isinstance(prompt, RenderedPrompt):
        if not prompt.token_ids:
            ids = encode_text(engine.tokenizer, prompt.text)
            return RenderedPrompt(prompt.text, ids, prompt.chat_template)
        return prompt
    specs = tools.specs() if tools is not None and hasattr(tools, "specs") else None
    return build_prompt(
        engine.tokenizer,
        prompt,
        tools=specs,
        system_prompt=config.system_prompt,
        chat_template_kwargs=config.chat_template_kwargs,
    )


async def run_episode(
    engine: Engine,
    prompt: str | list[dict[str, Any]] | RenderedPrompt,
    *,
    label: str | None = None,
    config: RolloutConfig | None = None,
    tools: Any = None,
    reward: RewardConfig | None = None,
    score_reward: bool = True,
    group: str | None = None,
    sampling: SamplingParams | None = None,
) -> Episode:
    """Run one episode to completion. Never raises for a bad episode: engine failures end it as
    ``aborted`` with ``error`` set.

    prompt: a question (rendered with the Tool Format via retool.prompts.build_prompt), a list of chat
    messages (rendered the same way), or a RenderedPrompt that is already templated (used as is).
    tools: a retool.tools.ToolRegistry (anything with ``async acall(name, arguments)`` and ``specs()``).
    sampling: overrides temperature/top_p/top_k/stop/stop_token_ids; max_new_tokens comes from config.
    The reward is scored when ``label`` is given and ``score_reward`` is True.
    """
    config = config or RolloutConfig()
    wall_start = time.perf_counter()
    tokenizer = engine.tokenizer
    rendered = _coerce_prompt(engine, prompt, config, tools)
    prompt_ids = list(rendered.token_ids)
    specs = tools.specs() if tools is not None and hasattr(tools, "specs") else None

    base = sampling or config.sampling()
    stop = list(base.stop)
    if config.stop_at_tool_call:
        stop += [s for s in CALL_STOP_STRINGS if s not in stop]
    stop_ids = list(base.stop_token_ids) + [
        i for i in _end_token_ids(tokenizer) if i not in base.stop_token_ids
    ]

    response_ids: list[int] = []
    logprobs: list[float] = []
    loss_mask: list[int] = []
    model_chunks: list[str] = []
    records: list[ToolCallRecord] = []
    turns: list[TurnRecord] = []
    response_chars = 0
    status: EpisodeStatus = "completed"
    stop_reason: StopReason = "end_of_turn"
    error: str | None = None
    gen_time = tool_time = 0.0
    tool_turn: ToolTurnRenderer | None = None

    def remaining() -> int:
        left = config.max_context_tokens - len(prompt_ids) - len(response_ids)
        if config.max_response_tokens is not None:
            left = min(left, config.max_response_tokens - len(response_ids))
        return left

    for turn in range(config.max_turns):
        budget = remaining()
        if budget <= 0:
            status, stop_reason = "truncated", "context"
            break
        max_new = min(config.max_new_tokens, budget)
        params = SamplingParams(
            temperature=base.temperature,
            top_p=base.top_p,
            top_k=base.top_k,
            max_new_tokens=max_new,
            stop=stop,
            stop_token_ids=stop_ids,
        )
        input_ids = prompt_ids + response_ids
        t0 = time.perf_counter()
        try:
            gen: Generation = await retry_async(
                lambda ids=input_ids, p=params: engine.generate(ids, p),  # type: ignore[misc]
                attempts=config.engine_retries + 1,
                base_delay_s=config.engine_backoff_s,
                max_delay_s=config.engine_backoff_max_s,
                what="engine.generate",
            )
            if len(gen.token_ids) != len(gen.logprobs):
                raise EngineError("engine returned misaligned token ids and logprobs", retryable=False)
            if len(gen.token_ids) > max_new:
                raise EngineError(
                    f"engine returned {len(gen.token_ids)} tokens for max_new_tokens={max_new}",
                    retryable=False,
                )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            gen_time += time.perf_counter() - t0
            status, stop_reason, error = "aborted", "engine_error", f"{type(exc).__name__}: {exc}"
            log.warning("episode aborted after engine failures: %s", error)
            break
        turn_gen_time = time.perf_counter() - t0
        gen_time += turn_gen_time

        gen_ids = list(gen.token_ids)
        gen_lps = [float(x) for x in gen.logprobs]
        text = gen.text or _decode(tokenizer, gen_ids)
        if gen.finish_reason == "abort":
            response_ids += gen_ids
            logprobs += gen_lps
            loss_mask += [1] * len(gen_ids)
            model_chunks.append(text)
            turns.append(TurnRecord(len(gen_ids), 0, "abort", turn_gen_time, 0.0, max_new))
            status, stop_reason = "aborted", "abort"
            break

        calls = parse_tool_calls(text, markdown_fallback=config.markdown_fallback)
        cut_off = gen.finish_reason == "length"
        runnable = [c for c in calls if c.closed or not cut_off]
        answer_at = last_answer_position(text)
        if (
            runnable
            and runnable[-1].fmt == "markdown"
            and answer_at is not None
            and answer_at > runnable[-1].end
        ):
            # an untagged code block followed by an answer is part of the solution text, not a call;
            # a tagged call always runs and whatever the model wrote after it (an invented output) is dropped
            runnable = []
        if runnable:
            last_end = runnable[-1].end
            if text[last_end:].strip():
                keep = _trim_point(tokenizer, gen_ids, text, last_end)
                gen_ids, gen_lps = gen_ids[:keep], gen_lps[:keep]
                text = _decode(tokenizer, gen_ids)
        turn_token_pos = len(response_ids)
        turn_char_pos = response_chars
        response_ids += gen_ids
        logprobs += gen_lps
        loss_mask += [1] * len(gen_ids)
        model_chunks.append(text)
        response_chars += len(text)

        if not runnable:
            turns.append(TurnRecord(len(gen_ids), 0, gen.finish_reason, turn_gen_time, 0.0, max_new))
            if cut_off:
                status = "truncated"
                stop_reason = "context" if max_new < config.max_new_tokens else "length"
            else:
                status, stop_reason = "completed", ("answer" if answer_at is not None else "end_of_turn")
            break

        allowance = config.max_tool_calls - len(records)
        to_run = runnable[: max(allowance, 0)]
        t1 = time.perf_counter()
        results: list[str] = []
        for call in to_run:
            call_status, observation, seconds = await _execute(tools, call)
            results.append(observation)
            records.append(
                ToolCallRecord(
                    name=call.name or "",
                    arguments=dict(call.arguments),
                    fmt=call.fmt,
                    status=call_status,
                    error=call.error,
                    observation=observation,
                    duration_s=seconds,
                    turn=turn,
                    char_pos=turn_char_pos + call.start,
                    token_pos=turn_token_pos,
                )
            )
        turn_tool_time = time.perf_counter() - t1
        tool_time += turn_tool_time

        if not to_run:
            turns.append(
                TurnRecord(len(gen_ids), 0, gen.finish_reason, turn_gen_time, turn_tool_time, max_new)
            )
            status, stop_reason = "truncated", "max_tool_calls"
            break
        if any(c.fmt == "tool_call" for c in to_run):
            if tool_turn is None:
                tool_turn = ToolTurnRenderer(tokenizer, specs, config.chat_template_kwargs)
            obs_text = tool_turn(results)
        else:
            obs_text = "".join(format_interpreter(r) for r in results)
        obs_ids = encode_text(tokenizer, obs_text)
        room = remaining()
        overflow = len(obs_ids) > room
        if overflow:
            obs_ids = obs_ids[: max(room, 0)]
            obs_text = _decode(tokenizer, obs_ids)
        response_ids += obs_ids
        logprobs += [0.0] * len(obs_ids)
        loss_mask += [0] * len(obs_ids)
        response_chars += len(obs_text)
        turns.append(
            TurnRecord(len(gen_ids), len(obs_ids), gen.finish_reason, turn_gen_time, turn_tool_time, max_new)
        )
        if overflow:
            status, stop_reason = "truncated", "context"
            break
        if len(records) >= config.max_tool_calls:
            status, stop_reason = "truncated", "max_tool_calls"
            break
    else:
        status, stop_reason = "truncated", "max_turns"

    response_text = _decode(tokenizer, response_ids)
    model_text = "".join(model_chunks)
    episode_reward: Reward | None = None
    if label is not None and score_reward and status != "aborted":
        episode_reward = await ascore(model_text, label, config=reward, num_tool_calls=len(records))
    return Episode(
        prompt_ids=prompt_ids,
        response_ids=response_ids,
        logprobs=logprobs,
        loss_mask=loss_mask,
        response_text=response_text,
        tool_calls=records,
        status=status,
        reward=episode_reward,
        num_turns=len(turns),
        label=label,
        stop_reason=stop_reason,
        prompt_text=rendered.text,
        model_text=model_text,
        group=group,
        error=error,
        turns=turns,
        gen_time_s=gen_time,
        tool_time_s=tool_time,
        wall_time_s=time.perf_counter() - wall_start,
    )


async def run_episodes(
    engine: Engine,
    prompts: Sequence[str | list[dict[str, Any]] | RenderedPrompt],
    *,
    labels: Sequence[str | None] | None = None,
    groups: Sequence[str | None] | None = None,
    config: RolloutConfig | None = None,
    tools: Any = None,
    reward: RewardConfig | None = None,
    score_reward: bool = True,
) -> list[Episode]:
    """Run many episodes concurrently (at most ``config.concurrency`` at once), in input order.
    One failing episode never fails the batch: an unexpected error becomes an aborted episode."""
    config = config or RolloutConfig()
    labels = list(labels) if labels is not None else [None] * len(prompts)
    groups = list(groups) if groups is not None else [None] * len(prompts)
    if len(labels) != len(prompts) or len(groups) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts, {len(labels)} labels and {len(groups)} groups")
    gate = asyncio.Semaphore(config.concurrency)

    async def one(i: int) -> Episode:
        async with gate:
            try:
                return await run_episode(
                    engine,
                    prompts[i],
                    label=labels[i],
                    config=config,
                    tools=tools,
                    reward=reward,
                    score_reward=score_reward,
                    group=groups[i],
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("episode %d failed", i)
                return _failed_episode(labels[i], groups[i], f"{type(exc).__name__}: {exc}")

    return list(await asyncio.gather(*(one(i) for i in range(len(prompts)))))


def _failed_episode(label: str | None, group: str | None, error: str) -> Episode:
    return Episode(
        prompt_ids=[],
        response_ids=[],
        logprobs=[],
        loss_mask=[],
        response_text="",
        tool_calls=[],
        status="aborted",
        reward=None,
        num_turns=0,
        label=label,
        stop_reason="engine_error",
        group=group,
        error=error,
    )
