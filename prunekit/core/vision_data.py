"""Image rows (ms-swift ``{"messages": [...], "images": [paths]}``) through a VLM's processor.

Qwen-VL convention: the chat template renders each image as ``<|vision_start|><|image_pad|><|vision_end|>``;
the processor replaces the single ``<|image_pad|>`` by ``prod(grid_thw) / merge_size**2`` copies and returns the
image's patches as rows of ``pixel_values``. A batch concatenates every image's patches and grids in order, and
``mm_token_type_ids`` (1 at image tokens) lets the model build its 3D (M-RoPE) positions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from prunekit import PrunekitError
from prunekit.core.data import IGNORE_INDEX, DataError

IMAGE_TAG = "<image>"  # ms-swift's placeholder in message content


# ----------------------------------------------------------------------------- processor


def without_video(cls):
    """Processor class `cls` (Qwen-VL style) without its video processor: that one needs torchvision even to
    load, and images never use it. The class keeps `cls`'s name, so what it saves loads as `cls`."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # ProcessorMixin pairs positional sub-processors with this signature's names, so the None is dropped
        cls.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__})


def _processor_class_name(model_dir: Path) -> str | None:
    for name in ("processor_config.json", "preprocessor_config.json"):
        f = model_dir / name
        if f.is_file():
            cls = json.loads(f.read_text()).get("processor_class")
            if cls:
                return cls
    cfg = model_dir / "config.json"
    if cfg.is_file():
        from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
        return PROCESSOR_MAPPING_NAMES.get(json.loads(cfg.read_text()).get("model_type"))
    return None


def load_processor(model_dir, trust_remote_code: bool = False):
    """The model directory's processor (``AutoProcessor``), which must handle images.

    Without torchvision, transformers cannot load a Qwen-VL processor at all (its video processor requires
    it), nor one saved without a video processor; images need neither, so the same processor class is then
    loaded without its video processor.
    """
    import transformers
    model_dir = Path(model_dir)
    files = ("processor_config.json", "preprocessor_config.json")
    if not any((model_dir / f).is_file() for f in files):
        raise PrunekitError(f"{model_dir}: no processor files ({' / '.join(files)}); an image dataset needs the "
                            "VLM's processor saved in the model directory")
    name = _processor_class_name(model_dir)
    cls = getattr(transformers, name, None) if name else None
    has_video = cls is not None and "video_processor" in cls.get_attributes()
    if has_video and not transformers.is_torchvision_available():  # AutoProcessor would fail: don't even try
        return _check_processor(without_video(cls).from_pretrained(model_dir), model_dir)
    try:
        processor = transformers.AutoProcessor.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except OSError as e:  # e.g. a directory saved without a video processor
        if not has_video:
            raise
        try:
            processor = without_video(cls).from_pretrained(model_dir)
        except Exception:
            raise e from None
    return _check_processor(processor, model_dir)


def _check_processor(processor, model_dir: Path):
    if getattr(processor, "image_processor", None) is None or getattr(processor, "tokenizer", None) is None:
        raise PrunekitError(f"{model_dir}: {type(processor).__name__} is not an image processor with a tokenizer")
    return processor


# ----------------------------------------------------------------------------- tokenising


def _chat_template(processor) -> str:
    t = getattr(processor, "chat_template", None) or getattr(processor.tokenizer, "chat_template", None)
    if isinstance(t, dict):
        t = t.get("default")
    if not t:
        raise DataError("the processor has no chat template")
    return t


def _content_items(text: str) -> list[dict]:
    """ms-swift content -> chat-template content items: each <image> tag becomes an image item, in place."""
    items: list[dict] = []
    for k, part in enumerate(text.split(IMAGE_TAG)):
        if k:
            items.append({"type": "image"})
        if part:
            items.append({"type": "text", "text": part})
    return items or [{"type": "text", "text": ""}]


def _load_image(path: str):
    from PIL import Image
    if not Path(path).is_file():
        raise DataError(f"image {path}: not found")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ... for bad files
        raise DataError(f"image {path}: cannot read it ({' '.join(str(e).split())})") from None


def image_token_id(processor) -> int:
    tid = getattr(processor, "image_token_id", None)
    return tid if tid is not None else processor.tokenizer.convert_tokens_to_ids(processor.image_token)


