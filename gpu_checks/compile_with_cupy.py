#!/usr/bin/env python
"""Compiles every kernel of ``deformable/backends/gpu.py`` the way CuPy
builds it, for each (T, C) type pair, with or without a GPU.

For each kernel of ``gpu.KERNELS`` and each pair (T, C) = (float32,
float32), (float64, float64), (float16, float32), it makes the arguments
``gpu.py`` passes that kernel (its call site, :func:`call_sites`: the
arrays in ``T``, ``C`` or ``int64`` with the shapes ``gpu.py`` gives them,
and the int32/int64 scalars of ``KernelArgs``; tests/test_compile_with_cupy.py
checks them against gpu.py's calls), takes the kernel object from
``gpu._kernel`` (``chainer.backends.cuda.elementwise``, i.e.
``cupy.ElementwiseKernel``) and compiles it through CuPy's own path:
``ElementwiseKernel._get_elementwise_kernel`` -> CuPy's code generation
(typedefs of T and C, ``CArray``/``CIndexer`` parameters, the preamble, the
loop) -> ``compile_with_cache`` (CuPy's headers and compiler options) ->
``cupy.cuda.compiler`` -> NVRTC. One line per (kernel, pair); the exit
status is 1 if any failed.

``ElementwiseKernel.__call__`` asks the device for its id before anything
else, so without a GPU the script does the few steps of ``__call__`` that
precede the compilation itself, with CuPy's own pieces where they are
reachable from Python: ``_decide_params_type`` for the typedefs and, for
each argument, the ``_ArgInfo`` that ``__call__`` derives (dtype, ndim,
contiguity and 32-bit indexing read from ``cupy.ndarray`` objects over
unallocated memory; scalars typed by ``CScalar.apply_dtype`` on CuPy 14,
as the numpy type on CuPy 13; the dimension reduction of non-raw arrays;
the ``CIndexer``). Without a device it also replaces:

- the GPU-architecture lookup (``compiler._get_arch``) by ``--arch``
  (default 90: the H100/H200), and the per-device memo around
  ``_get_arch_for_options_for_nvrtc`` and ``_kernel._get_elementwise_kernel``
  by the functions they wrap;
- the module load after NVRTC: the compilation stops with the cubin;
- where Chainer found no CUDA, its check in ``cuda.elementwise``.

Everything else -- the source, the options, NVRTC -- is CuPy's. With a
device none of that is replaced: each kernel is compiled for the device
and loaded, then launched once by CuPy's own ``__call__`` on small zeroed
arrays (``--no-launch`` skips that), and the source ``__call__`` built is
compared with the one built here from the same arguments.

The kernel cache is a fresh temporary directory, so that nothing is
loaded from an earlier build.

    PYTHONPATH=.devkit/site:. python gpu_checks/compile_with_cupy.py
    ... --pairs float16/float32 --kernels deformable_column_grads
    ... --index64     # also with arrays past 2**31 bytes (64-bit indexing)
    ... --dump DIR    # each source as NVRTC got it, options, cubin
    ... --break deformable_column_grads   # a typo in a copy: must fail
"""

import argparse
import collections
import os
import re
import shutil
import sys
import tempfile

import numpy

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
sys.path.insert(0, ROOT)

PAIRS = collections.OrderedDict([
    ('float32/float32', (numpy.float32, numpy.float32)),
    ('float64/float64', (numpy.float64, numpy.float64)),
    ('float16/float32', (numpy.float16, numpy.float32)),
])

# _ArgKind in cupy/_core/_kernel.pxd (the same in CuPy 13 and 14).
ARG_KIND_NDARRAY, ARG_KIND_INDEXER, ARG_KIND_SCALAR = 1, 2, 3

Call = collections.namedtuple('Call', 'args size note')


# The problem the arguments describe: n images of c channels, h x w, a
# kh x kw kernel, G offset groups, `groups` convolution groups, a mask.
SMALL = dict(n=2, c=4, h=5, w=6, kh=3, kw=3, G=2, groups=2)
# Enough images that x, the offsets and the columns pass 2**31 bytes and
# the loop 2**31 threads: CuPy then indexes them with 64 bits.
LARGE = dict(SMALL, n=1 << 24)


