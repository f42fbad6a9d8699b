#!/usr/bin/env bash
# ChainerMN on a lent GPU machine (one GPU): ChainerMN's packing kernels
# (tests/test_chainermn_compat.py on the GPU), train_mnist.py --communicator
# pure_nccl and naive with --gpu 0 in one process, a resume, the refusal of
# two processes on one GPU, and what ChainerMN's naive communicator does with
# GPU arrays in two processes (the reason train_mnist.py refuses naive with
# --gpu on an MPI that is not CUDA-aware). Its first run (CuPy 14) stopped
# pure_nccl before the first update: ChainerMN 7.8.1's packing kernels use
# `half`, which CuPy 14's headers no longer declare; experiments/
# distributed.py now includes <cuda_fp16.h> in them. Not yet rerun since.
#
# Needs the GPU kit in .devkit/, MPI wheels included (make gpu-kit, i.e.
# gpu_checks/build_kit.sh). On the device, with .devkit/ carried along:
# bash gpu_checks/chainermn.sh
set -uo pipefail
ROOT="$PWD"
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CHAINER_WARN_VERSION_MISMATCH=0 PYTHONWARNINGS=ignore
export DEFORMABLE_MNIST_DIR="$ROOT/.devkit/mnist"
MP=/tmp/mp
step() { echo; echo "=== $1 ($(date -u +%H:%M:%S))"; }
{
step install
python3 -m pip install -q --no-index --no-deps --prefix $MP .devkit/mpi-wheels/*.whl 2>&1 | tail -3
SITE=$(ls -d $MP/lib/python3*/site-packages)
export PYTHONPATH="$ROOT/.devkit/site:$SITE:$ROOT" MPI4PY_LIBMPI=$MP/lib/libmpi.so.12 LD_LIBRARY_PATH=$MP/lib:${LD_LIBRARY_PATH:-}
MPIEXEC=$MP/bin/mpiexec
ls $MP/bin | head; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 60 python3 -c "
import sys, numpy, cupy, chainer, chainermn
from mpi4py import MPI
from chainermn import nccl
print(sys.version.split()[0], 'numpy', numpy.__version__, 'cupy', cupy.__version__, 'chainer', chainer.__version__)
print(MPI.Get_library_version().splitlines()[0], MPI.COMM_WORLD.Get_info().get('mpi_memory_alloc_kinds'))
print('nccl available', nccl._available, nccl.get_version() if nccl._available else '')
"
step "ChainerMN's packing kernels, with distributed.py's include (pytest)"
timeout 120 python3 -m pytest -q -p no:cacheprovider -rfEs \
    tests/test_chainermn_compat.py 2>&1 | tail -8; echo rc=$?
F="--deformable 1 --seed 0 --train-size 10000 --test-size 2000"
cd experiments
step 'pure_nccl, 1 process, 1 epoch'
timeout 90 $MPIEXEC -n 1 python3 train_mnist.py --communicator pure_nccl --gpu 0 $F --epoch 1 --out $OUT/pn > $OUT/pn1.txt 2>&1; echo rc=$?
sed 's/\x1b\[[0-9;]*[A-Za-z]//g' $OUT/pn1.txt | grep -a -v '^\s*$' | grep -a -v 'this epoch\|total \[\|iter\|estimated' | tail -12
step 'pure_nccl, 1 process, resumed to epoch 2'
timeout 70 $MPIEXEC -n 1 python3 train_mnist.py --communicator pure_nccl --gpu 0 $F --epoch 2 --out $OUT/pn --resume $OUT/pn/snapshot_deformable_1 > $OUT/pn2.txt 2>&1; echo rc=$?
sed 's/\x1b\[[0-9;]*[A-Za-z]//g' $OUT/pn2.txt | grep -a -E '^(epoch|[0-9] |error|Trace)' ; tail -3 $OUT/pn2.txt
step 'naive, 1 process, --gpu 0, 1 epoch'
timeout 70 $MPIEXEC -n 1 python3 train_mnist.py --communicator naive --gpu 0 $F --epoch 1 --out $OUT/nv > $OUT/nv1.txt 2>&1; echo rc=$?
sed 's/\x1b\[[0-9;]*[A-Za-z]//g' $OUT/nv1.txt | grep -a -E '^(epoch|[0-9] |error|Trace)'; tail -3 $OUT/nv1.txt
step 'no communicator, --gpu 0, 1 epoch (as the one process above?)'
timeout 70 python3 train_mnist.py --gpu 0 $F --epoch 1 --out $OUT/single > $OUT/single.txt 2>&1; echo rc=$?
sed 's/\x1b\[[0-9;]*[A-Za-z]//g' $OUT/single.txt | grep -a -E '^(epoch|[0-9] |error|Trace)'
step 'two processes on one GPU: refused'
timeout 40 $MPIEXEC -n 2 python3 train_mnist.py --communicator pure_nccl --gpu 0 $F --epoch 1 --out $OUT/two > $OUT/two.txt 2>&1; echo rc=$?
tail -4 $OUT/two.txt; ls $OUT/two 2>&1 | head -2
step 'MPI Allreduce of a CuPy array, 2 processes on GPU 0 (what naive does)'
timeout 40 $MPIEXEC -n 2 python3 -c "
import cupy, chainermn
comm = chainermn.create_communicator('naive')
cupy.cuda.Device(0).use()
a = cupy.full(4, comm.rank + 1, cupy.float32)
comm._multi_node_mean(None, a)
print(comm.rank, a)
" 2>&1 | tail -6; echo rc=$?
step done
} 2>&1 | tee "$OUT/chainermn-gpu.log"
