"""slime's custom generate and reward hooks: thin adapters over retool.rollout.run_episode and
retool.reward.score (one episode loop for every backend).

slime loads them by path:
  --custom-generate-function-path retool.backends.slime.hooks.generate
  --custom-rm-path                retool.backends.slime.hooks.reward_func      (with --reward-key score)
Our settings reach the rollout workers through the environment variable ``RETOOL_HOOKS_CONFIG``: a JSON
object ``{"rollout": {...}, "reward": {...}, "sandbox": {...}}`` (RolloutConfig, RewardConfig and
SandboxConfig fields), or the path of a JSON/YAML file holding it; ``hooks_env`` builds it.
slime's own arguments take precedence where they overlap: ``rollout_max_context_len`` (or
``eval_max_context_len``) is the context budget, the ``sampling_params`` slime passes give temperature,
top-p, top-k and the total response budget (``max_new_tokens``).

Nothing here imports slime: ``import retool.backends.slime.hooks`` works anywhere; the Sample's status
enum is read from the sample's own class.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path
from typing import Any

from retool.engines.base import SamplingParams
from retool.prompts import RenderedPrompt
from retool.reward import RewardConfig, ascore
from retool.rollout import Episode, RolloutConfig, run_episode

CONFIG_ENV = "RETOOL_HOOKS_CONFIG"


def hooks_env(
    rollout: RolloutConfig | None = None, reward: RewardConfig | None = None, sandbox: Any = None
) -> dict[str, str]:
    """The environment variable that carries our settings into slime's rollout workers."""
    payload: dict[str, Any] = {}
    if rollout is not None:
        payload["rollout"] = rollout.model_dump(mode="json")
    if reward is not None:
        payload["reward"] = reward.model_dump(mode="json")
    if sandbox is not None:
        payload["sandbox"] = (
            sandbox.model_dump(mode="json") if hasattr(sandbox, "model_dump") else dict(sandbox)
        )
    return {CONFIG_ENV: json.dumps(payload)}


def load_hooks_config(raw: str | None = None) -> dict[str, Any]:
    """Parse ``RETOOL_HOOKS_CONFIG`` (inline JSON or a file path); {} when unset."""
    raw = os.environ.get(CONFIG_ENV, "") if raw is None else raw
    raw = raw.strip()
    if not raw:
        return {}
    if not raw.startswith("{"):
        path = Path(raw)
        if not path.is_file():
            raise ValueError(f"{CONFIG_ENV}={raw!r} is neither a JSON object nor an existing file")
        text = path.read_text(encoding="utf-8")
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    else:
        data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError(f"{CONFIG_ENV} must hold a JSON object, got {type(data).__name__}")
    unknown = set(data) - {"rollout", "reward", "sandbox"}
    if unknown:
        raise ValueError(
            f"{CONFIG_ENV}: unknown section(s) {sorted(unknown)}; expected rollout, reward, sandbox"
        )
    return data


class _State:
    """Per-process state built on first use: tokenizer, engine, tool registry, configs."""

    _lock = threading.Lock()
    _instance: _State | None = None

    def __init__(self, args: Any) -> None:
        from retool.engines.sglang import SGLangEngine

        cfg = load_hooks_config()
        self.rollout = RolloutConfig.model_validate(cfg.get("rollout", {}))
        self.reward = RewardConfig.model_validate(cfg.get("reward", {}))
        self.sandbox_settings = cfg.get("sandbox", {})
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.hf_checkpoint, trust_remote_code=True)
        url = f"http://{args.sglang_router_ip}:{args.sglang_router_port}/generate"
        self.engine = SGLangEngine(url, tokenizer)
        self._tools: Any = None
        self._sandbox: Any = None

    @property
    def tools(self) -> Any:
        if self._tools is None:
            from retool.sandbox import Sandbox, SandboxConfig
            from retool.tools import ToolRegistry

            self._sandbox = Sandbox(SandboxConfig.model_validate(self.sandbox_settings))
            self._tools = ToolRegistry(self._sandbox)
        return self._tools

    @classmethod
    def get(cls, args: Any) -> _State:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls(args)
            return cls._instance

    @classmethod
    def reset(cls) -> None:
        """Drop the state (closing its sandbox); the next hook call builds it again."""
        with cls._lock:
            instance, cls._instance = cls._instance, None
        if instance is not None and instance._sandbox is not None:
            instance._sandbox.close()


