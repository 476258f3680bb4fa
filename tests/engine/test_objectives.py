"""Objectives: distillation's teacher prefetch and the dtype of packed masks; the RL objective takes its policy loss
from the registry."""
from __future__ import annotations

import pytest
import torch

from prunekit.core.losses import POLICY_LOSSES, register_policy_loss


def test_distill_teacher_prefetch_is_consumed_in_order_by_training_batches_only():
    """A teacher forward queued ahead (what a teacher on its own GPU does) gives the same loss as computing it in
    the step; eval batches never take a queued result, and a batch of another shape discards the queue."""
    from tests.conftest import build_tiny
    from prunekit.core.data import collate
    from prunekit.engine.objectives import DistillObjective
    student, teacher = build_tiny("llama", seed=0), build_tiny("llama", seed=1)
    g = torch.Generator().manual_seed(0)
    samples = [{"input_ids": x, "labels": x} for x in torch.randint(3, 100, (4, 9), generator=g).tolist()]
    batch = collate(samples, pad_id=0)
    other = collate(samples[:2], pad_id=0)
    objective = DistillObjective(teacher, beta=0.5)
    direct = objective(student.train(), batch)["loss_sum"]
    objective.prefetch(batch, torch.device("cpu", 0))   # the teacher's own device, named with its index
    assert not objective._ahead
    elsewhere = torch.device("cpu", 1)  # not the teacher's "cpu": stands in for a teacher on another GPU
    objective.prefetch(batch, elsewhere)
    assert len(objective._ahead) == 1
    objective(student.eval(), batch)  # eval: the queued result stays for the training batch
    assert len(objective._ahead) == 1
    queued = objective(student.train(), batch)["loss_sum"]
    assert not objective._ahead and torch.allclose(queued, direct)
    objective.prefetch(batch, elsewhere)
    mismatched = objective(student.train(), other)["loss_sum"]  # wrong shape: recomputed, queue dropped
    assert not objective._ahead and torch.allclose(mismatched, objective(student.train(), other)["loss_sum"])


def test_same_device_reads_a_device_without_index_as_the_current_one():
    """The local launcher's "cuda" and a loaded model's "cuda:0" are one GPU (the current one): a teacher there is
    not prefetched as if it had a GPU of its own."""
    from prunekit.engine.objectives import same_device
    assert same_device(torch.device("cuda"), torch.device("cuda", 0))
    assert same_device("cpu", torch.device("cpu", 0))
    assert not same_device(torch.device("cuda"), torch.device("cuda", 1))
    assert not same_device("cuda:0", "cpu")


def test_packed_masks_come_in_the_dtype_each_model_computes_in(tiny_chat_model_dir, chat_data):
    """A packed batch's additive 4D mask is built in the dtype of the attention that reads it: bf16 for a bf16
    teacher, bf16 for an fp32 student under bf16 autocast, fp32 otherwise (sdpa takes the mask as it is)."""
    from prunekit.core.loading import load_model, load_tokenizer
    from prunekit.core.samples import load_samples
    from prunekit.engine.loop import lm_batch
    from prunekit.engine.objectives import DistillObjective
    student, _ = load_model(tiny_chat_model_dir)
    teacher, _ = load_model(tiny_chat_model_dir, dtype=torch.bfloat16)
    samples = load_samples(load_tokenizer(tiny_chat_model_dir), chat_data[1], model=tiny_chat_model_dir,
                           max_length=64, packing=True, limit=16)
    batch = lm_batch(samples[:2], 0)
    seen = {}

    def spy(name):
        def hook(_module, args, kwargs):
            seen[name] = kwargs["attention_mask"].dtype
        return hook
    student.model.register_forward_pre_hook(spy("student"), with_kwargs=True)
    teacher.model.register_forward_pre_hook(spy("teacher"), with_kwargs=True)
    objective = DistillObjective(teacher)
    with torch.no_grad():
        assert torch.isfinite(objective(student.eval(), batch)["loss_sum"])
        assert seen == {"student": torch.float32, "teacher": torch.bfloat16}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.isfinite(objective(student.eval(), batch)["loss_sum"])
        assert seen == {"student": torch.bfloat16, "teacher": torch.bfloat16}


