"""Recipe: the one-command demo — a small pipeline on the embedded default model (SmolLM2-135M-Instruct, chatterbot
data, local Ray), sized for 2 CPU cores.

data -> a small teacher-sampled corpus (the original's own answers to 128 chatterbot train questions: vLLM on CPU
where installed, ~1 minute) -> inspect -> the pipeline recipe below, trained on that corpus: importance (block
influence) -> a short knockout sweep over the least important layers (Ray Tune) -> prune the plan -> short recovery
SFT -> distillation from the original -> KV-cut to 1 KV head (MQA), calibrated layer by layer on 16 corpus rows ->
the summary table (chat val and held-out general text), plus a sample answer from the original, the recovered and
the cut model. The chat val's questions are never asked in training. Recovering on the teacher's own answers instead
of chatterbot's keeps more of the general text at every stage (on 2 cores, 2026-11-30: after SFT 0.304 against
0.284, after the KV cut 0.108 against 0.068), at ~2 more minutes. The KV cut gets no recovery training here: merging
SmolLM2's 3 KV heads into 1 costs most of the token accuracy, the calibration brings back a part of it, and the
distillation that heals the rest (recipes/outcome.yaml) does not fit a CPU demo.
The recipe is written to OUT/recipe.yaml: `prunekit pipeline OUT/recipe.yaml` runs (or resumes) the same thing.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import yaml

from prunekit.core import report
from prunekit.core.datasets import chatterbot_to_messages
from prunekit.core.loading import quiet_transformers, resolve_model
from prunekit.rl.corpus import generate_corpus

QUESTION = "What is the capital of France?"
TEACHER_ROWS = 128            # about what the demo's trials, SFT and distillation read (few rows repeat)
TEACHER_MAX_NEW_TOKENS = 96   # a row is at most 128 tokens (TRAIN) with the chat template's ~30
TRAIN = {"max_length": 128, "batch_size": 4, "lr": 1.0e-4, "warmup_ratio": 0.0, "eval_max_samples": 32,
         "save_interval": 1000}

# SmolLM2-135M has 30 layers of ~3.5M parameters next to 28M of (tied) embeddings: removing 3 interior layers
# reaches 93% of the parameters in one round.
DEMO_RECIPE = {
    "target": {"params_fraction": 0.93},
    "max_rounds": 2,                # one round normally reaches the target; a second if the sweep keeps fewer layers
    "min_token_acc_ratio": 0.75,    # short CPU-sized recovery; real runs keep the default 0.9
    "rounds": ["importance", {"knockout": {"importance_candidates": 4}}, "prune", "sft", "distill"],
    "finish": ["kv_cut"],
    "stages": {
        "importance": {"samples": 16, "max_length": 128, "nll": False},
        "knockout": {**TRAIN, "max_steps": 2, "eval_interval": 2, "log_interval": 1, "eval_max_samples": 16,
                     "importance": False, "free_ratio": 0.9, "recoverable_ratio": 0.8,
                     "tune": {"max_concurrent_trials": 2}},
        "sft": {**TRAIN, "max_steps": 15, "eval_interval": 15},
        "distill": {**TRAIN, "max_steps": 10, "eval_interval": 10},
        "kv_cut": {"kv_heads": 1, "grouping": "similarity", "samples": 16, "calibrate": True, "calibration_steps": 30},
    },
    "eval_samples": 32,
    "eval_max_length": 128,
    "eval_text": "general",         # the held-out general English text: recovery that is not just chat fit
    "eval_text_samples": 32,        # of its ~220 rows: a CPU-sized look
    "wandb": {"mode": "disabled"},
}


def _step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.time()


def _reply(path: Path) -> str:
    from prunekit.core.evaluate import greedy_reply
    from prunekit.core.loading import load_model, load_tokenizer
    with quiet_transformers():
        model, _ = load_model(path)
        tokenizer = load_tokenizer(path)
    return greedy_reply(model, tokenizer, QUESTION)


def demo(model: str = "smollm2", out: str | Path = "prunekit-demo", overwrite: bool = False):
    from prunekit.config import load_config
    from prunekit.pipeline import pipeline
    start = time.time()
    out = Path(out).resolve()
    t = _step("data: chatterbot-corpus English Q/A -> messages JSONL")
    counts = chatterbot_to_messages(out / "data" / "train.jsonl", val_path=out / "data" / "val.jsonl")
    print(f"{counts['train']} train / {counts['val']} val conversations in {out / 'data'} ({time.time() - t:.0f}s)")

    base = resolve_model(model)
    t = _step(f"teacher corpus: {model}'s own answers to {TEACHER_ROWS} train questions (resumes)")
    teacher = out / "data" / "teacher.jsonl"
    stats = generate_corpus(base, teacher, prompts=out / "data" / "train.jsonl", seed_prompts=False,
                            rows=TEACHER_ROWS, max_new_tokens=TEACHER_MAX_NEW_TOKENS, temperature=1.0, top_p=0.95)
    print(f"{stats['rows']} rows, {stats['tokens']:,} answer tokens (mean {stats['mean_tokens']:.0f}) in {teacher} "
          f"({time.time() - t:.0f}s)")

    _step(f"inspect {model}")
    print(report.format_inspect(report.describe(base)))

    recipe = {"model": model, "train": str(teacher), "val": str(out / "data" / "val.jsonl"),
              "output_dir": str(out / "pipeline"), **DEMO_RECIPE}
    recipe_path = out / "recipe.yaml"
    recipe_path.write_text("# written by `prunekit demo`; run or resume it with `prunekit pipeline " +
                           f"{recipe_path}`\n" + yaml.safe_dump(recipe, sort_keys=False))
    if overwrite and (out / "pipeline").exists():
        shutil.rmtree(out / "pipeline")
    _step(f"pipeline {recipe_path}: importance -> knockout -> prune -> sft -> distill -> kv-cut, on the teacher corpus")
    result = pipeline(load_config("pipeline", recipe_path), where=str(recipe_path))

    _step("sample answers")
    recovered = [r for r in result.stages if r["stage"] in ("sft", "distill")][-1]
    print(f"Q: {QUESTION}")
    for label, path in (("original", base), (f"{recovered['id']} (pruned + recovered)", recovered["output"]),
                        (f"{Path(result.final_model).name} (+ KV cut, calibrated, no training yet)", result.final_model)):
        print(f"  {label}: {_reply(Path(path))!r}", flush=True)
    print(f"\noutputs: every stage under {out / 'pipeline'} (plain HF directories with prunekit.json); "
          f"summary.md / summary.png there; final model {result.final_model}")
    print(f"demo finished in {time.time() - start:.0f}s")
    return result
