"""Connecting to Ray, in one place: every stage, CLI command and `ray_jobs/` entry point goes through `connect`.

Order: an explicit address (a recipe's `ray.address`, `--address`) -> the cluster this process belongs to (RAY_ADDRESS,
which `ray job submit` sets for the job's driver, or the last `ray start` on this machine) -> a new local instance.
Unlike `ray.init(address="auto")`, this never attaches to some other process's private `ray.init()` instance that
happens to run on the same machine.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
from urllib.parse import urlsplit

from prunekit import PrunekitError

PROBE_TIMEOUT_S = 5.0


def _host_port(address: str) -> tuple[str, int] | None:
    """'host:port' or 'ray://host:port' -> (host, port); None when there is no port to probe."""
    parts = urlsplit(address if "://" in address else f"gcs://{address}")
    try:
        return (parts.hostname, parts.port) if parts.hostname and parts.port else None
    except ValueError:
        return None


def probe(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Fail fast, with one line, when nothing listens at `address` (ray.init itself retries for minutes)."""
    if address.startswith(("http://", "https://")):
        raise PrunekitError(f"ray address {address}: that is the dashboard / job API (use it with `ray job submit`); "
                            f"give the cluster address host:6379 or ray://host:10001")
    hp = _host_port(address)
    if hp is None:
        raise PrunekitError(f"ray address {address}: expected host:port or ray://host:port")
    try:
        socket.create_connection(hp, timeout=timeout_s).close()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise PrunekitError(f"ray address {address}: nothing answers at {hp[0]}:{hp[1]} ({reason}); is the cluster "
                            f"up, and is the address (or SSH tunnel / port-forward) right?") from None


def existing_cluster_address() -> str | None:
    """The address of the cluster this process belongs to: RAY_ADDRESS, else the last `ray start` on this machine."""
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if env and env not in ("auto", "local"):
        return env
    from ray._common.utils import get_ray_address_file
    try:
        with open(get_ray_address_file(None)) as f:
            return f.read().strip() or None
    except OSError:
        return None


NO_DASHBOARD = "Cannot include dashboard with missing packages"  # ray.init's error on a Ray without ray[default]
_started_local = False  # this process started the local Ray instance it is connected to (stop_local stops it)


def _init(**kwargs) -> None:
    """ray.init, keeping this process's SIGTERM handler: Ray's own (sys.exit from wherever the driver is) ends a
    run without its cleanup, and from inside Ray's calls with an abort and a C++ stack."""
    import ray
    previous = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    try:
        ray.init(**kwargs)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def quiet_ray() -> None:
    """No more of Ray's log lines on this driver (workers' output, Ray's own logger): after a failure has been
    said in one line, or while Ray shuts down."""
    import logging
    logging.getLogger("ray").setLevel(logging.CRITICAL)
    with contextlib.suppress(Exception):
        from ray._private.worker import global_worker_stdstream_dispatcher
        global_worker_stdstream_dispatcher.remove_handler("ray_print_logs")


def stop_local() -> None:
    """Stop the local Ray instance `connect` started, all of it: GCS, raylet, dashboard and its agents, workers (all
    descendants of this process). Signals that arrive meanwhile do not cut this short (half a shutdown is what leaves
    ray::DashboardAgent and ray::RuntimeEnvAgent orphaned); what `ray.shutdown` leaves running is killed."""
    global _started_local
    if not _started_local:
        return
    import psutil
    import ray
    import ray._private.worker as ray_worker
    from prunekit.core.interrupts import STOP_SIGNALS, deferred
    main_thread = threading.current_thread() is threading.main_thread()
    with deferred():
        _started_local = False
        quiet_ray()
        me = psutil.Process()
        procs = me.children(recursive=True)
        # ray.shutdown's C++ part puts SIGTERM back to the default action (it uninstalls its failure-signal handler),
        # and the slow part, stopping the node's processes, comes after it: disconnect first, take the signals back,
        # then stop the processes
        node, ray_worker._global_node = ray_worker._global_node, None
        with contextlib.suppress(Exception):
            ray.shutdown()
        for s in STOP_SIGNALS if main_thread else ():
            signal.signal(s, signal.getsignal(s))  # the deferring handler, installed again where Ray removed it
        if node is not None:
            with contextlib.suppress(Exception):
                node.kill_all_processes(check_alive=False, allow_graceful=True)
        procs += [p for p in me.children(recursive=True) if p not in procs]
        _, alive = psutil.wait_procs(procs, timeout=10)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(alive, timeout=5)


def started_locally() -> bool:
    """Whether the Ray instance this process uses is the local one `connect` started (it never gains resources)."""
    return _started_local


def connect(address: str | None = None) -> str:
    """Make sure this process is connected to Ray; returns the address it joined ('local' for a new instance)."""
    global _started_local
    import ray
    if ray.is_initialized():
        if address and address != "auto":
            probe(address)  # an address that does not answer is an error even inside a connected process
        return "connected"
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    wants_cluster = address == "auto" or os.environ.get("RAY_ADDRESS", "").strip() not in ("", "local")
    if address and address != "auto":
        target = address
    else:
        target = existing_cluster_address()
        if target is None and wants_cluster:
            raise PrunekitError("ray address auto: no running Ray cluster found (no `ray start` on this machine)")
    if target:
        try:
            probe(target)
        except PrunekitError:
            if address or wants_cluster:
                raise  # a cluster was asked for: a dead one is an error
            print(f"prunekit: the last `ray start` cluster ({target}) does not answer; starting a local Ray",
                  file=sys.stderr)
        else:
            try:
                _init(address=target, log_to_driver=True)
            except Exception as e:  # ray raises ConnectionError, RuntimeError, TimeoutError, ... here
                raise PrunekitError(f"ray address {target}: cannot connect ({str(e).splitlines()[0][:200]})") from None
            return target
    os.environ.pop("RAY_ADDRESS", None)  # "local": ray.init must start an instance, not look for one
    # the dashboard serves the State API Ray Train polls (without it its cleaner actor warns every few seconds);
    # it listens on 127.0.0.1 only
    import psutil
    before = set(psutil.Process().children(recursive=True))
    try:
        _init(include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True)
    except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception for this
        if NO_DASHBOARD not in str(e):
            raise
        # a Ray installed without its dashboard extras (seen on a GPU image) still trains; Ray Train's State API
        # polling then only warns. The failed start already launched a GCS server: it goes first.
        leftover = set(psutil.Process().children(recursive=True)) - before
        for p in leftover:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(leftover, timeout=5)
        print("prunekit: warning: this Ray has no dashboard packages (pip install 'ray[default]'); starting a local "
              "Ray without the dashboard", file=sys.stderr)
        _init(include_dashboard=False, log_to_driver=True)
    _started_local = True
    return "local"


def describe_cluster() -> str:
    """One line: nodes, CPUs, GPUs of the connected cluster."""
    import ray
    res = ray.cluster_resources()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    return f"{nodes} node(s), {res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs"
