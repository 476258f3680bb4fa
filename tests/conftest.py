"""Shared fixtures: tiny members of every supported family, built from config and saved as HF directories."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

VOCAB = 128
IMAGE_TOKEN, VISION_START, VISION_END = 120, 121, 122
TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256, initializer_range=0.2,
            tie_word_embeddings=False)
MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}  # sums to head_dim / 2


def tiny_config(family: str):
    import transformers as tf
    if family == "llama":
        return tf.LlamaConfig(**TEXT)
    if family == "mistral":
        return tf.MistralConfig(**TEXT, sliding_window=None)
    if family == "qwen2":  # sliding window on the upper layers, so layer_types is not uniform
        return tf.Qwen2Config(**TEXT, use_sliding_window=True, sliding_window=6, max_window_layers=2)
    if family == "qwen3":
        return tf.Qwen3Config(**TEXT)
    vlm_ids = dict(image_token_id=IMAGE_TOKEN, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
                   tie_word_embeddings=False)
    text = {**TEXT, "rope_parameters": MROPE}
    text.pop("tie_word_embeddings")
    if family == "qwen2_vl":
        vision = dict(depth=4, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2, initializer_range=0.2)
        return tf.Qwen2VLConfig(text_config=text, vision_config=vision, **vlm_ids)
    if family == "qwen2_5_vl":
        vision = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1, 3],
                      initializer_range=0.2)
        return tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **vlm_ids)
    if family == "qwen3_vl":
        vision = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                      deepstack_visual_indexes=[1], initializer_range=0.2)
        return tf.Qwen3VLConfig(text_config=text, vision_config=vision, **vlm_ids)
    raise ValueError(family)


TEXT_FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]
VLM_FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
FAMILIES = TEXT_FAMILIES + VLM_FAMILIES


def build_tiny(family: str, seed: int = 0):
    from prunekit.core.loading import model_from_config
    torch.manual_seed(seed)
    config = tiny_config(family)
    config._attn_implementation = "eager"
    return model_from_config(config, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """family -> directory of a saved tiny model (built once per session)."""
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            d = tmp_path_factory.mktemp(f"tiny-{family}")
            build_tiny(family).save_pretrained(d)
            cache[family] = d
        return cache[family]
    return get


def vlm_inputs(batch: int = 1, text_before: int = 5, text_after: int = 4, seed: int = 0) -> dict:
    """Model inputs with one 8x8-pixel-grid image (4x4 patches -> 4 merged image tokens) between text tokens."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.tensor([[1, 4, 4]] * batch)
    patches = int(grid[0].prod())
    pixel_values = torch.randn(batch * patches, 3 * 2 * 4 * 4, generator=g)
    n_image = patches // 4
    ids = torch.cat([torch.randint(0, 100, (batch, text_before), generator=g),
                     torch.full((batch, 1), VISION_START), torch.full((batch, n_image), IMAGE_TOKEN),
                     torch.full((batch, 1), VISION_END), torch.randint(0, 100, (batch, text_after), generator=g)], 1)
    mm = (ids == IMAGE_TOKEN).int()
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixel_values,
                image_grid_thw=grid, mm_token_type_ids=mm)


def text_inputs(batch: int = 2, length: int = 12, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (batch, length), generator=g)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids))


def inputs_for(family: str) -> dict:
    """The forward inputs of a tiny model of `family`: an image row for VLMs, token rows otherwise."""
    return vlm_inputs() if family in VLM_FAMILIES else text_inputs()


def generate_logits(model, inputs, use_cache):
    """Greedy tokens and the logits of 4 generated steps (with or without the KV cache)."""
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=use_cache, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, torch.stack(out.logits)


def assert_same_outputs(original, pruned, inputs, atol: float = 1e-5) -> torch.Tensor:
    """The pruned model computes what the original does: logits within `atol`, and the same greedy tokens (with
    logits within `atol`) with and without the KV cache. Returns the original's logits."""
    with torch.no_grad():
        ref, got = original(**inputs).logits, pruned(**inputs).logits
    assert (ref - got).abs().max().item() <= atol
    for use_cache in (True, False):
        ref_seq, ref_logits = generate_logits(original, inputs, use_cache)
        seq, logits = generate_logits(pruned, inputs, use_cache)
        assert torch.equal(ref_seq, seq)
        assert (ref_logits - logits).abs().max().item() <= atol
    return ref


def tree_hash(path: Path) -> str:
    """A hash of every file's name and bytes under `path` (to prove an input was not modified)."""
    h = hashlib.sha256()
    for f in sorted(Path(path).rglob("*")):
        h.update(str(f.relative_to(path)).encode())
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="session")
def smollm2_dir():
    from prunekit.core.loading import resolve_model
    return resolve_model("smollm2")


