"""One writer per run directory and output (issue 16, case 12): a second identical run fails at once naming the
holder; a lock whose holder died is taken over."""
from __future__ import annotations

import json

import pytest

from tests.conftest import REPO, error_lines, run_cli, sft_args
from tests.processes import finish, pause_at, start_cli, wait_for


@pytest.mark.slow  # ~7 s: a real prunekit process, then two runs
def test_a_second_identical_run_fails_at_once_naming_the_holder(tiny_chat_model_dir, chat_data, tmp_path, capsys):
    import os
    import socket
    import time
    ready = tmp_path / "ready"
    first = start_cli(sft_args(tiny_chat_model_dir, chat_data, tmp_path, "out"), tmp_path,
                      patch=pause_at("prunekit.engine.loop", "write_manifest", ready))
    wait_for(ready.exists, first)
    run_dir, metrics = tmp_path / "runs" / "run", tmp_path / "runs" / "run" / "metrics.jsonl"
    logged = metrics.read_text()
    holder = f"prunekit sft (pid {first.pid} on host {socket.gethostname()}, since "
    code, _, err = run_cli(capsys, *sft_args(tiny_chat_model_dir, chat_data, tmp_path, "out"))
    assert code == 2 and len(error_lines(err)) == 1, err
    assert err.startswith(f"prunekit sft: error: -o {tmp_path / 'out'}: in use by {holder}"), err
    assert err.endswith("); wait for it to finish or stop it\n"), err
    code, _, err = run_cli(capsys, *sft_args(tiny_chat_model_dir, chat_data, tmp_path, "elsewhere"))  # same --name
    assert code == 2 and err.startswith(f"prunekit sft: error: run directory {run_dir}: in use by {holder}"), err
    assert metrics.read_text() == logged and not (tmp_path / "elsewhere").exists()  # nothing trained or written
    os.kill(first.pid, 15)   # the first SIGTERM waits for the checkpoint being written; a second stops it at once
    time.sleep(1.0)
    os.kill(first.pid, 15)
    assert finish(first)[0] == 143
    code, out, err = run_cli(capsys, *sft_args(tiny_chat_model_dir, chat_data, tmp_path, "out"))  # free again
    assert code == 0 and "wrote" in out, err
    assert not list(tmp_path.glob(".*.lock")) and not list((tmp_path / "runs").glob(".*.lock"))


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    import os
    import socket
    import subprocess
    import sys
    from prunekit.core import locks
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    target = tmp_path / "runs" / "same"
    lock = locks.lock_file(target)
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "command": "prunekit sft"}))
    with locks.hold((target, "run directory")):  # its holder is gone: taken over
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with locks.hold((target, "run directory")):  # re-entrant within a process (a pipeline's stages)
            pass
        assert lock.exists()
        other = subprocess.run([sys.executable, "-c", f"from prunekit.core import locks\n"
                                f"locks.acquire({str(target)!r}, 'run directory')"],
                               capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert other.returncode == 1 and f"run directory {target}: in use by prunekit" in other.stderr, other.stderr
        assert f"(pid {os.getpid()} on host {socket.gethostname()}, since " in other.stderr, other.stderr
    assert not lock.exists()
