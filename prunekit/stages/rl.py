"""Recipe: `rl` — improve a model against verifiable rewards with GRPO or GSPO.

validate on the driver (model, prompts, rewards, output; before any actor starts) -> the RL driver (rollout actors,
rewards, learners on the training engine, weight sync) -> the final checkpoint's HF directory written atomically
with provenance. Re-running the same command resumes from the newest checkpoint.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from prunekit import PrunekitError
from prunekit.core import locks
from prunekit.core.loading import (check_output_dir, copy_side_files, load_tokenizer, quiet_transformers,
                                   resolve_model, write_atomically, write_provenance)


@dataclass
class RLResult:
    output: Path
    run_dir: Path
    name: str
    metrics: dict


def validate(cfg):
    """Resolve paths, read + tokenize the prompts, load the rewards; returns (rows, prompt_ids, tokenizer, rewards)."""
    from prunekit.rl.prompts import read_rows, tokenize_prompts
    from prunekit.rl.rewards import load_rewards
    cfg.model = str(resolve_model(cfg.model).resolve())
    cfg.prompts, cfg.output_dir, cfg.storage_path = (Path(p).resolve() for p in (cfg.prompts, cfg.output_dir,
                                                                                  cfg.storage_path))
    check_output_dir(cfg.output_dir, [Path(cfg.model)], cfg.overwrite)
    rows = read_rows(cfg.prompts, cfg.prompt_column)
    if len(rows) < cfg.prompts_per_step:
        raise PrunekitError(f"prompts {cfg.prompts}: {len(rows)} rows < prompts_per_step {cfg.prompts_per_step}")
    with quiet_transformers():
        tok = load_tokenizer(Path(cfg.model), trust_remote_code=cfg.trust_remote_code)
    prompt_ids = tokenize_prompts(tok, rows, cfg.prompt_column, cfg.system_prompt, cfg.max_prompt_length, cfg.prompts)
    rewards = load_rewards(cfg.rewards)
    if cfg.rollout.backend == "vllm":
        from prunekit.rl.rollout import vllm_supported
        why = vllm_supported(Path(cfg.model), "cuda" if cfg.rollout.gpus_per_actor > 0 else "cpu")
        if why:
            raise PrunekitError(f"rollout.backend vllm: {why}; use backend: transformers or auto")
    return rows, prompt_ids, tok, rewards


def rl(cfg) -> RLResult:
    from prunekit.distributed.cluster import connect
    from prunekit.distributed.train import run_name
    from prunekit.engine.loop import HF_DIR
    from prunekit.rl.driver import RLRun
    rows, prompt_ids, tok, rewards = validate(cfg)
    name = run_name("rl", cfg)
    run_dir = cfg.storage_path / name
    with locks.hold((cfg.output_dir, "-o"), (run_dir, "run directory")):  # one writer per run and output
        connect(cfg.ray.address)
        final_ckpt, metrics = RLRun(cfg, rows, prompt_ids, tok, rewards, run_dir, name).run()
        final_ckpt = final_ckpt or run_dir / "checkpoints" / f"step-{cfg.max_steps:07d}"  # already finished earlier
        if not (final_ckpt / HF_DIR).is_dir():
            raise PrunekitError(f"rl run {name}: no final model in {final_ckpt}")
        if not metrics:
            metrics = json.loads((final_ckpt / "metrics.json").read_text())
        base = Path(cfg.model)

        def write(tmp: Path):
            from prunekit.engine.manifest import copy_verified
            copy_verified(final_ckpt, HF_DIR, tmp)  # against the sizes and hashes recorded when it was written
            copy_side_files(base, tmp)
            write_provenance(tmp, {"stage": "rl", "parent": str(base), "run": str(run_dir),
                                   "algorithm": cfg.algorithm.name, "rewards": [r.model_dump() for r in cfg.rewards],
                                   "config": cfg.model_dump(mode="json"),
                                   "metrics": {"step": cfg.max_steps, **metrics}},
                             parent_dir=base)

        out = write_atomically(Path(cfg.output_dir), write, overwrite=cfg.overwrite)
        return RLResult(out, run_dir, name, metrics)
