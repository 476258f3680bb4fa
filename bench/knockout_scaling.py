"""Knockout sweep scaling: the same sweep (every text layer + the baseline, short SFT + eval each) on 1, 2, 4 GPUs
through `prunekit knockout` (Ray Tune, base weights shared through the object store, fractional GPUs per trial),
against the original way: one fresh Python process per trial, in sequence, each loading the model from disk.

    python bench/knockout_scaling.py --gpus 1,2,4 [--gpu-fraction 0.25] [--model qwen0.5b|smollm2] [--steps 100]
    python bench/knockout_scaling.py --smoke        # CPU, tiny model, ~1-2 minutes: checks the code path only

Every configuration runs in its own process (a fresh Ray cluster seeing only its GPUs). Model `qwen0.5b`: a
Qwen2.5-0.5B-shaped random model (24 layers) with SmolLM2's tokenizer when the `smollm2` alias resolves, else a
byte-level BPE trained on the data; `smollm2`: SmolLM2-135M-Instruct (30 layers). Data: chatterbot when installed,
else synthetic arithmetic Q/A. Writes bench/results/knockout_scaling.json (smoke: knockout_scaling_smoke.json).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QWEN05 = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
              num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=4096,
              rope_theta=1000000.0)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            tie_word_embeddings=True, max_position_embeddings=512)
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
RESULT = "BENCH-RESULT "


# ---- inputs ----------------------------------------------------------------------------------------------------

def make_data(workdir: Path) -> tuple[Path, Path, str]:
    from prunekit.core.data import save_messages
    train, val = workdir / "data" / "train.jsonl", workdir / "data" / "val.jsonl"
    try:
        from prunekit.core.datasets import chatterbot_to_messages
        chatterbot_to_messages(train, val_path=val)
        return train, val, "chatterbot"
    except Exception as e:  # no chatterbot-corpus on this box
        print(f"chatterbot unavailable ({e}); synthetic arithmetic Q/A instead", flush=True)
    rows = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                          {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}
            for a in range(45) for b in range(45)]
    save_messages(train, rows[::2][:1800])
    save_messages(val, rows[1::2][:200])
    return train, val, "synthetic"


def save_tokenizer(out: Path, texts: list[str]) -> str:
    """SmolLM2's tokenizer when the alias resolves on this box, else a byte-level BPE trained on the data."""
    try:
        from prunekit.core.loading import resolve_model
        src = resolve_model("smollm2")
        for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
            if (src / f).is_file():
                shutil.copy2(src / f, out / f)
        return "smollm2"
    except Exception as e:
        print(f"smollm2 tokenizer unavailable ({e}); training a byte-level BPE", flush=True)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=4096, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(out)
    return "bpe"


def make_model(workdir: Path, kind: str, train: Path) -> tuple[Path, str]:
    import torch
    from prunekit.core.data import load_messages
    from prunekit.core.loading import resolve_model
    if kind == "smollm2":
        return resolve_model("smollm2"), "smollm2"
    from transformers import Qwen2Config, Qwen2ForCausalLM
    out = workdir / f"model-{kind}"
    out.mkdir(parents=True, exist_ok=True)
    texts = [m["content"] for r in load_messages(train) for m in r["messages"]]
    tokenizer = save_tokenizer(out, texts)
    shape = dict(QWEN05 if kind == "qwen0.5b" else TINY)
    if kind != "qwen0.5b":
        shape["vocab_size"] = 49152 if tokenizer == "smollm2" else 4096
    torch.manual_seed(0)
    config = Qwen2Config(**shape, initializer_range=0.02)
    Qwen2ForCausalLM(config).save_pretrained(out)
    return out, tokenizer


