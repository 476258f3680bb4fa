"""The outcome benchmark (issue 12): how much of SmolLM2-135M-Instruct survives prunekit, measured on held-out text.

SmolLM2-135M-Instruct -> 8 of its 30 layers removed (the first 8 of the committed knockout plan: >= 25% of the
decoder-layer parameters) and KV heads 3 -> 1 (calibrated), both at once, then recovered by one distillation from
the original on a corpus the original wrote itself (`prunekit data generate`) mixed with the shipped general train
text and 1,024 rows of Python source (`--code-rows`), end to end on one GPU: `recipes/outcome.yaml` run by `prunekit
pipeline` with `launcher: local`. Every model is measured on held-out general English text (the general eval split,
never trained on) and on the chat val (chatterbot questions never trained on; with `--chat-repeats` the chatterbot
train split is in the mix, and the chat val is in-domain).

Phases, each resumable (re-running the same command continues; a call killed at a time limit loses nothing that
finished): data (chatterbot + general text files; `--prepare` writes them here for an offline box) -> corpus
(teacher-sampled, then the recovery mix: corpus + general train text + Python source) -> pipeline -> gap (the final
model and the original on rows it trained on and on fresh samples of the same kind: memorised data or too small a
student?) -> compare_data (the pruned model distilled for `--compare-steps` steps on each recovery data source:
chatterbot, the shipped general text, the teacher corpus, the mix) -> compare_kv (the mean and the calibrated KV cut
from the aligned heads and from their mean, of the pruned model — for 3 -> 1 similarity grouping equals the mean —
right after the cut and after `--compare-steps` distillation steps) -> report: bench/results/outcome_smollm2.json +
.png. The 20-minute goal counts data + corpus + pipeline.

    python bench/outcome_smollm2.py --prepare --data .gpu/data            # here: the data files, for the GPU box
    python bench/outcome_smollm2.py --gpu --data .gpu/data --out /root/outcome   # there (resumes)
    python bench/outcome_smollm2.py --smoke                               # CPU check of every phase, tiny sizes
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import sys
import textwrap
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
DEFAULT_PLAN = ROOT / "bench" / "results" / "knockout_smollm2" / "plan.json"   # the recipe's: its first 8 layers
PHASES = ("corpus", "pipeline", "gap", "compare_kv", "compare_data")
# compare_data's recovery data sources (the mixes run first; with --chat-repeats also the mix + chatterbot)
DATA_SOURCES = ("chatterbot", "general_text", "teacher_sampled")
GAP_ROWS = 256   # rows per set of the generalisation-gap measurement
CODE_CHUNK_CHARS = 1500   # --code-rows: ~430 SmolLM2 tokens of Python, a 512-token row
EAGER = {"compile": False, "compile_mode": "default"}   # compile_mode other than default needs compile
FALLBACKS = [EAGER, {**EAGER, "packing": False}, {**EAGER, "packing": False, "beta": 0.5}]


class Clock:
    """Wall time per phase across calls: a phase's seconds are saved every few seconds, so a call killed at its
    time limit still counts the time it spent."""

    def __init__(self, path: Path, settings: dict):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {"phases": {}, "done": [], "calls": 0}
        self.data["calls"] += 1
        self.data["settings"] = settings
        self.phase, self.t0, self.base = None, 0.0, 0.0
        self._save()
        threading.Thread(target=self._beat, daemon=True).start()

    def _save(self):
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)

    def _beat(self):
        while True:
            time.sleep(5)
            if self.phase:
                self.data["phases"][self.phase] = self.base + time.time() - self.t0
                self._save()

    def run(self, phase: str, fn):
        if phase in self.data["done"]:
            print(f"== {phase}: done earlier ({self.data['phases'][phase]:.0f}s)", flush=True)
            return
        print(f"\n== {phase}", flush=True)
        self.phase, self.t0, self.base = phase, time.time(), self.data["phases"].get(phase, 0.0)
        fn()
        self.data["phases"][phase] = self.base + time.time() - self.t0
        self.data["done"].append(phase)
        self.phase = None
        self._save()
        print(f"== {phase} finished ({self.data['phases'][phase]:.0f}s in all)", flush=True)


def prepare_data(data: Path) -> None:
    from prunekit.core.datasets import chatterbot_to_messages
    from prunekit.core.text import far_text, general_text
    data.mkdir(parents=True, exist_ok=True)
    if not (data / "val.jsonl").is_file():   # a fifth of the distinct questions: ~180 rows, none asked in train
        chatterbot_to_messages(data / "chat-train.jsonl", val_path=data / "val.jsonl", val_fraction=0.2)
    if not (data / "general-eval.jsonl").is_file():
        general_text(data / "general-train.jsonl", data / "general-eval.jsonl")
    if not (data / "far-eval.jsonl").is_file():   # held-out English from a source nothing here trains on
        far_text(data / "far-eval.jsonl")


def write_recovery_mix(data: Path, corpus: Path, out: Path) -> Path:
    """The recipe's train file for the probes: a teacher corpus (.jsonl or .jsonl.gz) + the general train text."""
    import gzip
    raw = corpus.read_bytes()
    text = (data / "general-train.jsonl").read_bytes()
    out.write_bytes((gzip.decompress(raw) if corpus.suffix == ".gz" else raw) + text)
    return check_val_held_out(data, out)


def data_sources(args) -> tuple[str, ...]:
    """compare_data's labels: DATA_SOURCES, then the recipe's mix named by its parts (and with --chat-repeats the mix
    without chatterbot before it)."""
    mix = ("teacher_sampled+general_text" + ("+python_code" if args.code_rows else "")
           + ("+code_answers" if args.code_answers else ""))
    return DATA_SOURCES + (mix,) + ((mix + "+chatterbot",) if args.chat_repeats else ())


