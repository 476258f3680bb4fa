"""The single controller of an RL run (veRL style): Ray actors for the roles, one loop in the driver.

    for each step:  rollout actors generate n samples per prompt (weights version checked)
                    -> rewards score them (in the driver; sync or async functions)
                    -> group-normalised advantages
                    -> learners (the training engine, one torch.distributed group) take
                       epochs x mini_batches optimizer steps
                    -> the new weights go to every rollout actor (version + 1, timed)
                    -> metrics (JSONL, wandb, progress bar); checkpoints every save_interval

Prompts for step s are positions [s*P, (s+1)*P) of a seeded permutation stream and the sampling seed is a function
of s, so a resumed run continues with the prompts it had not seen.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from prunekit import PrunekitError
from prunekit.engine.loop import DataOrder
from prunekit.engine.reporting import RunLogger
from prunekit.rl.advantages import group_advantages
from prunekit.rl.learner import UpdateStats
from prunekit.rl.rewards import RewardError, reward_metrics, score
from prunekit.rl.rollout import RolloutActor, Sampling


class RLLogger(RunLogger):
    """The engine's logger (JSONL + wandb + tqdm); the bar shows reward and response length."""

    def log(self, step: int, metrics: dict) -> None:
        super().log(step, metrics)
        if self.bar is not None:
            self.bar.set_postfix({k: f"{metrics[m]:.3f}" for k, m in (("reward", "reward/total/mean"),
                                  ("len", "response/length_mean"), ("clip", "train/clip_frac")) if m in metrics},
                                 refresh=True)