def call_sites(gpu, T, C, make, n, c, h, w, kh, kw, G, groups):
    """The arguments ``gpu.py`` passes each kernel, by kernel name: arrays
    from ``make(shape, dtype)``, ``T`` where ``gpu.py`` has the storage
    type, ``C`` where it has the compute type."""
    K = kh * kw
    out_h, out_w = h, w                       # stride 1, pad 1, dilate 1
    hyper = ((1, 1), (1, 1), (1, 1), groups)
    x = make((n, c, h, w), T)
    offset = make((n, 2 * G * K, out_h, out_w), C)
    mask = make((n, G * K, out_h, out_w), C)
    default = gpu.KernelArgs(x.shape, offset, mask, (kh, kw), hyper)
    # The deterministic mode's: blocks of an image.
    blocks = gpu.KernelArgs(x.shape, offset, mask, (kh, kw), hyper,
                            block_images=1)
    # sample_taps / scatter_taps: no mask, one group.
    taps = gpu.KernelArgs(x.shape, offset, None, (kh, kw),
                          hyper[:3] + (1,))
    taps_note = 'gpu.py passes T = C here (the compute type)'
    entries = 4 * blocks.n_threads
    return {
        # sample_columns: x, the columns' blocks (flat).
        'deformable_sample_columns': Call(
            (x,) + default.args + (make((default.columns_size,), T),),
            default.n_threads, None),
        # column_grads, x and the offsets and mask wanted: the column
        # gradient, laid out as the columns.
        'deformable_column_grads': Call(
            (x, make((default.columns_size,), T), 1, 1) + default.args
            + (make(x.shape, C), make(offset.shape, C),
               make(mask.shape, C)),
            default.n_threads, None),
        # GpuBackend.sample_taps: z and its samples (n, c, K, out_h, out_w).
        'deformable_sample_taps': Call(
            (x, 0, 1) + taps.args + (make((n, c, K, out_h, out_w), T),),
            taps.n_threads, taps_note),
        # GpuBackend.scatter_taps: the samples, the gradient of z.
        'deformable_scatter_taps': Call(
            (make((n, c, K, out_h, out_w), T), 0, 1) + taps.args
            + (make(x.shape, C),),
            taps.n_threads, taps_note),
        # gather_corners (deterministic backward): keys and weights.
        'deformable_corner_entries': Call(
            (0, 0) + blocks.args
            + (make((entries,), numpy.int64), make((entries,), C)),
            blocks.n_threads, 'no T parameter'),
        # gather_corners: the column gradient in blocks, argsort's and
        # searchsorted's int64 arrays.
        'deformable_gather_corners': Call(
            (make((blocks.columns_size,), T),
             make((entries,), numpy.int64),
             make((blocks.n_keys + 1,), numpy.int64),
             make((entries,), C), 0) + blocks.args + (make(x.shape, C),),
            n * c * h * w, None),
    }


def typo(source):
    """A copy of ``source`` with a typo: the second and third letters of
    the operation's first long identifier swapped."""
    match = re.search(r'[A-Za-z_]\w{4,}', source.operation)
    word = match.group(0)
    wrong = word[0] + word[2] + word[1] + word[3:]
    operation = (source.operation[:match.start()] + wrong
                 + source.operation[match.end():])
    return source._replace(operation=operation), word, wrong


class _Compiled(Exception):
    """Stops CuPy after NVRTC, before the module load (no device)."""


