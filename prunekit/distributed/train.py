"""Ray Train at the edge: launch the one training loop on N workers (DDP / FSDP2 / DeepSpeed), with checkpoints in
RunConfig(storage_path, name), FailureConfig restarts, and resume when the same name runs again."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from prunekit import PrunekitError
from prunekit.core.loading import owned_temp_dir, sweep_stale_temp_dirs
from prunekit.engine.reporting import RunLogger, apply_fault_env, fault_env, run_name_for


class RayTrainReporter(RunLogger):
    def restore(self) -> Path | None:
        import ray.train
        from prunekit.engine.manifest import newest_intact
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        latest = local_checkpoint_dir(ckpt)
        # Ray resumes from the last reported checkpoint; a damaged one falls back to the newest intact sibling
        older = sorted((d for d in latest.parent.glob("checkpoint_*") if d.is_dir() and d != latest
                        and (d / "metrics.json").is_file()), key=_checkpoint_step, reverse=True)
        if not latest.resolve().is_relative_to(self.run_dir.resolve()):
            older = []  # a download from remote storage: no siblings to fall back to
        return newest_intact([latest] + older, self.run_dir, warn=self.rank == 0)

    def checkpoint(self, step: int, metrics: dict, write_fn, all_ranks: bool, final: bool) -> None:
        import ray.train
        # a worker killed mid-write (the run stopped, a node lost) leaves its temp copy: the next one sweeps it
        sweep_stale_temp_dirs(Path(tempfile.gettempdir()), CKPT_TMP)
        tmp = owned_temp_dir(Path(tempfile.gettempdir()), CKPT_TMP)
        try:
            write_fn(tmp)
            has_files = any(tmp.iterdir())
            ckpt = ray.train.Checkpoint.from_directory(tmp) if has_files and (all_ranks or self.rank == 0) else None
            ray.train.report({"step": step, **{k.replace("/", "_"): v for k, v in metrics.items()}},
                             checkpoint=ckpt)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _checkpoint_step(ckpt_dir: Path) -> int:
    try:
        return int(json.loads((ckpt_dir / "metrics.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def run_name(stage: str, cfg) -> str:
    """Default run name: stable for the same stage + config, so re-running the same command resumes."""
    return run_name_for(stage, cfg, {"name", "overwrite"})


def _worker(config: dict) -> None:
    """Runs on every Ray Train worker: the stage's `build` (model, objective, samples, pad id), then the shared
    loop. `build` is the stage's module-level function: Ray ships it by reference, so this module never imports the
    stages."""
    import torch
    import ray.train
    from prunekit.config import STAGE_CONFIGS
    from prunekit.engine.loop import train
    build_worker = config["build"]
    apply_fault_env(config.get("fault_env", {}))
    cfg = STAGE_CONFIGS[config["stage"]](**config["cfg"])
    device = ray.train.torch.get_device() if cfg.ray.use_gpu else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    teacher_device = None
    if getattr(cfg, "teacher_placement", "same_gpu") == "own_gpu":  # the worker holds 2 GPUs: the teacher takes the 2nd
        teacher_device = ray.train.torch.get_devices()[1]
    reporter = RayTrainReporter(Path(config["run_dir"]), config["name"], cfg)   # first: it times the loading
    model, objective, train_samples, val_samples, pad_id = build_worker(config["stage"], cfg, device, teacher_device,
                                                                        mark=reporter.mark)
    train(model, objective, cfg, train_samples, val_samples, pad_id, reporter, device=device)


CKPT_TMP = "prunekit-ckpt-"


def _trainer_class():
    """TorchTrainer whose Ctrl-C / SIGTERM handling is prunekit's: the first signal aborts the run's controller
    (which stops the workers) and fit returns; `launch` then raises the interrupt. (Ray Train's own handler
    handles SIGINT only and ends the driver with sys.exit.)"""
    from ray.train.torch import TorchTrainer

    class Trainer(TorchTrainer):
        stop = None  # a StopOnSignal, set by launch

        def _register_sigint_handler(self, controller):
            self.stop.on_stop = lambda: controller.abort.remote()
            self.stop.arm()
    return Trainer


def torch_trainer(worker_fn, loop_config: dict, *, num_workers: int, use_gpu: bool, cpus_per_worker: float,
                  gpus_per_worker: float, run_config, trainer_class=None):
    """The Ray Train TorchTrainer every prunekit worker group runs in (a training stage's workers, a knockout
    trial's): `worker_fn(loop_config)` on `num_workers` workers, torch.distributed set up over them (NCCL on GPUs,
    gloo on CPU)."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    resources = {"CPU": cpus_per_worker}
    if use_gpu:
        resources["GPU"] = gpus_per_worker
    return (trainer_class or TorchTrainer)(
        worker_fn, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"), run_config=run_config)


STATE_API_ENV = "RAY_API_SERVER_ADDRESS"
NOWHERE = "http://127.0.0.1:1"  # no State API answers here: Ray's own clients then fail, and say so


def own_state_api() -> str:
    """This cluster's State API (its dashboard's HTTP server), when one runs: the address this cluster's GCS
    records for its dashboard, used only when the server there says (asked with this cluster's token when Ray's
    token authentication is on) that it serves this cluster's session. A cluster started without the dashboard's
    HTTP server still records the default port, where another Ray instance on the host may listen. Else
    `NOWHERE`."""
    import ray
    import requests
    from ray._private import ray_constants
    from ray.experimental import internal_kv
    with contextlib.suppress(Exception):  # no address recorded, nothing answering, not a dashboard: no State API
        from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled
        address = internal_kv._internal_kv_get(ray_constants.DASHBOARD_ADDRESS,
                                               namespace=ray_constants.KV_NAMESPACE_DASHBOARD).decode()
        url = f"http://{address}"
        reply = requests.get(f"{url}/api/version", timeout=5, headers=get_auth_headers_if_auth_enabled({}))
        session = reply.json().get("session_name")
        if session == ray._private.worker.global_worker.node.session_name:
            return url
    return NOWHERE


@contextlib.contextmanager
def controller_knows_cluster():
    """While a fit starts its controller: RAY_API_SERVER_ADDRESS names this cluster's State API (`own_state_api`)
    and travels to the controller with Ray Train's own environment variables. The controller starts a detached
    placement-group cleaner that asks the State API whether the controller still lives; left to itself it finds
    one from RAY_ADDRESS, else from the last Ray instance started on the host: on a host running several instances
    it would ask another one, not find this run's controller there, and remove the live run's placement group (its
    workers die mid-run). Without a State API of its own the cleaner only warns."""
    from ray.train.v2._internal import constants
    constants.ENV_VARS_TO_PROPAGATE.add(STATE_API_ENV)
    before = os.environ.get(STATE_API_ENV)
    if not before:
        os.environ[STATE_API_ENV] = own_state_api()
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(STATE_API_ENV, None)
        else:
            os.environ[STATE_API_ENV] = before


def run_worker_group(worker_fn, loop_config: dict, *, num_workers: int, use_gpu: bool, cpus_per_worker: float,
                     name: str, storage_path: Path, callbacks=()) -> None:
    """Run `worker_fn(loop_config)` on `num_workers` workers (one GPU each on GPUs) and wait for them: no
    checkpoints, no restarts (a knockout trial spanning several GPUs, inside its Tune trial). A failed worker
    raises RuntimeError with one line naming its own cause."""
    from ray.train import FailureConfig, RunConfig
    trainer = torch_trainer(worker_fn, loop_config, num_workers=num_workers, use_gpu=use_gpu,
                            cpus_per_worker=cpus_per_worker, gpus_per_worker=1,
                            run_config=RunConfig(name=name, storage_path=str(storage_path), callbacks=list(callbacks),
                                                 failure_config=FailureConfig(max_failures=0)))
    try:
        with controller_knows_cluster():
            result = trainer.fit()
        error = result.error
    except Exception as e:  # Ray Train >= 2.50 raises WorkerGroupError / ControllerError from fit()
        error = e
    if error is not None:
        raise RuntimeError(failure_cause(error).removeprefix(PRUNEKIT_CAUSE)) from None


def remove_partial_checkpoints(run_dir: Path, since: float) -> None:
    """After an interrupted fit: checkpoint directories this fit created that are not whole (a worker stopped while
    uploading one: no manifest yet, or a file short or missing). Older checkpoints are never touched."""
    from prunekit.engine.manifest import MANIFEST, checkpoint_problem
    for d in Path(run_dir).glob("checkpoint_*"):
        try:
            fresh = d.is_dir() and d.stat().st_mtime >= since
        except OSError:
            continue
        if fresh and (not (d / MANIFEST).is_file() or checkpoint_problem(d) is not None):
            shutil.rmtree(d, ignore_errors=True)


def launch(stage: str, cfg, build_worker) -> tuple[Path, Path, str]:
    """Fit on Ray Train, every worker starting with `build_worker(stage, cfg, device, teacher_device)` (the stage's
    model, objective, train/val samples and pad id); returns (final checkpoint dir with hf/, run dir, run name)."""
    import time
    from prunekit.core.interrupts import StopOnSignal, interrupt_for
    from prunekit.distributed.cluster import connect, quiet_ray, stop_local
    connect(cfg.ray.address)
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    name = run_name(stage, cfg)
    storage = Path(cfg.storage_path).resolve()
    run_dir = storage / name
    trainer = torch_trainer(
        _worker, {"stage": stage, "cfg": cfg.model_dump(mode="json"), "run_dir": str(run_dir), "name": name,
                  "build": build_worker, "fault_env": fault_env()},
        num_workers=cfg.parallel.workers, use_gpu=cfg.ray.use_gpu, cpus_per_worker=cfg.ray.cpus_per_worker,
        gpus_per_worker=cfg.ray.gpus_per_worker, trainer_class=_trainer_class(),
        run_config=RunConfig(name=name, storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)))
    trainer.stop = StopOnSignal()  # armed once the controller exists (see _trainer_class)
    started = time.time() - 1  # directory mtimes may be a little coarse
    try:
        try:
            with controller_knows_cluster():
                result = trainer.fit()
            error = result.error
        except (KeyboardInterrupt, PrunekitError):
            raise
        except Exception as e:  # Ray Train >= 2.50 raises WorkerGroupError / ControllerError from fit()
            error = e
        finally:
            trainer.stop.disarm()
        if trainer.stop.signum is not None:  # the controller was aborted: fit returned or raised meanwhile
            raise interrupt_for(trainer.stop.signum)
    except KeyboardInterrupt:  # the workers stop with the local instance, or with the aborted controller
        stop_local()
        remove_partial_checkpoints(run_dir, started)
        sweep_stale_temp_dirs(Path(tempfile.gettempdir()), CKPT_TMP)  # this node's workers' copies being written
        raise
    if error is not None:
        quiet_ray()  # the one line below says it; the workers' tracebacks are in the run's logs
        cause = failure_cause(error)
        hint = "" if cause.startswith(PRUNEKIT_CAUSE) else \
            f" (logs and checkpoints in {run_dir}; re-run the same command to resume)"
        raise PrunekitError(f"{stage} run {name} failed: {cause.removeprefix(PRUNEKIT_CAUSE)}{hint}") from None
    if result.checkpoint is None:
        raise PrunekitError(f"{stage} run {name} finished without a checkpoint")
    return local_checkpoint_dir(result.checkpoint), run_dir, name


