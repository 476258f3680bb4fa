"""What differs between SFT, distillation (and later RL learners): the loss of one micro-batch.

An objective is called with the (unwrapped) model and a micro-batch and returns sums, never means, so the engine
can weight every token equally across micro-batches and ranks.
"""
from __future__ import annotations

import torch

from prunekit import PrunekitError
from prunekit.core.data import packed_attention_mask
from prunekit.core.losses import chunked_causal_lm_loss, chunked_generalized_jsd_loss


def model_inputs(batch: dict, dtype=torch.float32) -> dict:
    """Model kwargs of a collated batch: packed batches get a block-diagonal 4D mask (no attention across
    samples); labels stay out (the objectives compute the loss themselves)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if "position_ids" in inputs and "attention_mask" not in inputs:
        inputs["attention_mask"] = packed_attention_mask(inputs["position_ids"], dtype=dtype)
    return inputs


def backbone_and_head(model):
    """(backbone returning hidden states, lm_head) of a causal LM or VLM, peft-wrapped or not."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.model, inner.lm_head


class SFTObjective:
    """Cross-entropy on assistant tokens, computed from hidden states in chunks (no full B*S*V logits)."""

    def __init__(self, chunk_size: int = 1024):
        self.chunk_size = chunk_size

    def __call__(self, model, batch: dict) -> dict:
        backbone, head = backbone_and_head(model)
        hidden = backbone(**model_inputs(batch), use_cache=False).last_hidden_state
        loss_sum, n_tokens, n_correct = chunked_causal_lm_loss(hidden, head.weight, batch["labels"],
                                                               chunk_size=self.chunk_size)
        return {"loss_sum": loss_sum, "n_tokens": n_tokens, "n_correct": n_correct}


class DistillObjective:
    """Generalized JSD between a frozen teacher and the student over assistant tokens, plus `sft_alpha` * CE,
    from both models' final hidden states: neither model's full B*S*V logits are ever built."""

    def __init__(self, teacher, beta: float = 0.5, temperature: float = 1.0, top_k: int | None = None,
                 sft_alpha: float = 0.0, chunk_size: int = 1024):
        self.teacher = teacher.eval().requires_grad_(False)
        self.beta, self.temperature, self.top_k = beta, temperature, top_k
        self.sft_alpha, self.chunk_size = sft_alpha, chunk_size

    def __call__(self, model, batch: dict) -> dict:
        inputs = model_inputs(batch)
        teacher_backbone, teacher_head = backbone_and_head(self.teacher)
        with torch.no_grad():
            teacher_hidden = teacher_backbone(**inputs, use_cache=False).last_hidden_state
        backbone, head = backbone_and_head(model)
        hidden = backbone(**inputs, use_cache=False).last_hidden_state
        loss, kd_sum, ce_sum, n_tokens, n_correct = chunked_generalized_jsd_loss(
            hidden, head.weight, teacher_hidden, teacher_head.weight, batch["labels"], beta=self.beta,
            temperature=self.temperature, top_k=self.top_k, chunk_size=self.chunk_size, sft_alpha=self.sft_alpha)
        return {"loss_sum": loss, "n_tokens": n_tokens, "n_correct": n_correct, "kd_sum": kd_sum, "ce_sum": ce_sum}


def check_same_tokenizer(student_tok, teacher_tok, student: str, teacher: str) -> None:
    """Distillation compares logits position by position, so both must tokenize identically: same vocabulary
    (ids may only differ by padding rows at the end of the embedding) and the same special tokens."""
    sv, tv = student_tok.get_vocab(), teacher_tok.get_vocab()
    if sv != tv:
        diff = sorted(set(sv.items()) ^ set(tv.items()))[:3]
        raise PrunekitError(f"teacher {teacher} and student {student} use different tokenizers "
                            f"({len(sv)} vs {len(tv)} tokens; e.g. {diff}); distillation needs the same one")
    probe = "Hello, world! 12345 <|im_start|>user"
    if student_tok(probe)["input_ids"] != teacher_tok(probe)["input_ids"]:
        raise PrunekitError(f"teacher {teacher} and student {student} tokenize text differently")
