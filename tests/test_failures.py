"""Failures a user meets (issue 16): each ends in one line and the right exit code, and leaves nothing half-written."""
from __future__ import annotations

import json
import shutil

import pytest

from prunekit.cli import main


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def error_lines(err: str) -> list[str]:
    """stderr without progress-bar redraws."""
    return [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "it/s]" not in line
            and "s/it]" not in line and "step/s]" not in line and "s/step]" not in line and "|" not in line]


def sft_args(model, data, tmp_path, out, *extra):
    train, _ = data  # no val: at max_length 32 no val row keeps an assistant token (a warning line)
    return ["sft", "--model", model, "--train", train, "--output-dir", tmp_path / out, "--name", "run",
            "--max-steps", 2, "--set", "batch_size=2", "--set", "max_length=32", "--set", "launcher=local",
            "--set", "wandb.mode=disabled", "--set", f"storage_path={tmp_path / 'runs'}", *extra]


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


# ---- 2 / 11. config.json against the weights ---------------------------------------------------------------------

@pytest.fixture
def llama_copy(tiny_model_dir, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llama"), d)
    return d


def edit_config(model_dir, text_key=None, **changes):
    cfg = json.loads((model_dir / "config.json").read_text())
    (cfg[text_key] if text_key else cfg).update(changes)
    (model_dir / "config.json").write_text(json.dumps(cfg))


MISMATCHES = [
    ({"num_hidden_layers": 6}, "config.json says 6 text layers, the weights hold 4"),
    ({"num_hidden_layers": 2}, "config.json says 2 text layers, the weights hold 4"),
    ({"hidden_size": 32}, "config.json says hidden_size 32, the weights' model.embed_tokens.weight has 64 columns"),
    ({"vocab_size": 256}, "config.json says vocab_size 256, the weights' model.embed_tokens.weight has 128 rows"),
    ({"num_key_value_heads": 4}, "config.json says num_key_value_heads 4 x head_dim 16 = 64, the weights' "
                                 "model.layers.0.self_attn.k_proj.weight has 32 rows (2 heads)"),
]


@pytest.mark.parametrize("changes,message", MISMATCHES)
def test_config_that_disagrees_with_the_weights_is_one_line(changes, message, llama_copy, tmp_path, capsys):
    from conftest import tree_hash
    edit_config(llama_copy, **changes)
    before = tree_hash(llama_copy)
    code, _, err = run_cli(capsys, "inspect", llama_copy)
    assert code == 2 and message in err and err.count("\n") == 1, err
    for mode in ("--streaming", "--in-memory"):
        code, _, err = run_cli(capsys, "prune", llama_copy, "--drop-text", "1", "-o", tmp_path / "out", mode)
        assert code == 2 and message in err and err.count("\n") == 1, err
    code, _, err = run_cli(capsys, "kv-cut", llama_copy, "--kv-heads", "1", "-o", tmp_path / "out")
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert tree_hash(llama_copy) == before and not (tmp_path / "out").exists()


def test_training_refuses_a_config_that_disagrees_with_the_weights(tiny_chat_model_dir, chat_data, tmp_path, capsys):
    model = tmp_path / "chat"
    shutil.copytree(tiny_chat_model_dir, model)
    edit_config(model, num_hidden_layers=3)
    code, _, err = run_cli(capsys, *sft_args(model, chat_data, tmp_path, "out"))
    assert code == 2 and error_lines(err) == [
        f"prunekit sft: error: MODEL {model}: config.json says 3 text layers, the weights hold 2 "
        f"(config.json and the weights disagree; nothing done)"], err
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


def test_vlm_vision_depth_that_disagrees_with_the_weights(tiny_model_dir, tmp_path, capsys):
    d = tmp_path / "vlm"
    shutil.copytree(tiny_model_dir("qwen2_vl"), d)
    edit_config(d, "vision_config", depth=6)
    capsys.readouterr()  # the fixture's own output
    code, _, err = run_cli(capsys, "inspect", d)
    assert code == 2 and "config.json says 6 vision blocks, the weights hold 4" in err and err.count("\n") == 1


@pytest.mark.parametrize("text,message", [
    ("[]", "config.json: expected a JSON object of settings, got list"),
    ('"llama"', "config.json: expected a JSON object of settings, got str"),
    ('{"model_type": "llama"}', "config.json: no num_hidden_layers"),
    ('{"model_type": "llama", "num_hidden_layers": "4", "num_attention_heads": 4, "hidden_size": 64}',
     "config.json: num_hidden_layers: '4' is not a positive integer"),
    ('{"num_hidden_layers": 4}', "model_type None is not supported"),
])
def test_config_json_of_the_wrong_shape_is_one_line(text, message, llama_copy, tmp_path, capsys):
    (llama_copy / "config.json").write_text(text)
    for argv in (["inspect", llama_copy], ["prune", llama_copy, "--drop-text", "1", "-o", tmp_path / "out"]):
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


# ---- 3 / 4. Ctrl-C or SIGTERM during a knockout sweep ---------------------------------------------------------------------------

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


# ---- 9. no supervised token after truncation ---------------------------------------------------------------------

def test_training_data_without_supervised_tokens_fails_before_launch(tiny_chat_model_dir, tmp_path, capsys):
    train = tmp_path / "long.jsonl"
    long = " ".join(["a very long question"] * 40)
    train.write_text("".join(json.dumps({"messages": [{"role": "user", "content": long},
                                                      {"role": "assistant", "content": "ok"}]}) + "\n"
                             for _ in range(3)))
    code, _, err = run_cli(capsys, "sft", "--model", tiny_chat_model_dir, "--train", train, "--output-dir",
                           tmp_path / "out", "--max-steps", 2, "--set", "max_length=32",
                           "--set", f"storage_path={tmp_path / 'runs'}")  # launcher: ray, yet nothing starts
    assert code == 2 and error_lines(err) == [
        f"prunekit sft: error: train {train}: no row keeps an assistant token within max_length 32 (every prompt is "
        f"longer); raise max_length or shorten the prompts"], err
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


# ---- 8. what a worker would only find out after Ray started; a worker's exception ----------------------------------

@pytest.mark.parametrize("setting,message", [
    ("lr=-1", "lr must be a finite number > 0, got -1.0"), ("lr=.nan", "lr must be a finite number > 0, got nan"),
    ("lr=0", "lr must be a finite number > 0, got 0.0"), ("warmup_ratio=2", "warmup_ratio must be in [0, 1], got 2.0"),
    ("weight_decay=-0.1", "weight_decay must be a finite number >= 0"), ("grad_clip=0", "grad_clip must be a finite"),
])
def test_bad_optimizer_settings_fail_before_ray(setting, message, tmp_path, capsys):
    code, _, err = run_cli(capsys, "sft", "--model", "smollm2", "--train", tmp_path / "t.jsonl", "--output-dir",
                           tmp_path / "out", "--set", setting)
    assert code == 2 and message in err and err.count("\n") == 1, err


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


# ---- 10. an unwritable output location -----------------------------------------------------------------------------

@pytest.fixture
def immutable_dir(tmp_path):
    """A directory nobody (root included) may create entries in. The project's machines and CI run as root on a
    filesystem with the immutable flag, so this is a hard requirement, not a skip: a root that cannot write into a
    directory is the case a permission bit cannot make."""
    import subprocess
    d = tmp_path / "immutable"
    d.mkdir()
    done = subprocess.run(["chattr", "+i", str(d)], capture_output=True, text=True)
    assert done.returncode == 0, f"chattr +i {d} failed ({done.stderr.strip()}): needs root and an ext4/xfs /tmp"
    yield d
    subprocess.run(["chattr", "-i", str(d)], capture_output=True)


def test_unwritable_output_fails_before_any_work(llama_copy, tiny_chat_model_dir, chat_data, immutable_dir, tmp_path,
                                                 capsys):
    (tmp_path / "a-file").write_text("x")
    cases = [(immutable_dir / "out", f"cannot write there (Operation not permitted: {immutable_dir})"),
             (tmp_path / "a-file" / "out", f"cannot write there ({tmp_path / 'a-file'} is not a directory)"),
             ("/proc/prunekit-out", "cannot write there (No such file or directory: /proc)")]
    for out, message in cases:
        code, _, err = run_cli(capsys, "prune", llama_copy, "--drop-text", "1", "-o", out)
        assert code == 2 and err == f"prunekit prune: error: -o {out}: {message}\n", err
    for flag, value, message in [("--output-dir", immutable_dir / "out", f"-o {immutable_dir / 'out'}: cannot write"),
                                 ("--set", f"storage_path={immutable_dir}", f"storage_path {immutable_dir}: cannot")]:
        argv = sft_args(tiny_chat_model_dir, chat_data, tmp_path, "out")
        at = argv.index(flag) + 1 if flag == "--output-dir" else argv.index(f"storage_path={tmp_path / 'runs'}")
        argv[at] = value
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and message in err and len(error_lines(err)) == 1, err
        assert not (tmp_path / "runs").exists() and not (tmp_path / "out").exists()
    assert not list(immutable_dir.iterdir())


# ---- 13. a knockout that fails before any trial does not claim its name ----------------------------------------------

def test_knockout_that_fails_before_its_trials_does_not_claim_the_name(tiny_chat_model_dir, chat_data, tmp_path):
    from prunekit import PrunekitError
    from prunekit.config import load_config
    from prunekit.stages.knockout import knockout, validate
    train, val = chat_data

    def cfg(**over):
        return load_config("knockout", None, {
            "model": str(tiny_chat_model_dir), "train": str(train), "val": str(val), "name": "ko",
            "output_dir": str(tmp_path / "report"), "storage_path": str(tmp_path / "runs"), "max_steps": 2,
            "batch_size": 2, "wandb.mode": "disabled", **over})
    with pytest.raises(PrunekitError, match="no row with supervised tokens"):
        knockout(cfg(max_length=32, eval_max_samples=4))  # no val row fits in 32 tokens: found after validation
    assert not (tmp_path / "runs" / "ko" / "sweep.json").exists() and not (tmp_path / "report").exists()
    validate(cfg(max_length=64, eval_max_samples=8))  # the corrected config may use the name
    # a name claimed by a run whose trials never started binds nothing either
    (tmp_path / "runs" / "ko").mkdir(parents=True, exist_ok=True)
    (tmp_path / "runs" / "ko" / "sweep.json").write_text(json.dumps({"name": "ko", "trial_settings": {"lr": 1}}))
    validate(cfg(max_length=64))
    (tmp_path / "runs" / "ko" / "trials" / "baseline").mkdir(parents=True)
    (tmp_path / "runs" / "ko" / "trials" / "baseline" / "result.json").write_text("{}")
    with pytest.raises(PrunekitError, match="its trials cannot be reused"):
        validate(cfg(max_length=64))


# ---- 16. minor -----------------------------------------------------------------------------------------------------

def test_a_pretty_printed_json_object_is_not_called_invalid_json(tmp_path):
    from prunekit.core.data import DataError, load_messages
    f = tmp_path / "one.json"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}, indent=2))
    with pytest.raises(DataError) as e:
        load_messages(f)
    assert str(e.value) == f"{f}: one JSON object, not rows: give a JSON list of rows or JSONL (one row per line)"
    f.write_text('{"messages": [\n  oops')
    with pytest.raises(DataError, match="row 1: invalid JSON"):
        load_messages(f)


