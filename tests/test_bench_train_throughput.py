"""bench/train_throughput.py's `--packed` rows: what the engine trains on in a real recovery run (several documents
per row, position ids restarting), and the distillation smoke over them on the CPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.train_throughput import samples  # noqa: E402


def test_packed_rows_hold_several_documents_of_at_most_seq_tokens():
    rows = samples(12, 128, 1000, packed=True)
    assert len(rows) == 12
    for row in rows:
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"]) <= 128
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        assert len(starts) >= 2 and starts[0] == 0
        assert all(row["labels"][i] == -100 for i in starts)   # no label asks across a document boundary
    plain = samples(3, 128, 1000)   # the committed rows: one causal sequence of seq tokens each
    assert all(r["labels"] == r["input_ids"] and len(r["input_ids"]) == 128 and "position_ids" not in r for r in plain)


def test_packed_distillation_smoke_runs_on_cpu(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "train_throughput.py"), "--smoke", "--mode", "distill",
                           "--packed", "--out", str(tmp_path / "t.json")], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[len("RESULT "):])
    assert result["tokens_per_s"] > 0 and result["first_step_loss"] > 0
    bad = subprocess.run([sys.executable, str(ROOT / "bench" / "train_throughput.py"), "--mode", "hf", "--packed"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "--packed" in bad.stderr.splitlines()[-1]
