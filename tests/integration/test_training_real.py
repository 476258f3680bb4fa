"""Real weights and real data: SmolLM2-135M-Instruct on the chatterbot corpus (CPU)."""
from __future__ import annotations

import json

from prunekit.config import load_config
from prunekit.stages import training
from prunekit.stages.prune import prune


def lines(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def base_cfg(tmp_path, chat_data, name, **over):
    train, val = chat_data
    return {"train": str(train), "val": str(val), "output_dir": str(tmp_path / name), "name": name,
            "storage_path": str(tmp_path / "runs"), "max_length": 96, "eval_max_samples": 32, "batch_size": 4,
            "warmup_ratio": 0.0, "scheduler": "constant", "wandb.mode": "offline", **over}


def test_sft_on_chatterbot_raises_eval_token_acc(ray_session, smollm2_dir, chat_data, tmp_path):
    cfg = load_config("sft", None, base_cfg(tmp_path, chat_data, "sft-real", model=str(smollm2_dir), max_steps=24,
                                            lr=5e-5, eval_interval=24, save_interval=24))
    result = training.sft(cfg)
    log = lines(result.run_dir)
    start, end = log[0], log[-1]
    assert start["step"] == 0 and end["step"] == 24
    assert end["eval/token_acc"] > start["eval/token_acc"] + 0.01, (start, end)
    assert (tmp_path / "runs" / "sft-real" / "wandb").is_dir()  # wandb ran (offline, no API key)


def test_distilling_pruned_smollm2_from_smollm2_lowers_kd_loss(ray_session, smollm2_dir, chat_data, tmp_path):
    student = prune(str(smollm2_dir), tmp_path / "student", drop_text="13,14,16,17").output
    cfg = load_config("distill", None, base_cfg(tmp_path, chat_data, "distill-real", model=str(student),
                                                teacher=str(smollm2_dir), max_steps=12, lr=1e-4, beta=0.5,
                                                eval_interval=12, save_interval=12, **{"wandb.mode": "disabled"}))
    result = training.distill(cfg)
    log = lines(result.run_dir)
    assert log[-1]["eval/loss"] < 0.9 * log[0]["eval/loss"], (log[0], log[-1])  # eval/loss is the KD loss here
    prov = json.loads((result.output / "prunekit.json").read_text())
    assert prov["stage"] == "distill" and [h["stage"] for h in prov["history"]][-1] == "prune"
