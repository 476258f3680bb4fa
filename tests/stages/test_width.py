"""Width pruning (`prunekit width`): removing FFN channels, query heads and hidden channels that carry nothing is
exact on every family; config.json stays standard and loads; bad targets are one line; a parameter budget picks the
mix; scores from data (text and image rows) are saved and reused (importance and the budget rule on their own:
tests/core/test_width.py)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from prunekit.core.families import MODEL_FAMILIES, get_module
from prunekit.core.loading import load_model
from prunekit.core.width import BUDGET_SLACK, WidthShape, activation_importance, importance_record
from prunekit.stages.width import width
from tests.conftest import (FAMILIES, VLM_FAMILIES, assert_same_outputs, generate_logits, inputs_for, run_cli,
                            text_inputs, tree_hash, vision_mlp, vlm_inputs, width_model)

D, H, KV, HD, I, L, V = 64, 4, 2, 16, 128, 4, 128   # the tiny models' shape (conftest.TEXT)
# Qwen2-VL and 2.5-VL derive head_dim = hidden / heads, so their hidden size shrinks with the heads
TARGETS = {f: dict(ffn="0.75", heads=2, hidden=32 if not MODEL_FAMILIES[f].head_dim_field else 48) for f in FAMILIES}


def silence(model, model_family, family, seed=0):
    """Zero the weights of what the targets remove, so those channels contribute nothing: per layer FFN channels
    (up rows and down columns) and one query head per KV group (o_proj columns); hidden channels everywhere they
    enter the residual stream (embedding columns, o_proj / down_proj rows, vision-merger output rows). Returns the
    dropped (ffn per layer, heads per layer, hidden)."""
    t = TARGETS[family]
    g = torch.Generator().manual_seed(seed)
    n_ffn = I - round(I * float(t["ffn"]))
    ffn = [sorted(torch.randperm(I, generator=g)[:n_ffn].tolist()) for _ in range(L)]
    heads = [sorted(int(torch.randint(0, 2, (1,), generator=g)) + 2 * k for k in range(KV)) for _ in range(L)]
    hidden = sorted(torch.randperm(D, generator=g)[:D - t["hidden"]].tolist())
    with torch.no_grad():
        get_module(model, model_family.text_module_path("embed_tokens")).weight[:, hidden] = 0
        for layer, f, h in zip(get_module(model, model_family.text_layers), ffn, heads):
            layer.mlp.up_proj.weight[f] = 0
            layer.mlp.down_proj.weight[:, f] = 0
            layer.mlp.down_proj.weight[hidden] = 0
            o = layer.self_attn.o_proj.weight
            o[hidden] = 0
            for head in h:
                o[:, head * HD:(head + 1) * HD] = 0
        for name, p in model.named_parameters():
            if model_family.is_vision_out_key(name):
                p[hidden] = 0
    return ffn, heads, hidden


@pytest.fixture
def silenced_dir(tmp_path):
    """family -> (directory of a tiny model whose dropped channels are zeroed, importance.json for it, dropped)."""
    def make(family):
        model_family = MODEL_FAMILIES[family]
        model = width_model(family)
        dropped = silence(model, model_family, family)
        src = tmp_path / f"src-{family}"
        model.save_pretrained(src)
        scores = activation_importance(model, model_family, [inputs_for(family)])
        # a head's own output does not see its o_proj columns: mark the silenced heads least important
        scores["heads"] = [[0.0 if h in dropped[1][i] else 1.0 for h in range(H)] for i in range(L)]
        record = importance_record(scores, WidthShape.of(model_family, model.config.to_dict()), data="test inputs")
        imp = tmp_path / f"importance-{family}.json"
        imp.write_text(json.dumps(record))
        return src, imp, dropped
    return make


@pytest.mark.parametrize("family", FAMILIES)
def test_removing_silenced_channels_is_exact(family, silenced_dir, tmp_path):
    src, imp, (ffn, heads, hidden) = silenced_dir(family)
    before = tree_hash(src)
    result = width(str(src), tmp_path / "out", importance=imp, streaming=False, plot=False, **TARGETS[family])
    assert tree_hash(src) == before
    kept = json.loads((result.output / "importance.json").read_text())["kept"]
    assert kept["hidden"] == [c for c in range(D) if c not in hidden]
    assert kept["ffn"] == [[c for c in range(I) if c not in f] for f in ffn]
    assert kept["heads"] == [[h for h in range(H) if h not in hs] for hs in heads]

    original, _ = load_model(src)
    pruned, _ = load_model(result.output)
    ref = assert_same_outputs(original, pruned, inputs_for(family))
    assert ref.abs().max().item() > 0.1   # logits of order 1: 1e-5 measures exactness, not fp32 rounding


def expected_params(family, original, ffn, heads, hidden):
    """num_parameters() of the pruned model from its sizes: the text model by formula, the vision tower as it was
    minus the vision-merger output rows that left with the hidden channels."""
    qk_norm = any(n.endswith("q_norm.weight") for n, _ in original.named_parameters())
    bias = MODEL_FAMILIES[family].qkv_bias(original.config.to_dict())
    attn = hidden * heads * HD + 2 * hidden * KV * HD + heads * HD * hidden
    attn += (heads * HD + 2 * KV * HD) * bias + 2 * HD * qk_norm
    text = V * hidden + L * (attn + 3 * hidden * ffn + 2 * hidden) + hidden + V * hidden   # untied LM head
    vision = sum(p.numel() for n, p in original.named_parameters() if ".visual." in f".{n}")
    mergers = 1 + len(getattr(original.config, "vision_config", None) and
                      getattr(original.config.vision_config, "deepstack_visual_indexes", None) or [])
    vision -= (D - hidden) * (128 + 1) * mergers * (family in VLM_FAMILIES)   # fc2: 128 inputs + bias per row
    return text + vision


@pytest.mark.parametrize("family", FAMILIES)
def test_config_rewritten_and_loads_with_auto_classes(family, silenced_dir, tmp_path):
    import transformers
    src, imp, _ = silenced_dir(family)
    t = TARGETS[family]
    out = width(str(src), tmp_path / "out", importance=imp, streaming=False, plot=False, **t).output
    cfg = json.loads((out / "config.json").read_text())
    tc = cfg.get("text_config", cfg)
    before = json.loads((src / "config.json").read_text())
    assert (tc["intermediate_size"], tc["num_attention_heads"], tc["hidden_size"]) == (96, 2, t["hidden"])
    assert tc["num_key_value_heads"] == KV and tc["num_hidden_layers"] == L
    if MODEL_FAMILIES[family].head_dim_field:
        assert tc["head_dim"] == HD and t["hidden"] // tc["num_attention_heads"] != HD   # explicit where needed
    assert tc["rms_norm_eps"] == pytest.approx(before.get("text_config", before)["rms_norm_eps"] * D / t["hidden"])
    if family in VLM_FAMILIES:
        assert cfg["vision_config"][MODEL_FAMILIES[family].vision_out_field] == t["hidden"]
    auto = transformers.AutoModelForImageTextToText if family in VLM_FAMILIES else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(out)
    original = auto.from_pretrained(src)
    want = expected_params(family, original, 96, 2, t["hidden"])
    assert model.num_parameters() == want < original.num_parameters()
    from prunekit.core import report
    assert report.describe(out)["params"]["total"] == want
    prov = json.loads((out / "prunekit.json").read_text())
    assert prov["stage"] == "width" and prov["operation"] == "width"
    assert prov["sizes"]["hidden_size"] == {"before": D, "after": t["hidden"]}
    assert prov["params"] == {"before": original.num_parameters(), "after": want}
    assert prov["importance"]["sha256"] and prov["kept"]["heads"] and prov["kept"]["hidden"]


def test_streaming_equals_in_memory(silenced_dir, tmp_path):
    from safetensors.torch import load_file
    src, imp, _ = silenced_dir("qwen3_vl")
    kw = dict(importance=imp, plot=False, **TARGETS["qwen3_vl"])
    mem = width(str(src), tmp_path / "mem", streaming=False, **kw)
    st = width(str(src), tmp_path / "st", streaming=True, **kw)
    assert st.streaming and not mem.streaming
    a, b = load_file(mem.output / "model.safetensors"), load_file(st.output / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((mem.output / "config.json").read_text()) == json.loads((st.output / "config.json").read_text())


# ---- bad input: one line, exit 2, nothing written, input unchanged ---------------------------------------------


BAD = [
    ("llama", ["--heads", "3"], "--heads: 3 is not a multiple of the 2 KV heads"),
    ("llama", ["--heads", "8"], "--heads: 8 must be between 1 and the 4 query heads"),
    ("llama", ["--heads", "0"], "--heads: 0 must be between 1 and the 4 query heads"),
    ("llama", ["--ffn", "0"], "--ffn: 0 must keep at least 1 FFN channel"),
    ("llama", ["--ffn", "0.0"], "--ffn: 0.0 must be a fraction above 0 and at most 1"),
    ("llama", ["--ffn", "256"], "--ffn: 256 is more FFN channels than the 128 the model has"),
    ("llama", ["--ffn", "1.5"], "--ffn: 1.5 must be a fraction above 0 and at most 1"),
    ("llama", ["--ffn", "x"], "--ffn: cannot read 'x'"),
    ("llama", ["--hidden", "65"], "--hidden: 65 must be between 1 and the 64 hidden channels"),
    ("llama", ["--ffn", "128"], "nothing to remove"),
    ("llama", ["--hidden", "50"], "--hidden: 50 is not a multiple of the 4 query heads, which transformers' llama "
                                  "config requires (e.g. --hidden 48 or 52)"),
    ("llama", ["--heads", "2", "--hidden", "63"], "--hidden: 63 is not a multiple of the 2 query heads"),
    ("qwen2_vl", ["--hidden", "48"], "qwen2_vl computes head_dim as hidden_size / num_attention_heads"),
    ("qwen2_5_vl", ["--heads", "2"], "with 2 heads give --hidden 32"),
    ("qwen2_vl", ["--heads", "2", "--hidden", "40"], "the hidden size must stay heads x 16"),
    ("llama", ["--params-fraction", "1.5"], "--params-fraction: 1.5 must be a fraction above 0 and below 1"),
    ("llama", ["--params-fraction", "0"], "--params-fraction: 0 must be a fraction above 0 and below 1"),
    ("llama", ["--params", "x"], "--params: cannot read 'x'"),
    ("llama", ["--params", "1000"], "--params 1000: no width mix reaches 1,000 of the 164,416 parameters"),
    ("llama", ["--params", "10000000"], "--params 10000000: the model has 164,416 parameters, already within"),
    ("llama", ["--params", "100000", "--params-fraction", "0.5"], "give --params or --params-fraction, not both"),
    ("llama", ["--params-fraction", "0.8", "--ffn", "0.5"], "prunekit chooses the FFN, heads and hidden sizes"),
]


def test_bad_width_sources(silenced_dir, tiny_model_dir, tmp_path, capsys):
    src, imp, _ = silenced_dir("llama")
    before = tree_hash(src)
    other = tmp_path / "other.json"   # scores for another FFN size
    record = json.loads(imp.read_text())
    record["shape"]["intermediate_size"] = 96
    other.write_text(json.dumps(record))
    capsys.readouterr()
    cases = [([], "give --data CALIB"),
             (["--data", "x.jsonl", "--importance", imp], "give --data CALIB"),
             (["--data", "x.jsonl", "--streaming"], "--streaming: scoring on --data runs the model"),
             (["--importance", other], "the scores are for intermediate_size 96, the model has 128"),
             (["--importance", src / "config.json"], "not a width importance file"),
             (["--importance", tmp_path / "missing.json"], "cannot read")]
    for flags, message in cases:
        code, _, err = run_cli(capsys, "width", src, "--heads", 2, *flags, "-o", tmp_path / "out")
        assert code == 2 and message in err and err.count("\n") == 1, (flags, err)
        assert not (tmp_path / "out").exists()
    assert tree_hash(src) == before


# ---- a parameter budget: prunekit picks the mix --------------------------------------------------------------------

def test_params_budget_solves_each_mix_and_records_the_choice(silenced_dir, tmp_path, capsys):
    """--params-fraction on a tiny llama (scores reused from importance.json): every mix is solved to the budget with
    standard sizes, the output is within it (as transformers counts), and prunekit.json records the choice, the
    rule and the alternatives."""
    import transformers
    src, imp, _ = silenced_dir("llama")
    before = tree_hash(src)
    code, out, err = run_cli(capsys, "width", src, "--importance", imp, "--params-fraction", "0.8", "--in-memory",
                             "-o", tmp_path / "out")
    assert code == 0, err
    total = transformers.AutoModelForCausalLM.from_pretrained(src).num_parameters()
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    prov = json.loads((tmp_path / "out" / "prunekit.json").read_text())
    budget = prov["budget"]
    assert budget["params"] == int(0.8 * total) and budget["params_before"] == total
    assert [m["mix"] for m in budget["mixes"]] == ["ffn", "heads+ffn", "hidden+ffn"]
    assert all(m["reason"] is None for m in budget["mixes"])
    for m in budget["mixes"]:   # each at the budget, standard sizes
        s = m["sizes"]
        assert m["params"] <= budget["params"] and total - m["params"] <= (1 + BUDGET_SLACK) * (total - budget["params"])
        assert s["num_attention_heads"] % KV == 0 and s["hidden_size"] % 8 == 0
        assert s["hidden_size"] % s["num_attention_heads"] == 0   # llama's config requires it
    assert budget["mixes"][0]["sizes"] == {"intermediate_size": 85, "num_attention_heads": 4, "hidden_size": 64}
    assert budget["mixes"][1]["sizes"]["num_attention_heads"] == 2
    assert budget["mixes"][2]["sizes"]["hidden_size"] == 56        # cut by about the FFN's fraction
    chosen = min(budget["mixes"], key=lambda m: m["importance_removed"])
    assert budget["chosen"] == chosen["mix"] and "importance" in budget["rule"]
    assert model.num_parameters() == prov["params"]["after"] == chosen["params"] <= budget["params"]
    cfg = model.config
    assert {"intermediate_size": cfg.intermediate_size, "num_attention_heads": cfg.num_attention_heads,
            "hidden_size": cfg.hidden_size} == chosen["sizes"]
    assert f"--params-fraction 0.8: chose {chosen['mix']} of ffn (" in out
    assert tree_hash(src) == before


# ---- scores from data, saved and reused ----------------------------------------------------------------------------

def test_width_from_data_then_reuse_the_scores_streaming(tiny_chat_model_dir, chat_data, tmp_path, capsys):
    """The CLI end to end on a chat model: scores from --data, then the saved importance.json reused (streaming)
    gives byte-identical weights; the output generates the same with and without the KV cache."""
    import transformers
    from safetensors.torch import load_file
    train, _ = chat_data
    before = tree_hash(tiny_chat_model_dir)
    code, out, err = run_cli(capsys, "width", tiny_chat_model_dir, "--data", train, "--samples", 8, "--ffn", "0.5",
                             "--heads", 2, "--hidden", 48, "-o", tmp_path / "a")
    assert code == 0, err
    assert "intermediate_size 128 -> 64; num_attention_heads 4 -> 2; hidden_size 64 -> 48" in out
    a = tmp_path / "a"
    record = json.loads((a / "importance.json").read_text())
    assert record["samples"] == 8 and record["tokens"] > 8 and (a / "importance.png").stat().st_size > 1000
    assert len(record["ffn"]) == 2 and len(record["kept"]["ffn"][0]) == 64 and len(record["kept"]["hidden"]) == 48
    prov = json.loads((a / "prunekit.json").read_text())
    assert prov["importance"]["samples"] == 8 and prov["streaming"] is False
    code, _, err = run_cli(capsys, "width", tiny_chat_model_dir, "--importance", a / "importance.json",
                           "--ffn", "0.5", "--heads", 2, "--hidden", 48, "--streaming", "-o", tmp_path / "b")
    assert code == 0, err
    wa, wb = load_file(a / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert json.loads((tmp_path / "b" / "prunekit.json").read_text())["streaming"] is True
    assert tree_hash(tiny_chat_model_dir) == before
    model = transformers.AutoModelForCausalLM.from_pretrained(a).eval()
    assert model.config.tie_word_embeddings and model.lm_head.weight.data_ptr() == \
        model.model.embed_tokens.weight.data_ptr()
    inputs = text_inputs()
    ref_seq, ref_logits = generate_logits(model, inputs, use_cache=False)
    seq, logits = generate_logits(model, inputs, use_cache=True)
    assert torch.equal(ref_seq, seq) and (ref_logits - logits).abs().max().item() <= 1e-4


def test_width_of_a_vlm_scored_on_image_rows(tiny_vlm_chat_model_dir, tmp_path):
    """A Qwen3-VL scored on easy-vqa image rows through its processor: the text tower's width is cut (deepstack
    mergers too), the processor travels with the output, and the output runs on a processed image row."""
    from prunekit.core.datasets import easy_vqa_to_messages
    from prunekit.core.samples import collate
    from prunekit.core.vision_data import load_processor, tokenize_rows_vlm
    from prunekit.core.data import load_messages
    src = tiny_vlm_chat_model_dir("qwen3_vl")
    easy_vqa_to_messages(tmp_path / "vqa.jsonl", limit=4)
    result = width(str(src), tmp_path / "out", tmp_path / "vqa.jsonl", ffn="0.5", heads=2, hidden=48, samples=4,
                   plot=False)
    record = json.loads((result.output / "importance.json").read_text())
    assert record["samples"] == 4 and record["tokens"] > 4 * 16          # every row has 16 image tokens
    assert len(record["kept"]["hidden"]) == 48 and len(record["kept"]["heads"][0]) == 2
    assert (result.output / "processor_config.json").is_file()
    model, _ = load_model(result.output)
    assert model.model.visual.deepstack_merger_list[0].linear_fc2.out_features == 48
    processor = load_processor(result.output)
    rows = load_messages(tmp_path / "vqa.jsonl")[:2]
    batch = collate(tokenize_rows_vlm(processor.tokenizer, rows, 256, result.output), 0)
    batch.pop("labels")
    with torch.no_grad():
        assert model(**batch).logits.isfinite().all()


# ---- VLMs: the vision blocks' MLP width (--vision-ffn) -------------------------------------------------------------

VD, VI, VB = 32, 64, 4   # the tiny vision towers: width, MLP size, blocks (conftest.tiny_config)
# Qwen2-VL states the size as an integer mlp_ratio x embed_dim (32): only 32 is below 64; the others take any size
VISION_TARGETS = {"qwen2_vl": "0.5", "qwen2_5_vl": "0.75", "qwen3_vl": "40"}
VISION_KEPT = {"qwen2_vl": 32, "qwen2_5_vl": 48, "qwen3_vl": 40}


def silence_vision(model, model_family, family, seed=1):
    """Zero the vision MLP channels --vision-ffn removes (a different random set per block): their rows (and biases)
    in the input projections, so their activation is exactly 0, and their columns in the output projection."""
    g = torch.Generator().manual_seed(seed)
    n = VI - VISION_KEPT[family]
    dropped = [sorted(torch.randperm(VI, generator=g)[:n].tolist()) for _ in range(VB)]
    with torch.no_grad():
        for b, d in enumerate(dropped):
            ins, out = vision_mlp(model, model_family, b)
            for lin in ins:
                lin.weight[d] = 0
                lin.bias[d] = 0
            out.weight[:, d] = 0
    return dropped


@pytest.fixture
def vision_silenced_dir(tmp_path):
    """family -> (tiny VLM whose text targets and vision MLP channels are zeroed, importance.json scored on an image
    row, (text dropped, vision dropped))."""
    def make(family):
        model_family = MODEL_FAMILIES[family]
        model = width_model(family)
        dropped = silence(model, model_family, family)
        vision = silence_vision(model, model_family, family)
        src = tmp_path / f"src-{family}"
        model.save_pretrained(src)
        scores = activation_importance(model, model_family, [vlm_inputs()])
        scores["heads"] = [[0.0 if h in dropped[1][i] else 1.0 for h in range(H)] for i in range(L)]
        record = importance_record(scores, WidthShape.of(model_family, model.config.to_dict()), data="test inputs")
        imp = tmp_path / f"importance-{family}.json"
        imp.write_text(json.dumps(record))
        return src, imp, (dropped, vision)
    return make


@pytest.mark.parametrize("family", VLM_FAMILIES)
@pytest.mark.parametrize("text", [False, True], ids=["vision-only", "with-text"])
def test_vision_ffn_removing_silenced_channels_is_exact(family, text, vision_silenced_dir, tmp_path):
    """Zeroed vision MLP channels removed (alone, and together with the text targets): identical logits on an image
    row and identical greedy tokens with and without the KV cache; the vision MLP really shapes those logits."""
    src, imp, (_, vision) = vision_silenced_dir(family)
    before = tree_hash(src)
    targets = TARGETS[family] if text else {}
    result = width(str(src), tmp_path / "out", importance=imp, streaming=False, plot=False,
                   vision_ffn=VISION_TARGETS[family], **targets)
    assert tree_hash(src) == before
    kept = json.loads((result.output / "importance.json").read_text())["kept"]
    assert kept["vision_ffn"] == [[c for c in range(VI) if c not in d] for d in vision]
    assert (kept["ffn"] is not None) == text
    original, _ = load_model(src)
    pruned, _ = load_model(result.output)
    for b in range(VB):
        ins, out = vision_mlp(pruned, MODEL_FAMILIES[family], b)
        assert out.in_features == VISION_KEPT[family] and all(x.out_features == VISION_KEPT[family] for x in ins)
    inputs = vlm_inputs()
    with torch.no_grad():
        ref, got = original(**inputs).logits, pruned(**inputs).logits
        _, out = vision_mlp(original, MODEL_FAMILIES[family], 0)   # a kept channel matters: a wrong cut shows
        out.weight[:, kept["vision_ffn"][0][0]] += torch.randn(VD, generator=torch.Generator().manual_seed(0))
        moved = original(**inputs).logits
    assert ref.abs().max().item() > 0.1 and (moved - ref).abs().max().item() > 1e-3
    assert (ref - got).abs().max().item() <= 1e-5
    for use_cache in (True, False):
        ref_seq, ref_logits = generate_logits(load_model(src)[0], inputs, use_cache)
        seq, logits = generate_logits(pruned, inputs, use_cache)
        assert torch.equal(ref_seq, seq)
        assert (ref_logits - logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_vision_ffn_config_rewritten_loads_and_streams(family, vision_silenced_dir, tmp_path):
    """config.json states the new vision MLP size the way the family's config does (Qwen2-VL: an integer
    mlp_ratio), AutoModelForImageTextToText loads it with the expected num_parameters(), prunekit.json records it,
    and streaming from importance.json writes the same tensors."""
    import transformers
    from safetensors.torch import load_file
    src, imp, _ = vision_silenced_dir(family)
    kw = dict(importance=imp, plot=False, vision_ffn=VISION_TARGETS[family])
    out = width(str(src), tmp_path / "out", streaming=False, **kw).output
    st = width(str(src), tmp_path / "st", streaming=True, **kw).output
    a, b = load_file(out / "model.safetensors"), load_file(st / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg == json.loads((st / "config.json").read_text())
    vc, before = cfg["vision_config"], json.loads((src / "config.json").read_text())["vision_config"]
    if family == "qwen2_vl":
        assert vc["mlp_ratio"] == 1 and isinstance(vc["mlp_ratio"], int) and vc["embed_dim"] == VD
    else:
        assert vc["intermediate_size"] == VISION_KEPT[family]
    assert {k: v for k, v in vc.items() if k not in ("mlp_ratio", "intermediate_size")} == \
        {k: v for k, v in before.items() if k not in ("mlp_ratio", "intermediate_size")}
    assert cfg["text_config"]["intermediate_size"] == I and cfg["text_config"]["hidden_size"] == D
    model = transformers.AutoModelForImageTextToText.from_pretrained(out)
    original = transformers.AutoModelForImageTextToText.from_pretrained(src)
    n_in = len(MODEL_FAMILIES[family].vision_mlp_in)
    removed = VB * (VI - VISION_KEPT[family]) * (n_in * (VD + 1) + VD)   # input rows + their biases, output columns
    want = original.num_parameters() - removed
    assert model.num_parameters() == want
    assert model.config.vision_config.to_dict().get("intermediate_size", VISION_KEPT[family]) == VISION_KEPT[family]
    prov = json.loads((out / "prunekit.json").read_text())
    assert prov["sizes"]["vision_intermediate_size"] == {"before": VI, "after": VISION_KEPT[family]}
    assert prov["sizes"]["intermediate_size"] == {"before": I, "after": I}
    assert prov["kept"]["vision_ffn"] == "importance.json: kept.vision_ffn"
    assert prov["params"] == {"before": original.num_parameters(), "after": want}
    assert prov["importance"]["sha256"]
    assert json.loads((st / "prunekit.json").read_text())["streaming"] is True


def test_vision_ffn_scored_on_image_rows_then_reused_streaming(tiny_vlm_chat_model_dir, tmp_path, capsys):
    """The CLI end to end on a Qwen2.5-VL with a processor: vision MLP scored on easy-vqa image rows (with the text
    FFN), importance.json + PNG hold the vision scores; reusing them with --streaming writes identical weights."""
    from safetensors.torch import load_file
    from prunekit.core.datasets import easy_vqa_to_messages
    src = tiny_vlm_chat_model_dir("qwen2_5_vl")
    before = tree_hash(src)
    easy_vqa_to_messages(tmp_path / "vqa.jsonl", limit=4)
    code, out, err = run_cli(capsys, "width", src, "--data", tmp_path / "vqa.jsonl", "--samples", 4,
                             "--ffn", "0.5", "--vision-ffn", "0.5", "-o", tmp_path / "a")
    assert code == 0, err
    assert "vision_intermediate_size 64 -> 32" in out
    a = tmp_path / "a"
    record = json.loads((a / "importance.json").read_text())
    assert record["vision_tokens"] == 4 * 64           # 4 images of 8x8 patches (16 merged tokens each)
    assert record["shape"]["vision_intermediate_size"] == VI and len(record["vision_ffn"]) == VB
    assert [len(k) for k in record["kept"]["vision_ffn"]] == [32] * VB and (a / "importance.png").is_file()
    assert json.loads((a / "prunekit.json").read_text())["importance"]["vision_tokens"] == 4 * 64
    code, _, err = run_cli(capsys, "width", src, "--importance", a / "importance.json", "--ffn", "0.5",
                           "--vision-ffn", "0.5", "--streaming", "-o", tmp_path / "b")
    assert code == 0, err
    wa, wb = load_file(a / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert tree_hash(src) == before


BAD_VISION = [
    ("llama", ["--vision-ffn", "0.5"], "--vision-ffn: llama is a text-only model (no vision tower to cut)"),
    ("qwen2_5_vl", ["--vision-ffn", "0"], "--vision-ffn: 0 must keep at least 1 vision MLP channel"),
    ("qwen3_vl", ["--vision-ffn", "0.0"], "--vision-ffn: 0.0 must be a fraction above 0 and at most 1"),
    ("qwen3_vl", ["--vision-ffn", "100"], "--vision-ffn: 100 is more vision MLP channels than the 64 each vision "
                                          "block has"),
    ("qwen2_vl", ["--vision-ffn", "0.75"], "--vision-ffn: 48 cannot be stated by qwen2_vl's vision config, whose "
                                           "MLP size is mlp_ratio (an integer in transformers) x embed_dim 32: give "
                                           "one of 32 (0.5), 64 (1)"),
    ("qwen2_vl", ["--vision-ffn", "64"], "nothing to remove: give --ffn below 128, --heads below 4, --hidden below "
                                         "64 and/or --vision-ffn below 64"),
    ("qwen2_vl", ["--vision-ffn", "0.5", "--params-fraction", "0.8"], "--vision-ffn: give it with --ffn"),
]


@pytest.mark.parametrize("family,flags,message", BAD + BAD_VISION)
def test_bad_width_targets(family, flags, message, tiny_model_dir, tmp_path, capsys):
    src = tmp_path / "model"
    shutil.copytree(tiny_model_dir(family), src)
    before = tree_hash(src)
    capsys.readouterr()   # building the fixture may print progress
    code, _, err = run_cli(capsys, "width", src, *flags, "--data", tmp_path / "none.jsonl", "-o", tmp_path / "out")
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert tree_hash(src) == before and not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]   # no temp dir left beside OUT either


def test_bad_vision_ffn_sources(tiny_vlm_chat_model_dir, chat_data, tmp_path, capsys):
    """Scoring --vision-ffn needs image rows: calibration data without them, or an importance.json scored without
    them, is a one-line error with the input untouched and nothing written."""
    train, _ = chat_data
    src = tiny_vlm_chat_model_dir("qwen3_vl")
    before = tree_hash(src)
    model_family = MODEL_FAMILIES["qwen3_vl"]
    model, _ = load_model(src)
    scores = activation_importance(model, model_family, [text_inputs()])
    imp = tmp_path / "text-only.json"
    imp.write_text(json.dumps(importance_record(scores, WidthShape.of(model_family, model.config.to_dict()))))
    capsys.readouterr()
    cases = [(["--data", train, "--samples", 4], "--vision-ffn: --data "),
             (["--importance", imp], "has no vision MLP scores (scored on data without image rows)")]
    for flags, message in cases:
        code, _, err = run_cli(capsys, "width", src, "--vision-ffn", "0.5", *flags, "-o", tmp_path / "out")
        assert code == 2 and message in err and err.count("\n") == 1, (flags, err)
        assert not (tmp_path / "out").exists()
    assert "has no image rows (in the 4 taken) to score the vision MLP channels on" in \
        run_cli(capsys, "width", src, "--vision-ffn", "0.5", "--data", train, "--samples", 4, "-o",
                tmp_path / "out")[2]
    assert tree_hash(src) == before
