#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run the whole test suite on two workers (each computes on one thread,
# tests/conftest.py); with no arguments, the tests that measure other processes' CPU load run alone after.
#   bash scripts/test.sh [pytest args...]          SSD_TEST_WORKERS=N: N workers (0: one process, no xdist)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
workers=${SSD_TEST_WORKERS:-2}
if [ "$workers" = 0 ]; then
  exec .venv/bin/python -m pytest -q "$@"
fi
.venv/bin/python -m pytest -q -n "$workers" --dist loadfile "$@"
if [ $# -eq 0 ]; then
  .venv/bin/python -m pytest -q tests/test_machine_load.py
fi
