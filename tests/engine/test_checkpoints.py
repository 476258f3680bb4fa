"""Checkpoints a run can trust (issue 16): a damaged one is never copied out as success (the run resumes from the
previous one, or fails in one line), copying out verifies the manifest, and a signal mid-write leaves the last
complete one."""
from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import error_lines, run_cli, sft_args
from tests.processes import SIGNALS, assert_no_survivors, finish, pause_at, start_cli, wait_for


# ---- 1. a damaged checkpoint is never copied out as success ----------------------------------------------------

def test_damaged_final_checkpoint_falls_back_to_the_previous_one(tiny_chat_model_dir, chat_data, tmp_path, capsys):
    from prunekit.core.loading import load_model
    code, _, err = run_cli(capsys, *sft_args(tiny_chat_model_dir, chat_data, tmp_path, "out1", "--set",
                                             "save_interval=1"))
    assert code == 0, err
    ckpts = tmp_path / "runs" / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000001", "step-0000002"]
    manifest = json.loads((ckpts / "step-0000002" / "manifest.json").read_text())["files"]
    weights = ckpts / "step-0000002" / "hf" / "model.safetensors"
    assert manifest["hf/model.safetensors"]["size"] == weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(1000)
    code, out, err = run_cli(capsys, *sft_args(tiny_chat_model_dir, chat_data, tmp_path, "out2", "--set",
                                               "save_interval=1"))
    assert code == 0, err
    warnings = [line for line in error_lines(err) if "warning" in line]
    assert warnings == [f"prunekit: warning: checkpoint {ckpts / 'step-0000002'} is damaged (hf/model.safetensors is "
                        f"1,000 bytes, {manifest['hf/model.safetensors']['size']:,} when written); resuming from "
                        f"step-0000001"], err
    assert "wrote" in out and "Traceback" not in err
    load_model(tmp_path / "out2")  # the step-2 model again, retrained from step 1
    lines = [json.loads(x)["step"] for x in (tmp_path / "runs" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines == [1, 2]  # step 2 once: the resumed run dropped nothing it kept and logged step 2 again


def test_damaged_only_checkpoint_fails_with_one_line(tiny_chat_model_dir, chat_data, tmp_path, capsys):
    code, _, err = run_cli(capsys, *sft_args(tiny_chat_model_dir, chat_data, tmp_path, "out1"))
    assert code == 0, err
    final = tmp_path / "runs" / "run" / "checkpoints" / "step-0000002"
    with open(final / "hf" / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    code, out, err = run_cli(capsys, *sft_args(tiny_chat_model_dir, chat_data, tmp_path, "out2"))
    assert code == 2 and error_lines(err) == [
        f"prunekit sft: error: checkpoint {final} is damaged (hf/model.safetensors is 1,000 bytes, "
        f"{json.loads((final / 'manifest.json').read_text())['files']['hf/model.safetensors']['size']:,} when "
        f"written) and no earlier checkpoint is intact; delete {tmp_path / 'runs' / 'run'} (or pick another run "
        f"name) to start over"], err
    assert not (tmp_path / "out2").exists() and not list(tmp_path.glob(".out2*"))


def test_copy_out_verifies_against_the_manifest(tiny_chat_model_dir, tmp_path):
    from prunekit import PrunekitError
    from prunekit.engine.manifest import checkpoint_problem, copy_verified, write_manifest
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_chat_model_dir, ckpt / "hf")
    (ckpt / "metrics.json").write_text("{}")
    write_manifest(ckpt)
    assert checkpoint_problem(ckpt) is None
    (tmp_path / "a").mkdir()
    copy_verified(ckpt, "hf", tmp_path / "a")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (ckpt / "hf" / "model.safetensors").read_bytes()
    data = bytearray((ckpt / "hf" / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    (ckpt / "hf" / "model.safetensors").write_bytes(bytes(data))
    assert checkpoint_problem(ckpt) == "hf/model.safetensors does not match the sha256 recorded when it was written"
    (tmp_path / "b").mkdir()
    with pytest.raises(PrunekitError, match="hf/model.safetensors does not match the sha256"):
        copy_verified(ckpt, "hf", tmp_path / "b")
    # a checkpoint written before manifests: its safetensors headers are checked
    (ckpt / "manifest.json").unlink()
    with open(ckpt / "hf" / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    assert "hf/model.safetensors is 1,000 bytes" in checkpoint_problem(ckpt)


# ---- a signal while a checkpoint is written: a real `prunekit` process ----------------------------------------


@pytest.mark.slow  # ~5 s each: a real prunekit process
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signal_mid_checkpoint_keeps_the_last_complete_one(sig, tiny_chat_model_dir, chat_data, tmp_path):
    """launcher local: while step 2's checkpoint is being written (its files are there, its manifest not yet) a first
    signal only asks the run to stop after it; a second one stops it at once: step 1's checkpoint stays, step 2's
    partial one is removed, one line, 143 / 130."""
    import os
    import time
    import uuid
    from prunekit.engine.manifest import checkpoint_problem
    signum, code, word = SIGNALS[sig]
    ready = tmp_path / "ready"
    marker = uuid.uuid4().hex
    proc = start_cli(sft_args(tiny_chat_model_dir, chat_data, tmp_path, "out", "--set", "save_interval=1")
                     + ["--max-steps", 4], tmp_path,
                     patch=pause_at("prunekit.engine.loop", "write_manifest", ready, call=2),
                     env={"TEST_RUN_MARKER": marker})
    wait_for(ready.exists, proc)
    ckpts = tmp_path / "runs" / "run" / "checkpoints"
    assert [p.name for p in ckpts.glob(".tmp-*")], "step 2's checkpoint is being written"
    os.kill(proc.pid, signum)
    time.sleep(1.0)
    assert proc.poll() is None, "the first signal waits for the checkpoint"
    os.kill(proc.pid, signum)
    rc, err = finish(proc)
    assert rc == code and error_lines(err) == [f"prunekit sft: {word}"], err
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000001"]
    assert checkpoint_problem(ckpts / "step-0000001") is None
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    assert not list((tmp_path / "runs").glob(".*.lock"))
    assert_no_survivors(marker)


def signal_after_step(step: int, signum: int, times: int = 1) -> str:
    """A patch: the process sends itself `signum` (`times` times in a row) once the `step`-th optimizer step has run."""
    return (f"import os, prunekit.engine.loop as _m\n"
            f"_f = _m.accumulate_and_step; _n = [0]\n"
            f"def _step(*a, **k):\n"
            f"    out = _f(*a, **k); _n[0] += 1\n"
            f"    if _n[0] == {step}:\n"
            f"        for _ in range({times}): os.kill(os.getpid(), {signum})\n"
            f"    return out\n"
            f"_m.accumulate_and_step = _step\n")


@pytest.mark.slow  # ~10 s each: two real prunekit processes
@pytest.mark.parametrize("sig, times", [("SIGTERM", 1), ("SIGINT", 1), ("SIGINT", 2)])
def test_a_signal_stops_training_on_a_checkpoint_of_that_step(sig, times, tiny_chat_model_dir, chat_data, tmp_path):
    """launcher local: Ctrl-C or `kill` in step 3 of 5 (checkpoints every 100 steps) finishes that step and writes
    its checkpoint before the one line and 130 / 143, so a chained or preempted run loses nothing: the same command
    then trains only steps 4 and 5 and writes a model that loads. The same signal twice in a row (`timeout -s INT`
    signals its command, then the command's process group) is one request, not a second Ctrl-C."""
    from prunekit.core.loading import load_model
    from prunekit.engine.manifest import checkpoint_problem
    signum, code, word = SIGNALS[sig]
    args = sft_args(tiny_chat_model_dir, chat_data, tmp_path, "out", "--set", "save_interval=100") + [
        "--max-steps", 5]
    proc = start_cli(args, tmp_path, patch=signal_after_step(3, signum, times))
    rc, err = finish(proc)
    ckpts = tmp_path / "runs" / "run" / "checkpoints"
    assert rc == code and error_lines(err) == [
        f"prunekit sft: {word} (at step 3, checkpoint written: the same command resumes)"], err
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000003"]
    assert checkpoint_problem(ckpts / "step-0000003") is None and not (tmp_path / "out").exists()
    rc, err = finish(start_cli(args, tmp_path))
    assert rc == 0, err
    steps = [json.loads(x)["step"] for x in (tmp_path / "runs" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    load_model(tmp_path / "out")
    assert not list((tmp_path / "runs").glob(".*.lock"))


@pytest.mark.slow  # ~10 s: two real prunekit processes
def test_stop_at_ends_training_on_a_checkpoint_without_a_signal(tiny_chat_model_dir, chat_data, tmp_path):
    """$PRUNEKIT_STOP_AT (a wall-clock time, here long past) stops a run after the step it finds the time reached,
    on that step's checkpoint, with one line and 130, as Ctrl-C does; without it the same command trains the rest
    and writes a model that loads. A value that is not a time is a one-line error naming the variable."""
    from prunekit.core.loading import load_model
    args = sft_args(tiny_chat_model_dir, chat_data, tmp_path, "out", "--set", "save_interval=100") + [
        "--max-steps", 4]
    rc, err = finish(start_cli(args, tmp_path, env={"PRUNEKIT_STOP_AT": "1"}))
    ckpts = tmp_path / "runs" / "run" / "checkpoints"
    assert rc == 130 and error_lines(err) == [
        "prunekit sft: interrupted (PRUNEKIT_STOP_AT reached at step 1, checkpoint written: the same command "
        "resumes)"], err
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000001"] and not (tmp_path / "out").exists()
    rc, err = finish(start_cli(args, tmp_path, env={"PRUNEKIT_STOP_AT": "soon"}))
    assert rc == 2 and error_lines(err) == [
        "prunekit sft: error: PRUNEKIT_STOP_AT='soon' is not a time in seconds since the epoch"], err
    rc, err = finish(start_cli(args, tmp_path))
    assert rc == 0, err
    steps = [json.loads(x)["step"] for x in (tmp_path / "runs" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    load_model(tmp_path / "out")
