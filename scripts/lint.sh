#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run the linters CI runs before the tests:
# ruff (lint rules and formatting, configured in pyproject.toml) and mypy on ssd/.
#   bash scripts/lint.sh          check only
#   bash scripts/lint.sh --fix    apply ruff's safe fixes and format the tree first
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "${1:-}" = "--fix" ]; then
  .venv/bin/ruff check --fix .
  .venv/bin/ruff format .
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
