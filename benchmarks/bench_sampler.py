#!/usr/bin/env python
"""Speed of our deformable sampler against references, in one process.

Times ``deformable.deformable_convolution_2d_sampler``, Chainer's built-in
``F.deformable_convolution_2d_sampler``, ``F.convolution_2d`` (the floor)
and, where PyTorch and torchvision are installed, torchvision's
``deform_conv2d`` back to back, round-robin, and prints medians and ratios
to the plain convolution. Ratios, not absolute times, are what carry
between runs on a noisy machine. Also reports the peak memory our op
allocates (CPU). Before timing torchvision, its output and gradients are
checked against ours, so the two compute the same thing.

    python benchmarks/bench_sampler.py                 # op, CPU
    python benchmarks/bench_sampler.py --mode train    # training steps
    python benchmarks/bench_sampler.py --mode features # DCNv2 features
    python benchmarks/bench_sampler.py --mode gradients  # which are needed
    python benchmarks/bench_sampler.py --gpu 0         # op, GPU
    DEFORMABLE_USE_NUMBA=never python benchmarks/bench_sampler.py  # pure NumPy
    python benchmarks/bench_sampler.py --baseline /tmp/before  # A/B

``--baseline DIR`` times another copy of the package (``DIR/deformable``,
e.g. a ``git worktree`` of an older commit) in the same rounds, as
``baseline`` rows, and prints ours / baseline.
"""

import argparse
import contextlib
import ctypes
import ctypes.util
import functools
import os
import platform
import random
import sys
import time
import tracemalloc

# OpenBLAS's idle threads busy-wait about 0.1 s after every call (2**28
# cycles), taking a core from the CPU op's own threads; a short wait costs
# F.convolution_2d nothing (README, Performance). Read when NumPy loads.
os.environ.setdefault('OPENBLAS_THREAD_TIMEOUT', '4')

import numpy

import chainer
import chainer.functions as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deformable  # NOQA
from deformable import backends  # NOQA
import side_by_side  # NOQA


# name: (batch, in_channels, out_channels, height, width, ksize, pad)
SHAPES = {
    'mnist-l2': (100, 32, 32, 28, 28, 3, 1),
    'mnist-l3': (100, 32, 32, 14, 14, 3, 1),
    'mid': (8, 64, 64, 56, 56, 3, 1),
    'large': (32, 64, 64, 64, 64, 3, 1),
    'wide': (32, 256, 256, 64, 64, 3, 1),
}
CPU_SHAPES = ['mnist-l2', 'mnist-l3', 'mid']
GPU_SHAPES = ['mnist-l2', 'mnist-l3', 'mid', 'large', 'wide']


def plain_convolution(x, offset, W, b, stride, pad):
    return F.convolution_2d(x, W, b, stride, pad)


IMPLEMENTATIONS = [
    ('F.convolution_2d', plain_convolution),
    ('ours', deformable.deformable_convolution_2d_sampler),
    ('chainer built-in', F.deformable_convolution_2d_sampler),
]
TORCHVISION = 'torchvision deform_conv2d'


def make_inputs(shape, xp, seed=0):
    n, c_in, c_out, h, w, k, p = shape
    rng = numpy.random.RandomState(seed)
    out_h, out_w = h + 2 * p - k + 1, w + 2 * p - k + 1
    arrays = (
        rng.uniform(-1, 1, (n, c_in, h, w)),
        rng.uniform(-2, 2, (n, 2 * k * k, out_h, out_w)),
        rng.uniform(-1, 1, (c_out, c_in, k, k)) / numpy.sqrt(c_in * k * k),
        rng.uniform(-1, 1, (c_out,)),
    )
    return [xp.asarray(a, dtype=numpy.float32) for a in arrays], p


def make_step(function, arrays, pad, backward, synchronize):
    def step():
        variables = [chainer.Variable(a) for a in arrays]
        y = function(*variables, stride=1, pad=pad)
        if backward:
            y.grad = y.array
            y.backward()
        synchronize()
    return step


