#!/usr/bin/env bash
# The README's "main job" on a built-in default. Until the tunnel lands, that job is the ESP crypto
# benchmark: our seal+open, one per call and batched, against the bare AEAD loop.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
tools/install.sh
exec .venv/bin/python -m bench.throughput crypto "$@"
