#!/usr/bin/env bash
# The README's "main job" on a built-in default: two hosts in network namespaces, `tunneld up` in
# each, ssh from one to the other's ULA through the tunnel, `tunneld status`, then clean up.
# Needs root (namespaces, TUN). Installs what is missing first.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
tools/install.sh
exec .venv/bin/python -m lab.demo "$@"
