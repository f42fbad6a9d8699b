#!/usr/bin/env python
"""Each kernel of the GPU path: its time beside the bytes it must move and
the floor those bytes set at the device's memory bandwidth.

For a few ResNet-like layers (3x3, pad 1) the script runs each stage of the
forward and backward alone, the default ones and the deterministic mode's,
and prints a table per layer: median time, bytes moved (each array the
stage must read or write, once), the bandwidth floor (bytes over the copy
bandwidth measured in the same process), how far above it the stage runs,
and for the matrix products their rate. The bytes are a lower bound: a
gather reads its corners more than once where caches miss.

    python benchmarks/bench_gpu_kernels.py --gpu 0
    python benchmarks/bench_gpu_kernels.py --gpu-kernels-on-cpu --smoke
"""

import argparse
import contextlib
import os
import sys
import time

import numpy

import chainer

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_sampler  # NOQA
from deformable import arguments  # NOQA
from deformable.backends import gpu  # NOQA


# name: (batch, channels in = out, height, width, offset groups, mask)
LAYERS = {
    'c3 b64 28x28': (64, 128, 28, 28, 1, False),
    'c3 b64 28x28 mask G4': (64, 128, 28, 28, 4, True),
    'c5 b64 7x7': (64, 512, 7, 7, 1, False),
    'c3 b2 100x152': (2, 128, 100, 152, 1, False),
}
SMOKE_LAYERS = {'smoke': (2, 8, 6, 7, 2, True)}


class Stage(object):
    """One kernel (or product) to time: ``run()``, the bytes it must move
    and, for products, its floating-point operations."""

    def __init__(self, name, run, nbytes, flops=0):
        self.name, self.run, self.nbytes, self.flops = name, run, nbytes, flops


def nbytes(*arrays):
    return sum(a.nbytes for a in arrays if a is not None)


def stages(xp, layer, dtype, rng):
    """The forward's and backward's stages on one layer, each on arrays
    made beforehand (so each stage runs alone), and the deterministic
    mode's images per block there."""
    n, c, h, w, n_groups, with_mask = layer
    taps = 9
    x = xp.asarray(rng.uniform(-1, 1, (n, c, h, w)), dtype)
    offset = xp.asarray(rng.uniform(-2, 2, (n, 2 * n_groups * taps, h, w)),
                        numpy.float32 if dtype == numpy.float16 else dtype)
    mask = xp.asarray(rng.uniform(0, 1, (n, n_groups * taps, h, w)),
                      offset.dtype) if with_mask else None
    W = xp.asarray(rng.uniform(-1, 1, (c, c, 3, 3)) / 30, dtype)
    gy = xp.asarray(rng.uniform(-1, 1, (n, c, h, w)), dtype)
    hyperparameters = arguments.Hyperparameters.checked(1, 1, 1, 1)
    problem = gpu.Problem(hyperparameters, x, offset, W, mask)
    args = problem.args(slice(0, n))
    compute = problem.compute_dtype
    weight = problem.weight
    _, width, out_group = weight.shape
    P = args.n_samples
    columns = gpu.sample_columns(problem.x, args).reshape(width, P)
    gy_matrix = xp.ascontiguousarray(gy.transpose(1, 0, 2, 3)).reshape(
        1, out_group, P)
    grad_columns = weight[0].dot(gy_matrix[0])
    grad_x = xp.zeros(x.shape, compute)
    grad_offset = xp.empty(offset.shape, compute)
    grad_mask = xp.empty(mask.shape, compute) if with_mask else None
    geometry = nbytes(offset, mask)
    flops = 2 * c * width * P
    result = [
        Stage('sample_columns', lambda: gpu.sample_columns(problem.x, args),
              nbytes(x, columns) + geometry),
        Stage('forward product', lambda: weight[0].T.dot(columns),
              nbytes(weight, columns, gy), flops),
        Stage('weight product', lambda: columns.dot(gy_matrix[0].T),
              nbytes(columns, gy, weight), flops),
        Stage('column gradient product',
              lambda: weight[0].dot(gy_matrix[0]),
              nbytes(weight, gy, grad_columns), flops),
        Stage('column_grads: gx (atomicAdd)',
              lambda: gpu.column_grads(problem.x, grad_columns, args,
                                       grad_x),
              nbytes(grad_columns, grad_x) + geometry),
        Stage('column_grads: offsets' + (' and mask' if with_mask else ''),
              lambda: gpu.column_grads(problem.x, grad_columns, args, None,
                                       grad_offset, grad_mask),
              nbytes(grad_columns, x, grad_offset, grad_mask) + geometry),
        Stage('gather_corners: gx without atomics (entries, sort, gather)',
              lambda: gpu.gather_corners(grad_columns, grad_x, args),
              nbytes(grad_columns, grad_x) + geometry
              # entries written, sorted (keys and places) and read
              + 4 * args.n_threads * (8 + compute.itemsize + 32)),
        Stage('column_grads: both at once',
              lambda: gpu.column_grads(problem.x, grad_columns, args,
                                       grad_x, grad_offset, grad_mask),
              nbytes(grad_columns, x, grad_x, grad_offset, grad_mask)
              + geometry),
    ]
    # The deterministic mode's products: block by block (of images set by
    # the layer), the weight's gradient added in order.
    block_images = problem.deterministic_block_images(n)
    blocks = gpu.KernelArgs(x.shape, problem.offset, problem.mask, (3, 3),
                            hyperparameters, block_images)
    blocked_columns = gpu.sample_columns(problem.x, blocks)
    column_blocks = blocks.block_views(blocked_columns)
    grad_blocks = blocks.block_views(xp.empty_like(blocked_columns))
    gy_blocks = [xp.ascontiguousarray(
        gy_matrix[0][:, first * h * w:first * h * w + size])
        for first, size, _ in blocks.blocks]
    grad_weight = xp.zeros(weight[0].shape, compute)

    def weight_products():
        grad_weight[...] = 0
        for columns_block, gy_block in zip(column_blocks, gy_blocks):
            grad_weight[...] += columns_block.dot(gy_block.T)

    def column_gradient_products():
        for gy_block, grad_block in zip(gy_blocks, grad_blocks):
            weight[0].dot(gy_block, grad_block)
    result += [
        Stage('deterministic: forward products by block',
              lambda: [weight[0].T.dot(b) for b in column_blocks],
              nbytes(weight, columns, gy), flops),
        Stage('deterministic: weight products by block, added in order',
              weight_products,
              nbytes(columns, gy) + 3 * len(gy_blocks) * grad_weight.nbytes,
              flops),
        Stage('deterministic: column gradient products by block',
              column_gradient_products,
              nbytes(weight, gy, grad_columns), flops),
    ]
    return result, block_images


