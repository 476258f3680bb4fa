"""A real `prunekit` process and a real signal: start the CLI in a session of its own, pause it where the signal
should hit, wait, and find every process of its run afterwards (conftest's autouse fixture kills what a failed
test leaves)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from tests.conftest import REPO

STARTED: list = []  # the prunekit processes the current test started


def stop_started() -> None:
    """Kill what the current test started and still runs (its session only), and its Ray temp dir."""
    import shutil
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if getattr(proc, "ray_tmp", None):
            shutil.rmtree(proc.ray_tmp, ignore_errors=True)


def start_cli(argv, tmp_path, patch: str = "", env: dict | None = None):
    """`prunekit ARGV` in a subprocess of its own session, after `patch` (Python run first: a hook that pauses the
    command at the moment a signal should hit it). Returns the Popen (stdout and stderr to files in tmp_path)."""
    script = f"{patch}\nfrom prunekit.cli import entry\nentry({[str(a) for a in argv]!r})\n"
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
                **(env or {})}
    full_env.pop("RAY_ADDRESS", None)
    n = len(list(tmp_path.glob("cli-*.err")))
    with open(tmp_path / f"cli-{n}.out", "w") as out, open(tmp_path / f"cli-{n}.err", "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, env=full_env, start_new_session=True,
                                stdout=out, stderr=err)
    proc.err_path = tmp_path / f"cli-{n}.err"
    STARTED.append(proc)
    return proc


def finish(proc, timeout=180) -> tuple[int, str]:
    """Wait for the process; (exit code, its stderr). A process still running is killed (its session only)."""
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"prunekit did not exit within {timeout}s") from None
    return code, proc.err_path.read_text()


def wait_for(predicate, proc, timeout=240, what="the moment to signal"):
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"prunekit exited ({proc.returncode}) before {what}: "
                                 f"{proc.err_path.read_text()[-3000:]}")
        if time.time() > deadline:
            raise AssertionError(f"no {what} within {timeout}s")
        time.sleep(0.1)


def pause_at(module: str, name: str, ready, call: int = 1) -> str:
    """A patch: the `call`-th call of module.name runs, then touches `ready` and sleeps (the signal comes there)."""
    return (f"import importlib, pathlib, time\n"
            f"_m = importlib.import_module({module!r}); _f = getattr(_m, {name!r}); _n = [0]\n"
            f"def _paused(*a, **k):\n"
            f"    _n[0] += 1\n"
            f"    out = _f(*a, **k)\n"
            f"    if _n[0] == {call}:\n"
            f"        pathlib.Path({str(ready)!r}).touch()\n"
            f"        time.sleep(300)\n"
            f"    return out\n"
            f"setattr(_m, {name!r}, _paused)\n")


def processes_with_marker(marker: str) -> list:
    """Every live process whose environment carries TEST_RUN_MARKER=marker (Ray's processes inherit it, also
    once they are orphaned under PID 1)."""
    import psutil
    found = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.environ().get("TEST_RUN_MARKER") == marker and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:
            continue
    return found


def assert_no_survivors(marker: str, timeout=15.0) -> None:
    deadline = time.time() + timeout
    while (alive := processes_with_marker(marker)) and time.time() < deadline:
        time.sleep(0.5)
    assert not alive, [f"{p.pid} {p.name()} ppid={p.ppid()}" for p in alive]


SIGNALS = {"SIGTERM": (15, 143, "terminated"), "SIGINT": (2, 130, "interrupted")}