class Recorder(object):
    """Wraps ``cupy.cuda.compiler._NVRTCProgram.compile``: keeps the last
    kernel source, options and cubin NVRTC saw; ``stop``: raise
    :class:`_Compiled` after a successful compilation."""

    def __init__(self, compiler, stop):
        self.compiler = compiler
        self.stop = stop
        self.original = compiler._NVRTCProgram.compile
        self.reset()
        recorder = self

        def compile(program, options=(), log_stream=None):
            kernel = '__global__' in program.src
            try:
                result = recorder.original(program, options, log_stream)
            except compiler.CompileException:
                if kernel:
                    recorder.source, recorder.options = program.src, options
                raise
            if kernel:
                recorder.source, recorder.options = program.src, options
                recorder.binary = result[0]
                if recorder.stop:
                    raise _Compiled()
            return result

        compiler._NVRTCProgram.compile = compile

    def reset(self):
        self.source = self.options = self.binary = None


def without_device(cupy, compiler, kernel_module, arch):
    """The replacements that let CuPy compile with no device (see the
    module's docstring)."""
    compiler._get_arch = lambda: arch
    compiler._get_arch_for_options_for_nvrtc = (
        compiler._get_arch_for_options_for_nvrtc.__wrapped__)
    kernel_module._get_elementwise_kernel = (
        kernel_module._get_elementwise_kernel.__wrapped__)


def chainer_elementwise(cupy):
    """Lets ``chainer.backends.cuda.elementwise`` (``gpu._kernel``) make
    kernels where Chainer found no CUDA (no driver, no cuBLAS): it is
    ``cupy.ElementwiseKernel`` behind that check."""
    from chainer.backends import cuda
    if not cuda.available:
        cuda.check_cuda_available = lambda: None
        cuda.cupy = cupy


def fake_array_maker(cupy, device_id):
    """``make(shape, dtype)``: a ``cupy.ndarray`` over memory that is never
    allocated (its address is never used)."""
    from cupy.cuda import memory

    def make(shape, dtype):
        dtype = numpy.dtype(dtype)
        size = max(1, int(numpy.prod(shape, dtype=object)) * dtype.itemsize)
        mem = memory.UnownedMemory(1 << 40, size, None, device_id)
        return cupy.ndarray(shape, dtype,
                            memptr=memory.MemoryPointer(mem, 0))
    return make


def arg_infos(cupy, kernel, args, size):
    """The type map and ``_ArgInfo`` tuple ``ElementwiseKernel.__call__``
    derives from ``args`` (cupy/_core/_kernel.pyx, v13.6.0 and v14.2.0)
    before it compiles."""
    from cupy._core import _kernel, _scalar
    from cupy._core import _carray
    new = hasattr(_scalar.CScalar, 'descr')     # CuPy 14: dtypes, CScalar
    if len(args) != kernel.nargs:
        raise TypeError('{} takes {} arguments, given {}'.format(
            kernel.name, kernel.nargs, len(args)))

    def dtype(a):
        return a.dtype if new else a.dtype.type

    in_args, out_args = args[:kernel.nin], args[kernel.nin:]
    in_types, out_types, type_map = kernel._decide_params_type(
        tuple(dtype(a) if isinstance(a, cupy.ndarray) else None
              for a in in_args),
        tuple(dtype(a) for a in out_args))
    # gpu.py gives every kernel a size and raw arrays only: CuPy's loop is
    # then one dimension of `size`, each array passed as it is.
    if size is None or any(not p.raw and isinstance(a, cupy.ndarray)
                           for p, a in zip(kernel.params, args)):
        raise NotImplementedError('a call without size or with non-raw '
                                  'arrays')
    infos = []
    for a, t in zip(args, in_types + out_types):
        if isinstance(a, cupy.ndarray):
            infos.append(_kernel._ArgInfo(
                ARG_KIND_NDARRAY, type(a), dtype(a), a.ndim,
                a._c_contiguous, a._index_32_bits))
        else:
            if new:
                scalar = _scalar.CScalar(a)
                scalar.apply_dtype(t)
                scalar_type = scalar.descr
            else:
                scalar_type = numpy.dtype(t).type
            infos.append(_kernel._ArgInfo(
                ARG_KIND_SCALAR, _scalar.CScalar, scalar_type, 0, True,
                True))
    infos.append(_kernel._ArgInfo(
        ARG_KIND_INDEXER, _carray.Indexer, None, 1, True, size <= 1 << 31))
    return type_map, tuple(infos)


