#!/usr/bin/env bash
# The prepared GPU check of glrnet (benchmarks/gpu/README.md): environment, CUDA tests, benchmarks against their
# floors, training runs; at most eight files under --out (default: $OUT).
#
#   benchmarks/gpu/run.sh [--smoke] [--out DIR] [--budget-s 480] [--stages env,tests,bench,train] ...
#   benchmarks/gpu/run.sh --help
set -u
cd "$(dirname "$0")/../.." || exit 1
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" benchmarks/gpu/device_check.py "$@"
