"""`prunekit <command>`: one sub-command per stage. Errors the user can fix print as one line and exit 2."""
from __future__ import annotations

import argparse
import json
import os
import sys

from prunekit import PrunekitError, __version__


def _common_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-pickle", action="store_true", help="accept .bin (pickle) weights, which can run code")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code to run")


def _surgery_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--out", required=True, help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--streaming", dest="streaming", action="store_true", default=None,
                      help="shard-by-shard surgery without building the model (default: automatic by size)")
    mode.add_argument("--in-memory", dest="streaming", action="store_false", help="always build the model")
    _common_model_flags(p)


def cmd_inspect(args) -> None:
    from prunekit.core import report
    from prunekit.core.loading import resolve_model
    info = report.describe(resolve_model(args.model, allow_pickle=args.allow_pickle))
    print(json.dumps(info, indent=2) if args.json else report.format_inspect(info))


def _print_surgery(result) -> None:
    from prunekit.core import report
    b, a = result.before["params"]["total"], result.after["params"]["total"]
    print(report.compare_table(result.before, result.after))
    print(f"params {b:,} -> {a:,} ({(b - a) / b * 100:.1f}% removed)"
          f"{'  [streaming]' if result.streaming else ''}")
    print(f"wrote {result.output}")


def cmd_prune(args) -> None:
    from prunekit.stages.prune import prune
    _print_surgery(prune(args.model, args.out, args.drop_text, args.drop_vision, args.plan,
                         overwrite=args.overwrite, streaming=args.streaming, allow_pickle=args.allow_pickle,
                         trust_remote_code=args.trust_remote_code))


def cmd_kv_cut(args) -> None:
    from prunekit.stages.kv_cut import kv_cut
    from prunekit.core.kv_calibration import CalibrationSettings
    result = kv_cut(args.model, args.out, args.kv_heads, args.grouping, args.data, overwrite=args.overwrite,
                    streaming=args.streaming, allow_pickle=args.allow_pickle,
                    trust_remote_code=args.trust_remote_code, max_samples=args.samples, calibrate=args.calibrate,
                    calibration=CalibrationSettings(steps=args.calibration_steps,
                                                    sequential=args.sequential_calibration,
                                                    align=not args.no_align))
    b, a = (r["kv_cache_bytes_per_token_bf16"] for r in (result.before, result.after))
    _print_surgery(result)
    print(f"KV cache bytes/token (bf16): {b:,} -> {a:,} ({b / a:.1f}x smaller)")


def cmd_width(args) -> None:
    from prunekit.stages.width import width
    result = width(args.model, args.out, args.data, ffn=args.ffn, heads=args.heads, hidden=args.hidden,
                   importance=args.importance, samples=args.samples, max_length=args.max_length,
                   batch_size=args.batch_size, device=args.device, overwrite=args.overwrite,
                   streaming=args.streaming, allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code,
                   params=args.params, params_fraction=args.params_fraction, vision_ffn=args.vision_ffn)
    _print_surgery(result)
    sizes = result.provenance["sizes"]
    print("; ".join(f"{k} {v['before']} -> {v['after']}" for k, v in sizes.items()))
    budget = result.provenance.get("budget")
    if budget:
        print(f"{budget['flag']}: chose {budget['chosen']} of " + "; ".join(_mix_line(m) for m in budget["mixes"]))


def _mix_line(m: dict) -> str:
    if m["reason"]:
        return f"{m['mix']} (not a candidate: {m['reason']})"
    sizes = ", ".join(f"{k} {v}" for k, v in m["sizes"].items())
    return f"{m['mix']} ({sizes}: {m['params']:,} params, importance removed {m['importance_removed']:.4f})"


def _parse_set(items: list[str]) -> dict:
    """--set key=value (YAML-typed values; dotted keys reach nested sections, e.g. parallel.workers=2)."""
    import yaml
    out = {}
    for item in items or []:
        if "=" not in item:
            raise PrunekitError(f"--set {item}: expected key=value")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def _overrides(args, flags: list[tuple[str, str]]) -> dict:
    """A command's config overrides: its flags (unset ones stay None, which load_config skips), --overwrite, then
    --set (which wins)."""
    overrides = {key: getattr(args, flag.lstrip("-").replace("-", "_"), None) for flag, key in flags}
    if args.overwrite:
        overrides["overwrite"] = True
    overrides.update(_parse_set(args.set))
    return overrides


