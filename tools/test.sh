#!/usr/bin/env bash
# The test command (README, CI): install what is missing, then lint, type-check and run every test,
# the slow property/fuzz tests and the root-only namespace tests included.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
tools/install.sh
.venv/bin/ruff check .
.venv/bin/mypy
if [ $# -gt 0 ]; then  # a chosen subset: as asked, in one process
    exec .venv/bin/python -m pytest --runslow "$@"
fi
# The sans-I/O unit tests (most of their time is property tests at 10,000 examples, pure CPU) on two
# workers; then the namespace tests that mostly wait (leases, NAT timeouts, retransmissions) two at a
# time, each file on one worker; then those that time real traffic or CPU, one at a time
# (tests/integration/conftest.py lists them).
.venv/bin/python -m pytest --runslow -n 2 tests/unit
.venv/bin/python -m pytest --runslow -n 2 --dist loadfile -m "not exclusive" tests --ignore=tests/unit
exec .venv/bin/python -m pytest --runslow -m exclusive tests --ignore=tests/unit