def import_torchvision(gpu):
    """``(torch, torchvision.ops)``, or None where they are missing."""
    try:
        import torch
        import torchvision.ops
    except ImportError:
        return None
    if gpu >= 0 and not torch.cuda.is_available():
        return None
    return torch, torchvision.ops


def to_torchvision_offset(offset, n_taps):
    """Ours (per group ``[dx of K taps, dy of K taps]``) -> torchvision's
    interleaved ``(dy, dx)`` per tap; the README's line."""
    n, channels, out_h, out_w = offset.shape
    n_groups = channels // (2 * n_taps)
    return offset.reshape(n, n_groups, 2, n_taps, out_h, out_w)[
        :, :, ::-1].transpose(0, 1, 3, 2, 4, 5).reshape(
            n, channels, out_h, out_w)


def from_torchvision_offset(offset, n_taps):
    """torchvision's interleaved ``(dy, dx)`` -> ours; the README's line."""
    n, channels, out_h, out_w = offset.shape
    n_groups = channels // (2 * n_taps)
    return offset.reshape(n, n_groups, n_taps, 2, out_h, out_w)[
        :, :, :, ::-1].transpose(0, 1, 3, 2, 4, 5).reshape(
            n, channels, out_h, out_w)


INPUT_NAMES = ('x', 'offset', 'W', 'b', 'mask')


class TorchvisionStep(object):
    """Forward (+ backward) of ``torchvision.ops.deform_conv2d`` on the
    same data (shared through DLPack, offsets converted once, untimed).

    ``arrays`` are ``(x, offset, W, b)``; ``params`` our keyword arguments
    (``pad``, and ``dilate``, ``groups``, ``mask`` if any).
    """

    def __init__(self, modules, arrays, params, synchronize):
        self.torch, self.ops = modules
        x, offset, W, b = arrays
        self.n_taps = W.shape[2] * W.shape[3]
        xp = chainer.backend.get_array_module(x)
        offset = xp.ascontiguousarray(
            to_torchvision_offset(offset, self.n_taps))
        inputs = [x, offset, W, b]
        if params.get('mask') is not None:
            inputs.append(params['mask'])
        self.tensors = [self.torch.from_dlpack(a) for a in inputs]
        self.arrays = arrays
        self.params = params
        self.synchronize = synchronize

    def run(self, backward, gy=None):
        """Output and input tensors (their ``grad`` set with ``backward``);
        the output's gradient is ``gy`` (an array), else the output."""
        tensors = [t.detach().requires_grad_(backward) for t in self.tensors]
        x, offset, W, b = tensors[:4]
        y = self.ops.deform_conv2d(
            x, offset, W, b, padding=self.params['pad'],
            dilation=self.params.get('dilate', 1),
            mask=tensors[4] if len(tensors) == 5 else None)
        if backward:
            y.backward(y.detach() if gy is None else self.torch.from_dlpack(
                gy))
        self.synchronize()
        return y, tensors

    def step(self, backward):
        return lambda: self.run(backward)

    def max_relative_errors(self):
        """Ours against torchvision: the output and every gradient."""
        y, tensors = self.run(True)
        theirs = [y] + [t.grad for t in tensors]
        theirs = [t.detach().cpu().numpy() for t in theirs]
        theirs[2] = from_torchvision_offset(theirs[2], self.n_taps)
        ours = forward_backward_ours(self.arrays, self.params)
        ours = [chainer.backend.CpuDevice().send(a) for a in ours]
        names = ('y',) + INPUT_NAMES[:len(theirs) - 1]
        return [(name, float(numpy.abs(a - t).max() / numpy.abs(t).max()))
                for name, a, t in zip(names, ours, theirs)]