def python_code_rows(out: Path, rows: int) -> dict:
    """The first `rows` text rows of Python source: this interpreter's standard library (PSF licence), its public
    top-level modules in name order, as `prunekit data text --keep-lines --chunk-chars 1500 --limit ROWS` writes them
    (whole lines, indentation kept; ~430 SmolLM2 tokens a row)."""
    import sysconfig
    from prunekit.core.text import text_files_to_rows
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("[!_]*.py"))   # no private stubs (__hello__.py)
    text_files_to_rows(files, out, chunk_chars=CODE_CHUNK_CHARS, keep_lines=True, limit=rows)
    kept = out.read_text(encoding="utf-8").splitlines()
    return {"rows": len(kept), "chars": sum(len(json.loads(line)["text"]) for line in kept),
            "python": sys.version.split()[0]}


def code_prompts(out: Path) -> Path:
    """The seed prompts that ask for code (prunekit.core.seed_prompts.programming_prompts, 216) as a prompts file."""
    from prunekit.core.data import save_messages
    from prunekit.core.seed_prompts import programming_prompts
    save_messages(out, [{"messages": [{"role": "user", "content": p}]} for p in programming_prompts()])
    return out


def check_val_held_out(data: Path, train: Path) -> Path:
    """Stop when the chat val shares rows or questions with a training file (a corpus sampled from another split's
    prompts, or data prepared before the split kept questions apart): its numbers would be fitting, not recovery."""
    from prunekit.core.data import load_messages, val_overlap
    same, asked = val_overlap(load_messages(data / "val.jsonl"), load_messages(train))
    if same or asked:
        raise SystemExit(f"{data / 'val.jsonl'}: {same} rows are in {train} and {asked} ask its questions: prepare "
                         f"the data again (--prepare into an empty --data) and regenerate the corpus from it")
    return train


def measure(model: str, data: Path, args) -> dict:
    from prunekit.stages.evaluate import evaluate_file
    from prunekit.pipeline import model_facts
    dev = "cuda" if args.gpu else "cpu"
    gen = evaluate_file(model, data / "general-eval.jsonl", args.eval_text_samples, 512, device=dev)
    chat = evaluate_file(model, data / "val.jsonl", args.eval_samples, 512, device=dev)
    far = ({"far_text": evaluate_file(model, data / "far-eval.jsonl", args.eval_text_samples, 512, device=dev)}
           if (data / "far-eval.jsonl").is_file() else {})   # data prepared before session 11 has none
    return {"facts": model_facts(Path(model)), "eval_text": gen, "eval": chat, **far,
            "eval_by_kind": chat_by_kind(model, data, args)}


def chat_by_kind(model: str, data: Path, args) -> dict:
    """The chat val's scored rows split in two: chatterbot's `coding` rows, whose code answers are 61% of the scored
    tokens (bench/results/chat_val_composition.json), and the other categories' short chat answers."""
    import tempfile
    from prunekit.stages.evaluate import evaluate_file
    rows = [line for line in (data / "val.jsonl").read_text().splitlines() if line.strip()][:args.eval_samples]
    parts = {"coding": [r for r in rows if json.loads(r)["id"].startswith("coding:")]}
    parts["other"] = [r for r in rows if r not in parts["coding"]]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind, part in parts.items():
            if part:
                path = Path(tmp) / f"val-{kind}.jsonl"
                path.write_text("\n".join(part) + "\n")
                out[kind] = evaluate_file(model, path, None, 512, device="cuda" if args.gpu else "cpu")
    return out


def distill(model: str, train: Path, data: Path, out: Path, name: str, steps: int, args, **extra) -> str:
    """One distillation run from the original with the recipe's distill settings (and `extra`), in this process."""
    import yaml
    from prunekit.config import load_config
    from prunekit.core.loading import resolve_model
    from prunekit.stages import training
    settings = yaml.safe_load(recipe_file(args).read_text())["stages"]["distill"]
    settings.update(args.fallback)
    cfg = load_config("distill", None, {**settings, **sizes(args)["distill"], "model": model, "teacher": str(
        resolve_model("smollm2")), "train": str(train), "val": str(data / "val.jsonl"), "output_dir": str(out),
        "name": name, "storage_path": str(out.parent / "runs"), "max_steps": steps, "launcher": "local",
        "overwrite": True, "ray.use_gpu": args.gpu, "wandb.mode": "disabled", **extra})
    return str(training.distill(cfg).output)


def sizes(args) -> dict:
    """The recipe as written on a GPU; tiny on --smoke (a CPU check of the code path, not a measurement)."""
    if not args.smoke:
        return {"distill": {}, "pipeline": {}, "kv": {}}  # compare_kv: the recipe's kv_cut settings
    small = {"max_length": 64, "batch_size": 2, "bf16": False, **EAGER, "eval_interval": 2,
             "save_interval": 2, "eval_max_samples": 4, "loss_chunk_size": 1024}
    return {"distill": small,
            "pipeline": {"stages.distill": small, "rounds": [{"prune": {"plan": str(args.plan)}}],
                         "finish": [{"kv_cut": {"kv_heads": 1, "grouping": "mean", "calibrate": True,
                                                "samples": 4, "calibration_steps": 2}}, {"distill": {"max_steps": 2}}],
                         "eval_samples": 4, "eval_text_samples": 4, "min_token_acc_ratio": 0.0},
            "kv": {"samples": 4, "calibration_steps": 2}}


DEFAULT_ROWS = 32768
DEFAULT_PROSE_ROWS = 16384   # the teacher's continuations of general-train openings in the recipe's mix (session 21)
DEFAULT_CODE_ROWS = 1024     # rows of Python source in the recipe's mix (session 25)


DEFAULT_RECIPE = ROOT / "recipes" / "outcome.yaml"


def recipe_file(args) -> Path:
    """The recipe this run follows: recipes/outcome.yaml, or a variant of it (`--recipe`)."""
    return (getattr(args, "recipe", None) or DEFAULT_RECIPE).resolve()


