"""Where the loop's metrics and checkpoints go: JSONL + wandb + a progress bar on rank 0, and checkpoints either in
a local run directory (`LocalReporter`) or through Ray Train (`prunekit.distributed.train.RayTrainReporter`)."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

from prunekit.core.loading import owned_temp_dir, sweep_stale_temp_dirs
from prunekit.engine.strategy import world

METRICS_FILE = "metrics.jsonl"
QUIET_BAR_SECONDS = 30   # a bar written to a file or a job log (not a terminal) redraws at most this often


def wandb_mode(mode: str) -> str:
    """`auto` follows wandb's own environment convention first (WANDB_DISABLED, then WANDB_MODE), else online with
    an API key and offline without, and is `disabled` where wandb is not installed (a worker image without it then
    trains instead of failing); any other mode is the config's explicit choice."""
    if mode != "auto":
        return mode
    from prunekit.config import wandb_installed
    if os.environ.get("WANDB_DISABLED", "").strip().lower() in ("1", "true", "yes") or not wandb_installed():
        return "disabled"
    if os.environ.get("WANDB_MODE", "").strip():
        return os.environ["WANDB_MODE"].strip()
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class RunLogger:
    """Rank-0 logging: a JSONL line per logged step, wandb (offline without an API key), and a tqdm bar."""
    progress_bar = True  # off where many runs share one console (knockout trials)
    # off where a run keeps no checkpoints (knockout trials): the loop then never gathers a full state dict to write
    keeps_checkpoints = True
    checkpoint_on_stop = False  # LocalReporter: the first Ctrl-C / SIGTERM stops on a checkpoint (engine.loop)

    def __init__(self, run_dir: Path, run_name: str, cfg):
        self.run_dir, self.run_name, self.cfg = Path(run_dir), run_name, cfg
        self.rank = world()[0]
        self.bar = self.wandb = None
        self.created = time.time()   # before the models and data load, where the caller makes it that early
        self.marks: list[tuple[str, float]] = []   # (what was loaded, when): mark() between created and started
        self.started = None          # when the loop began this attempt (start)

    def mark(self, loaded: str) -> None:
        """`loaded` is done loading now: the attempt's first-step line splits its loading time at these marks."""
        self.marks.append((loaded, time.time()))

    def start(self, start_step: int, total: int) -> None:
        self.started = time.time()
        if self.rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / METRICS_FILE
        if path.exists():  # a resumed run: drop lines logged after the checkpoint it resumes from
            keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= start_step]
            path.write_text("".join(line + "\n" for line in keep))
        mode = wandb_mode(self.cfg.wandb.mode)
        if mode != "disabled":
            import wandb
            self.wandb = wandb.init(project=self.cfg.wandb.project, name=self.run_name, id=self.run_name,
                                    resume="allow", mode=mode, dir=str(self.run_dir),
                                    config=self.cfg.model_dump(mode="json"), reinit="finish_previous")
        if not self.progress_bar:
            return
        from tqdm.auto import tqdm
        # in a log file a bar redrawn per step buries everything else (and a tail of the log keeps only the bar)
        quiet = not sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=start_step, desc=self.run_name, unit="step", dynamic_ncols=True,
                        mininterval=QUIET_BAR_SECONDS if quiet else 0.1)
        self._drawn = 0.0

    def log(self, step: int, metrics: dict) -> None:
        if self.rank != 0:
            return
        now = time.time()
        line = {"step": step, "time": round(now, 3), **metrics}
        if self.started is not None and "train/loss" in metrics:   # an attempt's first step: what its start cost
            bounds = [("", self.created), *self.marks, ("checkpoint and setup", self.started)]
            spans = [(label, end - begin) for (_, begin), (label, end) in zip(bounds, bounds[1:])]
            parts = ", ".join(f"{label} {seconds:.0f}s" for label, seconds in spans)
            self._say(f"{self.run_name}: step {step} done {now - self.created:.0f}s after this attempt began "
                      f"(loading {self.started - self.created:.0f}s: {parts}; then compiling and the first steps "
                      f"{now - self.started:.0f}s)")
            # the same split in the metrics line, for reading an attempt's start back (bench step timings)
            line["attempt_start"] = {"loading_s": round(self.started - self.created, 1),
                                     **{f"{label.replace(' ', '_')}_s": round(s, 1) for label, s in spans},
                                     "compile_and_first_steps_s": round(now - self.started, 1)}
            self.started = None
            if self.bar is not None:   # the rate and ETA count steps from here: loading and compiling are said above
                # (last_print_t too: tqdm's close() skips its last draw and newline for a bar drawn before start_t)
                self.bar.initial, self.bar.start_t, self.bar.last_print_t = step, now, now
        with open(self.run_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps(line) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if self.bar is not None:
            self.bar.n = step
            shown = {k.split("/")[-1] if k.startswith("train/") else k: v for k, v in metrics.items()
                     if k in ("train/loss", "train/token_acc", "eval/loss", "eval/token_acc")}
            self.bar.set_postfix({k: f"{v:.4f}" for k, v in shown.items()}, refresh=False)
            if now - self._drawn >= self.bar.mininterval or step == self.bar.total:
                self.bar.refresh()
                self._drawn = now

    def _say(self, line: str) -> None:
        """A line of progress news, on stdout (stderr holds the bar and errors); runs without a bar stay quiet."""
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()

    def maybe_crash(self, step: int) -> None:
        """Test-only fault injection (PRUNEKIT_TEST_CRASH_AT_STEP), the same for every reporter: see `crash_once`."""
        crash_once(self.run_dir, step)

    def abort(self) -> None:
        """The run stops early: the progress bar's line ends (what is printed next is a line of its own) and the
        wandb run is marked failed."""
        bar, run, self.bar, self.wandb = self.bar, self.wandb, None, None
        if bar is not None:
            bar.close()
        if run is not None:
            with contextlib.suppress(Exception):
                run.finish(exit_code=1)


class LocalReporter(RunLogger):
    """Checkpoints under run_dir/checkpoints/step-N (atomic rename); resumes from the newest."""
    # a run in this process (launcher: local) that gets Ctrl-C or SIGTERM finishes its step and writes a checkpoint
    # before it stops, so a chained or preempted run loses nothing (a second signal stops it at once)
    checkpoint_on_stop = True

    def restore(self) -> Path | None:
        """The newest intact checkpoint (a damaged newer one is skipped with a warning; see engine.manifest)."""
        from prunekit.engine.manifest import newest_intact
        for prefix in (".tmp-", ".old-"):  # a checkpoint a killed (-9) run was writing or replacing
            sweep_stale_temp_dirs(self.run_dir / "checkpoints", prefix)
        ckpts = sorted((self.run_dir / "checkpoints").glob("step-*"), reverse=True)
        return newest_intact(ckpts, self.run_dir, warn=self.rank == 0)

    def checkpoint(self, step: int, metrics: dict, write_fn, all_ranks: bool, final: bool) -> None:
        root = self.run_dir / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        tmp = owned_temp_dir(root, ".tmp-")
        try:
            write_fn(tmp)
        except BaseException:  # an error, Ctrl-C or SIGTERM mid-write: no partial checkpoint stays behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        target = root / f"step-{step:07d}"
        if target.exists():  # a damaged checkpoint of this step, skipped on restore: the new one replaces it
            trash = owned_temp_dir(root, ".old-")
            os.replace(target, trash / target.name)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, target)
        for old in sorted(root.glob("step-*"))[:-2]:  # keep the last two
            shutil.rmtree(old, ignore_errors=True)
        self.last_checkpoint = root / f"step-{step:07d}"


