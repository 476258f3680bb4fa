"""How parameters are wrapped, stepped and checkpointed across ranks: ddp | fsdp (FSDP2) | deepspeed (ZeRO-2/3).

The training loop only sees `forward(batch)`, `backward(loss)`, `step()`, `no_sync(...)` and the state-dict methods,
so one loop serves every strategy. torch.distributed is initialised by the caller (Ray Train) or absent (1 process).
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def process_group_of_one(device: torch.device):
    """FSDP2 and DeepSpeed shard over a process group. Ray Train sets one up for its workers; a single process
    (`launcher: local`, a benchmark) gets a world of one here, on an in-memory store (no port). DeepSpeed also reads
    its rank from the environment, which is set for the duration where nothing set it."""
    import os
    if dist.is_initialized():
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    added = {k: "0" for k in ("LOCAL_RANK", "RANK") if k not in os.environ}
    if "WORLD_SIZE" not in os.environ:
        added["WORLD_SIZE"] = "1"
    os.environ.update(added)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                            world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
        for k in added:
            os.environ.pop(k, None)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class LossModule(torch.nn.Module):
    """Wraps the model so the objective runs inside the (DDP/FSDP/DeepSpeed) wrapper's forward: gradient hooks
    fire however the objective reaches into the model (e.g. backbone + chunked head)."""

    def __init__(self, model, objective):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch, **kwargs):
        return self.objective(self.model, batch, **kwargs)


class Strategy:
    name = "ddp"

    def __init__(self, loss_module: LossModule, device: torch.device, cfg):
        self.module, self.device, self.cfg = loss_module, device, cfg
        self.wrapped = loss_module
        self.optimizer = self.scheduler = None

    @property
    def model(self):
        """The plain (unwrapped) model."""
        return self.module.model

    def setup(self, make_optimizer, make_scheduler):
        if world()[1] > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            ids = [self.device.index] if self.device.type == "cuda" else None
            # grads live in the all-reduce buckets: no copy in and out of them every step
            # and no buffer broadcast every forward (an LLM's buffers, e.g. rotary tables, never diverge)
            self.wrapped = DDP(self.module, device_ids=ids, gradient_as_bucket_view=True, broadcast_buffers=False)
        self.optimizer = make_optimizer(self.module.parameters())
        self.scheduler = make_scheduler(self.optimizer)

    def forward(self, batch, **kwargs):
        """The objective's outputs for `batch`; `kwargs` go to the objective (e.g. RL's `logp_only`)."""
        return self.wrapped(batch, **kwargs)

    def no_sync(self, skip_sync: bool):
        return self.wrapped.no_sync() if skip_sync and hasattr(self.wrapped, "no_sync") else contextlib.nullcontext()

    def backward(self, loss):
        loss.backward()

    def step(self) -> torch.Tensor:
        """Clip, step, zero; returns the pre-clip gradient norm as a tensor (reading it would wait for the GPU)."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        clip = self.cfg.grad_clip or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, clip) if params else torch.tensor(0.0)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # checkpoints: the full model state (rank 0 writes it) + optimizer/scheduler state
    def model_state_dict(self) -> dict:
        return self.model.state_dict()

    def trainer_state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_trainer_state(self, state: dict, ckpt_dir) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def save_sharded(self, ckpt_dir) -> None:
        """Per-rank state that cannot be gathered into trainer_state (DeepSpeed ZeRO shards)."""

    def all_ranks_write_checkpoint(self) -> bool:
        return False


class FSDPStrategy(Strategy):
    """FSDP2: every decoder layer (and vision block) is its own shard unit, then the root."""
    name = "fsdp"

    def setup(self, make_optimizer, make_scheduler):
        from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard
        from prunekit.core.families import family_of
        # cpu_offload: the shards (and so the optimizer state) live in pinned host memory; the GPU holds the
        # units being computed
        kw = {"offload_policy": CPUOffloadPolicy()} if self.cfg.parallel.cpu_offload else {}
        for layer in family_of(self.model).blocks(self.model):
            fully_shard(layer, **kw)
        fully_shard(self.module, **kw)
        self.wrapped = self.module
        self.optimizer = make_optimizer(self.module.parameters())
        self.scheduler = make_scheduler(self.optimizer)

    def no_sync(self, skip_sync: bool):
        self.module.set_requires_gradient_sync(not skip_sync)
        return contextlib.nullcontext()

    def model_state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def trainer_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        opt = get_optimizer_state_dict(self.module, self.optimizer,
                                       options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {"optimizer": opt, "scheduler": self.scheduler.state_dict()}

    def load_trainer_state(self, state: dict, ckpt_dir) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(self.module, self.optimizer, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        self.scheduler.load_state_dict(state["scheduler"])


class DeepSpeedStrategy(Strategy):
    """DeepSpeed ZeRO-2/3 with our optimizer and scheduler; accumulation is ours (one engine step per step)."""
    name = "deepspeed"

    def setup(self, make_optimizer, make_scheduler):
        import deepspeed
        cfg = self.cfg
        ds_config = {
            "train_micro_batch_size_per_gpu": cfg.batch_size,
            "gradient_accumulation_steps": cfg.grad_accum,
            "gradient_clipping": cfg.grad_clip or 0.0,
            "zero_optimization": {"stage": cfg.parallel.zero_stage},
            "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": bool(cfg.bf16 and self.device.type == "cuda")},
            "steps_per_print": 10 ** 9,
        }
        optimizer = make_optimizer(self.module.parameters())
        scheduler = make_scheduler(optimizer)
        self.wrapped, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
            dist_init_required=False)

    def no_sync(self, skip_sync: bool):
        return contextlib.nullcontext()  # DeepSpeed reduces at its accumulation boundary by itself

    def backward(self, loss):
        self.wrapped.backward(loss, scale_wrt_gas=False)  # the loss is already normalised by the step's tokens
        self.wrapped.step()  # a no-op until the accumulation boundary

    def step(self) -> torch.Tensor:
        norm = self.wrapped.get_global_grad_norm()
        return torch.as_tensor(float(norm) if norm is not None else 0.0)

    def model_state_dict(self) -> dict:
        if self.cfg.parallel.zero_stage == 3:
            return self.wrapped._zero3_consolidated_16bit_state_dict() or {}
        return self.model.state_dict()

    def trainer_state(self) -> dict:
        return {}

    def save_sharded(self, ckpt_dir) -> None:
        self.wrapped.save_checkpoint(str(ckpt_dir), tag="ds", client_state={})

    def load_trainer_state(self, state: dict, ckpt_dir) -> None:
        self.wrapped.load_checkpoint(str(ckpt_dir), tag="ds", load_module_strict=False)

    def all_ranks_write_checkpoint(self) -> bool:
        return True


STRATEGIES = {"ddp": Strategy, "fsdp": FSDPStrategy, "deepspeed": DeepSpeedStrategy}
