"""The real knockout run: SmolLM2-135M-Instruct, all 30 text layers, chatterbot data, on Ray Tune.

    python bench/knockout_smollm2.py --gpus 1 --gpu-fraction 0.25        # GPU box: 4 trials per GPU
    python bench/knockout_smollm2.py --gpus 0 --steps 20 --eval-samples 64   # 2-core CPU: ~45 min
    python bench/knockout_smollm2.py --cpu-test                          # CPU check: 3 layers, 4 steps

It is `prunekit knockout --config recipes/knockout.yaml` with the data made first and the report written to
bench/results/knockout_smollm2/ (results.csv/json, ratio and loss-curve plots, importance plots, summary.md with
the Spearman correlations, plan.json). The run state (one result.json per trial) lives under --workdir, so an
interrupted run continues where it stopped when started again with the same --workdir.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=1, help="GPUs Ray may use (0: CPU trials)")
    p.add_argument("--gpu-fraction", type=float, default=0.25, help="GPU per trial")
    p.add_argument("--steps", type=int, default=None, help="SFT steps per trial (default: the recipe's)")
    p.add_argument("--layers", default="all")
    p.add_argument("--eval-samples", type=int, default=None, help="val conversations per eval (default: the recipe's)")
    p.add_argument("--asha", action="store_true", help="ASHA early stopping of hopeless candidates")
    p.add_argument("--cpu-test", action="store_true", help="3 layers, 4 steps, small eval, CPU: checks the path")
    p.add_argument("--workdir", default="/tmp/prunekit-knockout-smollm2")
    p.add_argument("--out", default=None, help="report directory (default bench/results/knockout_smollm2)")
    args = p.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    import ray
    from prunekit.config import load_config
    from prunekit.core.datasets import chatterbot_to_messages
    from prunekit.stages.knockout import knockout

    work = Path(args.workdir).resolve()
    train, val = work / "data" / "train.jsonl", work / "data" / "val.jsonl"
    if not train.is_file():
        counts = chatterbot_to_messages(train, val_path=val)
        print(f"chatterbot: {counts['train']} train / {counts['val']} val conversations", flush=True)
    gpus = 0 if args.cpu_test else args.gpus
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / ("knockout_smollm2" if not args.cpu_test
                                                                        else "knockout_smollm2_cpu_test")
    overrides = {"model": "smollm2", "train": str(train), "val": str(val), "output_dir": str(out),
                 "storage_path": str(work / "runs"), "candidates.text": args.layers, "overwrite": True,
                 "tune.gpus_per_trial": args.gpu_fraction if gpus else 0, "bf16": bool(gpus),
                 "tune.asha": args.asha, "max_steps": args.steps, "eval_max_samples": args.eval_samples}
    if args.cpu_test:
        overrides.update({"name": "knockout-smollm2-cpu-test", "max_steps": args.steps or 4, "eval_interval": 2,
                          "log_interval": 1, "eval_max_samples": 16, "max_length": 128, "batch_size": 4,
                          "importance_samples": 8, "candidates.text": "0-2" if args.layers == "all" else args.layers,
                          "wandb.mode": "disabled"})
    cfg = load_config("knockout", ROOT / "recipes" / "knockout.yaml", overrides)
    ray.init(num_gpus=gpus, include_dashboard=False) if gpus else ray.init(include_dashboard=False)
    t0 = time.time()
    result = knockout(cfg)
    print(f"\nknockout of {len(result.rows) - 1} candidates in {time.time() - t0:.0f}s "
          f"(ran {len(result.ran)} trials now, {len(result.errors)} errors)\n")
    print((result.output / "summary.md").read_text())
    print(f"report: {result.output}")


if __name__ == "__main__":
    main()
