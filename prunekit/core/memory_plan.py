"""Memory plan of a training run from config.json and the training settings alone: no weights, no torch, no GPU.

`model_shape(config)` counts parameters from the config (the family table in `families.py` says where the text
config lives and which projections carry biases; VLM vision towers are counted too; the count equals what
transformers' `num_parameters()` reports, tests check that on every family). `plan(shape, settings)` gives the bytes
one GPU holds at the step's peak, per component, for the engine as it runs (`prunekit/engine/`):

Model states, per parameter (P all parameters, P' the trained ones, N GPUs the state is sharded over, w the weight
bytes: 4 for `param_dtype: float32`, 2 for `bfloat16`; AdamW keeps exp_avg and exp_avg_sq in the weight dtype):

| strategy            | weights                | gradients                      | optimizer            |
|---------------------|------------------------|--------------------------------|----------------------|
| ddp (1 GPU)         | P w                    | P' w (freed every step)        | 2 P' w               |
| ddp (N GPUs)        | P w                    | P' w (DDP's buckets: resident) | 2 P' w               |
| fsdp (FSDP2)        | P w / N + gathered     | P' w / N + gathered            | 2 P' w / N           |
| fsdp + cpu_offload  | gathered only (host)   | gathered only (host)           | host                 |
| deepspeed ZeRO-2    | P m                    | P' m                           | 16 P' / N            |
| deepspeed ZeRO-3    | P m / N + 2 m U        | 2 m U                          | 16 P' / N            |

"gathered" (FSDP2) is the root unit (embeddings, LM head, final norm, vision stem and merger: FSDP2 keeps the root
unsharded from forward to backward) plus the current and the prefetched decoder layer, for both the weights and
their unsharded gradients. DeepSpeed converts the module to bf16 when `bf16: true` (m = 2, else m = w) and keeps
fp32 master weights, fp32 gradient partitions and fp32 Adam moments (16 bytes) sharded; U is its largest module
(DeepSpeed's own estimator: `estimate_zero2/3_model_states_mem_needs`). The engine moves the whole model onto each
GPU before wrapping it, so the peak is at least the unsharded weights (a setup peak that matters under sharding). bf16 autocast over fp32 weights also keeps
a bf16 copy of every trained weight it casts until the micro-batch's backward ends (2 P' bytes; under FSDP2 these
are casts of the gathered weights, so they are not sharded). The peak is W + O + max(G, G_resident + activations +
loss buffers): gradients freed at every step (`zero_grad(set_to_none=True)`) do not coexist with the forward's peak.

Activations (bytes per token per decoder layer, saved for backward by the HF decoder layer in eager mode, with H the
hidden size, Q = heads x head_dim, K = KV heads x head_dim (x Q when repeat_kv expands it: a padding or packing mask
present), I the intermediate size; SDPA/flash attention keeps no score matrix, only q, k, v, its output and a
float32 log-sum-exp per head):

| precision                       | per token per layer                 |
|---------------------------------|-------------------------------------|
| param_dtype bfloat16            | 16 H + 4 Q + 4 K + 8 I + 4 heads    |
| bf16 autocast over fp32 weights | 26 H + 4 Q + 4 K + 8 I + 4 heads    |
| float32                         | 24 H + 8 Q + 8 K + 16 I + 4 heads   |

(RMSNorm saves its float32 upcast input and its normalised output, and its output is saved by the next projections;
under autocast the residual stream is float32 and each projection saves its own bf16 cast of the input. Qwen3's
per-head q/k norms add 6 (Q + K), 8 (Q + K) in float32.) With `compile: true` inductor recomputes the norms and
pointwise ops in backward; it keeps the two residuals, the projections' normalised inputs, q, k, v, the attention
output, gate, up and their product: 2 r H + a (2 H + 2 Q + 2 K + 3 I) + 4 heads (r residual bytes, a activation
bytes; calibrated against the measured peaks of `bench/results/train_throughput.json`, within 5% there). With `gradient_checkpointing: true` every layer
keeps only its input (r H per token) and one layer's activations are rebuilt at a time in backward. Tokens per GPU
per micro-batch: T = batch_size x max_length (the worst case: packing fills every row; padding pads to the longest).

Loss buffers (`prunekit/core/losses.py`, `_FusedLinearLoss`): the gradient w.r.t. the hidden states (T H a), the LM
head's gradient accumulated in float32 over chunks (4 V H, plus a V H + 4 V H for one chunk's matmul and its float
copy) or formed at once when T <= loss_chunk_size (a V H), and one chunk's row buffers, C = min(loss_chunk_size, T):
the cross-entropy's Triton row loss (the engine's on CUDA) writes its gradient over the logits, a C V; compiled
(`row_loss="compiled"`) it holds 2 a C V (its logits in, its gradient out); the distillation row loss holds 7 a C V
(student and teacher logits, the gradient and float32 temporaries; calibrated on the same bench).

The teacher (distillation) is not sharded by any strategy: its full weights sit beside the student (`same_gpu`) or
on the worker's second GPU (`own_gpu`), in bf16 when `bf16: true` else float32, plus its final hidden states. A
knockout trial is one process: `tune.gpus_per_trial` below 1 packs floor(1 / gpus_per_trial) trials on one GPU;
`tune.gpus_per_trial: N` (N >= 2) runs each trial as FSDP2 over N GPUs, batch_size / N rows on each. A knockout trial
with `trial_mode: lora` trains LoRA adapters as `prunekit lora` does (P' the adapters, in the weights' dtype like
their AdamW moments). LoRA on the frozen layers (`_lora_eager`, checked against autograd like the table): the norms
keep no input for their frozen weights, each adapter's A output (r wide) is kept, and with `lora.dropout` > 0 each
adapter keeps its own dropped-out input and a bool mask, a ((a + 1) (5 H + Q + I) - a (2 H + I)) per token and layer:
more than the frozen weights save. The frozen LM head gets no gradient (the loss forms only the rows' buffers), and
under autocast each frozen projection's bf16 cast is kept by its matmul (2 bytes a layer weight).
"""
from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field, replace

