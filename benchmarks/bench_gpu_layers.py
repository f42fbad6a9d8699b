#!/usr/bin/env python
"""Our op on ResNet-like layers against torchvision and cuDNN, with goals.

The set: the 3x3 deformable convolutions (pad 1, stride 1, as many output
channels as input) of ResNet stages c3-c5 at classification sizes (batch
64, 224 px) and detection sizes (batch 2, about 800x1216 px), each with
and without a mask (DCNv2) and with G=1 and G=4 offset groups; float32 and
float16. For each, in one process:

- **speed**: ours, ``torchvision.ops.deform_conv2d`` and a cuDNN
  convolution of the same shape (``torch.nn.functional.conv2d``, TF32 off,
  same dtype), forward and forward + backward, and ours under
  ``chainer.using_config('cudnn_deterministic', True)`` (forward + backward
  and backward alone), round-robin medians (``bench_sampler.median_times``)
  and their ratios;
- **peak GPU memory** of one forward + backward, ours and torchvision's;
- **float16 accuracy**: inputs rounded to float16, the same values in
  float64 as the reference (ours in float64, first checked against
  torchvision in float64): the forward's error relative to the output's
  largest magnitude, and each gradient's, ours and torchvision's.

Then one summary table: each goal, its worst and median over the set and
whether it is met. torchvision and cuDNN come from PyTorch, where it is
installed: a benchmark-only reference, never a dependency.

    python benchmarks/bench_gpu_layers.py --gpu 0
    python benchmarks/bench_gpu_layers.py --smoke --gpu -1   # tiny, CPU

Time on an H200, estimated from results/gpu/bench-gpu.md scaled to these
sizes: about a minute with the defaults, under two. The timing takes
10-15 s (48 configurations and dtypes, 7 rounds each of 9 steps, 13-26 ms a
round); most of the rest is starting up (PyTorch, CUDA, CuPy compiling its
kernels on a fresh machine, cuDNN trying its algorithms on each shape).
The elapsed time is printed at the end.
"""

import argparse
import collections
import contextlib
import math
import os
import platform
import sys
import time

import numpy

import chainer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                '..'))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deformable  # NOQA
import bench_sampler  # NOQA


# name: (batch, channels, height, width) of a ResNet stage's 3x3 conv;
# classification at 224 px, detection at about 800x1216 px (strides 8-32).
LAYERS = collections.OrderedDict([
    ('cls-c3', (64, 128, 28, 28)),
    ('cls-c4', (64, 256, 14, 14)),
    ('cls-c5', (64, 512, 7, 7)),
    ('det-c3', (2, 128, 100, 152)),
    ('det-c4', (2, 256, 50, 76)),
    ('det-c5', (2, 512, 25, 38)),
])
KSIZE, PAD = 3, 1
# (mask, offset groups G) of each layer.
VARIANTS = [(False, 1), (True, 1), (False, 4), (True, 4)]
DTYPES = ('float32', 'float16')
PASSES = ((False, 'fwd'), (True, 'fwd+bwd'))

# Each goal: its name in the summary and its bound; the values are ratios
# (ours / reference) except the errors. Keys are what the sections record.
GOALS = collections.OrderedDict([
    (('fwd+bwd', 'torchvision', 'float32'),
     ('float32 fwd+bwd, ours / torchvision', 0.5)),
    (('fwd+bwd', 'cuDNN', 'float32'),
     ('float32 fwd+bwd, ours / cuDNN', 2.0)),
    (('fwd+bwd', 'torchvision', 'float16'),
     ('float16 fwd+bwd, ours / torchvision', 0.5)),
    (('fwd+bwd', 'cuDNN', 'float16'),
     ('float16 fwd+bwd, ours / cuDNN', 3.0)),
    (('fwd', 'torchvision', 'float32'),
     ('float32 fwd, ours / torchvision', 1.0)),
    (('fwd', 'torchvision', 'float16'),
     ('float16 fwd, ours / torchvision', 1.0)),
    ('memory', ('peak memory of fwd+bwd, ours / torchvision', 1.0)),
    ('deterministic', ('deterministic bwd / default bwd', 1.5)),
    ('error y', ('float16 forward error, ours', 1e-3)),
    ('error grad', ('float16 gradient error (each), ours', 1e-2)),
])

