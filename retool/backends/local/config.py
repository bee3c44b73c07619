"""Configuration of the local (CPU/CUDA transformers) backend; defaults are the tiny CPU profile."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class LocalModelConfig(BaseModel):
    """Sizes of the tiny Qwen3ForCausalLM built from scratch by the download stage."""

    model_config = ConfigDict(extra="forbid")

    num_hidden_layers: int = Field(4, ge=1)
    hidden_size: int = Field(128, ge=8)
    intermediate_size: int = Field(384, ge=8)
    num_attention_heads: int = Field(4, ge=1)
    num_key_value_heads: int = Field(2, ge=1)
    head_dim: int | None = None  # default: hidden_size // num_attention_heads
    max_position_embeddings: int = Field(2048, ge=64)
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    # Fixed strings made single tokens on top of the byte alphabet (the Tool Format's tags are always
    # added); with `harvest_min_count` > 0 the builder also adds every line of a system/user prompt that
    # recurs at least that many times in the corpus, so the long fixed tool prompt costs a few tokens.
    extra_tokens: list[str] = Field(
        default_factory=lambda: [
            '{"name": "code_interpreter", "arguments": {"code": "',
            '"}}',
            "```python\n",
            "\n```",
            "print(",
        ]
    )
    harvest_min_count: int = Field(50, ge=0)
    harvest_min_chars: int = Field(12, ge=2)

    @model_validator(mode="after")
    def _check_heads(self) -> LocalModelConfig:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}) unless head_dim is set"
            )
        return self


class LocalSFTConfig(BaseModel):
    """Supervised fine-tuning on the sft_data parquet (loss on assistant tokens only)."""

    model_config = ConfigDict(extra="forbid")

    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)  # overrides epochs when set
    batch_size: int = Field(32, ge=1)
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    max_seq_len: int = Field(1024, ge=16)
    max_examples: int | None = Field(None, ge=1)
    render_tools: bool = True  # render the tool list in the system turn, as the episode loop's prompt does
    checkpoint_every: int = Field(100, ge=1)
    log_every: int = Field(10, ge=1)


class LocalGRPOConfig(BaseModel):
    """GRPO over retool.rollout episodes (PPO clipped objective, group-normalized advantages)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(40, ge=1)
    prompts_per_step: int = Field(16, ge=1)
    n_samples: int = Field(8, ge=2)
    lr: float = Field(2e-4, gt=0)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    clip_low: float = Field(0.2, ge=0)
    clip_high: float = Field(0.28, ge=0)
    kl_coef: float = Field(0.05, ge=0)  # low_var_kl to the SFT model; 0 disables the reference model
    entropy_coef: float = Field(0.0, ge=0)
    ppo_epochs: int = Field(1, ge=1)
    micro_batch_size: int = Field(32, ge=1)
    skip_uniform_groups: bool = True  # groups whose samples all got the same reward carry no signal
    eval_every: int = Field(0, ge=0)  # 0: evaluate only at the end (the eval stage does the rest)
    eval_n_samples: int = Field(4, ge=1)
    checkpoint_every: int = Field(10, ge=1)


class LocalEvalConfig(BaseModel):
    """Evaluation of a checkpoint on the eval split: sampled acc at temperature 1 plus greedy beside it."""

    model_config = ConfigDict(extra="forbid")

    n_samples: int = Field(8, ge=1)
    temperature: float = Field(1.0, ge=0)
    greedy: bool = True
    max_problems: int | None = Field(None, ge=1)


class LocalConfig(BaseModel):
    """The local backend: tiny Qwen3 model, SFT and GRPO in-process with the transformers engine."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "bfloat16"] = "float32"
    threads: int = Field(2, ge=1)  # torch.set_num_threads; one torch process at a time on 2 cores
    max_batch_size: int = Field(256, ge=1)  # engine: most sequences decoded in one batched forward
    batch_wait_ms: float = Field(2.0, ge=0)  # engine: how long a step waits for stragglers to join
    progress: bool = True
    model: LocalModelConfig = Field(default_factory=LocalModelConfig)
    sft: LocalSFTConfig = Field(default_factory=LocalSFTConfig)
    grpo: LocalGRPOConfig = Field(default_factory=LocalGRPOConfig)
    eval: LocalEvalConfig = Field(default_factory=LocalEvalConfig)


def smoke_config(**overrides: object) -> LocalConfig:
    """An even smaller profile for tests: 2 layers, hidden 32, a handful of steps."""
    cfg = LocalConfig(
        threads=2,
        progress=False,
        model=LocalModelConfig(
            num_hidden_layers=2,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=2,
            num_key_value_heads=1,
        ),
        sft=LocalSFTConfig(max_steps=60, batch_size=8, warmup_steps=3, checkpoint_every=10, log_every=5),
        grpo=LocalGRPOConfig(
            steps=2, prompts_per_step=2, n_samples=2, micro_batch_size=4, checkpoint_every=1
        ),
        eval=LocalEvalConfig(n_samples=2),
    )
    return cfg.model_copy(update=overrides)
