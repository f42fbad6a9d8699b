"""Runs the CUDA kernels of ``deformable/backends/gpu.py`` on the CPU (tests
only).

:func:`elementwise` stands in for ``chainer.backends.cuda.elementwise``: it
takes the very strings CuPy would compile (parameters, operation, preamble),
turns them into C++ with the semantics of CuPy's ``ElementwiseKernel`` and
compiles them with the system C++ compiler:

- a loop over ``i`` takes the place of the threads;
- a non-raw parameter is element ``i`` of its array; a ``raw`` one is the
  whole array, indexed flat and C-contiguous;
- ``T`` is instantiated for float and double;
- ``__device__`` is defined away and ``atomicAdd`` is a plain add (the loop
  is sequential).

Change a line of a kernel and what runs here changes with it: there is no
second copy. :func:`gpu_path_on_cpu` patches this and NumPy (for CuPy) into
the GPU backend, so that the nodes' ``forward_gpu`` run whole on NumPy
arrays, matrix products and bias included.

:func:`cuda_source` wraps the same strings as CUDA for ``nvcc``, with the
same parameter rules, so the tests can also compile them for real GPUs.
"""

import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import types
from unittest import mock

import numpy

from deformable.backends import gpu
from deformable import functions
from deformable import second_order


CXX = os.environ.get('CXX', 'g++')
NVCC = os.environ.get('NVCC', 'nvcc')
# The (T, C) pairs instantiated: storage and compute types (gpu.py), for
# the CPU and for CUDA; float16 is stored as half and computed in float.
# Half computed in half is there for the tests to show what that costs.
TYPE_PAIRS = [
    (numpy.float32, numpy.float32), (numpy.float64, numpy.float64),
    (numpy.float16, numpy.float32), (numpy.float16, numpy.float16)]
_C_NAMES = {numpy.float16: '_Float16', numpy.float32: 'float',
            numpy.float64: 'double'}
_CUDA_NAMES = dict(_C_NAMES)
_CUDA_NAMES[numpy.float16] = '__half'
_SCALARS = {'int32': ('int', ctypes.c_int32),
            'int64': ('long long', ctypes.c_int64)}
_PLACEHOLDERS = ('T', 'C')


class Param(object):
    """One ``ElementwiseKernel`` parameter: ``[raw] TYPE name``, TYPE a
    placeholder (``T``, ``C``) or a scalar type (an array of it if raw)."""

    def __init__(self, text, is_output):
        words = text.split()
        self.raw = words[0] == 'raw'
        if self.raw:
            words = words[1:]
        self.type, self.name = words
        self.is_output = is_output
        if self.type not in _PLACEHOLDERS and self.type not in _SCALARS:
            raise ValueError('unsupported parameter type: ' + text)

    @property
    def is_array(self):
        return self.type in _PLACEHOLDERS or self.raw

    @property
    def c_type(self):
        """Its element type in C, placeholders as they are."""
        return _SCALARS[self.type][0] if self.type in _SCALARS else self.type


def parse_params(in_params, out_params):
    """Parameters in call order: inputs, then outputs."""
    def split(text, is_output):
        return [Param(p.strip(), is_output) for p in text.split(',')]
    return split(in_params, False) + split(out_params, True)


def _function(name, params, operation, cuda):
    """The kernel as a template over T and C, with its loop or thread
    index."""
    signature = ['ptrdiff_t _begin', 'ptrdiff_t _size']
    bind = []
    for p in params:
        if not p.is_array:
            signature.append('const {} {}'.format(p.c_type, p.name))
        elif p.raw:
            signature.append('{}* {}'.format(p.c_type, p.name))
        else:
            signature.append('{}* _array_{}'.format(p.c_type, p.name))
            # Inputs by value, outputs by reference, as CuPy binds them.
            bind.append('{} {} = _array_{}[i];'.format(
                p.c_type + '&' if p.is_output else 'const ' + p.c_type,
                p.name, p.name))
    template = 'template <typename T, typename C>\n'
    if cuda:
        head = template + '__global__ void {}({})'
        loop = ('for (ptrdiff_t i = _begin + (ptrdiff_t)blockIdx.x * '
                'blockDim.x + threadIdx.x; i < _size; '
                'i += (ptrdiff_t)blockDim.x * gridDim.x)')
    else:
        head = template + 'static void {}({})'
        loop = 'for (ptrdiff_t i = _begin; i < _size; ++i)'
    return '{} {{\n  {} {{\n    {}\n    {{\n{}\n    }}\n  }}\n}}\n'.format(
        head.format(name, ', '.join(signature)), loop, '\n    '.join(bind),
        operation)