def test_all_empty_assistant_replies_warn(tiny_chat_model_dir, tmp_path, capsys):
    train = tmp_path / "empty-replies.jsonl"
    train.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                      {"role": "assistant", "content": ""}]}) + "\n"
                             for i in range(4)))
    code, _, err = run_cli(capsys, *sft_args(tiny_chat_model_dir, (train, None), tmp_path, "out", "--set",
                                             "max_length=64"))  # the default system prompt alone is ~30 tokens
    assert code == 0, err
    assert [line for line in error_lines(err) if "warning" in line] == [
        f"prunekit: warning: train {train}: every assistant reply is empty; the model only learns to end its turn"]


def test_provenance_records_a_symlinked_parent_as_an_absolute_path(llama_copy, tmp_path, capsys, monkeypatch):
    (tmp_path / "link").symlink_to("model")  # a relative symlink
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "prune", "link", "--drop-text", "1", "-o", "out")
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "prunekit.json").read_text())["parent"] == str(llama_copy.resolve())


# ---- 14. image rows on a text-only model -----------------------------------------------------------------------

def test_image_rows_on_a_text_only_model_are_one_line(tiny_chat_model_dir, tmp_path, capsys):
    from PIL import Image
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]},
            {"messages": [{"role": "user", "content": "<image>what is it?"}, {"role": "assistant", "content": "a box"}],
             "images": [str(image)]}]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = run_cli(capsys, *sft_args(tiny_chat_model_dir, (train, None), tmp_path, "out"))
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1, err
    assert f"{train} row 2: has images, but" in lines[0] and "text-only model" in lines[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


# ---- signals and leftovers (4-7): a real `prunekit` process, a real signal ----------------------------------------

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
_started: list = []  # the prunekit processes a test started


@pytest.fixture(autouse=True)
def _no_process_outlives_its_test():
    """A test that fails before its signal leaves a paused prunekit behind: its session is killed (only it)."""
    import os
    import signal
    yield
    while _started:
        proc = _started.pop()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if getattr(proc, "ray_tmp", None):
            shutil.rmtree(proc.ray_tmp, ignore_errors=True)


def start_cli(argv, tmp_path, patch: str = "", env: dict | None = None):
    """`prunekit ARGV` in a subprocess of its own session, after `patch` (Python run first: a hook that pauses the
    command at the moment a signal should hit it). Returns the Popen (stdout and stderr to files in tmp_path)."""
    import os
    import subprocess
    import sys
    script = f"{patch}\nfrom prunekit.cli import entry\nentry({[str(a) for a in argv]!r})\n"
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
                **(env or {})}
    full_env.pop("RAY_ADDRESS", None)
    n = len(list(tmp_path.glob("cli-*.err")))
    with open(tmp_path / f"cli-{n}.out", "w") as out, open(tmp_path / f"cli-{n}.err", "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, env=full_env, start_new_session=True,
                                stdout=out, stderr=err)
    proc.err_path = tmp_path / f"cli-{n}.err"
    _started.append(proc)
    return proc


