#!/usr/bin/env bash
# Move the tested set of versions (constraints.txt) forward.
#
#   bash scripts/lock.sh            # fresh venv with the newest releases, run the suite, write the lock if green
#   bash scripts/lock.sh --no-test  # write the lock without running the suite (then run it yourself)
#
# A fresh venv (.venv-lock) gets the CPU torch and `pip install -e ".[dev,webui]"` WITHOUT the lock, so
# pip resolves the newest releases the ranges in pyproject.toml allow. Before the suite runs, the versions
# that moved against the current lock are printed (`python scripts/versions.py --against constraints.txt`):
# when the suite then fails, those are the suspects (what broke what). When it passes, constraints.txt is
# rewritten from that venv and `bash scripts/setup.sh` installs through it from then on. Commit it with the
# suite's result in the message. torch is not in the lock: setup.sh picks the CPU or CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-lock
rm -rf "$VENV"
"$PY" -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
pip install -q "torch==${TORCH_VERSION:-2.13.0}" 2>&1 | grep -v "^WARNING: Location" || true
pip install -q -e ".[dev,webui]" 2>&1 | grep -v "^WARNING: Location" || true
NEW=$(mktemp)
python scripts/versions.py --freeze > "$NEW"
echo "== versions that differ from constraints.txt (the suspects if the suite fails):"
python scripts/versions.py --against constraints.txt || true
if [ "${1:-}" != "--no-test" ]; then
  HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false python -m pytest -q -p no:cacheprovider \
    || { echo "suite failed on the newest versions: constraints.txt left as it is (suspects above)"; exit 1; }
fi
mv "$NEW" constraints.txt
echo "constraints.txt written ($(grep -c '==' constraints.txt) pins)"
