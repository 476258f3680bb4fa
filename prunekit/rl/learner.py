"""An RL learner rank: the training engine's strategy (DDP / FSDP2, gloo on CPU) around the policy, updated with
the GRPO/GSPO objective on the samples the driver hands it. The driver runs one `Learner` per rank as a Ray actor;
ranks join one torch.distributed group, so gradients are all-reduced exactly as in SFT.

Per generation batch: the current weights' log-probs (the "old" policy: the rollout actors hold the same version)
and, with a KL penalty, the frozen reference's; then `epochs` x `mini_batches` optimizer steps, each normalised by
the global (all-rank) count its aggregation calls for.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from prunekit.core.losses import aggregate
from prunekit.core.samples import pad_id
from prunekit.engine.reporting import LocalReporter
from prunekit.rl.batch import collate_rl, response_slices

# what one optimizer step sums from the RL objective's outputs; all but loss_sum are `UpdateStats` fields
STEP_STATS = ("loss_sum", "clipped", "clip_count", "kl_sum", "n_tokens", "ratio_sum")


@dataclass
class UpdateStats:
    """What one rank's `Learner.update` sums over its optimizer steps; the driver adds the ranks' (`+`)."""
    loss: float = 0.0  # this rank's share of each step's loss (its loss sum / the global normaliser)
    grad_norm: float = 0.0  # every rank sees the same (synced) norm
    clipped: float = 0.0  # tokens (GRPO) or responses (GSPO) whose ratio was clipped, out of clip_count
    clip_count: float = 0.0
    kl_sum: float = 0.0
    n_tokens: float = 0.0
    ratio_sum: float = 0.0
    optimizer_steps: int = 0  # every rank takes each step
    logp_mismatch: float = 0.0  # sum over response tokens of |old_logp - rollout_logp|
    old_tokens: int = 0  # the tokens logp_mismatch sums over

    def __add__(self, other: "UpdateStats") -> "UpdateStats":
        return UpdateStats(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def metrics(self, world_size: int) -> dict:
        """Per-step means of the sum over `world_size` ranks."""
        steps = self.optimizer_steps / world_size
        return {"train/loss": self.loss / max(steps, 1),
                "train/grad_norm": self.grad_norm / max(world_size * steps, 1),
                "train/clip_frac": self.clipped / max(self.clip_count, 1),
                "train/kl": self.kl_sum / max(self.n_tokens, 1),
                "train/ratio_mean": self.ratio_sum / max(self.clip_count, 1),
                "train/optimizer_steps": int(steps),
                "rollout/logp_diff": self.logp_mismatch / max(self.old_tokens, 1)}


class LearnerCheckpoints(LocalReporter):
    """Rank 0 writes checkpoints (atomic rename under run_dir/checkpoints); other ranks only join the collectives
    that gather full state dicts."""

    def checkpoint(self, step, metrics, write_fn, all_ranks, final):
        if self.rank == 0:
            return super().checkpoint(step, metrics, write_fn, all_ranks, final)
        with tempfile.TemporaryDirectory(prefix="prunekit-rl-rank-") as tmp:
            write_fn(Path(tmp))


class Learner:
    """One rank. Built in two calls so every rank can be told rank 0's address first: `address()` on rank 0, then
    `setup(addr, port)` on all ranks at once (they meet in init_process_group)."""

    def __init__(self, cfg: dict, rank: int, world_size: int, run_dir: str, run_name: str):
        self.raw_cfg, self.rank, self.world_size, self.run_dir, self.run_name = cfg, rank, world_size, run_dir, run_name

    def address(self) -> tuple[str, int]:
        import socket
        import ray
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def setup(self, master_addr: str, master_port: int) -> int:
        """Join the process group, build model + objective + strategy, restore the newest checkpoint; returns the
        step to start from."""
        from prunekit.config import RLConfig
        from prunekit.core.loading import load_model, load_tokenizer, quiet_transformers
        from prunekit.engine.loop import prepare, setup_strategy
        from prunekit.engine.objectives import RLObjective
        self.cfg = cfg = RLConfig(**self.raw_cfg)
        rank, world_size, run_dir, run_name = self.rank, self.world_size, self.run_dir, self.run_name
        torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))
        if world_size > 1:
            import torch.distributed as dist
            os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
            dist.init_process_group("nccl" if cfg.ray.use_gpu else "gloo", rank=rank, world_size=world_size)
        self.device = torch.device("cuda", 0) if cfg.ray.use_gpu else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        with quiet_transformers():
            model, _ = load_model(Path(cfg.model), dtype="float32", trust_remote_code=cfg.trust_remote_code)
            tok = load_tokenizer(Path(cfg.model), trust_remote_code=cfg.trust_remote_code)
            self.reference = None
            if cfg.algorithm.kl_beta:
                ref, _ = load_model(Path(cfg.model), dtype="float32", trust_remote_code=cfg.trust_remote_code)
                self.reference = ref.to(self.device).eval().requires_grad_(False)
        self.pad_id = pad_id(tok)
        self.autocast = prepare(model, cfg, self.device)
        algo = cfg.algorithm
        eps, eps_high = algo.clip()
        self.temperature = cfg.rollout.temperature if cfg.rollout.temperature > 0 else 1.0
        self.objective = RLObjective(algo.name, eps, eps_high, algo.aggregation, kl_beta=algo.kl_beta,
                                     temperature=self.temperature, chunk_size=cfg.loss_chunk_size)
        self.reporter = LearnerCheckpoints(Path(run_dir), run_name, cfg)
        optimizer_steps = cfg.max_steps * algo.epochs * algo.mini_batches
        self.strategy, self.start_step = setup_strategy(model, self.objective, cfg, optimizer_steps, self.reporter,
                                                        self.device)
        return self.start_step

    def _micro(self, samples: list[dict]) -> list[dict]:
        size = self.cfg.algorithm.micro_batch_size
        return [collate_rl(samples[i:i + size], self.pad_id) for i in range(0, len(samples), size)]

    def _to(self, batch: dict) -> dict:
        return {k: v.to(self.device) for k, v in batch.items()}

    @torch.no_grad()
    def _logprobs(self, samples: list[dict]) -> tuple[list[list[float]], list[list[float]] | None]:
        """Old (current weights, through the strategy's wrapper: FSDP unshards there) and reference log-probs."""
        from prunekit.engine.objectives import response_logprobs
        old, ref = [], [] if self.reference is not None else None
        for start in range(0, len(samples), self.cfg.algorithm.micro_batch_size):
            chunk = samples[start:start + self.cfg.algorithm.micro_batch_size]
            batch = self._to(collate_rl(chunk, self.pad_id))
            with self.autocast:
                old += response_slices(self.strategy.forward(batch, logp_only=True)["logp"].float().cpu(), chunk)
                if ref is not None:
                    ref += response_slices(response_logprobs(self.reference, batch, self.temperature).cpu(), chunk)
        return old, ref

    def update(self, parts: list[list[dict]]) -> dict:
        """parts[m]: this rank's share of mini-batch m. Returns this rank's `UpdateStats` (the driver adds the ranks')
        and the learning rate."""
        from prunekit.engine.loop import accumulate_and_step
        from prunekit.engine.strategy import all_reduce_sum
        algo, strategy = self.cfg.algorithm, self.strategy
        flat = [s for part in parts for s in part]
        old, ref = self._logprobs(flat)
        for i, s in enumerate(flat):  # the same dicts as in `parts`
            s["old_logp"] = old[i]
            if ref is not None:
                s["ref_logp"] = ref[i]
        mismatch = sum(abs(a - b) for s in flat for a, b in zip(s["old_logp"], s.get("rollout_logp", s["old_logp"])))
        stats = UpdateStats(logp_mismatch=mismatch, old_tokens=sum(len(s["completion_ids"]) for s in flat))
        for _ in range(algo.epochs):
            for part in parts:
                local = aggregate(algo.aggregation).normaliser([len(s["completion_ids"]) for s in part],
                                                               self.cfg.rollout.max_new_tokens)
                total = all_reduce_sum(torch.tensor([local], dtype=torch.float64, device=self.device)).item()
                sums, grad_norm = accumulate_and_step(strategy, self._micro(part), total, self.autocast, self.device,
                                                      stats=STEP_STATS)
                step = dict(zip(STEP_STATS, sums.cpu().tolist()))
                stats += UpdateStats(loss=step.pop("loss_sum") / max(total, 1e-9), grad_norm=float(grad_norm),
                                     optimizer_steps=1, **step)
        return {"stats": stats, "lr": strategy.lr()}

    def weights(self, dtype: str | None = None):
        """The full state dict for the rollout actors (a collective under FSDP: every rank calls it); rank 0 packs it
        into one buffer in Ray's object store and returns [ref] (a list, so Ray does not resolve it on the way)."""
        state = self.strategy.model_state_dict()
        if self.rank != 0:
            return None
        import ray
        from prunekit.rl.rollout import pack_state
        return [ray.put(pack_state(state, getattr(torch, dtype) if dtype else None))]

    def checkpoint(self, step: int, metrics: dict, final: bool) -> str | None:
        from prunekit.engine.loop import write_checkpoint
        write_checkpoint(self.strategy, self.reporter, step, metrics, final)
        return str(self.reporter.last_checkpoint) if self.rank == 0 else None
