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


def decode_kernel_generates_what_sdpa_generates(family: str, kernel: str) -> None:
    """Left-padded rows: greedy generation with the decode step's attention on `kernel` (`use_grouped_decode`),
    dynamic and static KV cache, gives the tokens, and the decode steps the logits, that transformers' SDPA gives."""
    from tests.conftest import build_tiny
    from prunekit.rl.decode import DECODE_KERNELS, use_grouped_decode
    model = build_tiny(family)
    model.set_attn_implementation("sdpa")
    ids = torch.randint(3, 128, (3, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :4], mask[2, :7] = 0, 0
    ids[mask == 0] = 0
    kw = dict(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12, pad_token_id=0,
              output_logits=True, return_dict_in_generate=True)
    want = model.generate(**kw)
    assert use_grouped_decode(model, kernel) and model.config._attn_implementation == DECODE_KERNELS[kernel]
    for cache in (None, "static"):
        got = model.generate(**kw, cache_implementation=cache)
        assert torch.equal(got.sequences, want.sequences)
        for a, b in zip(got.logits, want.logits):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_grouped_decode_attention_generates_what_sdpa_generates(family):
    """2 query heads per KV head, prefill to SDPA untouched: the grouped decode step generates what SDPA does."""
    from tests.conftest import build_tiny
    from prunekit.rl.decode import use_grouped_decode
    decode_kernel_generates_what_sdpa_generates(family, "sdpa")
    assert not use_grouped_decode(build_tiny(family))   # eager attention stays as it is


def test_rollout_fast_path_uses_grouped_decode(tiny_rl_model):
    from prunekit.rl.decode import GROUPED_DECODE
    from prunekit.rl.rollout import Sampling, TransformersRollout
    prompts = [[5, 9, 13, 2], [40, 2], [7, 8, 9, 10, 11, 2]]
    greedy = Sampling(n=1, temperature=0.0, max_new_tokens=8)
    plain = TransformersRollout(tiny_rl_model, fast=False, batch_size=4, eos=[1], pad_id=0)
    fast = TransformersRollout(tiny_rl_model, fast=True, batch_size=4, eos=[1], pad_id=0)
    assert fast.model.config._attn_implementation == GROUPED_DECODE
    assert plain.model.config._attn_implementation != GROUPED_DECODE
    assert [s["completion_ids"] for s in fast.generate(prompts, greedy)] == \
        [s["completion_ids"] for s in plain.generate(prompts, greedy)]
