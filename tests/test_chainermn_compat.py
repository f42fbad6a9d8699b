"""experiments/distributed.py's compatibility step for ChainerMN's pure_nccl
under CuPy 14: ChainerMN 7.8.1's parameter-packing kernels use CUDA's
``half``, which CuPy 13's <cupy/carray.cuh> declared (through
<cuda_fp16.h>) and CuPy 14's does not. The step includes <cuda_fp16.h> in
their sources; here: that it does so once, that create_communicator takes it
for pure_nccl alone, that it refuses kernels it does not know, that the
sources compile with ``nvcc`` after it (and one of them not before it, under
CuPy 14's headers), and, on a GPU, that the kernels pack and unpack every
dtype pair."""

import os
import shutil
import subprocess
import sys
import types

import numpy
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'experiments'))

pytest.importorskip('mpi4py')  # ChainerMN's _memory_utility imports it
import chainer  # NOQA: E402
import chainermn  # NOQA: E402
from chainermn.communicators import _memory_utility  # NOQA: E402

import distributed  # NOQA: E402

NVCC = os.environ.get('NVCC', 'nvcc')


@pytest.fixture
def kernels():
    """Restores ChainerMN's kernel functions as they were after the test."""
    codes = dict((name, getattr(_memory_utility, name).__code__)
                 for name in distributed.HALF_KERNELS)
    yield
    for name, code in codes.items():
        getattr(_memory_utility, name).__code__ = code


def sources(monkeypatch):
    """Each kernel function's (source, name), as it passes them to
    chainer.cuda.raw (which needs a GPU: replaced)."""
    monkeypatch.setattr(chainer.backends.cuda, 'raw',
                        lambda code, name: (code, name))
    return dict((name, getattr(_memory_utility, name)())
                for name in distributed.HALF_KERNELS)


def test_includes_cuda_fp16_once(kernels, monkeypatch):
    before = sources(monkeypatch)
    distributed.declare_half_in_chainermn_kernels()
    after = sources(monkeypatch)
    codes = [getattr(_memory_utility, name).__code__
             for name in distributed.HALF_KERNELS]
    for name, (source, kernel) in after.items():
        assert kernel == before[name][1] == name.strip('_')
        assert source.count('cuda_fp16.h') == 1
        # Right after <cupy/carray.cuh>; nothing else changed.
        assert source == before[name][0].replace(
            '#include <cupy/carray.cuh>\n',
            '#include <cupy/carray.cuh>\n#include <cuda_fp16.h>  '
            '// half; CuPy 14 no longer includes it\n')
    distributed.declare_half_in_chainermn_kernels()  # a second time
    assert sources(monkeypatch) == after
    assert codes == [getattr(_memory_utility, name).__code__
                     for name in distributed.HALF_KERNELS]


def test_create_communicator_includes_it_for_pure_nccl(kernels,
                                                       monkeypatch):
    patched = []

    def create(name):  # ChainerMN's, which pure_nccl needs a GPU for
        patched.append(all('cuda_fp16.h' in source for source, _ in
                           sources(monkeypatch).values()))
        return types.SimpleNamespace(name=name)

    monkeypatch.setattr(chainermn, 'create_communicator', create)
    monkeypatch.setattr(chainermn.global_except_hook, 'add_hook',
                        lambda: None)
    for name in ('naive', 'pure_nccl', 'naive'):
        comm, device = distributed.create_communicator(name, -1)
        assert comm.name == name
    assert patched == [False, True, True]


@pytest.mark.parametrize('name', distributed.HALF_KERNELS)
def test_refuses_kernels_it_does_not_know(kernels, monkeypatch, name):
    monkeypatch.setattr(_memory_utility, name, lambda: None)
    with pytest.raises(RuntimeError, match='{} is not the CUDA kernel that '
                       'experiments/distributed.py makes compile under '
                       'CuPy 14'.format(name)):
        distributed.declare_half_in_chainermn_kernels()
    monkeypatch.delattr(_memory_utility, name)
    with pytest.raises(RuntimeError, match=name):
        distributed.declare_half_in_chainermn_kernels()