def sweep_config(args, model: Path, train: Path, val: Path, workdir: Path, name: str, gpus: int):
    from prunekit.config import load_config
    on_gpu = not args.smoke
    return load_config("knockout", None, {
        "model": str(model), "train": str(train), "val": str(val), "output_dir": str(workdir / "reports" / name),
        "storage_path": str(workdir / "runs"), "name": name, "max_steps": args.steps, "max_length": args.max_length,
        "batch_size": args.batch_size, "eval_interval": args.steps, "log_interval": max(1, args.steps // 5),
        "eval_max_samples": args.eval_samples, "lr": 2e-5, "warmup_ratio": 0.0, "scheduler": "constant",
        "bf16": on_gpu, "wandb.mode": "disabled", "importance": False, "overwrite": True,
        "candidates.text": args.layers, "tune.gpus_per_trial": args.gpu_fraction if on_gpu else 0,
        "tune.cpus_per_trial": args.cpus_per_trial})


# ---- one configuration per process -----------------------------------------------------------------------------

def run_tune(args) -> dict:
    """Child: the whole sweep through `prunekit knockout` on `args.tune` GPUs (smoke: CPU slots)."""
    import ray
    from prunekit.stages.knockout import knockout
    workdir = Path(args.workdir)
    info = json.loads((workdir / "inputs.json").read_text())
    t0 = time.time()
    if args.smoke:
        ray.init(num_cpus=int(args.tune * args.cpus_per_trial), num_gpus=0, include_dashboard=False,
                 log_to_driver=False)
    else:
        ray.init(num_gpus=args.tune, include_dashboard=False, log_to_driver=False)
    ray_s = time.time() - t0
    name = f"tune-{args.tune}"
    shutil.rmtree(workdir / "runs" / name, ignore_errors=True)
    cfg = sweep_config(args, Path(info["model"]), Path(info["train"]), Path(info["val"]), workdir, name, args.tune)
    t1 = time.time()
    result = knockout(cfg)
    sweep_s = time.time() - t1
    timings = [json.loads(p.read_text())["timing"] for p in sorted((result.run_dir / "trials").glob("*/result.json"))]
    ray.shutdown()
    return {"gpus": args.tune, "ray_start_s": ray_s, "sweep_s": sweep_s, "trials": len(timings),
            "errors": result.errors, "trial_timings": timings}


def run_one(args) -> dict:
    """Child: one trial the original way — load from disk, remove the layer, tokenize, train, eval, exit."""
    import torch
    from prunekit.core.loading import load_model, load_tokenizer, quiet_transformers
    from prunekit.core.plan import Candidate
    from prunekit.core.surgery import LayerDrop, apply_to_model
    from prunekit.engine.loop import train
    from prunekit.engine.objectives import SFTObjective
    from prunekit.engine.reporting import LocalReporter
    from prunekit.core.samples import config_samples
    t0 = time.time()
    workdir = Path(args.workdir)
    info = json.loads((workdir / "inputs.json").read_text())
    cfg = sweep_config(args, Path(info["model"]), Path(info["train"]), Path(info["val"]), workdir, "seq", 1)
    device = torch.device("cpu") if args.smoke else torch.device("cuda", 0)
    with quiet_transformers():
        model, family = load_model(Path(cfg.model), dtype="float32")
        tokenizer = load_tokenizer(Path(cfg.model))
    cand = Candidate.parse(args.one)
    if cand.size:
        model = apply_to_model(model, LayerDrop(family, model.config.to_dict(), list(cand.text), []))
    model = model.to(device)
    train_samples, val_samples = config_samples(cfg, tokenizer, is_vlm=False)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    run_dir = Path(tempfile.mkdtemp(prefix="seq-", dir=workdir))
    t1 = time.time()
    metrics = train(model, SFTObjective(chunk_size=cfg.loss_chunk_size), cfg, train_samples, val_samples, pad_id,
                    LocalReporter(run_dir, "seq", cfg), device=device)
    train_s = time.time() - t1
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"candidate": cand.id, "setup_s": t1 - t0, "train_s": train_s, "eval_token_acc": metrics.get("eval/token_acc")}


def child(cmd: list[str], env: dict) -> tuple[dict, float]:
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise SystemExit(f"child {' '.join(cmd[2:])} failed (exit {proc.returncode})")
    return json.loads(lines[-1][len(RESULT):]), wall


def visible_gpus(n: int) -> str:
    have = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = have.split(",") if have else [str(i) for i in range(64)]
    return ",".join(ids[:n])


