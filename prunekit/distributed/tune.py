"""Ray Tune at the edge of the sweeps (knockout, width-search): one trial per id, the base weights and tokenized data
put into the object store once, per-trial resources (CPUs, a GPU or a fraction of one), max_concurrent_trials,
optional ASHA. What a trial does is the stage's function, handed in (`distributed/` never imports `stages/`).

A trial of several workers (`tune.gpus_per_trial: 2`, or `tune.workers_per_trial` on CPU) runs its function on a
Ray Train worker group launched from inside the Tune trial (`distributed/train.py`'s launcher; torch.distributed over
the workers, NCCL on GPUs and gloo on CPU): the Tune trial itself only waits, and every worker reports through
`ray.train.report`, rank 0's reports reaching Tune (`TuneReportCallback`).

Trials report every few steps through `tune.report`; a driver-side callback keeps each trial's curve and writes
`trials/<candidate>/result.json` the moment the trial ends (`error.json` if it failed), so an interrupted sweep
keeps everything that finished and the next run of the same name starts only the rest.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ray.tune.schedulers import AsyncHyperBandScheduler

from prunekit import PrunekitError
from prunekit.core.interrupts import StopOnSignal, interrupt_for
from prunekit.distributed.cluster import connect
from prunekit.engine.reporting import RunLogger, apply_fault_env, fault_env

# metrics a trial forwards to Tune (names without "/": Tune flattens nested keys on "/")
FORWARD = {"train/loss": "train_loss", "train/token_acc": "train_token_acc", "train/lr": "train_lr",
           "train/tokens_per_s": "train_tokens_per_s", "eval/loss": "eval_loss", "eval/token_acc": "eval_token_acc"}


class KeepOneASHA(AsyncHyperBandScheduler):
    """ASHA over the trials; one of them (a knockout's baseline: every verdict is measured against it) always runs
    to the end."""

    def __init__(self, keep: str | None, **kwargs):
        super().__init__(**kwargs)
        self.keep = keep

    def on_trial_result(self, tune_controller, trial, result):
        if trial.config.get("candidate") == self.keep:
            return self.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)


class TuneTrialReporter(RunLogger):
    """The engine's reporter inside a Tune trial: JSONL + wandb (per trial) locally, and every `log_interval`
    steps (and at every eval) one `tune.report` carrying the train losses of the steps since the last one."""
    progress_bar = False  # many trials share one console

    keeps_checkpoints = False  # trials keep no checkpoints

    def __init__(self, run_dir: Path, run_name: str, cfg, total_steps: int, report):
        super().__init__(run_dir, run_name, cfg)
        self.total = total_steps
        self.report = report  # tune.report in a one-process trial; ray.train.report on a trial's workers (all ranks)
        self.pending_losses: list[list] = []
        self.last_eval: dict = {}

    def restore(self):
        return None  # a trial is short: an interrupted one starts again

    def start(self, start_step: int, total: int) -> None:
        if self.rank == 0:
            (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)  # an earlier, unfinished attempt's lines
        super().start(start_step, total)

    def log(self, step: int, metrics: dict) -> None:
        super().log(step, metrics)
        if "train/loss" in metrics:
            self.pending_losses.append([step, metrics["train/loss"]])
        fresh_eval = "eval/loss" in metrics
        if fresh_eval:
            self.last_eval = {FORWARD[k]: metrics[k] for k in ("eval/loss", "eval/token_acc")}
        if fresh_eval or step % self.cfg.log_interval == 0 or step == self.total:
            out = {"step": step, "fresh_eval": fresh_eval, "train_losses": self.pending_losses, **self.last_eval}
            out.update({FORWARD[k]: v for k, v in metrics.items() if k in FORWARD and not k.startswith("eval/")})
            self.report(out)
            self.pending_losses = []

    def finish(self) -> None:
        used_wandb = self.wandb is not None
        super().finish()
        if used_wandb:  # stop wandb's service now: Ray ends trial processes abruptly, which it reports noisily
            import wandb
            wandb.teardown()


class _StopOnSignal(StopOnSignal):
    """Ctrl-C (SIGINT) or SIGTERM during a sweep: Tune stops every trial, then the driver reports the sweep as
    interrupted (exit 130) or terminated (143) instead of finishing it. Tune's own SIGINT handler would end the run
    as if it had completed; it is switched off while this one is installed. A second signal interrupts at once."""

    def __init__(self):
        from ray import tune
        super().__init__()
        self.also_stop_when = lambda: False   # another reason to stop every trial (the bookkeeper's)

        class _Stopper(tune.Stopper):
            def __call__(st, trial_id, result):
                return False

            def stop_all(st):
                return self.signum is not None or self.also_stop_when()
        self.stopper = _Stopper()

    def __enter__(self):
        self._env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        return super().__enter__()

    def __exit__(self, *exc):
        if self._env is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = self._env
        return super().__exit__(*exc)


class SweepBookkeeper:
    """Driver-side Tune callback: collect each trial's reports; on completion write its result.json atomically."""

    def __init__(self, run_dir: Path, total_steps: int, dir_fn, expected: int = 0):
        from ray import tune

        class _Callback(tune.Callback):
            def on_trial_result(cb, iteration, trials, trial, result, **info):
                self._result(trial, result)

            def on_trial_complete(cb, iteration, trials, trial, **info):
                self._complete(trial)

            def on_trial_error(cb, iteration, trials, trial, **info):
                self._error(trial)
        self.callback = _Callback()
        self.run_dir, self.total = run_dir, total_steps
        self.records: dict[str, list[dict]] = {}
        self.ran: list[str] = []
        self.errors: dict[str, str] = {}
        self.lost: list[str] = []      # failed because their worker process died (not because their code raised)
        self.expected = expected       # trials this run starts
        self.systemic: str | None = None   # the error every trial so far failed with: the sweep stops
        self.stopping = lambda: False  # an interrupted sweep: trials Tune stops are not finished
        self.dir_fn = dir_fn           # (run_dir, trial id) -> the trial's directory

    def _dir(self, cid: str) -> Path:
        d = self.dir_fn(self.run_dir, cid)
        d.mkdir(parents=True, exist_ok=True)
        return d

    def _result(self, trial, result: dict) -> None:
        self.records.setdefault(trial.config["candidate"], []).append(
            {k: result[k] for k in ("step", "fresh_eval", "train_losses", "eval_loss", "eval_token_acc", "final",
                                    "fetch_s", "setup_s", "train_s", "trial_s", "extra_json")
             if k in result})

    def _complete(self, trial) -> None:
        cid = trial.config["candidate"]
        records = self.records.get(cid, [])
        train_loss = {str(s): v for r in records for s, v in r.get("train_losses", [])}
        evals = {str(r["step"]): {"eval/loss": r["eval_loss"], "eval/token_acc": r["eval_token_acc"]}
                 for r in records if r.get("fresh_eval")}
        final_rec = next((r for r in records if r.get("final")), None)
        last_step = max([r["step"] for r in records if not r.get("final")] or [0])
        last_eval = evals[max(evals, key=int)] if evals else {}
        last_train = train_loss[max(train_loss, key=int)] if train_loss else None
        if not final_rec and last_step < self.total and self.stopping():
            return  # stopped by an interrupt, not by ASHA: it stays pending and runs again next time
        status = "done" if final_rec or last_step >= self.total else "stopped_early"  # ASHA stops trials early
        result = {"candidate": cid, "status": status, "steps": last_step,
                  "final": {**last_eval, "train/loss": last_train}, "step0": evals.get("0", {}),
                  "train_loss": train_loss, "eval": evals,
                  "timing": {k: final_rec[k] for k in ("fetch_s", "setup_s", "train_s", "trial_s")} if final_rec else {}}
        if final_rec and "extra_json" in final_rec:   # what a generic trial returned (run_trials)
            result["extra"] = json.loads(final_rec["extra_json"])
        d = self._dir(cid)
        tmp = d / f".{cid.replace(':', '_')}.tmp"
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, d / "result.json")
        (d / "error.json").unlink(missing_ok=True)
        self.ran.append(cid)

    def _error(self, trial) -> None:
        cid = trial.config["candidate"]
        message = _trial_error(trial)
        (self._dir(cid) / "error.json").write_text(json.dumps({"candidate": cid, "error": message}, indent=2) + "\n")
        self.errors[cid] = message
        self.ran.append(cid)
        if _worker_died(trial):
            self.lost.append(cid)
        # the first trials to end all raised the same error (a package missing from the worker image, every trial
        # out of memory): the rest would too, so stop now rather than after the whole sweep
        raised = {c: m for c, m in self.errors.items() if c not in self.lost}
        none_finished = len(self.ran) == len(self.errors)
        if none_finished and len(raised) >= min(SYSTEMIC_AFTER, self.expected) and len(set(raised.values())) == 1:
            self.systemic = message

    def forget(self, ids: list[str]) -> None:
        """Trials about to run again: their failure no longer counts."""
        for cid in ids:
            self.errors.pop(cid, None)
        self.ran = [c for c in self.ran if c not in ids]
        self.lost = [c for c in self.lost if c not in ids]