Config = collections.namedtuple('Config', 'layer shape mask n_groups')


def config_label(config):
    return '{}, G={}{}'.format(config.layer, config.n_groups,
                               ', mask' if config.mask else '')


def smoke_shape(shape):
    """A tiny stand-in for a layer: channels / 16 (still a multiple of 4
    offset groups), sides / 8 rounded up, batch at most 2, so that the
    whole set runs on a CPU in seconds."""
    n, c, h, w = shape
    return (min(n, 2), c // 16, -(-h // 8), -(-w // 8))


def make_configs(layers, smoke):
    return [Config(layer, smoke_shape(LAYERS[layer]) if smoke else
                   LAYERS[layer], mask, n_groups)
            for layer in layers for mask, n_groups in VARIANTS]


def make_inputs(config, dtype, xp, seed=0):
    """``(x, offset, W, b)``, our keyword arguments (``pad``, ``mask``) and
    an output gradient, drawn in float32 (on the device) and cast to
    ``dtype``: the float16 inputs are the float32 ones rounded."""
    n, c, h, w = config.shape
    n_taps = KSIZE * KSIZE
    rng = xp.random.RandomState(seed)

    def uniform(low, high, shape):
        return rng.uniform(low, high, shape).astype(numpy.float32).astype(
            dtype)
    # Offsets of a few pixels; weights scaled as by a fan-in initializer.
    scale = 1 / math.sqrt(c * n_taps)
    arrays = [
        uniform(-1, 1, (n, c, h, w)),
        uniform(-2, 2, (n, 2 * config.n_groups * n_taps, h, w)),
        uniform(-scale, scale, (c, c, KSIZE, KSIZE)),
        uniform(-1, 1, (c,)),
    ]
    params = {'pad': PAD}
    if config.mask:
        params['mask'] = uniform(0, 1, (n, config.n_groups * n_taps, h, w))
    return arrays, params, uniform(-1, 1, (n, c, h, w))


def cast_inputs(arrays, params, gy, dtype):
    params = {name: value.astype(dtype) if name == 'mask' else value
              for name, value in params.items()}
    return [a.astype(dtype) for a in arrays], params, gy.astype(dtype)


class OursStep(object):
    """Forward (+ backward) of our op; every input, the mask too, gets a
    gradient, as in torchvision's. ``deterministic`` runs it under
    ``chainer.using_config('cudnn_deterministic', True)``."""

    def __init__(self, arrays, params, synchronize, deterministic=False):
        self.inputs = list(arrays)
        if params.get('mask') is not None:
            self.inputs.append(params['mask'])
        self.pad = params['pad']
        self.synchronize = synchronize
        self.deterministic = deterministic
        self.pending = None  # the forward awaiting a timed backward

    def config(self):
        if not self.deterministic:
            return contextlib.nullcontext()
        return chainer.using_config('cudnn_deterministic', True)

    def run(self, backward, gy=None):
        """Output and input variables (gradients set with ``backward``);
        the output's gradient is ``gy``, else the output itself."""
        with self.config():
            variables = [chainer.Variable(a) for a in self.inputs]
            x, offset, W, b = variables[:4]
            y = deformable.deformable_convolution_2d_sampler(
                x, offset, W, b, pad=self.pad,
                mask=variables[4] if len(variables) == 5 else None)
            if backward:
                y.grad = y.array if gy is None else gy
                y.backward()
        self.synchronize()
        return y, variables

    def step(self, backward):
        return lambda: self.run(backward)

    def backward_step(self):
        """The backward alone, its forward run untimed by ``prepare``."""
        def step():
            y, variables = self.pending
            with self.config():
                y.backward()
            self.synchronize()
            self.pending = None
            return variables

        def prepare():
            self.pending = self.run(False)
            self.pending[0].grad = self.pending[0].array
        step.prepare = prepare
        return step


class CudnnStep(object):
    """A plain convolution of the same shape in PyTorch (cuDNN on a GPU) on
    the same ``x``, ``W`` and ``b``, shared through DLPack."""

    def __init__(self, torch, arrays, pad, synchronize):
        x, _, W, b = arrays
        self.torch = torch
        self.tensors = [torch.from_dlpack(a) for a in (x, W, b)]
        self.pad = pad
        self.synchronize = synchronize

    def run(self, backward):
        x, W, b = [t.detach().requires_grad_(backward) for t in self.tensors]
        y = self.torch.nn.functional.conv2d(x, W, b, padding=self.pad)
        if backward:
            y.backward(y.detach())
        self.synchronize()

    def step(self, backward):
        return lambda: self.run(backward)


def ours_outputs(arrays, params, gy):
    """Our output and gradients ``[y, x, offset, W, b(, mask)]``."""
    y, variables = OursStep(arrays, params, lambda: None).run(True, gy)
    return [y.array] + [v.grad for v in variables]


def torchvision_outputs(torchvision, arrays, params, gy):
    """torchvision's output and gradients, as ours: arrays of the inputs'
    kind (DLPack), the offset gradient in our layout."""
    xp = chainer.backend.get_array_module(arrays[0])
    step = bench_sampler.TorchvisionStep(torchvision, arrays, params,
                                         lambda: None)
    y, tensors = step.run(True, gy)
    outputs = [xp.from_dlpack(t.detach()) for t in
               [y] + [t.grad for t in tensors]]
    outputs[2] = bench_sampler.from_torchvision_offset(outputs[2],
                                                       step.n_taps)
    return outputs


def relative_error(value, reference):
    """``max |value - reference| / max |reference|``, in float64: the error
    relative to the reference's largest magnitude (elementwise relative
    errors blow up where the reference passes near zero). NaN stays NaN."""
    reference = reference.astype(numpy.float64)
    error = float(abs(value.astype(numpy.float64) - reference).max())
    scale = float(abs(reference).max())
    if scale == 0:
        return error if error == 0 or math.isnan(error) else math.inf
    return error / scale


def summarize(values, bound):
    """``(worst, median, met)`` of a goal's values (None without any); a
    NaN is the worst and fails the goal."""
    if not values:
        return None
    values = numpy.asarray(values, dtype=numpy.float64)
    worst = float(numpy.max(values))  # NaN if any is
    return worst, float(numpy.median(values)), bool(numpy.all(
        values <= bound))


def format_ratio(value):
    return '-' if value is None else '{:.2f}x'.format(value)


def format_ms(seconds):
    return '-' if seconds is None else '{:.3f}'.format(seconds * 1e3)


def format_error(value):
    return '-' if value is None else '{:.1e}'.format(value)


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


class Table(object):
    """A Markdown table printed row by row (a run cut short still shows
    what it measured), its title and header before the first row."""

    def __init__(self, title, columns):
        self.title = title
        self.columns = columns
        self.started = False

    def row(self, *cells):
        assert len(cells) == len(self.columns)
        if not self.started:
            print('\n{}\n'.format(self.title))
            print('| {} |'.format(' | '.join(self.columns)))
            print('|{}'.format('---|' * len(self.columns)))
            self.started = True
        print('| {} |'.format(' | '.join(str(c) for c in cells)))
        sys.stdout.flush()


class Device(object):
    """What the sections need from the device: the array module, a
    synchronization and peak-memory measurements."""

    def __init__(self, gpu, torch):
        self.gpu = gpu
        self.torch = torch
        if gpu >= 0:
            self.xp, self.synchronize, self.name = bench_sampler.open_gpu(gpu)
        else:
            self.xp = numpy
            self.synchronize = lambda: None
            self.name = '{} CPU cores, {}'.format(
                os.cpu_count(), platform.processor() or 'x86_64')

    def peak_ours(self, step):
        """Peak bytes of one call beyond those in use before it. On the
        GPU: the bytes in use in CuPy's memory pool (every array CuPy makes,
        which Chainer draws from that pool, in the pool's 512-byte units;
        not cuBLAS's own workspace, the CUDA context or pool memory held
        but free), read after every allocation of the call by an allocator
        wrapped around the pool's: the peak falls right after one. On the
        CPU: NumPy's allocations (tracemalloc)."""
        if self.gpu < 0:
            return bench_sampler.peak_memory_mib(step) * 2 ** 20
        cupy = self.xp
        pool = cupy.get_default_memory_pool()
        self.synchronize()
        before = pool.used_bytes()
        peak = [before]

        def malloc(size):
            memory = pool.malloc(size)
            peak[0] = max(peak[0], pool.used_bytes())
            return memory
        with cupy.cuda.using_allocator(malloc):
            step()
        return peak[0] - before

    def peak_torch(self, step):
        """Peak bytes of PyTorch's caching allocator during one call beyond
        those allocated before it (blocks in use, not those cached but
        free; the inputs shared from CuPy are not its); None on the CPU."""
        if self.gpu < 0:
            return None
        cuda = self.torch.cuda
        self.synchronize()
        before = cuda.memory_allocated()
        cuda.reset_peak_memory_stats()
        step()
        return cuda.max_memory_allocated() - before


def import_torch(gpu):
    """``(torch, torchvision.ops)`` with TF32 off, or None."""
    modules = bench_sampler.import_torchvision(gpu)
    if modules is None:
        return None
    torch = modules[0]
    # The same dtype throughout: cuDNN's convolutions and the cuBLAS
    # products inside torchvision's deform_conv2d in full float32 (CuPy's
    # use TF32 only under CUPY_TF32=1). cuDNN picks its fastest algorithm
    # for each shape (timed in the warm-up): the floor, at its best.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    if gpu >= 0:
        torch.cuda.set_device(gpu)
    return modules


def try_steps(steps, notes, label):
    """The PyTorch steps that run: each is run once, and one that raises
    (e.g. a dtype that PyTorch's CPU kernels lack) is dropped with a
    note."""
    for name, step in list(steps.items()):
        try:
            step()
        except Exception as e:  # RuntimeError, NotImplementedError
            notes.append('{}, {} {}: failed ({}: {})'.format(
                label, name[1], name[0], type(e).__name__,
                str(e).strip().split('\n')[0][:80]))
            del steps[name]
    return steps


def bench_accuracy(configs, device, torchvision, records, notes):
    """float16 error against float64 on the same rounded inputs, ours and
    torchvision's. Before it, ours against torchvision's in float64 on the
    float32 inputs: rounded to float16, some offsets are whole numbers,
    whose samples fall on a kink of bilinear interpolation, where the two
    may take different one-sided derivatives (at the image's edge)."""
    xp = device.xp
    table = Table(
        '## float16 accuracy: max error / max |float64 value|, ours / '
        'torchvision',
        ['config', 'ours vs torchvision, float64', 'y'] +
        ['grad ' + name for name in bench_sampler.INPUT_NAMES])
    for config in configs:
        label = config_label(config)
        inputs = make_inputs(config, numpy.float32, xp)
        check = '-'
        if torchvision is not None:
            data = cast_inputs(*inputs, dtype=numpy.float64)
            agreement = max(relative_error(a, t) for a, t in zip(
                ours_outputs(*data), torchvision_outputs(torchvision, *data)))
            if not agreement <= 1e-9:
                raise SystemExit('ours and torchvision disagree on {} in '
                                 'float64 ({:.1e}): check the offset '
                                 'conversion'.format(label, agreement))
            check = format_error(agreement)
        rounded = cast_inputs(*inputs, dtype=numpy.float16)
        reference = ours_outputs(*cast_inputs(*rounded,
                                              dtype=numpy.float64))
        ours = [relative_error(a, r) for a, r in zip(ours_outputs(*rounded),
                                                     reference)]
        theirs = [None] * len(ours)
        if torchvision is not None:
            try:
                theirs = [relative_error(a, r) for a, r in zip(
                    torchvision_outputs(torchvision, *rounded), reference)]
            except Exception as e:  # no float16 kernel (CPU)
                notes.append('{}, torchvision float16: failed ({})'.format(
                    label, type(e).__name__))
        records['error y'].append(ours[0])
        records['error grad'].extend(ours[1:])
        records['torchvision error y'].append(theirs[0])
        records['torchvision error grad'].extend(theirs[1:])
        cells = ['{} / {}'.format(format_error(a), format_error(t))
                 for a, t in zip(ours, theirs)]
        table.row(label, check, *(cells + ['-'] * (6 - len(cells))))


def bench_speed(configs, dtypes, device, torchvision, repeats, records,
                notes):
    """Medians of ours, torchvision and cuDNN, forward and forward +
    backward, and ours deterministic, all steps of one configuration and
    dtype in the same rounds."""
    table = Table(
        '## Speed: medians (ms) and ratios',
        ['config', 'dtype', 'pass', 'ours', 'torchvision', 'cuDNN',
         'ours / torchvision', 'ours / cuDNN', 'ours deterministic',
         'deterministic / default'])
    for config in configs:
        for dtype in dtypes:
            label = '{}, {}'.format(config_label(config), dtype)
            arrays, params, _ = make_inputs(config, dtype, device.xp)
            sync = device.synchronize
            ours = OursStep(arrays, params, sync)
            deterministic = OursStep(arrays, params, sync, True)
            steps = collections.OrderedDict()
            for backward, direction in PASSES:
                steps[direction, 'ours'] = ours.step(backward)
            steps['fwd+bwd', 'deterministic'] = deterministic.step(True)
            steps['bwd', 'ours'] = ours.backward_step()
            steps['bwd', 'deterministic'] = deterministic.backward_step()
            if torchvision is not None:
                theirs = bench_sampler.TorchvisionStep(torchvision, arrays,
                                                       params, sync)
                cudnn = CudnnStep(torchvision[0], arrays, params['pad'],
                                  sync)
                references = collections.OrderedDict()
                for backward, direction in PASSES:
                    references[direction, 'torchvision'] = theirs.step(
                        backward)
                    references[direction, 'cuDNN'] = cudnn.step(backward)
                steps.update(try_steps(references, notes, label))
            medians = bench_sampler.median_times(steps, repeats)
            for direction in ('fwd', 'fwd+bwd', 'bwd'):
                times = {name: medians.get((direction, name)) for name in (
                    'ours', 'torchvision', 'cuDNN', 'deterministic')}
                ratios = {name: ratio(times['ours'], times[name])
                          for name in ('torchvision', 'cuDNN')}
                against_default = ratio(times['deterministic'],
                                        times['ours'])
                for name, value in ratios.items():
                    if value is not None and (direction, name, dtype) in GOALS:
                        records[direction, name, dtype].append(value)
                if direction == 'bwd' and against_default is not None:
                    records['deterministic'].append(against_default)
                table.row(config_label(config), dtype, direction,
                          *[format_ms(times[name]) for name in (
                              'ours', 'torchvision', 'cuDNN')],
                          format_ratio(ratios['torchvision']),
                          format_ratio(ratios['cuDNN']),
                          format_ms(times['deterministic']),
                          format_ratio(against_default))


def bench_memory(configs, dtypes, device, torchvision, records):
    """Peak memory of one forward + backward, ours and torchvision's, each
    after a warm-up call (kernels, cuBLAS's handle and workspace)."""
    table = Table(
        '## Peak {} memory of one fwd+bwd (MiB beyond what existed before)'
        .format('GPU' if device.gpu >= 0 else 'CPU'),
        ['config', 'dtype', 'ours', 'torchvision', 'ours / torchvision'])
    for config in configs:
        for dtype in dtypes:
            arrays, params, _ = make_inputs(config, dtype, device.xp)
            ours = OursStep(arrays, params, device.synchronize).step(True)
            ours()
            peak = device.peak_ours(ours)
            theirs = None
            if torchvision is not None and device.gpu >= 0:
                step = bench_sampler.TorchvisionStep(
                    torchvision, arrays, params, device.synchronize).step(True)
                step()
                theirs = device.peak_torch(step)
            against = ratio(peak, theirs)
            if against is not None:
                records['memory'].append(against)
            table.row(config_label(config), dtype,
                      '{:.1f}'.format(peak / 2 ** 20),
                      '-' if theirs is None else '{:.1f}'.format(
                          theirs / 2 ** 20),
                      format_ratio(against))


def print_summary(records):
    table = Table('## Goals: worst and median over the set',
                  ['goal', 'bound', 'worst', 'median', 'values', 'met'])
    for key, (name, bound) in GOALS.items():
        summary = summarize(records[key], bound)
        if summary is None:
            table.row(name, '<= {:g}'.format(bound), '-', '-', 0, 'no data')
            continue
        worst, median, met = summary
        if isinstance(key, str) and key.startswith('error'):
            worst, median = format_error(worst), format_error(median)
        else:
            worst, median = format_ratio(worst), format_ratio(median)
        table.row(name, '<= {:g}'.format(bound), worst, median,
                  len(records[key]), 'yes' if met else 'NO')
    lines = []
    for what in ('y', 'grad'):
        values = [v for v in records['torchvision error ' + what]
                  if v is not None]
        if values:
            worst, median, _ = summarize(values, 0)
            lines.append('# torchvision float16 {} error (beside ours, not a '
                         'goal): worst {}, median {}'.format(
                             'forward' if what == 'y' else 'gradient',
                             format_error(worst), format_error(median)))
    if lines:
        print('\n' + '\n'.join(lines))


def main(argv=None):
    start = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--gpu', type=int, default=0,
                        help='GPU id (default 0); -1 for the CPU')
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--layers', nargs='+', choices=list(LAYERS),
                        default=list(LAYERS))
    parser.add_argument('--dtypes', nargs='+', choices=DTYPES,
                        default=list(DTYPES))
    parser.add_argument('--smoke', action='store_true',
                        help='tiny shapes (channels / 16, sides / 8, batch '
                        '<= 2): the whole script in seconds on a CPU')
    parser.add_argument('--workspace', type=int, metavar='BYTES',
                        help="chainer.config.deformable_workspace_size, the "
                        "byte limit of the op's GPU scratch (default: the "
                        "op's own)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error('--repeats must be at least 1')
    torchvision = import_torch(args.gpu)
    try:
        device = Device(args.gpu, torchvision and torchvision[0])
    except Exception as e:  # ImportError, CUDARuntimeError
        parser.error('--gpu {} needs CuPy and a CUDA GPU: {}'.format(
            args.gpu, e))
    versions = 'chainer {}, numpy {}'.format(chainer.__version__,
                                             numpy.__version__)
    if args.gpu >= 0:
        versions += ', cupy {} (CUPY_TF32={})'.format(
            device.xp.__version__, os.environ.get('CUPY_TF32', '0'))
    if torchvision is None:
        versions += ('; torchvision and cuDNN: PyTorch not installed (or no '
                     'CUDA build), skipped')
    else:
        import torchvision as tv
        torch = torchvision[0]
        versions += (', torch {}, torchvision {} (allow_tf32: cuDNN {}, '
                     'matmul {})'.format(
                         torch.__version__, tv.__version__,
                         torch.backends.cudnn.allow_tf32,
                         torch.backends.cuda.matmul.allow_tf32))
    context = contextlib.nullcontext()
    if args.workspace is not None:
        context = chainer.using_config('deformable_workspace_size',
                                       args.workspace)
    configs = make_configs(args.layers, args.smoke)
    records = collections.defaultdict(list)
    notes = []
    with context:
        print('# bench_gpu_layers{}: {}; {}; {} repeats, medians; '
              'workspace {} bytes ({})'.format(
                  ' --smoke' if args.smoke else '', device.name, versions,
                  args.repeats,
                  getattr(chainer.config, 'deformable_workspace_size', '?'),
                  'default' if args.workspace is None else '--workspace'))
        print('# set: {}; {}x{}, pad {}, channels in = out; G=1 and 4, with '
              'and without mask'.format('; '.join(
                  '{} {}'.format(layer, config.shape) for layer, config in
                  zip(args.layers, configs[::len(VARIANTS)])),
                  KSIZE, KSIZE, PAD))
        if 'float16' in args.dtypes:
            bench_accuracy(configs, device, torchvision, records, notes)
        bench_speed(configs, args.dtypes, device, torchvision, args.repeats,
                    records, notes)
        bench_memory(configs, args.dtypes, device, torchvision, records)
    print_summary(records)
    for note in notes:
        print('# note: {}'.format(note))
    print('\n# elapsed {:.1f} s'.format(time.perf_counter() - start))


if __name__ == '__main__':
    main()