from prunekit import PrunekitError
from prunekit.core.families import family_for

GiB = 1024 ** 3
HEADROOM_BYTES = 1 * GiB      # the CUDA context, NCCL buffers ...
HEADROOM_FRACTION = 0.05      # ... and allocator fragmentation, on top of the predicted peak
HEAD_NORM_FAMILIES = ("qwen3", "qwen3_vl")  # per-head q_norm / k_norm inside attention
LORA_ADAPTERS = 7             # prunekit's default targets: q, k, v, o, gate, up, down in each decoder layer
CE_CHUNK_FACTOR = {"triton": 1, "compiled": 2}   # x a x C x V: the cross-entropy row loss (ce.ROW_LOSSES)
KD_CHUNK_FACTOR = 7           # x a x C x V: the compiled distillation row loss


# ---- the model, from config.json ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelShape:
    family: str
    is_vlm: bool
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    head_norms: bool
    params: int                 # everything, tied weights once (transformers' num_parameters())
    layer_params: int           # one text decoder layer
    vision_blocks: int = 0
    vision_block_params: int = 0
    embedding_params: int = 0   # V x H (the LM head is as large when untied)

    @property
    def text_layer_params(self) -> int:
        return self.layers * self.layer_params

    @property
    def root_params(self) -> int:
        """What is not inside a decoder layer or vision block: FSDP2's root unit."""
        return self.params - self.text_layer_params - self.vision_blocks * self.vision_block_params

    @property
    def vision_params(self) -> int:
        return self.params - self.text_layer_params - self.embedding_params * (1 if self.tied else 2) - self.hidden

    @property
    def largest_unit(self) -> int:
        return max(self.layer_params, self.vision_block_params)

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def layer_linear_params(self) -> int:
        """The weights of one decoder layer's projections (no biases, no norms)."""
        h, q, k, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        return 2 * h * q + 2 * h * k + 3 * h * i

    @property
    def lora_inputs(self) -> int:
        """The input widths of a layer's adapters summed: q, k, v, gate, up read H, o reads Q, down I."""
        return 5 * self.hidden + self.q_dim + self.intermediate

    def lora_params(self, rank: int) -> int:
        """LoRA A and B on every projection of every decoder layer (prunekit's default targets)."""
        h, q, k, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        return self.layers * rank * ((h + q) + 2 * (h + k) + (q + h) + 2 * (h + i) + (i + h))


def _int(d: dict, key: str, where: str) -> int:
    value = d.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise PrunekitError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


