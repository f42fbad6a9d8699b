#!/usr/bin/env python
"""The deterministic mode's promise at the benchmark's sizes: the same
gradients, bit for bit, across runs and across chunk sizes.

``tests/test_gpu_modes.py`` checks it on small shapes. The deterministic
mode makes its products in blocks of images set by the layer, so that
cuBLAS, which chooses its algorithms by shape, sees the same products in
any chunk; this runs the layers of ``benchmarks/bench_gpu_layers.py`` at
workspaces that put one block, the default's share and the whole batch in
a chunk, and compares every result with the first run's. The default mode
(atomicAdd) is shown beside it for contrast. Exit status 1 where a
deterministic gradient differs.

    python gpu_checks/deterministic_bits.py --gpu 0
    python gpu_checks/deterministic_bits.py --smoke --gpu -1   # tiny, CPU
"""

import argparse
import contextlib
import os
import sys

import numpy

import chainer

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
import bench_gpu_layers  # NOQA
from deformable.backends import gpu  # NOQA

# (label, workspace bytes or None for the default)
WORKSPACES = [('default, again', None), ('1 byte', 1),
              ('4 GiB', 4 * 2 ** 30)]
VARIANTS = [(False, 1), (True, 4)]
NAMES = ('y', 'x', 'offset', 'W', 'b', 'mask')


def difference(array, reference):
    """``same`` where the two are the same bits (NaN where NaN), else the
    largest difference relative to the reference's largest magnitude."""
    xp = chainer.backend.get_array_module(reference)
    if array.dtype == reference.dtype and bool(xp.all(
            (array == reference) | (xp.isnan(array) & xp.isnan(reference)))):
        return 'same'
    return bench_gpu_layers.format_error(
        bench_gpu_layers.relative_error(array, reference))


class ChunkRecorder(object):
    """Wraps ``gpu.chunks`` to note the images per chunk of the last call
    (the backward's) and per block."""

    def __init__(self):
        self.chunks = gpu.chunks
        self.last = []
        self.block_images = None

    def __call__(self, n_images, bytes_per_image, block_images=None):
        self.last = self.chunks(n_images, bytes_per_image, block_images)
        self.block_images = block_images
        return self.last

    def describe(self):
        """``3 of 8 + 1 of 4 (blocks of 4)``: three chunks of 8 images
        and one of 4, in the deterministic mode's blocks of 4."""
        sizes = [s.stop - s.start for s in self.last]
        if not sizes:
            return '-'
        blocks = ('' if self.block_images is None else
                  ' (blocks of {})'.format(self.block_images))
        return ' + '.join('{} of {}'.format(sizes.count(size), size)
                          for size in sorted(set(sizes), reverse=True)) \
            + blocks


def results(step, gy, workspace):
    """Output and gradients of one forward + backward, by name."""
    context = contextlib.nullcontext() if workspace is None else \
        chainer.using_config('deformable_workspace_size', workspace)
    with context:
        y, variables = step.run(True, gy)
    found = {'y': y.array}
    found.update((name, v.grad) for name, v in zip(NAMES[1:], variables))
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--gpu', type=int, default=0,
                        help='GPU id (default 0); -1 for the CPU')
    parser.add_argument('--layers', nargs='+',
                        choices=list(bench_gpu_layers.LAYERS),
                        default=list(bench_gpu_layers.LAYERS))
    parser.add_argument('--dtypes', nargs='+',
                        choices=bench_gpu_layers.DTYPES,
                        default=list(bench_gpu_layers.DTYPES))
    parser.add_argument('--smoke', action='store_true',
                        help="bench_gpu_layers.py's tiny shapes")
    args = parser.parse_args(argv)
    try:
        device = bench_gpu_layers.Device(args.gpu, None)
    except Exception as e:  # ImportError, CUDARuntimeError
        parser.error('--gpu {} needs CuPy and a CUDA GPU: {}'.format(
            args.gpu, e))
    recorder = ChunkRecorder()
    gpu.chunks = recorder
    print('# deterministic_bits{}: {}; default workspace {} bytes'.format(
        ' --smoke' if args.smoke else '', device.name,
        chainer.config.deformable_workspace_size))
    table = bench_gpu_layers.Table(
        '## Each result against the first run, bit for bit',
        ['layer', 'dtype', 'mode', 'workspace', 'backward chunks']
        + list(NAMES))
    differing = []
    try:
        for config in bench_gpu_layers.make_configs(args.layers, args.smoke):
            if (config.mask, config.n_groups) not in VARIANTS:
                continue
            arrays, params, gy = bench_gpu_layers.make_inputs(
                config, numpy.float32, device.xp)
            for dtype in args.dtypes:
                inputs = bench_gpu_layers.cast_inputs(arrays, params, gy,
                                                      dtype)
                for deterministic in (True, False):
                    step = bench_gpu_layers.OursStep(
                        inputs[0], inputs[1], device.synchronize,
                        deterministic)
                    first = results(step, inputs[2], None)
                    for label, workspace in WORKSPACES:
                        other = results(step, inputs[2], workspace)
                        cells = [difference(other[n], first[n])
                                 if n in first else '-' for n in NAMES]
                        mode = 'deterministic' if deterministic else \
                            'default'
                        table.row(bench_gpu_layers.config_label(config),
                                  dtype, mode, label, recorder.describe(),
                                  *cells)
                        if deterministic and any(
                                cell not in ('same', '-')
                                for cell in cells[1:]):
                            differing.append((config, dtype, label))
    finally:
        gpu.chunks = recorder.chunks
    print('\nDeterministic gradients that differ from the first run: {}'
          .format(len(differing) or 'none'))
    return 1 if differing else 0


if __name__ == '__main__':
    sys.exit(main())