def final_distill(recipe: dict) -> dict:
    """The settings of the recipe's last finish distillation (the one that heals the KV cut)."""
    step = [s for s in recipe["finish"] if isinstance(s, dict) and "distill" in s][-1]
    if step["distill"] is None:
        step["distill"] = {}
    return step["distill"]


def report_path(args) -> Path:
    width = f"_width_ffn{args.width_ffn}" if args.width_ffn else ""
    if recipe_file(args) != DEFAULT_RECIPE.resolve():   # a variant recipe: its own report
        width = f"_{recipe_file(args).stem}{width}"
    if args.plan.resolve() != DEFAULT_PLAN.resolve():   # another layer choice: its own report, named after the plan
        width += f"_{args.plan.stem}"
    extra = (f"_prose{args.prose_rows}" if args.prose_rows != DEFAULT_PROSE_ROWS and not args.smoke else "") + (
        f"_free{args.free_rows}" if args.free_rows else "")
    extra += (f"_rows{args.rows}" if args.rows != DEFAULT_ROWS and not args.smoke else "") + (
        f"_noise{args.input_noise:g}" if args.input_noise else "") + (
        f"_hidden{args.hidden_weight:g}" if args.hidden_weight else "") + (
        f"_steps{args.max_steps}" if args.max_steps and not args.smoke else "") + (
        f"_chat{args.chat_repeats}" if args.chat_repeats else "") + (
        f"_code{args.code_rows}" if args.code_rows != DEFAULT_CODE_ROWS and not args.smoke else "") + (
        f"_answers{args.code_answers}" if args.code_answers and not args.smoke else "")
    return RESULTS / f"outcome_smollm2{width}{extra}{'_smoke' if args.smoke else ''}.json"


