"""Image rows through a VLM processor: tokenisation, labels, collation, and a forward/backward of a tiny Qwen-VL."""
import math

import pytest
import torch

from prunekit import PrunekitError
from prunekit.core.data import IGNORE_INDEX, DataError, load_messages, save_messages, tokenize_conversation
from prunekit.core.samples import collate
from prunekit.core.datasets import easy_vqa_to_messages
from prunekit.core.loading import load_model
from prunekit.core.vision_data import (collate_vlm, image_token_id, load_processor, tokenize_rows_vlm,
                                       tokenize_vlm_conversation)
from prunekit.engine.objectives import SFTObjective


@pytest.fixture(scope="module")
def vqa_rows(tmp_path_factory):
    d = tmp_path_factory.mktemp("easy-vqa")
    easy_vqa_to_messages(d / "train.jsonl", limit=6)
    return load_messages(d / "train.jsonl")


@pytest.fixture(scope="module")
def processor(tiny_vlm_chat_dir):
    return load_processor(tiny_vlm_chat_dir)


def supervised(sample):
    return [t for t, label in zip(sample["input_ids"], sample["labels"]) if label != IGNORE_INDEX]


def test_processor_matches_model(processor, tiny_vlm_chat_dir):
    model, model_family = load_model(tiny_vlm_chat_dir)
    assert model_family.is_vlm
    tok = processor.tokenizer
    assert model.config.image_token_id == image_token_id(processor) == tok.convert_tokens_to_ids("<|image_pad|>")
    assert model.config.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert model.config.text_config.vocab_size == len(tok)
    ip = processor.image_processor
    assert model.model.visual.patch_embed.proj.weight[0].numel() == 3 * ip.temporal_patch_size * ip.patch_size ** 2


def test_tokenize_easy_vqa(processor, vqa_rows):
    tok, merge = processor.tokenizer, processor.image_processor.merge_size
    for row in vqa_rows:
        s = tokenize_vlm_conversation(processor, row["messages"], row["images"], max_length=512)
        n = len(s["input_ids"])
        assert len(s["labels"]) == len(s["mm_token_type_ids"]) == n
        grid = s["image_grid_thw"]
        assert grid.shape == (1, 3) and s["pixel_values"].shape == (int(grid.prod()), 3 * 2 * 4 * 4)
        assert s["pixel_values"].dtype == torch.float32 and torch.isfinite(s["pixel_values"]).all()
        # one image: prod(grid) / merge^2 image tokens, flagged exactly where the image pad id is
        assert sum(s["mm_token_type_ids"]) == int(grid.prod()) // merge ** 2 == 16
        assert s["mm_token_type_ids"] == [int(t == image_token_id(processor)) for t in s["input_ids"]]
        # only the answer (and its end token) is supervised, as one span
        answer = row["messages"][1]["content"]
        assert tok.decode(supervised(s)) == answer + "<|im_end|>"
        idx = [i for i, label in enumerate(s["labels"]) if label != IGNORE_INDEX]
        assert idx == list(range(idx[0], idx[-1] + 1)) and idx[-1] >= n - 2
        # segment-wise tokenisation equals the processor's on the whole text (same image-pad expansion)
        text = tok.decode(s["input_ids"]).replace("<|image_pad|>" * 16, "<|image_pad|>")
        from PIL import Image
        whole = processor(text=[text], images=[Image.open(row["images"][0]).convert("RGB")], return_tensors="pt",
                          add_special_tokens=False)
        assert whole["input_ids"][0].tolist() == s["input_ids"]
        assert torch.equal(whole["pixel_values"], s["pixel_values"])


def test_multi_image_multi_turn(processor, vqa_rows):
    a, b, c = (r["images"][0] for r in vqa_rows[:3])
    messages = [{"role": "system", "content": "Look carefully."},
                {"role": "user", "content": "<image>first, <image>second: same shape?"},
                {"role": "assistant", "content": "no"},
                {"role": "user", "content": "and this one<image>?"},
                {"role": "assistant", "content": "circle"}]
    s = tokenize_vlm_conversation(processor, messages, [a, b, c], max_length=512)
    assert s["image_grid_thw"].shape == (3, 3)
    assert sum(s["mm_token_type_ids"]) == 48 and s["pixel_values"].shape[0] == int(s["image_grid_thw"].prod(-1).sum())
    text = processor.tokenizer.decode(supervised(s))
    assert text == "no<|im_end|>circle<|im_end|>"
    # text tokens outside images are those of the text path (with the image block where the tag was)
    plain = tokenize_conversation(processor.tokenizer, [{"role": m["role"], "content": m["content"].replace(
        "<image>", "<|vision_start|>" + "<|image_pad|>" * 16 + "<|vision_end|>")} for m in messages], 512)
    # SmolLM2's template vs the Qwen-VL one differ only in the default system turn, absent here
    assert plain["input_ids"] == s["input_ids"] and plain["labels"] == s["labels"]


def test_truncation(processor, vqa_rows):
    row = vqa_rows[0]
    full = tokenize_vlm_conversation(processor, row["messages"], row["images"], max_length=512)
    n = len(full["input_ids"])
    s = tokenize_vlm_conversation(processor, row["messages"], row["images"], max_length=n - 1)
    assert s["input_ids"] == full["input_ids"][:-1] and s["labels"] == full["labels"][:-1]
    assert torch.equal(s["pixel_values"], full["pixel_values"])
    last_image = max(i for i, v in enumerate(full["mm_token_type_ids"]) if v)
    with pytest.raises(DataError, match=f"max_length {last_image} would cut through image .*{row['images'][0]}"):
        tokenize_vlm_conversation(processor, row["messages"], row["images"], max_length=last_image)
    s = tokenize_vlm_conversation(processor, row["messages"], row["images"], max_length=last_image + 1)
    assert sum(s["mm_token_type_ids"]) == 16


