# Two entry points (README quick start): `make pipeline` and `make test`. Both set the project up first.
PY := .venv/bin/python
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export RAY_USAGE_STATS_ENABLED := 0
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PATH := $(CURDIR)/.venv/bin:$(PATH)

.PHONY: setup pipeline test lint bench-sandbox bench-rollout bench-local plan mlflow-ui clean

setup:
	bash scripts/setup.sh

## The whole tiny pipeline (download -> convert -> sft_data -> sft -> rl -> eval -> export) through Prefect and DVC.
pipeline: setup
	$(PY) -m flows.pipeline --profile tiny

## Lint, types and the whole test suite.
test: setup lint
	$(PY) -m pytest -q -p no:cacheprovider --durations=15

lint:
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy retool

plan: setup
	.venv/bin/retool plan --profile qwen3-4b

mlflow-ui:
	.venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

bench-sandbox: setup
	$(PY) benchmarks/sandbox_bench.py
bench-rollout: setup
	$(PY) benchmarks/rollout_bench.py
bench-local: setup
	$(PY) benchmarks/local_pipeline.py

clean:
	rm -rf data models checkpoints metrics export mlflow.db .retool
