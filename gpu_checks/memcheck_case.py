#!/usr/bin/env python
"""Forward and backward on the GPU with offsets far outside the image.

Run under ``compute-sanitizer --tool memcheck``: offsets of +-1e30, +-inf,
NaN, a few image sizes away and exactly on the clamping limits push every
kernel's corner arithmetic to its edges. CuPy's memory pool is switched off
so that every array is its own allocation and an access past any array's
end is an error the sanitizer sees.

    compute-sanitizer --tool memcheck python gpu_checks/memcheck_case.py
    python gpu_checks/memcheck_case.py --plant-out-of-bounds  # must fail
"""

import argparse
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
    from deformable import _gpu

    cupy.cuda.set_allocator(None)
    if args.plant_out_of_bounds:
        check = '(0 <= y && y < h && 0 <= x && x < w) ?'
        assert _gpu.PREAMBLE.count(check) == 1
        _gpu.PREAMBLE = _gpu.PREAMBLE.replace(check, 'true ?')

    rng = numpy.random.RandomState(0)
    cases = [((2, 3, 9, 8), (4, 3, 3, 3), 1, 1),
             ((3, 2, 5, 11), (3, 2, 2, 3), (2, 1), (0, 2)),
             ((1, 4, 1, 1), (2, 4, 1, 1), 1, 0)]
    for dtype in (numpy.float32, numpy.float64, numpy.float16):
        for x_shape, w_shape, stride, pad in cases:
            n, c, h, w = x_shape
            out_c, _, kh, kw = w_shape
            sy, sx = (stride, stride) if isinstance(stride, int) else stride
            ph, pw = (pad, pad) if isinstance(pad, int) else pad
            out_h = (h + 2 * ph - kh) // sy + 1
            out_w = (w + 2 * pw - kw) // sx + 1
            arrays = (rng.uniform(-1, 1, x_shape),
                      extreme_offsets((n, 2 * kh * kw, out_h, out_w),
                                      (h, w), rng),
                      rng.uniform(-1, 1, w_shape),
                      rng.uniform(-1, 1, (out_c,)))
            variables = [chainer.Variable(cupy.asarray(a, dtype))
                         for a in arrays]
            y = deformable.deformable_convolution_2d_sampler(
                *variables, stride=stride, pad=pad)
            F.sum(y).backward()
            cupy.cuda.Device().synchronize()
            gx = cupy.asnumpy(variables[0].grad)
            assert numpy.isfinite(gx).all(), 'non-finite gradient of x'
    print('memcheck case: {} cases x 3 dtypes, forward and backward done'
          .format(len(cases)))


if __name__ == '__main__':
    main()