TRAIN_FLAGS = [("--model", "model"), ("--train", "train"), ("--val", "val"), ("--output-dir", "output_dir"),
               ("--name", "name"), ("--max-steps", "max_steps"), ("--num-workers", "parallel.workers"),
               ("--strategy", "parallel.strategy"), ("--teacher", "teacher")]


def cmd_train(args) -> None:
    from prunekit.config import load_config
    from prunekit.stages import training
    cfg = load_config(args.stage, args.config, _overrides(args, TRAIN_FLAGS))
    result = getattr(training, args.stage)(cfg)
    m = result.metrics
    shown = ", ".join(f"{k} {m[k]:.4f}" for k in ("train/loss", "eval/loss", "eval/token_acc") if k in m)
    print(f"{args.stage} finished at step {m.get('step')}: {shown}")
    print(f"wrote {result.output}  (run: {result.run_dir})")


def cmd_plan(args) -> int:
    from prunekit.stages.plan import plan
    result = plan(args.model, args.stage, gpus=args.gpus, config=args.config, gpu_memory=args.gpu_memory,
                  teacher=args.teacher, sets=_parse_set(args.set))
    print(json.dumps(result.record, indent=2) if args.json else result.text)
    if result.fits is False and not result.fixable:  # the last line says by how much, on stderr too
        raise PrunekitError(result.record["verdict"])
    return 1 if result.fits is False else 0


def cmd_merge_lora(args) -> None:
    from prunekit.stages.merge_lora import merge_lora
    result = merge_lora(args.adapter, args.out, base=args.base, overwrite=args.overwrite,
                        trust_remote_code=args.trust_remote_code)
    print(f"wrote {result.output}")


def cmd_data_generate(args) -> None:
    from prunekit.stages.generate import generate
    if args.model is None:
        raise PrunekitError("data generate: --model TEACHER is required")
    stats = generate(args.model, args.out, actors=args.actors, address=args.address, prompts=args.prompts,
                     seed_prompts=args.seed_prompts, rows=args.rows, tokens=args.tokens,
                     n_per_prompt=args.n_per_prompt, temperature=args.temperature, top_p=args.top_p,
                     max_new_tokens=args.max_new_tokens, seed=args.seed, backend=args.backend, device=args.device,
                     batch_size=args.batch_size, unconditioned=args.unconditioned)
    run = stats["runs"][-1] if stats.get("runs") else {}
    print(f"{stats.get('rows', 0):,} rows, {stats.get('tokens', 0):,} completion tokens in {stats['output']} "
          f"(mean {stats.get('mean_tokens', 0)}, median {stats.get('median_tokens', 0)}, p90 "
          f"{stats.get('p90_tokens', 0)} tokens; {stats.get('hit_max_new_tokens', 0):.1%} hit --max-new-tokens; "
          f"{stats.get('duplicates_dropped', 0)} duplicates and {stats.get('empty_dropped', 0)} empty answers "
          f"dropped; this run {run.get('kept_rows', 0)} new rows, {run.get('tokens_per_s', 0)} tokens/s)")
    print(f"wrote {stats['output']} and {stats['output']}.stats.json")


def cmd_data(args) -> None:
    from prunekit.core import datasets
    from pathlib import Path
    if args.source == "generate":
        return cmd_data_generate(args)
    if args.source in ("text", "general", "openings"):
        return _cmd_data_text(args)
    out = Path(args.out)
    val = Path(args.val) if args.val else out.with_name(out.stem.replace("train", "val") + out.suffix
                                                        if "train" in out.stem else out.stem + ".val" + out.suffix)
    if args.source == "chatterbot":
        counts = datasets.chatterbot_to_messages(out, val_path=val, val_fraction=args.val_fraction)
    else:
        counts = datasets.easy_vqa_to_messages(out, val_path=val, limit=args.limit,
                                               image_dir=out.parent / "images")
    print(f"wrote {counts['train']} rows to {out} and {counts['val']} to {val}")