def reuse_corpus(report_json: Path, source: Path, corpus: Path, results: dict) -> None:
    """The teacher corpus of an earlier run: its file, and its statistics and generation minutes from that run's
    report, recorded as corpus_from (the corpus phase's own clock then holds the copy, counted on top)."""
    import gzip
    earlier = json.loads(report_json.read_text())
    raw = gzip.decompress(source.read_bytes()) if source.suffix == ".gz" else source.read_bytes()
    rows = raw.count(b"\n")
    if rows != earlier["corpus"]["rows"]:
        raise SystemExit(f"--corpus-from: {source} has {rows} rows, {report_json} generated "
                         f"{earlier['corpus']['rows']}")
    tmp = corpus.with_suffix(".tmp")
    tmp.write_bytes(raw)
    os.replace(tmp, corpus)
    results["corpus"] = earlier["corpus"]
    results["corpus_from"] = {"report": str(report_json), "file": source.name, "date": earlier.get("date"),
                              "command": earlier["command"], "minutes": earlier["minutes"]["corpus"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="every phase on CPU with tiny sizes (writes *_smoke.json)")
    ap.add_argument("--prepare", action="store_true", help="only write the data files to --data")
    ap.add_argument("--data", type=Path, default=None, help="data files (default OUT/data)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "outcome")
    ap.add_argument("--rows", type=int, default=DEFAULT_ROWS,
                    help="teacher-sampled corpus rows (another count: report outcome_smollm2_rowsN.json)")
    ap.add_argument("--input-noise", type=float, default=0.0, metavar="P",
                    help="the distillation's input_noise (report outcome_smollm2_noiseP.json)")
    ap.add_argument("--hidden-weight", type=float, default=0.0, metavar="W",
                    help="the distillation's hidden_weight (report outcome_smollm2_hiddenW.json)")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--max-steps", type=int, default=None, metavar="N",
                    help="the final distillation's steps instead of the recipe's (report outcome_smollm2_stepsN.json): "
                         "room in the 20 minutes for --prose-rows / --free-rows generation")
    ap.add_argument("--gen-batch", type=int, default=None, metavar="B",
                    help="rows per teacher generation batch (default: `data generate`'s)")
    ap.add_argument("--recipe", type=Path, default=None,
                    help="a variant of recipes/outcome.yaml to run instead (report outcome_smollm2_<its stem>.json)")
    ap.add_argument("--gen-backend", default="transformers", choices=["transformers", "slots"],
                    help="the teacher's generation backend (slots: prunekit's decode loop, prunekit.rl.decode)")
    ap.add_argument("--prose-rows", type=int, default=DEFAULT_PROSE_ROWS, metavar="N",
                    help="N teacher continuations of general-train openings (`data openings`) in the recovery mix "
                         "(0: none; report outcome_smollm2_proseN.json when not the default)")
    ap.add_argument("--free-rows", type=int, default=0, metavar="N",
                    help="also N unconditioned teacher samples (`data generate --unconditioned`: text from the start "
                         "token alone) in the recovery mix; report outcome_smollm2_freeN.json")
    ap.add_argument("--chat-repeats", type=int, default=0, metavar="N",
                    help="also the chatterbot train split, N times, in the recovery mix (the chat val becomes "
                         "in-domain: its questions stay out); report outcome_smollm2_chatN.json")
    ap.add_argument("--code-rows", type=int, default=DEFAULT_CODE_ROWS, metavar="N",
                    help="N rows of Python source (the standard library's, `data text --keep-lines` chunks) in the "
                         "recovery mix: the chat val is 61%% code answers by token (0: none; report "
                         "outcome_smollm2_codeN.json when not the default)")
    ap.add_argument("--code-answers", type=int, default=0, metavar="N",
                    help="also N teacher answers to the seed prompts that ask for code in the recovery mix "
                         "(report outcome_smollm2_answersN.json)")
    ap.add_argument("--plan", type=Path, default=DEFAULT_PLAN,
                    help="the layers to remove, best first (e.g. bench/layer_choice_smollm2.py's plan; "
                         "report outcome_smollm2_STEM.json)")
    ap.add_argument("--compare-steps", type=int, default=300)
    ap.add_argument("--width-ffn", type=int, default=None, metavar="N",
                    help="remove the parameters by width instead of depth: FFN channels -> N in every layer (1024: "
                         "25.0%% of the decoder-layer parameters); report outcome_smollm2_width_ffnN.json")
    ap.add_argument("--merge-ramp", type=float, default=0.5, help="compare_kv: merge_kv_ramp of the merged variant")
    ap.add_argument("--eval-samples", type=int, default=128, help="chat val rows per measurement")
    ap.add_argument("--eval-text-samples", type=int, default=None, help="general-text rows (default: all)")
    ap.add_argument("--skip", default="", help="comma-separated phases to skip (e.g. compare_kv)")
    ap.add_argument("--stop-after", type=float, default=None, metavar="SECONDS",
                    help="a distillation still running this long after the start stops on a checkpoint by itself "
                         "($PRUNEKIT_STOP_AT), as a call's time limit would stop it; give a little less than the "
                         "call's `timeout`, which stays the stop for every other phase")
    ap.add_argument("--sample-stacks", type=Path, default=None, metavar="FILE",
                    help="sample the main thread's stack every 10 ms into FILE (bench/stack_sampler.py reads it)")
    ap.add_argument("--report-only", type=Path, default=None, metavar="RESULTS_JSON",
                    help="write the report from a run's results.json (e.g. one fetched from a GPU box)")
    ap.add_argument("--machine", default=None, help="with --report-only: the machine the run was on")
    ap.add_argument("--not-run-reason", default=None, help="with --report-only: why phases are missing")
    ap.add_argument("--comparisons-from", type=Path, default=None, metavar="REPORT_JSON",
                    help="with --report-only: an earlier report whose comparisons stand in for phases this run "
                         "skipped (kept with that report's date and command)")
    ap.add_argument("--comparisons-note", default="", help="with --comparisons-from: how those runs differ")
    ap.add_argument("--corpus-from", nargs=2, type=Path, default=None, metavar=("REPORT_JSON", "CORPUS"),
                    help="skip generation: CORPUS (.jsonl or .jsonl.gz) is the teacher corpus an earlier run of the "
                         "same --rows/--max-new-tokens made; REPORT_JSON's corpus statistics and minutes count for "
                         "it (labelled corpus_from in the report)")
    args = ap.parse_args(argv)
    if args.stop_after is not None:
        from prunekit.core.interrupts import STOP_AT_ENV
        os.environ[STOP_AT_ENV] = str(time.time() + args.stop_after)
    if args.sample_stacks:
        from bench.stack_sampler import StackSampler
        sampler = StackSampler(args.sample_stacks)
        sampler.start()
        atexit.register(sampler.stop)
    if args.report_only:
        results = json.loads(args.report_only.read_text())
        clock_file = args.report_only.parent / "bench_state.json"  # its phase times are saved every few seconds
        if clock_file.is_file():
            clock = json.loads(clock_file.read_text())
            results["minutes"] = {k: round(v / 60, 2) for k, v in clock["phases"].items()}
            results["calls"] = clock["calls"]
        write_report(results, args, report_path(args))
        return 0
    data = (args.data or args.out / "data").resolve()
    if args.prepare:
        prepare_data(data)
        print(f"data files in {data}: {', '.join(sorted(p.name for p in data.glob('*.jsonl')))}")
        return 0
    if args.smoke:
        args.rows, args.max_new_tokens, args.compare_steps = 8, 16, 2
        args.prose_rows, args.free_rows, args.code_rows, args.code_answers = (
            min(n, 8) for n in (args.prose_rows, args.free_rows, args.code_rows, args.code_answers))
        args.eval_samples, args.eval_text_samples = 4, 4
        args.out = args.out.with_name(args.out.name + "-smoke")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    from prunekit.core import locks
    with locks.hold((out, "--out")):   # a second copy of the same run stops here, with one line
        return run_phases(args, data, out, argv)


def run_phases(args, data: Path, out: Path, argv: list[str] | None) -> int:
    """Every phase not done yet, in `out` (held by this process); each resumes where an earlier call stopped."""
    prepare_data(data)
    from prunekit.core.loading import resolve_model
    original = str(resolve_model("smollm2"))
    # a resumed run must be the same run: what shapes the corpus and the pipeline is kept with the phase clock
    run_settings = {k: str(getattr(args, k)) for k in ("rows", "max_new_tokens", "prose_rows", "free_rows",
                                                       "width_ffn", "plan", "corpus_from", "input_noise",
                                                       "gen_batch", "gen_backend", "hidden_weight", "recipe",
                                                       "max_steps", "chat_repeats", "code_rows", "code_answers")}
    state_file = out / "bench_state.json"
    earlier = json.loads(state_file.read_text()).get("settings") if state_file.is_file() else None
    if earlier is not None and earlier != run_settings:
        changed = ", ".join(f"{k} {earlier.get(k)} -> {v}" for k, v in run_settings.items() if earlier.get(k) != v)
        raise SystemExit(f"--out {out} holds a run with other settings ({changed}): give another --out")
    clock = Clock(state_file, run_settings)
    first_cut = "r1-1-width" if args.width_ffn else "r1-1-prune"   # the pipeline's id of the round's cut
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}

    def save():
        results.setdefault("date", time.strftime("%Y-%m-%d"))   # a corpus-only run's results stand as --corpus-from's
        results["minutes"] = {k: round(v / 60, 2) for k, v in clock.data["phases"].items()}
        results["calls"] = clock.data["calls"]
        tmp = results_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        os.replace(tmp, results_path)

    corpus = out / "teacher.jsonl"
    prose = out / "teacher-prose.jsonl"   # --prose-rows: the teacher's continuations of general-train openings
    free = out / "teacher-free.jsonl"     # --free-rows: the teacher's unconditioned text
    code = out / "python-code.jsonl"      # --code-rows: Python source
    answers = out / "teacher-code.jsonl"  # --code-answers: the teacher's answers to programming prompts
    recovery = out / "recovery.jsonl"   # the recipe's train file: the teacher corpus + the general train text
    plain_mix = out / "mix.jsonl"       # with --chat-repeats: the mix without the chatterbot rows (compare_data)

    def make_corpus():
        if args.corpus_from:
            reuse_corpus(*args.corpus_from, corpus, results)
        else:
            generate()
        if args.prose_rows:
            from prunekit.core.text import text_openings
            text_openings([data / "general-train.jsonl"], out / "prose-prompts.jsonl")
            results["corpus_prose"] = sample(out / "prose-prompts.jsonl", prose, rows=args.prose_rows,
                                             seed_prompts=False)
        if args.free_rows:
            results["corpus_free"] = sample(None, free, rows=args.free_rows, seed_prompts=False, unconditioned=True)
        if args.code_rows:
            results["code"] = python_code_rows(code, args.code_rows)
        if args.code_answers:
            results["corpus_code_answers"] = sample(code_prompts(out / "code-prompts.jsonl"), answers,
                                                    rows=args.code_answers, seed_prompts=False)
        mix = (corpus.read_bytes() + (prose.read_bytes() if args.prose_rows else b"")
               + (free.read_bytes() if args.free_rows else b"") + (code.read_bytes() if args.code_rows else b"")
               + (answers.read_bytes() if args.code_answers else b"")
               + (data / "general-train.jsonl").read_bytes())
        if args.chat_repeats:
            plain_mix.write_bytes(mix)
            mix += (data / "chat-train.jsonl").read_bytes() * args.chat_repeats
        tmp = recovery.with_suffix(".tmp")
        tmp.write_bytes(mix)
        os.replace(check_val_held_out(data, tmp), recovery)
        save()

    def sample(prompts: Path | None, to: Path, seed: int = 0, **target) -> dict:
        from prunekit.rl.corpus import generate_corpus
        return generate_corpus("smollm2", to, prompts=prompts, max_new_tokens=args.max_new_tokens, temperature=1.0,
                               top_p=0.95, backend=args.gen_backend, device="cuda" if args.gpu else "cpu",
                               dtype="bfloat16" if args.gpu else "float32", progress=True, seed=seed,
                               batch_size=args.gen_batch, **target)

    def generate():
        results["corpus"] = sample(data / "chat-train.jsonl", corpus, rows=args.rows, seed_prompts=True)

    def run_pipeline():
        import yaml
        from prunekit.config import load_config
        from prunekit.pipeline import pipeline
        recipe = yaml.safe_load(recipe_file(args).read_text())
        recipe.update(model=original, train=str(recovery), val=str(data / "val.jsonl"),
                      eval_text=str(data / "general-eval.jsonl"), output_dir=str(out / "pipeline"))
        recipe["rounds"][0]["prune"]["plan"] = str(args.plan)
        if args.input_noise:
            recipe["stages"]["distill"]["input_noise"] = args.input_noise
        if args.hidden_weight:
            recipe["stages"]["distill"]["hidden_weight"] = args.hidden_weight
        recipe["ray"]["use_gpu"] = args.gpu
        recipe["eval_samples"] = args.eval_samples
        if args.eval_text_samples:
            recipe["eval_text_samples"] = args.eval_text_samples
        overrides = sizes(args)["pipeline"]
        for key, value in overrides.items():
            if key == "stages.distill":
                recipe["stages"]["distill"].update(value)
            else:
                recipe[key] = value
        if args.max_steps:   # after the smoke sizes, so --smoke runs it too
            final_distill(recipe)["max_steps"] = args.max_steps
        if args.width_ffn:  # the one round cuts FFN channels (scored on the recovery mix) instead of layers
            recipe["rounds"] = [{"width": {"ffn": args.width_ffn, "samples": 4 if args.smoke else 256,
                                           "batch_size": 16}}]
            # FFN 1536 -> 1024 keeps 80.3% of all parameters (the embeddings stay): the target follows the cut
            recipe["target"] = {"params_fraction": 0.81}
        # a GPU run whose loss turns NaN stops at once (engine/loop.check_finite); then the next, more
        # conservative distill setting is tried on the same stage (recorded in the results)
        from prunekit import PrunekitError
        attempts = [{}] + FALLBACKS
        start = attempts.index(args.fallback) if args.fallback in attempts else 0
        for fallback in attempts[start:]:
            args.fallback = fallback
            recipe["stages"]["distill"].update(fallback)
            path = out / "recipe.yaml"
            path.write_text(yaml.safe_dump(recipe, sort_keys=False))
            try:
                result = pipeline(load_config("pipeline", path), where=str(path))
                break
            except PrunekitError as e:
                if not (" is nan at step" in str(e) or " is inf at step" in str(e)) or fallback == attempts[-1]:
                    raise
                results.setdefault("non_finite", []).append({"settings": fallback, "error": str(e)[:300]})
                results["fallback"] = attempts[attempts.index(fallback) + 1]
                save()
                print(f"non-finite loss with {fallback or 'the recipe settings'}; next: {results['fallback']}",
                      flush=True)
        state = json.loads((out / "pipeline" / "pipeline_state.json").read_text())
        results["pipeline"] = {"status": result.status, "original": state["original"], "stages": state["stages"]}
        distill = next((s for s in state["stages"] if s["stage"] == "distill" and s.get("run")), None)
        if distill is not None:   # where the distillation's minutes went: steps, and each attempt's start
            results["distill_timing"] = step_timing(Path(distill["run"]) / "metrics.jsonl")
        # where the chat val's gap lies: the code answers or the short chat answers
        results["chat_val_by_kind"] = {"original": chat_by_kind(original, data, args),
                                       "final": chat_by_kind(state["stages"][-1]["output"], data, args)}
        save()

    def stage_output(stage_id: str) -> str:
        return next(s["output"] for s in results["pipeline"]["stages"] if s["id"] == stage_id)

    def gap():
        """Is the final model short of the original because it memorised its training rows? The original and the
        final model on rows it trained on (the first of each corpus in the mix) and on fresh samples of the same
        kind it never saw (the same prompts and settings, another seed): a student far closer to the teacher on the
        seen rows than on the fresh ones has run out of data, not of capacity. And both on `far_text`, English from
        a source nothing here trains on (the general eval shares its newswire source with the general train split)."""
        final = results["pipeline"]["stages"][-1]["output"]
        n = 4 if args.smoke else GAP_ROWS
        sets = {"seen_teacher": corpus}
        if args.free_rows:
            sets["seen_free"] = free
        if (data / "far-eval.jsonl").is_file():   # never trained on, from another source than the general eval's
            sets["far_text"] = data / "far-eval.jsonl"
        fresh = {"fresh_teacher": (out / "gap-teacher.jsonl", dict(prompts=data / "chat-train.jsonl",
                                                                   seed_prompts=True))}
        if args.free_rows:
            fresh["fresh_free"] = (out / "gap-free.jsonl", dict(prompts=None, seed_prompts=False, unconditioned=True))
        for label, (path, how) in fresh.items():
            prompts = how.pop("prompts")
            sample(prompts, path, seed=1, rows=n, **how)
            sets[label] = path
        from prunekit.stages.evaluate import evaluate_file
        dev = "cuda" if args.gpu else "cpu"
        runs = results.setdefault("gap", {})
        for label, path in sets.items():
            if label in runs:
                continue
            o, f = (evaluate_file(m, path, n, 512, device=dev) for m in (original, final))
            runs[label] = {"rows": f.get("rows", n), "original": o, "final": f,   # a file may hold fewer than n
                           "nll_over_original": f["loss"] - o["loss"],
                           "token_acc_vs_original": f["token_acc"] / o["token_acc"]}
            save()

    def compare_data():
        """The pruned model, the same distillation budget, each recovery data source (DATA_SOURCES)."""
        sources = dict(zip(data_sources(args), (data / "chat-train.jsonl", data / "general-train.jsonl", corpus,
                                                plain_mix if args.chat_repeats else recovery, recovery)))
        runs = results.setdefault("compare_data", {})
        for label, train in sorted(sources.items(), key=lambda kv: "+" not in kv[0]):   # the mixes first
            if label in runs:
                continue
            model = distill(stage_output(first_cut), train, data, out / "compare" / f"data-{label}",
                            f"data-{label}", args.compare_steps, args)
            runs[label] = {"steps": args.compare_steps, "train": str(train), **measure(model, data, args)}
            save()

    def compare_kv():
        """KV heads 3 -> 1 on the pruned model, then the same distillation budget on the recovery mix: cut at once by
        the mean (= similarity grouping here: one group), by the calibrated cut starting from the aligned heads (the
        recipe's) or from their mean (`--no-align`), or merged gradually while distilling (merge_kv_heads) and cut
        after it (exact: the heads are identical by then)."""
        import yaml
        from prunekit.core.kv_calibration import CalibrationSettings
        from prunekit.stages.kv_cut import kv_cut
        recipe_cut = next(e["kv_cut"] for e in yaml.safe_load(recipe_file(args).read_text())[
            "finish"] if isinstance(e, dict) and "kv_cut" in e)
        kv = {"samples": recipe_cut.get("samples", 64), "calibration_steps": recipe_cut.get("calibration_steps", 200),
              **sizes(args)["kv"]}
        runs = results.setdefault("compare_kv", {})
        base = stage_output(first_cut)
        dev = "cuda" if args.gpu else "cpu"
        merged_label = f"merged while distilling (ramp {args.merge_ramp})"
        # the recipe's cut first, then the alternatives (a call that runs out of time keeps what finished)
        for label in ("aligned+calibrated", "mean+calibrated", merged_label, "mean"):
            if label in runs:
                continue
            if label == merged_label:
                merged = distill(base, recovery, data, out / "compare" / "kv-merged-distill", "kv-merged",
                                 args.compare_steps, args, merge_kv_heads=1, merge_kv_ramp=args.merge_ramp)
                cut = kv_cut(merged, out / "compare" / "kv-merged", 1, overwrite=True).output
                runs[label] = {"cut": None, "steps": args.compare_steps, "distilled": measure(str(cut), data, args)}
            else:
                cut = out / "compare" / f"kv-{label}"
                kv_cut(base, cut, 1, "mean", data=str(recovery), overwrite=True, calibrate=label != "mean",
                       max_samples=kv["samples"], device=dev,
                       calibration=CalibrationSettings(steps=kv["calibration_steps"],
                                                       align=label != "mean+calibrated"))
                after = distill(str(cut), recovery, data, out / "compare" / f"kv-{label}-distill", f"kv-{label}",
                                args.compare_steps, args)
                runs[label] = {"cut": measure(str(cut), data, args), "steps": args.compare_steps,
                               "distilled": measure(after, data, args)}
            save()

    args.fallback = results.get("fallback", {})
    results["command"] = "python bench/outcome_smollm2.py " + " ".join(argv if argv is not None else sys.argv[1:])
    skip = set(filter(None, args.skip.split(",")))
    # the KV comparison first: the KV cut is what limits the outcome (bench/results/outcome_smollm2.json)
    for phase, fn in (("corpus", make_corpus), ("pipeline", run_pipeline), ("gap", gap), ("compare_kv", compare_kv),
                      ("compare_data", compare_data)):
        if phase not in skip:
            clock.run(phase, fn)
    save()
    write_report(results, args, report_path(args))
    return 0


