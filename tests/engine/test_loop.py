"""The engine's pieces on their own: the data order across a resume, how a step's batch splits over ranks and
micro-batches, gradient accumulation, the learning-rate schedules."""
from __future__ import annotations

import math
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from prunekit.engine.loop import DataOrder, accumulate_and_step, make_scheduler_factory, step_microbatches


def _positions(steps, *, batch, accum, world_size, rank=None, order=None):
    """The sample indices each step hands out (to one rank, or to all ranks)."""
    order = order or DataOrder(7, seed=3)
    samples = list(range(7))
    ranks = range(world_size) if rank is None else [rank]
    return [[i for r in ranks for mb in step_microbatches(samples, order, s, batch, accum, r, world_size) for i in mb]
            for s in steps]


def test_every_epoch_is_a_permutation_and_a_resume_never_replays_data():
    # 7 samples, 3 per step: epochs straddle steps; each epoch still sees every sample exactly once
    stream = [i for step in _positions(range(7), batch=3, accum=1, world_size=1) for i in step]
    for epoch in range(3):
        assert sorted(stream[epoch * 7:(epoch + 1) * 7]) == list(range(7))
    assert stream[:7] != stream[7:14]                                 # a new order each epoch
    # a run stopped after step 4 and resumed (a new DataOrder, same seed) continues exactly where it stopped
    resumed = _positions(range(4, 7), batch=3, accum=1, world_size=1, order=DataOrder(7, seed=3))
    assert [i for step in resumed for i in step] == stream[12:]
    assert [DataOrder(7, seed=4).index(p) for p in range(7)] != stream[:7]           # the seed decides the order


def test_ranks_and_micro_batches_split_one_global_batch():
    one = _positions(range(5), batch=4, accum=1, world_size=1)
    split = _positions(range(5), batch=1, accum=2, world_size=2)                     # 1 x 2 micro x 2 ranks
    for s in range(5):
        assert Counter(split[s]) == Counter(one[s])                                   # the same global batch
        r0 = _positions([s], batch=1, accum=2, world_size=2, rank=0)[0]
        r1 = _positions([s], batch=1, accum=2, world_size=2, rank=1)[0]
        assert len(r0) == len(r1) == 2 and Counter(r0 + r1) == Counter(one[s])       # disjoint halves


def test_two_micro_batches_step_like_one_batch(tiny_chat_model_dir, chat_data):
    """The same samples as two micro-batches (normalised by the whole batch's token count), as one batch, or as one
    batch padded to a fixed width (compile_mode reduce-overhead's batches; packed rows too): the same gradient, so
    the same update."""
    from prunekit.core.loading import load_model, load_tokenizer
    from prunekit.core.samples import load_samples
    from prunekit.engine.loop import lm_batch
    from prunekit.engine.objectives import SFTObjective
    from prunekit.engine.strategy import LossModule, Strategy
    rows = load_samples(load_tokenizer(tiny_chat_model_dir), chat_data[0], model=tiny_chat_model_dir,
                        max_length=512, limit=16)
    samples = [rows[0], next(r for r in rows if len(r["input_ids"]) != len(rows[0]["input_ids"]))]
    # padding differs between the two ways of batching them
    cfg = SimpleNamespace(grad_clip=None)
    updated = []
    from prunekit.core.data import pack_sequences
    width = sum(len(s["input_ids"]) for s in samples) + 7  # both fit one packed row, with room to pad
    packed = pack_sequences(samples, max_length=width)
    assert len(packed) == 1 and len(packed[0]["input_ids"]) < width
    for micro, fixed_width in (([samples[:1], samples[1:]], None), ([samples], None), ([samples], width),
                               ([packed], None), ([packed], width)):
        torch.manual_seed(0)
        model, _ = load_model(tiny_chat_model_dir)
        strategy = Strategy(LossModule(model, SFTObjective()), torch.device("cpu"), cfg)
        strategy.setup(lambda p: torch.optim.SGD(list(p), lr=1.0),
                       lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))
        batches = [lm_batch(m, 0, fixed_width) for m in micro]
        assert fixed_width is None or batches[0]["input_ids"].shape[1] == fixed_width
        tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        sums, norm = accumulate_and_step(strategy, batches, tokens, torch.autocast("cpu", enabled=False),
                                         torch.device("cpu"))
        assert int(sums[1]) == tokens and float(norm) > 0
        updated.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    for other in updated[1:]:
        for k in updated[0]:
            torch.testing.assert_close(updated[0][k], other[k], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("scheduler", ["cosine", "linear", "constant"])
def test_learning_rate_schedules(scheduler):
    cfg = SimpleNamespace(warmup_ratio=0.1, scheduler=scheduler)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = make_scheduler_factory(cfg, total_steps=100)(opt)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:10] == pytest.approx([2.0 * (s + 1) / 10 for s in range(10)])       # linear warmup over 10 steps
    assert lrs[10] == pytest.approx(2.0)
    after = {"cosine": 2.0 * 0.5 * (1 + math.cos(math.pi * 89 / 90)), "linear": 2.0 * (1 - 89 / 90),
             "constant": 2.0}[scheduler]
    assert lrs[99] == pytest.approx(after)
    if scheduler != "constant":
        assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))                       # never rises after warmup


