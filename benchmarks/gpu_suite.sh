#!/usr/bin/env bash
# The fla backend's GPU suite: one GPU, under 5 minutes. Per variant, fwd+bwd time and
# peak memory of fla's op alone vs lasp2's one-device path and lasp2's SP local path with the fla
# backend at SP = 1, T = 8K..64K, H = 16, K = V = 128, bf16. Writes benchmarks/results/gpu_suite.{json,md}.
# Needs: pip install -e '.[gpu]' (fla-core 0.6.0, triton >= 3.7.1) and a CUDA device.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export FLA_DISABLE_BACKEND_DISPATCH=1   # the kernels named in the tables, not FlashQLA/TileLang swaps
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$PWD/.triton-cache}"  # a rerun skips compilation
exec timeout 290 python3 benchmarks/gpu_suite.py "$@"
