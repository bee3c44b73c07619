"""The `retool` command.

retool stage NAME        run one pipeline stage (what dvc.yaml's commands call)
retool plan [--profile]  print every stage's exact command without running anything
retool params            print every knob with its default (the shipped params.yaml)
retool validate          check params.yaml and name every bad key
retool sandbox serve     expose the code sandbox over HTTP (SandboxFusion-compatible API)
retool mlflow sync       send metrics kept locally while MLflow was unreachable
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from retool.layout import STAGES


def _load(args: argparse.Namespace, profile: str | None = None):  # type: ignore[no-untyped-def]
    from retool.config import load_config

    overrides = {"profile": profile} if profile else None
    return load_config(Path(args.params), overrides=overrides)


def _cmd_stage(args: argparse.Namespace) -> int:
    from retool.stages import run_stage

    cfg = _load(args)
    run_stage(args.name, cfg)
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from retool.stages import format_plan

    cfg = _load(args, args.profile)
    print(format_plan(cfg))
    return 0


def _cmd_params(args: argparse.Namespace) -> int:
    from retool.config import PipelineConfig, dump_params

    print(dump_params(PipelineConfig()), end="")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    cfg = _load(args)
    print(f"{args.params}: valid (profile {cfg.profile}, backend {cfg.backend})")
    return 0


def _cmd_sandbox(args: argparse.Namespace, rest: list[str]) -> int:
    from retool.sandbox.server import cli_main

    return int(cli_main(rest))


def _cmd_mlflow_sync(args: argparse.Namespace) -> int:
    from retool.tracking import sync_buffer

    sent = sync_buffer(args.buffer)
    print(f"sent {sent} buffered record(s) to {__import__('mlflow').get_tracking_uri()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retool", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", default="params.yaml", help="the params file (default: params.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    stage = sub.add_parser("stage", help="run one pipeline stage")
    stage.add_argument("name", choices=STAGES)
    stage.set_defaults(func=_cmd_stage)

    plan = sub.add_parser("plan", help="print every stage's command without running it")
    plan.add_argument("--profile", choices=["tiny", "qwen3-4b"], default=None)
    plan.set_defaults(func=_cmd_plan)

    sub.add_parser("params", help="print the default params.yaml").set_defaults(func=_cmd_params)
    sub.add_parser("validate", help="validate params.yaml").set_defaults(func=_cmd_validate)

    sandbox = sub.add_parser("sandbox", help="sandbox commands (serve)")
    sandbox.add_argument("action", choices=["serve"])
    sandbox.set_defaults(func=None)

    mlflow = sub.add_parser("mlflow", help="MLflow commands (sync)")
    mlflow.add_argument("action", choices=["sync"])
    mlflow.add_argument(
        "--buffer", default=None, help="the buffer file (default: .retool/mlflow-buffer.jsonl)"
    )
    mlflow.set_defaults(func=_cmd_mlflow_sync)
    return parser


def main(argv: list[str] | None = None) -> int:
    from retool.config import ConfigError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "sandbox":
            return _cmd_sandbox(args, rest)
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return int(args.func(args))
    except ConfigError as err:
        print(f"retool: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