# ---- driver ----------------------------------------------------------------------------------------------------

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", default="1,2,4", help="GPU counts to sweep on (smoke: CPU trial slots)")
    p.add_argument("--gpu-fraction", type=float, default=0.25, help="GPU per trial (0.25: four trials per GPU)")
    p.add_argument("--cpus-per-trial", type=float, default=1)
    p.add_argument("--model", default="qwen0.5b", choices=["qwen0.5b", "smollm2", "tiny"])
    p.add_argument("--layers", default="all", help="text layers to knock out (all, or e.g. 0-7)")
    p.add_argument("--steps", type=int, default=100,
                   help="SFT steps per trial (the recipe's 100: with 30 the fixed per-trial costs hid the GPU work)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--eval-samples", type=int, default=64)
    p.add_argument("--sequential-trials", default="8",
                   help="trials the process-per-trial baseline runs (all, or N: time extrapolated to every trial)")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, few steps: checks the code path")
    p.add_argument("--workdir", default=None)
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--out", default=None)
    p.add_argument("--tune", type=int, default=None, help=argparse.SUPPRESS)   # child modes
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.smoke:
        args.model, args.steps, args.batch_size, args.max_length, args.eval_samples = "tiny", 3, 4, 64, 16
        args.gpus = "1,2" if args.gpus == "1,2,4" else args.gpus
        args.sequential_trials = "2"
    if args.tune is not None or args.one is not None:
        os.environ.setdefault("WANDB_MODE", "disabled")
        out = run_tune(args) if args.tune is not None else run_one(args)
        print(RESULT + json.dumps(out), flush=True)
        return

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="prunekit-bench-knockout-"))
    workdir.mkdir(parents=True, exist_ok=True)
    t = time.time()
    train, val, data_kind = make_data(workdir)
    model, tokenizer = make_model(workdir, args.model, train)
    (workdir / "inputs.json").write_text(json.dumps({"model": str(model), "train": str(train), "val": str(val)}))
    print(f"inputs ready in {time.time() - t:.0f}s: {args.model} ({tokenizer} tokenizer), {data_kind} data", flush=True)
    from prunekit.core.families import family_for
    from prunekit.core.loading import read_config
    from prunekit.core.plan import expand_candidates
    n_layers = family_for(read_config(model)).num_text_layers(read_config(model))
    candidates = ["baseline"] + [c.id for c in expand_candidates(args.layers, None, [1], [], n_layers, 0)]
    base_cmd = [sys.executable, os.path.abspath(__file__), "--workdir", str(workdir), "--model", args.model,
                "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
                "--eval-samples", str(args.eval_samples), "--layers", args.layers, "--gpu-fraction",
                str(args.gpu_fraction), "--cpus-per-trial", str(args.cpus_per_trial)] + (["--smoke"] if args.smoke else [])

    tune_runs = []
    for g in [int(x) for x in args.gpus.split(",")]:
        env = dict(os.environ)
        if not args.smoke:
            env["CUDA_VISIBLE_DEVICES"] = visible_gpus(g)
        res, wall = child(base_cmd + ["--tune", str(g)], env)
        res["process_s"] = wall
        slots = g / args.gpu_fraction if not args.smoke else g
        train_total = sum(x["train_s"] for x in res["trial_timings"])
        res["slots"] = slots
        res["mean_trial_train_s"] = train_total / max(1, res["trials"])
        res["mean_trial_setup_s"] = sum(x["setup_s"] + x["fetch_s"] for x in res["trial_timings"]) / max(1, res["trials"])
        # time a slot spent not training, per trial: Tune scheduling, actor start, weight fetch, model build
        res["per_trial_overhead_s"] = (res["sweep_s"] * slots - train_total) / max(1, res["trials"])
        print(f"{g} {'slot(s)' if args.smoke else 'GPU(s)'}: sweep {res['sweep_s']:.1f}s (process {wall:.1f}s), "
              f"{res['trials']} trials, overhead/trial {res['per_trial_overhead_s']:.1f}s", flush=True)
        tune_runs.append(res)

    n_seq = len(candidates) if args.sequential_trials == "all" else min(len(candidates), int(args.sequential_trials))
    seq = []
    env = dict(os.environ)
    if not args.smoke:
        env["CUDA_VISIBLE_DEVICES"] = visible_gpus(1)
    for cand in candidates[:n_seq]:
        res, wall = child(base_cmd + ["--one", cand], env)
        res["process_s"] = wall
        seq.append(res)
        print(f"sequential {cand}: {wall:.1f}s (train {res['train_s']:.1f}s)", flush=True)
    per_trial = sum(r["process_s"] for r in seq) / len(seq)
    seq_total = per_trial * len(candidates)
    one = tune_runs[0]
    by_gpus = {r["gpus"]: r for r in tune_runs}
    speedups = {f"{g}_vs_{one['gpus']}": one["sweep_s"] / r["sweep_s"] for g, r in by_gpus.items() if g != one["gpus"]}
    result = {
        "benchmark": "knockout_scaling", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": platform.node(), "smoke": args.smoke, "model": args.model, "tokenizer": tokenizer, "data": data_kind,
        "text_layers": n_layers, "trials": len(candidates), "steps_per_trial": args.steps, "batch_size": args.batch_size,
        "gpu_fraction_per_trial": None if args.smoke else args.gpu_fraction, "tune": tune_runs,
        "sequential": {"trials_run": len(seq), "extrapolated": len(seq) < len(candidates),
                       "mean_process_s": per_trial, "total_s": seq_total,
                       "mean_train_s": sum(r["train_s"] for r in seq) / len(seq),
                       "per_trial_overhead_s": per_trial - sum(r["train_s"] for r in seq) / len(seq),
                       "runs": seq},
        "speedup_gpus": speedups,
        "speedup_vs_sequential_1": seq_total / by_gpus[one["gpus"]]["sweep_s"],
        "speedup_vs_sequential_1_incl_ray_start": seq_total / by_gpus[one["gpus"]]["process_s"],
    }
    result["goals"] = {"2_gpus_ge_1.8x": speedups.get(f"2_vs_{one['gpus']}", 0) >= 1.8 if 2 in by_gpus else None,
                       "1_gpu_vs_sequential_ge_1.3x": result["speedup_vs_sequential_1"] >= 1.3}
    out = Path(args.out or f"bench/results/knockout_scaling{'_smoke' if args.smoke else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("tune", "sequential")}, indent=2))
    print(f"wrote {out}")
    if not args.keep and not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
