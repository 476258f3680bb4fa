"""bench/outcome_smollm2.py (and the probes that share its `run_as_script`): a second copy of the same run, bad input
and Ctrl-C / kill each end it with one line and an exit code, and nothing in --out is touched by the second copy."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from prunekit import PrunekitError
from tests.conftest import REPO

sys.path.insert(0, str(REPO))
from bench.outcome_smollm2 import run_as_script  # noqa: E402


@pytest.mark.parametrize("raised, code, line", [
    (PrunekitError("--out /x: in use by someone"), 2, "outcome_smollm2: error: --out /x: in use by someone\n"),
    (KeyboardInterrupt("at step 3, checkpoint written: the same command resumes"), 130,
     "outcome_smollm2: interrupted (at step 3, checkpoint written: the same command resumes)\n"),
    (KeyboardInterrupt(), 130, "outcome_smollm2: interrupted (the same command resumes)\n"),
])
def test_a_bench_ends_with_one_line_and_an_exit_code(raised, code, line, capsys):
    def main():
        raise raised
    with pytest.raises(SystemExit) as stop:
        run_as_script(main, "outcome_smollm2")
    assert stop.value.code == code and capsys.readouterr().err == line


def test_a_second_copy_of_the_same_run_stops_before_touching_its_out(tmp_path):
    from prunekit.core import locks
    out = tmp_path / "outcome-smoke"   # --smoke writes to OUT-smoke
    out.mkdir()
    (out / "results.json").write_text("{}")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom prunekit.core import locks\n"
                               f"locks.command = 'bench/outcome_smollm2.py'\nlocks.acquire({str(out)!r}, '--out')\n"
                               "print('held', flush=True)\ntime.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline() == "held\n"
        second = subprocess.run([sys.executable, str(REPO / "bench" / "outcome_smollm2.py"), "--smoke", "--out",
                                 str(tmp_path / "outcome"), "--data", str(tmp_path / "data")],
                                capture_output=True, text=True, timeout=120)
    finally:
        holder.kill()
        holder.wait()
    assert second.returncode == 2, second.stderr
    assert second.stderr == (f"outcome_smollm2: error: --out {out}: in use by bench/outcome_smollm2.py (pid "
                             f"{holder.pid} on host {os.uname().nodename}, since ") + second.stderr.split("since ")[1]
    assert second.stderr.endswith("; wait for it to finish or stop it\n") and second.stdout == ""
    assert sorted(p.name for p in out.iterdir()) == ["results.json"] and not (tmp_path / "data").exists()
    with locks.hold((out, "--out")):   # the holder's death freed it
        pass


def test_a_probe_without_its_data_files_stops_with_one_line_naming_the_flag(tmp_path):
    corpus = tmp_path / "teacher.jsonl"
    corpus.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n')
    (tmp_path / "data").mkdir()
    probe = [sys.executable, str(REPO / "bench" / "recovery_probe_smollm2.py"), "--smoke", "--out", str(tmp_path / "p")]
    for flags, line in [(["--data", str(tmp_path / "data"), "--corpus", str(tmp_path / "none.jsonl")],
                         f"--corpus {tmp_path / 'none.jsonl'}: no such file"),
                        (["--data", str(tmp_path / "data"), "--corpus", str(corpus)],
                         f"--data {tmp_path / 'data'}: no general-train.jsonl (a folder `outcome_smollm2.py --prepare "
                         f"--data DIR` wrote)")]:
        run = subprocess.run(probe + flags, capture_output=True, text=True, timeout=120)
        assert run.returncode == 2 and run.stderr.splitlines()[-1] == f"recovery_probe_smollm2.py: error: {line}"
    assert not (tmp_path / "p").exists()


def test_step_timing_reads_each_attempts_stretch_from_the_metrics_log(tmp_path):
    """The outcome report's distill_timing: step-time percentiles and one stretch per attempt, from the times the
    loop writes on every metrics line (a resumed attempt repeats no step here, but starts minutes later)."""
    import json
    from bench.outcome_smollm2 import step_timing
    lines = [{"step": 0, "time": 100.0, "eval/loss": 3.0}]
    lines += [{"step": s, "time": 130.0 + 0.04 * s, "train/loss": 1.0} for s in range(1, 101)]
    lines += [{"step": s, "time": 500.0 + 0.05 * (s - 100), "train/loss": 1.0} for s in range(101, 201)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    timing = step_timing(path)
    assert [s["steps"] for s in timing["stretches"]] == [[1, 100], [101, 200]]
    assert timing["stretches"][0]["seconds"] == pytest.approx(4.0)   # 3.96, to 0.1 s
    assert timing["step_ms"]["p10"] == pytest.approx(40.0) and timing["step_ms"]["p90"] == pytest.approx(50.0)
    path.write_text(json.dumps({"step": 1, "train/loss": 1.0}) + "\n")   # a log from before the times
    assert step_timing(path) is None


def test_step_timing_reads_each_attempts_start_from_what_the_loop_logged(tmp_path):
    """The loop's logger records an attempt's loading and compiling on its first step's metrics line; the report's
    distill_timing reads them back, one per attempt, a resumed one included."""
    from types import SimpleNamespace

    from bench.outcome_smollm2 import step_timing
    from prunekit.engine.reporting import RunLogger
    cfg = SimpleNamespace(wandb=SimpleNamespace(mode="disabled", project="p"))
    for first, last in ((1, 50), (51, 100)):   # the second attempt resumes from step 50's checkpoint
        logger = RunLogger(tmp_path, "run", cfg)
        logger.progress_bar = False
        logger.mark("models")
        logger.mark("data")
        logger.start(first - 1, 100)
        for step in range(first, last + 1):
            logger.log(step, {"train/loss": 1.0})
        logger.finish()
    starts = step_timing(tmp_path / "metrics.jsonl")["attempt_starts"]
    assert [s["at_step"] for s in starts] == [0, 50]
    assert all(set(s) == {"at_step", "loading_s", "models_s", "data_s", "checkpoint_and_setup_s",
                          "compile_and_first_steps_s"} and 0 <= s["loading_s"] < 5 for s in starts)