def write_report(results: dict, args, path: Path) -> None:
    """Per stage: parameters, KV bytes/token, general-text and chat-val token_acc (and % of the original), NLL,
    minutes; the data-source and KV-cut comparisons; the goals."""
    import platform
    import torch
    pipe = results.get("pipeline")
    if not pipe:
        return
    results.setdefault("minutes", {})
    results.setdefault("calls", 1)
    o = pipe["original"]

    def row(rec):
        f, t, c = rec["facts"], rec.get("eval_text"), rec["eval"]
        return {"params": f["params"], "layers": f["text_layers"], "kv_heads": f["kv_heads"],
                "kv_bytes_per_token": f["kv_bytes_per_token"],
                "general_text": {"token_acc": t["token_acc"], "nll": t["loss"],
                                 "vs_original": t["token_acc"] / o["eval_text"]["token_acc"]},
                "chat_val": {"token_acc": c["token_acc"], "nll": c["loss"],
                             "vs_original": c["token_acc"] / o["eval"]["token_acc"]},
                "minutes": round(rec.get("time_s", 0) / 60, 2),
                **({"chat_val_token_acc_by_kind": {k: v["token_acc"] for k, v in rec["eval_by_kind"].items()}}
                   if rec.get("eval_by_kind") else {})}

    def by_kind(kinds):   # the final model's chat val, code answers apart from the rest
        return {kind: {"rows": kinds["original"][kind]["rows"], "tokens": kinds["original"][kind]["tokens"],
                       "original_token_acc": kinds["original"][kind]["token_acc"],
                       "final_token_acc": kinds["final"][kind]["token_acc"],
                       "vs_original": kinds["final"][kind]["token_acc"] / kinds["original"][kind]["token_acc"]}
                for kind in kinds["original"]}

    stages = {"original": row(o)} | {r["id"]: row(r) for r in pipe["stages"] if "facts" in r}
    final = list(stages.values())[-1]
    reused = results.get("corpus_from")
    if reused:   # the reused generation's minutes, plus this run's corpus phase (the copy; prose continuations)
        results["minutes"]["corpus"] = round(reused["minutes"] + results["minutes"].get("corpus", 0), 2)
    end_to_end = sum(results["minutes"].get(k, 0) for k in ("corpus", "pipeline"))
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": args.machine or (torch.cuda.get_device_name(0) if args.gpu else platform.processor()),
        "command": results.get("command") or "python bench/outcome_smollm2.py" + (" --gpu" if args.gpu else " --smoke"),
        "recipe": os.path.relpath(recipe_file(args), ROOT), "status": pipe["status"], "corpus": results.get("corpus"),
        # since session 11 a run stops before training on a mix that shares val rows or questions
        "chat_val_split": "by question: no val row or question is in the recovery mix (check_val_held_out)",
        **({"chat_val_in_domain": f"the chatterbot train split is in the mix ({args.chat_repeats} times): the chat "
                                  f"val's distribution, not its questions"} if args.chat_repeats else {}),
        "corpus_from": reused, **({"corpus_prose": results["corpus_prose"]} if results.get("corpus_prose") else {}),
        **({"corpus_free": results["corpus_free"]} if results.get("corpus_free") else {}),
        **({"code": results["code"]} if results.get("code") else {}),
        **({"corpus_code_answers": results["corpus_code_answers"]} if results.get("corpus_code_answers") else {}),
        "gap": {k: {"rows": v["rows"], "token_acc_vs_original": v["token_acc_vs_original"],
                    "nll_over_original": v["nll_over_original"], "final_token_acc": v["final"]["token_acc"],
                    "original_token_acc": v["original"]["token_acc"]} for k, v in results.get("gap", {}).items()},
        "distill_settings_changed": results.get("fallback") or None, "non_finite": results.get("non_finite"),
        "stages": stages, "minutes": results["minutes"], "end_to_end_minutes": round(end_to_end, 2),
        "calls": results["calls"],
        "goals": {"general_text_vs_original >= 0.90 (aim 0.95)": final["general_text"]["vs_original"],
                  "chat_val_vs_original >= 0.95": final["chat_val"]["vs_original"],
                  "end_to_end_minutes <= 20": end_to_end},
        **({"chat_val_by_kind": by_kind(results["chat_val_by_kind"])} if results.get("chat_val_by_kind") else {}),
        **({"distill_timing": results["distill_timing"]} if results.get("distill_timing") else {}),
        "compare_data": {k: {"steps": v["steps"], **{m: row(v)[m] for m in ("general_text", "chat_val")}}
                         for k, v in results.get("compare_data", {}).items()},
        "compare_kv": {k: {"steps": v["steps"], "after_cut": v["cut"] and {m: row(v["cut"])[m]
                                                                           for m in ("general_text", "chat_val")},
                           "after_distill": {m: row(v["distilled"])[m] for m in ("general_text", "chat_val")}}
                       for k, v in results.get("compare_kv", {}).items()},
    }
    earlier = json.loads(args.comparisons_from.read_text()) if getattr(args, "comparisons_from", None) else None
    taken = [k for k in ("compare_data", "compare_kv") if earlier and not report[k] and earlier.get(k)]
    for key in taken:
        report[key] = earlier[key]
        results[key] = earlier[key]  # counts as run (by that report's command)
    if taken:
        # comparisons the earlier report itself took from a still earlier one keep that run's date and command
        source = earlier.get("comparisons_from") or {}
        source = source if set(taken) <= set(source.get("phases", ())) else earlier
        parts = [p for n in (args.comparisons_note, source.get("note")) if n for p in n.split("; ")]
        note = "; ".join(dict.fromkeys(parts))   # a chain of reports repeats its notes: each part once
        report["comparisons_from"] = {"phases": taken, "date": source["date"], "command": source["command"],
                                      "note": note}
    missing = [p for p in PHASES if p not in results or (p != "corpus" and not results[p])]
    if results.get("compare_data") and "compare_data" not in taken:   # a call stopped inside the phase
        missing += [f"compare_data: {k}" for k in data_sources(args) if k not in results["compare_data"]]
    if missing:
        report["not_run"] = {p: getattr(args, "not_run_reason", None) or "not run" for p in missing}
    path.write_text(json.dumps(report, indent=1) + "\n")
    plot(report, path.with_suffix(".png"))
    print(json.dumps({k: report[k] for k in ("goals", "end_to_end_minutes", "status")}, indent=1))
    print(f"wrote {path} (+ .png)")