def test_rl_objective_uses_the_policy_loss_registry():
    """RLObjective takes its loss from the registry by name: a newly registered loss is what it computes, and an
    unknown name (loss or aggregation) is a one-line error listing the known ones. The config offers what is
    registered."""
    import transformers
    from typing import get_args

    from prunekit.config import RLAlgorithmConfig
    from prunekit.engine.objectives import RLObjective, response_logprobs
    from prunekit.rl.batch import collate_rl
    assert RLObjective("grpo").policy_loss is POLICY_LOSSES["grpo"]
    assert RLObjective("gspo").policy_loss is POLICY_LOSSES["gspo"]
    for bad, kw, known in (("ppo", {}, "valid: grpo, gspo"), ("grpo", {"aggregation": "mean"},
                                                                 "valid: dapo, dr_grpo, grpo")):
        with pytest.raises(ValueError) as err:
            RLObjective(bad, **kw)
        assert "\n" not in str(err.value) and known in str(err.value)
    assert set(get_args(RLAlgorithmConfig.model_fields["name"].annotation)) == set(POLICY_LOSSES)
    assert set(get_args(RLAlgorithmConfig.model_fields["aggregation"].annotation)) == {"grpo", "dapo", "dr_grpo"}

    seen = {}

    @register_policy_loss("test_logp_sum")
    def logp_sum(logp, old_logp, advantages, mask, **kw):
        seen.update(kw)
        return (logp * mask).sum() * advantages.sum(), {"n_tokens": mask.sum()}

    try:
        with pytest.raises(ValueError, match="already registered"):
            register_policy_loss("test_logp_sum")(logp_sum)
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1)).eval()
        batch = collate_rl([{"prompt_ids": [3, 4], "completion_ids": [5, 6, 7], "advantage": 2.0,
                             "old_logp": [0.0] * 3},
                            {"prompt_ids": [8], "completion_ids": [9], "advantage": 0.5, "old_logp": [0.0]}], pad_id=0)
        with torch.no_grad():
            out = RLObjective("test_logp_sum", eps=0.1, eps_high=0.3, kl_beta=0.0)(model, batch)
            logp = response_logprobs(model, batch)
        assert out["loss_sum"].item() == pytest.approx(logp.sum().item() * 2.5, rel=1e-6)
        assert out["n_tokens"].item() == 4
        assert seen["eps"] == 0.1 and seen["eps_high"] == 0.3 and seen["aggregation"] == "grpo"
    finally:
        POLICY_LOSSES.pop("test_logp_sum")


def test_a_frozen_lm_head_gets_no_gradient_formed_and_the_adapters_the_same_one():
    """LoRA freezes the LM head: the fused loss then forms no [V, H] head gradient (it was summed in float32 over
    the chunks and kept for backward: memory and a matmul as large as the head's, for nothing), and the adapters'
    gradients equal those of plain autograd through full logits."""
    from tests.conftest import build_tiny
    from prunekit.core.data import collate
    from prunekit.core.lora import apply_lora
    from prunekit.core.families import backbone_and_head
    from prunekit.engine.objectives import SFTObjective
    model = apply_lora(build_tiny("llama"), dropout=0.0)
    g = torch.Generator().manual_seed(0)
    batch = collate([{"input_ids": x, "labels": x} for x in torch.randint(3, 100, (2, 9), generator=g).tolist()], 0)
    head = backbone_and_head(model)[1].weight
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = []  # shapes of what the forward saves for backward, the (frozen) weights themselves left out

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            saved.append(tuple(t.shape))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = SFTObjective(chunk_size=4)(model.train(), batch)["loss_sum"]  # 16 rows: float32 sums over chunks
    assert not head.requires_grad and tuple(head.shape) not in saved
    loss.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1]
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="sum").backward()
    assert fused and all(torch.allclose(fused[n], p.grad, atol=1e-5) for n, p in model.named_parameters() if n in fused)


