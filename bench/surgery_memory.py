"""Peak memory and wall time of streaming (vs in-memory) surgery on a real-size checkpoint.

`--shape 0.5b` (the default) writes a random fp32 checkpoint shaped like Qwen2.5-0.5B (hidden 896, 24 layers, 14
heads, 2 KV heads, intermediate 4864, vocab 151936, tied embeddings, ~2 GB) as ~500 MB safetensors shards and runs

  a) streaming prune, 4 text layers dropped      b) streaming kv-cut 2 -> 1 (mean)      c) in-memory prune (as a)

`--shape 7b` writes a random bf16 checkpoint shaped like Qwen2.5-7B (hidden 3584, 28 layers, 28 heads, 4 KV heads,
intermediate 18944, vocab 152064, untied LM head: 7.6B parameters, 15.2 GB in four ~3.9 GB shards) and runs
a) streaming prune of 4 layers and b) streaming kv-cut 4 -> 2 (an in-memory run would need the whole model in RAM).
`--shape tiny` is the 7b path on a ~20 MB Qwen2-shaped model (bf16, untied head, 4 shards): a dry check in seconds.

Every checkpoint is streamed to disk tensor by tensor (a safetensors header first, then each tensor's bytes,
generated a slice at a time): the whole model is never in memory, nor a whole shard. Each surgery runs in a fresh
Python process that reports its own peak RSS (VmHWM) and its RSS right after imports, and its wall time.

The goal checked (`goal_met`): the peak RSS of streaming surgery is at most 1.5x the largest input shard. Results go
to bench/results/surgery_memory.json (`--shape 7b`: surgery_memory_7b.json; tiny: only stdout unless --out).

    python bench/surgery_memory.py [--shape 0.5b|7b|tiny] [--workdir DIR] [--keep] [--out FILE]
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


def qwen2_config(hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int, tied: bool, dtype: str) -> dict:
    return dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=hidden, intermediate_size=inter,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
        max_position_embeddings=32768, max_window_layers=layers, rms_norm_eps=1e-6, hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, use_sliding_window=False,
        sliding_window=None, layer_types=["full_attention"] * layers, tie_word_embeddings=tied, attention_dropout=0.0,
        bos_token_id=151643, eos_token_id=151643, initializer_range=0.02, use_cache=True, dtype=dtype,
    )


# name -> what to build and measure: config, bytes per value, shard size, layers to drop, KV heads after the cut
SHAPES = {
    "0.5b": dict(label="Qwen2.5-0.5B (random weights)", dtype="float32", shard_bytes=500 * 1000 ** 2,
                 config=qwen2_config(896, 4864, 24, 14, 2, 151936, True, "float32"), drop_text="4,9,14,19",
                 kv_heads=1, in_memory=True, out="surgery_memory.json"),
    "7b": dict(label="Qwen2.5-7B (random weights)", dtype="bfloat16", shard_bytes=3_900 * 1000 ** 2,
               config=qwen2_config(3584, 18944, 28, 28, 4, 152064, False, "bfloat16"), drop_text="4,10,16,22",
               kv_heads=2, in_memory=False, out="surgery_memory_7b.json"),
    "tiny": dict(label="tiny Qwen2 (random weights; dry check of the 7b path)", dtype="bfloat16",
                 shard_bytes=5 * 1000 ** 2, config=qwen2_config(256, 704, 8, 4, 4, 8192, False, "bfloat16"),
                 drop_text="1,3,5,7", kv_heads=2, in_memory=False, out=None),
}
SHAPE = SHAPES["0.5b"]
CONFIG = SHAPE["config"]          # the default shape's config (kept for importers)
SHARD_BYTES = SHAPE["shard_bytes"]
DROP_TEXT = SHAPE["drop_text"]


# ---- measured child ----------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(mode: str, src: str, out: str, drop_text: str = DROP_TEXT, kv_heads: int = 1) -> None:
    """Run one surgery in this (fresh) process and print {baseline, peak} RSS as JSON on the last line."""
    from prunekit.stages.kv_cut import kv_cut
    from prunekit.stages.prune import prune
    if mode == "in_memory_prune":  # the in-memory path needs transformers: count its import in the baseline
        import transformers  # noqa: F401
        from transformers import Qwen2ForCausalLM  # noqa: F401
    baseline = _status_kib("VmRSS") * 1024
    t0 = time.perf_counter()
    if mode == "streaming_prune":
        result = prune(src, out, drop_text=drop_text, streaming=True)
    elif mode == "streaming_kv_cut":
        result = kv_cut(src, out, kv_heads=int(kv_heads), streaming=True)
    elif mode == "in_memory_prune":
        result = prune(src, out, drop_text=drop_text, streaming=False)
    else:
        raise SystemExit(f"unknown mode {mode}")
    seconds = time.perf_counter() - t0
    assert result.streaming == mode.startswith("streaming")
    print(json.dumps({"import_baseline_rss": baseline, "peak_rss": _status_kib("VmHWM") * 1024,
                      "seconds": round(seconds, 2), "params_after": result.after["params"]["total"]}))


# ---- checkpoint --------------------------------------------------------------------------------------------------
def tensor_specs(cfg: dict) -> list[tuple[str, list[int]]]:
    """Checkpoint names and shapes of a Qwen2ForCausalLM (lm_head.weight only when untied), in HF order."""
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
    if not cfg.get("tie_word_embeddings", False):
        specs.append(("lm_head.weight", [vocab, h]))
    return specs


SAFETENSORS_DTYPE = {"float32": ("F32", 4), "bfloat16": ("BF16", 2)}
SLICE_VALUES = 32 * 1024 ** 2  # values generated and written at a time


def write_shard(path: Path, group: list[tuple[str, list[int]]], dtype: str, gen) -> None:
    """One safetensors file written tensor by tensor, each a slice at a time: the header (names, shapes, offsets)
    first, then the bytes. Norm weights are ones, everything else N(0, 0.02)."""
    import torch
    code, size = SAFETENSORS_DTYPE[dtype]
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in group:
        n = math.prod(shape) * size
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    tdtype = getattr(torch, dtype)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name, shape in group:
            total = math.prod(shape)
            for start in range(0, total, SLICE_VALUES):
                n = min(SLICE_VALUES, total - start)
                if name.endswith("norm.weight"):
                    part = torch.ones(n, dtype=tdtype)
                else:
                    part = torch.empty(n, dtype=tdtype).normal_(0.0, 0.02, generator=gen)
                f.write(part.view(torch.uint8).numpy())
        f.flush()
        os.fsync(f.fileno())


def write_checkpoint(path: Path, cfg: dict, shard_bytes: int = SHARD_BYTES, dtype: str = "float32") -> list[int]:
    """Random weights streamed into safetensors shards of about `shard_bytes` (greedy packing in HF order; a
    tensor larger than a shard gets its own); returns the shard sizes (bytes on disk)."""
    import torch
    path.mkdir(parents=True, exist_ok=True)
    size = SAFETENSORS_DTYPE[dtype][1]
    groups, cur, cur_bytes = [], [], 0
    for name, shape in tensor_specs(cfg):
        n = math.prod(shape) * size
        if cur and cur_bytes + n > shard_bytes:
            groups.append(cur)
            cur, cur_bytes = [], 0
        cur.append((name, shape))
        cur_bytes += n
    groups.append(cur)
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    names = [f"model-{i:05d}-of-{len(groups):05d}.safetensors" for i in range(1, len(groups) + 1)]
    for fname, group in zip(names, groups):
        write_shard(path / fname, group, dtype, gen)
        for name, shape in group:
            weight_map[name] = fname
            total += math.prod(shape) * size
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return [(path / fname).stat().st_size for fname in names]


# ---- driver ------------------------------------------------------------------------------------------------------
def measure(mode: str, src: Path, out: Path, shape: dict = SHAPE) -> dict:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", mode, str(src), str(out), shape["drop_text"],
                           str(shape["kv_heads"])], env=env, capture_output=True, text=True)
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
    ap.add_argument("--shape", choices=list(SHAPES), default="0.5b", help="checkpoint shape (default 0.5b)")
    ap.add_argument("--workdir", type=Path, help="where to write the checkpoint and outputs (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoint")
    ap.add_argument("--out", type=Path, default=None,
                    help="results JSON (default: bench/results/surgery_memory.json, surgery_memory_7b.json for 7b; "
                         "tiny: none)")
    ap.add_argument("--child", nargs=5, metavar=("MODE", "SRC", "OUT", "DROP", "KV"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    shape = SHAPES[args.shape]
    cfg = shape["config"]
    out_json = args.out or (ROOT / "bench" / "results" / shape["out"] if shape["out"] else None)

    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="prunekit-bench-", dir=args.workdir))
    src = work / f"qwen2-{args.shape}-shaped"
    size = SAFETENSORS_DTYPE[shape["dtype"]][1]
    need = sum(math.prod(s) for _, s in tensor_specs(cfg)) * size
    free = shutil.disk_usage(work).free
    if free < 2.2 * need:  # the checkpoint plus one surgery's output at a time
        shutil.rmtree(work, ignore_errors=True)
        raise SystemExit(f"--shape {args.shape}: needs ~{2.2 * need / 1e9:.0f} GB free in {work.parent}, "
                         f"has {free / 1e9:.0f} GB (use --workdir)")
    modes = ["streaming_prune", "streaming_kv_cut"] + (["in_memory_prune"] if shape["in_memory"] else [])
    try:
        t0 = time.perf_counter()
        shard_sizes = write_checkpoint(src, cfg, shape["shard_bytes"], shape["dtype"])
        write_seconds = round(time.perf_counter() - t0, 1)
        print(f"wrote {src}: {len(shard_sizes)} shards, {sum(shard_sizes) / 1e9:.2f} GB in {write_seconds:.0f}s",
              file=sys.stderr)
        largest = max(shard_sizes)
        runs = {}
        for mode in modes:
            fig = measure(mode, src, work / f"out-{mode}", shape)
            fig["peak_over_largest_shard"] = round(fig["peak_rss"] / largest, 3)
            fig["above_baseline_over_largest_shard"] = round(
                (fig["peak_rss"] - fig["import_baseline_rss"]) / largest, 3)
            runs[mode] = fig
            print(f"{mode}: {fig['seconds']}s, peak {fig['peak_rss'] / 1e6:.0f} MB, baseline "
                  f"{fig['import_baseline_rss'] / 1e6:.0f} MB, {fig['peak_over_largest_shard']}x / "
                  f"{fig['above_baseline_over_largest_shard']}x largest shard", file=sys.stderr)
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    streaming = [runs["streaming_prune"], runs["streaming_kv_cut"]]
    met_raw = all(r["peak_over_largest_shard"] <= GOAL_RATIO for r in streaming)
    met_adj = all(r["above_baseline_over_largest_shard"] <= GOAL_RATIO for r in streaming)
    kv_before = cfg["num_key_value_heads"]
    surgeries = {"streaming_prune": f"drop text layers {shape['drop_text']}",
                 "streaming_kv_cut": f"kv heads {kv_before} -> {shape['kv_heads']}, mean"}
    if shape["in_memory"]:
        surgeries["in_memory_prune"] = f"drop text layers {shape['drop_text']}"
    result = {
        "benchmark": "surgery_memory",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": f"python bench/surgery_memory.py --shape {args.shape}",
        "machine": machine(),
        "checkpoint": {"shape": shape["label"], "dtype": shape["dtype"],
                       "params": sum(math.prod(s) for _, s in tensor_specs(cfg)), "write_seconds": write_seconds,
                       "shards": len(shard_sizes), "shard_bytes": shard_sizes, "total_bytes": sum(shard_sizes),
                       "largest_shard_bytes": largest,
                       "largest_tensor_bytes": max(math.prod(s) * size for _, s in tensor_specs(cfg))},
        "surgeries": surgeries,
        "units": "bytes; seconds = the surgery's wall time inside its process, process_seconds = the whole process "
                 "(imports included); ratios are x largest input shard; rss from /proc/self/status of a fresh process "
                 "per run (import_baseline_rss = VmRSS after imports, peak_rss = VmHWM at the end)",
        "runs": runs,
        "goal": {"streaming_peak_max_over_largest_shard": GOAL_RATIO,
                 "met_raw": met_raw, "met_above_import_baseline": met_adj},
        "goal_met": met_raw,
    }
    if out_json is not None:
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
