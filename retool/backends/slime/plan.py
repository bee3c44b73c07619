"""``retool plan``: every slime stage's exact command, runtime environment and resources; runs nothing."""

from __future__ import annotations

import json
from collections.abc import Sequence

from retool.backends.slime.commands import STAGES, JobSpec, build_job
from retool.backends.slime.config import PathsConfig, SlimeConfig

PlannedStage = JobSpec


def plan(
    cfg: SlimeConfig | None = None,
    paths: PathsConfig | None = None,
    *,
    stages: Sequence[str] = STAGES,
    environ: dict[str, str] | None = None,
) -> list[PlannedStage]:
    """The jobs the pipeline would submit, in order.

    ``environ`` defaults to an empty mapping so a printed plan never leaks MLflow credentials; the
    real submission passes ``os.environ`` through ``build_job``.
    """
    cfg = SlimeConfig() if cfg is None else cfg
    env = {} if environ is None else environ
    return [build_job(name, cfg, paths, environ=env) for name in stages]


def _wrap_argv(argv: list[str]) -> str:
    """One flag and its values per line, shell-continued, so the command stays copy-pasteable."""
    import shlex

    lines: list[list[str]] = [[]]
    for token in argv:
        if token.startswith("--") and lines[-1]:
            lines.append([])
        lines[-1].append(token)
    rendered = [shlex.join(parts) for parts in lines if parts]
    return " \\\n    ".join(rendered)


def format_plan(stages: Sequence[PlannedStage], *, as_json: bool = False) -> str:
    """Human-readable (or JSON) rendering for the CLI."""
    if as_json:
        return json.dumps(
            [
                {
                    "name": s.name,
                    "description": s.description,
                    "argv": s.argv,
                    "entrypoint": s.entrypoint,
                    "runtime_env": s.runtime_env,
                    "resources": s.resources.as_dict(),
                }
                for s in stages
            ],
            indent=2,
        )
    out: list[str] = []
    for i, s in enumerate(stages, 1):
        res = s.resources
        out.append(f"# [{i}/{len(stages)}] {s.name}: {s.description}")
        gpu_desc = (
            f"{res.nodes} node(s) x {res.gpus_per_node} GPU(s){' colocated' if res.colocate else ''}"
            if res.nodes
            else f"entrypoint {res.entrypoint_gpus:g} GPU(s)"
        )
        out.append(f"# resources: {gpu_desc}; entrypoint {res.entrypoint_cpus:g} CPU(s)")
        env = s.runtime_env.get("env_vars", {})
        out.append("# env_vars: " + ", ".join(f"{k}={v}" for k, v in sorted(env.items())))
        for key in ("py_modules", "working_dir", "pip"):
            if key in s.runtime_env:
                out.append(f"# {key}: {s.runtime_env[key]}")
        out.append(_wrap_argv(s.argv))
        out.append("")
    return "\n".join(out)
