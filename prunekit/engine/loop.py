"""The one training loop SFT, distillation, LoRA and knockout trials share (RL learners reuse its pieces).

It reads top to bottom: build data order -> restore -> for each step: micro-batches, token-weighted loss,
backward, step, log, eval, checkpoint. Ray never appears here: a `Reporter` (local or Ray Train) receives metrics
and checkpoints, and torch.distributed (set up by Ray Train or absent) carries the all-reduces.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from prunekit import PrunekitError
from prunekit.core.data import replace_tokens
from prunekit.core.evaluate import TokenTotals
from prunekit.core.interrupts import STOP_AT_ENV, StopOnSignal, interrupt_for, stop_time
from prunekit.core.losses.ce import HOST_COPY
from prunekit.core.samples import collate
from prunekit.engine.manifest import write_manifest
from prunekit.engine.reporting import injected_faults
from prunekit.engine.strategy import STRATEGIES, LossModule, all_reduce_sum, world

if TYPE_CHECKING:
    from prunekit.config import EngineConfig

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizer threads + forked workers deadlock

TRAINER_STATE = "trainer_state.pt"
MODEL_STATE = "model_state.pt"
HF_DIR = "hf"


@dataclass
class DataOrder:
    """A deterministic stream of sample indices: epoch e is a seeded permutation; position p in the stream is
    sample order(p // n)[p % n]. Step s uses positions [s*G, (s+1)*G) for the global batch G, so a resumed run
    continues exactly where it stopped and never replays data."""
    n: int
    seed: int

    def __post_init__(self):
        self._cache: dict[int, list[int]] = {}

    def index(self, position: int) -> int:
        epoch = position // self.n
        if epoch not in self._cache:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._cache = {epoch: torch.randperm(self.n, generator=g).tolist()}
        return self._cache[epoch][position % self.n]


def step_microbatches(samples, order: DataOrder, step: int, batch: int, accum: int, rank: int, world_size: int):
    """This rank's micro-batches (lists of samples) for `step`."""
    global_batch = batch * accum * world_size
    out = []
    for m in range(accum):
        start = step * global_batch + m * batch * world_size + rank * batch
        out.append([samples[order.index(p)] for p in range(start, start + batch)])
    return out


def make_optimizer_factory(cfg):
    def make(params):
        params = [p for p in params if p.requires_grad]
        fused = bool(params) and params[0].device.type == "cuda"  # one kernel for all params instead of a loop
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95), fused=fused)
    return make


# compiled variants kept per layer code object: every layer of a class shares one (its forward), and each of
# teacher / student, training / eval and each weight shape is a variant, accumulating over the stages a pipeline runs
# in one process. At torch's default of 8 a later variant runs eagerly: 3-KV-head distillations after a 1-KV-head
# one in one process ran at 6.0 steps/s against 9.1 (bench/README.md, cut-order).
LAYER_RECOMPILE_LIMIT = 64


def compile_model(model, mode: str = "default", scope: str = "layers") -> None:
    """torch.compile the model in place, one region per text decoder layer (and vision block): the repeated blocks
    are where the time goes, and compiling them one by one keeps graphs small and recompiles cheap. `scope`
    "backbone" compiles a text model's whole backbone as one region instead: under reduce-overhead each forward
    (and its backward) replays one CUDA graph instead of one a layer, each with its own host-side call.
    `mode`: torch.compile's."""
    import torch._dynamo
    from prunekit.core.families import backbone_and_head, family_of
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, LAYER_RECOMPILE_LIMIT)
    options = {} if mode == "default" else {"mode": mode}
    if scope == "backbone":
        if family_of(model).is_vlm:  # image inputs change shape batch to batch: a recompile each
            raise PrunekitError(f"compile_scope: backbone is for text models; {type(model).__name__} has a vision "
                                f"tower (use compile_scope: layers)")
        backbone_and_head(model)[0].compile(**options)
        return
    for layer in family_of(model).blocks(model):
        layer.compile(**options)