def tokenize_vlm_conversation(processor, messages: list[dict], image_paths: Sequence[str], max_length: int) -> dict:
    """Tokenise a conversation with images through the processor; only assistant turns are labelled.

    ``<image>`` tags in user/system content become image items for the chat template (one per entry of
    ``image_paths``, in order). Assistant spans are found as in :func:`prunekit.core.data.tokenize_conversation`
    (rendering prefixes as text), and each segment of the text is run through the processor with the images
    whose placeholders it holds, so image pads expand exactly as the processor expands them and label ranges
    follow from the segments' token counts. Right-truncated to ``max_length``, but never through an image.

    Returns ``input_ids`` and ``labels`` (lists, ``-100`` where unsupervised), ``mm_token_type_ids`` (list, 1 at
    image tokens) and, when there are images, ``pixel_values`` ``[n_patches, D]`` and ``image_grid_thw``
    ``[n_images, 3]`` tensors. Problems raise :class:`DataError` with a one-line message.
    """
    paths = [str(p) for p in image_paths or []]
    n_tags = 0
    for i, m in enumerate(messages):
        tags = m["content"].count(IMAGE_TAG)
        if tags and m["role"] == "assistant":
            raise DataError(f"messages[{i}] is an assistant turn with an {IMAGE_TAG} tag; images go in user turns")
        n_tags += tags
    if n_tags != len(paths):
        raise DataError(f"{n_tags} {IMAGE_TAG} tag(s) in the messages but {len(paths)} image(s): {paths}")
    images = [_load_image(p) for p in paths]
    conversation = [{"role": m["role"], "content": _content_items(m["content"])} for m in messages]
    template = _chat_template(processor)
    tokenizer = processor.tokenizer

    def render(msgs: list[dict], add_generation_prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)

    full = render(conversation)
    placeholder = processor.image_token
    if full.count(placeholder) != len(images):
        raise DataError(f"the chat template rendered {full.count(placeholder)} {placeholder} placeholder(s) for "
                        f"{len(images)} image(s): {paths}")
    cuts = [0]  # alternating boundaries: [prompt, response, prompt, response, ..., tail]
    for i, m in enumerate(conversation):
        if m["role"] != "assistant":
            continue
        prompt = render(conversation[:i], add_generation_prompt=True)
        turn = render(conversation[: i + 1]).rstrip()
        if not (full.startswith(prompt) and full.startswith(turn) and cuts[-1] <= len(prompt) <= len(turn)):
            raise DataError(f"chat template does not render messages[{i}] as a prefix of the whole conversation; "
                            "cannot locate the assistant turn")
        cuts += [len(prompt), len(turn)]
    cuts.append(len(full))

    input_ids: list[int] = []
    labels: list[int] = []
    pixel_values, grids = [], []
    used = 0
    for k, (a, b) in enumerate(zip(cuts, cuts[1:])):
        if a == b:
            continue
        segment = full[a:b]
        n = segment.count(placeholder)
        if n and k % 2 == 1:
            raise DataError("the chat template put an image inside an assistant turn")
        out = processor(text=[segment], images=images[used:used + n] or None, return_tensors="pt",
                        add_special_tokens=False)
        if n:
            pixel_values.append(out["pixel_values"])
            grids.append(out["image_grid_thw"])
        used += n
        ids = out["input_ids"][0].tolist()
        input_ids += ids
        labels += ids if k % 2 == 1 else [IGNORE_INDEX] * len(ids)

    image_id = image_token_id(processor)
    mm = [int(t == image_id) for t in input_ids]
    if len(input_ids) > max_length and any(mm[max_length:]):
        kept = sum(mm[:max_length])  # image tokens before the cut; the image holding the next one is cut
        merge = getattr(processor.image_processor, "merge_size", 1)
        per_image = (torch.cat(grids).prod(-1) // merge ** 2).tolist()
        cut = next((j for j in range(len(per_image)) if sum(per_image[: j + 1]) > kept), len(paths) - 1)
        raise DataError(f"max_length {max_length} would cut through image {paths[cut]} (the conversation is "
                        f"{len(input_ids)} tokens; raise max_length or drop the row)")
    sample = {"input_ids": input_ids[:max_length], "labels": labels[:max_length], "mm_token_type_ids": mm[:max_length]}
    if images:
        sample["pixel_values"] = torch.cat(pixel_values)
        sample["image_grid_thw"] = torch.cat(grids)
    return sample


def needs_processor(row: dict) -> bool:
    """Whether a row has images (or ``<image>`` tags, which then must be matched by images)."""
    if "text" in row:  # plain-text rows carry no images
        return False
    return bool(row.get("images")) or any(IMAGE_TAG in m["content"] for m in row["messages"])


def tokenize_rows_vlm(tokenizer, rows: list[dict], max_length: int, model_dir, trust_remote_code: bool = False,
                      source: str | Path = "") -> list[dict]:
    """Tokenise rows for a VLM: rows with images through ``model_dir``'s processor (loaded only if some row has
    images), the others (conversations or plain text) with ``tokenize_row``. Errors name ``source`` (the data file) and the
    row number, from 1."""
    from prunekit.core.data import tokenize_row
    processor = None
    samples = []
    for n, row in enumerate(rows, 1):
        if not needs_processor(row):
            samples.append(tokenize_row(tokenizer, row, max_length))
            continue
        if processor is None:
            processor = load_processor(model_dir, trust_remote_code=trust_remote_code)
        try:
            samples.append(tokenize_vlm_conversation(processor, row["messages"], row.get("images") or [], max_length))
        except DataError as e:
            raise DataError(f"{source} row {n}: {e}" if source else f"row {n}: {e}") from None
    return samples


# ----------------------------------------------------------------------------- batching


def collate_vlm(batch: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``input_ids`` (with ``pad_id``), ``labels`` (-100), ``attention_mask`` and ``mm_token_type_ids``
    (0) into ``[B, L]`` long tensors, and concatenate the samples' ``pixel_values`` and ``image_grid_thw`` in
    batch order (Qwen-VL convention: the model matches them to the image tokens in order). Text-only samples may
    be mixed in (their ``mm_token_type_ids`` are all 0). Packed samples are not supported."""
    if any("position_ids" in s for s in batch):
        raise DataError("packed samples cannot carry images; turn packing off for image data")
    width = max(len(s["input_ids"]) for s in batch)

    def pad(rows: list, value: int) -> torch.Tensor:
        return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows], dtype=torch.long)

    out = {
        "input_ids": pad([s["input_ids"] for s in batch], pad_id),
        "labels": pad([s["labels"] for s in batch], IGNORE_INDEX),
        "attention_mask": pad([[1] * len(s["input_ids"]) for s in batch], 0),
        "mm_token_type_ids": pad([s.get("mm_token_type_ids") or [0] * len(s["input_ids"]) for s in batch], 0),
    }
    with_images = [s for s in batch if "pixel_values" in s]
    if with_images:
        out["pixel_values"] = torch.cat([torch.as_tensor(s["pixel_values"]) for s in with_images])
        out["image_grid_thw"] = torch.cat([torch.as_tensor(s["image_grid_thw"]) for s in with_images]).long()
    return out