def _unwrap(e: Exception) -> Exception:
    """A Ray task error -> the exception the actor raised."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, Exception) else e


def _one_line(e: Exception) -> str:
    e = _unwrap(e)
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}"[:400]


def _split(items: list, parts: int) -> list[list]:
    size = math.ceil(len(items) / parts)
    return [items[i * size:(i + 1) * size] for i in range(parts)]


def push_weights(learners, actors, version: int, dtype: str | None) -> float:
    """Every learner rank gives its state (a collective under FSDP); rank 0's packed copy goes once into the object
    store and every actor loads it and moves to `version`. Returns the wall time of the whole sync."""
    import ray
    t0 = time.perf_counter()
    refs = ray.get([lr.weights.remote(dtype) for lr in learners])
    state_ref = refs[0][0]
    acks = ray.get([a.update_weights.remote(state_ref, version) for a in actors])
    del state_ref, refs
    if any(a["version"] != version for a in acks):
        raise PrunekitError(f"weight sync to version {version} failed: actors report {acks}")
    return time.perf_counter() - t0


class RLRun:
    def __init__(self, cfg, rows: list[dict], prompt_ids: list[list[int]], tokenizer, rewards, run_dir: Path,
                 name: str):
        self.cfg, self.rows, self.prompt_ids, self.tok, self.rewards = cfg, rows, prompt_ids, tokenizer, rewards
        self.run_dir, self.name = Path(run_dir), name
        self.learners, self.actors = [], []

    # ---- roles ------------------------------------------------------------------------------------------------
    def start(self) -> int:
        import ray
        from prunekit.rl.learner import Learner
        cfg = self.cfg
        learner_cls = ray.remote(num_cpus=cfg.ray.cpus_per_worker,
                                 num_gpus=cfg.ray.gpus_per_worker if cfg.ray.use_gpu else 0)(Learner)
        raw = cfg.model_dump(mode="json")
        world = cfg.parallel.workers
        self.learners = [learner_cls.remote(raw, r, world, str(self.run_dir), self.name) for r in range(world)]
        addr, port = ray.get(self.learners[0].address.remote())
        starts = ray.get([lr.setup.remote(addr, port) for lr in self.learners])
        if len(set(starts)) != 1:
            raise PrunekitError(f"learner ranks restored different steps {starts}")
        ro = cfg.rollout
        on_gpu = ro.gpus_per_actor > 0
        self.sync_dtype = "bfloat16" if on_gpu else "float32"
        actor_cls = ray.remote(num_cpus=ro.cpus_per_actor, num_gpus=ro.gpus_per_actor)(RolloutActor)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else None
        self.actors = [actor_cls.remote(ro.backend, cfg.model, device="cuda" if on_gpu else "cpu", version=0,
                                        threads=max(1, int(ro.cpus_per_actor)), batch_size=ro.batch_size,
                                        fast=ro.fast, dtype=self.sync_dtype, pad_id=pad,
                                        max_model_len=ro.max_model_len,
                                        gpu_memory_utilization=ro.gpu_memory_utilization,
                                        max_num_seqs=max(ro.batch_size, cfg.prompts_per_step * ro.n), seed=cfg.seed)
                       for _ in range(ro.num_actors)]
        ray.get([a.info.remote() for a in self.actors])  # every actor is up (a failed start raises here)
        self.version = 0
        if starts[0] > 0:  # resumed: the actors loaded the base model, the learners the checkpoint
            self.sync(starts[0])
        return starts[0]

    def sync(self, version: int) -> float:
        """Learner weights -> every rollout actor; returns seconds. The actors refuse to generate on any other
        version afterwards."""
        seconds = push_weights(self.learners, self.actors, version, self.sync_dtype)
        self.version = version
        return seconds

    def stop(self) -> None:
        import ray
        for a in self.actors + self.learners:
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.actors, self.learners = [], []

    # ---- one step ---------------------------------------------------------------------------------------------
    def generate(self, idx: list[int], step: int) -> tuple[list[dict], dict]:
        import ray
        ro, cfg = self.cfg.rollout, self.cfg
        chunks = _split(idx, len(self.actors))
        t0 = time.perf_counter()
        futures = [a.generate.remote([self.prompt_ids[i] for i in chunk],
                                     Sampling(ro.n, ro.temperature, ro.top_p, ro.max_new_tokens,
                                              seed=cfg.seed * 1_000_003 + step * 101 + k), self.version)
                   for k, (a, chunk) in enumerate(zip(self.actors, chunks)) if chunk]
        results = ray.get(futures)
        seconds = time.perf_counter() - t0
        samples = []
        for chunk, res in zip([c for c in chunks if c], results):
            if res["version"] != self.version:
                raise PrunekitError(f"a rollout actor answered with weights version {res['version']}, "
                                    f"expected {self.version}")
            for j, s in enumerate(res["samples"]):
                samples.append({"row": chunk[j // ro.n], "prompt_ids": self.prompt_ids[chunk[j // ro.n]],
                                "completion_ids": s["completion_ids"], "rollout_logp": s["logprobs"]})
        tokens = sum(len(s["completion_ids"]) for s in samples)
        return samples, {"rollout/seconds": seconds, "rollout/tokens_per_s": tokens / max(seconds, 1e-9)}

    def score(self, samples: list[dict]) -> tuple[list[float], dict]:
        prompts = [self.rows[s["row"]][self.cfg.prompt_column] for s in samples]
        completions = [self.tok.decode(s["completion_ids"], skip_special_tokens=True) for s in samples]
        names = dict.fromkeys(k for s in samples for k in self.rows[s["row"]] if k != self.cfg.prompt_column)
        columns = {k: [self.rows[s["row"]].get(k) for s in samples] for k in names}
        columns["completion_ids"] = [s["completion_ids"] for s in samples]
        totals, per_reward = score(self.rewards, completions, prompts, columns)
        return totals, per_reward

    def learn(self, samples: list[dict], step: int) -> dict:
        import ray
        cfg, algo = self.cfg, self.cfg.algorithm
        g = torch.Generator().manual_seed(cfg.seed + 7919 * step)
        perm = torch.randperm(len(samples), generator=g).tolist()
        shuffled = [samples[i] for i in perm]
        world = cfg.parallel.workers
        minis = _split(shuffled, algo.mini_batches)
        per_rank = [[_split(m, world)[r] for m in minis] for r in range(world)]
        keep = ("prompt_ids", "completion_ids", "advantage", "rollout_logp")
        per_rank = [[[{k: s[k] for k in keep} for s in part] for part in parts] for parts in per_rank]
        outs = ray.get([lr.update.remote(parts) for lr, parts in zip(self.learners, per_rank)])
        total = sum((o["stats"] for o in outs), UpdateStats())
        return {**total.metrics(world), "train/lr": outs[0]["lr"]}

    def checkpoint(self, step: int, metrics: dict, final: bool) -> Path:
        import ray
        paths = ray.get([lr.checkpoint.remote(step, metrics, final) for lr in self.learners])
        return Path(paths[0])

    # ---- the loop ---------------------------------------------------------------------------------------------
    def run(self) -> tuple[Path | None, dict]:
        cfg, ro = self.cfg, self.cfg.rollout
        logger = RLLogger(self.run_dir, self.name, cfg)
        start_step = self.start()
        order = DataOrder(len(self.rows), cfg.seed)
        logger.start(start_step, cfg.max_steps)
        metrics: dict = {}
        last = None
        try:
            for step in range(start_step, cfg.max_steps):
                t0 = time.perf_counter()
                idx = [order.index(p) for p in range(step * cfg.prompts_per_step, (step + 1) * cfg.prompts_per_step)]
                samples, metrics = self.generate(idx, step)
                totals, per_reward = self.score(samples)
                adv = group_advantages(torch.tensor(totals, dtype=torch.float64), ro.n, cfg.algorithm.advantage_scale)
                for s, a in zip(samples, adv.tolist()):
                    s["advantage"] = a
                lengths = [len(s["completion_ids"]) for s in samples]
                t_total = torch.tensor(totals)
                metrics.update(reward_metrics(per_reward))
                metrics.update({"reward/total/mean": t_total.mean().item(), "reward/total/std": t_total.std().item()
                                if len(totals) > 1 else 0.0,
                                "advantage/mean": adv.mean().item(), "advantage/std": adv.std().item(),
                                "advantage/abs_max": adv.abs().max().item(),
                                "advantage/zero_groups": sum(1 for i in range(0, len(totals), ro.n)
                                                             if max(totals[i:i + ro.n]) == min(totals[i:i + ro.n])),
                                "response/length_mean": sum(lengths) / len(lengths),
                                "response/length_max": max(lengths),
                                "response/clipped_frac": sum(n >= ro.max_new_tokens for n in lengths) / len(lengths)})
                metrics.update(self.learn(samples, step))
                done = step + 1
                if done < cfg.max_steps:  # the last update has no rollout left to serve
                    metrics["sync/seconds"] = self.sync(done)
                metrics["time/step_seconds"] = time.perf_counter() - t0
                logger.log(done, metrics)
                if done % cfg.save_interval == 0 or done == cfg.max_steps:
                    last = self.checkpoint(done, metrics, final=done == cfg.max_steps)
        except RewardError:
            raise
        except PrunekitError:
            raise
        except Exception as e:  # noqa: BLE001 - an actor died or raised: one line, with where to look
            from ray.exceptions import RayError
            if isinstance(e, RayError):
                inner = _unwrap(e)
                if isinstance(inner, PrunekitError):
                    raise PrunekitError(str(inner)) from None
                raise PrunekitError(f"rl run {self.name} failed: {_one_line(e)} (checkpoints in {self.run_dir}; "
                                    "re-run the same command to resume)") from e
            raise
        finally:
            logger.finish()
            self.stop()
        return last, metrics
