"""bench/pipeline_smollm2.py: the recipe's own header commands, a signal passed on to the running step once, and
the report from a run's state files."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from bench import pipeline_smollm2 as bench
from prunekit import PrunekitError
from tests.conftest import REPO


def test_the_steps_are_the_commands_in_the_recipes_header():
    commands = bench.recipe_commands(REPO / "recipes" / "pipeline.yaml")
    names = [bench.step_name(c) for c in commands]
    assert names == ["data chatterbot -> data/chat-train.jsonl", "data general -> data/general-train.jsonl",
                     "data generate -> data/teacher.jsonl", "data openings -> data/openings.jsonl",
                     "data generate -> data/teacher-prose.jsonl", "data text -> data/python-code.jsonl",
                     "mix -> data/recovery.jsonl"]
    # the trailing comment is dropped, a command continued over two lines is one
    assert commands[0] == "prunekit data chatterbot -o data/chat-train.jsonl --val data/val.jsonl --val-fraction 0.2"
    assert commands[2].endswith("-o data/teacher.jsonl --rows 32768 --max-new-tokens 256")
    assert commands[-1].startswith("cat data/teacher.jsonl ") and commands[-1].endswith("> data/recovery.jsonl")
    smoke = bench.smoke_command(commands[4])
    assert "--rows 8" in smoke and smoke.endswith("--max-new-tokens 16")


def _signal_self_after(seconds: float, signum: int, times: int = 1):
    def fire():
        time.sleep(seconds)
        for _ in range(times):
            os.kill(os.getpid(), signum)
    threading.Thread(target=fire, daemon=True).start()


def test_a_signal_reaches_the_running_step_once_and_the_bench_stops_after_it(tmp_path):
    """`timeout` signals its command twice; the step (in its own process group) gets one signal, stops on its own
    terms (here: a trap that writes a line and exits 130), and only then does the bench stop."""
    step = ("trap 'echo got >> seen; sleep 0.5; echo done >> seen; exit 130' INT; echo started > seen; "
            "for i in $(seq 200); do sleep 0.05; done")   # 10 s, then exit 0: a signal never passed on shows
    _signal_self_after(1.0, signal.SIGINT, times=2)
    with pytest.raises(KeyboardInterrupt, match="step `loop` stopped \\(exit 130\\)"):
        bench.run_step("loop", step, tmp_path, dict(os.environ))
    assert (tmp_path / "seen").read_text().split() == ["started", "got", "done"]


def test_a_failing_step_is_one_line_naming_it(tmp_path):
    with pytest.raises(PrunekitError) as e:
        bench.run_step("data text -> x.jsonl", "echo oops >&2; exit 3", tmp_path, dict(os.environ))
    assert str(e.value) == "step `data text -> x.jsonl` failed with exit status 3 (its own message is above)"


def test_the_report_is_rebuilt_from_a_runs_state_files(tmp_path, monkeypatch):
    """The committed GPU run's report comes from its state files (--report-only): the same rows again."""
    logs = REPO / "bench" / "results" / "pipeline_smollm2_logs"
    committed = json.loads((REPO / "bench" / "results" / "pipeline_smollm2.json").read_text())
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    assert bench.main(["--report-only", str(logs), "--machine", "NVIDIA H200"]) == 0
    rebuilt = json.loads((tmp_path / "pipeline_smollm2.json").read_text())
    assert rebuilt["stages"] == committed["stages"] and rebuilt["status"] == committed["status"]
    state = json.loads((logs / "pipeline_state.json").read_text())
    last = [s for s in state["stages"] if "eval" in s][-1]
    assert rebuilt["last_model"]["stage"] == last["id"]
    assert rebuilt["last_model"]["general_text_vs_original"] == pytest.approx(
        last["eval_text"]["token_acc"] / state["original"]["eval_text"]["token_acc"])
