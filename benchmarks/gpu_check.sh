#!/usr/bin/env bash
# One command for a lent GPU machine (see benchmarks/README.md):
#   bash benchmarks/gpu_check.sh [--budget-s 420] [--wheels DIR]
# -> results under $OUT (device tool) or benchmarks/results/gpu_check: at most 8 files.
# Spends one time budget on selftest (first: a verdict even if a later step dies), build (sm_90),
# smoke, benchmarks, memcheck, selective CE and the
# conformance suite, in that order, skipping (with the reason) what no longer fits.
set -u
cd "$(dirname "$0")/.."
exec python3 benchmarks/gpu_check.py --out "${OUT:-benchmarks/results/gpu_check}" "$@"