def _worker_died(trial) -> bool:
    """The trial's process died (a segfault, the OOM killer, a lost node) instead of its code raising an error."""
    import cloudpickle
    from ray.exceptions import RayActorError
    try:   # the trial's local copy: the one in its storage path is synced later
        return isinstance(cloudpickle.loads(Path(trial.pickled_error_file).read_bytes()), RayActorError)
    except Exception:  # noqa: BLE001 - no pickled error, or one that does not load: not known to be a death
        return False


def _trial_error(trial) -> str:
    """The last line of the trial's exception (its traceback stays in Tune's trial directory)."""
    text = ""
    for attr in ("error_file", "pickled_error_file"):
        path = getattr(trial, attr, None)
        if path and attr == "error_file" and Path(path).is_file():
            text = Path(path).read_text()
            break
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "trial failed (see the Tune trial directory)"


# ---- the trials ----------------------------------------------------------------------------------------------

SYSTEMIC_AFTER = 3   # when the first trials to end, this many, all raised the same error, the sweep stops
HEAD_CPUS = 0.01  # what the Tune trial of a worker group holds itself: it only waits (Tune needs a non-empty bundle)
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


def _trial(config: dict, shared: list, trial_fn, dir_fn, load_cfg) -> None:
    """A Tune trial: pull the shared payload, run the stage's `trial_fn` with the engine's Tune reporter, in this
    process or on the trial's worker group."""
    import ray
    from ray import tune
    job = {"candidate": config["candidate"], "shared": shared, "trial_fn": trial_fn, "dir_fn": dir_fn,
           "load_cfg": load_cfg, "t0": time.time()}
    cfg = load_cfg(ray.get(shared[0])["cfg"])
    if cfg.tune.workers == 1:
        _trial_body(job, tune.report, cfg.tune.gpus_per_trial > 0)
        return
    from ray.tune.integration.ray_train import TuneReportCallback
    from prunekit.distributed.train import run_worker_group
    # the worker group waits for its resources while other trials (and the importance task) hold them
    os.environ.setdefault(START_TIMEOUT_ENV, str(24 * 3600))
    run_worker_group(_trial_worker, {**job, "use_gpu": cfg.tune.gpus_per_trial > 0}, num_workers=cfg.tune.workers,
                     use_gpu=cfg.tune.gpus_per_trial > 0, cpus_per_worker=cfg.tune.cpus_per_trial, name="workers",
                     storage_path=Path(tune.get_context().get_trial_dir()), callbacks=[TuneReportCallback()])


