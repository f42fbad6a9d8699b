"""gpu_checks/compile_with_cupy.py: its call sites are gpu.py's (checked on
the CPU: the GPU backend run on NumPy, each kernel call recorded), and,
where CuPy is importable, every kernel compiles through CuPy's NVRTC path
while a copy with a typo does not.

CuPy is looked for in this interpreter, or in the one named by
``CUPY_PYTHON`` (e.g. a Python 3.12 venv with cupy-cuda13x; its
environment, CUDA_PATH or LD_LIBRARY_PATH included, is this one's)."""

import contextlib
import importlib.util
import os
import subprocess
import sys
import types
from unittest import mock

import chainer
import numpy
import pytest

from deformable import arguments
from deformable.backends import gpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'gpu_checks', 'compile_with_cupy.py')

_spec = importlib.util.spec_from_file_location('compile_with_cupy', SCRIPT)
compile_with_cupy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compile_with_cupy)


def signature(args, size):
    """What CuPy's code depends on: each array's dtype, ndim and
    contiguity, which arguments are scalars, and whether ``size`` is
    given."""
    return tuple(('array', a.dtype.name, a.ndim, a.flags.c_contiguous)
                 if isinstance(a, numpy.ndarray) else ('scalar',)
                 for a in args) + (size is None,)


@contextlib.contextmanager
def recorded_calls():
    """The GPU backend on NumPy, its kernels replaced by ones that record
    their arguments: yields {(kernel name, dtype of the inputs): set of
    signatures}, filled by :func:`run_backend`."""
    calls = {}

    def elementwise(in_params, out_params, operation, name, **kwargs):
        def kernel(*args, size=None):
            calls.setdefault((name, calls['dtype']), set()).add(
                signature(args, size))
        return kernel

    # NumPy for CuPy, empty arrays zeroed: the kernels write nothing.
    fake_cupy = types.SimpleNamespace(**vars(numpy))
    fake_cupy.empty = numpy.zeros
    fake_cuda = types.SimpleNamespace(cupy=fake_cupy, elementwise=elementwise)
    with mock.patch.object(gpu, 'cuda', fake_cuda):
        yield calls


def run_backend(dtype, calls):
    """Forward, backward and the second order's taps, with a mask, in the
    default and the deterministic mode, for inputs of ``dtype``."""
    calls['dtype'] = numpy.dtype(dtype).name
    sizes = compile_with_cupy.SMALL
    n, c, h, w = (sizes[k] for k in 'nchw')
    kh, kw, G, groups = (sizes[k] for k in ('kh', 'kw', 'G', 'groups'))
    K = kh * kw
    hyper = arguments.Hyperparameters((1, 1), (1, 1), (1, 1), groups)
    rng = numpy.random.RandomState(0)
    x = rng.uniform(size=(n, c, h, w)).astype(dtype)
    offset = rng.uniform(-1, 1, (n, 2 * G * K, h, w)).astype(dtype)
    mask = rng.uniform(size=(n, G * K, h, w)).astype(dtype)
    out_group = 3
    W = rng.uniform(size=(out_group * groups, c // groups, kh, kw)
                    ).astype(dtype)
    gy = rng.uniform(size=(n, W.shape[0], h, w)).astype(dtype)
    backend = gpu.BACKEND
    for deterministic in (False, True):
        with chainer.using_config('cudnn_deterministic', deterministic):
            _, kept = backend.forward(hyper, x, offset, W, None, mask)
            backend.backward(hyper, x, offset, W, gy, mask, kept,
                             {'x', 'offset', 'mask', 'W'})
            samples = backend.sample_taps(
                hyper._replace(groups=1), x, offset[:, :2 * K], (kh, kw),
                (0, 1))
            backend.scatter_taps(
                hyper._replace(groups=1), samples, offset[:, :2 * K],
                x.shape, (kh, kw), (0, 1))


def test_call_sites_are_gpu_pys():
    """Each kernel's arguments in the script have the dtypes, dimensions
    and kinds gpu.py gives them, for every pair gpu.py uses."""
    with recorded_calls() as calls:
        for T, _ in compile_with_cupy.PAIRS.values():
            run_backend(T, calls)
    names = [source.name for source in gpu.KERNELS]
    assert sorted(set(key[0] for key in calls if key != 'dtype')) == \
        sorted(names)
    for pair, (T, C) in compile_with_cupy.PAIRS.items():
        sites = compile_with_cupy.call_sites(
            gpu, T, C, numpy.empty, **compile_with_cupy.SMALL)
        assert sorted(sites) == sorted(names)
        for name, call in sites.items():
            recorded = calls[(name, numpy.dtype(T).name)]
            if call.note and call.note.startswith('gpu.py passes T = C'):
                if T != C:
                    continue    # compiled for completeness, never called
            assert signature(call.args, call.size) in recorded, (name, pair)


def test_call_sites_match_the_parameters():
    for pair, (T, C) in compile_with_cupy.PAIRS.items():
        sites = compile_with_cupy.call_sites(
            gpu, T, C, numpy.empty, **compile_with_cupy.SMALL)
        for source in gpu.KERNELS:
            params = [p.split() for p in
                      (source.all_in_params + ', ' + source.out_params
                       ).split(',')]
            args = sites[source.name].args
            assert len(args) == len(params), source.name
            for words, arg in zip(params, args):
                kind = {'T': T, 'C': C}.get(words[-2], words[-2])
                if words[0] == 'raw' or words[-2] in 'TC':
                    assert arg.dtype == numpy.dtype(kind), (source.name,
                                                            words)
                else:
                    assert isinstance(arg, int), (source.name, words)


def test_typo_changes_only_the_operation():
    source = gpu.KERNELS[0]
    broken, word, wrong = compile_with_cupy.typo(source)
    assert word != wrong and sorted(word) == sorted(wrong)
    assert broken.operation.replace(wrong, word, 1) == source.operation
    assert broken._replace(operation=source.operation) == source


def cupy_python():
    python = os.environ.get('CUPY_PYTHON')
    if python:
        return python
    if importlib.util.find_spec('cupy') is None:
        pytest.skip('CuPy is not importable (set CUPY_PYTHON to a Python '
                    'with CuPy)')
    return sys.executable


def run_script(*args):
    path = [os.path.join(ROOT, '.devkit', 'site'), ROOT]
    env = dict(os.environ, PYTHONWARNINGS='ignore', PYTHONPATH=os.pathsep.join(
        [p for p in path if os.path.isdir(p)]
        + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep)
           if p]))
    result = subprocess.run(
        [cupy_python(), SCRIPT] + list(args), env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, universal_newlines=True, timeout=600)
    return result.returncode, result.stdout


def test_every_kernel_compiles_with_cupy():
    code, out = run_script()
    assert code == 0, out
    for source in gpu.KERNELS:
        for pair in compile_with_cupy.PAIRS:
            lines = [line for line in out.splitlines()
                     if line.split()[:2] == [source.name, pair]]
            assert len(lines) == 1 and 'FAILED' not in lines[0], (
                source.name, pair, out)
    n = len(gpu.KERNELS) * len(compile_with_cupy.PAIRS)
    assert '{} compiled, 0 failed'.format(n) in out


def test_a_typo_fails():
    name = gpu.KERNELS[-1].name
    code, out = run_script('--break', name, '--kernels', name,
                           '--pairs', 'float32/float32')
    assert code == 1, out
    assert 'FAILED' in out and 'error' in out, out
    assert '0 compiled, 1 failed' in out, out