def test_tied_embeddings_stay_tied_when_the_state_comes_back_as_copies(tiny_chat_model_dir, tmp_path):
    """The GPU path's bug on CPU: a device -> host copy (or FSDP's full state dict) hands save_pretrained two
    tensors for the tied embedding and head; the output must still hold one, load with the same parameter count,
    and give the trained model's logits."""
    from types import SimpleNamespace
    from prunekit.core import report
    from prunekit.core.loading import load_model
    from prunekit.engine.loop import HF_DIR, write_checkpoint
    from prunekit.engine.reporting import LocalReporter
    model, _ = load_model(tiny_chat_model_dir)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():  # "training" moved the shared matrix
        model.model.embed_tokens.weight.mul_(1.5)
    copies = {k: v.clone() for k, v in model.state_dict().items()}  # what .cpu() of CUDA tensors gives
    assert copies["lm_head.weight"].data_ptr() != copies["model.embed_tokens.weight"].data_ptr()
    strategy = SimpleNamespace(model=model, model_state_dict=lambda: copies, trainer_state=lambda: None,
                               save_sharded=lambda d: None, all_ranks_write_checkpoint=lambda: False)
    reporter = LocalReporter(tmp_path / "run", "tie", SimpleNamespace())
    write_checkpoint(strategy, reporter, 1, {}, final=True)
    out = reporter.last_checkpoint / HF_DIR
    shapes = report.checkpoint_shapes(out)
    assert "lm_head.weight" not in shapes and len(shapes) == len(report.checkpoint_shapes(tiny_chat_model_dir))
    reloaded, _ = load_model(out)
    assert reloaded.num_parameters() == model.num_parameters() == report.describe(out)["params"]["total"]
    ids = torch.tensor([[1, 5, 9, 200, 7]])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_a_lora_trial_trains_bf16_adapters_on_a_bf16_frozen_base_with_compiled_layers(tmp_path, tiny_chat_model_dir,
                                                                                       chat_data):
    """A LoRA knockout trial's model (built from the shared float32 base, frozen) set up as a full trial's is: with
    `param_dtype: bfloat16` the frozen base is bf16 too (no float32 copy left), every decoder layer is compiled
    with `compile: true`, and the optimizer holds the adapters alone."""
    from tests.conftest import build_tiny
    from prunekit.core.families import family_of
    from prunekit.core.lora import apply_lora
    from prunekit.core.plan import Candidate
    from prunekit.engine.loop import setup_strategy
    from prunekit.engine.objectives import SFTObjective
    from prunekit.config import load_config
    from prunekit.engine.trial import build_trial_model, shared_weights
    model = apply_lora(build_trial_model(shared_weights(build_tiny("qwen2")), Candidate(), "cpu", frozen=True))
    train, val = chat_data
    cfg = load_config("knockout", None, {"model": str(tiny_chat_model_dir), "train": str(train), "val": str(val),
                                         "output_dir": str(tmp_path / "ko"), "trial_mode": "lora",
                                         "param_dtype": "bfloat16", "compile": True})
    strategy, _ = setup_strategy(model, SFTObjective(), cfg, 2, SimpleNamespace(restore=lambda: None),
                                 torch.device("cpu"))
    params = dict(model.named_parameters())
    assert {p.dtype for p in params.values()} == {torch.bfloat16}
    assert {n for n, p in params.items() if p.requires_grad} == {n for n in params if "lora_" in n}
    trained = {id(p) for group in strategy.optimizer.param_groups for p in group["params"]}
    assert trained == {id(p) for n, p in params.items() if "lora_" in n}
    assert all(layer._compiled_call_impl is not None for layer in family_of(model).blocks(model))


