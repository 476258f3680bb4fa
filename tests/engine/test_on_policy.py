"""Distillation on the student's own answers (distill `on_policy:`): the rows, their determinism, a resumed run, the
errors."""
from __future__ import annotations

import json
from contextlib import nullcontext

import pytest
import torch

from prunekit import PrunekitError
from prunekit.stages import training
from tests.conftest import distill_killed_at
from tests.stages.test_training import cfg_for, metrics_lines


def rows_for(model_dir, tokenizer, chat_data, tmp_path, rows: int, temperature: float, max_new_tokens: int = 6,
             every: int = 1):
    """The on-policy row source a distill worker builds (batch 4, `rows` of them the student's)."""
    cfg = cfg_for("distill", model_dir, chat_data, tmp_path, "op", teacher=str(model_dir), batch_size=4,
                  save_interval=2, on_policy={"fraction": rows / 4, "max_new_tokens": max_new_tokens,
                                              "temperature": temperature, "every": every})
    source = training.make_on_policy_rows(cfg, tokenizer)
    assert source.rows == rows
    return source


def test_rows_are_the_students_answers_to_the_prompt_stream(tiny_chat_model_dir, chat_data, tmp_path):
    """Each micro-batch's last `rows` samples become prompt + the student's greedy answer (what generate gives,
    cut after EOS), labelled on the answer only; the prompts follow the seeded stream by global position (rank and
    micro-batch included); generation that ignores EOS until max_new_tokens (sharded strategies) cuts to the same
    answers; packed batches get the row's own positions."""
    from prunekit.core.loading import load_model, load_tokenizer
    model, _ = load_model(tiny_chat_model_dir, dtype="float32")
    tok = load_tokenizer(tiny_chat_model_dir)
    source = rows_for(tiny_chat_model_dir, tok, chat_data, tmp_path, rows=2, temperature=0.0)
    dummy = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]} for _ in range(3)]
    micro = source.fill(model, [list(dummy), list(dummy)], step=3, rank=1, world_size=2, autocast=nullcontext(),
                        device=torch.device("cpu"))
    assert [len(m) for m in micro] == [3, 3] and micro[0][0] == dummy[0] and micro[1][0] == dummy[0]
    for m, batch in enumerate(micro):
        start = ((3 * 2 + m) * 2 + 1) * 2
        for j, row in enumerate(batch[1:]):
            prompt = source.prompts[source.order.index(start + j)]
            answer = row["input_ids"][len(prompt):]
            assert row["input_ids"][:len(prompt)] == prompt
            assert row["labels"] == [-100] * len(prompt) + answer and 1 <= len(answer) <= 6
            want = model.generate(input_ids=torch.tensor([prompt]), do_sample=False, max_new_tokens=6,
                                  eos_token_id=source.eos, pad_token_id=0)[0, len(prompt):].tolist()
            assert answer == want[:len(answer)] and (len(answer) == 6 or answer[-1] in source.eos)
    fixed = rows_for(tiny_chat_model_dir, tok, chat_data, tmp_path, rows=2, temperature=0.0).fill(
        model, [list(dummy), list(dummy)], step=3, rank=1, world_size=2, autocast=nullcontext(),
        device=torch.device("cpu"), fixed_length=True)
    assert fixed == micro
    packed = [dict(s, position_ids=[0, 1, 2]) for s in dummy]
    row = source.fill(model, [packed], step=0, rank=0, world_size=1, autocast=nullcontext(),
                      device=torch.device("cpu"))[0][-1]
    assert row["position_ids"] == list(range(len(row["input_ids"])))


def test_sampled_rows_repeat_for_the_same_step_and_differ_between_steps(tiny_chat_model_dir, chat_data, tmp_path):
    """Sampling is seeded by the step (a resumed run writes the same answers) without touching the global RNG."""
    from prunekit.core.loading import load_model, load_tokenizer
    model, _ = load_model(tiny_chat_model_dir, dtype="float32")
    source = rows_for(tiny_chat_model_dir, load_tokenizer(tiny_chat_model_dir), chat_data, tmp_path, rows=4,
                      temperature=1.0, max_new_tokens=8)
    dummy = [{"input_ids": [5], "labels": [5]}] * 4

    def rows(step):
        return source.fill(model, [list(dummy)], step=step, rank=0, world_size=1, autocast=nullcontext(),
                           device=torch.device("cpu"))[0]
    state = torch.get_rng_state()
    first = rows(5)
    assert rows(5) == first and rows(6) != first
    assert torch.equal(torch.get_rng_state(), state)   # the run's own random stream is left as it was


