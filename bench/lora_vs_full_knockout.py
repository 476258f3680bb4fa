"""Do LoRA knockout trials give the verdicts full trials give? SmolLM2-135M-Instruct, the same candidates, data and
steps, knocked out once with `trial_mode: full` and once with `trial_mode: lora`; the Spearman correlation of the
two modes' token_acc ratios, their verdict agreement and each mode's wall time.

    python bench/lora_vs_full_knockout.py --gpu [--gpu-fraction 0.125] [--steps 100] [--layers all]
    python bench/lora_vs_full_knockout.py --smoke       # CPU, 3 layers x 4 steps, short rows: checks the path

Both sweeps are `prunekit knockout` with recipes/knockout.yaml (chatterbot data, batch 8 x 256 tokens, lr 5e-5, 100
steps, every text layer) in one Ray instance, one after the other; the LoRA sweep trains rank-16 adapters (alpha 32)
with its own learning rate (`--lora-lr`, default 2e-4: adapters start at zero and take larger steps). Writes
bench/results/lora_vs_full_knockout.json (`--smoke`: lora_vs_full_knockout_smoke.json) with the command that made
it; the sweeps' reports and run state stay under --workdir (a re-run with the same --workdir reuses finished trials).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = ("full", "lora")


def sweep_config(args, mode: str, train: Path, val: Path, work: Path):
    from prunekit.config import load_config
    overrides = {"model": "smollm2", "train": str(train), "val": str(val), "output_dir": str(work / "reports" / mode),
                 "storage_path": str(work / "runs"), "candidates.text": args.layers, "overwrite": True,
                 "importance": False, "max_steps": args.steps,
                 "eval_max_samples": args.eval_samples, "tune.gpus_per_trial": args.gpu_fraction if args.gpu else 0,
                 "bf16": args.gpu, "wandb.mode": "disabled", "trial_mode": mode,
                 "lr": args.lora_lr if mode == "lora" else args.lr}
    if mode == "lora":
        overrides.update({"lora.rank": args.lora_rank, "lora.alpha": 2 * args.lora_rank})
    if args.smoke:
        overrides.update({"eval_interval": 2, "log_interval": 1, "max_length": 64, "batch_size": 4})
    cfg = load_config("knockout", ROOT / "recipes" / "knockout.yaml", overrides)
    cfg.name = None  # not the recipe's: each mode's sweep is named by its settings (the same settings resume)
    return cfg


def run_mode(args, mode: str, train: Path, val: Path, work: Path) -> dict:
    from prunekit.stages.knockout import knockout
    cfg = sweep_config(args, mode, train, val, work)
    t0 = time.time()
    result = knockout(cfg)
    wall = time.time() - t0
    timings = [json.loads(p.read_text()).get("timing", {}) for p in (result.run_dir / "trials").glob("*/result.json")]
    rows = {r["id"]: {k: r.get(k) for k in ("ratio", "verdict", "eval_token_acc", "eval_loss", "early_spike",
                                           "params_trainable", "status")} for r in result.rows}
    return {"sweep": result.name, "lr": cfg.lr, "max_steps": cfg.max_steps, "batch_size": cfg.batch_size,
            "max_length": cfg.max_length, "bf16": cfg.bf16, "wall_s": round(wall, 1), "ran_now": len(result.ran),
            "errors": result.errors, "trial_train_s_mean": round(sum(t.get("train_s", 0.0) for t in timings)
                                                                 / max(1, len(timings)), 2),
            "lora": cfg.lora.model_dump(mode="json") if mode == "lora" else None, "rows": rows,
            "report": str(result.output)}


def compare(full: dict, lora: dict) -> dict:
    from prunekit.core.plan import spearman
    ids = [c for c in full["rows"] if c != "baseline" and full["rows"][c]["ratio"] is not None
           and lora["rows"].get(c, {}).get("ratio") is not None]
    same = [c for c in ids if full["rows"][c]["verdict"] == lora["rows"][c]["verdict"]]
    key = {m: sorted(c for c in ids if r["rows"][c]["verdict"] == "key") for m, r in (("full", full), ("lora", lora))}
    ratios = {m: [r["rows"][c]["ratio"] for c in ids] for m, r in (("full", full), ("lora", lora))}
    return {"candidates": len(ids), "spearman_ratio": spearman(ratios["full"], ratios["lora"]),
            "verdict_agreement": len(same) / len(ids) if ids else None,
            "verdicts_differ": {c: {"full": full["rows"][c]["verdict"], "lora": lora["rows"][c]["verdict"]}
                                for c in ids if c not in same},
            "key_layers": key, "lora_over_full_wall": lora["wall_s"] / full["wall_s"] if full["wall_s"] else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--gpu", action="store_true", help="trials on the GPUs this box has")
    mode.add_argument("--smoke", action="store_true", help="CPU: 3 layers, 4 steps, short rows, small eval")
    p.add_argument("--gpu-fraction", type=float, default=0.125, help="GPU per trial (0.125: 8 trials per GPU)")
    p.add_argument("--steps", type=int, default=None, help="SFT steps per trial (default: the recipe's 100)")
    p.add_argument("--layers", default=None, help="text layers to knock out (default: all; --smoke: 0-2)")
    p.add_argument("--eval-samples", type=int, default=None, help="val conversations per eval (default: the recipe's)")
    p.add_argument("--lr", type=float, default=5e-5, help="full trials' learning rate (the recipe's)")
    p.add_argument("--lora-lr", type=float, default=2e-4, help="LoRA trials' learning rate")
    p.add_argument("--lora-rank", type=int, default=16, help="LoRA rank (alpha: twice the rank)")
    p.add_argument("--workdir", default="/tmp/prunekit-lora-vs-full")
    p.add_argument("--out", default=None, help="result JSON (default bench/results/lora_vs_full_knockout[_smoke].json)")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.eval_samples = args.steps or 4, args.eval_samples or 16
        args.layers = args.layers or "0-2"
    args.layers = args.layers or "all"
    for flag, value in (("--steps", args.steps), ("--eval-samples", args.eval_samples),
                        ("--lora-rank", args.lora_rank)):
        if value is not None and value < 1:
            p.error(f"{flag}: must be >= 1, got {value}")
    if args.gpu and not 0 < args.gpu_fraction <= 1:
        p.error(f"--gpu-fraction: must be in (0, 1], got {args.gpu_fraction}")
    for flag, value in (("--lr", args.lr), ("--lora-lr", args.lora_lr)):
        if not value > 0:
            p.error(f"{flag}: must be > 0, got {value}")
    os.environ.setdefault("WANDB_MODE", "disabled")
    import ray
    import torch
    from prunekit.core.datasets import chatterbot_to_messages
    from prunekit.core.loading import resolve_model
    work = Path(args.workdir).resolve()
    train, val = work / "data" / "train.jsonl", work / "data" / "val.jsonl"
    if not train.is_file():
        chatterbot_to_messages(train, val_path=val)
    if args.gpu:
        gpus = torch.cuda.device_count()
        if not gpus:
            p.error("--gpu: this machine sees no GPU (use --smoke on CPU)")
        ray.init(num_gpus=gpus, include_dashboard=False, log_to_driver=False)
    else:
        gpus = 0
        ray.init(include_dashboard=False, log_to_driver=False)
    runs = {m: run_mode(args, m, train, val, work) for m in MODES}
    ray.shutdown()
    record = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": " ".join(["python", "bench/lora_vs_full_knockout.py", *(argv or sys.argv[1:])]),
              "machine": {"host": platform.node(), "cpus": os.cpu_count(), "gpus": gpus,
                          "gpu": torch.cuda.get_device_name(0) if gpus else None, "torch": torch.__version__},
              "model": str(resolve_model("smollm2")), "data": "chatterbot",
              "settings": {"layers": args.layers, "gpu_fraction": args.gpu_fraction if args.gpu else None,
                           "eval_samples": args.eval_samples, "smoke": args.smoke},
              **compare(runs["full"], runs["lora"]), "modes": runs}
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / (
        "lora_vs_full_knockout_smoke.json" if args.smoke else "lora_vs_full_knockout.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: record[k] for k in ("candidates", "spearman_ratio", "verdict_agreement", "key_layers")}
                     | {m: runs[m]["wall_s"] for m in MODES}, indent=2))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
