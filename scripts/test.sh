#!/usr/bin/env bash
# The test suite (what CI runs). Slow end-to-end tests run too unless LMWRIGHT_FAST=1.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Which installed versions differ from the tested set: when a test fails on a fresh machine, these moved.
python scripts/versions.py --against constraints.txt | sed 's/^/versions: /' || true
# Tests marked `heavy` (the SIGKILL fuzz of resume, the f32 and f16 GGUF round trips: ~3 min) run only with
# LMWRIGHT_HEAVY=1: CI has 20 minutes for set-up and tests on a 2-core machine.
heavy='not heavy'
if [ "${LMWRIGHT_HEAVY:-0}" = "1" ]; then heavy='heavy or not heavy'; fi
# Two worker processes (pytest-xdist) on a machine with 2+ cores, each with its share of torch's threads
# (tests/conftest.py): most tests are single-threaded Python, so one process left a core idle (a 2-core machine:
# ~990 s in one process, ~710 s in two). `worksteal` keeps both busy to the end; the full demo (the longest test)
# starts first. LMWRIGHT_WORKERS=1 runs in one process (e.g. to debug one test).
workers=${LMWRIGHT_WORKERS:-$(python -c 'import os; print(min(2, os.cpu_count() or 1))')}
par=()
if [ "$workers" -gt 1 ] && python -c 'import xdist' 2>/dev/null; then par=(-n "$workers" --dist worksteal); fi
if [ "${LMWRIGHT_FAST:-0}" = "1" ]; then
  exec python -m pytest -q -m "not slow and ($heavy)" -p no:cacheprovider "${par[@]}" "$@"
fi
exec python -m pytest -q -m "$heavy" -p no:cacheprovider --durations=15 "${par[@]}" "$@"
