"""Evaluation with tools: n sampled episodes per problem, scored, summarized under the shared names."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from retool.engines.base import Engine
from retool.metrics import summarize
from retool.reward import RewardConfig
from retool.rollout import Episode, RolloutConfig, run_episodes


class ProblemLike(Protocol):
    prompt: str
    label: str


@dataclass
class EvalResult:
    """Metrics (unprefixed; log them under ``eval/<dataset>/``) and every episode."""

    metrics: dict[str, float]
    episodes: list[Episode] = field(default_factory=list)

    def samples_table(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Rows for an eval samples table: prompt, response, tool calls, answer, reward."""
        rows = [e.sample_row() for e in self.episodes]
        return rows if limit is None else rows[:limit]


async def evaluate(
    engine: Engine,
    problems: Sequence[ProblemLike],
    *,
    rollout: RolloutConfig | None = None,
    reward: RewardConfig | None = None,
    n_samples: int = 1,
    tools: Any = None,
    k: int | None = None,
) -> EvalResult:
    """Sample ``n_samples`` episodes per problem (episodes of one problem share a group), score them and
    summarize: acc, pass@1, pass@k/avg@k/maj@k (k defaults to n_samples), tool-use behaviour."""
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    for i, p in enumerate(problems):
        if not isinstance(getattr(p, "prompt", None), str) or not isinstance(getattr(p, "label", None), str):
            raise TypeError(f"problem {i} needs string .prompt and .label, got {p!r:.120}")
    rollout = rollout or RolloutConfig()
    prompts: list[str] = []
    labels: list[str | None] = []
    groups: list[str | None] = []
    for i, p in enumerate(problems):
        gid = str(getattr(p, "id", None) or i)
        for _ in range(n_samples):
            prompts.append(p.prompt)
            labels.append(p.label)
            groups.append(gid)
    episodes = await run_episodes(
        engine,
        prompts,
        labels=labels,
        groups=groups,
        config=rollout,
        tools=tools,
        reward=reward or RewardConfig(),
    )
    metrics = summarize(episodes, k=k if k is not None else (n_samples if n_samples > 1 else None))
    return EvalResult(metrics, episodes)


GREEDY_KEYS = ("acc", "tool_call_rate", "answer_rate", "code_error_rate", "reward_mean")


async def evaluate_sampled_and_greedy(
    engine: Engine,
    problems: Sequence[Any],
    *,
    rollout: RolloutConfig,
    reward: RewardConfig,
    tools: Any,
    n_samples: int,
    temperature: float = 1.0,
    greedy: bool = True,
) -> tuple[dict[str, float], list[Episode]]:
    """Sampled metrics at ``temperature`` (acc, pass@k, tool-call rate, behaviour) with ``greedy_*`` beside.

    Sampled accuracy is the headline: greedy decoding hides what RL changes (FIELD-NOTES), but a reader
    wants both. Both backends evaluate through this one function.
    """
    sampled = await evaluate(
        engine,
        problems,
        rollout=rollout.model_copy(update={"temperature": temperature}),
        reward=reward,
        n_samples=n_samples,
        tools=tools,
    )
    metrics = {k: float(v) for k, v in sampled.metrics.items()}
    if greedy:
        g = await evaluate(
            engine,
            problems,
            rollout=rollout.model_copy(update={"temperature": 0.0}),
            reward=reward,
            n_samples=1,
            tools=tools,
        )
        metrics.update({f"greedy_{k}": float(g.metrics[k]) for k in GREEDY_KEYS if k in g.metrics})
    return metrics, list(sampled.episodes)