def forward_backward_ours(arrays, params):
    """Our output and the gradients of x, offset, W, b (and mask)."""
    params = dict(params)
    variables = [chainer.Variable(a) for a in arrays]
    if params.get('mask') is not None:
        params['mask'] = chainer.Variable(params['mask'])
        variables.append(params['mask'])
    y = deformable.deformable_convolution_2d_sampler(
        *variables[:4], **params)
    y.grad = y.array
    y.backward()
    return [y.array] + [v.grad for v in variables]


def check_against_torchvision(torchvision, arrays, params, label):
    """Ours and torchvision's outputs and gradients, in float64.

    In float64 they agree to rounding; in float32 a sample within an ulp
    of an integer may fall on either side of the kink of bilinear
    interpolation, which changes its offset gradient by O(1).
    """
    def to_float64(a):
        return None if a is None else a.astype(numpy.float64)
    params = {name: to_float64(value) if name == 'mask' else value
              for name, value in params.items()}
    reference = TorchvisionStep(torchvision, [to_float64(a) for a in arrays],
                                params, lambda: None)
    errors = reference.max_relative_errors()
    print('# {}: ours vs torchvision (float64), max relative error of {}'
          .format(label, ', '.join('{} {:.1e}'.format(*e) for e in errors)))
    if max(e for _, e in errors) > 1e-9:
        raise SystemExit('ours and torchvision disagree on {}: check the '
                         'offset conversion'.format(label))