def _trial_worker(job: dict) -> None:
    """One worker of a trial's worker group (torch.distributed is set up): the same trial body, every rank
    reporting through ray.train.report."""
    import ray.train
    _trial_body(job, ray.train.report, job["use_gpu"])


def _trial_body(job: dict, report, use_gpu: bool) -> None:
    import ray
    import torch
    payload = ray.get(job["shared"][0])
    apply_fault_env(payload.get("fault_env", {}))
    cfg = job["load_cfg"](payload["cfg"])
    cid = job["candidate"]
    torch.set_num_threads(max(1, int(cfg.tune.cpus_per_trial)))
    device = torch.device("cpu")
    if use_gpu:
        device = ray.train.torch.get_device() if cfg.tune.workers > 1 else torch.device("cuda", 0)
        torch.cuda.set_device(device)
    base = ray.get(payload["base"])
    run_dir = job["dir_fn"](Path(payload["run_dir"]), cid)
    run_dir.mkdir(parents=True, exist_ok=True)
    reporter = TuneTrialReporter(run_dir, f"{payload['name']}-{run_dir.name}", cfg, cfg.max_steps, report)
    fetched = time.time()
    out = job["trial_fn"](cfg, base, payload, cid, reporter, device)
    t0 = job["t0"]
    report({"step": cfg.max_steps, "final": True, "fresh_eval": False, "train_losses": [],
            **reporter.last_eval, "fetch_s": fetched - t0, "setup_s": out.pop("setup_s", 0.0),
            "train_s": out.pop("train_s", 0.0), "trial_s": time.time() - t0, "extra_json": json.dumps(out)})