def _cmd_data_text(args) -> None:
    from prunekit.core import text
    if args.source == "general":
        if args.files:
            raise PrunekitError("data general: takes no FILE arguments (did you mean `prunekit data text`?)")
        counts = text.general_text(args.out, args.eval, chunk_chars=args.chunk_chars)
        print(f"wrote {counts['train']} text rows to {args.out}" +
              (f" and {counts['eval']} held-out eval rows to {args.eval}" if args.eval else ""))
        return
    if args.source == "openings":
        given = {k: v for k, v in (("opening_chars", args.opening_chars), ("stride_chars", args.stride_chars))
                 if v is not None}   # the defaults live in prunekit.core.text
        rows = text.text_openings(args.files, args.out, **given)
        print(f"wrote {rows} openings to {args.out} (continue them with `prunekit data generate --prompts`)")
        return
    counts = text.text_files_to_rows(args.files, args.out, val_path=args.val, val_fraction=args.val_fraction,
                                     chunk_chars=args.chunk_chars, keep_lines=args.keep_lines, limit=args.limit)
    print(f"wrote {counts['train']} text rows to {args.out}" +
          (f" and {counts['val']} to {args.val}" if args.val else ""))


def cmd_eval(args) -> None:
    from prunekit.stages.evaluate import evaluate_file
    m = evaluate_file(args.model, args.data, args.max_samples, args.max_length, args.trust_remote_code, args.device)
    if args.json:
        print(json.dumps(m))
    else:
        print(f"{args.data}: {m['rows']} rows, {m['tokens']:,} tokens: loss {m['loss']:.4f}, ppl {m['ppl']:.2f}, "
              f"token_acc {m['token_acc']:.4f}")


def cmd_demo(args) -> None:
    from prunekit.pipeline.demo import demo
    demo(args.model, args.out, overwrite=args.fresh)


def cmd_importance(args) -> None:
    from prunekit.stages.importance import importance
    from prunekit.core.surgery import parse_index_list
    result = importance(args.model, args.data, args.out, samples=args.samples, max_length=args.max_length,
                        batch_size=args.batch_size, angular_n=tuple(parse_index_list(args.angular_n, "--angular-n")),
                        nll=not args.no_nll, device=args.device, overwrite=args.overwrite,
                        trust_remote_code=args.trust_remote_code)
    for component in ("text", "vision"):
        scores = result.scores.get(component)
        if scores:
            order = scores["least_important_first"]
            print(f"{component}: least important first by " + "; ".join(f"{m}: {v[:6]}" for m, v in order.items()))
    print(f"wrote {result.output}")


KNOCKOUT_FLAGS = [("--model", "model"), ("--train", "train"), ("--val", "val"), ("--output-dir", "output_dir"),
                  ("--name", "name"), ("--max-steps", "max_steps"), ("--storage-path", "storage_path")]


def cmd_knockout(args) -> None:
    from prunekit.config import load_config
    from prunekit.stages.knockout import knockout
    result = knockout(load_config("knockout", args.config, _overrides(args, KNOCKOUT_FLAGS)), resume=args.resume)
    counts = {v: sum(1 for r in result.rows if r.get("verdict") == v) for v in ("free", "recoverable", "key")}
    print(f"knockout {result.name}: ran {len(result.ran)} trial(s) now; verdicts {counts}; "
          f"{len(result.errors)} error(s); plan drops text {result.plan['drop_text']} vision "
          f"{result.plan['drop_vision']} ({result.plan['params_fraction']:.1%} of the parameters)")
    for cid, msg in result.errors.items():
        print(f"  error {cid}: {msg.splitlines()[0][:200] if msg else 'failed'}")
    print(f"wrote {result.output}  (run: {result.run_dir})")


def cmd_width_search(args) -> None:
    from prunekit.config import load_config
    from prunekit.stages.width_search import width_search
    overrides = {key: getattr(args, flag.lstrip("-").replace("-", "_")) for flag, key in KNOCKOUT_FLAGS}
    if args.overwrite:
        overrides["overwrite"] = True
    overrides.update(_parse_set(args.set))
    result = width_search(load_config("width-search", args.config, overrides), resume=args.resume)
    print(f"width-search {result.name}: ran {len(result.ran)} trial(s) now; {len(result.errors)} error(s)")
    for r in result.rows:
        ratio = f" ({r['ratio']:.1%} of the original)" if r.get("ratio") is not None else ""
        shown = (f"token_acc {r['token_acc']:.4f}{ratio}, {r['params']:,} params"
                 if r.get("token_acc") is not None else r.get("reason") or r.get("error") or r["status"])
        print(f"  {r['id']}: {shown}")
    if result.best:
        print(f"best: {result.best['candidate']}: {result.best['command']}")
    print(f"wrote {result.output}  (run: {result.run_dir})")


