"""Which 8 of SmolLM2-135M-Instruct's 30 layers to remove: the committed knockout plan's first 8 (the outcome recipe's
cut), the 8 lowest one-shot NLL-drop scores, or SLEB's iterative selection (remove the layer whose removal raises the
calibration NLL least, then score the rest again with it removed). Each choice is measured right after the cut, before
any recovery, on held-out general text, the chat val and far text; the iterative order is written as a plan that
`bench/outcome_smollm2.py --plan` (and a recipe's `prune.plan`) takes.

    python bench/outcome_smollm2.py --prepare --data DATA
    python bench/layer_choice_smollm2.py --data DATA [--calibration FILE,...] [--rows 128] [--plan-out PLAN]

Calibration rows come from train files only (the general train split and the chatterbot train split by default),
never from the eval sets. On a GPU the selection takes ~2 minutes (256 rows of 256 tokens, ~30 x --drop passes over
them); on a 2-core CPU hours: this is a GPU bench.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KNOCKOUT_PLAN = ROOT / "bench" / "results" / "knockout_smollm2" / "plan.json"   # the outcome recipe's: its first 8
EVAL_SETS = (("general_text", "general-eval.jsonl", 100), ("chat_val", "val.jsonl", 128),
             ("far_text", "far-eval.jsonl", 100))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="the data files of bench/outcome_smollm2.py --prepare")
    ap.add_argument("--calibration", default="general-train.jsonl,chat-train.jsonl",
                    help="comma-separated train files (relative to --data) to score the layers on")
    ap.add_argument("--rows", type=int, default=128, help="calibration rows taken from each file")
    ap.add_argument("--drop", type=int, default=10, help="layers the iterative order runs to (the plan's length)")
    ap.add_argument("--plan-out", type=Path, default=ROOT / "bench" / "out" / "plan_iterative_nll.json")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "layer_choice_smollm2.json")
    ap.add_argument("--smoke", action="store_true", help="CPU check of the code path: 1 row, 1 layer, 2 eval rows "
                                                         "(writes under bench/out)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.rows, args.drop, args.out = 1, 1, ROOT / "bench" / "out" / "layer_choice_smollm2_smoke.json"

    import torch
    from prunekit.core.evaluate import evaluate
    from prunekit.core.importance import iterative_nll_drop, nll_drop
    from prunekit.core.loading import load_model, load_tokenizer, quiet_transformers, resolve_model
    from prunekit.core.samples import collate, load_samples, pad_id
    from prunekit.core.surgery import LayerDrop, apply_to_model
    from prunekit.pipeline.measure import text_layer_params
    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = resolve_model("smollm2")
    with quiet_transformers():
        model, family = load_model(path, device=device)
        tokenizer = load_tokenizer(path)
    model.eval()
    pad = pad_id(tokenizer)
    calibration = [row for name in args.calibration.split(",")
                   for row in load_samples(tokenizer, args.data / name, model=path, max_length=256, is_vlm=False,
                                           limit=args.rows)]
    batches = [{k: v.to(device) for k, v in collate(calibration[i:i + 32], pad).items()}
               for i in range(0, len(calibration), 32)]
    start = time.time()
    one_shot = nll_drop(model, family, batches)["nll_drop"]
    iterative = iterative_nll_drop(model, family, batches, args.drop)
    seconds = round(time.time() - start, 1)
    n_layers = len(one_shot)
    knockout_first_8 = [int(e["id"].split(":")[1]) for e in json.loads(KNOCKOUT_PLAN.read_text())["order"][:8]]
    choices = {"knockout_plan": knockout_first_8,
               "one_shot_nll_drop": sorted(range(n_layers), key=one_shot.__getitem__)[:8],
               "iterative_nll_drop": iterative["order"][:8]}

    eval_rows = {key: load_samples(tokenizer, args.data / name, model=path, max_length=512, is_vlm=False,
                                   limit=2 if args.smoke else limit)
                 for key, name, limit in EVAL_SETS}
    measured = {}
    for name, drop in [("original", [])] + list(choices.items()):
        cut = apply_to_model(model, LayerDrop(family, model.config.to_dict(), drop_text=drop)).to(device) \
            if drop else model
        measured[name] = {"drop": sorted(drop),
                          **{key: {k: round(v, 4) for k, v in evaluate(cut, rows, pad).items() if k != "tokens"}
                             for key, rows in eval_rows.items()}}
        print(json.dumps({"name": name, **measured[name]}), flush=True)

    per_layer = text_layer_params(path)
    plan = {"order": [{"id": f"text:{i}", "params_removed": per_layer[i]} for i in iterative["order"]],
            "how": f"iterative NLL-drop (SLEB) on {args.rows} rows of each of {args.calibration}, 256 tokens",
            "nll_after_each": iterative["nll"], "baseline_nll": iterative["baseline_nll"]}
    args.plan_out.parent.mkdir(parents=True, exist_ok=True)
    args.plan_out.write_text(json.dumps(plan, indent=1) + "\n")
    report = {"machine": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
              "command": "python bench/layer_choice_smollm2.py " + " ".join(argv or []),
              "selection_seconds": seconds, "one_shot_nll_drop": one_shot, "iterative": iterative,
              "choices": choices, "after_cut": measured, "plan": str(args.plan_out)}
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out} and {args.plan_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
