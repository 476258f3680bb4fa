"""bench/real_sizes.py's smoke path: one knockout row end to end on the CPU, with the plan's figures beside it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_smoke_knockout_row_records_peak_and_plan_ratio(tmp_path):
    out = tmp_path / "real_sizes_smoke.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "real_sizes.py"), "--smoke", "--only",
                           "knockout_lora_1.5b", "--out", str(out), "--workdir", str(tmp_path / "work")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(out.read_text())
    row = record["results"]["knockout_lora_1.5b"]
    assert "error" not in row and "skipped" not in row, row
    assert row["peak_allocated_gib"] > 0 and row["plan_peak_gib"] > 0
    assert row["plan_over_measured"] == row["plan_peak_gib"] / row["peak_allocated_gib"]
    assert row["trial_wall_s"] > 0 and row["tokens_per_s"] > 0 and row["params_trainable"] > 0
    assert record["measured_now"] == ["knockout_lora_1.5b"]
