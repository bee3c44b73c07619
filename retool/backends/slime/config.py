"""Configuration of the slime backend (GPU cluster runs).

Every argument that reaches slime comes from these models; nothing is hard-coded in the command
builder. The defaults are the values of slime's ReTool example for Qwen3-4B
(``scripts/models/qwen3-4B.sh``, ``examples/retool/retool_qwen3_4b_{sft,rl}.sh``) except where that
example is wrong (see ``RlConfig``'s length check and the custom hooks, which point at our code).

Argument groups map one to one onto slime/Megatron flags: a field ``foo_bar`` becomes ``--foo-bar``;
``True`` emits the bare flag, ``False``/``None`` emit nothing, lists emit one value each. The field
order is the order on the command line.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Args(BaseModel):
    """Base of every argument group: unknown keys are errors naming the key."""

    model_config = ConfigDict(extra="forbid")


class ModelArgs(_Args):
    """Qwen3-4B architecture, as slime's scripts/models/qwen3-4B.sh with the ReTool rotary base."""

    swiglu: bool = True
    num_layers: int = 36
    hidden_size: int = 2560
    ffn_hidden_size: int = 9728
    num_attention_heads: int = 32
    group_query_attention: bool = True
    num_query_groups: int = 8
    use_rotary_position_embeddings: bool = True
    disable_bias_linear: bool = True
    normalization: str = "RMSNorm"
    norm_epsilon: float = 1e-6
    # qwen3-4B.sh defaults to 1e6; Qwen3-4B-Instruct-2507 (the ReTool example) needs 5e6.
    rotary_base: int = 5_000_000
    vocab_size: int = 151936
    kv_channels: int = 128
    qk_layernorm: bool = True


class PerfArgs(_Args):
    """Parallelism, recomputation and batching (Megatron)."""

    tensor_model_parallel_size: int = 1
    sequence_parallel: bool = True
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: int = 1
    recompute_granularity: Literal["full", "selective"] | None = "full"
    recompute_method: Literal["uniform", "block"] | None = "uniform"
    recompute_num_layers: int | None = 1
    micro_batch_size: int | None = None
    use_dynamic_batch_size: bool = True
    max_tokens_per_gpu: int = 9216


class OptimizerArgs(_Args):
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = 1e-5
    lr_decay_style: Literal["constant", "linear", "cosine", "inverse-square-root", "WSD"] = "cosine"
    min_lr: float | None = 1e-6
    lr_warmup_fraction: float | None = 0.1
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95


class MiscArgs(_Args):
    """Numerics shared by SFT and RL (dropout off, fp32 reductions, flash attention)."""

    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    accumulate_allreduce_grads_in_fp32: bool = True
    attention_softmax_in_fp32: bool = True
    attention_backend: Literal["flash", "fused", "unfused", "local", "auto"] | None = "flash"


class SftArgs(_Args):
    """The SFT job: slime's SFT rollout feeds the chat data straight into sft_loss (no SGLang)."""

    rollout_function_path: str = "slime.rollout.sft_rollout.generate_rollout"
    input_key: str = "messages"
    tool_key: str | None = None
    rollout_shuffle: bool = True
    num_epoch: int = 3
    rollout_batch_size: int = 128
    global_batch_size: int = 128
    loss_type: Literal["sft_loss"] = "sft_loss"
    calculate_per_token_loss: bool = True
    disable_compute_advantages_and_returns: bool = True
    debug_train_only: bool = True


class RolloutArgs(_Args):
    input_key: str = "prompt"
    label_key: str = "label"
    # Off: our generate hook renders the Tool Format once through the tokenizer's chat template. With it on,
    # slime templates the prompt first (without the tools unless the data carries them).
    apply_chat_template: bool = False
    rollout_shuffle: bool = True
    reward_key: str | None = "score"
    num_rollout: int = 3000
    rollout_batch_size: int = 32
    n_samples_per_prompt: int = 8
    # Not in the reference: bounds the prompt so prompt + response fits --max-tokens-per-gpu.
    rollout_max_prompt_len: int | None = 1024
    rollout_max_response_len: int = 8192
    rollout_temperature: float = 1.0
    global_batch_size: int = 256
    balance_data: bool = True


