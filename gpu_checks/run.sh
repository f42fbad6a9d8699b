#!/usr/bin/env bash
# The GPU checks of this project, in one run on a GPU machine (see
# results/gpu/README.md): the GPU tests (second derivatives, chunks,
# float16 and the deterministic mode included), the deterministic mode's
# bits at the benchmark's sizes, compute-sanitizer on extreme offsets (in
# each mode), one epoch of each convnet (DCNv1, regular, DCNv2), a short
# double-backprop run, and the benchmarks: the op, the ResNet-like layers
# against torchvision and cuDNN, and each kernel against its bandwidth
# floor. Needs Chainer and ChainerCV's Python files importable, e.g. the
# GPU kit in .devkit/ (Chainer, ChainerCV, a NumPy-2 shim and MNIST; built
# by `make gpu-kit`). Writes its summaries to $OUT (default results/gpu);
# each step has its own time limit so that one hang cannot eat the others'
# time.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
OUT="${OUT:-$ROOT/results/gpu}"
mkdir -p "$OUT"
export PYTHONPATH="$ROOT/.devkit/site:$ROOT" PYTHONUNBUFFERED=1
export CHAINER_WARN_VERSION_MISMATCH=0 PYTHONWARNINGS=ignore
export DEFORMABLE_MNIST_DIR="$ROOT/.devkit/mnist"
PY="${PYTHON:-python3}"
GPU="${GPU:-0}"              # GPU=-1 TRAIN_FLAGS=... for a dry run on a CPU
TRAIN_FLAGS="${TRAIN_FLAGS:-}"
WORK="$(mktemp -d)"
step() { echo; echo "=== $1 ($(date -u +%H:%M:%S))"; }

{
step environment
date -u +%Y-%m-%d
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
$PY - <<'PY'
import sys, numpy, cupy, chainer
from chainer.backends import cuda
print('python', sys.version.split()[0], 'numpy', numpy.__version__,
      'cupy', cupy.__version__, 'chainer', chainer.__version__,
      'cuda.available', cuda.available)
print('CUDA runtime', cupy.cuda.runtime.runtimeGetVersion(),
      'driver', cupy.cuda.runtime.driverGetVersion())
try:
    import torch, torchvision
    print('torch', torch.__version__, 'torchvision', torchvision.__version__)
except ImportError as e:
    print('torchvision:', e)
PY
compute-sanitizer --version 2>&1 | tail -1
} 2>&1 | tee "$OUT/environment.txt"

step 'every kernel compiled and launched by CuPy (gpu_checks/compile_with_cupy.py --index64)'
timeout 60 $PY gpu_checks/compile_with_cupy.py 2>&1 | tail -3
timeout 60 $PY gpu_checks/compile_with_cupy.py --index64 2>&1 | tail -3

step 'pytest -m gpu'
timeout 120 $PY -m pytest -q -p no:cacheprovider -m gpu -n 4 -rfEs \
    tests/test_sampler.py tests/test_sampler_general.py tests/test_links.py \
    tests/test_double_backward.py tests/test_gpu_modes.py \
    2>&1 | tee "$OUT/pytest-gpu.txt" | tail -25

step 'deterministic mode at the benchmark sizes: the same bits across runs and chunk sizes (gpu_checks/deterministic_bits.py)'
timeout 90 $PY gpu_checks/deterministic_bits.py --gpu $GPU 2>&1 \
    | tee "$OUT/deterministic-bits.md" | tail -3

step 'compute-sanitizer memcheck: extreme offsets'
timeout 100 compute-sanitizer --tool memcheck --error-exitcode 3 \
    --print-limit 10 $PY gpu_checks/memcheck_case.py > "$OUT/memcheck.txt" 2>&1
echo "exit status $?" >> "$OUT/memcheck.txt"
tail -4 "$OUT/memcheck.txt"

