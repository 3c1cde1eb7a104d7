#!/usr/bin/env bash
# The one prepared GPU check: `lasp2 bench --suite gpu` on one GPU, sized for an H100 in under
# 8 minutes including the install (docs/gpu.md "On GPUs"). Exactness on CUDA (SP at W = 2 on
# one GPU over gloo, fla vs torch for every linear variant, the softmax kernel backend vs the
# blockwise loop, a Linear-Llama and a lasp2.hf Qwen3.5-tiny step vs CPU), then the timed sections
# (softmax kernels, one LLLN step of linear-llama3-1b-shaped blocks at T = 32K, host syncs, the
# linear local path vs fla direct at T = 8K..64K with what is left of --budget-s). Writes
# benchmarks/results/gpu_<machine>_<date>/results.{json,md} (results.partial.json after every
# section while it runs). Extra flags go to lasp2 bench (a later --out wins).
# CPU smoke mode (CI): TRITON_INTERPRET=1 bash benchmarks/gpu_suite.sh --smoke
# Needs: torch with CUDA preinstalled, then (no internet) pip install --no-index --find-links .whl -e '.[gpu,hf]'
# (or pip install --no-deps -e . when fla-core and triton are already there).
set -euo pipefail
py="${PYTHON:-python3}"   # the interpreter to run (tests pass their own)
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export FLA_DISABLE_BACKEND_DISPATCH=1   # the kernels named in the tables, not FlashQLA/TileLang swaps
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$PWD/.triton-cache}"  # a rerun skips compilation
out=benchmarks/results/$("$py" -c 'from lasp2.bench.report import default_out; print(default_out("gpu"))')
exec timeout 420 "$py" -m lasp2 bench --suite gpu --budget-s 300 --out "$out" "$@"
