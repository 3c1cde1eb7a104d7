#!/usr/bin/env bash
# The fla backend's GPU suite: one GPU, under 5 minutes. `lasp2 bench --suite gpu`: per variant,
# fwd+bwd time and peak memory of fla's op alone vs lasp2's one-device path and lasp2's SP local
# path (a group of one rank) with the fla backend, T = 8K..64K, H = 16, K = V = 128, bf16. Writes
# benchmarks/results/gpu_<machine>_<date>/ (results.json, results.md, time_vs_T.png with matplotlib);
# extra flags go to lasp2 bench (a later --out wins). --quick with TRITON_INTERPRET=1 checks it on CPU.
# Needs: pip install -e '.[gpu]' (fla-core 0.6.0, triton >= 3.7.1) and a CUDA device.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export FLA_DISABLE_BACKEND_DISPATCH=1   # the kernels named in the tables, not FlashQLA/TileLang swaps
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$PWD/.triton-cache}"  # a rerun skips compilation
plots=$(python3 -c 'import matplotlib' 2>/dev/null || echo --no-plots)
out=benchmarks/results/$(python3 -c 'from lasp2.bench.report import default_out; print(default_out("gpu"))')
exec timeout 290 python3 -m lasp2 bench --suite gpu --budget-s 270 --out "$out" $plots "$@"