@dataclass
class TrialsResult:
    ran: list[str]                 # trial ids that finished (done, stopped early, or failed) in this run
    errors: dict[str, str]         # trial id -> the last line of its error
    side: object = None            # what `side_fn` returned (None: not run, or failed: see errors["side"])


def run_trials(cfg, run_dir: Path, name: str, ids: list[str], base: dict, payload: dict, *, trial_fn, dir_fn,
               load_cfg, keep_running: str | None = None, side_fn=None,
               interrupted_message=None) -> TrialsResult:
    """Run one Tune trial per id in `ids` (cfg.tune resources, cfg.max_steps): `trial_fn(cfg, base, payload, id,
    reporter, device)` trains through the engine with the given reporter and returns a JSON-able dict, kept in the
    trial's result.json as `extra`; `dir_fn(run_dir, id)` is the trial's directory; `load_cfg(dict)` rebuilds the
    config inside the trial. `base` goes into the object store once. With cfg.tune.asha, ASHA stops trials early on
    eval loss, never `keep_running` (the trial every other one is compared with). `side_fn(payload, base, device)`
    runs as one more Ray task beside the trials (its result: TrialsResult.side). The functions are the stage's:
    module-level, so Ray ships them by reference. Ctrl-C / SIGTERM stops every trial and raises the interrupt with
    `interrupted_message()` (finished trials stay)."""
    import ray
    from ray import tune
    connect(cfg.ray.address)
    base_ref = ray.put(base)
    payload_ref = ray.put({**payload, "base": base_ref, "cfg": cfg.model_dump(mode="json"), "run_dir": str(run_dir),
                           "name": name, "fault_env": fault_env()})
    use_gpu = cfg.tune.gpus_per_trial > 0
    side_ref = None
    if side_fn is not None:  # one process (one GPU at most, whatever a trial spans)
        task = ray.remote(num_cpus=cfg.tune.cpus_per_trial, num_gpus=min(1, cfg.tune.gpus_per_trial))(_side_task)
        side_ref = task.remote([payload_ref], side_fn, use_gpu)
    book = SweepBookkeeper(run_dir, cfg.max_steps, dir_fn=dir_fn, expected=len(ids))
    interrupt = _StopOnSignal()
    book.stopping = lambda: interrupt.signum is not None or book.systemic is not None
    interrupt.also_stop_when = lambda: book.systemic is not None
    if ids:
        resources = {"cpu": cfg.tune.cpus_per_trial, "gpu": cfg.tune.gpus_per_trial}
        concurrent = cfg.tune.max_concurrent_trials
        if cfg.tune.workers > 1:  # the worker group holds the resources; as many trials as their groups fit
            resources = {"cpu": HEAD_CPUS}
            concurrent = concurrent or _groups_that_fit(cfg.tune)
        trainable = tune.with_resources(tune.with_parameters(_trial, shared=[payload_ref], trial_fn=trial_fn,
                                                             dir_fn=dir_fn, load_cfg=load_cfg), resources)
        tune_root = run_dir / "tune"
        attempt = len(list(tune_root.glob("attempt-*"))) if tune_root.is_dir() else 0

        def fit(trial_ids: list[str], attempt: int) -> None:
            scheduler = None
            if getattr(cfg.tune, "asha", False):
                scheduler = KeepOneASHA(keep_running, time_attr="step", metric="eval_loss", mode="min",
                                        max_t=cfg.max_steps, grace_period=cfg.tune.asha_grace_steps,
                                        reduction_factor=cfg.tune.asha_reduction_factor, stop_last_trials=False)
            tuner = tune.Tuner(
                trainable,
                param_space={"candidate": tune.grid_search(list(trial_ids))},
                tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=concurrent,
                                            reuse_actors=use_gpu if cfg.tune.reuse_actors is None
                                            else cfg.tune.reuse_actors),
                run_config=tune.RunConfig(name=f"attempt-{attempt}", storage_path=str(tune_root),
                                          callbacks=[book.callback], verbose=0, stop=interrupt.stopper,
                                          failure_config=tune.FailureConfig(max_failures=0)),
            )
            with interrupt:
                tuner.fit()
        fit(ids, attempt)
        # A trial whose process died (on an H200 two of 17 knockout trials segfaulted inside ray.get of the shared
        # weights, in both rounds of a pipeline) runs once more in a fresh process; one whose code raised does not
        lost = list(book.lost)
        if lost and interrupt.signum is None and book.systemic is None:
            print(f"{len(lost)} trial(s) lost their worker process ({', '.join(lost)}: "
                  f"{book.errors[lost[0]][:160]}); running them once more", flush=True)
            book.forget(lost)
            fit(lost, attempt + 1)
    if interrupt.signum is not None or book.systemic is not None:
        if side_ref is not None:
            with contextlib.suppress(Exception):
                ray.cancel(side_ref, force=True)
    if book.systemic is not None:
        raise PrunekitError(f"the first {len(book.errors)} trials all failed the same way, so the sweep stopped "
                            f"(re-run the same command once it is fixed): {book.systemic}")
    if interrupt.signum is not None:
        done = sum((dir_fn(run_dir, i) / "result.json").is_file() for i in ids)
        message = interrupted_message() if interrupted_message else (
            f"{done} of {len(ids)} trials of this run finished, kept in {run_dir}; no report written from a "
            f"partial run (re-run the same command to run the rest)")
        raise interrupt_for(interrupt.signum, message)
    side = None
    if side_ref is not None:
        try:
            side = ray.get(side_ref)
        except Exception as e:  # a side task is a bonus beside the trials: report it, do not fail them
            book.errors["side"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    del base_ref, payload_ref
    return TrialsResult(book.ran, book.errors, side)


def _groups_that_fit(t) -> int:
    """Trials of `t.workers` workers whose worker groups the cluster holds at once (at least 1: an autoscaling
    cluster may not show its GPUs yet). A local instance this process started never grows: one group that cannot
    fit there would wait forever, so that is a one-line error instead."""
    import ray
    from prunekit.distributed import cluster
    total = ray.cluster_resources()
    kind, have, need = (("GPU", total.get("GPU", 0), t.workers) if t.gpus_per_trial > 0 else
                        ("CPU", total.get("CPU", 0), t.workers * t.cpus_per_trial + HEAD_CPUS))
    if have < need and cluster.started_locally():
        raise PrunekitError(f"tune: a trial of {t.workers} workers needs {need:g} {kind}s at once; the local Ray "
                            f"instance has {have:g} (lower tune.cpus_per_trial or the workers per trial)")
    return max(1, int(have // need))


def _side_task(shared: list, side_fn, use_gpu: bool):
    import ray
    import torch
    payload = ray.get(shared[0])
    return side_fn(payload, ray.get(payload["base"]), torch.device("cuda", 0) if use_gpu else torch.device("cpu"))