def save_tiny_chat_model(d: Path, tokenizer_dir: Path, layers: int, seed: int) -> Path:
    """A tiny random llama with `layers` layers that speaks SmolLM2's tokenizer and chat template, saved to `d`."""
    import shutil
    import transformers
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{**TEXT, "vocab_size": 49152, "num_hidden_layers": layers,
                                         "initializer_range": 0.02, "tie_word_embeddings": True})
    transformers.LlamaForCausalLM(config).save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy2(tokenizer_dir / f, d / f)
    return d


@pytest.fixture(scope="session")
def tiny_chat_model_dir(tmp_path_factory, smollm2_dir):
    """A 2-layer tiny chat model (for fast training tests)."""
    return save_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"), smollm2_dir, layers=2, seed=0)


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory):
    """chatterbot conversations: (train.jsonl, val.jsonl)."""
    from prunekit.core.datasets import chatterbot_to_messages
    d = tmp_path_factory.mktemp("chat-data")
    chatterbot_to_messages(d / "train.jsonl", val_path=d / "val.jsonl")
    return d / "train.jsonl", d / "val.jsonl"


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (a Ray Train fit costs ~40 s; starting Ray is extra)."""
    import ray
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray


# ---- a tiny Qwen-VL chat model with a real (offline-built) processor -------------------------------------------

VLM_SPECIAL_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# Qwen2-VL's template shape: ChatML, a default system turn, image items as <|vision_start|><|image_pad|><|vision_end|>
QWEN_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' or 'image' in item or 'image_url' in item %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'video' or 'video' in item %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in item %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VLM_PROCESSORS = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor"}


def build_tiny_vlm_processor(tokenizer_dir):
    """A Qwen2-VL processor from SmolLM2's tokenizer (plus the vision special tokens) and a small image processor:
    patch 4, merge 2, temporal patch 2, 16x16..32x32 pixels, so a 64x64 easy-vqa image becomes a 32x32 image of
    8x8 patches = 16 image tokens. Without torchvision (needed by the video processor) it has no video processor."""
    import transformers as tf
    from prunekit.core.vision_data import without_video
    tok = tf.AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": VLM_SPECIAL_TOKENS})
    kw = dict(patch_size=4, merge_size=2, temporal_patch_size=2,
              size={"shortest_edge": 16 * 16, "longest_edge": 32 * 32})
    if tf.is_torchvision_available():
        return tf.Qwen2VLProcessor(tf.Qwen2VLImageProcessor(**kw), tok, tf.Qwen2VLVideoProcessor(**kw),
                                   chat_template=QWEN_VL_CHAT_TEMPLATE)
    return without_video(tf.Qwen2VLProcessor)(tf.Qwen2VLImageProcessorPil(**kw), tok,
                                              chat_template=QWEN_VL_CHAT_TEMPLATE)


def build_tiny_vlm_chat(family: str, out_dir: Path, tokenizer_dir) -> Path:
    """A tiny random `family` VLM (tiny_config) speaking the processor's tokenizer, saved with the processor."""
    import transformers as tf
    from prunekit.core.loading import model_from_config
    from prunekit.core.vision_data import without_video
    processor = build_tiny_vlm_processor(tokenizer_dir)
    if family != "qwen2_vl":  # same processor, saved under the family's own processor class
        cls = getattr(tf, VLM_PROCESSORS[family])
        processor = (cls(processor.image_processor, processor.tokenizer, processor.video_processor,
                         chat_template=QWEN_VL_CHAT_TEMPLATE) if hasattr(processor, "video_processor")
                     else without_video(cls)(processor.image_processor, processor.tokenizer,
                                             chat_template=QWEN_VL_CHAT_TEMPLATE))
    tok = processor.tokenizer
    config = tiny_config(family)
    config.text_config.vocab_size = len(tok)
    config.text_config.bos_token_id = config.text_config.pad_token_id = None
    config.text_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    for field, token in [("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
                         ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>")]:
        setattr(config, field, tok.convert_tokens_to_ids(token))
    torch.manual_seed(0)
    config._attn_implementation = "eager"
    model = model_from_config(config, dtype=torch.float32)
    ip = processor.image_processor
    width = 3 * ip.temporal_patch_size * ip.patch_size ** 2  # the processor's pixel_values rows
    patch_in = model.model.visual.patch_embed.proj.weight[0].numel()
    assert patch_in == width, f"vision patch embedding takes {patch_in} values per patch, the processor gives {width}"
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_vlm_chat_model_dir(tmp_path_factory, smollm2_dir):
    """family -> directory of a tiny random VLM saved together with a working processor (SmolLM2 tokenizer)."""
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = build_tiny_vlm_chat(family, tmp_path_factory.mktemp(f"tiny-vlm-chat-{family}"),
                                                smollm2_dir)
        return cache[family]
    return get


@pytest.fixture(scope="session")
def tiny_vlm_chat_dir(tiny_vlm_chat_model_dir):
    """A tiny random Qwen2-VL with its processor (SmolLM2 tokenizer + vision tokens, small image processor)."""
    return tiny_vlm_chat_model_dir("qwen2_vl")