def finish(proc, timeout=180) -> tuple[int, str]:
    """Wait for the process; (exit code, its stderr). A process still running is killed (its session only)."""
    import os
    import signal
    import subprocess
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"prunekit did not exit within {timeout}s") from None
    return code, proc.err_path.read_text()


def wait_for(predicate, proc, timeout=240, what="the moment to signal"):
    import time
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
    import time
    deadline = time.time() + timeout
    while (alive := processes_with_marker(marker)) and time.time() < deadline:
        time.sleep(0.5)
    assert not alive, [f"{p.pid} {p.name()} ppid={p.ppid()}" for p in alive]


SIGNALS = {"SIGTERM": (15, 143, "terminated"), "SIGINT": (2, 130, "interrupted")}


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signal_mid_checkpoint_keeps_the_last_complete_one(sig, tiny_chat_model_dir, chat_data, tmp_path):
    """launcher local: the signal arrives while step 2's checkpoint is being written (its files are there, its
    manifest not yet): step 1's checkpoint stays, step 2's partial one is removed, one line, 143 / 130."""
    import os
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
    rc, err = finish(proc)
    assert rc == code and error_lines(err) == [f"prunekit sft: {word}"], err
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000001"]
    assert checkpoint_problem(ckpts / "step-0000001") is None
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    assert not list((tmp_path / "runs").glob(".*.lock"))
    assert_no_survivors(marker)


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


