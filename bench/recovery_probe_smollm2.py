"""Probe recovery settings on the outcome recipe's pruned SmolLM2 (8 layers removed) at one budget.

Each variant distils a start model from the original for `--steps` steps on the recovery mix with the outcome
recipe's distill settings (recipes/outcome.yaml) plus the variant's changes, then measures general text and the chat
val (as bench/outcome_smollm2.py does). Sets:
  kv        (start: the pruned model, 3 KV heads) KV heads kept or merged into 1 while distilling (merge_kv_heads,
            then the exact kv_cut), at two learning rates -> bench/results/recovery_probe_smollm2.json
  lr-batch  (start: the pruned model cut to 1 KV head by the calibrated cut, 100 calibration steps per layer)
            learning rate 6e-4 / 1.2e-3 x batch 32 / 64 -> bench/results/recovery_probe_smollm2_lr_batch.json
  on-policy (start: that cut model) the recipe's distillation without and with a quarter of every batch sampled
            from the student (distill on_policy, 128 new tokens, sampled 40 steps at a time)
            -> bench/results/recovery_probe_smollm2_on_policy.json
  recipe    (start: that cut model) the recipe's distillation alone -> bench/results/recovery_probe_smollm2_recipe.json
  cut-order (start: the pruned model) the same cut and the same total steps, made first (the recipe) or after half
            of the steps on the 3-KV-head model (distil, cut the healed model, distil the rest: each half its own
            warm-up and cosine, as two pipeline stages), and no cut at all (3 KV heads: what the cut costs at that
            budget) -> bench/results/recovery_probe_smollm2_cut_order.json
  calibration (start: the pruned model) the recipe's calibrated cut fitted on the original's layer inputs (teacher
            forcing, the default) or on the cut model's own towards the original's outputs (`calibration_sequential`),
            then the recipe's distillation -> bench/results/recovery_probe_smollm2_calibration.json
  align     (start: the pruned model) the recipe's calibrated cut starting from the aligned heads (the default since
            session 27: per-frequency key merge, principal value subspace) or from their mean, then the recipe's
            distillation -> bench/results/recovery_probe_smollm2_align.json
  prose     (start: that cut model) the recipe's distillation on the recovery mix, and on the mix plus `--prose-rows`
            (4096) teacher continuations of general-train openings (`data openings`; generated here)
            -> bench/results/recovery_probe_smollm2_prose.json
  loss      (start: that cut model) the recipe's forward KL, the generalized JSD (beta 0.5), and forward KL plus 0.2 of
            the plain cross-entropy on the rows' own next tokens (sft_alpha: the general text's real words)
            -> bench/results/recovery_probe_smollm2_loss.json
  free-text (start: that cut model) the same, with `--free-rows` (4096) unconditioned teacher samples instead (text
            from the start token alone, `data generate --unconditioned`) -> recovery_probe_smollm2_free_text.json
  data-size (start: that cut model) the recipe's distillation on the whole mix, on half of its rows and on a quarter
            (seeded samples): how much the result at a fixed step count depends on unique rows, with no generation
            -> bench/results/recovery_probe_smollm2_data_size.json
  noise     (start: that cut model) on a quarter of the mix, so that `--steps 800` makes the recipe's ~14 passes over
            its rows: the recipe's distillation, and with 10% / 20% of the supervised input tokens replaced by tokens
            of the batch (distill input_noise: the teacher reads the same noisy inputs)
            -> bench/results/recovery_probe_smollm2_noise.json
  hidden    (start: that cut model) the recipe's forward KL alone, and with 0.1 / 1.0 of the hidden-state loss
            (distill hidden_weight: each student layer's output against the teacher's hidden state where it hands
            on, by the prune steps in its lineage) -> bench/results/recovery_probe_smollm2_hidden.json
  code      (start: that cut model) the recipe's distillation on the mix, and on the mix plus `--code-rows` (1024) rows
            of Python source (this interpreter's standard library, PSF licence; whole lines): the chat val is 61% code
            answers by token (bench/results/chat_val_composition.json) -> bench/results/recovery_probe_smollm2_code.json
  code-size (start: that cut model) the mix plus `--code-rows` rows of that Python source, and plus twice as many
            -> bench/results/recovery_probe_smollm2_code_size.json
  code-answers (start: that cut model) the mix plus `--code-rows` rows of Python source (the outcome recipe's mix),
            and that plus `--code-answers` (2048) teacher answers to the seed prompts that ask for code (216 of them:
            prunekit.core.seed_prompts.programming_prompts) -> bench/results/recovery_probe_smollm2_code_answers.json
  time      (start: that cut model) the same device time two ways: the recipe's batch 32 for `--steps`, or batch 16
            for 1.63x the steps (with CUDA graphs a batch-16 step takes 36.4 ms against 59.5:
            bench/results/train_throughput_outcome_shape.json) at lr 6e-4 and at 4.2e-4 (lr scaled by sqrt(1/2))
            -> bench/results/recovery_probe_smollm2_time.json
`--start ffn` removes the parameters by width instead of depth before the cut: FFN 1536 -> 1024 channels in every
layer (`prunekit width --ffn 1024`, 25.0% of the decoder-layer parameters, as bench/width_vs_depth_smollm2.py's ffn
arm), scored on 256 rows of the recovery mix; its result file ends in _ffn.json.

    python bench/recovery_probe_smollm2.py --gpu --data /root/pkdata --corpus OUTCOME_OUT/teacher.jsonl
    python bench/recovery_probe_smollm2.py --gpu --data /root/pkdata --corpus OUTCOME_OUT/teacher.jsonl \
        --set lr-batch --steps 400
    python bench/recovery_probe_smollm2.py --smoke --data DATA --corpus CORPUS --set on-policy   # CPU code path
A run resumes (the same command again, e.g. after a call's time limit): the pruned and cut models and each
finished variant's numbers are kept in --out (`probe_state.json`), and a variant's distillation resumes from its
last checkpoint.
OUTCOME_OUT/teacher.jsonl: the teacher corpus a bench/outcome_smollm2.py run generated from the same --data (a corpus
sampled from another split's questions is refused: the chat val must not be asked in training).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLAN_FIRST_8 = [17, 14, 5, 6, 13, 19, 21, 26]   # the outcome recipe's cut: the committed knockout plan's first 8
SETS = {
    "kv": {"merged-r0.5-lr2e-4": dict(merge_kv_heads=1, merge_kv_ramp=0.5, lr=2e-4),
           "3kv-lr2e-4": dict(lr=2e-4),
           "merged-r0.5-lr6e-4": dict(merge_kv_heads=1, merge_kv_ramp=0.5, lr=6e-4),
           "3kv-lr6e-4": dict(lr=6e-4)},
    "lr-batch": {"lr6e-4-b32": dict(lr=6e-4, batch_size=32), "lr1.2e-3-b32": dict(lr=1.2e-3, batch_size=32),
                 "lr6e-4-b64": dict(lr=6e-4, batch_size=64), "lr1.2e-3-b64": dict(lr=1.2e-3, batch_size=64)},
    "on-policy": {"off-policy": {},
                  "on-policy-0.25": dict(on_policy={"fraction": 0.25, "max_new_tokens": 128, "every": 40})},
    "recipe": {"off-policy": {}},
    "cut-order": {"cut-first": {}, "cut-halfway": {"cut_after": 0.5}, "no-cut": {"no_cut": True}},
    "prose": {"mix": {}, "mix+prose": {"train": "mix+prose"}},
    "free-text": {"mix": {}, "mix+free": {"train": "mix+free"}},
    "loss": {"forward-kl": {}, "jsd-0.5": dict(beta=0.5), "forward-kl+ce0.2": dict(sft_alpha=0.2)},
    "calibration": {"teacher-forced": {}, "sequential": {"calibration": {"sequential": True}}},
    "align": {"aligned": {}, "mean-start": {"calibration": {"align": False}}},
    "data-size": {"mix": {}, "mix-half": {"train": "mix/2"}, "mix-quarter": {"train": "mix/4"}},
    "hidden": {"forward-kl": {}, "hidden-0.1": dict(hidden_weight=0.1), "hidden-1": dict(hidden_weight=1.0)},
    "code": {"mix": {}, "mix+code": {"train": "mix+code"}},
    "code-size": {"mix+code": {"train": "mix+code"}, "mix+code-x2": {"train": "mix+code-x2"}},
    "code-answers": {"mix+code": {"train": "mix+code"}, "mix+code+answers": {"train": "mix+code+answers"}},
    "time": {"b32": {}, "b16-lr6e-4": dict(batch_size=16, steps_scale=1.63),
             "b16-lr4.2e-4": dict(batch_size=16, lr=4.2e-4, steps_scale=1.63)},
    "noise": {"quarter": {"train": "mix/4"}, "quarter-noise0.1": {"train": "mix/4", "input_noise": 0.1},
              "quarter-noise0.2": {"train": "mix/4", "input_noise": 0.2}},
}
RESULT_FILES = {"kv": "recovery_probe_smollm2.json", "lr-batch": "recovery_probe_smollm2_lr_batch.json",
                "on-policy": "recovery_probe_smollm2_on_policy.json", "recipe": "recovery_probe_smollm2_recipe.json",
                "cut-order": "recovery_probe_smollm2_cut_order.json", "prose": "recovery_probe_smollm2_prose.json",
                "calibration": "recovery_probe_smollm2_calibration.json", "align": "recovery_probe_smollm2_align.json",
                "free-text": "recovery_probe_smollm2_free_text.json", "loss": "recovery_probe_smollm2_loss.json",
                "data-size": "recovery_probe_smollm2_data_size.json", "noise": "recovery_probe_smollm2_noise.json",
                "hidden": "recovery_probe_smollm2_hidden.json", "time": "recovery_probe_smollm2_time.json",
                "code": "recovery_probe_smollm2_code.json", "code-size": "recovery_probe_smollm2_code_size.json",
                "code-answers": "recovery_probe_smollm2_code_answers.json"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--data", type=Path, help="the data files of bench/outcome_smollm2.py --prepare")
    ap.add_argument("--corpus", type=Path, help="a teacher corpus (.jsonl or .jsonl.gz)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "recovery_probe")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--set", choices=list(SETS), default="kv", dest="variant_set")
    ap.add_argument("--start", choices=["depth", "ffn"], default="depth",
                    help="remove ~25%% of the decoder-layer parameters by depth (the recipe's 8 layers) or FFN width")
    ap.add_argument("--prose-rows", type=int, default=4096, help="--set prose: teacher continuations to generate")
    ap.add_argument("--free-rows", type=int, default=4096, help="--set free-text: unconditioned samples to generate")
    ap.add_argument("--code-rows", type=int, default=1024, help="--set code*: rows of Python source in the mix")
    ap.add_argument("--code-answers", type=int, default=2048,
                    help="--set code-answers: teacher answers to the seed prompts that ask for code")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: a check of the code path (result in --out)")
    ap.add_argument("--report-only", type=Path, default=None, metavar="STATE",
                    help="write the set's report from a run's probe_state.json (e.g. one a GPU box sent back)")
    ap.add_argument("--machine", default=None, help="with --report-only: the machine the run was on")
    ap.add_argument("--command", default=None, help="with --report-only: the command that ran (default: the state's)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.steps, args.prose_rows, args.free_rows, args.code_answers = 2, 8, 8, 8
    if args.report_only:
        state = json.loads(args.report_only.read_text())
        results = {**state[f"pruned-{args.start}"], **({"cut": state[f"cut-{args.start}"]}
                                                       if f"cut-{args.start}" in state else {})}
        results.update({name: state[key] for name in SETS[args.variant_set]
                        if (key := f"{args.variant_set}/{args.start}/{name}/{args.steps}") in state})
        header = {**state.get(f"extra_stats/{args.variant_set}", {}),
                  "command": args.command or state.get("command"), "machine": args.machine}
        write_report(args, results, header, [n for n in SETS[args.variant_set] if n not in results])
        return 0
    if args.data is None or args.corpus is None:
        ap.error("--data and --corpus are needed (all but --report-only)")
    if not args.corpus.is_file():
        ap.error(f"--corpus {args.corpus}: no such file")
    for name in ("general-train.jsonl", "general-eval.jsonl", "val.jsonl"):
        if not (args.data / name).is_file():
            ap.error(f"--data {args.data}: no {name} (a folder `outcome_smollm2.py --prepare --data DIR` wrote)")
    sys.path.insert(0, str(ROOT))
    from bench import outcome_smollm2 as bench
    if args.start == "ffn" and args.variant_set == "kv":
        ap.error("--start ffn: the kv set starts from the depth-pruned model; pick another --set")
    args.out.mkdir(parents=True, exist_ok=True)
    from prunekit.core import locks
    with locks.hold((args.out, "--out")):   # a second copy of the same probe stops here, with one line
        return run_set(args, argv, bench)


def run_set(args, argv: list[str] | None, bench) -> int:
    """The set's variants not done yet, in --out (held by this process); each resumes where an earlier call stopped."""
    from prunekit import PrunekitError
    from prunekit.core.loading import resolve_model
    from prunekit.stages.kv_cut import kv_cut
    from prunekit.stages.prune import prune
    recovery = bench.write_recovery_mix(args.data, args.corpus, args.out / "recovery.jsonl")
    settings = types.SimpleNamespace(gpu=args.gpu, smoke=args.smoke, fallback={}, plan=None,
                                     eval_samples=4 if args.smoke else 128,
                                     eval_text_samples=4 if args.smoke else None)
    state_file = args.out / "probe_state.json"   # what earlier calls of this command finished
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}

    def remember(key: str, value) -> None:
        state[key] = value
        tmp = state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(state_file)

    import torch
    machine = torch.cuda.get_device_name(0) if args.gpu else "cpu"
    command = "python bench/recovery_probe_smollm2.py " + " ".join(str(a) for a in (argv if argv is not None
                                                                                   else sys.argv[1:]))
    source = f"{args.corpus.resolve()} ({args.corpus.stat().st_size} bytes)"
    if state.setdefault("corpus", source) != source:
        raise PrunekitError(f"--out {args.out} holds a probe on another corpus ({state['corpus']}): give another --out")
    remember("command", command)   # --report-only's default
    pruned = args.out / f"pruned-{args.start}"
    if f"pruned-{args.start}" not in state:
        if args.start == "depth":
            prune(str(resolve_model("smollm2")), pruned, drop_text=PLAN_FIRST_8, overwrite=True)
        else:
            from prunekit.stages.width import width
            width(str(resolve_model("smollm2")), pruned, recovery, ffn=1024, samples=4 if args.smoke else 256,
                  max_length=256, batch_size=16, device="cuda" if args.gpu else "cpu", overwrite=True, plot=False)
        remember(f"pruned-{args.start}", {"original": bench.measure(str(resolve_model("smollm2")), args.data,
                                                                    settings),
                                          "pruned": bench.measure(str(pruned), args.data, settings)})
    results = dict(state[f"pruned-{args.start}"])

    def calibrated_cut(model: Path | str, out: Path, **how) -> Path:
        """The recipe's cut: KV heads 3 -> 1 by the mean, calibrated (100 steps per layer, 256 rows); `how`:
        CalibrationSettings changes."""
        from prunekit.core.kv_calibration import CalibrationSettings
        kv_cut(str(model), out, 1, "mean", data=str(recovery), overwrite=True, calibrate=True,
               max_samples=4 if args.smoke else 256, device="cuda" if args.gpu else "cpu",
               calibration=CalibrationSettings(steps=2 if args.smoke else 100, **how))
        return out

    train_files, extra_stats = {"mix": recovery}, {}
    if args.variant_set in ("prose", "free-text", "code-answers"):   # teacher text of another kind, generated here
        from prunekit.rl.corpus import generate_corpus
        kind = {"prose": "prose", "free-text": "free", "code-answers": "code-answers"}[args.variant_set]
        if kind == "prose":
            from prunekit.core.text import text_openings
            text_openings([args.data / "general-train.jsonl"], args.out / "prose-prompts.jsonl")
        if kind == "code-answers":
            bench.code_prompts(args.out / "code-prompts.jsonl")
        how = {"prose": dict(prompts=args.out / "prose-prompts.jsonl", rows=args.prose_rows),
               "free": dict(unconditioned=True, rows=args.free_rows),
               "code-answers": dict(prompts=args.out / "code-prompts.jsonl", rows=args.code_answers)}[kind]
        extra_corpus = args.out / f"teacher-{kind}.jsonl"
        extra_corpus.unlink(missing_ok=True)
        extra_stats[f"{kind}_corpus"] = generate_corpus(
            "smollm2", extra_corpus, seed_prompts=False, max_new_tokens=8 if args.smoke else 256,
            backend="transformers", device="cuda" if args.gpu else "cpu", dtype="bfloat16" if args.gpu else "float32",
            **how)
        if kind != "code-answers":   # that set's mixes carry the Python rows too (below)
            train_files[f"mix+{kind}"] = args.out / f"recovery-{kind}.jsonl"
            train_files[f"mix+{kind}"].write_bytes(recovery.read_bytes() + extra_corpus.read_bytes())
    if args.variant_set in ("code", "code-size", "code-answers"):
        for times, suffix in ((1, ""), (2, "-x2"))[:2 if args.variant_set == "code-size" else 1]:
            code = args.out / f"python-code{suffix}.jsonl"
            extra_stats[f"code{suffix}"] = bench.python_code_rows(code, (8 if args.smoke else args.code_rows) * times)
            train_files[f"mix+code{suffix}"] = args.out / f"recovery-code{suffix}.jsonl"
            train_files[f"mix+code{suffix}"].write_bytes(recovery.read_bytes() + code.read_bytes())
        if args.variant_set == "code-answers":   # the outcome recipe's mix (with the Python rows) + the answers
            train_files["mix+code+answers"] = args.out / "recovery-code-answers.jsonl"
            train_files["mix+code+answers"].write_bytes(train_files["mix+code"].read_bytes()
                                                       + extra_corpus.read_bytes())
    if args.variant_set in ("data-size", "noise"):   # seeded row samples of the mix: the same kinds, fewer rows
        import random
        lines = [line for line in recovery.read_text().split("\n") if line.strip()]
        for k in (2, 4):
            rows = random.Random(k).sample(lines, len(lines) // k)
            train_files[f"mix/{k}"] = args.out / f"recovery-{k}.jsonl"
            train_files[f"mix/{k}"].write_text("".join(line + "\n" for line in rows))
            extra_stats[f"mix/{k}_rows"] = len(rows)
        extra_stats["mix_rows"] = len(lines)
    remember(f"extra_stats/{args.variant_set}", extra_stats)
    start_model = pruned
    if args.variant_set != "kv":   # the other sets start from the recipe's cut model
        start_model = args.out / f"cut-{args.start}"
        if f"cut-{args.start}" not in state:
            calibrated_cut(pruned, start_model)
            remember(f"cut-{args.start}", bench.measure(str(start_model), args.data, settings))
        results["cut"] = state[f"cut-{args.start}"]
    for name, extra in SETS[args.variant_set].items():
        done = f"{args.variant_set}/{args.start}/{name}/{args.steps}"
        if done in state:
            results[name] = state[done]
            print(f"{name}: done earlier", flush=True)
            continue
        if args.smoke and "on_policy" in extra:   # the smoke's batch of 2 and checkpoint every 2 steps
            extra = {**extra, "on_policy": {**extra["on_policy"], "fraction": 0.5, "every": 1, "max_new_tokens": 8}}
        start, record = time.time(), {}
        extra = dict(extra)
        train = train_files[extra.pop("train", "mix")]
        steps = max(1, round(args.steps * extra.pop("steps_scale", 1.0)))   # the time set: equal time, not steps
        variant_start = pruned if extra.pop("no_cut", False) else start_model
        if "calibration" in extra:   # its own cut, calibrated another way (CalibrationSettings changes)
            how = extra.pop("calibration")
            variant_start = calibrated_cut(pruned, args.out / f"{name}-cut", **how)
            record = {"calibration": how, "after_cut": bench.measure(str(variant_start), args.data, settings)}
        if "cut_after" in extra:   # distil the 3-KV-head model first, cut the healed model, distil the rest
            first = max(1, int(args.steps * extra["cut_after"]))
            healed = bench.distill(str(pruned), train, args.data, args.out / f"{name}-3kv", f"{name}-3kv",
                                   first, settings)
            cut = calibrated_cut(healed, args.out / f"{name}-cut")
            record = {"healed_3kv": bench.measure(healed, args.data, settings),
                      "after_cut": bench.measure(str(cut), args.data, settings)}
            model = bench.distill(str(cut), train, args.data, args.out / name, name, args.steps - first, settings)
        else:
            model = bench.distill(str(variant_start), train, args.data, args.out / name, name, steps, settings,
                                  **extra)
        if "merge_kv_heads" in extra:
            model = str(kv_cut(model, args.out / f"{name}-cut", 1, overwrite=True).output)
        results[name] = {"steps": steps, "train": train.name, **extra, **record,
                         **bench.measure(model, args.data, settings),
                         "seconds": round(time.time() - start, 1)}
        remember(done, results[name])
        write_report(args, results, {**extra_stats, "command": command, "machine": machine},
                     [n for n in SETS[args.variant_set] if n not in results])
        # each variant's numbers in the log too, so a run whose report does not come back still tells
        o, v = results["original"], results[name]
        sets = (("eval_text", "general text"), ("eval", "chat val"), ("far_text", "far text"))
        print(f"{name}: " + ", ".join(f"{label} token_acc {v[k]['token_acc']:.4f} "
                                      f"({v[k]['token_acc'] / o[k]['token_acc']:.1%} of the original)"
                                      for k, label in sets if k in v)
              + "".join(f", chat val {kind} {m['token_acc']:.4f}" for kind, m in v.get("eval_by_kind", {}).items()),
              flush=True)
    write_report(args, results, {**extra_stats, "command": command, "machine": machine}, [])
    return 0


def write_report(args, results: dict, header: dict, not_run: list[str]) -> Path:
    """The set's report: every variant measured so far against the original (`not_run` names the rest)."""
    o = results["original"]
    report = {"date": time.strftime("%Y-%m-%d"), **header, **({"not_run": not_run} if not_run else {}),
              "variants": {k: {"general_text_vs_original": v["eval_text"]["token_acc"] / o["eval_text"]["token_acc"],
                               "chat_val_vs_original": v["eval"]["token_acc"] / o["eval"]["token_acc"],
                               **({"far_text_vs_original": v["far_text"]["token_acc"] / o["far_text"]["token_acc"]}
                                  if "far_text" in v else {}), **v}
                           for k, v in results.items()}}
    name = RESULT_FILES[args.variant_set].replace(".json", "_ffn.json" if args.start == "ffn" else ".json")
    path = (args.out if args.smoke else ROOT / "bench" / "results") / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    from bench.outcome_smollm2 import run_as_script
    run_as_script(main, "recovery_probe_smollm2")
