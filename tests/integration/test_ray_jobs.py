"""ray_jobs/ entry points against a real local Ray head: `ray start --head` on loopback ports, `ray job submit`."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

BIN = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _free_port_range(n: int) -> int:
    """First port of n consecutive free ports below Linux's ephemeral range (32768+), where the single ports from
    _free_ports come from: the two can never overlap."""
    for start in range(20000, 32768 - n, n):
        try:
            socks = []
            for port in range(start, start + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return start
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports in 20000-32767")


@pytest.fixture
def ray_head():
    """A Ray head of our own: every port chosen free on loopback, its own temp dir (so it is nobody's "last `ray
    start`"), run with --block so stopping it means signalling the one process we started (never `ray stop`, which
    would stop every Ray on the machine)."""
    gcs, dash, client, nm, om, agent_http, agent_grpc, metrics, rt_env = _free_ports(9)
    w0 = _free_port_range(201)
    temp = tempfile.mkdtemp(prefix="pkray", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    # token authentication on, with a token of its own: every client below must present it
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_DEDUP_LOGS": "0",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex,
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}  # a test head has nothing to drain: stop at once
    env.pop("RAY_ADDRESS", None)
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
           f"--node-manager-port={nm}", f"--object-manager-port={om}", f"--dashboard-agent-listen-port={agent_http}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
           f"--runtime-env-agent-port={rt_env}", f"--min-worker-port={w0}", f"--max-worker-port={w0 + 200}",
           f"--temp-dir={temp}", "--num-cpus=3", "--num-gpus=0", "--disable-usage-stats"]
    log = open(Path(temp) / "ray-start.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 180
        while _ray_cli(["job", "list", "--address", url], env).returncode != 0:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"ray head did not come up: {(Path(temp) / 'ray-start.log').read_text()[-2000:]}")
            time.sleep(2)
        yield {"dashboard": url, "gcs_port": gcs, "env": env}
    finally:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` stops its own processes on SIGTERM
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the session we started, and only it
        log.close()
        shutil.rmtree(temp, ignore_errors=True)   # its sessions' logs and sockets (~6 MB a run)


def _ray_cli(args: list[str], env: dict, **kw) -> subprocess.CompletedProcess:
    """The `ray` CLI in a subprocess: it reads the auth token from the env, as a user's shell would."""
    return subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=120,
                          check=False, **kw)


def _working_dir(tmp_path) -> Path:
    """The checkout as git sees it (tracked + untracked, minus ignored files), so local clutter never rides along."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout.decode().split("\0")
    wd = tmp_path / "working_dir"
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (wd / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, wd / rel)
    return wd


def _submit_and_wait(head: dict, entrypoint: list[str], working_dir: Path, timeout_s: int = 600) -> tuple[str, str]:
    sid = f"prunekit-test-{uuid.uuid4().hex[:8]}"
    out = _ray_cli(["job", "submit", "--address", head["dashboard"], "--submission-id", sid, "--working-dir", ".",
                    "--no-wait", "--", *entrypoint], head["env"], cwd=working_dir)
    assert out.returncode == 0, out.stdout + out.stderr
    # wait in one subprocess (token auth is configured from its env, as in a user's shell)
    wait = ("import sys, time\nfrom ray.job_submission import JobSubmissionClient\n"
            "c = JobSubmissionClient(sys.argv[1]); end = time.time() + float(sys.argv[3])\n"
            "while not (s := c.get_job_status(sys.argv[2])).is_terminal() and time.time() < end: time.sleep(2)\n"
            "print(s.value)")
    status = subprocess.run([sys.executable, "-c", wait, head["dashboard"], sid, str(timeout_s)], env=head["env"],
                            capture_output=True, text=True, timeout=timeout_s + 60, check=False).stdout.strip()
    return status, _ray_cli(["job", "logs", sid, "--address", head["dashboard"]], head["env"]).stdout


def test_ray_job_submit_runs_a_knockout_on_a_real_head(ray_head, tmp_path, tiny_chat_model_dir, chat_data):
    train, val = chat_data
    cfg = {"model": str(tiny_chat_model_dir), "train": str(train), "val": str(val),
           "output_dir": str(tmp_path / "report"), "storage_path": str(tmp_path / "runs"), "name": "job-sweep",
           "max_steps": 4, "max_length": 64, "batch_size": 4, "eval_interval": 4, "log_interval": 1,
           "eval_max_samples": 16, "lr": 1e-3, "warmup_ratio": 0.0, "scheduler": "constant", "candidates": {"text": [1]}, "importance": False,
           # any ratio is recoverable, no spike is key, the budget holds the layer: the plan must take the candidate
           "recoverable_ratio": 1e-6, "spike_margin": 1e9, "max_params_fraction": 0.9,
           "tune": {"max_concurrent_trials": 2}, "wandb": {"mode": "disabled"}}
    recipe = tmp_path / "knockout.yaml"
    recipe.write_text(yaml.safe_dump(cfg))
    status, logs = _submit_and_wait(ray_head, ["python", "ray_jobs/knockout.py", "--config", str(recipe)],
                                    _working_dir(tmp_path))
    assert status == "SUCCEEDED", logs[-3000:]
    # the driver joined the job's cluster (the head we started), not a new local instance
    assert re.search(rf"Ray at [\d.]+:{ray_head['gcs_port']}: 1 node", logs), logs[-3000:]
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    rows = {r["id"]: r for r in results["rows"]}
    assert set(rows) == {"baseline", "text:1"}
    assert all(0 <= r["eval_token_acc"] <= 1 for r in rows.values())
    plan = json.loads((tmp_path / "report" / "plan.json").read_text())
    from prunekit.pipeline import text_layer_params
    assert plan["drop_text"] == [1] and plan["params_removed"] == text_layer_params(tiny_chat_model_dir)[1]


def test_job_entry_point_fails_in_one_line_when_the_cluster_does_not_answer(tmp_path):
    (port,) = _free_ports(1)  # nothing listens there
    out = subprocess.run([sys.executable, "ray_jobs/sft.py", "--address", f"127.0.0.1:{port}", "--config", "x.yaml"],
                         cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and f"nothing answers at 127.0.0.1:{port}" in lines[0], out.stderr
