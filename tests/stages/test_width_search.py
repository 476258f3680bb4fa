"""`prunekit width-search` before its trials: bad input as one-line errors, and the Ray job entry point (the search
itself runs on Ray: tests/integration/test_width_search_ray.py)."""
from __future__ import annotations

import pytest

from prunekit.cli import main
from prunekit.config import load_config

STEPS = 2


@pytest.fixture(scope="module")
def wide_chat(chat_model_dir):
    """A 4-layer tiny llama with a wide FFN (4096) and SmolLM2's tokenizer: its decoder layers hold as many
    parameters as its embedding, so a hidden cut of one step (64 -> 56) is about a quarter of the layers' size."""
    return chat_model_dir(4, seed=4, intermediate_size=4096)


def ws_config(model, train, tmp_path, **over):
    base = {"model": str(model), "train": str(train), "output_dir": str(tmp_path / "report"),
            "storage_path": str(tmp_path / "runs"), "name": "search", "max_steps": STEPS, "max_length": 64,
            "batch_size": 4, "eval_interval": 2, "log_interval": 1, "eval_max_samples": 8, "importance_samples": 8,
            "lr": 1e-3, "warmup_ratio": 0.0, "scheduler": "constant", "wandb.mode": "disabled",
            "tune.max_concurrent_trials": 2, **over}
    return load_config("width-search", None, base)


def _err(argv, capsys) -> str:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_bad_input_fails_before_any_trial(wide_chat, chat_data, tmp_path, capsys):
    import yaml
    good = {"model": str(wide_chat), "train": str(chat_data[0]), "output_dir": str(tmp_path / "report"),
            "storage_path": str(tmp_path / "runs"), "max_steps": 2}

    def bad(**over):
        path = tmp_path / "ws.yaml"
        path.write_text(yaml.safe_dump({**good, **over}))
        return _err(["width-search", "--config", path], capsys)
    assert "no candidate reaches the budget" in bad(params=1000)
    assert "depth: removing every layer but the first and last leaves" in bad(params=1000)
    assert "already within the budget" in bad(params=10 ** 9)
    assert "params_fraction must be in (0, 1)" in bad(params_fraction=1.5)
    assert "give one budget: params or layer_params_removed" in bad(params=10, layer_params_removed=0.2)
    assert "ws.yaml: candidates.0: Input should be" in bad(candidates=["width"])
    assert "nope.jsonl: data file not found" in bad(val=str(tmp_path / "nope.jsonl"))
    assert "ray: a width-search trial is one process" in bad(parallel={"workers": 2})
    assert not (tmp_path / "report").exists() and not (tmp_path / "runs").exists()


def test_ray_job_entry_point_is_wired():
    """`ray_jobs/width_search.py` is the `prunekit width-search` command (its --help needs no cluster)."""
    import subprocess
    import sys
    from tests.conftest import REPO
    out = subprocess.run([sys.executable, "ray_jobs/width_search.py", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 0 and "usage: prunekit width-search" in out.stdout, out.stderr
    cfg = load_config("width-search", REPO / "recipes" / "width_search.yaml")
    assert cfg.candidates == ["ffn", "heads+ffn", "hidden+ffn", "depth"] and cfg.layer_params_removed == 0.25
