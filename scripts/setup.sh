#!/usr/bin/env bash
# Set up lmwright in ./.venv: CPU PyTorch when no NVIDIA GPU is present (an unpinned torch would
# pull a multi-GB CUDA build), then the package with its extras. Safe to run again.
#   bash scripts/setup.sh            # core + dev + webui extras (what the tests need)
#   EXTRAS=export,quant bash scripts/setup.sh
#   LMWRIGHT_UNLOCKED=1 bash scripts/setup.sh   # newest releases instead of the tested set (constraints.txt)
# The package is installed through constraints.txt, the versions the test suite last passed with, so both
# README commands give the same result on any fresh machine; `bash scripts/lock.sh` moves it forward.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${EXTRAS:-dev,webui}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true

if python -c "import torch" 2>/dev/null; then
  echo "torch $(python -c 'import torch; print(torch.__version__)') already installed"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "NVIDIA GPU found: installing CUDA PyTorch"
  pip install -q "torch>=2.4" 2>&1 | grep -v "^WARNING: Location" || true
else
  echo "no GPU: installing the CPU build of torch==${TORCH_VERSION}"
  pip install -q "torch==${TORCH_VERSION}" 2>&1 | grep -v "^WARNING: Location" || true
fi
LOCK=()
if [ "${LMWRIGHT_UNLOCKED:-0}" != "1" ] && [ -f constraints.txt ]; then
  LOCK=(-c constraints.txt)
  echo "installing the tested versions (constraints.txt; LMWRIGHT_UNLOCKED=1 for the newest)"
fi
pip install -q "${LOCK[@]}" -e ".[${EXTRAS}]" 2>&1 | grep -v "^WARNING: Location" || true
if [ -f constraints.txt ] && ! python scripts/versions.py --against constraints.txt >/tmp/lmwright-drift.txt 2>&1; then
  echo "versions that differ from the tested set (constraints.txt):"; sed 's/^/  /' /tmp/lmwright-drift.txt
fi
python -c "import torch, transformers, lmwright; print(f'lmwright {lmwright.__version__}: torch {torch.__version__}, transformers {transformers.__version__}')"
