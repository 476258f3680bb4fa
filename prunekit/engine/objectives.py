"""What differs between SFT, distillation (and later RL learners): the loss of one micro-batch.

An objective is called with the (unwrapped) model and a micro-batch and returns sums, never means, so the engine
can weight every token equally across micro-batches and ranks.
"""
from __future__ import annotations

import torch

from prunekit import PrunekitError
from prunekit.core.data import packed_attention_mask
from prunekit.core.families import backbone_and_head, family_of
from prunekit.core.losses import (aggregate, chunked_causal_lm_loss, chunked_generalized_jsd_loss, get_policy_loss,
                                  hidden_state_loss)


def compute_dtype(model) -> torch.dtype:
    """The dtype `model`'s attention computes in here: autocast's where it is on, else the weights'."""
    param = next(model.parameters())
    if torch.is_autocast_enabled(param.device.type):
        return torch.get_autocast_dtype(param.device.type)
    return param.dtype


def model_inputs(batch: dict, dtype=torch.float32) -> dict:
    """Model kwargs of a collated batch: packed batches get a block-diagonal additive 4D mask (no attention across
    samples) in `dtype`, the dtype the attention computes in (sdpa takes the mask as it is: a float32 mask beside
    bf16 queries is a mismatch); labels stay out (the objectives compute the loss themselves)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if "position_ids" in inputs and "attention_mask" not in inputs:
        inputs["attention_mask"] = packed_attention_mask(inputs["position_ids"], dtype=dtype)
    return inputs


def same_device(a, b) -> bool:
    """Whether two torch devices are one: "cuda" (no index) is the current CUDA device, so it is "cuda:0" there.
    The local launcher trains on torch.device("cuda") while loaded weights sit on "cuda:0", and a plain != between
    them sent a same-GPU teacher down the own-GPU prefetch path: its 4D mask built on the CPU, ~7 ms a step of host
    time in the outcome recipe (bench/README.md)."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    current = torch.cuda.current_device() if a.type == "cuda" and torch.cuda.is_available() else 0
    return (current if a.index is None else a.index) == (current if b.index is None else b.index)


class SFTObjective:
    """Cross-entropy on assistant tokens, computed from hidden states in chunks (no full B*S*V logits); `row_loss`
    picks how each chunk's rows are reduced (`prunekit.core.losses.ce.ROW_LOSSES`)."""

    def __init__(self, chunk_size: int = 1024, row_loss: str = "auto"):
        self.chunk_size, self.row_loss = chunk_size, row_loss

    def __call__(self, model, batch: dict) -> dict:
        backbone, head = backbone_and_head(model)
        hidden = backbone(**model_inputs(batch, compute_dtype(model)), use_cache=False).last_hidden_state
        loss_sum, n_tokens, n_correct = chunked_causal_lm_loss(hidden, head.weight, batch["labels"],
                                                               chunk_size=self.chunk_size, row_loss=self.row_loss)
        return {"loss_sum": loss_sum, "n_tokens": n_tokens, "n_correct": n_correct}


