"""Recipe: `data generate` — a teacher-sampled corpus, in this process (`actors=0`) or on N Ray rollout actors
spread over the cluster's GPUs (CPUs where it has none). The sampling, files, resume and statistics are
`prunekit.rl.corpus.generate_corpus`; this stage only adds the actor pool."""
from __future__ import annotations

import time
from pathlib import Path

from prunekit import PrunekitError


class RayActorPool:
    """`generate_corpus`'s pool interface on `RolloutActor`s: every actor always has one job in flight; results
    are written in the order they come back (ids, not file order, say which sample a row is)."""

    def __init__(self, actors: int, address: str | None = None):
        self.count, self.address = actors, address
        self.actors = []

    def resolve_device(self, device: str) -> str:
        import ray
        from prunekit.distributed.cluster import connect
        connect(self.address)
        gpus = ray.cluster_resources().get("GPU", 0)
        if device == "auto":
            device = "cuda" if gpus else "cpu"
        if device == "cuda" and gpus < self.count:
            raise PrunekitError(f"--actors {self.count}: the cluster has {gpus:g} GPU(s), one actor needs one")
        if device == "cpu" and ray.cluster_resources().get("CPU", 0) < self.count:
            raise PrunekitError(f"--actors {self.count}: the cluster has fewer CPUs than actors")
        return device

    def start(self, backend: str, model_dir: Path, device: str, **kw) -> "RayActorPool":
        import ray
        from prunekit.rl.rollout import RolloutActor
        gpu = device == "cuda"
        cls = ray.remote(num_cpus=1, num_gpus=1 if gpu else 0)(RolloutActor)
        self.actors = [cls.remote(backend, str(model_dir), device=device, threads=None if gpu else 1, **kw)
                       for _ in range(self.count)]
        try:
            info = ray.get([a.info.remote() for a in self.actors])
        except Exception as e:  # noqa: BLE001 - an actor failed to build its backend: one line
            self.close()
            raise PrunekitError(f"rollout actors did not start: {_one_line(e)}") from None
        self.backend_name, self.workers = info[0]["backend"], len(self.actors)
        return self

    def run(self, next_job, on_result) -> None:
        import ray
        free, inflight = list(self.actors), {}
        while True:
            while free and (job := next_job()) is not None:
                actor = free.pop()
                inflight[actor.generate.remote(job.prompt_ids, job.sampling, 0)] = (actor, job)
            if not inflight:
                return
            done, _ = ray.wait(list(inflight), num_returns=1)
            actor, job = inflight.pop(done[0])
            free.append(actor)
            try:
                result = ray.get(done[0])
            except Exception as e:  # noqa: BLE001
                raise PrunekitError(f"a rollout actor failed: {_one_line(e)} (re-run the same command to resume)") \
                    from None
            on_result(job, result["samples"])

    def close(self) -> None:
        import ray
        for a in self.actors:
            try:
                ray.get(a.close.remote(), timeout=60)
            except Exception:  # noqa: BLE001 - already gone
                pass
            ray.kill(a)
        self.actors = []


def _one_line(e: Exception) -> str:
    from prunekit.rl.driver import _one_line as one_line
    return one_line(e)


def generate(teacher, out, actors: int = 0, address: str | None = None, **kw) -> dict:
    """`prunekit data generate`: see `generate_corpus` for the arguments; `actors` > 0 runs on Ray."""
    from prunekit.rl.corpus import generate_corpus
    if isinstance(actors, bool) or not isinstance(actors, int) or actors < 0:
        raise PrunekitError(f"--actors {actors}: must be 0 (this process) or a positive number of Ray actors")
    t0 = time.perf_counter()
    stats = generate_corpus(teacher, out, pool=RayActorPool(actors, address) if actors else None, **kw)
    stats["wall_seconds"] = round(time.perf_counter() - t0, 2)
    return stats
