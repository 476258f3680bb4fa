"""Validated configs for the training stages: YAML file + flag overrides -> one pydantic object.

Unknown keys are errors (a typo must not silently fall back to a default); every error is one line naming the file
and the key.
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from prunekit import PrunekitError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class RayConfig(Strict):
    """Where a run's workers go: the Ray cluster and each worker's resources (how the run is split: `parallel:`)."""
    use_gpu: bool = False
    cpus_per_worker: float = 1
    gpus_per_worker: float = 1
    max_failures: int = 0                     # Ray Train FailureConfig: restarts from the last checkpoint
    address: str | None = None                # Ray cluster address; None = connect if one runs, else start locally


class ParallelConfig(Strict):
    """How a training run is split over its workers: the engine's strategy (it never reads `ray:`)."""
    workers: int = 1
    strategy: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    zero_stage: Literal[2, 3] = 2            # DeepSpeed ZeRO stage
    # fsdp: sharded weights, gradients and optimizer state live in pinned host memory (FSDP2 CPUOffloadPolicy); left
    # out of dumps while off, so run names and sweep settings of earlier runs stay the same
    cpu_offload: bool = Field(False, exclude_if=lambda v: v is False)

    @field_validator("workers")
    @classmethod
    def _positive(cls, v):
        if v < 1:
            raise ValueError("must be >= 1")
        return v

    @model_validator(mode="after")
    def _offload(self):
        if self.cpu_offload and self.strategy != "fsdp":
            raise ValueError("cpu_offload needs parallel.strategy: fsdp")
        return self


# keys that moved from `ray:` to `parallel:`; a config that still gives them is read with a one-line note
MOVED_TO_PARALLEL = {"num_workers": "workers", "strategy": "strategy", "zero_stage": "zero_stage",
                     "cpu_offload": "cpu_offload"}
_noted: set[str] = set()


def move_parallel_keys(raw: dict) -> dict:
    """ray.num_workers / strategy / zero_stage / cpu_offload (before `parallel:` existed) -> parallel.*."""
    ray = raw.get("ray")
    if not isinstance(ray, dict) or not set(ray) & set(MOVED_TO_PARALLEL):
        return raw
    raw, ray = dict(raw), dict(ray)
    parallel = dict(raw.get("parallel") or {})
    moved = []
    for old, new in MOVED_TO_PARALLEL.items():
        if old in ray:
            if new in parallel:
                raise ValueError(f"ray.{old} and parallel.{new} both given; keep parallel.{new}")
            parallel[new] = ray.pop(old)
            moved.append(f"ray.{old} is parallel.{new}")
    raw["ray"], raw["parallel"] = ray, parallel
    note = "; ".join(moved)
    if note not in _noted:
        import sys
        _noted.add(note)
        print(f"prunekit: note: {note} now (read as such)", file=sys.stderr, flush=True)
    return raw


def legacy_layout(settings: dict) -> dict:
    """A config dump as it was before `parallel:` (its keys under `ray:`): what run names and sweep settings are
    hashed and compared on, so runs started before the move resume under the same names."""
    if "parallel" not in settings:
        return settings
    settings = dict(settings)
    parallel = settings.pop("parallel")
    ray = dict(settings.get("ray") or {})
    for old, new in MOVED_TO_PARALLEL.items():
        if new in parallel:
            ray[old] = parallel[new]
    settings["ray"] = ray
    return settings


def wandb_installed() -> bool:
    return importlib.util.find_spec("wandb") is not None


class WandbConfig(Strict):
    project: str = "prunekit"
    # auto: WANDB_DISABLED / WANDB_MODE when set, else online with WANDB_API_KEY, else offline; disabled where wandb
    # is not installed
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"

    @field_validator("mode")
    @classmethod
    def _installed(cls, v):
        if v in ("online", "offline") and not wandb_installed():
            raise ValueError(f"{v} needs the wandb package (pip install wandb); or set wandb.mode: disabled or auto")
        return v


# ---- field blocks the stage configs are composed of ------------------------------------------------------------
# Each setting is declared once, in one of these small models; a stage config inherits the blocks it has (a subclass
# may re-declare a field only to change its default). YAML keys and attributes stay flat: `lr:`, `cfg.lr`.
# pydantic orders a model's fields from its last base to its first, and a config missing several keys reports the
# first one: the stage configs therefore list their bases last-block-first.

class ModelSource(Strict):
    model: str
    trust_remote_code: bool = False


class DataConfig(Strict):
    train: Path
    val: Path | None = None


class OutputLocation(Strict):
    """Where a run's results go."""
    output_dir: Path
    name: str | None = None                   # run name under storage_path; re-running the same name resumes
    storage_path: Path = Path("runs")
    wandb: WandbConfig = WandbConfig()