RL_FLAGS = [("--model", "model"), ("--prompts", "prompts"), ("--output-dir", "output_dir"), ("--name", "name"),
            ("--max-steps", "max_steps"), ("--num-workers", "parallel.workers"), ("--algorithm", "algorithm.name"),
            ("--backend", "rollout.backend")]


def cmd_rl(args) -> None:
    from prunekit.config import load_config
    from prunekit.stages.rl import rl
    result = rl(load_config("rl", args.config, _overrides(args, RL_FLAGS)))
    m = result.metrics
    shown = ", ".join(f"{k} {m[k]:.4f}" for k in ("reward/total/mean", "train/kl", "response/length_mean") if k in m)
    print(f"rl finished at step {m.get('step', '?')}: {shown}")
    print(f"wrote {result.output}  (run: {result.run_dir})")


def cmd_pipeline(args) -> None:
    from prunekit.config import load_config
    from prunekit.pipeline import pipeline
    if (args.recipe is None) == (args.config is None):
        raise PrunekitError("give the recipe once: `prunekit pipeline RECIPE.yaml` or `--config RECIPE.yaml`")
    recipe = args.recipe or args.config
    overrides = _parse_set(args.set)
    if args.address:
        overrides["ray.address"] = args.address
    result = pipeline(load_config("pipeline", recipe, overrides), where=recipe, redo=args.redo)
    print(f"pipeline {result.status}: final model {result.final_model}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunekit", description="Make language and vision-language models smaller.")
    parser.add_argument("--version", action="version", version=f"prunekit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # every command that may run on Ray takes the same --address (what `ray_jobs/<command>.py` passes through)
    on_ray = argparse.ArgumentParser(add_help=False)
    on_ray.add_argument("--address", default=None,
                        help="Ray cluster address (host:port or ray://host:port); default: this job's cluster "
                             "(RAY_ADDRESS under `ray job submit`), else the last `ray start` here, else a local Ray")

    p = sub.add_parser("inspect", help="family, layers, heads, parameters, KV-cache bytes per token")
    p.add_argument("model", metavar="MODEL", help="HF directory, .gguf file, or alias (smollm2)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _common_model_flags(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("prune", help="remove text layers / vision blocks")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--drop-text", default=None, help="text layers to remove, e.g. 3,5-7")
    p.add_argument("--drop-vision", default=None, help="vision blocks to remove, e.g. 10,11")
    p.add_argument("--plan", default=None, help="plan.json from `prunekit knockout` (drop_text / drop_vision)")
    _surgery_flags(p)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("kv-cut", help="reduce the number of KV heads")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--kv-heads", type=int, required=True, help="new number of KV heads (1 = MQA)")
    p.add_argument("--grouping", default="mean", choices=["mean", "similarity"],
                   help="mean: average adjacent heads; similarity: group heads by K/V output similarity on --data")
    p.add_argument("--data", default=None, help="calibration conversations (messages JSON/JSONL) for similarity")
    p.add_argument("--calibrate", action="store_true",
                   help="fit the merged heads layer by layer on --data so each layer's attention output matches")
    p.add_argument("--samples", type=int, default=64, help="calibration conversations taken from --data")
    p.add_argument("--calibration-steps", type=int, default=200, help="Adam steps per layer of --calibrate")
    p.add_argument("--sequential-calibration", action="store_true",
                   help="--calibrate each layer on the cut model's own inputs (its earlier layers calibrated "
                        "already) towards the original's outputs, not on the original's inputs")
    p.add_argument("--no-align", action="store_true",
                   help="--calibrate from the mean of each group's heads instead of their aligned merge (keys by "
                        "rotary frequency, values by principal subspace)")
    _surgery_flags(p)
    p.set_defaults(func=cmd_kv_cut)

    p = sub.add_parser("width", help="remove FFN channels, attention heads and hidden channels by activation "
                                     "importance (Minitron-style), the same sizes in every layer")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--data", default=None, help="calibration rows (messages / text JSON/JSONL) to score channels on")
    p.add_argument("--importance", default=None, metavar="FILE",
                   help="importance.json of an earlier `prunekit width` (no model pass; allows --streaming)")
    p.add_argument("--ffn", default=None, help="FFN channels to keep: a fraction (0.75; rounded to a multiple of 64 "
                                               "for FFNs of 1024+) or an intermediate size (1152)")
    p.add_argument("--heads", type=int, default=None,
                   help="query heads per layer to keep (a multiple of the KV heads; the KV heads stay)")
    p.add_argument("--hidden", type=int, default=None, help="hidden (embedding) channels to keep")
    p.add_argument("--vision-ffn", default=None, metavar="F",
                   help="VLMs: vision MLP channels to keep in every vision block, a fraction (0.75) or a size, "
                        "scored on the image rows of --data")
    p.add_argument("--params", default=None, metavar="N",
                        help="instead of --ffn/--heads/--hidden: at most N parameters (as `prunekit inspect` counts); "
                             "prunekit solves FFN only, heads+FFN and hidden+FFN to it and keeps the mix that "
                             "removes the least importance (recorded in prunekit.json)")
    p.add_argument("--params-fraction", default=None, metavar="F",
                        help="the same, as a fraction of the model's parameters (0.75)")
    p.add_argument("--samples", type=int, default=64, help="calibration rows taken from --data")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="cpu", help="where the scoring pass runs (cpu, cuda, ...)")
    _surgery_flags(p)
    p.set_defaults(func=cmd_width)

    for stage, text in (("sft", "recovery SFT on Ray Train"), ("distill", "full-logit distillation from a teacher"),
                        ("lora", "LoRA fine-tuning (then `prunekit merge-lora`)")):
        p = sub.add_parser(stage, help=text, parents=[on_ray])
        p.add_argument("--config", default=None, help="YAML config (flags override it)")
        for flag, _ in TRAIN_FLAGS:
            if flag != "--teacher" or stage == "distill":
                p.add_argument(flag, default=None, type=int if flag in ("--max-steps", "--num-workers") else str)
        p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any config key, e.g. lr=2e-5")
        p.set_defaults(func=cmd_train, stage=stage)

    p = sub.add_parser("plan", help="GPU memory of a training run from config.json alone: weights, gradients, "
                                    "optimizer, activations, loss buffers per GPU; whether it fits, else the smallest "
                                    "change that does (exit 1 when it does not fit)")
    p.add_argument("model", metavar="MODEL", help="HF directory, its config.json, or alias (no weights are loaded)")
    p.add_argument("--stage", required=True, choices=["sft", "distill", "lora", "knockout"])
    p.add_argument("--gpus", type=int, default=None,
                   help="GPUs the run uses (default: the config's parallel.workers; knockout: trials per GPU come "
                        "from tune.gpus_per_trial)")
    p.add_argument("--config", default=None, help="the stage's YAML config (strategy, precision, batch, ...)")
    p.add_argument("--gpu-memory", default=None, metavar="SIZE",
                   help="memory of one GPU, e.g. 80GiB (default: what the GPUs this machine sees have free)")
    p.add_argument("--teacher", default=None, help="distill: the teacher (overrides the config's)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any config key, e.g. batch_size=8")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("merge-lora", help="merge a LoRA adapter into a full model")
    p.add_argument("adapter", metavar="ADAPTER")
    p.add_argument("--base", default=None, help="base model (default: the adapter's, relative to the adapter)")
    p.add_argument("-o", "--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(func=cmd_merge_lora)

    p = sub.add_parser("data", help="convert offline datasets into messages JSONL, text into {text} rows; "
                                    "`generate`: sample a corpus from a teacher model", parents=[on_ray])
    p.add_argument("source", choices=["chatterbot", "easy-vqa", "text", "general", "openings", "generate"],
                   help="text: chunk the UTF-8 FILEs; general: the built-in general English text (train + --eval); "
                        "openings: openings of the {text} rows in FILEs, for `generate --prompts` to continue; "
                        "generate: a teacher-sampled corpus")
    p.add_argument("files", nargs="*", metavar="FILE", help="text: raw UTF-8 text files; openings: {text} rows")
    p.add_argument("-o", "--out", required=True, help="train file (.jsonl or .json); generate: the corpus .jsonl")
    p.add_argument("--val", default=None, help="val file (default: next to OUT, 'train' -> 'val'; text: none)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--limit", type=int, default=None,
                   help="easy-vqa: at most this many rows per split; text: the first this many rows")
    p.add_argument("--chunk-chars", type=int, default=2000, help="text, general: at most this many characters a row")
    p.add_argument("--keep-lines", action="store_true",
                   help="text: keep lines and indentation (source code), cut long paragraphs at line ends")
    p.add_argument("--eval", default=None, help="general: the held-out eval split (never in OUT)")
    p.add_argument("--opening-chars", type=int, default=None,
                   help="openings: at most this many characters each (default 300)")
    p.add_argument("--stride-chars", type=int, default=None,
                   help="openings: one opening every this many characters (default 500)")
    g = p.add_argument_group("generate (teacher-sampled corpus; re-running the same command resumes)")
    g.add_argument("--model", default=None, metavar="TEACHER", help="the model to sample from (HF dir, .gguf, alias)")
    g.add_argument("--prompts", default=None, metavar="FILE",
                   help="messages rows (each user turn is a prompt) or {\"text\"} rows (continued raw)")
    g.add_argument("--seed-prompts", nargs="?", type=int, const=True, default=None, metavar="N",
                   help="use the built-in diverse prompts (the first N); the default without --prompts")
    g.add_argument("--unconditioned", action="store_true",
                   help="no prompts: {\"text\"} rows sampled from the start token alone (the teacher's own text)")
    g.add_argument("--rows", type=int, default=None, help="stop when the corpus has this many rows")
    g.add_argument("--tokens", type=int, default=None, help="... or this many completion tokens")
    g.add_argument("--n-per-prompt", type=int, default=1, help="samples per prompt per pass")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-size", type=int, default=None, help="rows per generation batch (default 512 GPU, 16 CPU)")
    g.add_argument("--backend", default="auto", choices=["auto", "vllm", "transformers", "slots"])
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--actors", type=int, default=0,
                   help="Ray rollout actors, one GPU each (0: generate in this process, no Ray)")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("eval", help="loss, perplexity and token_acc of a model on messages or text rows")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--data", required=True, help="messages and/or {text} rows (JSON/JSONL)")
    p.add_argument("--max-samples", type=int, default=None, help="the first N rows (default: all)")
    p.add_argument("--max-length", type=int, default=512, help="tokens per row (longer rows are truncated)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("pipeline", help="rounds of knockout -> prune -> sft -> distill until a target size, then "
                                        "kv-cut / LoRA / RL; resumable", parents=[on_ray])
    p.add_argument("recipe", nargs="?", metavar="RECIPE", help="pipeline recipe (YAML)")
    p.add_argument("--config", default=None, help="the recipe, as a flag (what `ray_jobs/pipeline.py` passes)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any recipe key, e.g. target.params_fraction=0.6")
    p.add_argument("--redo", default=None, metavar="STAGE_ID",
                   help="run this finished stage (e.g. r1-3-sft) and every later one again")
    p.set_defaults(func=cmd_pipeline)
    p = sub.add_parser("demo", help="a small pipeline on the embedded default model, recovering on its own answers: "
                                    "teacher corpus -> importance -> knockout -> prune -> sft -> distill -> kv-cut, "
                                    "with a summary table")
    p.add_argument("--model", default="smollm2")
    p.add_argument("-o", "--out", default="prunekit-demo", help="directory for the demo's outputs")
    p.add_argument("--fresh", action="store_true", help="run the pipeline again instead of resuming it (the data and the "
                                                            "teacher corpus are kept)")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("importance", help="training-free layer importance (block influence, angular, NLL-drop)")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--data", required=True, help="calibration conversations (messages JSON/JSONL, images for VLMs)")
    p.add_argument("-o", "--out", required=True, help="output directory: importance.json + one PNG per metric")
    p.add_argument("--samples", type=int, default=32, help="calibration conversations to use")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--angular-n", default="1,2", help="block sizes for the angular distance, e.g. 1,2,4")
    p.add_argument("--no-nll", action="store_true", help="skip NLL-drop (one forward pass per layer)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(func=cmd_importance)

    for command, text, example, func in (
            ("knockout", "knockout sweep on Ray Tune: remove each candidate, short SFT, eval",
             "tune.gpus_per_trial=0.5", cmd_knockout),
            ("width-search", "width mixes and depth at one parameter budget as Ray Tune trials: prune, short "
                             "distillation, eval on general text; the best setting", "params_fraction=0.7",
             cmd_width_search)):
        p = sub.add_parser(command, help=text, parents=[on_ray])
        p.add_argument("--config", default=None,
                       help=f"YAML config (flags override it), e.g. recipes/{command.replace('-', '_')}.yaml")
        for flag, _ in KNOCKOUT_FLAGS:
            p.add_argument(flag, default=None, type=int if flag == "--max-steps" else str)
        p.add_argument("--resume", action="store_true", help="continue the run of this name (unfinished trials)")
        p.add_argument("--overwrite", action="store_true", help="replace a non-empty report directory")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help=f"any config key, e.g. {example}")
        p.set_defaults(func=func)
    p = sub.add_parser("rl", help="RL with GRPO / GSPO: rollout actors, rewards, learners on Ray", parents=[on_ray])
    p.add_argument("--config", default=None, help="YAML config (flags override it), e.g. recipes/rl.yaml")
    for flag, _ in RL_FLAGS:
        p.add_argument(flag, default=None, type=int if flag in ("--max-steps", "--num-workers") else str)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any config key, e.g. rollout.n=16")
    p.set_defaults(func=cmd_rl)
    return parser