def test_compiled_layers_keep_compiling_past_torchs_eight_variants(caplog):
    """Every decoder layer of a class shares one compiled code object, and a pipeline run in one process meets
    more than torch's default 8 variants of it (teacher and student, training and eval, each weight shape):
    none of them may fall back to eager. Five models of different KV-head counts / widths, with and without
    grad: 10 variants, no recompile-limit warning, and each still compiled."""
    import logging
    import transformers
    from prunekit.engine.loop import compile_model
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    models = [transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32, hidden_size=hidden, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=kv, head_dim=8)) for hidden, kv in ((16, 1), (16, 2), (16, 4), (24, 1), (24, 2))]
    ids = torch.randint(0, 32, (2, 6))
    with caplog.at_level(logging.WARNING, logger="torch._dynamo"):
        for model in models:
            compile_model(model)
            model(ids).logits.sum().backward()
            with torch.no_grad():
                model(ids)
    assert not [r for r in caplog.records if "recompile_limit" in r.getMessage()]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 10


def three_sgd_steps(model, ids) -> list[float]:
    """The losses of three SGD steps (lr 0.5) of `model` on `ids`, each step marked for CUDA graphs."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(3):
        torch.compiler.cudagraph_mark_step_begin()
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_compile_mode_reaches_every_layer_and_trains_as_default():
    """compile_mode is torch.compile's mode for every decoder layer: reduce-overhead (CUDA graphs on GPUs; torch
    runs the same compiled code without them on the CPU) trains to the default mode's losses; a mode torch does
    not have, or a mode without compile: true, is a one-line config error naming the key."""
    import transformers
    from prunekit import PrunekitError
    from prunekit.config import load_config
    from prunekit.engine.loop import compile_model
    torch._dynamo.reset()
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=4)
    ids = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(0))
    losses, modes = {}, []
    original = torch.nn.Module.compile
    for mode in ("default", "reduce-overhead"):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config)
        torch.nn.Module.compile = lambda self, *a, **k: (modes.append(k.get("mode", "default")),
                                                         original(self, *a, **k))[1]
        try:
            compile_model(model, mode)
        finally:
            torch.nn.Module.compile = original
        losses[mode] = three_sgd_steps(model, ids)
    assert modes == ["default"] * 2 + ["reduce-overhead"] * 2
    assert losses["default"][2] < losses["default"][0]
    assert losses["reduce-overhead"] == pytest.approx(losses["default"], rel=1e-4)
    minimal = {"model": "m", "train": "t.jsonl", "output_dir": "o"}
    with pytest.raises(PrunekitError, match="compile_mode"):
        load_config("sft", None, {**minimal, "compile": True, "compile_mode": "fast"})
    with pytest.raises(PrunekitError, match="compile_mode: reduce-overhead needs compile: true"):
        load_config("sft", None, {**minimal, "compile_mode": "reduce-overhead"})
    assert load_config("sft", None, {**minimal, "compile": True, "compile_mode": "reduce-overhead"}).compile_mode == \
        "reduce-overhead"


def test_compile_scope_backbone_is_one_region_that_trains_as_layers_do():
    """compile_scope: backbone compiles a text model's whole backbone as one region (one CUDA graph a forward under
    reduce-overhead) instead of one per layer: no layer is compiled on its own, the losses are the layer-by-layer
    ones, a vision-language model is refused in one line, and the scope needs compile: true."""
    import transformers
    from prunekit import PrunekitError
    from prunekit.config import load_config
    from prunekit.engine.loop import compile_model
    torch._dynamo.reset()
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=4)
    ids = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(0))
    losses = {}
    for scope in ("layers", "backbone"):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config)
        compile_model(model, "reduce-overhead", scope)
        compiled = [name for name, m in model.named_modules() if getattr(m, "_compiled_call_impl", None)]
        assert compiled == (["model"] if scope == "backbone" else ["model.layers.0", "model.layers.1"])
        losses[scope] = three_sgd_steps(model, ids)
    assert losses["layers"][2] < losses["layers"][0]
    assert losses["backbone"] == pytest.approx(losses["layers"], rel=1e-4)
    vlm = transformers.Qwen2VLForConditionalGeneration(transformers.Qwen2VLConfig(
        text_config={"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "num_key_value_heads": 1, "rope_scaling": {"type": "mrope",
                                                                                           "mrope_section": [2, 1, 1]}},
        vision_config={"depth": 1, "embed_dim": 16, "hidden_size": 16, "num_heads": 2, "mlp_ratio": 2}))
    with pytest.raises(PrunekitError, match="compile_scope: backbone is for text models"):
        compile_model(vlm, "default", "backbone")
    minimal = {"model": "m", "train": "t.jsonl", "output_dir": "o"}
    with pytest.raises(PrunekitError, match="compile_scope: backbone needs compile: true"):
        load_config("sft", None, {**minimal, "compile_scope": "backbone"})