def plot(report: dict, path: Path) -> None:
    from prunekit.core.plots import pyplot, save_figure
    plt = pyplot()
    names = list(report["stages"])
    x = range(len(names))
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.5), gridspec_kw={"width_ratios": [1, 1, 1.3]})
    ax = axes[0]
    for key, label, color in (("general_text", "general English text (held out)", "tab:blue"),
                              ("chat_val", "chat val" + (" (in-domain)" if report.get("chat_val_in_domain") else ""),
                               "tab:green")):
        ax.plot(x, [100 * report["stages"][n][key]["vs_original"] for n in names], marker="o", label=label,
                color=color)
    ax.axhline(90, ls="--", color="gray", lw=0.8)
    ax.set_title("token_acc, % of the original", fontsize=10)
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.bar(x, [report["stages"][n]["params"] / 1e6 for n in names], color="tab:gray")
    ax2 = ax.twinx()
    ax2.plot(x, [report["stages"][n]["kv_bytes_per_token"] for n in names], marker="s", color="tab:orange")
    ax.set_title("parameters (M, bars) and KV bytes/token (line)", fontsize=10)
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax = axes[2]
    # compare_data runs on the pruned model before any KV cut; compare_kv cuts that model
    groups = [(f"data {k}, {v['steps']} steps (3 KV heads)", v) for k, v in report["compare_data"].items()] + \
             [(f"KV 3->1 {k}, right after the cut", {"general_text": v["after_cut"]["general_text"]})
              for k, v in report["compare_kv"].items() if v["after_cut"]] + \
             [(f"KV 3->1 {k} + {v['steps']} distill steps", v["after_distill"])
              for k, v in report["compare_kv"].items()]
    if not groups:
        ax.axis("off")
        ax.text(0.5, 0.5, "comparisons not run\n(see the JSON's not_run)", ha="center", va="center", fontsize=10)
    else:
        ax.barh(range(len(groups)), [100 * g[1]["general_text"]["vs_original"] for g in groups], color="tab:blue")
        ax.set_yticks(range(len(groups)))
        ax.set_yticklabels([textwrap.fill(g[0], 34) for g in groups], fontsize=7)   # one gap between panels
        taken = (report.get("comparisons_from") or {}).get("phases", [])
        earlier = f" ({', '.join(taken)}: an earlier run's, see comparisons_from)" if taken else ""
        ax.set_title(f"comparisons{earlier}:\ngeneral text, % of original", fontsize=9)
    save_figure(fig, path)


