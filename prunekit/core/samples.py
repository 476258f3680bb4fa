"""Samples from data files: the one place that dispatches between text (conversations and text rows,
`prunekit.core.data`) and rows with images (the model's processor, `prunekit.core.vision_data`).

`load_samples` reads a data file into tokenised samples the way every stage trains and evaluates on them; `collate`
batches samples of either kind; `pad_id` is the one rule for the padding token.
"""
from __future__ import annotations

from pathlib import Path

from prunekit import PrunekitError
from prunekit.core import data as text_data


def pad_id(tokenizer) -> int:
    """The tokenizer's pad token, else its EOS (padding is masked out, so any real id works), else 0."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id[0] if isinstance(token_id, (list, tuple)) else int(token_id)
    return 0


def collate(batch: list[dict], pad_id: int, width: int | None = None) -> dict:  # noqa: F811 (pad_id: the argument)
    """A padded batch: samples with images (`pixel_values`) through the processor's collate, others as text
    (padded to at least `width` tokens when given)."""
    if any("pixel_values" in s for s in batch):
        from prunekit.core.vision_data import collate_vlm
        return collate_vlm(batch, pad_id)
    return text_data.collate(batch, pad_id, width)


def check_no_images(rows: list, path, model) -> None:
    """A text-only model cannot see images: rows that carry them would train on their `<image>` tags as text."""
    for n, row in enumerate(rows, 1):
        if row.get("images"):
            raise PrunekitError(f"{path} row {n}: has images, but {model} is a text-only model (drop the images "
                                f"from the data or train a vision-language model)")


def has_labels(sample: dict) -> bool:
    """Some token after the first is a target (the first can never be predicted)."""
    return any(label != text_data.IGNORE_INDEX for label in sample["labels"][1:])


def tokenize(tokenizer, rows: list[dict], max_length: int, *, model: str | Path, is_vlm: bool = False,
             trust_remote_code: bool = False, source=None) -> list[dict]:
    """Rows -> samples (input_ids, labels; image tensors for a VLM's image rows), right-truncated to max_length."""
    if is_vlm:  # rows with images go through the model's processor
        from prunekit.core.vision_data import tokenize_rows_vlm
        return tokenize_rows_vlm(tokenizer, rows, max_length, str(model), trust_remote_code, source=source)
    return text_data.tokenize_rows(tokenizer, rows, max_length)


def load_samples(tokenizer, path: str | Path, *, model: str | Path, max_length: int, packing: bool = False,
                 is_vlm: bool = False, trust_remote_code: bool = False, limit: int | None = None) -> list[dict]:
    """The first `limit` rows of a data file as training/eval samples: rows without a target after truncation are
    dropped; `packing` packs text samples into rows of max_length. A text-only model refuses rows with images.
    A text model's samples come from the on-disk cache when this file was tokenised the same way before
    (`prunekit.core.sample_cache`)."""
    def build():
        return _load_samples(tokenizer, path, model=model, max_length=max_length, packing=packing, is_vlm=is_vlm,
                             trust_remote_code=trust_remote_code, limit=limit)
    if is_vlm:
        return build()
    from prunekit.core import sample_cache
    key = sample_cache.key_for(path, tokenizer, max_length=max_length, packing=packing, limit=limit)
    return sample_cache.cached_samples(key, build)


def _load_samples(tokenizer, path, *, model, max_length, packing, is_vlm, trust_remote_code, limit) -> list[dict]:
    rows = text_data.load_messages(path)
    if limit:
        rows = rows[:limit]
    if not is_vlm:
        check_no_images(rows, path, model)
    samples = [s for s in tokenize(tokenizer, rows, max_length, model=model, is_vlm=is_vlm,
                                   trust_remote_code=trust_remote_code, source=path) if has_labels(s)]
    if packing and any("pixel_values" in s for s in samples):
        raise PrunekitError(f"{path}: packing does not support image rows; set packing: false")
    return text_data.pack_sequences(samples, max_length) if packing else samples


def config_samples(cfg, tokenizer, is_vlm: bool) -> tuple[list, list]:
    """A training config's (train, val) samples: val capped at eval_max_samples, both packed when `packing`."""
    def load(path, limit=None):
        return load_samples(tokenizer, path, model=cfg.model, max_length=cfg.max_length, packing=cfg.packing,
                            is_vlm=is_vlm, trust_remote_code=cfg.trust_remote_code, limit=limit)
    return load(cfg.train), (load(cfg.val, cfg.eval_max_samples) if cfg.val else [])
