"""KV cut of SmolLM2-135M-Instruct (3 -> 1 KV heads by default): mean vs similarity grouping, each with and without
layer-by-layer calibration (prunekit.core.kv_calibration), measured right after the cut, before any training.

For every variant: the per-layer relative attention-output error ||cut - original||² / ||original||² on held-out
chatterbot val conversations (each layer fed the original model's inputs), and loss / token_acc of the cut model on
the same val rows. Calibration uses train rows only (`--samples`, spread over the file); the val rows are never
calibrated on. Runs on CPU in a few minutes with the defaults; `--steps` / `--samples` scale it up on a GPU.

    python bench/kv_calibration.py [--samples 64] [--steps 50] [--eval-rows N] [--kv-heads 1] [--device cpu]
                                   [--out bench/results/kv_calibration.json]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prunekit.core.data import load_messages, tokenize_rows  # noqa: E402
from prunekit.core.datasets import chatterbot_to_messages  # noqa: E402
from prunekit.core.evaluate import evaluate  # noqa: E402
from prunekit.core.kv_calibration import CalibrationSettings, attention_output_errors, calibrate_kv_cut  # noqa: E402
from prunekit.core.loading import load_model, load_tokenizer, quiet_transformers, resolve_model  # noqa: E402
from prunekit.core.surgery import KVCut, apply_to_model, kv_similarity_orders  # noqa: E402
from prunekit.stages.kv_cut import calibration_batches, padded_calibration_batches  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--kv-heads", type=int, default=1)
    ap.add_argument("--samples", type=int, default=64, help="calibration conversations from the train split")
    ap.add_argument("--steps", type=int, default=50, help="Adam steps of the Q/K/V fit per layer")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-rows", type=int, default=None, help="held-out val conversations (default: all)")
    ap.add_argument("--variants", default="mean,similarity,mean+calib,similarity+calib",
                    help="GROUPING[+calib[+seq][+noalign]]: +seq fits each layer on the cut model's own inputs "
                         "(sequential); +noalign starts the fit from the mean instead of the aligned heads")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/kv_calibration.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.time()

    data_dir = Path(tempfile.mkdtemp(prefix="kv-bench-"))
    train, val = data_dir / "train.jsonl", data_dir / "val.jsonl"
    chatterbot_to_messages(train, val_path=val)
    path = resolve_model(args.model)
    with quiet_transformers():
        original, family = load_model(path, dtype="float32", device=args.device)
        tokenizer = load_tokenizer(path)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    val_rows = load_messages(val)[: args.eval_rows]
    eval_samples = tokenize_rows(tokenizer, val_rows, 512)
    eval_batches = [{k: v.to(args.device) for k, v in b.items()}
                    for b in padded_calibration_batches(tokenizer, val, max_samples=len(val_rows))]
    calib_batches = [{k: v.to(args.device) for k, v in b.items()}
                     for b in padded_calibration_batches(tokenizer, train, max_samples=args.samples)]
    cfg = original.config.to_dict()

    def measure(model) -> dict:
        metrics = evaluate(model, eval_samples, pad)
        return {"loss": round(metrics["loss"], 4), "token_acc": round(metrics["token_acc"], 4),
                "eval_tokens": metrics["tokens"]}

    results = {"original": measure(original)}
    print("original", results["original"], flush=True)
    orders = None
    for variant in args.variants.split(","):
        grouping, *flags = variant.split("+")
        calib = "calib" in flags
        if grouping not in ("mean", "similarity") or not set(flags) <= {"calib", "seq", "noalign"} or \
                (flags and not calib):
            ap.error(f"--variants: {variant}: expected GROUPING or GROUPING+calib[+seq][+noalign]")
        if grouping == "similarity" and orders is None:
            sim_batches = [{k: v.to(args.device) for k, v in b.items()}
                           for b in calibration_batches(tokenizer, train, args.samples)]
            orders = kv_similarity_orders(original, family, sim_batches, args.kv_heads)
        surgery = KVCut(family, cfg, args.kv_heads, head_order=orders if grouping == "similarity" else None)
        cut = apply_to_model(original, surgery)
        record, seconds = None, 0.0
        if calib:
            t = time.time()
            query_orders = {i: surgery.query_head_order(i) for i in range(family.num_text_layers(cfg))}
            how = CalibrationSettings(steps=args.steps, lr=args.lr, sequential="seq" in flags,
                                      align="noalign" not in flags)
            record = calibrate_kv_cut(original, cut, family, calib_batches, how, query_orders=query_orders,
                                      progress=lambda i, s: print(f"  layer {i}: check error "
                                                                  f"{s['check_relative_error_before']:.3f} -> "
                                                                  f"{s['check_relative_error_after']:.3f}",
                                                                  flush=True))
            seconds = time.time() - t
        errors = attention_output_errors(original, cut, family, eval_batches)
        results[variant] = {**measure(cut), "heldout_relative_attention_error": [round(e, 4) for e in errors],
                            "mean_heldout_relative_attention_error": round(sum(errors) / len(errors), 4),
                            "calibration_seconds": round(seconds, 1)}
        if record is not None:
            results[variant]["calibration"] = {k: v for k, v in record.items() if k != "layers"}
            results[variant]["calibration_relative_error"] = [
                [round(layer["relative_error_before"], 4), round(layer["relative_error_after"], 4)]
                for layer in record["layers"]]
        print(variant, {k: v for k, v in results[variant].items() if not isinstance(v, (list, dict))}, flush=True)
        del cut

    out = {"benchmark": "kv_calibration", "date": dt.date.today().isoformat(), "machine": platform.machine(),
           "device": args.device, "torch_threads": torch.get_num_threads(), "model": args.model,
           "kv_heads": {"before": family.attention_shape(cfg)[1], "after": args.kv_heads},
           "calibration": {"train_rows": args.samples, "steps": args.steps, "lr": args.lr,
                           "ridges": list(CalibrationSettings().ridges)},
           "eval": {"val_rows": len(val_rows), "source": "chatterbot val split (never calibrated on)"},
           "results": results, "seconds": round(time.time() - t_start, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "results"}, indent=2))


if __name__ == "__main__":
    main()
