"""Recipe: the one-command demo on the embedded default model (SmolLM2-135M-Instruct, chatterbot data).

inspect -> training-free layer importance -> prune the least important layers -> KV-cut 3 -> 1 (MQA, heads grouped
by similarity), with eval loss / token_acc and a sample answer at every step. No recovery training yet: the numbers
show what surgery alone costs, which recovery SFT and distillation then win back.
"""
from __future__ import annotations

import time
from pathlib import Path

from prunekit.core import report
from prunekit.core.datasets import chatterbot_to_messages
from prunekit.core.data import load_messages
from prunekit.core.evaluate import evaluate, greedy_reply, tokenize_rows
from prunekit.core.importance import block_influence
from prunekit.core.loading import load_model, load_tokenizer, quiet_transformers, resolve_model
from prunekit.stages.kv_cut import kv_cut
from prunekit.stages.prune import prune

QUESTION = "What is the capital of France?"


def _step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.time()


def _measure(path: Path, samples, name: str) -> dict:
    with quiet_transformers():
        model, _ = load_model(path)
        tokenizer = load_tokenizer(path)
    metrics = evaluate(model, samples, tokenizer.pad_token_id or 0)
    reply = greedy_reply(model, tokenizer, QUESTION)
    info = report.describe(path)
    print(f"{name}: eval loss {metrics['loss']:.3f}, token_acc {metrics['token_acc']:.3f}  |  Q: {QUESTION}  A: {reply!r}")
    return {"name": name, "info": info, **metrics, "reply": reply}


def demo(model: str = "smollm2", out: str | Path = "prunekit-demo", n_drop: int = 4, n_eval: int = 64,
         overwrite: bool = True) -> list[dict]:
    start = time.time()
    out = Path(out).resolve()
    t = _step("data: chatterbot-corpus English Q/A -> messages JSONL")
    counts = chatterbot_to_messages(out / "data" / "train.jsonl", val_path=out / "data" / "val.jsonl")
    print(f"{counts['train']} train / {counts['val']} val conversations in {out / 'data'} ({time.time() - t:.0f}s)")

    t = _step(f"inspect {model}")
    base = resolve_model(model)
    print(report.format_inspect(report.describe(base)))
    with quiet_transformers():
        tokenizer = load_tokenizer(base)
    val_rows = load_messages(out / "data" / "val.jsonl")[:n_eval]
    samples = tokenize_rows(tokenizer, val_rows, max_length=256)
    rows = [_measure(base, samples, "original")]

    t = _step("importance: block influence (1 - cos(h_in, h_out)) on 32 validation conversations")
    with quiet_transformers():
        model_obj, adapter = load_model(base)
    batches = [{"input_ids": __import__("torch").tensor([s["input_ids"]])} for s in samples[:32]]
    scores = block_influence(model_obj, adapter, batches)
    n_layers = len(scores)
    # the first and last layers are almost always key layers; rank the interior ones
    ranked = sorted(range(1, n_layers - 1), key=lambda i: scores[i])
    drop = sorted(ranked[:n_drop])
    print("layer  " + " ".join(f"{i:>5}" for i in range(n_layers)))
    print("score  " + " ".join(f"{s:5.3f}" for s in scores))
    print(f"least important interior layers: {drop} ({time.time() - t:.0f}s)")
    del model_obj

    t = _step(f"prune text layers {drop}")
    pruned = prune(str(base), out / "pruned", drop_text=drop, overwrite=overwrite)
    print(report.compare_table(pruned.before, pruned.after))
    rows.append(_measure(pruned.output, samples, "pruned"))

    t = _step("kv-cut: 3 KV heads -> 1 (MQA), heads grouped by K/V similarity on the training data")
    cut = kv_cut(str(pruned.output), out / "pruned-kv1", kv_heads=1, grouping="similarity",
                 data=out / "data" / "train.jsonl", overwrite=overwrite, max_samples=32)
    print(report.compare_table(cut.before, cut.after))
    rows.append(_measure(cut.output, samples, "pruned + kv-cut"))

    _step("summary (no recovery training yet: `prunekit sft` / `distill` heal these numbers)")
    first = rows[0]
    table_rows = []
    for r in rows:
        info = r["info"]
        table_rows.append([r["name"], f"{info['params']['total'] / 1e6:.1f}M",
                           f"{info['params']['total'] / first['info']['params']['total'] * 100:.0f}%",
                           info["text_layers"], info["kv_heads"], f"{info['kv_cache_bytes_per_token_bf16']:,}",
                           f"{r['loss']:.3f}", f"{r['token_acc']:.3f}",
                           f"{r['token_acc'] / first['token_acc'] * 100:.0f}%"])
    print(report.table(table_rows, ["model", "params", "size", "layers", "KV heads", "KV B/token",
                                    "eval loss", "token_acc", "acc vs orig"]))
    print(f"\noutputs: {out / 'pruned'}, {out / 'pruned-kv1'}  (plain HF directories with prunekit.json)")
    print(f"demo finished in {time.time() - start:.0f}s")
    return rows
