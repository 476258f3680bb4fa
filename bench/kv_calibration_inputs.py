"""Which inputs should the calibrated KV cut fit each layer on? SmolLM2-135M-Instruct without the outcome recipe's 8
layers, cut to 1 KV head (calibrated, mean grouping), measured right after the cut on the held-out general text and
the chat val (as bench/outcome_smollm2.py measures), two ways:
  teacher-forced  every layer fitted on the original model's inputs (the default)
  sequential      every layer fitted on the inputs the cut model gives it (its earlier layers calibrated already),
                  towards the original layer's outputs on the original's inputs (`CalibrationSettings.sequential`)
Calibration rows: `--samples` rows of the outcome recovery mix (teacher corpus + general train text).

    python bench/kv_calibration_inputs.py --data DATA --corpus teacher.jsonl[.gz] [--samples 64] [--steps 30]
                                          [--device cpu]        # CPU: ~10 min per variant on 2 cores

Writes bench/results/kv_calibration_inputs.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLAN_FIRST_8 = [17, 14, 5, 6, 13, 19, 21, 26]   # the outcome recipe's cut


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="the data files of bench/outcome_smollm2.py --prepare")
    ap.add_argument("--corpus", type=Path, required=True, help="a teacher corpus (.jsonl or .jsonl.gz)")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--eval-text-samples", type=int, default=64)
    ap.add_argument("--eval-samples", type=int, default=96)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "kv_calibration_inputs")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from bench import outcome_smollm2 as bench
    from prunekit.core.kv_calibration import CalibrationSettings
    from prunekit.core.loading import resolve_model
    from prunekit.stages.kv_cut import kv_cut
    from prunekit.stages.prune import prune
    args.out.mkdir(parents=True, exist_ok=True)
    recovery = bench.write_recovery_mix(args.data, args.corpus, args.out / "recovery.jsonl")
    settings = types.SimpleNamespace(gpu=args.device != "cpu", eval_samples=args.eval_samples,
                                     eval_text_samples=args.eval_text_samples)
    pruned = args.out / "pruned"
    prune(str(resolve_model("smollm2")), pruned, drop_text=PLAN_FIRST_8, overwrite=True)
    results = {}
    for name, sequential in (("teacher-forced", False), ("sequential", True)):
        start = time.time()
        cut = kv_cut(str(pruned), args.out / name, 1, "mean", data=str(recovery), overwrite=True, calibrate=True,
                     max_samples=args.samples, device=args.device,
                     calibration=CalibrationSettings(steps=args.steps, sequential=sequential))
        m = bench.measure(str(args.out / name), args.data, settings)
        results[name] = {"general_text": {k: m["eval_text"][k] for k in ("token_acc", "loss")},
                         "chat_val": {k: m["eval"][k] for k in ("token_acc", "loss")},
                         "check_relative_error_after": [round(x["check_relative_error_after"], 4)
                                                        for x in cut.provenance["calibration"]["layers"]],
                         "seconds": round(time.time() - start, 1)}
        print(name, json.dumps({k: v for k, v in results[name].items() if k != "check_relative_error_after"}),
              flush=True)
    import torch
    record = {"benchmark": "kv_calibration_inputs", "date": time.strftime("%Y-%m-%d"),
              "machine": torch.cuda.get_device_name(0) if args.device != "cpu" else "cpu",
              "command": "python bench/kv_calibration_inputs.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "samples": args.samples, "steps": args.steps, "results": results}
    path = ROOT / "bench" / "results" / "kv_calibration_inputs.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
