"""Evaluation on messages or text rows: loss and ms-swift token_acc over supervised tokens (assistant turns, or
every token of a text row), token-weighted. `TokenTotals` is the arithmetic every evaluation shares: this one (the
pipeline's measurements, `prunekit eval`, width-search), the training loop's eval (over ranks) and importance's
NLL-drop."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from prunekit.core.samples import collate, pad_id
from prunekit.core.losses import causal_lm_loss


@dataclass
class TokenTotals:
    """Loss, supervised tokens and correct argmax predictions summed over batches (and ranks): the means weigh
    every token the same, whatever batch or rank it sat in."""
    loss_sum: float = 0.0
    tokens: int = 0
    correct: int = 0

    def add(self, loss_sum, tokens, correct=0) -> None:
        """One batch's sums (numbers or 0-dim tensors)."""
        self.loss_sum += float(loss_sum)
        self.tokens += int(tokens)
        self.correct += int(correct)

    def means(self) -> dict:
        """{'loss': mean loss per supervised token, 'token_acc', 'tokens'} (0 where no token was supervised)."""
        n = max(self.tokens, 1)
        return {"loss": self.loss_sum / n, "token_acc": self.correct / n, "tokens": self.tokens}


def perplexity(loss: float) -> float:
    """exp(mean loss), capped at exp(50): an untrained model's loss must not overflow it."""
    return math.exp(min(loss, 50.0))


@torch.no_grad()
def evaluate(model, samples: list[dict], pad_id: int, batch_size: int = 8) -> dict:
    """{'loss': mean CE per supervised token, 'token_acc': argmax accuracy, 'tokens': supervised tokens}."""
    model.eval()
    device = next(model.parameters()).device
    totals = TokenTotals()
    for i in range(0, len(samples), batch_size):
        batch = {k: v.to(device) for k, v in collate(samples[i:i + batch_size], pad_id).items()}
        labels = batch.pop("labels")
        logits = model(**batch, use_cache=False).logits
        totals.add(*causal_lm_loss(logits.float(), labels))
    return totals.means()


@torch.no_grad()
def greedy_reply(model, tokenizer, question: str, max_new_tokens: int = 24) -> str:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=pad_id(tokenizer))
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