def _c_types(params, names):
    """The parameters' C types with T and C as ``names`` gives them."""
    def element(p):
        return names.get(p.type, p.c_type)
    return ['ptrdiff_t', 'ptrdiff_t'] + [
        element(p) + '*' if p.is_array else element(p) for p in params]


def _entry_name(name, pair):
    return '{}_{}_{}'.format(name, *(numpy.dtype(t).name for t in pair))


def cpu_source(in_params, out_params, operation, name, preamble):
    """C++ for one kernel, with an ``extern "C"`` entry per (T, C)."""
    params = parse_params(in_params, out_params)
    parts = [
        '#include <cmath>\n#include <cstddef>\n',
        '#define __device__\nusing std::floor;\n'
        'inline _Float16 floor(_Float16 v) { return std::floor((float)v); }\n',
        '// Threads run one after the other: atomicAdd is a plain add.\n'
        'template <typename T> T atomicAdd(T* address, T value) {\n'
        '  T old = *address; *address = old + value; return old;\n}\n',
        preamble,
        _function(name, params, operation, cuda=False),
    ]
    for pair in TYPE_PAIRS:
        names = dict(zip(_PLACEHOLDERS, (_C_NAMES[t] for t in pair)))
        arguments = ['_begin', '_size'] + [p.name for p in params]
        signature = ['{} {}'.format(t, a) for t, a in zip(
            _c_types(params, names), arguments)]
        parts.append('extern "C" void {}({}) {{ {}<{}>({}); }}\n'.format(
            _entry_name(name, pair), ', '.join(signature), name,
            ', '.join(names[t] for t in _PLACEHOLDERS),
            ', '.join(arguments)))
    return '\n'.join(parts)


def cuda_source(kernels=None, preamble=None):
    """All kernels as CUDA, instantiated for every (T, C)."""
    kernels = gpu.KERNELS if kernels is None else kernels
    preamble = gpu.PREAMBLE if preamble is None else preamble
    parts = ['#include <cstddef>\n#include <cuda_fp16.h>\n', preamble]
    for source in kernels:
        params = parse_params(source.all_in_params, source.out_params)
        parts.append(_function(source.name, params, source.body, cuda=True))
        # CuPy computes in half nowhere: positions are never half.
        for pair in [p for p in TYPE_PAIRS if p[1] != numpy.float16]:
            names = dict(zip(_PLACEHOLDERS, (_CUDA_NAMES[t] for t in pair)))
            parts.append('template __global__ void {}<{}>({});\n'.format(
                source.name, ', '.join(names[t] for t in _PLACEHOLDERS),
                ', '.join(_c_types(params, names))))
    return '\n'.join(parts)


def compiler_available(command=CXX):
    return shutil.which(command) is not None


_LIBRARIES = {}


def _build(text):
    """Compiles C++ into a shared library; cached per source text."""
    key = hashlib.sha256(text.encode()).hexdigest()
    if key not in _LIBRARIES:
        directory = tempfile.mkdtemp(prefix='deformable-kernels-')
        cpp = os.path.join(directory, 'kernel.cpp')
        library = os.path.join(directory, 'kernel.so')
        with open(cpp, 'w') as f:
            f.write(text)
        # No -ffast-math: the kernels rely on IEEE comparisons with NaN.
        result = subprocess.run(
            [CXX, '-O1', '-shared', '-fPIC', '-std=c++14', '-o', library,
             cpp], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            universal_newlines=True)
        if result.returncode:
            raise RuntimeError('a kernel does not compile:\n' + result.stdout)
        _LIBRARIES[key] = ctypes.CDLL(library)
    return _LIBRARIES[key]