PRUNEKIT_CAUSE = "\0prunekit:"  # marks a cause that is a PrunekitError (its message already says what to do)


def failure_cause(error: BaseException) -> str:
    """One line naming what went wrong in a failed fit: the first failed worker's own exception (unwrapped from
    Ray's task-error and worker-group wrappers), a PrunekitError's message as it is."""
    failures = getattr(error, "worker_failures", None)
    if failures:
        error = failures[min(failures)]
    elif isinstance(getattr(error, "controller_failure", None), BaseException):
        error = error.controller_failure
    for _ in range(8):  # RayTaskError(cause=...) and friends
        cause = getattr(error, "cause", None)
        if not isinstance(cause, BaseException) or cause is error:
            break
        error = cause
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if isinstance(error, PrunekitError):  # says itself what to do
        return PRUNEKIT_CAUSE + (lines[0] if lines else type(error).__name__)
    text = next((line for line in lines if not line.startswith(("Traceback", "File ", "^", "~"))), "")
    return f"{type(error).__name__}: {text[:300]}" if text else type(error).__name__


def local_checkpoint_dir(ckpt) -> Path:
    """The checkpoint's own directory when it is on a local or shared filesystem (no copy: a checkpoint holds
    gigabytes); a download into a temp dir only for remote storage (s3://, gs://)."""
    import pyarrow.fs
    if isinstance(ckpt.filesystem, pyarrow.fs.LocalFileSystem) and Path(ckpt.path).is_dir():
        return Path(ckpt.path)
    return Path(ckpt.to_directory(tempfile.mkdtemp(prefix="prunekit-ckpt-")))