def step_timing(metrics: Path) -> dict | None:
    """From a training run's metrics.jsonl (each line's wall-clock `time`): the spread of one step's time, each
    attempt's start (loading and compiling), and each attempt's stretch of steps (a new attempt starts where a step
    follows the one before it by more than a minute, or repeats it). A run whose lines carry no time (before session
    29) gives None."""
    lines = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.is_file() else []
    lines = [x for x in lines if "time" in x and "train/loss" in x]
    if len(lines) < 2:
        return None
    gaps = sorted(b["time"] - a["time"] for a, b in zip(lines, lines[1:]) if b["step"] == a["step"] + 1)
    stretches = [[lines[0]]]
    for a, b in zip(lines, lines[1:]):
        if b["step"] <= a["step"] or b["time"] - a["time"] > 60:
            stretches.append([])
        stretches[-1].append(b)

    def pct(q):
        return round(1000 * gaps[min(len(gaps) - 1, int(q * len(gaps)))], 1)
    return {"step_ms": {"p10": pct(0.1), "p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99)},
            "stretches": [{"steps": [s[0]["step"], s[-1]["step"]], "seconds": round(s[-1]["time"] - s[0]["time"], 1)}
                          for s in stretches],
            # each attempt's loading and compiling before its first step (runs since session 31 log it)
            "attempt_starts": [{"at_step": x["step"] - 1, **x["attempt_start"]} for x in lines if "attempt_start" in x],
            "note": "steps logged after the checkpoint an attempt resumed from are dropped by the next attempt; "
                    "evaluations and checkpoints fall inside the stretches"}


def run_as_script(main, name: str) -> None:
    """A bench's `__main__`: main() under prunekit's signal handling. Ctrl-C, `kill`, a call's time limit, or a
    PrunekitError (bad input, --out held by another copy of the same run) end it with one line and an exit code."""
    import faulthandler
    from prunekit import PrunekitError
    from prunekit.core import interrupts, locks
    # a death in native code (SIGSEGV, SIGABRT, ...) prints where it was: two GPU calls of this bench ended silently
    # within a second of their time limit's SIGINT, without the interrupted line or a checkpoint
    with contextlib.suppress(AttributeError, ValueError, OSError):   # a stderr with no file behind it (captured)
        faulthandler.enable(file=sys.__stderr__)
    locks.command = f"bench/{name}.py"   # how the lock on --out names this run to a second copy
    with interrupts.handled(interrupts.raise_interrupt):
        try:
            code = main()
        except PrunekitError as error:
            print(f"{name}: error: {error}", file=sys.stderr)
            code = 2
        except KeyboardInterrupt as stop:
            word, code = interrupts.outcome(stop)
            print(f"{name}: {word} ({str(stop) or 'the same command resumes'})", file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    run_as_script(main, "outcome_smollm2")
