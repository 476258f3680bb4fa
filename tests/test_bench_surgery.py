"""bench/surgery_memory.py's shapes: the streamed checkpoint writer and the `--shape tiny` dry run of the 7b path."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _bench():
    spec = importlib.util.spec_from_file_location("surgery_memory", ROOT / "bench" / "surgery_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_streamed_checkpoint_loads_and_matches_the_config(tmp_path):
    from safetensors import safe_open
    from prunekit.core import report
    from prunekit.core.memory_plan import model_shape
    bench = _bench()
    for shape in ("tiny", "7b"):  # the 7b config only: its parameter count, never its weights
        cfg = bench.SHAPES[shape]["config"]
        assert sum(torch.Size(s).numel() for _, s in bench.tensor_specs(cfg)) == model_shape(cfg).params
    assert model_shape(bench.SHAPES["7b"]["config"]).params == 7_615_616_512
    for dtype in ("bfloat16", "float32"):
        d = tmp_path / dtype
        cfg = bench.SHAPES["tiny"]["config"]
        sizes = bench.write_checkpoint(d, cfg, shard_bytes=5 * 1000 ** 2 * (2 if dtype == "float32" else 1),
                                       dtype=dtype)
        assert len(sizes) >= 4 and report.describe(d)["params"]["total"] == model_shape(cfg).params
        index = json.loads((d / "model.safetensors.index.json").read_text())
        name = "model.layers.0.self_attn.k_proj.weight"
        with safe_open(d / index["weight_map"][name], "pt") as f:
            t = f.get_tensor(name)
        assert t.dtype == getattr(torch, dtype) and t.shape == (256, 256)  # 4 KV heads x 64
        assert 0.015 < t.float().std().item() < 0.025  # N(0, 0.02)
        with safe_open(d / index["weight_map"]["model.norm.weight"], "pt") as f:
            assert bool((f.get_tensor("model.norm.weight") == 1).all())


def test_tiny_shape_dry_run(tmp_path):
    out = tmp_path / "tiny.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "surgery_memory.py"), "--shape", "tiny",
                           "--workdir", str(tmp_path / "work"), "--out", str(out)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert set(result["runs"]) == {"streaming_prune", "streaming_kv_cut"}
    assert result["surgeries"]["streaming_kv_cut"] == "kv heads 4 -> 2, mean"
    params = result["checkpoint"]["params"]
    layer = (256 * 256 * 2 + 2 * 256 * 256 + 256 * 3 + 3 * 256 * 704 + 2 * 256)  # q, o; k, v (4 KV heads); biases
    assert result["runs"]["streaming_prune"]["params_after"] == params - 4 * layer
    assert result["runs"]["streaming_kv_cut"]["params_after"] == params - 8 * (2 * 128 * 256 + 2 * 128)
    for run in result["runs"].values():
        assert run["peak_rss"] >= run["import_baseline_rss"] > 0 and run["seconds"] >= 0
    assert list((tmp_path / "work").iterdir()) == []  # the checkpoint is deleted without --keep
