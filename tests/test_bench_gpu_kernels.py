"""benchmarks/bench_gpu_kernels.py runs (its kernels emulated on the CPU)
and prints a row of figures for every stage."""

import os
import re
import subprocess
import sys

import pytest

import kernel_emulation


ROOT = os.path.join(os.path.dirname(__file__), '..')
STAGES = ['sample_columns', 'forward product', 'weight product',
          'column gradient product', 'column_grads: gx (atomicAdd)',
          'column_grads: offsets and mask',
          'gather_corners: gx without atomics (entries, sort, gather)',
          'column_grads: both at once',
          'deterministic: forward products by block',
          'deterministic: weight products by block, added in order',
          'deterministic: column gradient products by block']


@pytest.mark.skipif(not kernel_emulation.compiler_available(),
                    reason='needs a C++ compiler')
def test_smoke_run_prints_every_stage():
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'benchmarks',
                                      'bench_gpu_kernels.py'),
         '--gpu-kernels-on-cpu', '--smoke', '--repeats', '1', '--dtypes',
         'float32', 'float16'],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        universal_newlines=True, timeout=120)
    assert result.returncode == 0, result.stdout
    tables = result.stdout.split('\n## ')[1:]
    assert len(tables) == 2
    number = r'\d+\.\d+'
    for table in tables:
        rows = [line for line in table.splitlines()
                if line.startswith('| ') and not line.startswith('| stage')]
        assert [row.split(' | ')[0][2:] for row in rows] == STAGES
        for row in rows:
            cells = row.strip('| ').split(' | ')
            assert all(re.fullmatch(number, c) for c in cells[1:5]), row


def test_needs_a_device_or_the_emulation():
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'benchmarks',
                                      'bench_gpu_kernels.py')],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        universal_newlines=True, timeout=60)
    assert result.returncode == 2
    assert '--gpu-kernels-on-cpu' in result.stdout
