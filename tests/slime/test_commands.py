"""Golden tests: the generated commands carry the reference scripts' values (slime examples/retool).

Expected values are written out by hand from slime's scripts/models/qwen3-4B.sh,
examples/retool/retool_qwen3_4b_sft.sh and retool_qwen3_4b_rl.sh (commit 624b824a8); the deliberate
departures (hook paths, eval length, TensorBoard instead of wandb) are asserted as such.
"""

from __future__ import annotations

import json
import shlex

import pytest
from pydantic import ValidationError

from retool.backends.slime import SlimeConfig, build_job, format_plan, plan
from retool.backends.slime.commands import STAGES, runtime_env
from retool.backends.slime.config import PathsConfig

MODEL = {
    "--swiglu": [],
    "--num-layers": ["36"],
    "--hidden-size": ["2560"],
    "--ffn-hidden-size": ["9728"],
    "--num-attention-heads": ["32"],
    "--group-query-attention": [],
    "--num-query-groups": ["8"],
    "--use-rotary-position-embeddings": [],
    "--disable-bias-linear": [],
    "--normalization": ["RMSNorm"],
    "--norm-epsilon": [1e-6],
    "--rotary-base": ["5000000"],
    "--vocab-size": ["151936"],
    "--kv-channels": ["128"],
    "--qk-layernorm": [],
}
PERF_SFT = {
    "--tensor-model-parallel-size": ["1"],
    "--sequence-parallel": [],
    "--pipeline-model-parallel-size": ["1"],
    "--context-parallel-size": ["1"],
    "--expert-model-parallel-size": ["1"],
    "--expert-tensor-parallel-size": ["1"],
    "--recompute-granularity": ["full"],
    "--recompute-method": ["uniform"],
    "--recompute-num-layers": ["1"],
    "--use-dynamic-batch-size": [],
    "--max-tokens-per-gpu": ["9216"],
}
MISC = {
    "--attention-dropout": [0.0],
    "--hidden-dropout": [0.0],
    "--accumulate-allreduce-grads-in-fp32": [],
    "--attention-softmax-in-fp32": [],
    "--attention-backend": ["flash"],
}


