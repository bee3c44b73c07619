"""Evaluation of Hugging Face checkpoints on the GPU cluster: one SGLang server per checkpoint, driven by
the same episode loop, reward and metrics as training (retool.evaluation over HTTP).

The eval stage submits one job per checkpoint through the slime runners (Ray or local subprocess). The job
(``python -m retool.backends.slime.evaluate``) starts ``sglang.launch_server`` in its own process group on
the node, waits for it to answer, evaluates, writes its metrics and sample rows to a JSON file on the
shared filesystem (atomically) and stops exactly the server it started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from retool.config import PipelineConfig
    from retool.layout import Layout

log = logging.getLogger(__name__)


def episode_row(ep: Any) -> dict[str, Any]:
    """What the eval samples table keeps of one episode (prompt, response, tool calls, reward)."""
    reward = getattr(ep, "reward", None)
    return {
        "prompt": getattr(ep, "prompt_text", None) or getattr(ep, "prompt", ""),
        "label": getattr(ep, "label", ""),
        "response": getattr(ep, "response_text", ""),
        "tool_calls": len(getattr(ep, "tool_calls", None) or []),
        "status": getattr(ep, "status", ""),
        "pred": getattr(reward, "pred", None),
        "correct": bool(getattr(reward, "correct", False)),
        "reward": float(getattr(reward, "score", 0.0) or 0.0),
    }


# ---------------------------------------------------------------------------------------- the driver side
def eval_job(cfg: PipelineConfig, checkpoint: str, model_dir: Path, eval_jsonl: Path, out_json: Path) -> Any:
    """The JobSpec evaluating one checkpoint (argv, runtime env shipping our package, GPUs)."""
    from retool.backends.slime.commands import JobSpec, StageResources, runtime_env

    settings = {
        "rollout": cfg.rollout.model_dump(mode="json"),
        "reward": cfg.reward.model_dump(mode="json"),
        "sandbox": cfg.sandbox.model_dump(mode="json"),
        "eval": {**cfg.slime.eval.model_dump(mode="json"), "samples_logged": cfg.evaluation.samples_logged},
    }
    argv = [
        cfg.slime.cluster.python,
        "-m",
        "retool.backends.slime.evaluate",
        "--model",
        str(model_dir),
        "--problems",
        str(eval_jsonl),
        "--out",
        str(out_json),
        "--settings",
        json.dumps(settings, separators=(",", ":")),
        "--tp",
        str(cfg.slime.eval.gpus),
    ]
    return JobSpec(
        name=f"eval_{checkpoint}",
        argv=argv,
        runtime_env=runtime_env(cfg.slime),
        resources=StageResources(entrypoint_gpus=cfg.slime.eval.gpus),
        description=f"evaluate {checkpoint} ({model_dir}) with SGLang and the episode loop",
    )


def evaluate_checkpoints(
    cfg: PipelineConfig, layout: Layout
) -> dict[str, tuple[dict[str, float], list[Any]]]:
    """Run one eval job per checkpoint; return {name: (metrics, sample rows)}."""
    from retool.backends.slime.stages import make_runner

    root = layout.root.resolve()
    runner = make_runner(cfg.slime)
    results: dict[str, tuple[dict[str, float], list[Any]]] = {}
    for name in cfg.evaluation.checkpoints:
        out = root / "metrics" / f".eval_{name}.json"
        spec = eval_job(
            cfg,
            name,
            (root / layout.model(name).relative_to(layout.root)),
            root / layout.eval_jsonl.relative_to(layout.root),
            out,
        )
        result = runner.run(spec, lambda line: log.info("%s", line))
        result.raise_for_status()
        data = json.loads(out.read_text())
        results[name] = (data["metrics"], data["samples"])
    return results


# ------------------------------------------------------------------------------------------- the job side
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until the SGLang server answers its health check (or its process dies)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the SGLang server exited with {proc.returncode} before it was ready")
        for path in ("/health_generate", "/health"):
            try:
                with urllib.request.urlopen(url + path, timeout=5) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
        time.sleep(2)
    raise TimeoutError(f"the SGLang server at {url} was not ready after {timeout_s} s")


@contextlib.contextmanager
def sglang_server(model: str, tp: int, extra_args: list[str], timeout_s: float) -> Iterator[str]:
    """Start ``sglang.launch_server`` for ``model`` in its own process group; stop that group after."""
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "sglang.launch_server",
        "--model-path",
        model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--tp-size",
        str(tp),
        *extra_args,
    ]
    log.info("starting %s", " ".join(cmd))
    proc = subprocess.Popen(cmd, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, timeout_s, proc)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_eval(server_url: str, model: str, problems_path: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Evaluate against a running SGLang server: sampled metrics (+ greedy), and the sample rows."""
    from transformers import AutoTokenizer

    from retool.data.problems import load_problems
    from retool.engines.sglang import SGLangEngine
    from retool.evaluation import evaluate_sampled_and_greedy
    from retool.reward import RewardConfig
    from retool.rollout import RolloutConfig
    from retool.sandbox import Sandbox, SandboxConfig
    from retool.tools import ToolRegistry

    rollout = RolloutConfig.model_validate(settings["rollout"])
    reward = RewardConfig.model_validate(settings["reward"])
    ev = settings["eval"]
    problems = load_problems(problems_path)
    if ev.get("max_problems"):
        problems = problems[: ev["max_problems"]]
    tokenizer = AutoTokenizer.from_pretrained(model)

    async def go() -> dict[str, Any]:
        engine = SGLangEngine(server_url, tokenizer)
        with Sandbox(SandboxConfig.model_validate(settings["sandbox"])) as sandbox:
            metrics, episodes = await evaluate_sampled_and_greedy(
                engine,
                problems,
                rollout=rollout,
                reward=reward,
                tools=ToolRegistry(sandbox),
                n_samples=ev["n_samples"],
                temperature=ev["temperature"],
                greedy=bool(ev.get("greedy")),
            )
            rows = [episode_row(ep) for ep in episodes[: ev.get("samples_logged", 64)]]
            return {"metrics": metrics, "samples": rows}

    return asyncio.run(go())


def main(argv: list[str] | None = None) -> int:
    from retool.io import atomic_write_json

    parser = argparse.ArgumentParser(
        description="Evaluate one HF checkpoint with SGLang and the episode loop."
    )
    parser.add_argument("--model", required=True, help="Hugging Face checkpoint folder")
    parser.add_argument("--problems", required=True, help="eval jsonl ({prompt, label})")
    parser.add_argument("--out", required=True, help="where the metrics + samples JSON goes")
    parser.add_argument("--settings", required=True, help="JSON: rollout, reward, sandbox and eval sections")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument(
        "--server-url", default=None, help="use a running SGLang server instead of starting one"
    )
    parser.add_argument("--server-timeout-s", type=float, default=1800)
    parser.add_argument(
        "--sglang-arg", action="append", default=[], help="extra sglang.launch_server argument"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = json.loads(args.settings)
    if args.server_url:
        result = run_eval(args.server_url, args.model, args.problems, settings)
    else:
        with sglang_server(args.model, args.tp, args.sglang_arg, args.server_timeout_s) as url:
            result = run_eval(url, args.model, args.problems, settings)
    atomic_write_json(args.out, result)
    log.info("wrote %s: %s", args.out, {k: round(v, 4) for k, v in result["metrics"].items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
