"""Evaluation on messages or text rows: loss and ms-swift token_acc over supervised tokens (assistant turns, or
every token of a text row), token-weighted."""
from __future__ import annotations

import torch

from prunekit.core.samples import collate, pad_id
from prunekit.core.losses import causal_lm_loss


@torch.no_grad()
def evaluate(model, samples: list[dict], pad_id: int, batch_size: int = 8) -> dict:
    """{'loss': mean CE per supervised token, 'token_acc': argmax accuracy, 'tokens': supervised tokens}."""
    model.eval()
    device = next(model.parameters()).device
    loss_sum, n_tokens, n_correct = 0.0, 0, 0
    for i in range(0, len(samples), batch_size):
        batch = {k: v.to(device) for k, v in collate(samples[i:i + batch_size], pad_id).items()}
        labels = batch.pop("labels")
        logits = model(**batch, use_cache=False).logits
        s, n, c = causal_lm_loss(logits.float(), labels)
        loss_sum, n_tokens, n_correct = loss_sum + float(s), n_tokens + int(n), n_correct + int(c)
    return {"loss": loss_sum / max(n_tokens, 1), "token_acc": n_correct / max(n_tokens, 1), "tokens": n_tokens}


@torch.no_grad()
def greedy_reply(model, tokenizer, question: str, max_new_tokens: int = 24) -> str:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=pad_id(tokenizer))
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
