"""The learner and the rollout score the same tokens the same way; weights pack for the rollout exactly."""
from __future__ import annotations

import pytest
import torch


def test_learner_and_rollout_score_the_same_tokens_and_weights_pack_exactly(tiny_rl_model):
    """The learner's log-probs (right-padded prompt + response rows, hidden states -> head in chunks), which the
    rollout's teacher-forced scoring uses too, equal each prompt + response run alone through the model's full
    logits at every response token; a packed state dict comes back bit-identical."""
    from transformers import AutoModelForCausalLM
    from prunekit.engine.objectives import response_logprobs
    from prunekit.rl.batch import collate_rl
    from prunekit.rl.rollout import completion_logprobs, pack_state, unpack_state
    model = AutoModelForCausalLM.from_pretrained(tiny_rl_model).eval()
    prompts, completions = [[5, 9, 13, 2], [40, 2], [7, 8, 9, 10, 11, 2]], [[3, 4, 1], [17], [20, 21, 22, 23]]
    want = []
    with torch.no_grad():
        for p, c in zip(prompts, completions):  # unpadded, full logits
            logits = model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1:-1].float() / 0.7
            want.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(c)[:, None])[:, 0].tolist())
    batch = collate_rl([{"prompt_ids": p, "completion_ids": c, "advantage": 0.0}
                        for p, c in zip(prompts, completions)], pad_id=0)
    with torch.no_grad():
        got = response_logprobs(model, batch, temperature=0.7, chunk_size=2)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        assert got[i, len(p):len(p) + len(c)].tolist() == pytest.approx(want[i], abs=1e-5)
        assert got[i, :len(p)].abs().sum() == 0 and got[i, len(p) + len(c):].abs().sum() == 0
    rollout = completion_logprobs(model, prompts + [[6]], completions + [[]], temperature=0.7, pad_id=0,
                                  batch_size=2)
    assert rollout[:3] == [pytest.approx(w, abs=1e-5) for w in want] and rollout[3] == []
    state = model.state_dict()
    back = unpack_state(pack_state(state))
    assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in state.items())
    assert all(v.dtype == torch.bfloat16 for v in unpack_state(pack_state(state, torch.bfloat16)).values())