def copy_bandwidth(xp, synchronize, nbytes=2 ** 29):
    """Bytes per second of a device-to-device copy (read + write)."""
    a = xp.ones(nbytes // 4, numpy.float32)
    b = xp.empty_like(a)
    times = []
    for _ in range(5):
        synchronize()
        start = time.perf_counter()
        b[...] = a
        synchronize()
        times.append(time.perf_counter() - start)
    return 2 * nbytes / min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--gpu', type=int, default=-1)
    parser.add_argument('--gpu-kernels-on-cpu', action='store_true',
                        help='run the kernels emulated on the CPU (a check '
                        'that the script works, not a measurement)')
    parser.add_argument('--smoke', action='store_true',
                        help='one tiny layer')
    parser.add_argument('--repeats', type=int, default=11)
    parser.add_argument('--dtypes', nargs='+', default=['float32', 'float16'],
                        choices=['float16', 'float32', 'float64'])
    args = parser.parse_args()
    if (args.gpu < 0) == (not args.gpu_kernels_on_cpu):
        parser.error('give one of --gpu N and --gpu-kernels-on-cpu')
    context = contextlib.nullcontext()
    if args.gpu >= 0:
        xp, synchronize, device = bench_sampler.open_gpu(args.gpu)
    else:
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..',
                                        'tests'))
        import kernel_emulation
        context = kernel_emulation.gpu_path_on_cpu()
        xp = numpy

        def synchronize():
            pass
        device = 'the CPU, kernels emulated'
    layers = SMOKE_LAYERS if args.smoke else LAYERS
    rng = numpy.random.RandomState(0)
    with context:
        bandwidth = copy_bandwidth(xp, synchronize,
                                   2 ** 22 if args.smoke else 2 ** 29)
        print('# kernels on {}; copy bandwidth {:.0f} GB/s (the floor\'s); '
              '{} repeats, medians; chainer {}'.format(
                  device, bandwidth / 1e9, args.repeats,
                  chainer.__version__))
        for dtype in args.dtypes:
            for name, layer in layers.items():
                layer_stages, block_images = stages(
                    xp, layer, numpy.dtype(dtype), rng)
                print('\n## {}, {}: batch {}, {} channels, {}x{}, G={}{}; '
                      'deterministic blocks of {} images'.format(
                          name, dtype, layer[0], layer[1], layer[2],
                          layer[3], layer[4], ', mask' if layer[5] else '',
                          block_images))
                print('| stage | ms | MB moved | floor ms | x floor | '
                      'TFLOP/s |')
                print('|---|---|---|---|---|---|')
                for stage in layer_stages:
                    def step(run=stage.run):
                        run()
                        synchronize()
                    seconds = bench_sampler.median_times(
                        {stage.name: step}, args.repeats)[stage.name]
                    floor = stage.nbytes / bandwidth
                    rate = ('{:.1f}'.format(stage.flops / seconds / 1e12)
                            if stage.flops else '')
                    print('| {} | {:.3f} | {:.1f} | {:.3f} | {:.1f} | {} |'
                          .format(stage.name, seconds * 1e3,
                                  stage.nbytes / 1e6, floor * 1e3,
                                  seconds / floor, rate))


if __name__ == '__main__':
    main()