class DistillObjective:
    """Generalized JSD between a frozen teacher and the student over assistant tokens, plus `sft_alpha` * CE,
    from both models' final hidden states: neither model's full B*S*V logits are ever built. With `hidden_weight`,
    plus that much of the hidden-state loss: student text layer i's output against the teacher's layer
    `hidden_targets[i]` output (forward hooks on both models' layers keep them for the step)."""

    def __init__(self, teacher, beta: float = 0.5, temperature: float = 1.0, top_k: int | None = None,
                 sft_alpha: float = 0.0, chunk_size: int = 1024, hidden_weight: float = 0.0,
                 hidden_targets: list[int] | None = None):
        self.teacher = teacher.eval().requires_grad_(False)
        self.beta, self.temperature, self.top_k = beta, temperature, top_k
        self.sft_alpha, self.chunk_size = sft_alpha, chunk_size
        self.hidden_weight, self.hidden_targets = hidden_weight, hidden_targets
        if hidden_weight and hidden_targets is None:
            raise PrunekitError("hidden_weight needs hidden_targets: the teacher layer each student layer matches")
        self._teacher_layers: dict[int, torch.Tensor] = {}   # written by the hooks during the teacher's forward
        self._student_layers: dict[int, torch.Tensor] = {}
        self._student_forward = [False]   # with gradient checkpointing: the student's hooks keep outputs only then
        self._watched = None
        if hidden_weight:
            _keep_layer_outputs(self.teacher, self._teacher_layers, set(hidden_targets))
        self._teacher_head_copy = None
        self._ahead: list = []  # (input_ids shape, teacher hidden) queued for the coming training batches

    def watch(self, student, recomputed: bool = False) -> None:
        """Hook the student's text layers (before they are compiled, so the hooks are traced with them).
        `recomputed` (gradient checkpointing): backward may run a layer again to its output (torch stops a
        non-reentrant recompute early by default, not always), and those outputs must not stay referenced until the
        next step, so the hooks keep outputs only during the objective's own forward."""
        if self.hidden_weight and self._watched is not student:
            _keep_layer_outputs(student, self._student_layers, set(range(len(self.hidden_targets))),
                                while_true=self._student_forward if recomputed else None)
            self._watched = student

    def _teacher_hidden(self, batch: dict):
        """The teacher's final hidden states, and with hidden_weight its layer outputs in `hidden_targets` order."""
        teacher_backbone, teacher_head = backbone_and_head(self.teacher)
        device = teacher_head.weight.device
        with torch.no_grad():
            inputs = {k: (v.pin_memory() if v.device.type == "cpu" and device.type == "cuda" else v).to(
                device, non_blocking=True) for k, v in model_inputs(batch, compute_dtype(self.teacher)).items()}
            last = teacher_backbone(**inputs, use_cache=False).last_hidden_state
        if not self.hidden_weight:
            return last, None
        layers = [self._teacher_layers[t] for t in self.hidden_targets]
        self._teacher_layers.clear()
        return last, layers

    def prefetch(self, host_batch: dict, student_device) -> None:
        """Queue the teacher's forward for the next training batch (still on the host) now. With the teacher on
        its own GPU it then runs while the student is still busy with the current step; the inputs go straight
        from the host to the teacher's GPU, never behind the student's queue."""
        if not same_device(backbone_and_head(self.teacher)[1].weight.device, student_device):
            last, layers = self._teacher_hidden(host_batch)
            # copies: compile_mode reduce-overhead's CUDA graphs reuse their output memory once the next step begins
            ahead = (last.clone(), None if layers is None else [t.clone() for t in layers])
            self._ahead.append((tuple(host_batch["input_ids"].shape), ahead))

    def __call__(self, model, batch: dict) -> dict:
        inputs = model_inputs(batch, compute_dtype(model))
        _, teacher_head = backbone_and_head(self.teacher)
        teacher_device = teacher_head.weight.device
        teacher = None
        if model.training and self._ahead:  # training batches come in the order they were prefetched
            shape, teacher = self._ahead.pop(0)
            if shape != tuple(batch["input_ids"].shape):
                self._ahead, teacher = [], None
        if teacher is None:  # queued before the student's forward: on its own GPU the two still overlap
            teacher = self._teacher_hidden(batch)
        teacher_hidden, teacher_layers = teacher
        self.watch(model)
        backbone, head = backbone_and_head(model)
        self._student_forward[0] = True
        try:
            hidden = backbone(**inputs, use_cache=False).last_hidden_state
        finally:
            self._student_forward[0] = False
        teacher_weight = teacher_head.weight
        if not same_device(teacher_device, hidden.device):
            teacher_hidden = teacher_hidden.to(hidden.device, non_blocking=True)
            if teacher_layers is not None:
                teacher_layers = [t.to(hidden.device, non_blocking=True) for t in teacher_layers]
            if self._teacher_head_copy is None:  # the KD loss multiplies by the teacher's head on the student's GPU
                self._teacher_head_copy = teacher_weight.detach().to(hidden.device)
            teacher_weight = self._teacher_head_copy
        loss, kd_sum, ce_sum, n_tokens, n_correct = chunked_generalized_jsd_loss(
            hidden, head.weight, teacher_hidden, teacher_weight, batch["labels"], beta=self.beta,
            temperature=self.temperature, top_k=self.top_k, chunk_size=self.chunk_size, sft_alpha=self.sft_alpha)
        out = {"loss_sum": loss, "n_tokens": n_tokens, "n_correct": n_correct, "kd_sum": kd_sum, "ce_sum": ce_sum}
        if self.hidden_weight:
            student_layers = [self._student_layers[i] for i in range(len(self.hidden_targets))]
            self._student_layers.clear()
            out["hidden_sum"] = hidden_state_loss(student_layers, teacher_layers, batch["labels"])
            out["loss_sum"] = loss + self.hidden_weight * out["hidden_sum"]
        return out


