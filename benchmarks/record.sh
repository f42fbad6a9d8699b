#!/usr/bin/env bash
# The benchmark runs whose output the README shows (its Performance section,
# through tools/readme.py), into results/benchmarks/. About 30 minutes on 2
# cores; run on an otherwise idle machine. PYTHON= names the interpreter
# (default .venv/bin/python, made by `make venv`).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
OUT=results/benchmarks
mkdir -p "$OUT"
run() {  # file, then the command's arguments
  local file="$1"; shift
  echo "$file: $*" >&2
  { echo "\$ $*"; echo; "$@"; } > "$OUT/$file.tmp"
  mv "$OUT/$file.tmp" "$OUT/$file"
}
run cpu-op.md $PY benchmarks/bench_sampler.py --repeats 11
run cpu-train.md $PY benchmarks/bench_sampler.py --mode train \
    --double-backprop 0.01 --repeats 11
run cpu-features.md $PY benchmarks/bench_sampler.py --mode features \
    --repeats 21
run cpu-gradients.md $PY benchmarks/bench_sampler.py --mode gradients \
    --repeats 21
run cpu-op-numpy.md env DEFORMABLE_USE_NUMBA=never $PY \
    benchmarks/bench_sampler.py --no-builtin --repeats 7
run tuning.md $PY benchmarks/tune.py --rounds 5 --repeats 11