for d in 1 0 2; do
  step "train_mnist.py --gpu $GPU --deformable $d, one epoch $TRAIN_FLAGS"
  (cd experiments && timeout 100 $PY train_mnist.py --gpu $GPU --deformable $d \
      --epoch 1 --seed 0 $TRAIN_FLAGS --out "$WORK/train$d" \
      > "$WORK/train$d.txt" 2>&1) || tail -30 "$WORK/train$d.txt"
  # The progress bar's cursor movements out, PrintReport's lines kept.
  sed 's/\x1b\[[0-9;]*[A-Za-z]//g' "$WORK/train$d.txt" | grep -a -E '^(epoch|1 )'
  cp "$WORK/train$d/log" "$OUT/train-deformable$d-log.json"
done

step "train_mnist.py --gpu $GPU --deformable 2 --double-backprop 0.01, one epoch of 10000 images $TRAIN_FLAGS"
(cd experiments && timeout 100 $PY train_mnist.py --gpu $GPU --deformable 2 \
    --double-backprop 0.01 --epoch 1 --train-size 10000 --test-size 2000 \
    --seed 0 $TRAIN_FLAGS --out "$WORK/double" > "$WORK/double.txt" 2>&1) \
    || tail -30 "$WORK/double.txt"
sed 's/\x1b\[[0-9;]*[A-Za-z]//g' "$WORK/double.txt" | grep -a -E '^(epoch|1 )'
cp "$WORK/double/log" "$OUT/train-double-backprop-log.json"

step "benchmarks/bench_sampler.py --gpu $GPU"
{
  timeout 110 $PY benchmarks/bench_sampler.py --gpu $GPU --repeats 7
  timeout 60 $PY benchmarks/bench_sampler.py --gpu $GPU --mode train \
      --double-backprop 0.01 --repeats 7
  # The default workspace (64 MiB) takes MNIST's l2 in 2 chunks forward,
  # 3 backward; 256 MiB and 4 GiB in one, its columns kept.
  for size in $((256 * 2**20)) $((4 * 2**30)); do
    echo "# the same with DEFORMABLE_WORKSPACE_SIZE=$size"
    DEFORMABLE_WORKSPACE_SIZE=$size timeout 60 $PY \
        benchmarks/bench_sampler.py --gpu $GPU --mode train --repeats 7
  done
  timeout 60 $PY benchmarks/bench_sampler.py --gpu $GPU --mode features --repeats 7
} 2>&1 | tee "$OUT/bench-gpu.md"

step "benchmarks/bench_gpu_layers.py --gpu $GPU: ResNet-like layers against torchvision and cuDNN"
timeout 150 $PY benchmarks/bench_gpu_layers.py --gpu $GPU 2>&1 \
    | tee "$OUT/bench-gpu-layers.md" | tail -15

step "benchmarks/bench_gpu_layers.py --gpu $GPU --workspace 4 GiB --dtypes float32: columns kept for the backward"
timeout 100 $PY benchmarks/bench_gpu_layers.py --gpu $GPU --dtypes float32 \
    --workspace $((4 * 2**30)) 2>&1 \
    | tee "$OUT/bench-gpu-layers-workspace4g.md" | tail -15

step "benchmarks/bench_gpu_kernels.py --gpu $GPU: each kernel and its bandwidth floor"
timeout 60 $PY benchmarks/bench_gpu_kernels.py --gpu $GPU --repeats 7 2>&1 \
    | tee "$OUT/bench-gpu-kernels.md" | tail -14

step 'compute-sanitizer memcheck: planted out-of-bounds read (must report errors)'
timeout 60 compute-sanitizer --tool memcheck --error-exitcode 3 \
    --print-limit 3 $PY gpu_checks/memcheck_case.py --plant-out-of-bounds \
    > "$WORK/planted.txt" 2>&1
echo "exit status $?" >> "$WORK/planted.txt"
{ echo; echo '--- the same with a planted out-of-bounds read (--plant-out-of-bounds):';
  grep -m 12 -E 'Invalid|ERROR SUMMARY|exit status|at |Address' \
      "$WORK/planted.txt"; } >> "$OUT/memcheck.txt"
grep -E 'ERROR SUMMARY|exit status' "$WORK/planted.txt"
step done
