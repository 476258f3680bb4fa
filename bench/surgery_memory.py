"""Peak memory of streaming vs in-memory surgery on a ~2 GB checkpoint.

Writes a random fp32 checkpoint shaped like Qwen2.5-0.5B (hidden 896, 24 layers, 14 heads, 2 KV heads,
intermediate 4864, vocab 151936, tied embeddings) as ~500 MB safetensors shards, then runs each measured surgery in
a fresh Python process and reads that process's own peak RSS (VmHWM) and its RSS right after imports:

  a) streaming prune, 4 text layers dropped      b) streaming kv-cut 2 -> 1 (mean)      c) in-memory prune (as a)

The issue's goal: the peak RSS of streaming surgery is at most 1.5x the largest input shard. Results go to
bench/results/surgery_memory.json (and stdout).

    python bench/surgery_memory.py [--workdir DIR] [--keep] [--out bench/results/surgery_memory.json]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOAL_RATIO = 1.5
SHARD_BYTES = 500 * 1000**2
DROP_TEXT = "4,9,14,19"  # 4 of 24 layers

CONFIG = dict(
    architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=896, intermediate_size=4864,
    num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
    max_position_embeddings=32768, max_window_layers=24, rms_norm_eps=1e-6, hidden_act="silu",
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, use_sliding_window=False,
    sliding_window=None, layer_types=["full_attention"] * 24, tie_word_embeddings=True, attention_dropout=0.0,
    bos_token_id=151643, eos_token_id=151643, initializer_range=0.02, use_cache=True, dtype="float32",
)


# ---- measured child ----------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(mode: str, src: str, out: str) -> None:
    """Run one surgery in this (fresh) process and print {baseline, peak} RSS as JSON on the last line."""
    from prunekit.stages.kv_cut import kv_cut
    from prunekit.stages.prune import prune
    if mode == "in_memory_prune":  # the in-memory path needs transformers: count its import in the baseline
        import transformers  # noqa: F401
        from transformers import Qwen2ForCausalLM  # noqa: F401
    baseline = _status_kib("VmRSS") * 1024
    t0 = time.perf_counter()
    if mode == "streaming_prune":
        result = prune(src, out, drop_text=DROP_TEXT, streaming=True)
    elif mode == "streaming_kv_cut":
        result = kv_cut(src, out, kv_heads=1, streaming=True)
    elif mode == "in_memory_prune":
        result = prune(src, out, drop_text=DROP_TEXT, streaming=False)
    else:
        raise SystemExit(f"unknown mode {mode}")
    seconds = time.perf_counter() - t0
    assert result.streaming == mode.startswith("streaming")
    print(json.dumps({"import_baseline_rss": baseline, "peak_rss": _status_kib("VmHWM") * 1024,
                      "seconds": round(seconds, 2), "params_after": result.after["params"]["total"]}))


# ---- checkpoint --------------------------------------------------------------------------------------------------
def tensor_specs(cfg: dict) -> list[tuple[str, list[int]]]:
    """Checkpoint names and shapes of a Qwen2ForCausalLM with tied embeddings (no lm_head.weight), in HF order."""
    h, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    head_dim = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * head_dim
    specs = [("model.embed_tokens.weight", [vocab, h])]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        specs += [(p + "input_layernorm.weight", [h]),
                  (p + "self_attn.q_proj.weight", [h, h]), (p + "self_attn.q_proj.bias", [h]),
                  (p + "self_attn.k_proj.weight", [kv, h]), (p + "self_attn.k_proj.bias", [kv]),
                  (p + "self_attn.v_proj.weight", [kv, h]), (p + "self_attn.v_proj.bias", [kv]),
                  (p + "self_attn.o_proj.weight", [h, h]),
                  (p + "post_attention_layernorm.weight", [h]),
                  (p + "mlp.gate_proj.weight", [inter, h]), (p + "mlp.up_proj.weight", [inter, h]),
                  (p + "mlp.down_proj.weight", [h, inter])]
    specs.append(("model.norm.weight", [h]))
    return specs


def write_checkpoint(path: Path, cfg: dict, shard_bytes: int = SHARD_BYTES) -> list[int]:
    """Random fp32 weights, generated and written one shard at a time; returns the shard sizes (bytes on disk)."""
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    specs = tensor_specs(cfg)
    groups, cur, cur_bytes = [], [], 0  # greedy packing in order; a tensor larger than a shard gets its own
    for name, shape in specs:
        n = math.prod(shape) * 4
        if cur and cur_bytes + n > shard_bytes:
            groups.append(cur)
            cur, cur_bytes = [], 0
        cur.append((name, shape))
        cur_bytes += n
    groups.append(cur)
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, group in enumerate(groups, 1):
        fname = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shape in group:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shape)
            else:
                tensors[name] = torch.randn(shape, generator=gen).mul_(0.02)
            weight_map[name] = fname
            total += tensors[name].numel() * 4
        save_file(tensors, str(path / fname), metadata={"format": "pt"})
        del tensors
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return [(path / f"model-{i:05d}-of-{len(groups):05d}.safetensors").stat().st_size
            for i in range(1, len(groups) + 1)]


# ---- driver ------------------------------------------------------------------------------------------------------
def measure(mode: str, src: Path, out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", mode, str(src), str(out)], env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{mode} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    fig = json.loads(proc.stdout.strip().splitlines()[-1])
    fig["process_seconds"] = round(wall, 2)
    shutil.rmtree(out, ignore_errors=True)
    return fig


def machine() -> dict:
    mem_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal:"))
    import torch
    return {"arch": platform.machine(), "cpu_count": os.cpu_count(), "ram_bytes": mem_kib * 1024,
            "python": platform.python_version(), "torch": torch.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, help="where to write the checkpoint and outputs (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoint")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "surgery_memory.json")
    ap.add_argument("--child", nargs=3, metavar=("MODE", "SRC", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)

    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="prunekit-bench-", dir=args.workdir))
    src = work / "qwen2.5-0.5b-shaped"
    try:
        t0 = time.perf_counter()
        shard_sizes = write_checkpoint(src, CONFIG)
        print(f"wrote {src}: {len(shard_sizes)} shards, {sum(shard_sizes) / 1e9:.2f} GB "
              f"in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
        largest = max(shard_sizes)
        runs = {}
        for mode in ("streaming_prune", "streaming_kv_cut", "in_memory_prune"):
            fig = measure(mode, src, work / f"out-{mode}")
            fig["peak_over_largest_shard"] = round(fig["peak_rss"] / largest, 3)
            fig["above_baseline_over_largest_shard"] = round(
                (fig["peak_rss"] - fig["import_baseline_rss"]) / largest, 3)
            runs[mode] = fig
            print(f"{mode}: peak {fig['peak_rss'] / 1e6:.0f} MB, baseline {fig['import_baseline_rss'] / 1e6:.0f} MB, "
                  f"{fig['peak_over_largest_shard']}x / {fig['above_baseline_over_largest_shard']}x largest shard",
                  file=sys.stderr)
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    streaming = [runs["streaming_prune"], runs["streaming_kv_cut"]]
    met_raw = all(r["peak_over_largest_shard"] <= GOAL_RATIO for r in streaming)
    met_adj = all(r["above_baseline_over_largest_shard"] <= GOAL_RATIO for r in streaming)
    result = {
        "benchmark": "surgery_memory",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "checkpoint": {"shape": "Qwen2.5-0.5B (random weights)", "dtype": "float32",
                       "shards": len(shard_sizes), "shard_bytes": shard_sizes, "total_bytes": sum(shard_sizes),
                       "largest_shard_bytes": largest,
                       "largest_tensor_bytes": max(math.prod(shape) * 4 for _, shape in tensor_specs(CONFIG))},
        "surgeries": {"streaming_prune": f"drop text layers {DROP_TEXT}", "streaming_kv_cut": "kv heads 2 -> 1, mean",
                      "in_memory_prune": f"drop text layers {DROP_TEXT}"},
        "units": "bytes; ratios are x largest input shard; rss from /proc/self/status of a fresh process per run "
                 "(import_baseline_rss = VmRSS after imports, peak_rss = VmHWM at the end)",
        "runs": runs,
        "goal": {"streaming_peak_max_over_largest_shard": GOAL_RATIO,
                 "met_raw": met_raw, "met_above_import_baseline": met_adj},
        "goal_met": met_raw,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
