#!/usr/bin/env python
"""Forward and backward on the GPU with offsets far outside the image.

DCNv1 cases and general ones (dilation, groups, offset groups, a mask),
each in five modes: the default, the deterministic backward (in its own
blocks, in blocks of one image in one chunk, and one block a chunk) and a
workspace of one image per chunk.

Run under ``compute-sanitizer --tool memcheck``: offsets of +-1e30, +-inf,
NaN, a few image sizes away and exactly on the clamping limits push every
kernel's corner arithmetic to its edges. CuPy's memory pool is switched off
so that every array is its own allocation and an access past any array's
end is an error the sanitizer sees.

    compute-sanitizer --tool memcheck python gpu_checks/memcheck_case.py
    python gpu_checks/memcheck_case.py --plant-out-of-bounds  # must fail
"""

import argparse
import contextlib
import itertools
import os
import sys

import numpy

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))


def extreme_offsets(shape, size, rng):
    """Offsets mixing ordinary, border, huge and non-finite values."""
    h, w = size
    choices = numpy.array([
        0.0, 0.5, -0.5, -1.0, -1.5, h, w, h - 0.25, w + 0.75, h + 3.5,
        -(h + 4.5), 1e6, -1e6, 1e30, -1e30, numpy.inf, -numpy.inf,
        numpy.nan])
    offset = rng.uniform(-3, 3, shape)
    pick = rng.uniform(size=shape) < 0.5
    offset[pick] = rng.choice(choices, size=pick.sum())
    return offset


def pair(value):
    return (value, value) if isinstance(value, int) else value


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--plant-out-of-bounds', action='store_true',
                        help='drop the bounds check of pixel() first, to '
                        'show that the sanitizer catches what it should')
    args = parser.parse_args()

    import cupy
    import chainer
    import chainer.functions as F
    import deformable
    from deformable import tuning
    from deformable.backends import gpu

    cupy.cuda.set_allocator(None)
    if args.plant_out_of_bounds:
        check = '(0 <= y && y < h && 0 <= x && x < w) ?'
        assert gpu.PREAMBLE.count(check) == 1
        gpu.PREAMBLE = gpu.PREAMBLE.replace(check, 'true ?')

    default_blocks = tuning.GPU_DETERMINISTIC_BLOCK_BYTES
    rng = numpy.random.RandomState(0)
    # (x shape, W shape, stride, pad, dilate, groups, offset groups, mask)
    cases = [((2, 3, 9, 8), (4, 3, 3, 3), 1, 1, 1, 1, 1, False),
             ((3, 2, 5, 11), (3, 2, 2, 3), (2, 1), (0, 2), 1, 1, 1, False),
             ((1, 4, 1, 1), (2, 4, 1, 1), 1, 0, 1, 1, 1, False),
             ((2, 8, 9, 7), (4, 4, 3, 3), 1, 2, 2, 2, 4, True),
             ((2, 4, 6, 10), (6, 2, 2, 3), (1, 2), (1, 3), (2, 3), 2, 2,
              True)]
    # (Chainer's configuration, the deterministic mode's block bytes): 1
    # makes blocks of one image, several in a chunk or one.
    deterministic = {'cudnn_deterministic': True}
    modes = [({}, None), (deterministic, None), (deterministic, 1),
             (dict(deterministic, deformable_workspace_size=1), 1),
             ({'deformable_workspace_size': 1}, None)]
    for (mode, block_bytes), dtype in itertools.product(
            modes, (numpy.float32, numpy.float64, numpy.float16)):
        tuning.GPU_DETERMINISTIC_BLOCK_BYTES = block_bytes or default_blocks
        for (x_shape, w_shape, stride, pad, dilate, groups, offset_groups,
             with_mask) in cases:
            n, c, h, w = x_shape
            out_c, _, kh, kw = w_shape
            sy, sx = pair(stride)
            ph, pw = pair(pad)
            dy, dx = pair(dilate)
            out_h = (h + 2 * ph - dy * (kh - 1) - 1) // sy + 1
            out_w = (w + 2 * pw - dx * (kw - 1) - 1) // sx + 1
            taps = offset_groups * kh * kw
            arrays = [rng.uniform(-1, 1, x_shape),
                      extreme_offsets((n, 2 * taps, out_h, out_w), (h, w),
                                      rng),
                      rng.uniform(-1, 1, w_shape),
                      rng.uniform(-1, 1, (out_c,))]
            if with_mask:
                arrays.append(rng.uniform(-1, 2, (n, taps, out_h, out_w)))
            variables = [chainer.Variable(cupy.asarray(a, dtype))
                         for a in arrays]
            with contextlib.ExitStack() as stack:
                for name, value in mode.items():
                    stack.enter_context(chainer.using_config(name, value))
                y = deformable.deformable_convolution_2d_sampler(
                    *variables[:4], stride=stride, pad=pad, dilate=dilate,
                    groups=groups, mask=variables[4] if with_mask else None)
                F.sum(y).backward()
            cupy.cuda.Device().synchronize()
            gx = cupy.asnumpy(variables[0].grad)
            assert numpy.isfinite(gx).all(), 'non-finite gradient of x'
    print('memcheck case: {} cases x 3 dtypes x {} modes, forward and '
          'backward done'.format(len(cases), len(modes)))


if __name__ == '__main__':
    main()