class EvalArgs(_Args):
    eval_interval: int | None = 20
    # dataset name -> jsonl path on the cluster; emitted as --eval-prompt-data name path ...
    eval_prompt_data: dict[str, str] = Field(
        default_factory=lambda: {"aime": "/root/aime-2024/aime-2024.jsonl"}
    )
    n_samples_per_eval_prompt: int = 16
    # The reference asks for 16384 but its 9216-token context cap can never reach it: 8192 fits.
    eval_max_response_len: int = 8192
    eval_top_p: float | None = 1.0


class GrpoArgs(_Args):
    advantage_estimator: Literal[
        "grpo", "gspo", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "ppo"
    ] = "grpo"
    use_kl_loss: bool = True
    kl_loss_coef: float = 0.0
    kl_loss_type: Literal["k1", "k2", "k3", "low_var_kl"] = "low_var_kl"
    entropy_coef: float = 0.0
    eps_clip: float = 0.2
    eps_clip_high: float = 0.28


class SglangArgs(_Args):
    rollout_num_gpus_per_engine: int = 2
    sglang_mem_fraction_static: float = 0.7


class CustomHookArgs(_Args):
    """Import paths slime loads in its processes; they must be importable there (py_modules ships them)."""

    custom_generate_function_path: str = "retool.backends.slime.hooks.generate"
    custom_rm_path: str = "retool.backends.slime.hooks.reward_func"
    custom_rollout_log_function_path: str | None = "retool.backends.slime.hooks.log_rollout_data"
    custom_eval_rollout_log_function_path: str | None = "retool.backends.slime.hooks.log_eval_rollout_data"


class Resources(_Args):
    """GPUs the training job asks for: --actor-num-nodes x --actor-num-gpus-per-node."""

    nodes: int = Field(default=1, ge=1)
    gpus_per_node: int = Field(default=8, ge=1)
    colocate: bool = False


class PathsConfig(_Args):
    """Where each stage reads and writes, as seen from the cluster's nodes (a shared filesystem).

    Defaults follow the reference's layout under /root; the pipeline overrides them from params.yaml.
    """

    hf_base: str = "/root/Qwen/Qwen3-4B-Instruct-2507"
    base_torch_dist: str = "/root/Qwen/Qwen3-4B-Instruct-2507_torch_dist"
    sft_data: str = "/root/data/retool/ReTool-SFT.parquet"
    sft_save: str = "/root/Qwen/Qwen3-4B-Instruct-2507_sft_slime"
    sft_hf: str = "/root/Qwen/Qwen3-4B-Instruct-2507_sft_hf"
    rl_data: str = "/root/dapo-math-17k/dapo-math-17k.jsonl"
    rl_save: str = "/root/Qwen/Qwen3-4B-Instruct-2507_retool_rl"
    rl_hf: str = "/root/Qwen/Qwen3-4B-Instruct-2507_retool_rl_hf"
    # slime writes TensorBoard events to <tensorboard_dir>/<stage>; the mirror tails them.
    tensorboard_dir: str = "/root/retool/tensorboard"


class ClusterConfig(_Args):
    """How jobs reach the GPUs: Ray address, code locations on the nodes, job environment."""

    ray_address: str | None = None  # None: RAY_ADDRESS from the environment, else http://127.0.0.1:8265
    slime_dir: str = "/root/slime"
    megatron_dir: str = "/root/Megatron-LM"
    python: str = "python3"
    # True: this machine sees the cluster's checkpoint directories (checked here for --load).
    # False: always pass --load; slime falls back to --ref-load on the node when nothing is saved.
    shared_filesystem: bool = True
    # Ship the local `retool` package to the job (runtime_env py_modules) so hook paths import there.
    ship_package: bool = True
    # NVLink SHARP all-reduce; the reference turns it on when nvidia-smi reports NVLink.
    nccl_nvls_enable: bool = False
    env_vars: dict[str, str] = Field(
        default_factory=lambda: {"CUDA_DEVICE_MAX_CONNECTIONS": "1", "PYTHONUNBUFFERED": "1"}
    )
    # Optional runtime_env "pip" list (clusters without a registry leave it empty).
    pip: list[str] = Field(default_factory=list)