def make_scheduler_factory(cfg, total_steps: int):
    warmup = int(cfg.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if cfg.scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.scheduler == "linear":
            return max(0.0, 1 - progress)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def total_steps(cfg, n_samples: int, world_size: int) -> int:
    if cfg.max_steps:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * n_samples / (cfg.batch_size * cfg.grad_accum * world_size)))


def lm_batch(samples, pad_id: int, width: int | None = None) -> dict:
    """Collate samples for the LM objectives (padded to at least `width` tokens when given). An all-ones attention
    mask (no padding) is dropped: the model then runs plain causal attention (flash kernels, no mask check that
    would sync the GPU)."""
    batch = collate(samples, pad_id, width)
    mask = batch.get("attention_mask")
    if mask is not None and "pixel_values" not in batch and bool(mask.all()):
        del batch["attention_mask"]
    return batch


def _to(batch: dict, device) -> dict:
    """Host batch -> device (through pinned memory on GPUs: the copy does not block the host). The device labels
    keep their host copy, so the losses find the supervised positions without waiting on the GPU (HOST_COPY)."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    out = {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    if "labels" in batch:
        setattr(out["labels"], HOST_COPY, batch["labels"])
    return out


@torch.no_grad()
def evaluate_distributed(strategy, samples, pad_id: int, batch_size: int, device, width: int | None = None) -> dict:
    """Eval loss / token_acc over the val samples, each rank taking every world_size-th batch; summed over ranks.
    The loss is the objective's (distillation: its KD loss), computed as in training (hidden states, chunked head).
    `width`: pad every batch to at least that many tokens (one CUDA-graph shape, as the training batches)."""
    rank, world_size = world()
    model = strategy.model
    was_training = model.training
    model.eval()
    totals = TokenTotals()
    batches = [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)]
    for b in batches[rank::world_size]:
        torch.compiler.cudagraph_mark_step_begin()  # compile_mode reduce-overhead: the last batch's outputs are read
        out = strategy.forward(_to(lm_batch(b, pad_id, width), device))  # through the wrapper: FSDP unshards there
        totals.add(out["loss_sum"], out["n_tokens"], out["n_correct"])
    sums = all_reduce_sum(torch.tensor([totals.loss_sum, totals.tokens, totals.correct], dtype=torch.float64,
                                       device=device)).cpu()
    model.train(was_training)
    m = TokenTotals(sums[0].item(), int(sums[1]), int(sums[2])).means()
    return {"eval/loss": m["loss"], "eval/token_acc": m["token_acc"], "eval/tokens": m["tokens"]}


def prepare(model, cfg: "EngineConfig", device):
    """What every training run (the loop, RL learners) does to the model before `setup_strategy`: seed, gradient
    checkpointing; returns the autocast context each forward runs in (bf16 over fp32 weights, off for pure bf16)."""
    torch.manual_seed(cfg.seed)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(cfg.bf16) and cfg.param_dtype != "bfloat16")


def setup_strategy(model, objective, cfg, scheduler_steps: int, reporter, device) -> tuple:
    """Restore the newest checkpoint `reporter` has (model weights before wrapping, optimizer/scheduler state
    after), cast, compile and wrap: returns (strategy, the step to start from). Shared with the RL learners."""
    start_step, state = 0, None
    resume_dir = reporter.restore()
    if resume_dir is not None:
        state = torch.load(Path(resume_dir) / TRAINER_STATE, map_location="cpu", weights_only=False)
        start_step = state["step"]
        if state.get("final"):  # a finished run: nothing is left to train (its deliverable is hf/)
            state = None
        else:
            model.load_state_dict(torch.load(Path(resume_dir) / MODEL_STATE, map_location="cpu", weights_only=True))
    if cfg.param_dtype == "bfloat16":  # pure bf16 (no fp32 master copy): less memory traffic, no autocast casts
        model.to(torch.bfloat16)
    model.to(device).train()
    if cfg.compile:
        compile_model(model, cfg.compile_mode, cfg.compile_scope)
    strategy = STRATEGIES[cfg.parallel.strategy](LossModule(model, objective), device, cfg)
    strategy.setup(make_optimizer_factory(cfg), make_scheduler_factory(cfg, scheduler_steps))
    if state is not None:
        strategy.load_trainer_state(state["strategy"], Path(resume_dir))
    return strategy, start_step


def train(model, objective, cfg, train_samples, val_samples, pad_id: int, reporter, device=None) -> dict:
    """Run the loop; returns the last metrics. `reporter.restore()` gives a checkpoint dir to resume from (or None).
    A run that stops early (an error, Ctrl-C, SIGTERM) ends its progress bar and wandb run first."""
    try:
        return _train(model, objective, cfg, train_samples, val_samples, pad_id, reporter, device)
    except BaseException:
        reporter.abort()
        raise


def _train(model, objective, cfg, train_samples, val_samples, pad_id: int, reporter, device=None) -> dict:
    rank, world_size = world()
    device = device or torch.device("cpu")
    autocast = prepare(model, cfg, device)
    steps = total_steps(cfg, len(train_samples), world_size)
    strategy, start_step = setup_strategy(model, objective, cfg, steps, reporter, device)
    order = DataOrder(len(train_samples), cfg.seed)
    kv_merge = None
    # sft / distill; a resumed run's weights already hold the pulls of its done steps
    if getattr(cfg, "merge_kv_heads", None):
        from prunekit.core.kv_merge import KVHeadMerge
        kv_merge = KVHeadMerge(strategy.model, cfg.merge_kv_heads, steps, cfg.merge_kv_ramp)
    reporter.start(start_step, steps)
    # CUDA graphs are recorded per input shape: one width (max_length) records them once instead of per batch width
    fixed_width = cfg.max_length if cfg.compile_mode == "reduce-overhead" else None
    if val_samples and start_step == 0:  # the step-0 baseline every curve is compared against
        baseline = evaluate_distributed(strategy, val_samples, pad_id, cfg.batch_size, device, fixed_width)
        reporter.log(0, baseline)
        check_finite(baseline, ("eval/loss",), 0)

    on_policy = getattr(objective, "on_policy", None)   # distill's on_policy rows (prunekit.engine.on_policy)
    input_noise = getattr(cfg, "input_noise", 0.0)      # distill: the same noisy inputs for teacher and student

    def host_batches(step: int) -> list[dict]:
        micro = step_microbatches(train_samples, order, step, cfg.batch_size, cfg.grad_accum, rank, world_size)
        if on_policy is not None:  # queued after the previous step's update: the student answers with new weights
            micro = on_policy.fill(strategy.model, micro, step, rank, world_size, autocast, device,
                                   fixed_length=strategy.name != "ddp")
        batches = [lm_batch(mb, pad_id, fixed_width) for mb in micro]
        if input_noise:  # seeded by step and rank: a resumed run draws the noise an uninterrupted one would
            noise = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 1_009 + rank)
            batches = [replace_tokens(b, input_noise, noise) for b in batches]
        return batches

    def global_tokens(batches: list[dict]) -> float:
        """Supervised tokens of the whole global batch, counted on the host (over gloo): no GPU sync."""
        local = float(sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches))
        return host_all_reduce_sum(local, host_group)

    host_group = make_host_group()
    metrics: dict = {}
    pending = None  # the last step's metrics, read back one step later (see _HostCopy)
    last_read = time.time()

    def read_metrics(done: int, copy: "_HostCopy", lr: float) -> dict:
        nonlocal last_read
        sums, grad_norm = copy.wait()
        now, n = time.time(), max(sums[1].item(), 1)
        step_metrics = {"train/loss": sums[0].item() / n, "train/token_acc": sums[2].item() / n, "train/lr": lr,
                        "train/grad_norm": grad_norm.item(), "train/tokens": int(sums[1]),
                        "train/tokens_per_s": sums[1].item() / max(now - last_read, 1e-9)}
        last_read = now
        check_finite(step_metrics, ("train/loss", "train/grad_norm"), done)
        return step_metrics

    micro = host_batches(start_step) if start_step < steps else []
    tokens = global_tokens(micro) if micro else 0.0
    crash_at_step = injected_faults()[0]
    # one process with its loop on the main thread: the first Ctrl-C / SIGTERM is acted on after the step it lands
    # in, with a checkpoint (a chained or preempted run resumes where it stopped); a second one stops it at once
    stop = StopOnSignal() if world_size == 1 and reporter.checkpoint_on_stop else None
    # $PRUNEKIT_STOP_AT: the same stop on a checkpoint at a wall-clock time, without a signal (one process only:
    # ranks reading their own clocks could stop a step apart)
    stop_at = stop_time() if stop is not None else None
    if stop is not None:
        stop.arm()
    try:
        for step in range(start_step, steps):
            if step == crash_at_step:
                reporter.maybe_crash(step)
            sums, grad_norm = accumulate_and_step(strategy, micro, tokens, autocast, device)
            if kv_merge is not None:
                kv_merge.after_step(step + 1)
            lr = strategy.lr()
            copy = _HostCopy([all_reduce_sum(sums), grad_norm])
            # While the GPU works through this step: build the next step's batches, then log the previous step
            # (waiting only for that one). Reading this step's numbers now would leave the GPU idle meanwhile.
            micro = host_batches(step + 1) if step + 1 < steps else []
            tokens = global_tokens(micro) if micro else 0.0
            if hasattr(objective, "prefetch"):  # e.g. a teacher on its own GPU starts on the next step's batches now
                for b in micro:
                    objective.prefetch(b, device)
            if pending is not None:
                metrics = read_metrics(*pending)
                reporter.log(pending[0], metrics)
            done = step + 1
            pending = (done, copy, lr)
            evaluate_now = val_samples and (done % cfg.eval_interval == 0 or done == steps)
            timed_out = stop_at is not None and done < steps and time.time() >= stop_at
            stopping = timed_out or (stop is not None and stop.signum is not None)
            save_now = reporter.keeps_checkpoints and (done % cfg.save_interval == 0 or done == steps or stopping)
            if evaluate_now or save_now or done == steps:
                metrics, pending = read_metrics(*pending), None
                if evaluate_now:
                    metrics.update(evaluate_distributed(strategy, val_samples, pad_id, cfg.batch_size, device,
                                                        fixed_width))
                reporter.log(done, metrics)
                if save_now:
                    write_checkpoint(strategy, reporter, done, metrics, final=done == steps)
            # a signal in this step, or while its checkpoint was written: stop on that checkpoint (one that came
            # during an evaluation without a checkpoint is acted on after the next step)
            if stop is not None and stop.signum is not None and save_now:
                raise interrupt_for(stop.signum, f"at step {done}, checkpoint written: the same command resumes")
            if timed_out and save_now:
                raise KeyboardInterrupt(f"{STOP_AT_ENV} reached at step {done}, checkpoint written: the same "
                                        f"command resumes")
    finally:
        if stop is not None:
            stop.disarm()
    reporter.finish()
    return metrics


class NonFiniteLoss(PrunekitError):
    """The loss became NaN/inf: training stops before a checkpoint holds the broken weights."""


def check_finite(metrics: dict, keys: tuple[str, ...], step: int) -> None:
    """A NaN/inf loss or gradient norm stops the run at once (a step's numbers are read before the next checkpoint
    is written, so no checkpoint holds the weights it produced)."""
    for key in keys:
        if not math.isfinite(metrics[key]):
            raise NonFiniteLoss(f"{key} is {metrics[key]} at step {step}: training stopped before a checkpoint holds "
                                f"such weights (look at lr, precision (bf16 / param_dtype), compile, the data)")


def accumulate_and_step(strategy, micro_batches: list[dict], normaliser: float, autocast, device,
                        stats=("loss_sum", "n_tokens", "n_correct")) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over micro-batches (SFT, distillation, knockout trials and RL learners all step here):
    each micro-batch's summed loss is divided by `normaliser`, the whole global batch's count (tokens, or what an
    RL aggregation divides by), so every unit weighs the same whatever rank or micro-batch it sits in; gradients
    are synced on the last micro-batch only. Returns the summed `stats` of the objective's outputs (on the device)
    and the pre-clip gradient norm (a tensor: reading either waits for the GPU)."""
    world_size = world()[1]
    torch.compiler.cudagraph_mark_step_begin()   # compile_mode reduce-overhead: the last step's graph outputs are done
    sums = torch.zeros(len(stats), dtype=torch.float64, device=device)
    for i, batch in enumerate(micro_batches):
        with strategy.no_sync(i < len(micro_batches) - 1), autocast:
            out = strategy.forward(_to(batch, device))
            # DDP/FSDP/ZeRO average gradients over ranks; scaling by world_size turns that into a sum
            strategy.backward(out["loss_sum"] * world_size / max(normaliser, 1e-9))
        sums += torch.stack([torch.as_tensor(out[k]).detach().to(device, torch.float64) for k in stats])
    return sums, strategy.step()