# What <cupy/carray.cuh> brings that the kernels use: CuPy 13's includes
# <cassert> and <cuda_fp16.h> (CUDA's half), CuPy 14's <cassert> alone (its
# float16 is in cupy/float16.cuh, which RawKernel sources do not get).
# Checked against the real headers of cupy-cuda12x 13.6.0 and cupy-cuda13x
# 14.2.0; where CuPy is installed, its own headers are used too.
CARRAY = {
    'cupy13': '#include <cassert>\n#include <cuda_fp16.h>\n',
    'cupy14': '#include <cassert>\n',
}


def _include_options(headers, tmp_path):
    """nvcc's options for CuPy's headers or their stand-ins, and CuPy's
    major version."""
    if headers != 'installed':
        (tmp_path / 'cupy').mkdir()
        (tmp_path / 'cupy' / 'carray.cuh').write_text(CARRAY[headers])
        return ['-I' + str(tmp_path), '--std=c++17'], int(headers[-2:])
    cupy = pytest.importorskip('cupy')
    major = int(cupy.__version__.split('.')[0])
    include = cupy._core.core._get_header_dir_path()
    return (['-I{}/cupy/_cccl/{}'.format(include, d)
             for d in ('cub', 'thrust', 'libcudacxx')]
            + ['--std=c++17' if major >= 14 else '--std=c++11',
               '-I' + include]), major


def _compile(source, options, tmp_path):
    """nvcc's output for ``source`` as CuPy's nvcc back end compiles a
    RawKernel for an H100/H200; '' where it compiled."""
    path = tmp_path / 'kern.cu'
    path.write_text(source)
    result = subprocess.run(
        [NVCC, '-gencode=arch=compute_90,code=sm_90', '--cubin']
        + options + ['-ftz=true', '-o', str(tmp_path / 'kern.cubin'),
                     str(path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        universal_newlines=True)
    return result.stdout if result.returncode else ''


@pytest.mark.skipif(shutil.which(NVCC) is None,
                    reason='needs nvcc (the CUDA compiler)')
@pytest.mark.parametrize('headers', ['cupy13', 'cupy14', 'installed'])
def test_kernels_compile(kernels, monkeypatch, tmp_path, headers):
    options, cupy_major = _include_options(headers, tmp_path)
    # Both kernels in one file (their #defines are the same).
    before = ''.join(s for s, _ in sources(monkeypatch).values())
    distributed.declare_half_in_chainermn_kernels()
    after = ''.join(s for s, _ in sources(monkeypatch).values())
    assert _compile(after, options, tmp_path) == ''
    errors = _compile(before, options, tmp_path)
    if cupy_major < 14:
        assert errors == ''
    else:  # the error pure_nccl met
        assert 'error: identifier "half" is undefined' in errors
        assert 'error: expected an expression' in errors


@pytest.mark.gpu
@pytest.mark.parametrize('dtype', ['float16', 'float32', 'float64'])
def test_kernels_pack_and_unpack_on_gpu(kernels, dtype):
    # pure_nccl's path: parameters of each dtype into one buffer of
    # ``dtype`` and back, through the included kernels. Values that float16
    # holds exactly, so that every conversion is exact.
    import cupy
    from chainermn import nccl
    if not nccl._available:  # the kernels take NCCL's dtype codes
        pytest.skip('needs NCCL (cupy.cuda.nccl), as pure_nccl does')
    distributed.declare_half_in_chainermn_kernels()
    dtypes = ['float16', 'float32', 'float64', 'float32']
    sizes = [3, 130, 7, 1]
    params = [chainer.Parameter(cupy.arange(size, dtype=d) / 4 - 5)
              for size, d in zip(sizes, dtypes)]
    data = _memory_utility.ParamsData(params, 'data', False)
    buffer = _memory_utility.DeviceMemory()
    buffer.assign(sum(sizes) * numpy.dtype(dtype).itemsize)
    _memory_utility._batched_pack_params(data, buffer, numpy.dtype(dtype))
    packed = buffer.array(sum(sizes), dtype=dtype)
    expected = numpy.concatenate([p.array.get().astype(dtype)
                                  for p in params])
    numpy.testing.assert_array_equal(packed.get(), expected)
    packed[...] = -packed / 2
    _memory_utility._batched_unpack_params(data, buffer, numpy.dtype(dtype))
    cupy.cuda.get_current_stream().synchronize()
    offsets = numpy.cumsum([0] + sizes)
    for p, d, start, stop in zip(params, dtypes, offsets, offsets[1:]):
        assert p.array.dtype == d
        numpy.testing.assert_array_equal(
            p.array.get(), (-expected[start:stop] / 2).astype(d))