@pytest.mark.parametrize("command", [["prune", "--drop-text", "1"], ["kv-cut", "--kv-heads", "1"]])
def test_sigterm_during_surgery_leaves_no_temp_dir(command, llama_copy, tmp_path):
    """SIGTERM while OUT's temp dir holds half the output: the temp dir goes, OUT is not written, 143."""
    import os
    ready = tmp_path / "ready"
    proc = start_cli([command[0], llama_copy, *command[1:], "-o", tmp_path / "out", "--streaming"], tmp_path,
                     patch=pause_at("prunekit.core.streaming", "apply_streaming", ready))
    wait_for(ready.exists, proc)
    (partial,) = tmp_path.glob(".out.tmp-*")
    assert any(partial.iterdir())
    os.kill(proc.pid, 15)
    rc, err = finish(proc)
    assert rc == 143 and err == f"prunekit {command[0]}: terminated\n", err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*")), list(tmp_path.iterdir())


def test_the_next_run_sweeps_stale_temp_dirs_of_a_dead_writer(llama_copy, tmp_path, capsys):
    """What a `kill -9` leaves (.out.tmp-PID@HOST-*) is removed by the next run of the same OUT when PID is dead on
    this host; a live writer's, another host's and another OUT's temp dirs stay."""
    import os
    import socket
    import subprocess
    import sys
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    stale = [tmp_path / f".out.tmp-{dead.pid}@{host}-abc123", tmp_path / f".out.probe-{dead.pid}@{host}-x"]
    kept = [tmp_path / f".out.tmp-{os.getpid()}@{host}-live", tmp_path / f".out.tmp-{dead.pid}@other-host-q",
            tmp_path / f".outer.tmp-{dead.pid}@{host}-z"]
    for d in stale + kept:
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half")
    code, _, err = run_cli(capsys, "prune", llama_copy, "--drop-text", "1", "-o", tmp_path / "out")
    assert code == 0, err
    assert not any(d.exists() for d in stale) and all(d.exists() for d in kept)


# ---- 12. one writer per run directory and output ---------------------------------------------------------------