def host_state_dict(model, state: dict) -> dict:
    """The state on the host, with tied weights still one tensor. Copying to the host (GPU -> CPU, FSDP's full
    state dict, ZeRO-3's consolidation) turns the embedding and a tied LM head into two tensors; save_pretrained
    finds ties by storage, so it would then write both: a file 28M parameters bigger than the model (SmolLM2)
    whose head transformers ignores on load. Every name the model gives one parameter maps to one host tensor."""
    host: dict = {}
    by_device_storage: dict = {}
    for k, v in state.items():
        v = v.detach()
        key = (v.device, v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()))
        if key not in by_device_storage:
            by_device_storage[key] = v.cpu().contiguous()
        host[k] = by_device_storage[key]
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    for names in aliases.values():
        present = [n for n in names if n in host]
        for n in present[1:]:
            host[n] = host[present[0]]
    return host


class _HostCopy:
    """Device tensors copied to pinned host memory without blocking; `wait()` blocks only until this copy is
    done, not for work queued after it."""

    def __init__(self, tensors: list[torch.Tensor]):
        tensors = [t.full_tensor() if hasattr(t, "full_tensor") else t for t in tensors]  # FSDP2 DTensor norms
        tensors = [torch.as_tensor(t).detach() for t in tensors]
        self.event = None
        if tensors[0].is_cuda:
            self.host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                         for t in tensors]
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = [t.cpu() for t in tensors]

    def wait(self) -> list[torch.Tensor]:
        if self.event is not None:
            self.event.synchronize()
        return self.host


