#!/usr/bin/env bash
# Seconds per epoch of the deformable convnet on all of scaled MNIST with one
# process and with two (ChainerMN, naive communicator), one thread each, and
# the validation accuracy of the two processes after 3 epochs. About 25
# minutes on 2 cores: run it on a quiet machine, after make venv.
#
# Both keep the original's schedule of 100 images an update (2 x 50) and 600
# updates an epoch. The single process's accuracy after 3 epochs is
# results/deformable/log's (same flags and seed), printed beside.
#
#   bash benchmarks/chainermn_epochs.sh
#   FLAGS='--train-size 2000 --test-size 500' bash benchmarks/chainermn_epochs.sh  # a dry run
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 \
    DEFORMABLE_NUM_THREADS=1
BIN=.venv/bin
OUT="${OUT:-experiments/result/chainermn}"
FLAGS="${FLAGS:-}"
rm -rf "$OUT/1-process" "$OUT/2-processes"

$BIN/python experiments/mnist_data.py
$BIN/python experiments/train_mnist.py --deformable 1 --seed 0 --epoch 1 \
    --batchsize 100 $FLAGS --out "$OUT/1-process"
$BIN/mpiexec -n 2 $BIN/python experiments/train_mnist.py \
    --communicator naive --deformable 1 --seed 0 --epoch 3 --batchsize 50 \
    $FLAGS --out "$OUT/2-processes"

$BIN/python - "$OUT" <<'EOF'
import json, os, sys

def log(path):
    with open(path) as f:
        return json.load(f)

one = log(os.path.join(sys.argv[1], '1-process', 'log'))
two = log(os.path.join(sys.argv[1], '2-processes', 'log'))
seconds = [b['elapsed_time'] - a['elapsed_time'] for a, b in zip(
    [{'elapsed_time': 0}] + two, two)]
# Epoch 1 of each includes the same one-off costs (Numba's compilation).
print('seconds of epoch 1, 1 process: {:.0f}'.format(one[0]['elapsed_time']))
print('seconds of epochs 1, 2, 3, 2 processes: {}'.format(
    ', '.join('{:.0f}'.format(s) for s in seconds)))
print('validation accuracy after 3 epochs, 2 processes: {:.4f}'.format(
    two[-1]['validation/main/accuracy']))
committed = log('results/deformable/log')[2]
print('validation accuracy after 3 epochs, 1 process '
      '(results/deformable/log): {:.4f}'.format(
          committed['validation/main/accuracy']))
EOF