def parse(argv: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """(leading tokens, flag -> values); every flag may appear once."""
    head: list[str] = []
    flags: dict[str, list[str]] = {}
    current: str | None = None
    for tok in argv:
        if tok.startswith("--"):
            assert tok not in flags, f"{tok} appears twice"
            flags[tok] = []
            current = tok
        elif current is None:
            head.append(tok)
        else:
            flags[current].append(tok)
    return head, flags


def assert_flags(flags: dict[str, list[str]], expected: dict[str, list]) -> None:
    for flag, values in expected.items():
        assert flag in flags, f"{flag} missing"
        got = flags[flag]
        assert len(got) == len(values), f"{flag}: {got} != {values}"
        for g, v in zip(got, values, strict=True):
            if isinstance(v, float):
                assert float(g) == pytest.approx(v), f"{flag}: {g} != {v}"
            else:
                assert g == v, f"{flag}: {g} != {v}"


def test_convert_command_matches_readme() -> None:
    job = build_job("convert", SlimeConfig(), environ={})
    head, flags = parse(job.argv)
    assert head == ["python3", "/root/slime/tools/convert_hf_to_torch_dist.py"]
    assert_flags(flags, MODEL)
    assert_flags(
        flags,
        {
            "--hf-checkpoint": ["/root/Qwen/Qwen3-4B-Instruct-2507"],
            "--save": ["/root/Qwen/Qwen3-4B-Instruct-2507_torch_dist"],
        },
    )
    assert len(flags) == len(MODEL) + 2
    assert job.resources.entrypoint_gpus == 1


def test_sft_command_matches_reference() -> None:
    job = build_job("sft", SlimeConfig(), environ={})
    head, flags = parse(job.argv)
    assert head == ["python3", "/root/slime/train_async.py"]
    assert_flags(flags, MODEL)
    assert_flags(flags, PERF_SFT)
    assert_flags(flags, MISC)
    assert_flags(
        flags,
        {
            "--actor-num-nodes": ["1"],
            "--actor-num-gpus-per-node": ["8"],
            "--hf-checkpoint": ["/root/Qwen/Qwen3-4B-Instruct-2507"],
            "--ref-load": ["/root/Qwen/Qwen3-4B-Instruct-2507_torch_dist"],
            "--save": ["/root/Qwen/Qwen3-4B-Instruct-2507_sft_slime"],
            "--save-interval": ["1000"],
            # SFT_ARGS
            "--rollout-function-path": ["slime.rollout.sft_rollout.generate_rollout"],
            "--prompt-data": ["/root/data/retool/ReTool-SFT.parquet"],
            "--input-key": ["messages"],
            "--rollout-shuffle": [],
            "--num-epoch": ["3"],
            "--rollout-batch-size": ["128"],
            "--global-batch-size": ["128"],
            "--loss-type": ["sft_loss"],
            "--calculate-per-token-loss": [],
            "--disable-compute-advantages-and-returns": [],
            "--debug-train-only": [],
            # OPTIMIZER_ARGS
            "--optimizer": ["adam"],
            "--lr": [1e-5],
            "--lr-decay-style": ["cosine"],
            "--min-lr": [1e-6],
            "--lr-warmup-fraction": [0.1],
            "--weight-decay": [0.1],
            "--adam-beta1": [0.9],
            "--adam-beta2": [0.95],
            # TensorBoard replaces wandb
            "--use-tensorboard": [],
        },
    )
    assert "--colocate" not in flags  # train_async.py refuses colocation
    assert "--load" not in flags  # nothing saved yet
    assert not any(f.startswith("--wandb") or f == "--use-wandb" for f in flags)
    env = job.runtime_env["env_vars"]
    assert env["PYTHONPATH"] == "/root/Megatron-LM:/root/slime"
    assert env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert env["TENSORBOARD_DIR"] == job.tensorboard_dir
    assert job.resources.nodes == 1 and job.resources.gpus_per_node == 8


def test_rl_command_matches_reference_with_our_hooks() -> None:
    job = build_job("rl", SlimeConfig(), environ={})
    head, flags = parse(job.argv)
    assert head == ["python3", "/root/slime/train.py"]
    assert_flags(flags, MODEL)
    assert_flags(flags, {**PERF_SFT, "--tensor-model-parallel-size": ["2"]})
    assert_flags(flags, MISC)
    assert_flags(
        flags,
        {
            "--actor-num-nodes": ["1"],
            "--actor-num-gpus-per-node": ["4"],
            "--colocate": [],
            # CKPT_ARGS: the SFT result, as HF (SGLang) and torch_dist (Megatron)
            "--hf-checkpoint": ["/root/Qwen/Qwen3-4B-Instruct-2507_sft_hf"],
            "--ref-load": ["/root/Qwen/Qwen3-4B-Instruct-2507_sft_slime"],
            "--save-interval": ["20"],
            # ROLLOUT_ARGS
            "--prompt-data": ["/root/dapo-math-17k/dapo-math-17k.jsonl"],
            "--input-key": ["prompt"],
            "--label-key": ["label"],
            "--rollout-shuffle": [],
            "--reward-key": ["score"],
            "--num-rollout": ["3000"],
            "--rollout-batch-size": ["32"],
            "--n-samples-per-prompt": ["8"],
            "--rollout-max-response-len": ["8192"],
            "--rollout-temperature": [1.0],
            "--global-batch-size": ["256"],
            "--balance-data": [],
            # EVAL_ARGS
            "--eval-interval": ["20"],
            "--eval-prompt-data": ["aime", "/root/aime-2024/aime-2024.jsonl"],
            "--n-samples-per-eval-prompt": ["16"],
            "--eval-top-p": [1.0],
            # GRPO_ARGS
            "--advantage-estimator": ["grpo"],
            "--use-kl-loss": [],
            "--kl-loss-coef": [0.0],
            "--kl-loss-type": ["low_var_kl"],
            "--entropy-coef": [0.0],
            "--eps-clip": [0.2],
            "--eps-clip-high": [0.28],
            # OPTIMIZER_ARGS
            "--optimizer": ["adam"],
            "--lr": [1e-6],
            "--lr-decay-style": ["constant"],
            "--weight-decay": [0.1],
            "--adam-beta1": [0.9],
            "--adam-beta2": [0.98],
            # SGLANG_ARGS
            "--rollout-num-gpus-per-engine": ["2"],
            "--sglang-mem-fraction-static": [0.7],
            # our hooks instead of the example's generate_with_retool module
            "--custom-generate-function-path": ["retool.backends.slime.hooks.generate"],
            "--custom-rm-path": ["retool.backends.slime.hooks.reward_func"],
            "--custom-rollout-log-function-path": ["retool.backends.slime.hooks.log_rollout_data"],
            "--custom-eval-rollout-log-function-path": ["retool.backends.slime.hooks.log_eval_rollout_data"],
        },
    )
    assert "--min-lr" not in flags and "--lr-warmup-fraction" not in flags
    # departures from the reference, on purpose: our generate hook renders the Tool Format once (the
    # reference templated the prompt, then wrapped it again), and the eval length fits the token budget
    assert "--apply-chat-template" not in flags
    assert int(flags["--eval-max-response-len"][0]) + int(flags["--rollout-max-prompt-len"][0]) <= 9216
    env = job.runtime_env["env_vars"]
    assert env["PYTHONPATH"] == "/root/Megatron-LM:/root/slime"
    assert env["NCCL_NVLS_ENABLE"] == "0"
    assert job.runtime_env["py_modules"] and job.runtime_env["py_modules"][0].endswith("retool")


def test_export_jobs_chain_sft_into_rl() -> None:
    cfg = SlimeConfig()
    sft_hf = parse(build_job("sft_hf", cfg, environ={}).argv)[1]
    rl_hf = parse(build_job("rl_hf", cfg, environ={}).argv)[1]
    rl = parse(build_job("rl", cfg, environ={}).argv)[1]
    assert sft_hf["--save-dir"] == [cfg.paths.sft_save] and sft_hf["--output-dir"] == [cfg.paths.sft_hf]
    assert rl["--hf-checkpoint"] == sft_hf["--output-dir"]  # RL starts from the SFT model converted back
    assert rl_hf["--save-dir"] == [cfg.paths.rl_save] and rl_hf["--output-dir"] == [cfg.paths.rl_hf]
    assert sft_hf["--vocab-size"] == ["151936"]


def test_config_overrides_reach_the_command_and_paths_override() -> None:
    cfg = SlimeConfig.model_validate(
        {
            "cluster": {"slime_dir": "/opt/slime", "megatron_dir": "/opt/mlm", "python": "/venv/bin/python"},
            "rl": {"resources": {"gpus_per_node": 8}, "rollout": {"n_samples_per_prompt": 16}},
            "model": {"num_layers": 2},
        }
    )
    paths = PathsConfig(rl_data="/data/train.jsonl")
    job = build_job("rl", cfg, paths, environ={})
    head, flags = parse(job.argv)
    assert head == ["/venv/bin/python", "/opt/slime/train.py"]
    assert flags["--actor-num-gpus-per-node"] == ["8"] and flags["--n-samples-per-prompt"] == ["16"]
    assert flags["--num-layers"] == ["2"] and flags["--prompt-data"] == ["/data/train.jsonl"]
    assert job.runtime_env["env_vars"]["PYTHONPATH"] == "/opt/mlm:/opt/slime"


def test_bad_config_names_the_problem() -> None:
    with pytest.raises(ValidationError, match="num_layer"):
        SlimeConfig.model_validate({"model": {"num_layer": 2}})
    with pytest.raises(ValidationError, match="eval_max_response_len"):
        SlimeConfig.model_validate({"rl": {"eval": {"eval_max_response_len": 16384}}})
    with pytest.raises(ValidationError, match="colocat"):
        SlimeConfig.model_validate({"sft": {"resources": {"colocate": True}}})
    with pytest.raises(ValueError, match="unknown slime stage"):
        build_job("nope", SlimeConfig())


def test_mlflow_run_travels_through_the_job_env() -> None:
    env = runtime_env(SlimeConfig(), environ={"MLFLOW_TRACKING_URI": "http://mlflow:5000", "HOME": "/x"},
                      extra_env={"MLFLOW_RUN_ID": "abc"})  # fmt: skip
    assert env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["env_vars"]["MLFLOW_RUN_ID"] == "abc"
    assert "HOME" not in env["env_vars"]


def test_plan_lists_every_stage_and_is_copy_pasteable() -> None:
    stages = plan()
    assert [s.name for s in stages] == list(STAGES)
    text = format_plan(stages)
    for s in stages:
        assert f"] {s.name}:" in text
        # the rendered command, with line continuations removed, is the exact argv
        block = text.split(f"] {s.name}:", 1)[1].split("\n\n", 1)[0]
        cmd_lines = [ln for ln in block.splitlines() if not ln.startswith("#")][0:]
        rendered = " ".join(ln.strip().rstrip("\\").strip() for ln in cmd_lines[1:] if ln.strip())
        assert shlex.split(rendered) == s.argv
    data = json.loads(format_plan(stages, as_json=True))
    assert data[3]["resources"]["total_gpus"] == 4 and data[3]["runtime_env"]["env_vars"]["TENSORBOARD_DIR"]