@pytest.mark.parametrize("compiled", [False, True])
def test_hidden_state_distillation_matches_each_student_layer_to_the_teacher_layer_it_stands_for(compiled):
    """A teacher whose layers 1 and 2 do nothing (zero output projections: the residual stream passes through) and
    a student that is the teacher without them: student layer 0 (the teacher's 0) hands on what the teacher's layer 2
    does, layer 1 (the teacher's 3) the teacher's last output, so the hidden-state loss against those targets is 0,
    with eager and with compiled layers (the hooks are traced with them). A perturbed student has a positive loss
    whose gradient reaches every layer; the total is the KD loss plus hidden_weight times it."""
    import copy
    from tests.conftest import build_tiny
    from prunekit.core.data import collate
    from prunekit.core.surgery import LayerDrop, apply_to_model
    from prunekit.core.families import family_of
    from prunekit.engine.loop import compile_model
    from prunekit.engine.objectives import DistillObjective
    teacher = build_tiny("llama", seed=1).eval()
    with torch.no_grad():
        for i in (1, 2):
            teacher.model.layers[i].self_attn.o_proj.weight.zero_()
            teacher.model.layers[i].mlp.down_proj.weight.zero_()
    student = apply_to_model(copy.deepcopy(teacher), LayerDrop(family_of(teacher), teacher.config.to_dict(),
                                                               drop_text=[1, 2]))
    g = torch.Generator().manual_seed(0)
    batch = collate([{"input_ids": x, "labels": x} for x in torch.randint(3, 100, (3, 10), generator=g).tolist()], 0)
    if compiled:
        compile_model(teacher)
        compile_model(student)
    objective = DistillObjective(teacher, beta=0.0, hidden_weight=0.5, hidden_targets=[2, 3])
    objective.watch(student)
    exact = objective(student.train(), batch)
    assert exact["hidden_sum"].item() == pytest.approx(0.0, abs=1e-6)
    assert exact["kd_sum"].item() == pytest.approx(0.0, abs=1e-5)
    wrong = DistillObjective(teacher, beta=0.0, hidden_weight=0.5, hidden_targets=[3, 3])
    assert wrong(student.train(), batch)["hidden_sum"] > 0.01   # layer 0 does not hand on the teacher's last output
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.02 * torch.randn_like(p))
    out = objective(student.train(), batch)
    assert out["hidden_sum"] > 0 and torch.allclose(out["loss_sum"], out["kd_sum"] + 0.5 * out["hidden_sum"])
    out["hidden_sum"].backward()
    for layer in student.model.layers:
        assert layer.mlp.up_proj.weight.grad is not None and layer.mlp.up_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("compiled", [False, True])
def test_hidden_state_distillation_under_gradient_checkpointing_keeps_no_recomputed_outputs(compiled):
    """Gradient checkpointing runs the student's layers again in backward (to their end when torch's early stop is
    off, or with reentrant checkpointing): watched with `recomputed`, the hooks keep outputs only during the
    objective's forward, so nothing stays referenced after backward, and the loss and gradients are those of the
    run without checkpointing."""
    import copy
    from tests.conftest import build_tiny
    from prunekit.core.data import collate
    from prunekit.engine.loop import compile_model
    from prunekit.engine.objectives import DistillObjective
    teacher, student = build_tiny("llama", seed=1), build_tiny("llama", seed=2)
    checkpointed = copy.deepcopy(student)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    g = torch.Generator().manual_seed(0)
    batch = collate([{"input_ids": x, "labels": x} for x in torch.randint(3, 100, (3, 10), generator=g).tolist()], 0)
    runs = {}
    for name, model in (("plain", student), ("checkpointed", checkpointed)):
        objective = DistillObjective(teacher, beta=0.0, hidden_weight=1.0, hidden_targets=[0, 1, 2, 3])
        objective.watch(model, recomputed=name == "checkpointed")
        if compiled:
            compile_model(model)
        with torch.utils.checkpoint.set_checkpoint_early_stop(False):   # recompute each layer to its output
            out = objective(model.train(), batch)
            out["loss_sum"].backward()
        assert not objective._student_layers   # nothing kept from the forward, nor from backward's recompute
        runs[name] = (out["hidden_sum"].item(), model.model.layers[0].mlp.up_proj.weight.grad.clone())
    assert runs["plain"][0] == pytest.approx(runs["checkpointed"][0], rel=1e-5)
    assert torch.allclose(runs["plain"][1], runs["checkpointed"][1], atol=1e-5)
