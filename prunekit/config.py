"""Validated configs for the training stages: YAML file + flag overrides -> one pydantic object.

Unknown keys are errors (a typo must not silently fall back to a default); every error is one line naming the file
and the key.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from prunekit import PrunekitError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class RayConfig(Strict):
    num_workers: int = 1
    use_gpu: bool = False
    strategy: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    zero_stage: Literal[2, 3] = 2            # DeepSpeed ZeRO stage
    cpus_per_worker: float = 1
    gpus_per_worker: float = 1
    max_failures: int = 0                     # Ray Train FailureConfig: restarts from the last checkpoint
    address: str | None = None                # Ray cluster address; None = connect if one runs, else start locally

    @field_validator("num_workers")
    @classmethod
    def _positive(cls, v):
        if v < 1:
            raise ValueError("must be >= 1")
        return v


class WandbConfig(Strict):
    project: str = "prunekit"
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto: online with WANDB_API_KEY, else offline


class TrainConfig(Strict):
    """Shared by sft, distill and lora: the one training engine's settings."""
    model: str
    train: Path
    val: Path | None = None
    output_dir: Path
    name: str | None = None                   # run name under storage_path; re-running the same name resumes
    storage_path: Path = Path("runs")
    max_length: int = 1024
    packing: bool = False
    batch_size: int = 4                       # per worker, per micro-step
    grad_accum: int = 1
    max_steps: int | None = None
    epochs: float = 1.0
    lr: float = 1e-5
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    bf16: bool = False                        # bf16 autocast over fp32 weights
    param_dtype: Literal["float32", "bfloat16"] = "float32"  # bfloat16: pure bf16 weights and optimizer
    compile: bool = False                     # torch.compile each decoder layer (GPU)
    gradient_checkpointing: bool = False
    eval_interval: int = 50
    eval_max_samples: int | None = None
    save_interval: int = 100
    log_interval: int = 1
    seed: int = 0
    loss_chunk_size: int = 1024               # rows of the sequence per cross-entropy chunk (no full B*S*V logits)
    trust_remote_code: bool = False
    overwrite: bool = False
    ray: RayConfig = RayConfig()
    wandb: WandbConfig = WandbConfig()
    test_crash_at_step: int | None = None     # test-only: a worker dies once at this step (fault-tolerance tests)

    @model_validator(mode="after")
    def _check(self):
        for key in ("batch_size", "grad_accum", "max_length", "eval_interval", "save_interval", "log_interval"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("max_steps must be >= 1")
        return self


class DistillConfig(TrainConfig):
    teacher: str
    beta: float = 0.5                         # generalized JSD: 0 = forward KL, 1 = reverse KL
    temperature: float = 1.0
    sft_alpha: float = 0.0                    # weight of the plain cross-entropy mixed into the KD loss
    top_k: int | None = None                  # keep only the teacher's top-k logits

    @field_validator("beta")
    @classmethod
    def _beta(cls, v):
        if not 0 <= v <= 1:
            raise ValueError("must be in [0, 1]")
        return v


class LoraTrainConfig(TrainConfig):
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | None = None   # default: the text model's linear projections
    lr: float = 1e-4


STAGE_CONFIGS = {"sft": TrainConfig, "distill": DistillConfig, "lora": LoraTrainConfig}


def _set_dotted(d: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value


def load_config(stage: str, path: str | Path | None = None, overrides: dict | None = None):
    """Read a stage's YAML (if any), apply overrides ({'ray.num_workers': 2, ...}), validate."""
    cls = STAGE_CONFIGS[stage]
    raw: dict = {}
    where = "flags"
    if path is not None:
        where = str(path)
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise PrunekitError(f"--config {path}: cannot read ({str(e).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise PrunekitError(f"--config {path}: expected a mapping of settings")
    for k, v in (overrides or {}).items():
        if v is not None:
            _set_dotted(raw, k, v)
    try:
        return cls(**raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "config"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        raise PrunekitError(f"{where}: {loc}: {msg}") from None