class EmulatedKernel(object):
    """Called like the ``ElementwiseKernel`` CuPy would build.

    ``begin`` (tests only) runs the threads ``i`` from ``begin`` on, as if
    the ones before it had nothing to do.
    """

    def __init__(self, in_params, out_params, operation, name, preamble=''):
        self.name = name
        self.params = parse_params(in_params, out_params)
        self.library = _build(cpu_source(
            in_params, out_params, operation, name, preamble))

    def __call__(self, *args, **kwargs):
        size = kwargs.pop('size', None)
        begin = kwargs.pop('begin', 0)
        if kwargs or len(args) != len(self.params):
            raise TypeError('{}: wrong arguments'.format(self.name))
        pair = self._type_pair(args)
        dtypes = dict(zip(_PLACEHOLDERS, pair))
        elementwise = [a for p, a in zip(self.params, args)
                       if p.is_array and not p.raw]
        if size is None:
            size = elementwise[0].size
        c_args = [ctypes.c_ssize_t(begin), ctypes.c_ssize_t(size)]
        for p, a in zip(self.params, args):
            if p.is_array:
                dtype = numpy.dtype(dtypes.get(p.type, p.type))
                if a.dtype != dtype or not a.flags.c_contiguous:
                    raise TypeError('{}: {} must be C-contiguous {}'.format(
                        self.name, p.name, dtype))
                if not p.raw and a.size != size:
                    raise TypeError('{}: {} has {} elements, not {}'.format(
                        self.name, p.name, a.size, size))
                c_args.append(a.ctypes.data_as(ctypes.c_void_p))
            else:
                c_args.append(_SCALARS[p.type][1](a))
        getattr(self.library, _entry_name(self.name, pair))(*c_args)

    def _type_pair(self, args):
        """(T, C) from the first array of each; a kernel with only one of
        them takes the other from it, as a kernel would be compiled."""
        found = {}
        for p, a in zip(self.params, args):
            if p.type in _PLACEHOLDERS and p.type not in found:
                found[p.type] = a.dtype.type
        t = found.get('T', found.get('C'))
        c = found.get('C', numpy.float32 if t == numpy.float16 else t)
        if (t, c) not in TYPE_PAIRS:
            raise TypeError('{}: no kernel for T={}, C={}'.format(
                self.name, t, c))
        return t, c


def elementwise(in_params, out_params, operation, name, preamble='',
                **kwargs):
    """Stand-in for ``chainer.backends.cuda.elementwise``."""
    return EmulatedKernel(in_params, out_params, operation, name, preamble)


def planted(constant, old, new):
    """A patch of ``gpu.<constant>`` (the preamble or a kernel) with one
    piece of its text replaced: a bug planted, for tests that must catch
    it."""
    value = getattr(gpu, constant)
    text = value if isinstance(value, str) else value.operation
    assert text.count(old) == 1, (constant, old)
    text = text.replace(old, new)
    if not isinstance(value, str):
        text = value._replace(operation=text)
    return mock.patch.object(gpu, constant, text)


class _CupyOnNumpy(object):
    """NumPy standing in for CuPy, with CuPy's semantics where the two
    differ: its sorts are always stable."""

    def __getattr__(self, name):
        return getattr(numpy, name)

    @staticmethod
    def argsort(a, axis=-1):
        return numpy.argsort(a, axis=axis, kind='stable')


@contextlib.contextmanager
def gpu_path_on_cpu():
    """Runs the op's GPU code (kernels emulated, NumPy for CuPy) for NumPy
    inputs, everywhere Chainer would call ``forward_cpu``."""
    fake_cuda = types.SimpleNamespace(cupy=_CupyOnNumpy(),
                                      elementwise=elementwise)
    nodes = (functions.DeformableConvolution2DFunction,
             functions.DeformableConvolution2DGradFunction,
             second_order.SampleTaps, second_order.ScatterTaps)
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(gpu, 'cuda', fake_cuda))
        for node in nodes:
            stack.enter_context(mock.patch.object(
                node, 'forward_cpu', node.forward_gpu))
        yield