def _rollout_for(
    args: Any, base: RolloutConfig, sampling_params: dict[str, Any], evaluation: bool
) -> RolloutConfig:
    updates: dict[str, Any] = {}
    ctx = getattr(args, "eval_max_context_len", None) if evaluation else None
    ctx = ctx or getattr(args, "rollout_max_context_len", None)
    if ctx:
        updates["max_context_tokens"] = int(ctx)
    total = sampling_params.get("max_new_tokens")
    if total:
        updates["max_response_tokens"] = int(total)
    for ours, theirs in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k")):
        if sampling_params.get(theirs) is not None:
            updates[ours] = sampling_params[theirs]
    return base.model_copy(update=updates) if updates else base


def _sampling_for(config: RolloutConfig, sampling_params: dict[str, Any]) -> SamplingParams:
    stop = sampling_params.get("stop") or []
    stop = [stop] if isinstance(stop, str) else list(stop)
    return SamplingParams(
        temperature=config.temperature,
        top_p=config.top_p,
        top_k=config.top_k,
        max_new_tokens=config.max_new_tokens,
        stop=stop,
        stop_token_ids=list(sampling_params.get("stop_token_ids") or []),
    )


def _prompt_for(args: Any, sample: Any) -> str | list[dict[str, Any]] | RenderedPrompt:
    """slime's prompt as our loop expects it. With --apply-chat-template slime has already rendered
    it (tools included when the dataset names them): use it as is, never template it twice."""
    prompt = sample.prompt
    if isinstance(prompt, list):
        return prompt
    if getattr(args, "apply_chat_template", False):
        return RenderedPrompt(prompt, [])
    return str(prompt)


def _status(sample: Any, name: str) -> Any:
    enum = getattr(type(sample), "Status", None)
    if enum is None:
        return name
    return enum[name.upper()]


def apply_episode(sample: Any, episode: Episode) -> Any:
    """Write an episode into a slime Sample (tokens, response, mask, logprobs, status, metadata)."""
    sample.tokens = list(episode.prompt_ids) + list(episode.response_ids)
    sample.response = episode.response_text
    sample.response_length = len(episode.response_ids)
    sample.loss_mask = list(episode.loss_mask)
    sample.rollout_log_probs = list(episode.logprobs)
    sample.status = _status(sample, episode.status)
    meta = dict(getattr(sample, "metadata", None) or {})
    meta.update(
        {
            "tool_calls": list(episode.tool_calls),
            "tool_call_count": episode.num_tool_calls,
            "num_turns": episode.num_turns,
            "stop_reason": episode.stop_reason,
            "model_text": episode.model_text,
        }
    )
    if episode.error:
        meta["error"] = episode.error
    sample.metadata = meta
    return sample


async def generate(args: Any, sample: Any, sampling_params: dict[str, Any], evaluation: bool = False) -> Any:
    """slime's custom generate: one ReTool episode for ``sample``."""
    if getattr(args, "partial_rollout", False):
        raise ValueError(
            "retool hooks do not support --partial-rollout: an episode always restarts from its prompt"
        )
    state = _State.get(args)
    # a retried sample comes back with its first attempt's state: start clean
    sample.response, sample.response_length, sample.loss_mask, sample.rollout_log_probs = "", 0, None, None
    config = _rollout_for(args, state.rollout, dict(sampling_params or {}), evaluation)
    episode = await run_episode(
        state.engine,
        _prompt_for(args, sample),
        label=sample.label,
        config=config,
        tools=state.tools,
        score_reward=False,
        sampling=_sampling_for(config, dict(sampling_params or {})),
    )
    return apply_episode(sample, episode)


async def _reward_one(args: Any, sample: Any) -> dict[str, Any]:
    state = _State.get(args)
    meta = getattr(sample, "metadata", None) or {}
    text = meta.get("model_text")
    if text is None:
        text = sample.response
    reward = await ascore(
        str(text),
        str(sample.label or ""),
        config=state.reward,
        num_tool_calls=int(meta.get("tool_call_count", 0)),
    )
    meta = dict(meta)
    meta.update({"pred": reward.pred, "correct": reward.correct, "reward_timed_out": reward.timed_out})
    sample.metadata = meta
    return {"score": reward.score, "acc": float(reward.correct), "pred": reward.pred or ""}


async def reward_func(args: Any, sample: Any, **kwargs: Any) -> Any:
    """slime's custom reward: ``{"score", "acc", "pred"}`` per sample (use --reward-key score); a list
    of samples (--group-rm) gives a list."""
    if isinstance(sample, list):
        return list(await asyncio.gather(*(_reward_one(args, s) for s in sample)))
    return await _reward_one(args, sample)


# slime's custom log hooks live with the MLflow bridge; the RL command's hook paths point here.
from retool.backends.slime.mlflow_bridge import log_eval_rollout_data, log_rollout_data  # noqa: E402

__all__ = ["generate", "reward_func", "hooks_env", "log_rollout_data", "log_eval_rollout_data"]
