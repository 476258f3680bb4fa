"""Recipe: reduce the text model's KV heads (GQA conversion), optionally grouping heads by similarity."""
from __future__ import annotations

from pathlib import Path

from prunekit import PrunekitError
from prunekit.core.loading import load_model, load_tokenizer, quiet_transformers
from prunekit.core.surgery import KVCut, kv_similarity_orders
from prunekit.stages.common import SurgeryInput, SurgeryResult, write_surgery_output

GROUPINGS = ("mean", "similarity")


def calibration_batches(tokenizer, data: str | Path, max_samples: int = 64, max_length: int = 256):
    """Chat-templated conversations or plain text rows from a JSON/JSONL file, one sample per batch (no padding)."""
    from prunekit.core.data import is_text_row, load_messages
    rows = load_messages(data)[:max_samples]
    for row in rows:
        # a text row is calibrated on as training reads it: no chat template
        text = row["text"] if is_text_row(row) else tokenizer.apply_chat_template(row["messages"], tokenize=False)
        ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"]
        yield {"input_ids": ids}


def kv_cut(model: str, out: str | Path, kv_heads: int, grouping: str = "mean", data: str | Path | None = None, *,
           overwrite: bool = False, streaming: bool | None = None, allow_pickle: bool = False,
           trust_remote_code: bool = False, max_samples: int = 64) -> SurgeryResult:
    if grouping not in GROUPINGS:
        raise PrunekitError(f"--grouping: {grouping!r} is not one of {', '.join(GROUPINGS)}")
    src = SurgeryInput.open(model, allow_pickle=allow_pickle)
    KVCut(src.adapter, src.config, kv_heads)  # validate the head counts before any loading
    if grouping == "mean":
        surgery = KVCut(src.adapter, src.config, kv_heads)
        return write_surgery_output(src, surgery, out, overwrite=overwrite, streaming=streaming,
                                    trust_remote_code=trust_remote_code, stage="kv_cut")
    if data is None:
        raise PrunekitError("--grouping similarity needs calibration data: --data FILE (messages JSON/JSONL)")
    if streaming:
        raise PrunekitError("--grouping similarity runs the model on --data, so it cannot stream; use --grouping mean")
    with quiet_transformers():
        loaded, adapter = load_model(src.path, dtype="auto", trust_remote_code=trust_remote_code)
        tokenizer = load_tokenizer(src.path, trust_remote_code=trust_remote_code)
    orders = kv_similarity_orders(loaded, adapter, calibration_batches(tokenizer, data, max_samples), kv_heads)
    surgery = KVCut(src.adapter, src.config, kv_heads, head_order=orders)
    return write_surgery_output(src, surgery, out, overwrite=overwrite, streaming=False, model=loaded,
                                trust_remote_code=trust_remote_code, stage="kv_cut")
