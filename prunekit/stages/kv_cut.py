"""Recipe: reduce the text model's KV heads (GQA conversion), optionally grouping heads by similarity and
calibrating the merged heads layer by layer on data (`prunekit.core.kv_calibration`)."""
from __future__ import annotations

from pathlib import Path

from prunekit import PrunekitError
from prunekit.core import locks
from prunekit.core.loading import check_output_dir, load_model, load_tokenizer, quiet_transformers
from prunekit.core.kv_calibration import CalibrationSettings, calibrate_kv_cut
from prunekit.core.surgery import KVCut, apply_to_model, kv_similarity_orders
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


def padded_calibration_batches(tokenizer, data: str | Path, max_samples: int = 64, max_length: int = 256,
                                batch_size: int | None = None) -> list[dict]:
    """Conversations (chat-templated) or text rows spread evenly over a data file, right-padded into batches of
    similar length (input_ids + attention_mask). Default batch size: eight batches of at most 32 rows, so the
    calibration's held-out batches (every fourth) exist and a GPU is not starved by tiny batches."""
    from prunekit.core.data import load_messages, tokenize_rows
    from prunekit.core.samples import collate, pad_id
    rows = load_messages(data)
    rows = rows[:: max(1, len(rows) // max_samples)][:max_samples]
    samples = sorted(tokenize_rows(tokenizer, rows, max_length), key=lambda s: len(s["input_ids"]))
    batch_size = batch_size or min(32, max(1, -(-len(samples) // 8)))
    batches = []
    for i in range(0, len(samples), batch_size):
        batch = collate(samples[i:i + batch_size], pad_id(tokenizer))
        batch.pop("labels")
        batches.append(batch)
    return batches


def kv_cut(model: str, out: str | Path, kv_heads: int, grouping: str = "mean", data: str | Path | None = None, *,
           overwrite: bool = False, streaming: bool | None = None, allow_pickle: bool = False,
           trust_remote_code: bool = False, max_samples: int = 64, calibrate: bool = False,
           calibration: CalibrationSettings | None = None, device: str = "cpu") -> SurgeryResult:
    """`calibrate`: fit the merged K/V projections (and o_proj) layer by layer on `data` so every layer's attention
    output matches the original's; `calibration` sets steps / lr / o_proj refit / ridge. `device` runs the
    similarity pass and the calibration there (e.g. cuda); the output is written from the host."""
    if grouping not in GROUPINGS:
        raise PrunekitError(f"--grouping: {grouping!r} is not one of {', '.join(GROUPINGS)}")
    src = SurgeryInput.open(model, allow_pickle=allow_pickle)
    KVCut(src.family, src.config, kv_heads)  # validate the head counts before any loading
    if calibrate and data is None:
        raise PrunekitError("--calibrate needs calibration data: --data FILE (messages JSON/JSONL)")
    if calibrate and streaming:
        raise PrunekitError("--calibrate runs the model on --data, so it cannot stream; drop --streaming")
    if max_samples < 1:
        raise PrunekitError(f"--samples: {max_samples} must be at least 1")
    if calibrate and calibration is not None and calibration.steps < 0:
        raise PrunekitError(f"--calibration-steps: {calibration.steps} must be 0 or more")
    if not calibrate and calibration is not None and calibration.sequential:
        raise PrunekitError("--sequential-calibration: it sets how --calibrate fits the layers; add --calibrate")
    if not calibrate and calibration is not None and not calibration.align:
        raise PrunekitError("--no-align: it sets how --calibrate fits the layers; add --calibrate")
    if grouping == "mean" and not calibrate:
        surgery = KVCut(src.family, src.config, kv_heads)
        return write_surgery_output(src, surgery, out, overwrite=overwrite, streaming=streaming,
                                    trust_remote_code=trust_remote_code, stage="kv_cut")
    if data is None:
        raise PrunekitError("--grouping similarity needs calibration data: --data FILE (messages JSON/JSONL)")
    if streaming:
        raise PrunekitError("--grouping similarity runs the model on --data, so it cannot stream; use --grouping mean")
    check_output_dir(Path(out), [src.path], overwrite)  # refuse a bad OUT before minutes of calibration
    with locks.hold((Path(out), "-o")):  # one writer per OUT, from before the calibration
        with quiet_transformers():
            loaded, family = load_model(src.path, dtype="auto", trust_remote_code=trust_remote_code)
            tokenizer = load_tokenizer(src.path, trust_remote_code=trust_remote_code)
        loaded.to(device)
        orders = None
        if grouping == "similarity":
            batches = ({k: v.to(device) for k, v in b.items()} for b in calibration_batches(tokenizer, data,
                                                                                             max_samples))
            orders = kv_similarity_orders(loaded, family, batches, kv_heads)
        surgery = KVCut(src.family, src.config, kv_heads, head_order=orders)
        built = None
        if calibrate:
            built = apply_to_model(loaded, surgery).to(device)
            query_orders = {i: surgery.query_head_order(i) for i in range(family.num_text_layers(src.config))}
            batches = [{k: v.to(device) for k, v in b.items()}
                       for b in padded_calibration_batches(tokenizer, data, max_samples)]
            from tqdm.auto import tqdm
            with tqdm(total=len(query_orders), desc="calibrate KV cut", unit="layer", dynamic_ncols=True) as bar:
                def progress(_layer, stats):   # minutes a layer on CPU: say where it is and how well it fits
                    bar.set_postfix(error=f"{stats['check_relative_error_before']:.3f}->"
                                          f"{stats['check_relative_error_after']:.3f}", refresh=False)
                    bar.update()
                surgery.calibration = calibrate_kv_cut(loaded, built, family, batches, calibration,
                                                       query_orders=query_orders, progress=progress)
            built.to("cpu")
        loaded.to("cpu")
        return write_surgery_output(src, surgery, out, overwrite=overwrite, streaming=False, model=loaded, built=built,
                                    trust_remote_code=trust_remote_code, stage="kv_cut")
