"""Training losses as pure torch functions, in three families: next-token cross-entropy (`ce`), distillation
(`kd`) and RL policy losses (`policy`), each behind a registry (`get_loss`, `get_policy_loss`, `aggregate`).

Every loss returns *sums* (plus token counts) rather than means, so that callers can
weight correctly by tokens across micro-batches and data-parallel ranks:
``mean = all_reduce(loss_sum) / all_reduce(n_tokens)``.

Label convention (HF / ms-swift): ``labels`` has the shape of ``input_ids``; ``-100``
marks tokens that are not supervised, and the logits at position ``t`` predict
``labels[t + 1]`` (the shift is done here, not by the caller).
"""
from prunekit.core.losses.ce import IGNORE_INDEX, causal_lm_loss, chunked_causal_lm_loss
from prunekit.core.losses.kd import chunked_generalized_jsd_loss, generalized_jsd_loss, hidden_state_loss
from prunekit.core.losses.policy import (
    AGGREGATIONS,
    POLICY_LOSSES,
    aggregate,
    get_policy_loss,
    gspo_loss,
    grpo_loss,
    k3_kl,
    policy_loss,
    register_aggregation,
    register_policy_loss,
)
from prunekit.core.losses.registry import LOSSES, Registry, get_loss, register_loss

__all__ = [
    "AGGREGATIONS", "IGNORE_INDEX", "LOSSES", "POLICY_LOSSES", "Registry", "aggregate", "causal_lm_loss",
    "chunked_causal_lm_loss", "chunked_generalized_jsd_loss", "generalized_jsd_loss", "get_loss", "get_policy_loss",
    "grpo_loss", "gspo_loss", "hidden_state_loss", "k3_kl", "policy_loss", "register_aggregation", "register_loss",
    "register_policy_loss",
]
