"""Signals, in one place. Ctrl-C (SIGINT) and `kill PID` (SIGTERM) both unwind the stack as an exception, so every
`finally` runs (temp dirs removed, locks released, workers stopped); the CLI then prints one line: `interrupted`
(exit 130) or `terminated` (exit 143).

Long runs that own workers (Ray Train, Ray Tune) stop them first: `StopOnSignal` records the first signal and asks
the workers to stop; the driver then raises `interrupt_for(signum)`. A second signal acts at once, unless it is the
first one delivered again: `timeout` signals its command and then the command's whole process group, so one request
can arrive twice within microseconds.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
STOP_AT_ENV = "PRUNEKIT_STOP_AT"   # seconds since the epoch: a training loop stops there as if interrupted
REPEAT_WINDOW_S = 0.5   # a signal this soon after the first is the same request delivered twice, not a second one


class Terminated(KeyboardInterrupt):
    """SIGTERM: unwinds like Ctrl-C (every handler of KeyboardInterrupt sees it), reported as `terminated`, 143."""


def interrupt_for(signum: int, message: str = "") -> KeyboardInterrupt:
    return Terminated(message) if signum == signal.SIGTERM else KeyboardInterrupt(message)


last_signal: int | None = None  # the last SIGINT/SIGTERM a handler here saw (the CLI resets it)


def outcome(e: KeyboardInterrupt) -> tuple[str, int]:
    """('terminated', 143) for SIGTERM, ('interrupted', 130) for Ctrl-C. Ray turns an exception raised by a signal
    handler while it waits (ray.get) into a plain KeyboardInterrupt, so the last signal seen decides."""
    signum = signal.SIGTERM if isinstance(e, Terminated) else (last_signal or signal.SIGINT)
    return ("terminated" if signum == signal.SIGTERM else "interrupted"), 128 + signum


def stop_time() -> float | None:
    """When a training loop should stop on a checkpoint as if interrupted ($PRUNEKIT_STOP_AT, seconds since the
    epoch), or None: a call of limited length (a chained GPU call, a scheduler's time slot) then ends on its own
    terms, a little before its limit's signal, which has more than once ended a process without its handler
    running (bench/README.md, outcome_smollm2.py)."""
    value = os.environ.get(STOP_AT_ENV, "").strip()
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        from prunekit import PrunekitError
        raise PrunekitError(f"{STOP_AT_ENV}={value!r} is not a time in seconds since the epoch") from None


def raise_interrupt(signum, frame):
    """The handler the CLI installs for SIGINT and SIGTERM: raise where the program is."""
    global last_signal
    last_signal = signum
    raise interrupt_for(signum)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def handled(handler, signals=STOP_SIGNALS):
    """Install `handler` for `signals` for the duration (main thread only: elsewhere signals cannot be handled)."""
    if not _in_main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in signals}
    for s in signals:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


@contextlib.contextmanager
def deferred():
    """A section a signal must not cut short (e.g. stopping Ray's processes): signals are recorded, not acted on;
    yields the list of those received."""
    received: list[int] = []
    with handled(lambda signum, frame: received.append(signum)):
        yield received


class StopOnSignal:
    """The first SIGINT/SIGTERM is recorded in `signum` and calls `on_stop` (ask workers to stop); a second signal
    (after REPEAT_WINDOW_S) goes to the previous handler, i.e. interrupts at once. Use as a context manager."""

    def __init__(self, on_stop=None):
        self.signum: int | None = None
        self.on_stop = on_stop
        self._previous: dict | None = None
        self._first_at = 0.0

    def arm(self) -> None:
        if _in_main_thread() and self._previous is None:
            self._previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
            for s in STOP_SIGNALS:
                signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        global last_signal
        if self.signum is None:
            self.signum = last_signal = signum
            self._first_at = time.monotonic()
            if self.on_stop is not None:
                self.on_stop()
            return
        if time.monotonic() - self._first_at < REPEAT_WINDOW_S:
            return
        last_signal = signum
        previous = (self._previous or {}).get(signum)
        self.disarm()
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:   # SIG_DFL: unwind (every `finally` runs) rather than die
            raise interrupt_for(signum)

    def disarm(self) -> None:
        if self._previous is not None:
            for s, h in self._previous.items():
                signal.signal(s, h if h is not None else signal.SIG_DFL)
            self._previous = None

    def __enter__(self):
        self.arm()
        return self

    def __exit__(self, *exc):
        self.disarm()
        return False