class OutputConfig(OutputLocation):
    """... plus checkpoints (the training engine's runs)."""
    overwrite: bool = False
    save_interval: int = 100


class OptimConfig(Strict):
    """The optimizer and its schedule (checked by `check_optimizer_settings`)."""
    max_steps: int | None = None
    lr: float = 1e-5
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0


class EngineConfig(Strict):
    """How the training engine runs a step: precision, compilation, memory savers, seed."""
    bf16: bool = False                        # bf16 autocast over fp32 weights
    param_dtype: Literal["float32", "bfloat16"] = "float32"  # bfloat16: pure bf16 weights and optimizer
    compile: bool = False                     # torch.compile each decoder layer (GPU)
    # torch.compile's mode for those layers (and a distillation teacher's): reduce-overhead replays CUDA graphs, for
    # steps that wait on the host launching kernels (small models: bench/README.md), and pads every training and
    # eval batch to max_length (one graph shape; use packing with short rows); out of dumps at its default
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] = Field(
        "default", exclude_if=lambda v: v == "default")
    # what one compiled region is: each decoder layer (small graphs, cheap recompiles) or the whole text backbone
    # (text models: one region a forward, so under reduce-overhead one CUDA graph instead of one a layer)
    compile_scope: Literal["layers", "backbone"] = Field("layers", exclude_if=lambda v: v == "layers")
    gradient_checkpointing: bool = False
    loss_chunk_size: int = 1024               # rows of the sequence per cross-entropy chunk (no full B*S*V logits)
    seed: int = 0

    @model_validator(mode="after")
    def _compile_mode(self):
        if self.compile_mode != "default" and not self.compile:
            raise ValueError(f"compile_mode: {self.compile_mode} needs compile: true")
        if self.compile_scope != "layers" and not self.compile:
            raise ValueError(f"compile_scope: {self.compile_scope} needs compile: true")
        return self


class RemovalBudget(Strict):
    """At most this much removed: knockout's plan budget; a pipeline round's guardrail."""
    max_params_fraction: float = 0.25         # of the parameters (a pipeline: of the round's input)
    max_layers: int = 10


class ClusterConfig(Strict):
    ray: RayConfig = RayConfig()
    parallel: ParallelConfig = ParallelConfig()

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, raw):
        return move_parallel_keys(raw) if isinstance(raw, dict) else raw


class LaunchConfig(ClusterConfig):
    # ray: Ray Train workers (any number, any node); local: one worker in this process, no Ray (a single GPU or
    # CPU box, or one without Ray installed); checkpoints and resume work the same way
    launcher: Literal["ray", "local"] = "ray"