def _vision_params(family: str, vc: dict) -> tuple[int, int, int]:
    """(blocks, params of one block, params outside the blocks) of a VLM's vision tower."""
    where = "config.json vision_config"
    depth = _int(vc, "depth", where)
    patch = vc.get("in_channels", 3) * vc.get("temporal_patch_size", 2) * _int(vc, "patch_size", where) ** 2
    merge = vc.get("spatial_merge_size", 2) ** 2
    if family == "qwen2_vl":
        e, out = _int(vc, "embed_dim", where), _int(vc, "hidden_size", where)
        m = int(e * vc.get("mlp_ratio", 4))
        block = 4 * e + 3 * e * e + 3 * e + e * e + e + e * m + m + m * e + e
        c = e * merge
        other = patch * e + 2 * e + c * c + c + c * out + out
    elif family == "qwen2_5_vl":
        e, i, out = (_int(vc, k, where) for k in ("hidden_size", "intermediate_size", "out_hidden_size"))
        block = 2 * e + 3 * e * e + 3 * e + e * e + e + 3 * e * i + 2 * i + e
        c = e * merge
        other = patch * e + e + c * c + c + c * out + out
    else:  # qwen3_vl: biased patch embedding, learned position table, LayerNorm blocks, deepstack mergers
        e, i, out = (_int(vc, k, where) for k in ("hidden_size", "intermediate_size", "out_hidden_size"))
        block = 4 * e + 3 * e * e + 3 * e + e * e + e + 2 * e * i + i + e
        c = e * merge
        merger = c * c + c + c * out + out
        other = (patch * e + e + vc.get("num_position_embeddings", 0) * e + 2 * e + merger
                 + len(vc.get("deepstack_visual_indexes") or []) * (2 * c + merger))
    return depth, block, other


def model_shape(cfg: dict) -> ModelShape:
    """Parameter counts and sizes from a config.json dict (one-line errors name the missing field)."""
    family = family_for(cfg)
    tc = family.text_config(cfg)
    where = "config.json" + (" text_config" if tc is not cfg else "")
    h, inter, layers, vocab = (_int(tc, k, where) for k in ("hidden_size", "intermediate_size",
                                                            "num_hidden_layers", "vocab_size"))
    _int(tc, "num_attention_heads", where)
    heads, kv, head_dim = family.attention_shape(cfg)
    q, k = heads * head_dim, kv * head_dim
    tied = family.ties_embeddings(cfg)
    head_norms = family.name in HEAD_NORM_FAMILIES
    attn_bias = bool(tc.get("attention_bias", False))
    layer = h * q + 2 * h * k + q * h + 3 * h * inter + 2 * h
    if family.qkv_bias(cfg):
        layer += q + 2 * k
    if attn_bias and family.name in ("llama", "qwen3", "qwen3_vl"):  # their o_proj follows attention_bias too
        layer += h
    if tc.get("mlp_bias") and family.name == "llama":
        layer += 2 * inter + h
    if head_norms:
        layer += 2 * head_dim
    embedding = vocab * h
    params = layers * layer + embedding * (1 if tied else 2) + h
    blocks = block = 0
    if family.is_vlm:
        blocks, block, other = _vision_params(family.name, family.vision_config(cfg) or {})
        params += blocks * block + other
    return ModelShape(family.name, family.is_vlm, layers, h, inter, heads, kv, head_dim, vocab, tied, head_norms,
                      params, layer, blocks, block, embedding)


# ---- sizes as text ------------------------------------------------------------------------------------------------

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000 ** 2, "mb": 1000 ** 2, "g": 1000 ** 3, "gb": 1000 ** 3,
          "t": 1000 ** 4, "tb": 1000 ** 4, "kib": 1024, "mib": 1024 ** 2, "gib": GiB, "tib": 1024 ** 4}


def parse_memory(text, flag: str = "--gpu-memory") -> int:
    """'80GiB', '80 GB', '141g', '81920MiB' or a byte count -> bytes; a one-line error naming `flag` otherwise."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise PrunekitError(f"{flag}: expected a size such as 80GiB, 80GB or 81920MiB, got {text!r}")
    value = float(m.group(1)) * _UNITS[unit]
    if value < GiB / 4:
        raise PrunekitError(f"{flag}: {text!r} is less than 0.25 GiB; give the memory of one GPU, e.g. 80GiB")
    return int(value)


def gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


# ---- the run's settings --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    """What the engine's memory depends on (TrainConfig and friends: `settings_from_config`)."""
    stage: str = "sft"                 # sft | distill | lora | knockout
    gpus: int = 1                      # GPUs the run's model state is spread over (workers; knockout: a trial's)
    strategy: str = "ddp"              # ddp | fsdp | deepspeed
    zero_stage: int = 2
    cpu_offload: bool = False
    bf16: bool = False
    param_dtype: str = "float32"
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 1024
    packing: bool = False
    loss_chunk_size: int = 1024
    gradient_checkpointing: bool = False
    compile: bool = False
    teacher: ModelShape | None = None
    teacher_placement: str = "same_gpu"
    lora_rank: int = 16
    lora_dropout: float = 0.0
    trials_per_gpu: int = 1            # knockout: trials sharing one GPU
    trial_mode: str = "full"           # knockout: full | lora (LoRA adapters on the frozen pruned model)
    row_loss: str = "auto"             # the cross-entropy row loss (ce.ROW_LOSSES): auto is triton on a GPU

    @property
    def lora(self) -> bool:
        """Only LoRA adapters train (the lora stage, LoRA knockout trials)."""
        return self.stage == "lora" or self.trial_mode == "lora"