def _keep_layer_outputs(model, store: dict, indexes: set[int], while_true: list[bool] | None = None) -> None:
    """Forward hooks that put text layer i's output (its hidden states) in store[i] for i in `indexes`; with
    `while_true`, only while while_true[0] is true. A plain hook is traced into a compiled layer; the gated one is
    left out of it (torch._dynamo.disable: reading the gate there would compile a variant per value), at the cost of
    a graph break per layer call."""
    import torch._dynamo
    layers = family_of(model).layers(model, "text")

    def put(i, output):
        store[i] = output[0] if isinstance(output, tuple) else output

    @torch._dynamo.disable
    def put_while(i, output):
        if while_true[0]:
            put(i, output)

    def keep(i):
        def hook(_module, _args, output):
            (put if while_true is None else put_while)(i, output)
        return hook

    for i in sorted(indexes):
        layers[i].register_forward_hook(keep(i))


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


def response_logprobs(model, batch: dict, temperature: float = 1.0, chunk_size: int = 1024) -> torch.Tensor:
    """``[B, S]`` log p(token t | tokens < t) with logits / temperature at the positions ``response_mask`` marks
    (0 elsewhere); logits exist only for those rows, ``chunk_size`` rows at a time."""
    backbone, head = backbone_and_head(model)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    hidden = backbone(**inputs, use_cache=False).last_hidden_state
    target_mask = batch["response_mask"][:, 1:].bool()
    pos = target_mask.nonzero()
    rows = hidden[:, :-1][pos[:, 0], pos[:, 1]]
    targets = batch["input_ids"][:, 1:][pos[:, 0], pos[:, 1]]
    pieces = []
    for h, t in zip(rows.split(chunk_size), targets.split(chunk_size)):
        logits = (h @ head.weight.T).float() / temperature
        pieces.append(torch.log_softmax(logits, -1).gather(-1, t[:, None])[:, 0])
    flat = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)
    out = torch.zeros(batch["input_ids"].shape, dtype=torch.float32, device=hidden.device)
    return out.index_put((pos[:, 0], pos[:, 1] + 1), flat)


class RLObjective:
    """The policy loss registered as `algorithm` (GRPO, GSPO, ...) of one micro-batch of sampled responses (prompt +
    response token rows with ``response_mask``, ``old_logp``, ``advantages`` and optionally ``ref_logp``). Returns
    sums: the caller divides ``loss_sum`` by the global normaliser of the aggregation (``aggregate(mode)``)."""

    def __init__(self, algorithm: str = "grpo", eps: float = 0.2, eps_high: float | None = None,
                 aggregation: str = "grpo", kl_beta: float = 0.0, temperature: float = 1.0, chunk_size: int = 1024):
        self.policy_loss = get_policy_loss(algorithm)
        aggregate(aggregation)  # an unknown mode fails here, before any rollout
        self.eps, self.eps_high, self.aggregation = eps, eps_high, aggregation
        self.kl_beta, self.temperature, self.chunk_size = kl_beta, temperature, chunk_size

    def __call__(self, model, batch: dict, logp_only: bool = False) -> dict:
        """`logp_only`: just the current policy's log-probs (the old policy's, before the update), computed through
        the strategy's wrapper so FSDP unshards the weights."""
        logp = response_logprobs(model, batch, self.temperature, self.chunk_size)
        if logp_only:
            return {"logp": logp}
        loss_sum, stats = self.policy_loss(
            logp, batch["old_logp"], batch["advantages"], batch["response_mask"], eps=self.eps,
            eps_high=self.eps_high, aggregation=self.aggregation, ref_logp=batch.get("ref_logp"),
            kl_beta=self.kl_beta)
        return {"loss_sum": loss_sum, **stats}