def error_lines(message, source=None, limit=4):
    """NVRTC's first error lines and, from ``source``, the line of the
    first error."""
    lines = [line.strip() for line in str(message).splitlines()
             if 'error' in line]
    lines = lines[:limit] or str(message).strip().splitlines()[:1]
    at = re.search(r'\((\d+)\): (catastrophic )?error', '\n'.join(lines))
    if at and source:
        number = int(at.group(1))
        code = source.splitlines()
        if 0 < number <= len(code):
            lines.append('line {} of the source: {}'.format(
                number, code[number - 1].strip()))
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--pairs', nargs='+', choices=list(PAIRS),
                        default=list(PAIRS), help='(T, C) pairs')
    parser.add_argument('--kernels', nargs='+', metavar='NAME',
                        help='kernel names (default: all of gpu.KERNELS)')
    parser.add_argument('--index64', action='store_true',
                        help='also compile with arrays past 2**31 bytes '
                        '(never allocated, never launched)')
    parser.add_argument('--arch', default='90',
                        help='compute capability without a device '
                        '(default 90)')
    parser.add_argument('--no-device', action='store_true',
                        help='compile as if there were no device')
    parser.add_argument('--no-launch', action='store_true',
                        help='on a device, compile and load only')
    parser.add_argument('--dump', metavar='DIR',
                        help='write each source NVRTC got, with its '
                        'options, and its cubin')
    parser.add_argument('--break', dest='broken', metavar='NAME',
                        action='append', default=[],
                        help='compile a copy of kernel NAME with a typo '
                        '(the run must then fail)')
    args = parser.parse_args(argv)

    cache = tempfile.mkdtemp(prefix='cupy-kernel-cache-')
    os.environ['CUPY_CACHE_DIR'] = cache      # read when CuPy is imported
    try:
        return run(args)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def run(args):
    try:
        import cupy
        from cupy.cuda import compiler
        from cupy._core import _kernel
    except ImportError as e:
        print('CuPy is not importable: {}'.format(e))
        return 2
    device = False
    if not args.no_device:
        try:
            device = cupy.cuda.runtime.getDeviceCount() > 0
        except Exception:
            device = False
    if not device:
        without_device(cupy, compiler, _kernel, args.arch)
    chainer_elementwise(cupy)
    from deformable.backends import gpu

    launch = device and not args.no_launch
    recorder = Recorder(compiler, stop=not device)
    device_id = cupy.cuda.runtime.getDevice() if device else 0
    nvrtc = '.'.join(map(str, compiler._get_nvrtc_version()))
    if device:
        props = cupy.cuda.runtime.getDeviceProperties(device_id)
        gpu_name = props['name']
        if isinstance(gpu_name, bytes):
            gpu_name = gpu_name.decode()
        where = 'device {} ({}), sm_{}{}'.format(
            device_id, gpu_name, props['major'], props['minor'])
    else:
        where = ('no device: sm_{} (CuPy asks the device otherwise), '
                 'stopped before the module load'.format(args.arch))
    print('CuPy {}, NVRTC {}, {}'.format(cupy.__version__, nvrtc, where))

    sources = collections.OrderedDict((s.name, s) for s in gpu.KERNELS)
    names = args.kernels or list(sources)
    for name in names + args.broken:
        if name not in sources:
            print('unknown kernel {!r} (gpu.KERNELS: {})'.format(
                name, ', '.join(sources)))
            return 2
    for name in args.broken:
        sources[name], word, wrong = typo(sources[name])
        print('{}: compiling a copy with a typo ({} -> {})'.format(
            name, word, wrong))
    if args.dump:
        os.makedirs(args.dump, exist_ok=True)

    fake = fake_array_maker(cupy, device_id)
    variants = [('', SMALL)] + ([(' i64', LARGE)] if args.index64 else [])
    failed = compiled = 0
    options_shown = False
    for name in names:
        kernel = gpu._kernel(sources[name])
        for pair in args.pairs:
            T, C = PAIRS[pair]
            for suffix, sizes in variants:
                label = '{:<28} {:<16}'.format(name, pair + suffix)
                sites = call_sites(gpu, T, C, fake, **sizes)
                if name not in sites:
                    print('{} FAILED: no call site for this kernel in '
                          'gpu_checks/compile_with_cupy.py'.format(label))
                    failed += 1
                    continue
                call = sites[name]
                note = ''
                if call.note and T != C:
                    note = '  [{}]'.format(call.note)
                recorder.reset()
                try:
                    type_map, infos = arg_infos(cupy, kernel, call.args,
                                                call.size)
                    how = compile_and_check(
                        cupy, gpu, _kernel, kernel, name, T, C, call,
                        type_map, infos, recorder, device_id, device,
                        launch and not suffix, sizes)
                except _Compiled:
                    how = 'compiled'
                except compiler.CompileException as e:
                    failed += 1
                    print('{} FAILED (CuPy {}): NVRTC'.format(
                        label, cupy.__version__))
                    for line in error_lines(e, recorder.source):
                        print('    ' + line)
                    options_shown = show_options(recorder, options_shown)
                    dump(args.dump, name, pair + suffix, recorder)
                    continue
                except Exception as e:
                    failed += 1
                    print('{} FAILED (CuPy {}): {}: {}'.format(
                        label, cupy.__version__, type(e).__name__, e))
                    continue
                compiled += 1
                if recorder.binary is not None:
                    how += ' (cubin {} bytes)'.format(len(recorder.binary))
                print('{} {}{}'.format(label, how, note))
                options_shown = show_options(recorder, options_shown)
                dump(args.dump, name, pair + suffix, recorder)
    print('{} compiled, {} failed (CuPy {})'.format(
        compiled, failed, cupy.__version__))
    return 1 if failed else 0


