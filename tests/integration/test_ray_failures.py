"""Failures on Ray (issue 16): Ctrl-C or SIGTERM during a knockout sweep or a Ray Train run stops everything in one
line, a worker's exception or death is the last line (no Ray noise after it), and no process of the run survives."""
from __future__ import annotations

import pytest

from tests.conftest import error_lines, run_cli, sft_args
from tests.processes import SIGNALS, assert_no_survivors, finish, processes_with_marker, start_cli, wait_for


@pytest.mark.parametrize("signum,code,word", [(2, 130, "interrupted"), (15, 143, "terminated")])  # + case 4
def test_a_signal_during_knockout_stops_it_without_a_plan(signum, code, word, ray_session, tiny_chat_model_dir,
                                                          chat_data, tmp_path, capsys):
    import os
    import threading
    import time
    train, val = chat_data
    run_dir = tmp_path / "runs" / "ko"
    first = run_dir / "trials" / "baseline" / "result.json"

    def interrupt_after_the_first_trial():
        deadline = time.time() + 300
        while not first.is_file() and time.time() < deadline:
            time.sleep(0.1)
        os.kill(os.getpid(), signum)  # what Ctrl-C (SIGINT) / `kill PID` (SIGTERM) sends the driver
    threading.Thread(target=interrupt_after_the_first_trial, daemon=True).start()
    rc, out, err = run_cli(capsys, "knockout", "--model", tiny_chat_model_dir, "--train", train, "--val", val,
                           "--output-dir", tmp_path / "report", "--name", "ko", "--max-steps", 30,
                           "--storage-path", tmp_path / "runs", "--set", "batch_size=2", "--set", "max_length=64",
                           "--set", "eval_interval=30", "--set", "eval_max_samples=4", "--set", "importance=false",
                           "--set", "tune.max_concurrent_trials=1", "--set", "wandb.mode=disabled")
    assert rc == code, err
    assert error_lines(err) == [
        f"prunekit knockout: {word} (1 of 3 trials finished, kept in {run_dir}; no report or plan written from "
        f"a partial sweep (re-run the same command to run the rest))"], err
    assert first.is_file() and not (run_dir / "trials" / "text_0" / "result.json").exists()
    assert not (tmp_path / "report").exists() and "plan" not in out


def test_a_worker_exception_is_one_line_naming_the_cause(ray_session, tiny_chat_model_dir, chat_data, tmp_path,
                                                         capsys):
    """On Ray Train: a worker that raises (here: the only checkpoint of the run is damaged, found on restore) ends
    in one line naming the cause, not a WorkerGroupError traceback; nothing is written."""
    argv = sft_args(tiny_chat_model_dir, chat_data, tmp_path, "out1")
    argv[argv.index("launcher=local")] = "launcher=ray"
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    run_dir = tmp_path / "runs" / "run"
    (final,) = [d for d in run_dir.glob("checkpoint_*") if (d / "hf").is_dir()]
    assert (final / "manifest.json").is_file()
    with open(final / "hf" / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    argv[argv.index(tmp_path / "out1")] = tmp_path / "out2"
    code, _, err = run_cli(capsys, *argv)
    assert code == 2, err
    assert error_lines(err)[-1].startswith(
        f"prunekit sft: error: sft run run failed: checkpoint {final} is damaged (hf/model.safetensors is 1,000 "
        f"bytes, "), err
    assert error_lines(err)[-1].endswith("(or pick another run name) to start over")  # no "re-run to resume"
    assert "Traceback" not in err and "WorkerGroupError" not in err
    assert not (tmp_path / "out2").exists()


def ray_sft(tiny_chat_model_dir, chat_data, tmp_path, *extra, env: dict | None = None):
    """`prunekit sft` on Ray Train with a local Ray instance the command starts itself (its own RAY_TMPDIR, so it
    never joins another cluster on this machine); TEST_RUN_MARKER finds each of its processes afterwards."""
    import tempfile
    import uuid
    marker = uuid.uuid4().hex
    argv = sft_args(tiny_chat_model_dir, chat_data, tmp_path, "out", "--set", "parallel.workers=1", *extra)
    argv[argv.index("launcher=local")] = "launcher=ray"
    ray_tmp = tempfile.mkdtemp(prefix="pk-ray-")  # short: Ray's socket paths must fit in 107 bytes
    proc = start_cli(argv, tmp_path, env={"TEST_RUN_MARKER": marker, "RAY_TMPDIR": ray_tmp, **(env or {})})
    proc.ray_tmp = ray_tmp  # removed after the test
    return proc, marker


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signal_during_a_ray_train_run_stops_everything(sig, tiny_chat_model_dir, chat_data, tmp_path):
    """Ray Train (a local instance the command started): the signal stops the workers, every checkpoint left is
    whole, one line, 143 / 130, and no Ray process of the run survives (SIGTERM: a second one arrives while Ray
    shuts down)."""
    import os
    import time
    from prunekit.engine.manifest import MANIFEST, checkpoint_problem
    signum, code, word = SIGNALS[sig]
    proc, marker = ray_sft(tiny_chat_model_dir, chat_data, tmp_path, "--max-steps", 500, "--set", "save_interval=1")
    run_dir = tmp_path / "runs" / "run"
    wait_for(lambda: any((d / MANIFEST).is_file() for d in run_dir.glob("checkpoint_*")), proc,
             what="a first checkpoint")
    assert processes_with_marker(marker), "the run's Ray processes carry the marker"
    os.kill(proc.pid, signum)
    if sig == "SIGTERM":
        time.sleep(2.0)
        os.kill(proc.pid, signum)  # again, while it stops Ray (its C++ shutdown resets SIGTERM to the default)
    rc, err = finish(proc)
    lines = error_lines(err)
    assert rc == code and lines[-1] == f"prunekit sft: {word}", err
    assert not [line for line in err.splitlines() if line.startswith(("Traceback", "*** SIG", "Aborted"))], err
    assert_no_survivors(marker)
    ckpts = sorted(d for d in run_dir.glob("checkpoint_*") if d.is_dir())
    assert ckpts and all(checkpoint_problem(d) is None and (d / MANIFEST).is_file() for d in ckpts), ckpts
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    assert not list((tmp_path / "runs").glob(".*.lock"))


def test_a_worker_that_dies_is_the_last_line_without_ray_noise_after_it(tiny_chat_model_dir, chat_data, tmp_path):
    """A worker dies (os._exit at step 1, no restarts): the one-line error is the last thing on stderr (Ray's own
    log lines do not follow it), exit 2, and the local Ray instance is gone."""
    proc, marker = ray_sft(tiny_chat_model_dir, chat_data, tmp_path, "--set", "ray.max_failures=0",
                           env={"PRUNEKIT_TEST_CRASH_AT_STEP": "1"})
    rc, err = finish(proc)
    raw = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert rc == 2 and raw[-1].startswith("prunekit sft: error: sft run run failed: "), err
    assert raw[-1].endswith(f"(logs and checkpoints in {tmp_path / 'runs' / 'run'}; re-run the same command to "
                            f"resume)"), err
    assert sum(line.startswith("prunekit sft:") for line in raw) == 1, err  # (Ray's logs before it are the run's)
    assert_no_survivors(marker)
    assert not (tmp_path / "out").exists()