def settings_from_config(stage: str, cfg, gpus: int | None = None, teacher: ModelShape | None = None) -> Settings:
    """Settings of a validated stage config (TrainConfig, DistillConfig, LoraTrainConfig, KnockoutConfig).
    `gpus` (the GPUs the run uses) overrides the config's workers: `own_gpu` distillation uses two per worker."""
    per_worker = 2 if getattr(cfg, "teacher_placement", "same_gpu") == "own_gpu" else 1
    strategy, batch, lora = cfg.parallel.strategy, cfg.batch_size, cfg
    if stage == "knockout":
        g = cfg.tune.gpus_per_trial
        trials = max(1, math.floor(1 / g + 1e-9)) if 0 < g < 1 else 1
        if cfg.tune.max_concurrent_trials:
            trials = min(trials, cfg.tune.max_concurrent_trials)
        workers = cfg.tune.workers if g >= 1 else 1
        if workers > 1:  # FSDP2 inside the trial, its batch split over the workers (engine/trial.py)
            strategy, batch = "fsdp", cfg.batch_size // workers
        lora = cfg.lora
    else:
        trials = 1
        workers = max(1, (gpus // per_worker) if gpus else cfg.parallel.workers)
    return Settings(
        stage=stage, gpus=workers, strategy=strategy, zero_stage=cfg.parallel.zero_stage,
        cpu_offload=cfg.parallel.cpu_offload, bf16=cfg.bf16, param_dtype=cfg.param_dtype,
        batch_size=batch, grad_accum=cfg.grad_accum, max_length=cfg.max_length, packing=cfg.packing,
        loss_chunk_size=cfg.loss_chunk_size, gradient_checkpointing=cfg.gradient_checkpointing, compile=cfg.compile,
        teacher=teacher, teacher_placement=getattr(cfg, "teacher_placement", "same_gpu"),
        lora_rank=getattr(lora, "rank", 16), lora_dropout=getattr(lora, "dropout", 0.0), trials_per_gpu=trials,
        trial_mode=getattr(cfg, "trial_mode", "full"))


def gpus_used(s: Settings) -> int:
    return s.gpus * (2 if s.stage == "distill" and s.teacher_placement == "own_gpu" else 1)


def precision(s: Settings) -> str:
    """bf16 (bf16 weights, or DeepSpeed's bf16 module), autocast (bf16 autocast over fp32 weights) or fp32."""
    if s.param_dtype == "bfloat16" or (s.strategy == "deepspeed" and s.bf16):
        return "bf16"
    return "autocast" if s.bf16 else "fp32"


def describe(s: Settings) -> str:
    """'fsdp2 over 8 GPUs, bf16 weights, batch 4 x 2048 tokens, checkpointing'."""
    strategy = {"ddp": "ddp", "fsdp": "fsdp2", "deepspeed": f"ZeRO-{s.zero_stage}"}[s.strategy]
    if s.stage != "knockout":
        parts = [f"{strategy} over {s.gpus} GPU{'s' if s.gpus > 1 else ''}"]
    elif s.gpus > 1:
        parts = [f"each trial {strategy} over {s.gpus} GPUs"]
    else:
        parts = [f"{s.trials_per_gpu} trial{'s' if s.trials_per_gpu > 1 else ''} per GPU"]
    if s.stage == "knockout" and s.lora:
        parts.append(f"LoRA trials (rank {s.lora_rank})")
    if s.cpu_offload:
        parts.append("CPU offload")
    parts.append({"bf16": "bf16 weights", "autocast": "bf16 autocast over fp32 weights",
                  "fp32": "fp32"}[precision(s)])
    parts.append(f"batch {s.batch_size} x {s.max_length} tokens")
    if s.gradient_checkpointing:
        parts.append("checkpointing")
    if s.compile:
        parts.append("compiled")
    if s.stage == "distill" and s.teacher_placement == "own_gpu":
        parts.append("teacher on its own GPU")
    return ", ".join(parts)


# ---- the plan -------------------------------------------------------------------------------------------------------

@dataclass
class Plan:
    shape: ModelShape
    settings: Settings
    parts: dict[str, float]            # bytes per GPU by component (what the peak is made of)
    peak: float                        # predicted peak allocated bytes on the student's GPU
    activations_checkpointed: float    # the activations with gradient checkpointing (for the table)
    activations_full: float            # ... and without
    teacher_gpu_peak: float = 0.0      # own_gpu: the teacher's GPU
    host: float = 0.0                  # host RAM per worker (loading, CPU offload)
    notes: list[str] = field(default_factory=list)

    @property
    def required(self) -> float:
        """Bytes a GPU must have: the larger GPU peak plus the headroom."""
        return max(self.peak, self.teacher_gpu_peak) * (1 + HEADROOM_FRACTION) + HEADROOM_BYTES

    def fits(self, gpu_bytes: float) -> bool:
        return self.required <= gpu_bytes


def activation_bytes_per_token_layer(shape: ModelShape, s: Settings) -> float:
    """Saved-for-backward bytes per token of one decoder layer (see the module docstring)."""
    h, q, i = shape.hidden, shape.q_dim, shape.intermediate
    gqa_native = s.batch_size == 1 and not s.packing  # no mask: SDPA takes the KV heads as they are
    k = shape.kv_dim if gqa_native else q
    mode = precision(s)
    lse = 4 * shape.heads
    a = 4 if mode == "fp32" else 2                       # activation bytes
    if s.compile:
        r = 2 if mode == "bf16" else 4
        out = 2 * r * h + a * (2 * h + 2 * q + 2 * k + 3 * i)
        return out + lse + (_lora_compiled(shape, s, a) if s.lora else 0)
    if mode == "bf16":
        out = 16 * h + 4 * q + 4 * k + 8 * i + (6 * (q + shape.kv_dim) if shape.head_norms else 0)
    elif mode == "autocast":
        out = 26 * h + 4 * q + 4 * k + 8 * i + (6 * (q + shape.kv_dim) if shape.head_norms else 0)
    else:
        out = 24 * h + 8 * q + 8 * k + 16 * i + (8 * (q + shape.kv_dim) if shape.head_norms else 0)
    return out + lse + (_lora_eager(shape, s, mode, a) if s.lora else 0)


def _lora_eager(shape: ModelShape, s: Settings, mode: str, a: int) -> float:
    """What LoRA adapters on a frozen layer change in the bytes saved per token (peft's Linear: base(x) +
    B(A(dropout(x))) * scale). Frozen weights save no input for a weight gradient: the RMSNorms (Qwen3's per-head
    ones too) drop their normalised input; the projections' inputs are saved by the adapters' A instead (one
    storage shared by q/k/v and by gate/up; o's is attention's output, saved anyway, except under autocast: peft
    casts it to the float32 adapters and A casts it back, a copy). Each A output (r wide) is saved by B. With dropout
    each adapter saves its own dropped-out input and CUDA's bool mask, and the shared inputs are then saved by
    nothing."""
    h, q, i = shape.hidden, shape.q_dim, shape.intermediate
    norm = 2 if mode == "bf16" else 4                    # the normalised input, in the residual stream's dtype
    out = LORA_ADAPTERS * a * s.lora_rank - 2 * norm * h - (a * (q + shape.kv_dim) if shape.head_norms else 0)
    autocast = mode == "autocast"
    if autocast:
        out += 2 * q
    if s.lora_dropout > 0:  # under autocast every adapter input was its own bf16 copy
        out += (a + 1) * shape.lora_inputs - a * (shape.lora_inputs if autocast else 2 * h + i)
    return out


def _lora_compiled(shape: ModelShape, s: Settings, a: int) -> float:
    """Compiled layers keep the projections' inputs anyway (see the module docstring); LoRA adds the A outputs and,
    with dropout, the masks (1 byte; a random op is not recomputed, the dropped-out input is)."""
    return LORA_ADAPTERS * a * s.lora_rank + (shape.lora_inputs if s.lora_dropout > 0 else 0)


def _activations(shape: ModelShape, s: Settings, checkpointing: bool) -> float:
    mode = precision(s)
    a = 4 if mode == "fp32" else 2
    r = 2 if mode == "bf16" else 4                       # residual stream bytes
    tokens = s.batch_size * s.max_length
    per_layer = tokens * activation_bytes_per_token_layer(shape, s)
    final = tokens * shape.hidden * (8 if mode == "bf16" else 12)  # final norm's saves + its output
    mask = s.batch_size * s.max_length ** 2 * (a if s.packing else 1 if s.batch_size > 1 else 0)
    if checkpointing:
        return shape.layers * tokens * r * shape.hidden + per_layer + final + mask
    return shape.layers * per_layer + final + mask


def _loss_buffers(shape: ModelShape, s: Settings) -> float:
    mode = precision(s)
    a = 4 if mode == "fp32" else 2                       # logits dtype
    a_h = 2 if mode == "bf16" else 4                     # hidden-state dtype
    w = 2 if s.param_dtype == "bfloat16" else 4
    tokens = s.batch_size * s.max_length
    chunk = min(s.loss_chunk_size, tokens)
    cv, vh = chunk * shape.vocab, shape.vocab * shape.hidden
    factor = KD_CHUNK_FACTOR if s.stage == "distill" else CE_CHUNK_FACTOR["compiled" if s.row_loss == "compiled"
                                                                          else "triton"]
    rows = a * factor * cv
    grad_h = tokens * shape.hidden * a_h
    if s.lora:                                            # a frozen head: no [V, H] gradient is formed
        return grad_h + rows
    if tokens > s.loss_chunk_size:                        # float32 accumulation over chunks
        return grad_h + 4 * vh + max(rows, a * cv + (a + 4) * vh) + (w * vh if w != 4 else 0)
    return grad_h + max(rows, a * cv + a * vh)


def _model_states(shape: ModelShape, s: Settings) -> dict[str, float]:
    """weights, gradients (and whether they stay resident), optimizer, gathered, autocast cache: bytes per GPU."""
    p = shape.params
    train = shape.lora_params(s.lora_rank) if s.lora else p
    w = 2 if s.param_dtype == "bfloat16" else 4
    n = s.gpus
    mode = precision(s)
    out = {"weights": 0.0, "gradients": 0.0, "optimizer": 0.0, "gathered": 0.0, "autocast_cache": 0.0,
           "grads_resident": 0.0}
    if mode == "autocast":  # LoRA: each frozen projection's bf16 cast is kept by its matmul (autocast caches none)
        out["autocast_cache"] = 2 * (train + (shape.layers * shape.layer_linear_params if s.lora else 0))
    strategy = s.strategy if n > 1 or s.strategy != "ddp" else "ddp"
    if strategy == "ddp":
        out.update(weights=p * w, gradients=train * w, optimizer=2 * train * w)
        if n > 1:
            out["grads_resident"] = train * w
    elif strategy == "fsdp":
        root, unit = shape.root_params, shape.largest_unit
        gathered = root * w + 2 * unit * w
        gathered_grads = (root + 2 * unit) * w if not s.lora else 0
        out["gathered"] = gathered + gathered_grads
        if not s.cpu_offload:
            out.update(weights=p * w / n, gradients=train * w / n, optimizer=2 * train * w / n)
    else:  # deepspeed
        m = 2 if s.bf16 else w
        unit = max(shape.largest_unit, shape.embedding_params)
        if s.zero_stage == 2:
            out.update(weights=p * m, gradients=train * m, optimizer=16 * train / n, grads_resident=train * m)
        else:
            out.update(weights=p * m / n, optimizer=16 * train / n, gathered=2 * m * unit)
    return out


def plan(shape: ModelShape, s: Settings) -> Plan:
    """Bytes per GPU at the step's peak for `shape` trained with `s` (see the module docstring)."""
    st = _model_states(shape, s)
    acts_full = _activations(shape, s, False)
    acts_ckpt = _activations(shape, s, True)
    acts = acts_ckpt if s.gradient_checkpointing else acts_full
    loss = _loss_buffers(shape, s)
    teacher_here = teacher_gpu = 0.0
    teacher_fwd = 0.0
    notes = []
    mode = precision(s)
    tokens = s.batch_size * s.max_length
    if s.stage == "distill" and s.teacher is not None:
        t = s.teacher
        tw = 2 if s.bf16 else 4
        hidden = tokens * t.hidden * tw
        # the teacher's forward (no grad) holds about one layer's temporaries at a time
        teacher_fwd = tokens * tw * (2 * t.hidden + t.q_dim + 2 * t.kv_dim + 3 * t.intermediate)
        if s.teacher_placement == "own_gpu":
            teacher_gpu = t.params * tw + teacher_fwd + s.grad_accum * hidden
            teacher_here = hidden + t.vocab * t.hidden * tw  # its hidden states and a copy of its head
            teacher_fwd = 0.0
        else:
            teacher_here = t.params * tw + hidden
    parts = {"weights": st["weights"], "gradients": st["gradients"], "optimizer": st["optimizer"],
             "gathered (fsdp/zero-3 working set)": st["gathered"], "autocast bf16 weight copies": st["autocast_cache"],
             "activations": acts, "loss buffers": loss, "teacher": teacher_here}
    transient_grads = st["gradients"] - st["grads_resident"]
    step_peak = max(transient_grads, st["grads_resident"] + st["autocast_cache"] + acts + loss + teacher_fwd)
    peak = st["weights"] + st["optimizer"] + st["gathered"] + teacher_here + step_peak
    # the engine moves the whole model onto the GPU before wrapping it (setup_strategy): an unsharded copy first
    w = 2 if s.param_dtype == "bfloat16" else 4
    init = shape.params * w + teacher_here
    if init > peak:
        notes.append(f"the peak is at setup: the engine moves the whole model ({gib(shape.params * w)}) onto each GPU "
                     f"before sharding it")
        peak = init
    peak *= s.trials_per_gpu if s.stage == "knockout" else 1
    host = shape.params * 4  # every worker loads the model in float32 on the host first
    if s.teacher is not None and s.stage == "distill":
        host += s.teacher.params * (2 if s.bf16 else 4)
    if s.cpu_offload:
        host += shape.params * 4 * w / s.gpus  # weights, gradients, exp_avg, exp_avg_sq shards
        notes.append("CPU offload keeps the sharded weights, gradients and optimizer state in pinned host memory")
    if mode == "autocast":
        notes.append("bf16 autocast over fp32 weights keeps a bf16 copy of every trained weight (unsharded); "
                     "param_dtype: bfloat16 drops it and halves the model states")
    if shape.is_vlm:
        notes.append("vision-tower activations depend on the images and are not included")
    if s.stage == "knockout" and s.trials_per_gpu > 1:
        notes.append(f"{s.trials_per_gpu} knockout trials share each GPU (tune.gpus_per_trial); the peak is theirs "
                     f"together")
    return Plan(shape, s, parts, peak, acts_ckpt, acts_full, teacher_gpu, host, notes)


# ---- the smallest change that fits ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Fix:
    settings: Settings
    changes: tuple[str, ...]           # e.g. ("gradient_checkpointing: true", "batch_size 2 (grad_accum 4)")
    cost: float
    plan: Plan

    @property
    def text(self) -> str:
        return ", ".join(self.changes) if self.changes else "none needed"


def _powers_of_two_up_to(n: int) -> list[int]:
    out, k = [], 2
    while k <= n:
        out.append(k)
        k *= 2
    if n >= 2 and n not in out:
        out.append(n)
    return out


def candidate_fixes(shape: ModelShape, s: Settings, max_gpus: int) -> list[Fix]:
    """Every combination of the changes a user can make without changing the task (cheapest first): a smaller loss
    chunk, gradient checkpointing, smaller micro-batches with more accumulation (same global batch), bf16 weights,
    FSDP2 over more GPUs (sft / distill / lora), CPU offload, fewer knockout trials per GPU."""
    knobs = []
    if s.loss_chunk_size > 1024:
        knobs.append([None, ("loss_chunk_size 1024", 0.5, dict(loss_chunk_size=1024))])
    if not s.gradient_checkpointing:
        knobs.append([None, ("gradient_checkpointing: true", 1.0, dict(gradient_checkpointing=True))])
    halvings = [None]
    b = s.batch_size
    per_trial = s.gpus if s.stage == "knockout" else 1  # a knockout trial's batch_size is split over its GPUs
    k = 1
    while b // (2 ** k) >= 1:
        nb = b // (2 ** k)
        accum = math.ceil(s.grad_accum * b / nb)
        halvings.append((f"batch_size {nb * per_trial} (grad_accum {accum} keeps the global batch)", float(k),
                         dict(batch_size=nb, grad_accum=accum)))
        k += 1
    knobs.append(halvings)
    if s.param_dtype != "bfloat16":
        knobs.append([None, ("param_dtype: bfloat16", 2.0, dict(param_dtype="bfloat16"))])
    if s.stage == "knockout":
        trials = [None]
        t = s.trials_per_gpu
        while t > 1:
            t //= 2
            share = "1" if t == 1 else f"{1 / t:g}"
            trials.append((f"tune.gpus_per_trial: {share} ({t} trial{'s' if t > 1 else ''} per GPU)",
                           1.0 * math.log2(s.trials_per_gpu / t), dict(trials_per_gpu=t)))
        for n in _powers_of_two_up_to(max_gpus):  # each trial FSDP2 over n GPUs (applied below: it splits the batch)
            if n > s.gpus:
                trials.append((f"tune.gpus_per_trial: {n} (each trial FSDP2 over {n} GPUs)",
                               1.5 + 0.5 * math.log2(n), dict(trial_gpus=n)))
        knobs.append(trials)
    else:
        per = 2 if s.stage == "distill" and s.teacher_placement == "own_gpu" else 1
        shard = [None]
        for n in _powers_of_two_up_to(max_gpus // per):
            if n < s.gpus or (n == s.gpus and s.strategy in ("fsdp", "deepspeed")):
                continue
            where = f"{n} GPUs" + (" (2 per worker)" if per == 2 else "")
            shard.append((f"parallel.strategy: fsdp over {where}", 1.5 + 0.5 * math.log2(n),
                          dict(strategy="fsdp", gpus=n)))
        knobs.append(shard)
        if not s.cpu_offload:
            knobs.append([None, ("parallel.cpu_offload: true", 3.0, dict(cpu_offload=True))])
    fixes = []
    for combo in itertools.product(*knobs):
        chosen = [c for c in combo if c is not None]
        changes: dict = {}
        for _, _, kw in chosen:
            changes.update(kw)
        trial_gpus = changes.pop("trial_gpus", None)
        new = replace(s, **changes)
        if trial_gpus is not None:
            trial_batch = new.batch_size * s.gpus
            if trial_batch % trial_gpus:
                continue  # the trial's batch does not split over that many GPUs
            new = replace(new, gpus=trial_gpus, strategy="fsdp", trials_per_gpu=1,
                          batch_size=trial_batch // trial_gpus)
        if new.cpu_offload and new.strategy != "fsdp":
            continue  # offload is FSDP2's: only together with fsdp
        fixes.append(Fix(new, tuple(text for text, _, _ in chosen), sum(cost for _, cost, _ in chosen),
                         plan(shape, new)))
    return sorted(fixes, key=lambda f: (f.cost, f.plan.required))


def smallest_fix(shape: ModelShape, s: Settings, gpu_bytes: float, max_gpus: int) -> Fix | None:
    """The cheapest combination of changes whose plan fits `gpu_bytes`; None when nothing does."""
    for fix in candidate_fixes(shape, s, max_gpus):
        if fix.plan.fits(gpu_bytes):
            return fix
    return None


def best_effort(shape: ModelShape, s: Settings, max_gpus: int) -> Fix:
    """The combination with the least memory per GPU (what 'cannot fit' compares against)."""
    return min(candidate_fixes(shape, s, max_gpus), key=lambda f: f.plan.required)


def verdict_line(shape: ModelShape, s: Settings, gpu_bytes: float, max_gpus: int, what: str = "the run") -> tuple[bool, str]:
    """(fits, one line): what the run needs per GPU against `gpu_bytes`, and when it does not fit the smallest
    change that makes it fit, or by how much it misses even at its smallest."""
    p = plan(shape, s)
    need = p.required
    if need <= gpu_bytes:
        return True, (f"fits: {what} needs {gib(need)} per GPU ({describe(s)}; peak {gib(max(p.peak, p.teacher_gpu_peak))}"
                      f" + headroom) of {gib(gpu_bytes)}")
    head = (f"{what} needs {gib(need)} per GPU ({describe(s)}) but a GPU has {gib(gpu_bytes)}: "
            f"{gib(need - gpu_bytes)} short")
    fix = smallest_fix(shape, s, gpu_bytes, max_gpus)
    if fix is not None:
        return False, f"{head}; smallest fix: {fix.text} (-> {gib(fix.plan.required)} per GPU)"
    best = best_effort(shape, s, max_gpus)
    lora = (smallest_fix(shape, replace(s, trial_mode="lora"), gpu_bytes, max_gpus)
            if s.stage == "knockout" and not s.lora else None)
    hint = "" if lora is None else (" (LoRA trials fit: trial_mode: lora" + (f", {lora.text}" if lora.changes else "")
                                    + f" -> {gib(lora.plan.required)} per GPU)")
    return False, (f"{head}; it cannot fit under any strategy on {max_gpus} GPU{'s' if max_gpus > 1 else ''} of "
                   f"{gib(gpu_bytes)}: even {best.text} needs {gib(best.plan.required)} per GPU, "
                   f"{gib(best.plan.required - gpu_bytes)} too much{hint}")