def test_a_second_identical_run_fails_at_once_naming_the_holder(tiny_chat_model_dir, chat_data, tmp_path, capsys):
    import os
    import socket
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


# ---- 15. a huge row costs what a short one does ----------------------------------------------------------------

def test_a_multi_megabyte_row_does_not_grow_memory(tiny_chat_model_dir, tmp_path):
    """Rows are cut by characters before tokenising, then to max_length tokens: tokenising a 4 MB conversation and
    a 4 MB text row at max_length 32 raises the peak RSS of a fresh process by a few MB (the whole rows tokenised:
    ~700 MB), and gives the tokens of the whole rows."""
    import subprocess
    import sys
    script = f"""
import json, resource
from transformers import AutoTokenizer
from prunekit.core.samples import tokenize
tok = AutoTokenizer.from_pretrained({str(tiny_chat_model_dir)!r})
big = "lorem ipsum dolor sit amet, consectetur adipiscing elit " * 75000
rows = [{{"messages": [{{"role": "user", "content": big}}, {{"role": "assistant", "content": "ok"}}]}},
        {{"text": big}}]
short = [{{"messages": [{{"role": "user", "content": big[:20000]}}, {{"role": "assistant", "content": "ok"}}]}},
         {{"text": big[:20000]}}]
expected = tokenize(tok, short, 32, model='m')
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
got = tokenize(tok, rows, 32, model='m')
grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({{"mb": len(big) / 1e6, "grew_kb": grew, "same": got == expected, "n": len(got[0]["input_ids"])}}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["mb"] > 4 and result["n"] == 32 and result["same"], result
    assert result["grew_kb"] < 32 * 1024, result  # KB


def test_an_interrupted_fit_removes_only_the_partial_checkpoints_it_made(tiny_chat_model_dir, tmp_path):
    """What a worker stopped mid-upload leaves in the run directory (no manifest yet, or a short file) goes; an
    older checkpoint, whole or not, and this fit's whole ones stay."""
    import os
    import time
    from prunekit.distributed.train import remove_partial_checkpoints
    from prunekit.engine.manifest import write_manifest
    run_dir = tmp_path / "run"

    def checkpoint(name, manifest=True, truncate=False):
        d = run_dir / name
        shutil.copytree(tiny_chat_model_dir, d / "hf")
        if manifest:
            write_manifest(d)
        if truncate:
            with open(d / "hf" / "model.safetensors", "r+b") as f:
                f.truncate(1000)
        return d
    old = [checkpoint("checkpoint_old_whole"), checkpoint("checkpoint_old_unlisted", manifest=False)]
    for d in old:
        os.utime(d, (time.time() - 3600, time.time() - 3600))
    started = time.time() - 1
    whole = checkpoint("checkpoint_new_whole")
    partial = [checkpoint("checkpoint_new_no_manifest", manifest=False),
               checkpoint("checkpoint_new_short", truncate=True)]
    (run_dir / "checkpoint_manager_snapshot.json").write_text("{}")
    remove_partial_checkpoints(run_dir, started)
    assert all(d.is_dir() for d in old + [whole]) and not any(d.exists() for d in partial)
    assert (run_dir / "checkpoint_manager_snapshot.json").is_file()


# ---- a Ray without its dashboard packages -------------------------------------------------------------------------

def test_a_local_ray_without_dashboard_packages_starts_without_the_dashboard(monkeypatch, capsys):
    """ray.init(include_dashboard=True) refuses on a Ray installed without ray[default] (seen on a GPU image): the
    local start goes on without the dashboard and says so in one line; any other start error still raises."""
    import ray
    from prunekit.distributed import cluster
    calls = []

    def init(**kwargs):
        calls.append(kwargs)
        if kwargs["include_dashboard"]:
            raise Exception("Cannot include dashboard with missing packages.")

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(cluster, "existing_cluster_address", lambda: None)
    monkeypatch.setattr(cluster, "_started_local", False)  # restored afterwards: stop_local stops nothing of ours
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster.connect() == "local" and cluster._started_local
    assert [c["include_dashboard"] for c in calls] == [True, False]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "warning" in err[0] and "without the dashboard" in err[0]

    def broken(**kwargs):
        raise RuntimeError("Failed to bind to 127.0.0.1:8265")

    monkeypatch.setattr(ray, "init", broken)
    monkeypatch.setattr(cluster, "_started_local", False)
    with pytest.raises(RuntimeError, match="Failed to bind"):
        cluster.connect()
    assert not cluster._started_local and capsys.readouterr().err == ""
