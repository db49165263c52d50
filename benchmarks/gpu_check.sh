#!/usr/bin/env bash
# One command for a lent GPU machine (see benchmarks/README.md):
#   bash benchmarks/gpu_check.sh            -> results under $OUT (device tool) or benchmarks/results/gpu_check
# Builds the CUDA extension against the torch installed there, runs the conformance suite on
# the GPU (Triton and CUDA backends), compute-sanitizer memcheck, and the benchmarks.
set -u
cd "$(dirname "$0")/.."
exec python3 benchmarks/gpu_check.py --out "${OUT:-benchmarks/results/gpu_check}" "$@"