def make_host_group():
    """A gloo process group for small host-side all-reduces when the main one is NCCL (None: use the default)."""
    import torch.distributed as dist
    if world()[1] > 1 and dist.get_backend() != "gloo":
        return dist.new_group(backend="gloo")
    return None


def host_all_reduce_sum(value: float, group) -> float:
    if world()[1] == 1:
        return value
    import torch.distributed as dist
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t.item()


def write_checkpoint(strategy, reporter, step: int, metrics: dict, final: bool) -> None:
    """All ranks take part (full state dicts of FSDP/ZeRO-3 are collectives); rank 0 writes the model.
    A step checkpoint holds what resuming needs (weights + optimizer/scheduler state, DeepSpeed shards); the final
    one holds only the deliverable, a plain HF directory (a peft adapter directory for LoRA): a finished run
    resumes to nothing, so a second weight copy and the optimizer state (2x the weights) would only fill disks."""
    rank, _ = world()
    full_state = strategy.model_state_dict()
    trainer_state = None if final else strategy.trainer_state()

    def write(ckpt_dir: Path):
        if rank == 0:
            state = host_state_dict(strategy.model, full_state)
            if final:
                strategy.model.save_pretrained(ckpt_dir / HF_DIR, state_dict=state)
            else:
                torch.save(state, ckpt_dir / MODEL_STATE)
            torch.save({"step": step, "strategy": trainer_state, "metrics": metrics, "final": final},
                       ckpt_dir / TRAINER_STATE)
            (ckpt_dir / "metrics.json").write_text(json.dumps({"step": step, **metrics}))
        if not final:
            strategy.save_sharded(ckpt_dir)
        write_manifest(ckpt_dir, rank)  # last: each file's size and sha256, checked before resuming or copying out

    reporter.checkpoint(step, metrics, write, all_ranks=strategy.all_ranks_write_checkpoint(), final=final)