def keep_freed_memory():
    """Keeps glibc's malloc from handing freed memory back to the system.

    Otherwise, when the arrays of a step are freed, the top of the heap is
    often trimmed, and whichever step comes next faults its pages in again
    (thousands of page faults, milliseconds of system time): a cost that
    falls on one implementation or another by chance. Arrays up to 32 MiB
    (glibc's largest threshold) then come from the heap, larger ones are
    mapped as before. Returns whether it took effect (glibc only).
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library('c')).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 * 2 ** 20)
                and mallopt(m_trim_threshold, 2 ** 31 - 1))


def open_gpu(gpu):
    """``(cupy, synchronize, name)`` for GPU ``gpu``, made current;
    ImportError or CUDARuntimeError where there is none."""
    import cupy
    cupy.cuda.Device(gpu).use()

    def synchronize():
        cupy.cuda.Device().synchronize()
    name = cupy.cuda.runtime.getDeviceProperties(gpu)['name']
    return cupy, synchronize, (name.decode() if isinstance(name, bytes)
                               else name)


def median_times(steps, repeats):
    """Round-robin timing: each repeat runs every step once, in an order
    shuffled from round to round (a step's predecessor changes its time:
    what it left in the caches, BLAS's threads). A step with a ``prepare``
    method has it called, untimed, before each call (e.g. the forward pass
    of a timed backward)."""
    def run(step):
        prepare = getattr(step, 'prepare', None)
        if prepare is not None:
            prepare()
        start = time.perf_counter()
        step()
        return time.perf_counter() - start

    for step in steps.values():
        run(step)  # warm-up (kernel compilation, allocator)
    times = {name: [] for name in steps}
    rng = random.Random(0)
    names = list(steps)
    for _ in range(repeats):
        rng.shuffle(names)
        for name in names:
            times[name].append(run(steps[name]))
    return {name: float(numpy.median(t)) for name, t in times.items()}


def peak_memory_mib(step):
    """Peak bytes NumPy allocates during one call beyond what existed."""
    tracemalloc.start()
    try:
        step()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak / 2 ** 20


def bench_op(args, xp, synchronize):
    shapes = GPU_SHAPES if args.gpu >= 0 else CPU_SHAPES
    implementations = [(name, f) for name, f in IMPLEMENTATIONS
                       if not (args.no_builtin and name == 'chainer built-in')]
    torchvision = import_torchvision(args.gpu)
    if torchvision is None:
        print('# torchvision: not installed (or no CUDA build); skipped')
    rows = []
    for shape_name in args.shapes or shapes:
        arrays, pad = make_inputs(SHAPES[shape_name], xp)
        reference = None
        if torchvision is not None:
            check_against_torchvision(torchvision, arrays, {'pad': pad},
                                      shape_name)
            reference = TorchvisionStep(torchvision, arrays, {'pad': pad},
                                        synchronize)
        for backward in (False, True):
            steps = {name: make_step(f, arrays, pad, backward, synchronize)
                     for name, f in implementations}
            if args.baseline is not None:
                steps[BASELINE] = args.baseline.wrap(make_step(
                    args.baseline.package.deformable_convolution_2d_sampler,
                    arrays, pad, backward, synchronize))
            if reference is not None:
                steps[TORCHVISION] = reference.step(backward)
            medians = median_times(steps, args.repeats)
            floor = medians['F.convolution_2d']
            memory = ''
            if backward and args.gpu < 0:
                memory = '{:.0f}'.format(peak_memory_mib(steps['ours']))
            for name in steps:
                rows.append((shape_name, 'fwd+bwd' if backward else 'fwd',
                             name, medians[name], medians[name] / floor,
                             memory if name == 'ours' else ''))
            print_rows(rows[-len(steps):], header=len(rows) <= len(steps))
            print_against_baseline(medians, 'ours')
    return rows


# The general op's features, one at a time, on mnist-l2's shape: keyword
# arguments and the offset groups G (dilation 2 with pad 2 keeps the size).
FEATURES = [
    ('default', {}, 1),
    ('dilate=2', {'dilate': 2, 'pad': 2}, 1),
    ('groups=2', {'groups': 2}, 1),
    ('offset groups G=4', {}, 4),
    ('mask', {'mask': True}, 1),
    ('all of them', {'dilate': 2, 'pad': 2, 'groups': 2, 'mask': True}, 4),
]


def bench_features(args, xp, synchronize):
    """Each feature's cost relative to the default (DCNv1) op, and
    torchvision's on the same features where it is installed."""
    n, c_in, c_out, h, w, k, _ = SHAPES['mnist-l2']
    rng = numpy.random.RandomState(0)
    torchvision = import_torchvision(args.gpu)
    cases = []
    for name, params, n_groups in FEATURES:
        params = dict(params)
        groups = params.get('groups', 1)
        arrays = [
            rng.uniform(-1, 1, (n, c_in, h, w)),
            rng.uniform(-2, 2, (n, 2 * n_groups * k * k, h, w)),
            rng.uniform(-1, 1, (c_out, c_in // groups, k, k)) / numpy.sqrt(
                c_in // groups * k * k),
            rng.uniform(-1, 1, (c_out,)),
        ]
        arrays = [xp.asarray(a, dtype=numpy.float32) for a in arrays]
        if params.pop('mask', False):
            params['mask'] = xp.asarray(rng.uniform(
                0, 1, (n, n_groups * k * k, h, w)), dtype=numpy.float32)
        params.setdefault('pad', 1)
        reference = None
        if torchvision is not None:
            check_against_torchvision(torchvision, arrays, params, name)
            reference = TorchvisionStep(torchvision, arrays, params,
                                        synchronize)
        cases.append((name, arrays, params, reference))
    rows = []
    for backward in (False, True):
        steps = {}
        for name, arrays, params, reference in cases:
            features = {k: v for k, v in params.items() if k != 'pad'}
            steps[name] = make_step(
                functools.partial(deformable.deformable_convolution_2d_sampler,
                                  **features),
                arrays, params['pad'], backward, synchronize)
            if args.baseline is not None:
                theirs = (args.baseline.package
                          .deformable_convolution_2d_sampler)
                steps['{}, {}'.format(name, BASELINE)] = args.baseline.wrap(
                    make_step(functools.partial(theirs, **features), arrays,
                              params['pad'], backward, synchronize))
            if reference is not None:
                steps['{}, torchvision'.format(name)] = reference.step(
                    backward)
        medians = median_times(steps, args.repeats)
        for name in steps:
            rows.append(('mnist-l2', 'fwd+bwd' if backward else 'fwd', name,
                         medians[name], medians[name] / medians['default'],
                         ''))
        print_rows(rows[-len(steps):], header=not backward)
        for name, _, _, _ in cases:
            print_against_baseline(medians, name)
    return rows


# Which inputs need gradients: all, then as in a network's first layer (x
# is data), with constant offsets, and only the weight.
GRADIENT_CASES = [
    ('all gradients', ('x', 'offset', 'W', 'b')),
    ('first layer: no gx', ('offset', 'W', 'b')),
    ('constant offsets', ('x', 'W', 'b')),
    ('W and b only', ('W', 'b')),
]


def bench_gradients(args, xp, synchronize):
    """Forward + backward when only some inputs need gradients, against
    all of them, on mnist-l2; with ``--gpu-kernels-on-cpu``, the GPU path
    (its kernels emulated on the CPU, see tests/kernel_emulation.py)."""
    arrays, pad = make_inputs(SHAPES['mnist-l2'], xp)
    names = ('x', 'offset', 'W', 'b')

    def make(needed):
        def step():
            inputs = [chainer.Variable(a) if name in needed else a
                      for name, a in zip(names, arrays)]
            y = deformable.deformable_convolution_2d_sampler(*inputs,
                                                             pad=pad)
            y.grad = y.array
            y.backward()
            synchronize()
        return step
    steps = {name: make(needed) for name, needed in GRADIENT_CASES}
    context = contextlib.nullcontext()
    if args.gpu_kernels_on_cpu:
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..',
                                        'tests'))
        import kernel_emulation
        context = kernel_emulation.gpu_path_on_cpu()
    with context:
        medians = median_times(steps, args.repeats)
    rows = [('mnist-l2', 'fwd+bwd', name, medians[name],
             medians[name] / medians['all gradients'], '')
            for name in steps]
    print_rows(rows, header=True)
    return rows


def bench_train(args, xp, synchronize):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..',
                                    'experiments'))
    from models import Convnet, DeformableConvnet, DoubleBackpropClassifier

    class BuiltinDeformableConvnet(Convnet):
        """The deformable model with Chainer's own link, for reference."""

        def _conv(self, in_channels, out_channels):
            return chainer.links.DeformableConvolution2D(
                in_channels, out_channels, 3, pad=1)

    rng = numpy.random.RandomState(0)
    x = xp.asarray(rng.uniform(0, 1, (100, 1, 28, 28)), dtype=numpy.float32)
    t = xp.asarray(rng.randint(0, 10, 100), dtype=numpy.int32)
    models = [('regular', Convnet), ('deformable', DeformableConvnet)]
    if args.double_backprop:
        models += [('regular, double backprop', Convnet),
                   ('deformable, double backprop', DeformableConvnet)]
    if not args.no_builtin:
        models.append(('deformable, chainer built-in link',
                       BuiltinDeformableConvnet))
    if args.baseline is not None:
        baseline = args.baseline.package

        class BaselineDeformableConvnet(Convnet):
            """The deformable model with the baseline's link."""

            def _conv(self, in_channels, out_channels):
                return baseline.DeformableConvolution2D(
                    in_channels, out_channels, 3, pad=1)
        models.append(('deformable, ' + BASELINE, BaselineDeformableConvnet))
    steps = {}
    for name, model_class in models:
        model = DoubleBackpropClassifier(
            model_class(), args.double_backprop if name.endswith(
                'double backprop') else 0)
        if args.gpu >= 0:
            model.to_gpu(args.gpu)
        optimizer = chainer.optimizers.Adam()
        optimizer.setup(model)

        def step(model=model, optimizer=optimizer):
            optimizer.update(model, x, t)
            synchronize()
        steps[name] = step
        if name.endswith(BASELINE):
            steps[name] = args.baseline.wrap(step)
    medians = median_times(steps, args.repeats)
    rows = [('train step', 'batch 100', name, medians[name],
             medians[name] / medians['regular'], '')
            for name in steps]
    print_rows(rows, header=True)
    print_against_baseline(medians, 'deformable')
    return rows


