"""The evaluations' shared arithmetic (token-weighted sums, then means) by hand, and the pipeline's measurement
against the training loop's eval on the same rows: the same tokens, the same correct guesses, the same loss."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from prunekit.core.evaluate import TokenTotals, evaluate, perplexity
from tests.conftest import build_tiny


def test_token_totals_weigh_every_token_the_same():
    totals = TokenTotals()
    assert totals.means() == {"loss": 0.0, "token_acc": 0.0, "tokens": 0}   # nothing supervised yet
    totals.add(torch.tensor(6.0), torch.tensor(3), torch.tensor(1))          # a batch of 3 tokens, mean loss 2
    totals.add(1.0, 1, 1)                                                    # a batch of 1 token, loss 1
    assert totals == TokenTotals(7.0, 4, 2)
    assert totals.means() == {"loss": 7.0 / 4, "token_acc": 0.5, "tokens": 4}   # not the mean of batch means (1.5)
    assert perplexity(math.log(3.0)) == pytest.approx(3.0) and perplexity(1e4) == math.exp(50.0)


def test_the_pipeline_measurement_and_the_loop_eval_agree():
    from prunekit.engine.loop import evaluate_distributed
    from prunekit.engine.objectives import SFTObjective
    model = build_tiny("llama")
    g = torch.Generator().manual_seed(0)
    samples = []
    for n in (3, 6, 2, 5, 4):   # ragged prompts: the batches are padded
        prompt = torch.randint(3, 100, (1, n), generator=g)
        with torch.no_grad():   # greedy replies: most supervised tokens are the model's own argmax
            ids = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)[0].tolist()
        samples.append({"input_ids": ids, "labels": [-100] * n + ids[n:]})
    measured = evaluate(model, samples, pad_id=0, batch_size=2)
    strategy = SimpleNamespace(model=model, forward=lambda batch: SFTObjective(chunk_size=7)(model, batch))
    with torch.no_grad():
        looped = evaluate_distributed(strategy, samples, pad_id=0, batch_size=2, device=torch.device("cpu"))
    assert looped["eval/tokens"] == measured["tokens"] == 5 * 6
    assert looped["eval/token_acc"] == measured["token_acc"] > 0.5
    assert looped["eval/loss"] == pytest.approx(measured["loss"], rel=1e-6)
    with torch.no_grad():   # padded to one width (compile_mode reduce-overhead's batches): the same measurement
        padded = evaluate_distributed(strategy, samples, pad_id=0, batch_size=2, device=torch.device("cpu"), width=20)
    assert padded["eval/tokens"] == looped["eval/tokens"] and padded["eval/token_acc"] == looped["eval/token_acc"]
    assert padded["eval/loss"] == pytest.approx(looped["eval/loss"], rel=1e-5)