def test_a_block_of_steps_is_sampled_at_its_first_step(tiny_chat_model_dir, chat_data, tmp_path):
    """every: 2 samples steps 4 and 5 at step 4, in one batch; the rows do not depend on which source instance asks,
    and the weights at step 5 no longer matter for step 5's rows."""
    from prunekit.core.loading import load_model, load_tokenizer
    model, _ = load_model(tiny_chat_model_dir, dtype="float32")
    tok = load_tokenizer(tiny_chat_model_dir)
    dummy = [{"input_ids": [5], "labels": [5]}] * 2

    def fill(source, step):
        return source.fill(model, [list(dummy)], step=step, rank=0, world_size=1, autocast=nullcontext(),
                           device=torch.device("cpu"))[0]
    a, b = (rows_for(tiny_chat_model_dir, tok, chat_data, tmp_path, rows=2, temperature=1.0, max_new_tokens=8,
                     every=2) for _ in range(2))
    four = fill(a, 4)
    assert fill(b, 4) == four
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    assert fill(a, 5) == fill(b, 5)              # sampled at step 4, before the weights changed
    assert fill(a, 5)[0]["input_ids"] != four[0]["input_ids"]


@pytest.mark.slow  # two distillations, one in a subprocess
def test_on_policy_distillation_resumes_to_the_weights_of_an_uninterrupted_run(tiny_chat_model_dir, chat_data,
                                                                               tmp_path):
    """Half of every batch sampled from the student (T=1) while distilling: a run killed at step 3 resumes to
    weights bit-equal to a run that was not, and the run's rows did reach the loss (it differs from off-policy)."""
    from safetensors.torch import load_file

    def cfg(name, **over):
        return cfg_for("distill", tiny_chat_model_dir, chat_data, tmp_path, name, teacher=str(tiny_chat_model_dir),
                       **{"max_steps": 4, "batch_size": 4, "eval_interval": 4, "save_interval": 1,
                          "launcher": "local", "on_policy": {"fraction": 0.5, "max_new_tokens": 8}, **over})
    whole = training.distill(cfg("whole"))
    crashed = cfg("crashed")
    distill_killed_at(crashed, 3, tmp_path)
    resumed = training.distill(crashed)
    assert [m["step"] for m in metrics_lines(resumed.run_dir)][-2:] == [3, 4]
    a, b = load_file(whole.output / "model.safetensors"), load_file(resumed.output / "model.safetensors")
    assert all(torch.equal(a[name], b[name]) for name in a)
    off = training.distill(cfg("off", on_policy=None))
    losses = [[m["train/loss"] for m in metrics_lines(r.run_dir) if "train/loss" in m] for r in (whole, off)]
    assert losses[0][0] != losses[1][0]
    provenance = json.loads((whole.output / "prunekit.json").read_text())
    assert provenance["config"]["on_policy"]["fraction"] == 0.5


def test_on_policy_errors_are_one_line_before_training(tiny_chat_model_dir, chat_data, tmp_path):
    def cfg(name, on_policy, **over):
        return cfg_for("distill", tiny_chat_model_dir, chat_data, tmp_path, name, teacher=str(tiny_chat_model_dir),
                       **{"max_steps": 2, "batch_size": 4, "launcher": "local", "on_policy": on_policy, **over})
    with pytest.raises(PrunekitError, match=r"on_policy.fraction must be in \(0, 1\]"):
        cfg("zero", {"fraction": 0})
    with pytest.raises(PrunekitError, match="on_policy.fraction 0.1 of batch_size 4 is no row"):
        cfg("small", {"fraction": 0.1})
    with pytest.raises(PrunekitError, match="on_policy.max_new_tokens 64 leaves no room for a prompt"):
        cfg("long", {"fraction": 0.5, "max_new_tokens": 64})
    with pytest.raises(PrunekitError, match="on_policy.every 3 must divide save_interval 4"):
        cfg("every", {"fraction": 0.5, "max_new_tokens": 8, "every": 3}, save_interval=4)
    text_only = tmp_path / "text.jsonl"
    text_only.write_text(json.dumps({"text": "Plain prose, no chat turn here."}) + "\n")
    with pytest.raises(PrunekitError, match=f"on_policy.prompts {text_only}: no chat row"):
        training.distill(cfg("text", {"fraction": 0.5, "max_new_tokens": 8, "prompts": str(text_only)}))
    assert not (tmp_path / "runs" / "text").exists()