BASELINE = 'baseline'


def print_against_baseline(medians, name):
    """``name``'s median against its baseline's, where one was timed."""
    if name == 'ours':
        baseline = BASELINE
    else:
        baseline = '{}, {}'.format(name, BASELINE)
    if baseline in medians:
        print('# A/B {}: ours / baseline = {:.3f}'.format(
            name, medians[name] / medians[baseline]))


def print_rows(rows, header):
    if header:
        print('| shape | pass | implementation | median (s) | '
              'vs reference | peak MiB |')
        print('|---|---|---|---|---|---|')
    for shape, direction, name, seconds, ratio, memory in rows:
        print('| {} | {} | {} | {:.4f} | {:.2f}x | {} |'.format(
            shape, direction, name, seconds, ratio, memory))
    sys.stdout.flush()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--mode', choices=('op', 'train', 'features',
                                           'gradients'),
                        default='op')
    parser.add_argument('--gpu', type=int, default=-1,
                        help='GPU id; -1 (default) for CPU')
    parser.add_argument('--repeats', type=int, default=7)
    parser.add_argument('--shapes', nargs='+', choices=sorted(SHAPES),
                        help='op mode: shapes to run (default: all for '
                             'the device)')
    parser.add_argument('--no-builtin', action='store_true',
                        help="op and train modes: leave out Chainer's "
                        'built-in (slow)')
    parser.add_argument('--double-backprop', type=float, default=0,
                        metavar='LAMBDA', help='train mode: also time both '
                        "convnets with train_mnist.py's --double-backprop")
    parser.add_argument('--gpu-kernels-on-cpu', action='store_true',
                        help='gradients mode: the GPU path with its kernels '
                        'emulated on the CPU')
    parser.add_argument('--baseline', metavar='DIR',
                        help='another copy of the package (DIR/deformable), '
                        'timed beside this one')
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error('--repeats must be at least 1')
    if args.baseline is not None:
        try:
            args.baseline = side_by_side.Baseline(args.baseline)
        except (ValueError, ImportError) as e:
            parser.error('--baseline: {}'.format(e))
    heap = 'freed memory kept' if keep_freed_memory() else 'malloc as is'

    if args.gpu >= 0:
        try:
            xp, synchronize, device = open_gpu(args.gpu)
        except Exception as e:  # ImportError, CUDARuntimeError
            parser.error('--gpu {} needs CuPy and a CUDA GPU: {}'.format(
                args.gpu, e))
    else:
        xp = numpy

        def synchronize():
            pass
        loops = {'numpy': 'NumPy', 'numba': 'Numba'}[
            backends.cpu_backend().name]
        device = ('{} CPU cores, {}, {} loops, OPENBLAS_THREAD_TIMEOUT={}, '
                  '{}')
        device = device.format(os.cpu_count(), platform.processor() or
                               'x86_64', loops,
                               os.environ['OPENBLAS_THREAD_TIMEOUT'], heap)
    print('# {} mode, float32, {}; chainer {}, numpy {}; {} repeats, '
          'medians'.format(args.mode, device, chainer.__version__,
                           numpy.__version__, args.repeats))
    with chainer.using_config('use_cudnn', 'auto'):
        if args.mode == 'op':
            bench_op(args, xp, synchronize)
        elif args.mode == 'gradients':
            bench_gradients(args, xp, synchronize)
        elif args.mode == 'features':
            bench_features(args, xp, synchronize)
        else:
            bench_train(args, xp, synchronize)


if __name__ == '__main__':
    main()
