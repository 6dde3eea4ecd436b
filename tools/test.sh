#!/usr/bin/env bash
# The test command (README, CI): install what is missing, then lint, type-check and run every test,
# the slow property/fuzz tests and the root-only namespace tests included.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
tools/install.sh
.venv/bin/ruff check .
.venv/bin/mypy
exec .venv/bin/python -m pytest --runslow "$@"
