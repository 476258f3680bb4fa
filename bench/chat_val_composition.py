"""What the outcome benchmark's chat val measures: its scored tokens by chatterbot category, and whether the original
recites the reference answers.

The outcome recipe reads the chat val as token_acc over the answer tokens of the first 128 rows of `val.jsonl` (the
chatterbot questions never trained on). This script scores the same rows category by category (chatterbot's file,
the part of the row id before the colon) for the original SmolLM2-135M-Instruct and for the model the recipe's cut
leaves before any recovery (the knockout plan's first 8 layers removed). It also asks the original every val
question greedily and checks its answer against the references: verbatim, or sharing a run of 6 words.

    python bench/chat_val_composition.py [--data bench/out/outcome/data]   # CPU, ~3 minutes
        -> bench/results/chat_val_composition.json
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
EVAL_ROWS = 128   # bench/outcome_smollm2.py --eval-samples: the rows its chat val scores
RUN_WORDS = 6


def category(row: dict) -> str:
    return row["id"].split(":")[0]


def score_by_category(model, tokenizer, path: str, rows: list[dict]) -> dict:
    """{category: {rows, tokens, token_acc}} over the answer tokens: the project's eval (prunekit.core.evaluate) on
    each category's rows, tokenised and masked as the pipeline's chat val is."""
    from prunekit.core.evaluate import evaluate
    from prunekit.core.samples import load_samples, pad_id
    by_category = collections.defaultdict(list)
    for row in rows:
        by_category[category(row)].append(row)
    table = {}
    with tempfile.TemporaryDirectory() as tmp:
        for cat, part in by_category.items():
            file = Path(tmp) / f"{cat}.jsonl"
            file.write_text("".join(json.dumps(r) + "\n" for r in part))
            m = evaluate(model, load_samples(tokenizer, file, model=path, max_length=512), pad_id(tokenizer))
            table[cat] = {"rows": len(part), "tokens": int(m["tokens"]), "token_acc": m["token_acc"]}
    total = sum(t["tokens"] for t in table.values())

    def pooled(cats):   # token-weighted, as one eval over those rows would give
        n = sum(table[c]["tokens"] for c in cats)
        return {"tokens": n, "token_acc": round(sum(table[c]["token_acc"] * table[c]["tokens"] for c in cats) / n, 4)}
    order = sorted(table, key=lambda c: -table[c]["tokens"])
    result = {"all": pooled(order), "other": pooled([c for c in order if c != "coding"])}
    for t in table.values():
        t.update(token_share=round(t["tokens"] / total, 4), token_acc=round(t["token_acc"], 4))
    return {**result, "coding": table.get("coding"), "by_category": {c: table[c] for c in order}}


def greedy_recall(model, tokenizer, rows: list[dict]) -> dict:
    """Every distinct question of the val (one-turn rows), answered greedily (≤ 40 new tokens)."""
    from prunekit.core.evaluate import greedy_reply
    answers = collections.defaultdict(list)
    for row in rows:
        if len(row["messages"]) == 2:
            answers[row["messages"][0]["content"]].append(row["messages"][1]["content"].strip())
    verbatim, shared, examples = 0, 0, []
    for question, refs in answers.items():
        text = greedy_reply(model, tokenizer, question, max_new_tokens=40)
        words = text.split()
        runs = {tuple(words[i:i + RUN_WORDS]) for i in range(len(words) - RUN_WORDS + 1)}
        if any(text.startswith(r) or (len(text) > 10 and r.startswith(text)) for r in refs):
            verbatim += 1
        hit = [r for r in refs if any(tuple(r.split()[i:i + RUN_WORDS]) in runs
                                      for i in range(len(r.split()) - RUN_WORDS + 1))]
        if hit:
            shared += 1
            examples.append({"question": question, "answer": text[:160], "reference": hit[0][:160]})
    return {"questions": len(answers), "verbatim": verbatim, f"shares_{RUN_WORDS}_words": shared,
            "examples": examples}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT / "bench" / "out" / "outcome" / "data")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "chat_val_composition.json")
    args = ap.parse_args(argv)
    from bench import outcome_smollm2 as outcome
    from prunekit.core.loading import load_model, load_tokenizer, resolve_model
    from prunekit.stages.prune import prune
    start = time.time()
    outcome.prepare_data(args.data)
    rows = [json.loads(line) for line in (args.data / "val.jsonl").read_text().splitlines() if line.strip()]
    original = str(resolve_model("smollm2"))
    cut_layers = [int(e["id"].split(":")[1]) for e in json.loads(outcome.DEFAULT_PLAN.read_text())["order"][:8]]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        pruned = Path(tmp) / "pruned"
        prune(original, pruned, drop_text=cut_layers, overwrite=True)
        for name, path in (("original", original), ("pruned_before_recovery", str(pruned))):
            model, _ = load_model(path, device="cpu")
            tokenizer = load_tokenizer(path)
            model.eval()
            results[name] = score_by_category(model, tokenizer, path, rows[:EVAL_ROWS])
            if name == "original":
                results[name]["greedy_recall"] = greedy_recall(model, tokenizer, rows)
    report = {"benchmark": "chat_val_composition", "date": time.strftime("%Y-%m-%d"), "machine": "cpu",
              "data": f"{args.data}/val.jsonl (first {EVAL_ROWS} rows scored; every question asked greedily)",
              "cut": f"the knockout plan's first 8 layers ({', '.join(map(str, cut_layers))}), no recovery",
              "results": results, "seconds": round(time.time() - start, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".tmp")
    tmp_out.write_text(json.dumps(report, indent=1) + "\n")
    tmp_out.replace(args.out)
    for name, r in results.items():
        print(f"{name}: chat val token_acc {r['all']['token_acc']:.3f}; coding {r['coding']['token_share']:.0%} of "
              f"the tokens at {r['coding']['token_acc']:.3f}, the rest {r['other']['token_acc']:.3f}")
    g = results["original"]["greedy_recall"]
    print(f"original, greedy: {g['verbatim']} of {g['questions']} answers verbatim, {g[f'shares_{RUN_WORDS}_words']} "
          f"share {RUN_WORDS} words in a row with a reference; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
