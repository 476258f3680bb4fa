"""`prunekit knockout` before its trials: bad input is one line, and a knockout that fails before any trial does not
claim its name (the sweeps themselves run on Ray: tests/integration/test_knockout_ray.py)."""
from __future__ import annotations

import json

import pytest

from prunekit import PrunekitError
from prunekit.cli import main
from prunekit.config import load_config
from prunekit.stages.knockout import knockout, validate

STEPS = 4


@pytest.fixture(scope="module")
def chat4_dir(chat_model_dir):
    """A 4-layer tiny llama with SmolLM2's tokenizer (the shared tiny chat model has 2 layers)."""
    return chat_model_dir(4, seed=1)


def ko_config(model, train, val, tmp_path, **over):
    base = {"model": str(model), "train": str(train), "val": val and str(val), "output_dir": str(tmp_path / "report"),
            "storage_path": str(tmp_path / "runs"), "name": "sweep", "max_steps": STEPS, "max_length": 64,
            "batch_size": 4, "eval_interval": 2, "log_interval": 1, "eval_max_samples": 16, "lr": 1e-3,
            "warmup_ratio": 0.0, "scheduler": "constant", "wandb.mode": "disabled", "importance_samples": 8,
            "tune.max_concurrent_trials": 2, **over}
    return load_config("knockout", None, base)


def test_bad_input_fails_before_any_trial(chat4_dir, chat_data, tmp_path):
    train, val = chat_data

    def err(val_file=val, **over):
        with pytest.raises(PrunekitError) as e:
            validate(ko_config(chat4_dir, train, val_file, tmp_path, **over))
        assert "\n" not in str(e.value)
        return str(e.value)
    assert "val: a knockout needs a validation set" in err(None)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "empty.jsonl: empty file" in err(empty)
    assert "candidates.text: 7 is out of range (the model has 4: 0-3)" in err(**{"candidates.text": "2,7"})
    assert "candidates.vision: the model has no vision blocks" in err(**{"candidates.vision": "all"})
    assert "candidates.groups" in err(**{"candidates.groups": ["layer:3"]})
    assert "the budget allows no candidate" in err(max_params_fraction=0.001)
    assert "the budget allows no candidate" in err(**{"candidates.group_size": 3, "max_layers": 2})
    with pytest.raises(PrunekitError, match=r"flags: tune.gpus: unknown key"):
        ko_config(chat4_dir, train, val, tmp_path, **{"tune.gpus": 1})
    with pytest.raises(PrunekitError, match="a knockout trial is one process"):
        ko_config(chat4_dir, train, val, tmp_path, **{"parallel.workers": 2})
    bad = tmp_path / "knockout.yaml"
    bad.write_text(f"model: {chat4_dir}\ntrain: {train}\nval: {val}\noutput_dir: out\ncandidate: all\n")
    assert main(["knockout", "--config", str(bad)]) == 2


def test_knockout_that_fails_before_its_trials_does_not_claim_the_name(tiny_chat_model_dir, chat_data, tmp_path):
    train, val = chat_data

    def cfg(**over):
        return load_config("knockout", None, {
            "model": str(tiny_chat_model_dir), "train": str(train), "val": str(val), "name": "ko",
            "output_dir": str(tmp_path / "report"), "storage_path": str(tmp_path / "runs"), "max_steps": 2,
            "batch_size": 2, "wandb.mode": "disabled", **over})
    with pytest.raises(PrunekitError, match="no row with supervised tokens"):
        knockout(cfg(max_length=32, eval_max_samples=4))  # no val row fits in 32 tokens: found after validation
    assert not (tmp_path / "runs" / "ko" / "sweep.json").exists() and not (tmp_path / "report").exists()
    validate(cfg(max_length=64, eval_max_samples=8))  # the corrected config may use the name
    # a name claimed by a run whose trials never started binds nothing either
    (tmp_path / "runs" / "ko").mkdir(parents=True, exist_ok=True)
    (tmp_path / "runs" / "ko" / "sweep.json").write_text(json.dumps({"name": "ko", "trial_settings": {"lr": 1}}))
    validate(cfg(max_length=64))
    (tmp_path / "runs" / "ko" / "trials" / "baseline").mkdir(parents=True)
    (tmp_path / "runs" / "ko" / "trials" / "baseline" / "result.json").write_text("{}")
    with pytest.raises(PrunekitError, match="its trials cannot be reused"):
        validate(cfg(max_length=64))
