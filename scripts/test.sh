#!/usr/bin/env bash
# The test suite (what CI runs). Slow end-to-end tests run too unless LMWRIGHT_FAST=1.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Which installed versions differ from the tested set: when a test fails on a fresh machine, these moved.
python scripts/versions.py --against constraints.txt | sed 's/^/versions: /' || true
if [ "${LMWRIGHT_FAST:-0}" = "1" ]; then
  exec python -m pytest -q -m "not slow" -p no:cacheprovider "$@"
fi
exec python -m pytest -q -p no:cacheprovider --durations=15 "$@"
