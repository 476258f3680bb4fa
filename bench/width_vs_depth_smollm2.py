"""Width vs depth (issue 13): SmolLM2-135M-Instruct with ~25% of its decoder-layer parameters removed by width or by
depth, each recovered by the same distillation from the original on the same data, measured on held-out text.

Arms (each resumable; a finished arm is kept in OUT/results.json):
  depth      the first 8 layers of bench/results/knockout_smollm2/plan.json (26.7% of the decoder-layer parameters:
             whole layers cannot make exactly 25%)
  ffn        `prunekit width --ffn 1024` (FFN 1536 -> 1024 channels in every layer: 25.0%)
  heads+ffn  `prunekit width --heads 6 --ffn 1152` (9 -> 6 query heads, 2 per KV group, and 1536 -> 1152 FFN
             channels: 25.0%)
Width importance is scored on 256 rows of the recovery data. Each arm is then distilled for `--steps` steps from the
original with recipes/outcome.yaml's distill settings (forward KL, packed 512-token rows, batch 32) on the outcome
recovery mix (the teacher-sampled corpus + the general-text train split) and measured on the held-out general text
and the chat val, right after the cut and after the distillation. Report: bench/results/width_vs_depth_smollm2.json
(+ .png).

    python bench/width_vs_depth_smollm2.py --gpu --data DATA --corpus teacher.jsonl[.gz] --out DIR [--steps 400]
    python bench/width_vs_depth_smollm2.py --smoke                     # CPU check of the code path, tiny sizes
    python bench/width_vs_depth_smollm2.py --report-only DIR/results.json --machine "..."   # a box's results

DATA holds the files of `bench/outcome_smollm2.py --prepare --data DATA`; the corpus is the outcome run's
teacher.jsonl (`prunekit data generate --model smollm2 --rows 16384 --max-new-tokens 256`).
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from outcome_smollm2 import distill, measure, prepare_data  # noqa: E402  the outcome bench's distill and measures

RESULTS = ROOT / "bench" / "results"
DEPTH_LAYERS = 8
ARMS = {"depth": {}, "ffn": {"ffn": 1024}, "heads+ffn": {"heads": 6, "ffn": 1152}}


def write_mix(corpus: Path, data: Path, mix: Path) -> None:
    """The outcome recovery mix: the teacher corpus (plain or gzipped JSONL) + the general-text train split."""
    raw = gzip.decompress(corpus.read_bytes()) if corpus.suffix == ".gz" else corpus.read_bytes()
    tmp = mix.with_suffix(".tmp")
    tmp.write_bytes(raw.rstrip(b"\n") + b"\n" + (data / "general-train.jsonl").read_bytes())
    os.replace(tmp, mix)


def decoder_layer_params(model: str) -> int:
    from prunekit.pipeline import text_layer_params
    return sum(text_layer_params(Path(model)))


def cut(arm: str, original: str, mix: Path, out: Path, args) -> str:
    from prunekit.stages.prune import prune
    from prunekit.stages.width import width
    if arm == "depth":
        order = json.loads(args.plan.read_text())["order"]
        layers = [int(e["id"].split(":")[1]) for e in order[:DEPTH_LAYERS]]
        return str(prune(original, out, drop_text=layers, overwrite=True).output)
    dev = "cuda" if args.gpu else "cpu"
    return str(width(original, out, mix, **ARMS[arm], samples=args.samples, max_length=256, batch_size=16,
                     device=dev, overwrite=True, plot=False).output)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="every arm on CPU with tiny sizes (writes *_smoke.json)")
    ap.add_argument("--data", type=Path, default=None, help="data files (default OUT/data)")
    ap.add_argument("--corpus", type=Path, default=None, help="the teacher-sampled corpus (.jsonl or .jsonl.gz)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "width_vs_depth")
    ap.add_argument("--plan", type=Path, default=ROOT / "bench" / "results" / "knockout_smollm2" / "plan.json")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--samples", type=int, default=256, help="calibration rows for the width importance")
    ap.add_argument("--eval-samples", type=int, default=128, help="chat val rows per measurement")
    ap.add_argument("--eval-text-samples", type=int, default=None, help="general-text rows (default: all)")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, from {', '.join(ARMS)}")
    ap.add_argument("--report-only", type=Path, default=None, metavar="RESULTS_JSON",
                    help="write the report from a run's results.json (e.g. one fetched from a GPU box)")
    ap.add_argument("--machine", default=None, help="with --report-only: the machine the run was on")
    args = ap.parse_args(argv)
    if args.report_only:
        write_report(json.loads(args.report_only.read_text()), args, RESULTS / "width_vs_depth_smollm2.json")
        return 0
    args.fallback = {}
    if args.smoke:
        args.steps, args.samples, args.eval_samples, args.eval_text_samples = 2, 4, 4, 4
        args.out = args.out.with_name(args.out.name + "-smoke")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = (args.data or out / "data").resolve()
    prepare_data(data)
    mix = out / "recovery.jsonl"
    if not mix.is_file():
        if args.corpus is None:
            if not args.smoke:
                ap.error("--corpus: give the teacher-sampled corpus (the outcome run's teacher.jsonl)")
            args.corpus = data / "chat-train.jsonl"   # smoke: any rows will do
        write_mix(args.corpus, data, mix)
    from prunekit.core.loading import resolve_model
    original = str(resolve_model("smollm2"))
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"arms": {}}
    results["command"] = "python bench/width_vs_depth_smollm2.py " + " ".join(argv if argv is not None else
                                                                                sys.argv[1:])
    results["original_decoder_layer_params"] = decoder_layer_params(original)
    if "original" not in results:
        results["original"] = measure(original, data, args)
    for arm in filter(None, args.arms.split(",")):
        if arm not in ARMS:
            ap.error(f"--arms: {arm!r} is not one of {', '.join(ARMS)}")
        if arm in results["arms"]:
            print(f"== {arm}: done earlier", flush=True)
            continue
        print(f"\n== {arm}", flush=True)
        t0 = time.time()
        model = cut(arm, original, mix, out / arm, args)
        after_cut = measure(model, data, args)
        t1 = time.time()
        distilled = distill(model, mix, data, out / f"{arm}-distill", f"wvd-{arm}", args.steps, args)
        results["arms"][arm] = {"settings": ARMS[arm] or {"drop_layers": DEPTH_LAYERS},
                                "decoder_layer_params": decoder_layer_params(model), "cut": after_cut,
                                "steps": args.steps, "distilled": measure(distilled, data, args),
                                "cut_seconds": round(t1 - t0, 1), "distill_seconds": round(time.time() - t1, 1)}
        tmp = results_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        os.replace(tmp, results_path)
    name = "width_vs_depth_smollm2_smoke" if args.smoke else "width_vs_depth_smollm2"
    write_report(results, args, RESULTS / f"{name}.json")
    return 0


def write_report(results: dict, args, path: Path) -> None:
    import platform
    import torch
    o = results["original"]

    def row(rec):
        t, c = rec["eval_text"], rec["eval"]
        return {"params": rec["facts"]["params"],
                "general_text": {"token_acc": t["token_acc"], "nll": t["loss"],
                                 "vs_original": t["token_acc"] / o["eval_text"]["token_acc"]},
                "chat_val": {"token_acc": c["token_acc"], "nll": c["loss"],
                             "vs_original": c["token_acc"] / o["eval"]["token_acc"]}}

    total = results["original_decoder_layer_params"]
    arms = {k: {"settings": v["settings"], "params": v["cut"]["facts"]["params"],
                "decoder_layer_params_removed": 1 - v["decoder_layer_params"] / total,
                "after_cut": row(v["cut"]), "steps": v["steps"], "after_distill": row(v["distilled"]),
                "seconds": {"cut": v["cut_seconds"], "distill": v["distill_seconds"]}}
            for k, v in results["arms"].items()}
    best = max(arms, key=lambda k: arms[k]["after_distill"]["general_text"]["token_acc"]) if arms else None
    report = {"benchmark": "width_vs_depth_smollm2", "date": time.strftime("%Y-%m-%d"),
              "machine": args.machine or (torch.cuda.get_device_name(0) if args.gpu else
                                          platform.processor() or platform.machine()),
              "command": results.get("command"),
              "original": row(o) | {"decoder_layer_params": total}, "arms": arms,
              "best_by_general_text": best}
    path.write_text(json.dumps(report, indent=1) + "\n")
    plot(report, path.with_suffix(".png"))
    print(json.dumps({k: {m: round(v["after_distill"][m]["vs_original"], 3) for m in ("general_text", "chat_val")}
                      for k, v in arms.items()}, indent=1))
    print(f"best by general text: {best}; wrote {path} (+ .png)")


def plot(report: dict, path: Path) -> None:
    from prunekit.core.plots import pyplot, save_figure
    plt = pyplot()
    names = list(report["arms"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, title in ((axes[0], "general_text", "general English text (held out)"),
                              (axes[1], "chat_val", "chat val")):
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], [100 * report["arms"][n]["after_cut"][metric]["vs_original"] for n in names],
               width=0.4, label="right after the cut", color="tab:gray")
        ax.bar([i + 0.2 for i in x], [100 * report["arms"][n]["after_distill"][metric]["vs_original"]
                                      for n in names], width=0.4, label="after distillation", color="tab:blue")
        ax.set_xticks(list(x))
        ax.set_xticklabels([f"{n}\n-{100 * report['arms'][n]['decoder_layer_params_removed']:.1f}% layer params"
                            for n in names], fontsize=8)
        ax.set_title(f"{title}: token_acc, % of the original", fontsize=10)
        ax.legend(fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