def compile_and_check(cupy, gpu, kernel_module, kernel, name, T, C, call,
                      type_map, infos, recorder, device_id, device, launch,
                      sizes):
    """Compiles ``kernel`` for ``infos`` through CuPy; with ``launch``,
    first by CuPy's own ``__call__`` on zeroed arrays, then checks that
    the source built here is the one ``__call__`` built."""
    if not launch:
        kernel._get_elementwise_kernel(device_id, infos, type_map)
        if not device:
            raise AssertionError('no compilation happened')
        return 'compiled, loaded' if recorder.source else \
            'loaded (same source as an earlier pair)'
    real = call_sites(gpu, T, C, lambda shape, dtype: cupy.zeros(
        shape, dtype), **sizes)[name]
    recorder.reset()
    kernel(*real.args, size=real.size)
    cupy.cuda.get_current_stream().synchronize()
    ours = kernel_module._get_elementwise_kernel_code(
        infos, type_map, kernel.params, kernel.operation, kernel.name,
        kernel.preamble, **kernel.kwargs)
    if recorder.source is None:
        return 'launched (same source as an earlier pair)'
    if not recorder.source.endswith(ours):
        raise AssertionError('CuPy built another source than the one '
                             'built here from the same arguments')
    return 'compiled, loaded, launched; same source as here'


def show_options(recorder, shown):
    """Prints NVRTC's options the first time there are some."""
    if recorder.options is None or shown:
        return shown
    print('    NVRTC options: ' + ' '.join(recorder.options))
    return True


def dump(directory, name, pair, recorder):
    if not directory or recorder.source is None:
        return
    path = os.path.join(directory, '{}.{}'.format(
        name, pair.replace('/', '-').replace(' ', '.')))
    with open(path + '.cu', 'w') as f:   # NVRTC's line numbers hold
        f.write(recorder.source)
        f.write('\n// NVRTC options: {}\n'.format(' '.join(recorder.options)))
    if recorder.binary is not None:
        with open(path + '.cubin', 'wb') as f:
            f.write(recorder.binary)


if __name__ == '__main__':
    sys.exit(main())
