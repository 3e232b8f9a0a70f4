#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py: what it checks and times). Under 8 minutes on one GPU:
#   bash benchmarks/gpu_check.sh              # on a CUDA machine; record the table in benchmarks/README.md
#   bash benchmarks/gpu_check.sh --dry-run    # the same code paths at tiny sizes on CPU (in the test suite)
set -euo pipefail
cd "$(dirname "$0")/.."
exec python benchmarks/gpu_check.py "$@"