# ---- test-only fault injection -------------------------------------------------------------------------------
# Never part of a config. Tests set these environment variables; the driver hands the ones it sees to its Ray
# workers and trials (`fault_env` there, `apply_fault_env` in the worker), since a Ray instance started earlier
# does not see the driver's later environment.
FAULT_ENV = ("PRUNEKIT_TEST_CRASH_AT_STEP", "PRUNEKIT_TEST_FAIL_CANDIDATES")


def injected_faults() -> tuple[int | None, list[str]]:
    """Test-only: (the step at which the last training rank dies once, see `crash_once`; the sweep trial ids that
    raise). PRUNEKIT_TEST_CRASH_AT_STEP=2, PRUNEKIT_TEST_FAIL_CANDIDATES="text:1;depth" (ids separated by `;`: an id
    may hold commas). Unset: (None, [])."""
    crash = os.environ.get("PRUNEKIT_TEST_CRASH_AT_STEP", "").strip()
    fail = os.environ.get("PRUNEKIT_TEST_FAIL_CANDIDATES", "")
    return (int(crash) if crash else None), [c.strip() for c in fail.split(";") if c.strip()]


def fail_if_injected(candidate_id: str) -> None:
    """Test-only: a sweep trial listed in PRUNEKIT_TEST_FAIL_CANDIDATES raises; `*` there fails every trial with
    the same error (a sweep that would fail throughout)."""
    fail = injected_faults()[1]
    if "*" in fail:
        raise RuntimeError("PRUNEKIT_TEST_FAIL_CANDIDATES: every trial fails on purpose")
    if candidate_id in fail:
        raise RuntimeError(f"PRUNEKIT_TEST_FAIL_CANDIDATES: trial {candidate_id} fails on purpose")


def fault_env() -> dict[str, str]:
    """The fault-injection variables set in this (driver) process, for its workers."""
    return {k: os.environ[k] for k in FAULT_ENV if k in os.environ}


def apply_fault_env(env: dict[str, str]) -> None:
    """In a worker: exactly the driver's fault-injection variables (a reused worker process keeps no earlier ones)."""
    for k in FAULT_ENV:
        if k in env:
            os.environ[k] = env[k]
        else:
            os.environ.pop(k, None)


def crash_once(run_dir: Path, step: int) -> None:
    """Test-only fault injection: the last rank dies the first time it reaches `step`."""
    rank, world_size = world()
    marker = Path(run_dir) / f".crashed-at-step-{step}"
    if rank == world_size - 1 and not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("crashed")
        os._exit(1)


def run_name_for(prefix: str, cfg, exclude) -> str:
    """`cfg.name`, else the stable name of `cfg`'s settings less `exclude` (those that do not change the run)."""
    return cfg.name or stable_name(prefix, cfg.model, settings_dump(cfg, exclude))


def settings_dump(cfg, exclude=None) -> dict:
    """The settings a run name is hashed on and a resumed sweep is compared with: the config's dump in the layout
    it had before `parallel:` (prunekit.config.legacy_layout), so earlier runs keep their names."""
    from prunekit.config import legacy_layout
    return legacy_layout(cfg.model_dump(mode="json", exclude=exclude))


def stable_name(prefix: str, model, settings: dict) -> str:
    """`prefix-<model dir name>-<hash of settings>`: the same settings give the same name, so re-running the same
    command finds its earlier run (training runs, knockout sweeps, width searches)."""
    import hashlib
    import json
    from pathlib import Path
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    return f"{prefix}-{Path(str(model)).name}-{digest}"
