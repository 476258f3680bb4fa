"""What a run reports: wandb's mode from the environment, and the test-only fault hook that reaches Ray workers."""
from __future__ import annotations


def test_fault_hook_reads_the_environment_and_travels_to_workers(monkeypatch):
    from prunekit.engine.reporting import apply_fault_env, fault_env, injected_faults
    monkeypatch.delenv("PRUNEKIT_TEST_CRASH_AT_STEP", raising=False)
    monkeypatch.delenv("PRUNEKIT_TEST_FAIL_CANDIDATES", raising=False)
    assert injected_faults() == (None, []) and fault_env() == {}
    monkeypatch.setenv("PRUNEKIT_TEST_CRASH_AT_STEP", "3")
    monkeypatch.setenv("PRUNEKIT_TEST_FAIL_CANDIDATES", "text:1; vision:0,1")
    assert injected_faults() == (3, ["text:1", "vision:0,1"])
    sent = fault_env()
    assert sent == {"PRUNEKIT_TEST_CRASH_AT_STEP": "3", "PRUNEKIT_TEST_FAIL_CANDIDATES": "text:1; vision:0,1"}
    apply_fault_env({})  # a worker of a run without faults drops what an earlier run left in its process
    assert injected_faults() == (None, [])
    apply_fault_env(sent)
    assert injected_faults() == (3, ["text:1", "vision:0,1"])


def test_wandb_auto_follows_wandb_mode_and_wandb_disabled(monkeypatch, tmp_path):
    """`wandb.mode: auto` takes wandb's own environment convention first; an explicit mode in the config wins."""
    from types import SimpleNamespace

    from prunekit.engine.reporting import RunLogger, wandb_mode
    for var in ("WANDB_MODE", "WANDB_DISABLED", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    assert wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "not-a-key")
    assert wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode("auto") == "offline" and wandb_mode("online") == "online"
    monkeypatch.setenv("WANDB_DISABLED", "true")
    assert wandb_mode("auto") == "disabled" and wandb_mode("offline") == "offline"
    # a run under WANDB_DISABLED starts no wandb run at all
    logger = RunLogger(tmp_path, "run", SimpleNamespace(wandb=SimpleNamespace(mode="auto", project="p")))
    logger.progress_bar = False
    logger.start(0, 1)
    logger.log(1, {"train/loss": 1.0})
    logger.finish()
    assert logger.wandb is None and (tmp_path / "metrics.jsonl").read_text().count("\n") == 1


def test_wandb_auto_is_disabled_where_wandb_is_not_installed(monkeypatch, tmp_path):
    """A Ray worker image without wandb (the GPU box's: every knockout trial died importing it) trains under the
    default `auto`; asking for online/offline there is a one-line config error, before anything runs."""
    import importlib.util
    from types import SimpleNamespace

    import pytest

    from prunekit.config import WandbConfig
    from prunekit.engine.reporting import RunLogger, wandb_mode
    for var in ("WANDB_MODE", "WANDB_DISABLED", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else
                        real_find_spec(name, *a))
    assert wandb_mode("auto") == "disabled"
    logger = RunLogger(tmp_path, "run", SimpleNamespace(wandb=WandbConfig()))
    logger.progress_bar = False
    logger.start(0, 1)
    logger.log(1, {"train/loss": 1.0})
    logger.finish()
    assert logger.wandb is None and (tmp_path / "metrics.jsonl").is_file()
    with pytest.raises(ValueError, match="offline needs the wandb package"):
        WandbConfig(mode="offline")
    monkeypatch.undo()
    assert WandbConfig(mode="offline").mode == "offline"   # installed here: the explicit mode stands


def test_a_log_file_gets_the_attempts_start_cost_once_and_a_bar_that_does_not_bury_it(tmp_path, capsys):
    """Written to a file (a job log, `... 2>&1 | tail`), the bar redraws at most every QUIET_BAR_SECONDS instead of
    once per step, the first training step of an attempt says on stdout what loading and compiling cost, and every
    metrics line carries its wall-clock time (how an attempt's steps per second are read back)."""
    import json
    from types import SimpleNamespace

    from prunekit.engine.reporting import QUIET_BAR_SECONDS, RunLogger
    logger = RunLogger(tmp_path, "run", SimpleNamespace(wandb=SimpleNamespace(mode="disabled", project="p")))
    logger.mark("models")
    logger.mark("data")
    logger.start(0, 3000)
    logger.log(0, {"eval/loss": 2.0})   # the step-0 baseline is not a training step
    for step in range(1, 3001):
        logger.log(step, {"train/loss": 1.0 / step, "train/token_acc": 0.5})
    logger.finish()
    out, err = capsys.readouterr()
    assert QUIET_BAR_SECONDS >= 10 and err.count("step/s") <= 6   # 3,000 steps in well under QUIET_BAR_SECONDS
    assert out.count("after this attempt began") == 1 and "run: step 1 done" in out
    assert "(loading 0s: models 0s, data 0s, checkpoint and setup 0s; then compiling" in out   # split at the marks
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(3001))
    assert all(abs(x["time"] - lines[0]["time"]) < 60 for x in lines)
    assert all(b["time"] >= a["time"] for a, b in zip(lines, lines[1:]))


def test_the_bar_times_steps_from_an_attempts_first_step(tmp_path, capsys):
    """A resumed attempt that spent a minute loading and compiling shows the steps' own rate, not one step a minute
    (a 40-hour ETA on a resumed GPU run before), and its bar still ends with its last count and a newline, so a
    line printed after it (`interrupted ...`) is a line of its own."""
    from types import SimpleNamespace

    from prunekit.engine.reporting import RunLogger
    logger = RunLogger(tmp_path, "run", SimpleNamespace(wandb=SimpleNamespace(mode="disabled", project="p")))
    logger.start(3261, 14000)
    logger.bar.start_t -= 60          # the minute before this attempt's first step
    logger.log(3262, {"train/loss": 1.0})
    for step in range(3263, 3363):
        logger.log(step, {"train/loss": 1.0})
    meter = logger.bar.format_dict
    logger.abort()
    assert meter["initial"] == 3262 and meter["n"] == 3362
    err = capsys.readouterr().err
    assert err.endswith("\n") and err.rsplit("\r", 1)[-1].startswith("run:  24%|") and "3362/14000" in err
    assert meter["elapsed"] < 30      # the minute before the first step is not in the rate: 100 steps in < 30 s
