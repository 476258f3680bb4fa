"""`prunekit plan` and the fit check before training: parameter counts against transformers, the activation formula
against the tensors autograd really saves, a hand calculation for a tiny config, the verdicts and their fixes, the
one-line errors, a real 7B config and the measured peaks of bench/results/train_throughput.json."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from prunekit import PrunekitError
from prunekit.cli import main
from prunekit.config import load_config
from prunekit.core import memory_plan as mp
from prunekit.core.memory_plan import GiB, Settings, model_shape, plan

from conftest import FAMILIES, tiny_config

ROOT = Path(__file__).resolve().parent.parent

# Qwen2.5-7B's config.json (the fields the plan reads)
QWEN25_7B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
             "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
             "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False,
             "max_position_embeddings": 32768, "rms_norm_eps": 1e-06, "torch_dtype": "bfloat16"}
# The shapes bench/train_throughput.py measured (Qwen2.5-0.5B student, Qwen2.5-1.5B teacher)
QWEN25_05B = {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
              "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True}
QWEN25_15B = {"model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
              "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True}
# the hand-calculated tiny config
TINY = {"model_type": "llama", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "tie_word_embeddings": False}


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def write_config(d: Path, cfg: dict) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


# ---- parameters ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_count_from_config_equals_transformers(family):
    from prunekit.core.loading import model_from_config
    config = tiny_config(family)
    with torch.device("meta"):  # no memory, no init: only the parameter shapes
        model = model_from_config(config)
    shape = model_shape(config.to_dict())
    assert shape.params == model.num_parameters()
    layer = sum(p.numel() for p in model.get_decoder().layers[0].parameters()) if not shape.is_vlm else \
        sum(p.numel() for p in model.model.language_model.layers[0].parameters())
    assert shape.layer_params == layer
    if shape.is_vlm:
        assert shape.vision_block_params == sum(p.numel() for p in model.model.visual.blocks[0].parameters())
        assert shape.vision_params == sum(p.numel() for p in model.model.visual.parameters())


def test_qwen25_7b_has_7_6b_parameters():
    shape = model_shape(QWEN25_7B)
    # embeddings and the untied head: 2 x 152064 x 3584; a layer: q, o 3584^2, k, v 512 x 3584 (+ q/k/v biases),
    # gate/up/down 3 x 3584 x 18944, two norms; the final norm
    layer = 2 * 3584 ** 2 + 2 * 512 * 3584 + (3584 + 2 * 512) + 3 * 3584 * 18944 + 2 * 3584
    assert shape.layer_params == layer
    assert shape.params == 2 * 152064 * 3584 + 28 * layer + 3584 == 7_615_616_512


# ---- activations: the formula against what autograd saves -----------------------------------------------------------

def _saved_bytes_per_token(family: str, mode: str, tokens: int = 64) -> tuple[float, object]:
    """Bytes one HF decoder layer saves for backward per token (sdpa, batch 1, no mask), parameters and their
    autocast copies left out (the plan counts those as weights / autocast copies)."""
    import transformers
    cls = {"llama": transformers.LlamaConfig, "qwen3": transformers.Qwen3Config}[family]
    config = cls(vocab_size=256, hidden_size=256, intermediate_size=704, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64, max_position_embeddings=512)
    config._attn_implementation = "sdpa"
    from prunekit.core.loading import model_from_config
    torch.manual_seed(0)
    model = model_from_config(config)
    if mode == "bf16":
        model.to(torch.bfloat16)
    layer = model.model.layers[0]
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    x = torch.randn(1, tokens, 256, dtype=dtype, requires_grad=True)
    cos, sin = model.model.rotary_emb(x, torch.arange(tokens)[None])
    # the layer's input counts: its first norm saves it (the float32 residual stream under autocast / fp32)
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), cos, sin]}
    weight_shapes = {s for p in model.parameters() if p.dim() == 2 for s in (tuple(p.shape), tuple(p.shape)[::-1])}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip and not (mode == "autocast" and tuple(t.shape) in weight_shapes):
            saved[ptr] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
            layer(x, position_embeddings=(cos, sin), attention_mask=None)
    s = Settings(bf16=mode != "fp32", param_dtype="bfloat16" if mode == "bf16" else "float32", batch_size=1)
    return sum(saved.values()) / tokens, mp.activation_bytes_per_token_layer(model_shape(config.to_dict()), s)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("mode", ["bf16", "autocast", "fp32"])
def test_activation_formula_matches_the_tensors_autograd_saves(family, mode):
    measured, predicted = _saved_bytes_per_token(family, mode)
    # H = Q = 256, K = 128, I = 704: bf16 16H + 4Q + 4K + 8I + 4 heads = 11280 (+ 6(Q + K) for Qwen3's head norms)
    if family == "llama" and mode == "bf16":
        assert predicted == 16 * 256 + 4 * 256 + 4 * 128 + 8 * 704 + 4 * 4 == 11280
    assert predicted == pytest.approx(measured, rel=0.01)  # what is left: RMSNorm's per-token rsqrt


# ---- a hand calculation -----------------------------------------------------------------------------------------------

def test_tiny_config_by_hand():
    shape = model_shape(TINY)
    H, Q, K, I, V, L = 64, 64, 32, 128, 1000, 4
    layer = H * Q + 2 * H * K + Q * H + 3 * H * I + 2 * H           # 36,992
    P = 2 * V * H + L * layer + H                                    # 276,032
    assert (shape.layer_params, shape.params) == (layer, P) == (36_992, 276_032)

    # fp32 weights, DDP on one GPU, batch 2 x 32 tokens, loss chunks of 16 rows
    s = Settings(batch_size=2, max_length=32, loss_chunk_size=16)
    T = 64
    per_tok_layer = 24 * H + 8 * Q + 8 * Q + 16 * I + 4 * 4          # batch 2 may pad: repeat_kv makes K as large as Q
    assert per_tok_layer == 4624
    acts = L * T * per_tok_layer + T * H * 12 + 2 * 32 ** 2          # layers, final norm + its output, the 2D mask
    ckpt = L * T * 4 * H + T * per_tok_layer + T * H * 12 + 2 * 32 ** 2
    loss = T * H * 4 + 4 * V * H + max(4 * 2 * 16 * V, 4 * 16 * V + 8 * V * H)  # grad_h, fp32 grad_w, one chunk
    p = plan(shape, s)
    assert (p.activations_full, p.activations_checkpointed) == (acts, ckpt) == (1_234_944, 412_672)
    assert p.parts["loss buffers"] == loss == 848_384
    assert (p.parts["weights"], p.parts["gradients"], p.parts["optimizer"]) == (4 * P, 4 * P, 8 * P)
    # gradients are freed every step: the peak is W + O + max(G, activations + loss)
    assert p.peak == 4 * P + 8 * P + max(4 * P, acts + loss) == 5_395_712
    assert p.required == pytest.approx(p.peak * 1.05 + GiB)

    # bf16 weights (AdamW state in bf16 too): 8 bytes a parameter
    b = plan(shape, replace(s, param_dtype="bfloat16", bf16=True))
    assert (b.parts["weights"], b.parts["gradients"], b.parts["optimizer"]) == (2 * P, 2 * P, 4 * P)
    assert mp.activation_bytes_per_token_layer(shape, b.settings) == 16 * H + 4 * Q + 4 * Q + 8 * I + 16
    # bf16 autocast over fp32 weights: + a bf16 copy of every weight
    a = plan(shape, replace(s, bf16=True))
    assert a.parts["autocast bf16 weight copies"] == 2 * P
    assert mp.activation_bytes_per_token_layer(shape, a.settings) == 26 * H + 4 * Q + 4 * Q + 8 * I + 16

    # DDP over 4 GPUs: DDP's gradient buckets stay allocated
    d = plan(shape, replace(s, gpus=4))
    assert d.peak == 4 * P + 8 * P + 4 * P + acts + loss
    # FSDP2 over 4: shards, plus the root unit (embeddings, head, final norm) and two layers, weights and gradients
    f = plan(shape, replace(s, gpus=4, strategy="fsdp", param_dtype="bfloat16"))
    root = 2 * V * H + H
    assert (f.parts["weights"], f.parts["gradients"], f.parts["optimizer"]) == (2 * P / 4, 2 * P / 4, 4 * P / 4)
    assert f.parts["gathered (fsdp/zero-3 working set)"] == 2 * 2 * (root + 2 * layer)
    # ... with CPU offload the shards and AdamW live on the host
    o = plan(shape, replace(s, gpus=4, strategy="fsdp", param_dtype="bfloat16", cpu_offload=True))
    assert (o.parts["weights"], o.parts["gradients"], o.parts["optimizer"]) == (0, 0, 0)
    assert o.host == 4 * P + 4 * 2 * P / 4
    # DeepSpeed with bf16: bf16 module, 16 bytes of fp32 master + gradient partition + Adam moments, sharded
    z2 = plan(shape, replace(s, gpus=4, strategy="deepspeed", zero_stage=2, bf16=True))
    assert (z2.parts["weights"], z2.parts["gradients"], z2.parts["optimizer"]) == (2 * P, 2 * P, 16 * P / 4)
    z3 = plan(shape, replace(s, gpus=4, strategy="deepspeed", zero_stage=3, bf16=True))
    assert (z3.parts["weights"], z3.parts["optimizer"]) == (2 * P / 4, 16 * P / 4)
    assert z3.parts["gathered (fsdp/zero-3 working set)"] == 2 * 2 * V * H  # the embedding is the largest module


def test_distill_teacher_and_knockout_trials_by_hand():
    shape, teacher = model_shape(TINY), model_shape({**TINY, "num_hidden_layers": 8})
    s = Settings(stage="distill", teacher=teacher, bf16=True, param_dtype="bfloat16", batch_size=1, max_length=32,
                 loss_chunk_size=64)
    p = plan(shape, s)
    assert p.parts["teacher"] == teacher.params * 2 + 32 * 64 * 2           # bf16 weights + its hidden states
    assert p.parts["loss buffers"] == 32 * 64 * 2 + max(7 * 2 * 32 * 1000, 2 * 32 * 1000 + 2 * 1000 * 64)
    own = plan(shape, replace(s, teacher_placement="own_gpu"))
    assert own.parts["teacher"] == 32 * 64 * 2 + 1000 * 64 * 2            # hidden states + a copy of its head
    assert own.teacher_gpu_peak > teacher.params * 2 and mp.gpus_used(own.settings) == 2
    k = plan(shape, Settings(stage="knockout", trials_per_gpu=4))
    assert k.peak == pytest.approx(4 * plan(shape, Settings(stage="knockout")).peak)


# ---- verdicts and fixes on a real config ------------------------------------------------------------------------------

def test_qwen25_7b_full_sft_does_not_fit_one_80gib_gpu_and_fits_fsdp_over_8():
    shape = model_shape(QWEN25_7B)
    gpu = 80 * GiB
    recipe = Settings(bf16=True, batch_size=4, max_length=2048)             # bf16 autocast over fp32 weights
    one = plan(shape, recipe)
    # 16 bytes a parameter of weights, gradients and AdamW alone are 113 GiB
    assert 16 * shape.params / GiB == pytest.approx(113.5, abs=0.1)
    assert not one.fits(gpu) and one.required > 130 * GiB
    fits, line = mp.verdict_line(shape, recipe, gpu, max_gpus=8, what="sft")
    # one GPU can hold it with bf16 weights (8 bytes a parameter) and checkpointing: cheaper than 8 GPUs
    assert not fits and "GiB short; smallest fix: gradient_checkpointing: true, param_dtype: bfloat16 (->" in line
    eight = plan(shape, replace(recipe, strategy="fsdp", gpus=8, gradient_checkpointing=True))
    assert eight.fits(gpu) and 30 * GiB < eight.required < 70 * GiB
    fits, line = mp.verdict_line(shape, replace(recipe, strategy="fsdp", gpus=8, gradient_checkpointing=True), gpu, 8)
    assert fits and line.startswith("fits:")


def test_smallest_fix_is_the_cheapest_change_that_fits():
    shape = model_shape(QWEN25_7B)
    # bf16 weights on one GPU: 57 GiB of model state; 4 x 2048 tokens of activations push it over 80 GiB
    s = Settings(bf16=True, param_dtype="bfloat16", batch_size=4, max_length=2048)
    fits, line = mp.verdict_line(shape, s, 80 * GiB, max_gpus=1)
    assert not fits and line.endswith(f"smallest fix: gradient_checkpointing: true (-> "
                                      f"{mp.gib(plan(shape, replace(s, gradient_checkpointing=True)).required)} per GPU)")
    # with checkpointing on and a single sequence, DDP over 2 GPUs of 64 GiB still holds 8 bytes a parameter: shard
    s2 = replace(s, gradient_checkpointing=True, batch_size=1, gpus=2)
    fix = mp.smallest_fix(shape, s2, 64 * GiB, max_gpus=2)
    assert fix.changes == ("parallel.strategy: fsdp over 2 GPUs",) and fix.plan.fits(64 * GiB)
    # a micro-batch halving keeps the global batch through grad_accum
    tiny = model_shape(TINY)
    s3 = Settings(bf16=True, param_dtype="bfloat16", batch_size=8, max_length=4096, gradient_checkpointing=True,
                  loss_chunk_size=1024)
    need = plan(tiny, s3).required
    fix = mp.smallest_fix(tiny, s3, need - 0.1 * GiB, max_gpus=1)
    assert fix.changes == ("batch_size 4 (grad_accum 2 keeps the global batch)",)


def test_a_model_that_fits_nowhere_says_by_how_much():
    shape = model_shape(QWEN25_7B)
    fits, line = mp.verdict_line(shape, Settings(), 16 * GiB, max_gpus=1, what="sft")
    assert not fits and "\n" not in line
    assert "cannot fit under any strategy on 1 GPU of 16.0 GiB" in line and "too much" in line
    best = mp.best_effort(shape, Settings(), 1)
    assert mp.gib(best.plan.required - 16 * GiB) in line


def test_plan_matches_the_measured_peaks_of_the_training_bench():
    """bench/results/train_throughput.json (one H200 and 2/4 GPUs: torch.cuda.max_memory_allocated): the plan within
    15% of every measured peak (the compiled-layer and distillation row-loss coefficients were fitted to these)."""
    bench = json.loads((ROOT / "bench" / "results" / "train_throughput.json").read_text())["results"]
    student, teacher = model_shape(QWEN25_05B), model_shape(QWEN25_15B)
    base = Settings(bf16=True, param_dtype="bfloat16", compile=True, batch_size=8, max_length=2048,
                    loss_chunk_size=16384)
    runs = {"prunekit_1gpu_bf16_compiled": base,
            "prunekit_2gpu_bf16_compiled": replace(base, gpus=2),
            "prunekit_4gpu_bf16_compiled": replace(base, gpus=4),
            "prunekit_2gpu_fsdp_bf16_compiled": replace(base, gpus=2, strategy="fsdp"),
            "prunekit_4gpu_fsdp_bf16_compiled": replace(base, gpus=4, strategy="fsdp")}
    checked = 0
    for name, s in runs.items():
        if "peak_memory_gb" in bench.get(name, {}):
            assert plan(student, s).peak / 1e9 == pytest.approx(bench[name]["peak_memory_gb"], rel=0.15), name
            checked += 1
    assert checked == 5
    earlier = json.loads((ROOT / "bench" / "results" / "train_throughput.json").read_text())["earlier_runs"][0]
    d = earlier["results"]["prunekit_distill_1gpu_bf16_compiled"]["peak_memory_gb"]
    distill = replace(base, stage="distill", teacher=teacher)
    assert plan(student, distill).peak / 1e9 == pytest.approx(d, rel=0.15)


# ---- parsing --------------------------------------------------------------------------------------------------------

def test_parse_memory():
    assert mp.parse_memory("80GiB") == 80 * GiB
    assert mp.parse_memory("80 GB") == 80 * 10 ** 9
    assert mp.parse_memory("141g") == 141 * 10 ** 9
    assert mp.parse_memory("81920MiB") == 80 * GiB
    assert mp.parse_memory("1.5TiB") == int(1.5 * 1024 ** 4)
    for bad in ("eighty", "80 GiBs", "-3GiB", "", "0.1GiB"):
        with pytest.raises(PrunekitError, match="--gpu-memory"):
            mp.parse_memory(bad)


# ---- the command ----------------------------------------------------------------------------------------------------

def test_plan_command_table_verdict_and_fix(tmp_path, capsys):
    model = write_config(tmp_path / "qwen7b", QWEN25_7B)
    code, out, err = run_cli(capsys, "plan", model, "--stage", "sft", "--gpu-memory", "80GiB", "--set", "bf16=true",
                             "--set", "max_length=2048")
    assert code == 1 and not err
    assert "qwen7b (qwen2): 7.6B parameters" in out
    for row in ("weights", "gradients", "optimizer state (AdamW)", "bf16 autocast weight copies", "activations <-",
                "activations, gradient_checkpointing", "loss buffers (chunk 1024)", "peak", "GPU memory (--gpu-memory)",
                "host RAM per worker"):
        assert row in out, row
    verdict = out.strip().splitlines()[-1]
    assert verdict.startswith("sft of qwen7b needs") and "GiB short; smallest fix:" in verdict

    recipe = tmp_path / "sft.yaml"
    recipe.write_text(yaml.safe_dump({"model": "ignored", "train": "t.jsonl", "output_dir": "o", "bf16": True,
                                      "max_length": 2048, "gradient_checkpointing": True,
                                      "parallel": {"strategy": "fsdp"}, "ray": {"use_gpu": True}}))
    code, out, err = run_cli(capsys, "plan", model / "config.json", "--stage", "sft", "--gpus", 8, "--config", recipe,
                             "--gpu-memory", "80GiB")
    assert code == 0 and "fsdp2 over 8 GPUs" in out and out.strip().splitlines()[-1].startswith("fits: sft of qwen7b")
    assert "gathered units (fsdp / ZeRO-3)" in out and "activations, gradient_checkpointing <-" in out

    code, out, _ = run_cli(capsys, "plan", model, "--stage", "sft", "--gpus", 8, "--config", recipe,
                           "--gpu-memory", "80GiB", "--json")
    record = json.loads(out)
    assert code == 0 and record["fits"] is True and record["params"] == 7_615_616_512
    assert record["required_bytes"] < 80 * GiB

    # no GPU here and no --gpu-memory: the table, and no verdict
    code, out, _ = run_cli(capsys, "plan", model, "--stage", "sft")
    assert code == 0 and out.strip().splitlines()[-1].startswith("fit not checked")


def test_plan_command_distill_and_knockout(tmp_path, capsys):
    student = write_config(tmp_path / "student", {**QWEN25_7B, "num_hidden_layers": 20})
    teacher = write_config(tmp_path / "teacher", QWEN25_7B)
    code, out, _ = run_cli(capsys, "plan", student, "--stage", "distill", "--teacher", teacher, "--gpus", 8,
                           "--gpu-memory", "141GiB", "--set", "bf16=true", "--set", "param_dtype=bfloat16",
                           "--set", "parallel.strategy=fsdp", "--set", "gradient_checkpointing=true")
    assert code == 0 and "teacher 7.6B parameters" in out and "\nteacher " in out
    code, _, err = run_cli(capsys, "plan", student, "--stage", "distill", "--gpu-memory", "80GiB")
    assert code == 2 and err.strip() == ("prunekit plan: error: --stage distill: give the teacher (--teacher MODEL, "
                                         "or teacher: in --config)")
    # four knockout trials per GPU (tune.gpus_per_trial 0.25) of a 1.5B model on one 80 GiB GPU: fewer per GPU
    small = write_config(tmp_path / "q15", {**QWEN25_15B, "model_type": "qwen2"})
    code, out, _ = run_cli(capsys, "plan", small, "--stage", "knockout", "--gpu-memory", "80GiB",
                           "--set", "tune.gpus_per_trial=0.25", "--set", "max_length=2048", "--set", "bf16=true")
    assert code == 1 and "4 trials per GPU" in out and "peak (all trials on one GPU)" in out
    assert "tune.gpus_per_trial:" in out.strip().splitlines()[-1]


def test_plan_command_errors_are_one_line(tmp_path, capsys):
    model = write_config(tmp_path / "qwen7b", QWEN25_7B)
    for argv, message in [
        (["--gpu-memory", "eighty"], "--gpu-memory: expected a size such as 80GiB, 80GB or 81920MiB, got 'eighty'"),
        (["--gpu-memory", "100MB"], "--gpu-memory: '100MB' is less than 0.25 GiB"),
        (["--gpus", "0"], "--gpus: must be >= 1, got 0"),
        (["--config", tmp_path / "missing.yaml"], f"--config {tmp_path / 'missing.yaml'}: cannot read"),
        (["--set", "batch_size=0"], "flags: config: batch_size must be >= 1"),
    ]:
        code, out, err = run_cli(capsys, "plan", model, "--stage", "sft", *argv)
        assert code == 2 and not out, argv
        assert err.count("\n") == 1 and err.startswith(f"prunekit plan: error: {message}"), err
    code, _, err = run_cli(capsys, "plan", tmp_path / "nowhere", "--stage", "sft", "--gpu-memory", "80GiB")
    assert code == 2 and "MODEL" in err and err.count("\n") == 1
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "plan", tmp_path / "empty", "--stage", "sft", "--gpu-memory", "80GiB")
    assert code == 2 and err.strip().endswith("no config.json in that directory")
    # fits nowhere: the table on stdout, the one line on stderr, exit 2
    code, out, err = run_cli(capsys, "plan", model, "--stage", "sft", "--gpus", 1, "--gpu-memory", "16GiB")
    assert code == 2 and err.count("\n") == 1
    assert "cannot fit under any strategy on 1 GPU of 16.0 GiB" in err and "too much" in err


# ---- the check before training ----------------------------------------------------------------------------------------

def _sft_cfg(model, data, tmp_path, **over):
    train, val = data
    return load_config("sft", None, {"model": str(model), "train": str(train), "val": str(val),
                                     "output_dir": str(tmp_path / "out"), "storage_path": str(tmp_path / "runs"),
                                     "wandb.mode": "disabled", **over})


def test_training_stage_fails_before_any_worker_when_the_plan_does_not_fit(tiny_chat_model_dir, chat_data, tmp_path):
    from prunekit.stages import training
    # 64 rows of 8192 tokens on the tiny model want ~40 GiB; the configured GPUs have 8
    cfg = _sft_cfg(tiny_chat_model_dir, chat_data, tmp_path, batch_size=64, max_length=8192, gpu_memory="8GiB",
                   **{"ray.use_gpu": True, "launcher": "local"})
    with pytest.raises(PrunekitError) as e:
        training.sft(cfg)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("memory plan: sft of tiny-chat")
    assert "GiB short; smallest fix:" in msg and "memory_check: false skips this check" in msg
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out").exists()  # nothing started
    # memory_check: false skips it (the run then gets as far as the device: there is no GPU here)
    cfg = _sft_cfg(tiny_chat_model_dir, chat_data, tmp_path, batch_size=64, max_length=8192, gpu_memory="8GiB",
                   memory_check=False, **{"ray.use_gpu": True, "launcher": "local"})
    with pytest.raises(PrunekitError, match="this process sees no GPU"):
        training.sft(cfg)
    # on CPU (ray.use_gpu false) no check runs, whatever gpu_memory says
    from prunekit.stages.plan import check_before_training
    check_before_training("sft", _sft_cfg(tiny_chat_model_dir, chat_data, tmp_path, batch_size=64, max_length=8192,
                                          gpu_memory="8GiB"))
    # ... and without gpu_memory a machine without GPUs skips it silently
    check_before_training("sft", _sft_cfg(tiny_chat_model_dir, chat_data, tmp_path, batch_size=64, max_length=8192,
                                          **{"ray.use_gpu": True}))


def test_knockout_and_distill_check_before_training(tmp_path, tiny_chat_model_dir, chat_data):
    from prunekit.stages.plan import check_before_training
    train, val = chat_data
    model = write_config(tmp_path / "qwen7b", QWEN25_7B)
    ko = load_config("knockout", None, {"model": str(model), "train": str(train), "val": str(val),
                                        "output_dir": str(tmp_path / "ko"), "gpu_memory": "80GiB",
                                        "tune.gpus_per_trial": 1, "bf16": True})
    with pytest.raises(PrunekitError, match=r"^memory plan: knockout of qwen7b needs .* GiB short; smallest fix: "):
        check_before_training("knockout", ko)
    big = load_config("knockout", None, {"model": str(model), "train": str(train), "val": str(val),
                                         "output_dir": str(tmp_path / "ko"), "gpu_memory": "24GiB",
                                         "tune.gpus_per_trial": 1})
    with pytest.raises(PrunekitError, match="cannot fit under any strategy on 1 GPU of 24.0 GiB: even .* too much"):
        check_before_training("knockout", big)
    # the stage itself stops there, before any trial (and before loading the base weights)
    from prunekit.stages.knockout import knockout
    cfg = load_config("knockout", None, {"model": str(tiny_chat_model_dir), "train": str(train), "val": str(val),
                                         "output_dir": str(tmp_path / "ko2"), "storage_path": str(tmp_path / "runs"),
                                         "gpu_memory": "1GiB", "tune.gpus_per_trial": 0.5})
    with pytest.raises(PrunekitError, match="^memory plan: knockout of tiny-chat"):
        knockout(cfg)
    assert not (tmp_path / "runs").exists()
    # distillation: the teacher counts
    dist = load_config("distill", None, {"model": str(model), "teacher": str(model), "train": str(train),
                                         "output_dir": str(tmp_path / "d"), "gpu_memory": "80GiB", "bf16": True,
                                         "param_dtype": "bfloat16", "ray.use_gpu": True})
    with pytest.raises(PrunekitError, match="^memory plan: distill of qwen7b needs"):
        check_before_training("distill", dist)


def test_cpu_offload_config():
    cfg = load_config("sft", None, {"model": "m", "train": "t", "output_dir": "o", "parallel.strategy": "fsdp",
                                    "parallel.cpu_offload": True})
    assert cfg.parallel.cpu_offload and cfg.model_dump(mode="json")["parallel"]["cpu_offload"] is True
    # left out of dumps while off, so earlier runs keep their names
    plain = load_config("sft", None, {"model": "m", "train": "t", "output_dir": "o"})
    assert "cpu_offload" not in plain.model_dump()["parallel"]
    assert "gpu_memory" not in plain.model_dump() and "memory_check" not in plain.model_dump()
    with pytest.raises(PrunekitError, match="^flags: parallel: cpu_offload needs parallel.strategy: fsdp$"):
        load_config("sft", None, {"model": "m", "train": "t", "output_dir": "o", "parallel.cpu_offload": True})
    with pytest.raises(PrunekitError, match="^flags: gpu_memory: expected a size such as 80GiB"):
        load_config("sft", None, {"model": "m", "train": "t", "output_dir": "o", "gpu_memory": "lots"})