def test_errors(processor, vqa_rows, tmp_path):
    msgs, images = vqa_rows[0]["messages"], vqa_rows[0]["images"]
    missing = str(tmp_path / "nope.png")
    with pytest.raises(DataError, match=f"image {missing}: not found"):
        tokenize_vlm_conversation(processor, msgs, [missing], 512)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match=f"image {bad}: cannot read it") as e:
        tokenize_vlm_conversation(processor, msgs, [str(bad)], 512)
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match=r"1 <image> tag\(s\) in the messages but 2 image\(s\)") as e:
        tokenize_vlm_conversation(processor, msgs, images * 2, 512)
    assert images[0] in str(e.value)
    no_tag = [{"role": "user", "content": "what?"}, msgs[1]]
    with pytest.raises(DataError, match=r"0 <image> tag\(s\) in the messages but 1 image\(s\)"):
        tokenize_vlm_conversation(processor, no_tag, images, 512)
    with pytest.raises(DataError, match="assistant turn"):
        tokenize_vlm_conversation(processor, [msgs[0], {"role": "assistant", "content": "<image>x"}], images * 2, 512)


def test_collate_vlm(processor, vqa_rows):
    long_q = {**vqa_rows[1], "messages": [{"role": "user", "content": "<image>" + "please look closely. " * 5
                                           + vqa_rows[1]["messages"][0]["content"][7:]}, vqa_rows[1]["messages"][1]]}
    samples = [tokenize_vlm_conversation(processor, r["messages"], r["images"], 512) for r in (vqa_rows[0], long_q)]
    lengths = [len(s["input_ids"]) for s in samples]
    assert lengths[0] < lengths[1]
    b = collate(samples, pad_id=0)  # core.samples.collate dispatches on pixel_values
    assert set(b) == {"input_ids", "labels", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"}
    ref = collate_vlm(samples, pad_id=0)
    assert all(torch.equal(b[k], ref[k]) for k in b)
    width = max(lengths)
    for k in ("input_ids", "labels", "attention_mask", "mm_token_type_ids"):
        assert b[k].shape == (2, width) and b[k].dtype == torch.long
    assert b["attention_mask"].sum(1).tolist() == lengths
    pad = slice(lengths[0], None)
    assert (b["input_ids"][0, pad] == 0).all() and (b["labels"][0, pad] == IGNORE_INDEX).all()
    assert (b["mm_token_type_ids"][0, pad] == 0).all()
    assert b["image_grid_thw"].shape == (2, 3)
    assert b["pixel_values"].shape == (int(b["image_grid_thw"].prod(-1).sum()), 96)
    assert torch.equal(b["pixel_values"], torch.cat([s["pixel_values"] for s in samples]))
    # a text-only sample may share the batch: all-zero mm_token_type_ids, no pixel rows
    text = tokenize_conversation(processor.tokenizer, vqa_rows[2]["messages"], 512)
    mixed = collate([text, samples[0]], pad_id=0)
    assert mixed["mm_token_type_ids"][0].sum() == 0
    assert torch.equal(mixed["pixel_values"], samples[0]["pixel_values"])
    # text-only batches keep the text collate
    assert set(collate([text], pad_id=0)) == {"input_ids", "labels", "attention_mask"}


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_forward_backward(family, tiny_vlm_chat_model_dir, vqa_rows):
    d = tiny_vlm_chat_model_dir(family)
    processor = load_processor(d)
    samples = [tokenize_vlm_conversation(processor, r["messages"], r["images"], 512) for r in vqa_rows[:2]]
    batch = collate(samples, pad_id=processor.tokenizer.pad_token_id or 0)
    model, _ = load_model(d)
    model.train()
    out = SFTObjective()(model, batch)
    n_expected = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert int(out["n_tokens"]) == n_expected > 0
    loss = out["loss_sum"].item()
    assert math.isfinite(loss) and loss > 0
    out["loss_sum"].backward()
    grads = [p.grad for p in model.model.visual.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    assert all(torch.isfinite(g).all() for g in grads)
    # the same batch through the model's own loss agrees (mean over the same supervised tokens)
    with torch.no_grad():
        ref = model(**{k: v for k, v in batch.items()}, use_cache=False).loss
    assert torch.allclose(out["loss_sum"].detach() / n_expected, ref, rtol=1e-4)


def test_load_processor_without_processor_files(tiny_chat_model_dir):
    with pytest.raises(PrunekitError, match="no processor files"):
        load_processor(tiny_chat_model_dir)


def test_rows_and_training_samples(tiny_vlm_chat_dir, vqa_rows, tmp_path):
    from prunekit.core.samples import load_samples
    text_row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = tmp_path / "mixed.jsonl"
    save_messages(path, vqa_rows[:3] + [text_row])
    tokenizer = load_processor(tiny_vlm_chat_dir).tokenizer
    samples = load_samples(tokenizer, path, model=tiny_vlm_chat_dir, max_length=512, is_vlm=True)
    assert len(samples) == 4 and ["pixel_values" in s for s in samples] == [True] * 3 + [False]
    with pytest.raises(PrunekitError, match="packing"):
        load_samples(tokenizer, path, model=tiny_vlm_chat_dir, max_length=512, packing=True, is_vlm=True)
    bad = {**vqa_rows[0], "images": vqa_rows[0]["images"] * 2}
    with pytest.raises(DataError, match=r"rows\.jsonl row 2: 1 <image> tag"):
        tokenize_rows_vlm(None, [vqa_rows[0], bad], 512, tiny_vlm_chat_dir, source="rows.jsonl")