class TrainConfig(LaunchConfig, EngineConfig, OptimConfig, OutputConfig, DataConfig, ModelSource):
    """Shared by sft, distill and lora: the one training engine's settings."""
    max_length: int = 1024
    packing: bool = False
    batch_size: int = 4                       # per worker, per micro-step
    grad_accum: int = 1
    epochs: float = 1.0
    eval_interval: int = 50
    eval_max_samples: int | None = None
    log_interval: int = 1
    # the memory plan checked before training on GPUs (`prunekit plan`): gpu_memory is one GPU's memory (e.g. 80GiB)
    # for a driver that sees no GPU itself (default: what this machine's GPUs have free); memory_check: false skips
    # the check. Both stay out of dumps at their defaults (run names of earlier runs do not change).
    gpu_memory: str | None = Field(None, exclude_if=lambda v: v is None)
    memory_check: bool = Field(True, exclude_if=lambda v: v is True)

    @field_validator("gpu_memory")
    @classmethod
    def _gpu_memory(cls, v):
        if v is not None:
            from prunekit.core.memory_plan import parse_memory
            try:
                parse_memory(v, "gpu_memory")
            except PrunekitError as e:
                raise ValueError(str(e).removeprefix("gpu_memory: ")) from None
        return v

    @model_validator(mode="after")
    def _check(self):
        for key in ("batch_size", "grad_accum", "max_length", "eval_interval", "save_interval", "log_interval"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1")
        if self.launcher == "local" and self.parallel.workers != 1:
            raise ValueError("launcher: local runs one worker in this process; set parallel.workers: 1 or launcher: ray")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("max_steps must be >= 1")
        check_optimizer_settings(self)
        if not math.isfinite(self.epochs) or self.epochs <= 0:
            raise ValueError(f"epochs must be a finite number > 0, got {self.epochs}")
        return self


def check_optimizer_settings(cfg) -> None:
    """What a worker would only find out after Ray started (AdamW raises on a negative lr, a NaN trains NaNs)."""
    if not math.isfinite(cfg.lr) or cfg.lr <= 0:
        raise ValueError(f"lr must be a finite number > 0, got {cfg.lr}")
    if not math.isfinite(cfg.weight_decay) or cfg.weight_decay < 0:
        raise ValueError(f"weight_decay must be a finite number >= 0, got {cfg.weight_decay}")
    if not 0 <= cfg.warmup_ratio <= 1:  # also false for NaN
        raise ValueError(f"warmup_ratio must be in [0, 1], got {cfg.warmup_ratio}")
    if cfg.grad_clip is not None and not (math.isfinite(cfg.grad_clip) and cfg.grad_clip > 0):
        raise ValueError(f"grad_clip must be a finite number > 0 or null, got {cfg.grad_clip}")


class KVMergeConfig(Strict):
    """sft / distill: merge_kv_heads: N pulls each group of KV heads toward its mean after every step, identical from
    merge_kv_ramp of the steps on, so a `kv_cut` to N heads afterwards is exact (prunekit.core.kv_merge). Both stay
    out of dumps at their defaults (run names of earlier runs do not change)."""
    merge_kv_heads: int | None = Field(None, exclude_if=lambda v: v is None)
    merge_kv_ramp: float = Field(0.5, exclude_if=lambda v: v == 0.5)

    @model_validator(mode="after")
    def _merge(self):
        if not 0 < self.merge_kv_ramp <= 1:
            raise ValueError(f"merge_kv_ramp must be in (0, 1], got {self.merge_kv_ramp}")
        if self.merge_kv_heads is not None:
            if self.merge_kv_heads < 1:
                raise ValueError(f"merge_kv_heads must be >= 1, got {self.merge_kv_heads}")
            if self.parallel.strategy == "deepspeed":  # its optimizer holds the master weights the merge must change
                raise ValueError("merge_kv_heads needs parallel.strategy ddp or fsdp")
        return self


class SFTConfig(KVMergeConfig, TrainConfig):
    pass


def on_policy_rows(fraction: float, batch_size: int) -> int:
    """Rows of a micro-batch that distill's on_policy setting fills with the student's own answers."""
    return round(fraction * batch_size)


class KDConfig(Strict):
    """Distillation from a teacher (distill; width-search distils from the original)."""
    beta: float = 0.5                         # generalized JSD: 0 = forward KL, 1 = reverse KL
    temperature: float = 1.0
    sft_alpha: float = 0.0                    # weight of the plain cross-entropy mixed into the KD loss
    top_k: int | None = None                  # keep only the teacher's top-k logits


class OnPolicyConfig(Strict):
    """distill `on_policy:` (GKD-style on-policy distillation): `fraction` of every micro-batch's rows are answers the
    student samples itself, just before the step, to the user turns of the train file's chat rows (or of `prompts`);
    the teacher scores them with its full distribution like any other row."""
    fraction: float
    max_new_tokens: int = 128
    temperature: float = 1.0                  # 0: greedy
    prompts: str | None = None                # a prompt file (chat rows; their user turns) instead of the train file
    every: int = 1                            # sample the answers of this many steps at once (at the block's start)

    @model_validator(mode="after")
    def _check(self):
        if not 0 < self.fraction <= 1:
            raise ValueError(f"on_policy.fraction must be in (0, 1], got {self.fraction}")
        if self.max_new_tokens < 1:
            raise ValueError(f"on_policy.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"on_policy.temperature must be a finite number >= 0, got {self.temperature}")
        if self.every < 1:
            raise ValueError(f"on_policy.every must be >= 1, got {self.every}")
        return self


class DistillConfig(KDConfig, KVMergeConfig, TrainConfig):
    teacher: str
    # same_gpu: teacher beside the student; own_gpu: each worker takes 2 GPUs (ray.gpus_per_worker: 2) and the
    # teacher's forward runs on the second, concurrently with the student's step
    teacher_placement: Literal["same_gpu", "own_gpu"] = "same_gpu"
    # out of dumps when off: run names of earlier runs do not change
    on_policy: OnPolicyConfig | None = Field(None, exclude_if=lambda v: v is None)
    # the share of supervised input tokens replaced, in every training batch, by tokens drawn from the batch: the
    # teacher and the student read the same noisy context, so a row seen again is a new lesson (core.data)
    input_noise: float = Field(0.0, exclude_if=lambda v: v == 0)
    # intermediate-layer distillation: the weight of the hidden-state loss (core.losses.hidden_state_loss) beside
    # the KD loss. Each student layer's output is matched to the teacher's hidden state where the student hands on
    # (the input of the teacher layer its next layer was), read from the prune steps in the student's lineage;
    # `hidden_targets` gives the teacher layer whose output each student layer matches instead
    hidden_weight: float = Field(0.0, exclude_if=lambda v: v == 0)
    hidden_targets: list[int] | None = Field(None, exclude_if=lambda v: v is None)

    @model_validator(mode="after")
    def _on_policy(self):
        if self.on_policy is not None:
            rows = on_policy_rows(self.on_policy.fraction, self.batch_size)
            if rows < 1:
                raise ValueError(f"on_policy.fraction {self.on_policy.fraction} of batch_size {self.batch_size} is "
                                 f"no row; raise the fraction or the batch size")
            if self.save_interval % self.on_policy.every:   # a resumed run must start at a block's start
                raise ValueError(f"on_policy.every {self.on_policy.every} must divide save_interval "
                                 f"{self.save_interval}")
            if self.on_policy.max_new_tokens >= self.max_length:
                raise ValueError(f"on_policy.max_new_tokens {self.on_policy.max_new_tokens} leaves no room for a "
                                 f"prompt within max_length {self.max_length}")
        return self

    @field_validator("beta")
    @classmethod
    def _beta(cls, v):
        if not 0 <= v <= 1:
            raise ValueError("must be in [0, 1]")
        return v

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v):
        if not (math.isfinite(v) and v > 0):
            raise ValueError("must be a finite number > 0")
        return v

    @field_validator("hidden_weight")
    @classmethod
    def _hidden_weight(cls, v):
        if not (math.isfinite(v) and v >= 0):
            raise ValueError("must be a finite number >= 0")
        return v

    @field_validator("input_noise")
    @classmethod
    def _input_noise(cls, v):
        if not 0 <= v < 1:
            raise ValueError("must be in [0, 1)")
        return v


class LoraSettings(Strict):
    """The LoRA adapters (`prunekit lora`; knockout trials with `trial_mode: lora` as their `lora:` block)."""
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | None = None   # default: the text model's linear projections


class TrialLoraSettings(LoraSettings):
    """A knockout trial's adapters: no dropout by default. A trial is short and judged on its val loss, and dropout
    makes every adapter keep its own dropped-out input and mask: 51% more activation bytes per token than a full
    trial's layer (core/memory_plan.py), where a frozen base should cost less."""
    dropout: float = 0.0


class LoraTrainConfig(LoraSettings, TrainConfig):
    lr: float = 1e-4


STAGE_CONFIGS = {"sft": SFTConfig, "distill": DistillConfig, "lora": LoraTrainConfig}


class RewardSpec(Strict):
    fn: str                                   # built-in name, path/to/file.py:function or package.module:function
    weight: float = 1.0
    name: str | None = None                   # metric name (default: the function's name)
    kwargs: dict = {}                         # passed to the function (e.g. column: answer)


class RLAlgorithmConfig(Strict):
    name: Literal["grpo", "gspo"] = "grpo"
    eps: float | None = None                  # clip 1 - eps (default: grpo 0.2, gspo 3e-4)
    eps_high: float | None = None             # clip 1 + eps_high (default: grpo eps, gspo 4e-4)
    aggregation: Literal["grpo", "dapo", "dr_grpo"] = "grpo"  # per-response mean | token mean | constant normaliser
    advantage_scale: Literal["group", "batch", "none"] = "group"
    kl_beta: float = 0.0                      # k3 KL to the frozen initial model
    epochs: int = 1                           # passes over each generation batch
    mini_batches: int = 1                     # optimizer steps per pass
    micro_batch_size: int = 8                 # responses per forward on each learner

    def clip(self) -> tuple[float, float]:
        eps = self.eps if self.eps is not None else (0.2 if self.name == "grpo" else 3e-4)
        high = self.eps_high if self.eps_high is not None else (eps if self.name == "grpo" else 4e-4)
        return eps, high


class RolloutConfig(Strict):
    # auto: vLLM where installed and supported; slots: prunekit's own decode loop (prunekit.rl.decode)
    backend: Literal["auto", "vllm", "transformers", "slots"] = "auto"
    num_actors: int = 1
    n: int = 8                                # samples per prompt (the group)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    cpus_per_actor: float = 1
    gpus_per_actor: float = 0                 # 0: CPU; 1: own GPU; < 1 shares a GPU (e.g. with a learner)
    gpu_memory_utilization: float = 0.4       # vLLM on GPU
    max_model_len: int = 1024                 # vLLM
    batch_size: int = 64                      # transformers: sequences per generate call
    fast: bool | None = None                  # transformers: static KV cache + compiled decode (default: on GPU)


class RLConfig(ClusterConfig, EngineConfig, OptimConfig, OutputConfig, ModelSource):
    """`prunekit rl`: rollout actors generate, rewards score, learners (the training engine) update.
    `ray`: the learners (num_workers, strategy ddp | fsdp, use_gpu, ...)."""
    prompts: Path                             # JSONL/JSON rows: `prompt` (text or messages) + columns for rewards
    prompt_column: str = "prompt"
    system_prompt: str | None = None
    max_prompt_length: int = 512
    max_steps: int = 100                      # generation batches
    prompts_per_step: int = 8
    rewards: list[RewardSpec]
    algorithm: RLAlgorithmConfig = RLAlgorithmConfig()
    rollout: RolloutConfig = RolloutConfig()
    lr: float = 1e-6
    scheduler: Literal["cosine", "linear", "constant"] = "constant"
    warmup_ratio: float = 0.0
    save_interval: int = 50

    @model_validator(mode="after")
    def _check(self):
        for key in ("max_steps", "prompts_per_step", "save_interval", "max_prompt_length"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1")
        check_optimizer_settings(self)
        for key in ("n", "max_new_tokens", "num_actors", "batch_size"):
            if getattr(self.rollout, key) < 1:
                raise ValueError(f"rollout.{key} must be >= 1")
        for key in ("epochs", "mini_batches", "micro_batch_size"):
            if getattr(self.algorithm, key) < 1:
                raise ValueError(f"algorithm.{key} must be >= 1")
        if self.parallel.strategy == "deepspeed":
            raise ValueError("parallel.strategy: the RL learners support ddp and fsdp")
        samples = self.prompts_per_step * self.rollout.n
        parts = self.parallel.workers * self.algorithm.mini_batches
        if samples % parts:
            raise ValueError(f"prompts_per_step * rollout.n = {samples} must split evenly over parallel.workers * "
                             f"algorithm.mini_batches = {parts}")
        if not self.rewards:
            raise ValueError("rewards: at least one reward is needed")
        return self


STAGE_CONFIGS["rl"] = RLConfig


class KnockoutCandidates(Strict):
    text: str | int | list[int] | None = "all"      # text layers: all | "3,5-7" | [3, 5] | null
    vision: str | int | list[int] | None = None     # vision blocks, same forms
    group_size: int | list[int] = [1]               # 2: runs of 2 consecutive layers; [1, 2]: singles and pairs
    groups: list[str] = []                          # extra candidates: "text:4-5", "vision:0,1", "text:3+vision:1"

    @field_validator("group_size")
    @classmethod
    def _sizes(cls, v):
        sizes = [v] if isinstance(v, int) else v
        if not sizes or any(s < 1 for s in sizes):
            raise ValueError("must be >= 1")
        return sizes


class KnockoutTune(Strict):
    """Ray Tune: one trial per candidate (one process; several share a GPU with a fractional gpus_per_trial; one
    trial spans several GPUs with gpus_per_trial 2, 4, ...)."""
    cpus_per_trial: float = 1
    gpus_per_trial: float = 0                 # 0: CPU trials; 0.25 packs four small trials on one GPU; 2: FSDP2 over 2
    max_concurrent_trials: int | None = None  # None: as many as the resources allow
    asha: bool = False                        # ASHA early stopping on eval loss (key layers stop early)
    asha_grace_steps: int = 10
    asha_reduction_factor: int = 2
    max_trials: int | None = None             # run at most this many unfinished trials now; the rest next time
    # one process runs trial after trial (imports and CUDA init once); None: on GPU trials only (a reused CPU trial
    # process keeps growing: bench/README.md, "Measured on the way")
    reuse_actors: bool | None = None
    # processes per trial: a trial of N workers runs FSDP2 over them (Ray Train inside the Tune trial; gloo on CPU)
    # and splits its batch_size across them. Default: gpus_per_trial when that is a whole number >= 1 (one GPU per
    # worker), else 1. cpus_per_trial is then each worker's. Left out of dumps while unset.
    workers_per_trial: int | None = Field(None, exclude_if=lambda v: v is None)

    @model_validator(mode="after")
    def _workers(self):
        g, n = self.gpus_per_trial, self.workers_per_trial
        if g > 1 and g != int(g):
            raise ValueError(f"gpus_per_trial: above 1 it is the GPUs of a trial, a whole number (got {g:g})")
        if n is not None and n < 1:
            raise ValueError("workers_per_trial must be >= 1")
        if n is not None and n > 1 and 0 < g < 1:
            raise ValueError(f"workers_per_trial: {n} workers need a GPU each; gpus_per_trial {g:g} packs "
                             f"single-process trials onto one GPU")
        if n is not None and g >= 1 and n != int(g):
            raise ValueError(f"workers_per_trial: {n} disagrees with gpus_per_trial: {g:g} (each worker of a trial "
                             f"holds one GPU)")
        return self

    @property
    def workers(self) -> int:
        """Processes (Ray Train workers) each trial runs."""
        if self.workers_per_trial is not None:
            return self.workers_per_trial
        return int(self.gpus_per_trial) if self.gpus_per_trial >= 1 else 1


class TrialConfig(TrainConfig):
    """A Ray Tune sweep of short training trials (knockout, width-search): output_dir is the report directory."""
    max_steps: int | None = 50
    eval_interval: int = 10
    save_interval: int = 10 ** 9              # trials keep no checkpoints
    log_interval: int = 5                     # report to Ray Tune every this many steps (and at every eval)
    tune: KnockoutTune = KnockoutTune()
    importance_samples: int = 32              # calibration rows of `train` (knockout: the importance scores)


class KnockoutConfig(RemovalBudget, TrialConfig):
    """`prunekit knockout`: per candidate, remove it, run a short SFT through the training engine, evaluate."""
    candidates: KnockoutCandidates = KnockoutCandidates()
    free_ratio: float = 0.95                  # verdict free: final token_acc >= this x baseline
    recoverable_ratio: float = 0.90           # verdict recoverable: >= this x baseline; key below
    spike_window: float = 0.25                # early-spike flag: the first this fraction of steps ...
    spike_margin: float = 0.25                # ... train loss on average more than this above the baseline's
    importance: bool = True                   # training-free scores beside the knockout (one extra Ray task)
    # full: each trial fine-tunes every weight of the pruned model; lora: it trains LoRA adapters (`lora:` block) on
    # the frozen pruned model. Full sweeps dump neither (earlier sweeps keep their names); a LoRA sweep always dumps
    # its whole lora block, so sweeps made before trials defaulted to dropout 0 keep names of their own.
    trial_mode: Literal["full", "lora"] = Field("full", exclude_if=lambda v: v == "full")
    lora: TrialLoraSettings | None = Field(None, exclude_if=lambda v: v is None)   # set for trial_mode: lora

    @model_validator(mode="after")
    def _knockout(self):
        if self.parallel.workers != 1 or self.parallel.strategy != "ddp" or self.ray.use_gpu:
            raise ValueError("ray: a knockout trial is one process unless tune says otherwise; set its processes "
                             "and resources with tune.gpus_per_trial / tune.workers_per_trial / tune.cpus_per_trial")
        if self.max_steps is None:
            raise ValueError("max_steps: a knockout trial needs a step count")
        if not 0 < self.max_params_fraction <= 1 or self.max_layers < 1:
            raise ValueError("max_params_fraction must be in (0, 1] and max_layers >= 1")
        if not 0 < self.recoverable_ratio <= self.free_ratio:
            raise ValueError("need 0 < recoverable_ratio <= free_ratio")
        if self.tune.cpus_per_trial <= 0 or self.tune.gpus_per_trial < 0:
            raise ValueError("tune.cpus_per_trial must be > 0 and tune.gpus_per_trial >= 0")
        workers = self.tune.workers
        if self.batch_size % workers:
            raise ValueError(f"batch_size {self.batch_size} must split evenly over a trial's {workers} workers "
                             f"(tune.gpus_per_trial / tune.workers_per_trial)")
        if self.trial_mode == "full" and self.lora is not None:
            raise ValueError("lora: the adapters' settings need trial_mode: lora")
        if self.trial_mode == "lora" and self.lora is None:
            self.lora = TrialLoraSettings()
        if self.lora is not None and (self.lora.rank < 1 or not 0 <= self.lora.dropout < 1):
            raise ValueError("lora: rank must be >= 1 and dropout in [0, 1)")
        return self


STAGE_CONFIGS["knockout"] = KnockoutConfig

WIDTH_SEARCH_CANDIDATES = ("ffn", "heads+ffn", "hidden+ffn", "depth")


class WidthSearchConfig(KDConfig, TrialConfig):
    """`prunekit width-search`: width mixes and depth at one parameter budget, each pruned from the original, a short
    distillation from the original (the training engine, `KDConfig`'s settings) and an eval on held-out general text,
    as Ray Tune trials."""
    # the held-out rows every trial is measured on (default: the built-in general-text eval split); never trained on
    val: Path | None = None
    eval_max_samples: int | None = 64
    # the budget, one of: at most `params` parameters, `params_fraction` of the original's, or (the default, 0.25)
    # this fraction of the decoder-layer parameters removed; counted as `prunekit inspect` counts
    params: int | None = None
    params_fraction: float | None = None
    layer_params_removed: float | None = None
    candidates: list[Literal["ffn", "heads+ffn", "hidden+ffn", "depth"]] = list(WIDTH_SEARCH_CANDIDATES)
    importance_samples: int = 64              # calibration rows of `train` the channels and layers are scored on
    lr: float = 1e-4

    @model_validator(mode="after")
    def _search(self):
        if self.parallel.workers != 1 or self.parallel.strategy != "ddp" or self.ray.use_gpu:
            raise ValueError("ray: a width-search trial is one process; set its resources with tune.cpus_per_trial / "
                             "tune.gpus_per_trial")
        if self.tune.workers > 1:
            raise ValueError("tune: a width-search trial is one process (at most 1 GPU: tune.gpus_per_trial <= 1, "
                             "no tune.workers_per_trial)")
        if self.max_steps is None:
            raise ValueError("max_steps: a width-search trial needs a step count")
        given = [k for k in ("params", "params_fraction", "layer_params_removed") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one budget: {' or '.join(given)}")
        if not given:
            self.layer_params_removed = 0.25
        if self.params is not None and self.params < 1:
            raise ValueError("params must be >= 1")
        for key in ("params_fraction", "layer_params_removed"):
            v = getattr(self, key)
            if v is not None and not 0 < v < 1:
                raise ValueError(f"{key} must be in (0, 1)")
        if not self.candidates or len(set(self.candidates)) != len(self.candidates):
            raise ValueError("candidates: at least one, each once")
        if not 0 <= self.beta <= 1 or not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError("beta must be in [0, 1] and temperature a finite number > 0")
        if self.importance_samples < 1:
            raise ValueError("importance_samples must be >= 1")
        if self.tune.cpus_per_trial <= 0 or self.tune.gpus_per_trial < 0:
            raise ValueError("tune.cpus_per_trial must be > 0 and tune.gpus_per_trial >= 0")
        return self


STAGE_CONFIGS["width-search"] = WidthSearchConfig


# ---- pipeline ----------------------------------------------------------------------------------------------------

class ImportanceStageConfig(Strict):
    """Pipeline stage `importance`: training-free layer scores on the current model (calibration: the train set)."""
    samples: int = 32
    max_length: int = 256
    metric: str = "block_influence"           # which score ranks the layers (and the knockout candidates)
    nll: bool = True                          # also compute NLL-drop (one forward pass per layer)
    keep_first_last: bool = True              # an importance-only plan never removes the first / last text layer


class PruneStageConfig(Strict):
    """Pipeline stage `prune`: applies the round's plan (knockout, else importance, else `plan`: a knockout report's
    plan.json made earlier for the same model), within the guardrails."""
    streaming: bool | None = None
    plan: Path | None = None


class WidthStageConfig(Strict):
    """Pipeline stage `width`: Minitron-style width pruning of the current model (`prunekit width`), channels scored
    on the pipeline's train file. Give sizes (ffn / heads / hidden, as the CLI flags) or params_fraction (keep this
    fraction of the stage's input; prunekit picks the mix); with neither, it removes what the round's
    max_params_fraction still allows, stopping at the target. Either way within the round's guardrail."""
    ffn: str | float | int | None = None      # 0.75 (a fraction) or 96 (an intermediate size)
    heads: int | None = None
    hidden: int | None = None
    params_fraction: float | None = None
    samples: int = 64                         # calibration rows taken from the train file
    max_length: int = 256
    batch_size: int = 4

    @field_validator("params_fraction")
    @classmethod
    def _fraction(cls, v):
        if v is not None and not 0 < v < 1:
            raise ValueError("must be in (0, 1)")
        return v

    @model_validator(mode="after")
    def _check(self):
        if self.params_fraction is not None and (self.ffn, self.heads, self.hidden) != (None, None, None):
            raise ValueError("give sizes (ffn / heads / hidden) or params_fraction, not both")
        if min(self.samples, self.max_length, self.batch_size) < 1:
            raise ValueError("samples, max_length and batch_size must be >= 1")
        return self


class KVCutStageConfig(Strict):
    kv_heads: int
    grouping: Literal["mean", "similarity"] = "mean"
    samples: int = 64                         # calibration conversations from the train set (similarity, calibrate)
    calibrate: bool = False                   # fit the merged heads layer by layer (prunekit.core.kv_calibration)
    calibration_steps: int = 200              # Adam steps per layer of the calibration fit
    # fit each layer on the cut model's own inputs towards the original's outputs (CalibrationSettings.sequential);
    # left out of dumps when off
    calibration_sequential: bool = Field(False, exclude_if=lambda v: v is False)
    # start the fit from the aligned heads, not their mean (CalibrationSettings.align); left out of dumps when on
    calibration_align: bool = Field(True, exclude_if=lambda v: v is True)
    streaming: bool | None = None

    @model_validator(mode="after")
    def _sequential_needs_calibrate(self):
        if self.calibration_sequential and not self.calibrate:
            raise ValueError("calibration_sequential: it sets how calibrate fits the layers; add calibrate: true")
        if not self.calibration_align and not self.calibrate:
            raise ValueError("calibration_align: it sets how calibrate fits the layers; add calibrate: true")
        return self


class MergeStageConfig(Strict):
    pass


# Which stages may appear where. `knockout` also accepts the pipeline key `importance_candidates: N` (sweep only the
# N least important layers of the round's `importance` stage).
ROUND_STAGES = ("importance", "knockout", "prune", "width", "sft", "distill")
FINISH_STAGES = ("kv_cut", "sft", "distill", "lora", "merge_lora", "rl")
PIPELINE_OWNED_KEYS = ("model", "output_dir", "overwrite", "name", "storage_path")


class PipelineTarget(Strict):
    params: int | None = None                 # stop the rounds once the model has at most this many parameters
    params_fraction: float | None = None      # ... or at most this fraction of the original's

    @model_validator(mode="after")
    def _one(self):
        if (self.params is None) == (self.params_fraction is None):
            raise ValueError("give exactly one of target.params and target.params_fraction")
        if self.params is not None and self.params < 1:
            raise ValueError("target.params must be >= 1")
        if self.params_fraction is not None and not 0 < self.params_fraction < 1:
            raise ValueError("target.params_fraction must be in (0, 1)")
        return self


class PipelineConfig(RemovalBudget, LaunchConfig, OutputLocation, DataConfig, ModelSource):
    """`prunekit pipeline recipe.yaml`: rounds of (knockout -> prune -> sft -> distill) until the target size, then
    the finishing stages; every stage's output under output_dir, progress in output_dir/pipeline_state.json.
    `name`: prefix of the Ray Train / Tune run names (default: output_dir's name); `launcher: local`: training
    stages and measurements in this process, no Ray."""
    val: Path
    target: PipelineTarget
    max_rounds: int = 4                       # RemovalBudget: the guardrail of each round
    min_token_acc_ratio: float = 0.9          # stop when recovery ends below this x the original's eval token_acc
    rounds: list[str | dict[str, dict]] = ["knockout", "prune", "sft", "distill"]
    finish: list[str | dict[str, dict]] = []
    stages: dict[str, dict] = {}              # default settings per stage name; an entry {sft: {...}} overrides them
    eval_samples: int = 64                    # val conversations every stage's output is evaluated on
    eval_max_length: int = 256
    # held-out general text every model is also measured on (text or messages rows); "general": the built-in eval
    # split (`prunekit data general`), null: none. When set, the round guardrail uses its token_acc ratio.
    eval_text: str | None = "general"
    eval_text_samples: int | None = None      # rows of eval_text to use (default: all)
    storage_path: Path | None = None          # checkpoints and sweep trials (default: output_dir/runs)

    @model_validator(mode="after")
    def _check(self):
        if self.max_rounds < 1 or self.eval_samples < 1 or self.eval_max_length < 1:
            raise ValueError("max_rounds, eval_samples and eval_max_length must be >= 1")
        if self.eval_text_samples is not None and self.eval_text_samples < 1:
            raise ValueError("eval_text_samples must be >= 1")
        if not 0 < self.max_params_fraction <= 1 or self.max_layers < 1:
            raise ValueError("max_params_fraction must be in (0, 1] and max_layers >= 1")
        if not 0 <= self.min_token_acc_ratio <= 1:
            raise ValueError("min_token_acc_ratio must be in [0, 1]")
        return self


STAGE_CONFIGS["pipeline"] = PipelineConfig


# keys that left the config: a config still giving one fails with a line naming what replaced it
REMOVED_KEYS = {
    "test_crash_at_step": "test-only fault injection is the environment variable PRUNEKIT_TEST_CRASH_AT_STEP now",
    "test_fail_candidates": "test-only fault injection is the environment variable PRUNEKIT_TEST_FAIL_CANDIDATES "
                            "now (trial ids separated by ';')",
}


def _set_dotted(d: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value


def load_config(stage: str, path: str | Path | None = None, overrides: dict | None = None):
    """Read a stage's YAML (if any), apply overrides ({'parallel.workers': 2, ...}), validate."""
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
    for key in raw:
        if key in REMOVED_KEYS and key not in cls.model_fields:
            raise PrunekitError(f"{where}: {key}: no longer a setting; {REMOVED_KEYS[key]}")
    try:
        return cls(**raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "config"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        raise PrunekitError(f"{where}: {loc}: {msg}") from None
