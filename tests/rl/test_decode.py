"""prunekit's slot decoder (prunekit.rl.decode) against transformers' generate: the same greedy tokens per prompt
through refilled slots, transformers' top-p nucleus sampled in its own proportions, and the rollout backend."""
from __future__ import annotations

import pytest
import torch


def hf_greedy(model, prompt: list[int], max_new: int, eos: int) -> list[int]:
    """transformers' greedy completion of one unpadded prompt, up to and including the first `eos`."""
    ids = torch.tensor([prompt])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new,
                         eos_token_id=eos, pad_token_id=0)[0, len(prompt):]
    ids = out.tolist()
    return ids[:ids.index(eos) + 1] if eos in ids else ids


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_slots_refilled_as_rows_finish_give_generates_greedy_tokens(family):
    """Seven prompts of 1-9 tokens through 3 slots (so most rows enter a slot another row left, at positions the
    earlier row had filled): each completion is what transformers' generate gives the prompt alone, including rows
    that stop at their EOS and rows cut at max_new_tokens (the tiny qwen2 has two sliding-window layers of 6)."""
    from tests.conftest import build_tiny
    from prunekit.rl.decode import SlotDecoder
    model = build_tiny(family).eval()
    model.set_attn_implementation("sdpa")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (5, 1, 9, 3, 7, 2, 6)]
    with torch.no_grad():
        # the EOS here: a token the first answer writes 4th (no EOS: an id past the vocabulary)
        eos = hf_greedy(model, prompts[0], 10, eos=model.config.vocab_size)[3]
        want = [hf_greedy(model, p, 10, eos=eos) for p in prompts]
    assert any(len(w) < 10 for w in want) and any(len(w) == 10 for w in want), "both ways of finishing occur"
    got = SlotDecoder(model, slots=3, eos=[eos], refill_every=2).generate(prompts, 10, temperature=0.0)
    assert got == want


def test_buffers_are_kept_between_calls_and_the_compiled_step_decodes_alike():
    """A second `generate` reuses the cache and state (a longer prompt set grows them, in steps of 64) and gives
    what a fresh decoder gives; with `compile` (inductor on the step's model part) the greedy tokens are the same."""
    from tests.conftest import build_tiny
    from prunekit.rl.decode import SlotDecoder
    model = build_tiny("llama").eval()
    model.set_attn_implementation("sdpa")
    g = torch.Generator().manual_seed(2)
    short = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (4, 2, 6)]
    long = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (70, 3)]
    fresh = [SlotDecoder(model, slots=2, eos=[7]).generate(p, 8, temperature=0.0) for p in (short, long)]
    kept = SlotDecoder(model, slots=2, eos=[7])
    assert kept.generate(short, 8, temperature=0.0) == fresh[0]
    cache = kept.cache.keys[0]
    assert kept.generate(short, 8, temperature=0.0) == fresh[0] and kept.cache.keys[0] is cache
    assert kept.generate(long, 8, temperature=0.0) == fresh[1] and kept.cache.keys[0].shape[2] == 128
    compiled = SlotDecoder(model, slots=2, eos=[7], compile=True)
    assert compiled.generate(short, 8, temperature=0.0) == fresh[0]


def test_sampling_follows_transformers_top_p_nucleus():
    """T=0.8, top_p 0.6, 6,000 answers of two tokens to one prompt through 512 slots: the first token (sampled after
    the prefill) and the second after the most frequent first one (sampled in the decode step) come only from
    transformers' nucleus, in its renormalised proportions."""
    from transformers.generation.logits_process import TopPLogitsWarper
    from tests.conftest import build_tiny
    from prunekit.rl.decode import SlotDecoder
    model = build_tiny("llama").eval()
    model.set_attn_implementation("sdpa")
    prompt = [5, 9, 13, 2]

    def nucleus(context: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([context])).logits[0, -1].float()
        return torch.softmax(TopPLogitsWarper(0.6)(None, logits[None] / 0.8)[0], -1)

    def check(drawn: list[int], probs: torch.Tensor, tolerance: float) -> None:
        seen = torch.bincount(torch.tensor(drawn), minlength=len(probs)).float() / len(drawn)
        assert set(torch.nonzero(seen).flatten().tolist()) <= set(torch.nonzero(probs).flatten().tolist())
        assert int((probs > 0).sum()) >= 3, "a nucleus of several tokens"
        assert (seen - probs).abs().max() < tolerance

    torch.manual_seed(0)
    answers = SlotDecoder(model, slots=512, eos=[-1]).generate([prompt] * 6000, 2, 0.8, 0.6)
    check([a[0] for a in answers], nucleus(prompt), 0.03)
    top = max(set(a[0] for a in answers), key=[a[0] for a in answers].count)
    seconds = [a[1] for a in answers if a[0] == top]
    assert len(seconds) > 1000
    check(seconds, nucleus(prompt + [top]), 0.05)


def test_slots_backend_generates_for_rollouts_and_refuses_what_it_cannot_run(tiny_rl_model, tiny_model_dir):
    """`backend: slots` is a rollout backend like transformers' (greedy: the same completions, per-token log-probs
    scored the same way); a model it cannot run is a one-line error naming the backend."""
    from prunekit import PrunekitError
    from prunekit.rl.rollout import Sampling, make_backend
    prompts = [[5, 9, 13, 2], [40, 2], [7, 8, 9, 10, 11, 2]]
    greedy = Sampling(n=2, temperature=0.0, max_new_tokens=8)
    plain = make_backend("transformers", tiny_rl_model, batch_size=4, eos=[1], pad_id=0).generate(prompts, greedy)
    slots = make_backend("slots", tiny_rl_model, batch_size=4, eos=[1], pad_id=0)
    assert slots.name == "slots"
    got = slots.generate(prompts, greedy)
    assert [s["completion_ids"] for s in got] == [s["completion_ids"] for s in plain]
    assert [s["logprobs"] for s in got] == [pytest.approx(s["logprobs"], abs=1e-5) for s in plain]
    with pytest.raises(PrunekitError, match="backend slots: qwen2_vl is a vision-language model"):
        make_backend("slots", tiny_model_dir("qwen2_vl"), batch_size=2, eos=[1], pad_id=0)