def _stop_local_ray() -> None:
    """A local Ray instance this command started is stopped before its last line is printed (nothing of Ray's
    follows it, no Ray process outlives it), whatever ended the command."""
    cluster = sys.modules.get("prunekit.distributed.cluster")  # imported only by commands that use Ray
    if cluster is not None:
        cluster.stop_local()


def join_named_cluster(args) -> None:
    """A Ray-backed command given `--address`, or run where RAY_ADDRESS names a cluster (a `ray job submit` job):
    join it before anything else, so an address that does not answer is one line at once, and say what it is.
    Otherwise a command starts Ray only if and when it needs it."""
    if not hasattr(args, "address") or not (args.address or os.environ.get("RAY_ADDRESS", "").strip() not in
                                            ("", "local")):
        return
    from prunekit.distributed.cluster import connect, describe_cluster
    where = connect(args.address)
    print(f"prunekit {args.command}: Ray at {where}: {describe_cluster()}", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Errors the user can fix: one line, exit 2. Ctrl-C: `interrupted`, 130; SIGTERM: `terminated`, 143 (both
    unwind like an exception, so temp dirs, partial checkpoints, locks and workers are cleaned up first)."""
    from prunekit.core import interrupts, locks
    args = build_parser().parse_args(argv)
    locks.command = f"prunekit {args.command}"  # how a lock this command holds names it to a second one
    interrupts.last_signal = None
    with interrupts.handled(interrupts.raise_interrupt):
        try:
            try:
                join_named_cluster(args)
                code = args.func(args)   # a command may return its own exit code (`plan`: 1 = does not fit)
            finally:
                _stop_local_ray()
        except PrunekitError as e:
            print(f"prunekit {args.command}: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as e:
            word, code = interrupts.outcome(e)
            print(f"prunekit {args.command}: {word}{f' ({e})' if str(e) else ''}", file=sys.stderr)
            return code
    return code if isinstance(code, int) else 0


def entry(argv: list[str] | None = None) -> None:
    """The `prunekit` program: `main`, then exit with its code. A signal that arrives while the interpreter exits
    (atexit hooks, thread joins) ends it at once with that code, not with a default death by signal."""
    import os
    import signal
    from prunekit.core.interrupts import STOP_SIGNALS
    code = main(argv)

    def exit_now(signum, frame):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    for s in STOP_SIGNALS:  # kept through the interpreter's exit
        signal.signal(s, exit_now)
    sys.exit(code)


if __name__ == "__main__":
    entry()
