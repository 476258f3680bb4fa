"""One writer at a time per run directory and per output directory.

`with hold((path, what), ...):` takes an advisory lock (flock) on `.NAME.lock` beside each path for the duration; a
second prunekit process that wants the same path fails at once with one line naming the holder (command, pid, host). The kernel
drops the lock when its process dies however it dies, so a lock file left by a dead process is simply taken over;
where the filesystem has no flock, the pid recorded in the file decides (a dead pid on this host is taken over).
Locks are re-entrant within a process (a pipeline running its stages in-process)."""
from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import json
import os
import socket
from pathlib import Path

from prunekit import PrunekitError

_held: dict[str, list] = {}  # lock file -> [fd, depth, dirs created for it]
command = "prunekit"  # what a holder is said to be running (the CLI sets "prunekit sft", ...)


def lock_file(path: Path) -> Path:
    path = Path(path).expanduser().resolve()
    return path.parent / f".{path.name}.lock"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return json.loads(os.read(fd, 4096).decode() or "{}")
    except (OSError, ValueError):
        return {}


def _describe(h: dict) -> str:
    if not h.get("pid"):
        return "another prunekit process"
    return f"{h.get('command') or 'prunekit'} (pid {h['pid']} on host {h.get('host', '?')}, since {h.get('since')})"


def acquire(path: Path, what: str) -> None:
    """Lock `path` (a run directory or an output) for this process; raises PrunekitError naming the holder."""
    path = Path(path).expanduser().resolve()
    lock = lock_file(path)
    key = str(lock)
    if key in _held:
        _held[key][1] += 1
        return
    created = [p for p in reversed(lock.parents) if not p.exists()]
    while True:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            _remove_dirs(created)
            raise PrunekitError(f"{what} {path}: cannot take its lock ({e.strerror or type(e).__name__}: "
                                f"{lock})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _holder(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) or (
                    holder.get("pid") and holder.get("pid") != os.getpid()
                    and (holder.get("host") != socket.gethostname() or pid_alive(holder["pid"]))):
                os.close(fd)
                _remove_dirs(created)
                raise PrunekitError(f"{what} {path}: in use by {_describe(holder)}; wait for it to finish or stop "
                                    f"it") from None
            # no flock on this filesystem and the recorded holder is gone (or none): take it over
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed the file between our open and lock: lock the new one
    record = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
              "since": _dt.datetime.now().isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    _held[key] = [fd, 1, created]


def release(path: Path) -> None:
    key = str(lock_file(path))
    entry = _held.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] > 0:
        return
    del _held[key]
    with contextlib.suppress(OSError):
        os.unlink(key)  # while still holding it: a waiting process then locks a fresh file, never this one
    os.close(entry[0])
    _remove_dirs(entry[2])


def _remove_dirs(created: list[Path]) -> None:
    for d in reversed(created):  # parents made only for the lock, if nothing else went there
        with contextlib.suppress(OSError):
            d.rmdir()


@contextlib.contextmanager
def hold(*targets: tuple[Path, str]):
    """`with hold((out, "-o"), (run_dir, "run directory")):` lock each (path, what) in order; all released after."""
    taken = []
    try:
        for path, what in targets:
            acquire(path, what)
            taken.append(path)
        yield
    finally:
        for path in reversed(taken):
            release(path)