class ConvertConfig(_Args):
    """HF -> torch_dist conversion (one process, one GPU)."""

    gpus: int = Field(default=1, ge=0)


class SftConfig(_Args):
    resources: Resources = Field(default_factory=lambda: Resources(nodes=1, gpus_per_node=8))
    save_interval: int = 1000
    args: SftArgs = Field(default_factory=SftArgs)
    perf: PerfArgs = Field(default_factory=PerfArgs)
    optimizer: OptimizerArgs = Field(default_factory=OptimizerArgs)
    env_vars: dict[str, str] = Field(
        default_factory=lambda: {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    )

    @model_validator(mode="after")
    def _no_colocate(self) -> SftConfig:
        if self.resources.colocate:
            raise ValueError("sft.resources.colocate: slime's train_async.py does not support colocation")
        return self


class RlConfig(_Args):
    resources: Resources = Field(default_factory=lambda: Resources(nodes=1, gpus_per_node=4, colocate=True))
    save_interval: int = 20
    rollout: RolloutArgs = Field(default_factory=RolloutArgs)
    eval: EvalArgs = Field(default_factory=EvalArgs)
    perf: PerfArgs = Field(default_factory=lambda: PerfArgs(tensor_model_parallel_size=2))
    grpo: GrpoArgs = Field(default_factory=GrpoArgs)
    optimizer: OptimizerArgs = Field(
        default_factory=lambda: OptimizerArgs(
            lr=1e-6, lr_decay_style="constant", min_lr=None, lr_warmup_fraction=None, adam_beta2=0.98
        )
    )
    sglang: SglangArgs = Field(default_factory=SglangArgs)
    custom: CustomHookArgs = Field(default_factory=CustomHookArgs)
    env_vars: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _lengths_fit(self) -> RlConfig:
        """Refuse response lengths the token budget cannot hold (the reference's eval length could not)."""
        budget = self.perf.max_tokens_per_gpu * self.perf.context_parallel_size
        prompt = self.rollout.rollout_max_prompt_len or 0
        for name, length in (
            ("rl.rollout.rollout_max_response_len", self.rollout.rollout_max_response_len),
            ("rl.eval.eval_max_response_len", self.eval.eval_max_response_len),
        ):
            if prompt + length > budget:
                raise ValueError(
                    f"{name}={length} plus rl.rollout.rollout_max_prompt_len={prompt} exceeds "
                    f"rl.perf.max_tokens_per_gpu x context_parallel_size = {budget}: such a sample can never fit"
                )
        if self.eval.eval_interval is not None and not self.eval.eval_prompt_data:
            raise ValueError("rl.eval.eval_prompt_data is empty but rl.eval.eval_interval is set")
        gpus = self.resources.nodes * self.resources.gpus_per_node
        if gpus % self.perf.tensor_model_parallel_size:
            raise ValueError(
                f"rl.perf.tensor_model_parallel_size={self.perf.tensor_model_parallel_size} does not divide "
                f"the {gpus} training GPUs"
            )
        return self


class ExportConfig(_Args):
    """torch_dist -> HF conversion of a training run's latest checkpoint (CPU, no GPU needed)."""

    gpus: int = Field(default=0, ge=0)
    chunk_size: int = 5 * 1024**3


class TrackingConfig(_Args):
    """Training curves: slime writes TensorBoard events, a thread mirrors them into MLflow."""

    use_tensorboard: bool = True
    mirror_prefixes: list[str] = Field(default_factory=lambda: ["train/", "perf/"])
    mirror_interval_s: float = Field(default=15.0, gt=0)


class SlimeConfig(_Args):
    """Everything the slime backend needs to build, plan and run its stages."""

    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    paths: PathsConfig = Field(default_factory=PathsConfig)
    model: ModelArgs = Field(default_factory=ModelArgs)
    misc: MiscArgs = Field(default_factory=MiscArgs)
    convert: ConvertConfig = Field(default_factory=ConvertConfig)
    sft: SftConfig = Field(default_factory=SftConfig)
    rl: RlConfig = Field(default_factory=RlConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
