"""Where the samples of a deformable convolution fall: the one definition.

Every path uses these functions: the NumPy path applies them to arrays, the
Numba loops compile the very same functions for scalars, and the CUDA
kernels (``_gpu.PREAMBLE``) mirror them line for line (the tests run those
kernels on the CPU against the NumPy path).

Tap ``k`` of output pixel ``(i, j)`` samples the input at
``y = offset_y + tap_bases(...)[k // kw, i]`` and likewise ``x`` (see
:func:`deformable.deformable_convolution_2d_sampler`); the input is
extended by zeros, and :func:`axis_geometry` turns a coordinate into the
bilinear corners and fraction.
"""

import numpy


def tap_bases(out_size, stride, pad, ksize, dilate, dtype):
    """The integer part of the sample coordinates along one axis.

    Returns:
        ``(ksize, out_size)`` array of ``dtype``: ``base[t, o] = o * stride
        - pad + t * dilate``, exact; the sample of kernel tap ``t`` at output
        ``o`` is at ``offset + base[t, o]`` (one rounding).
    """
    out = numpy.arange(out_size) * stride - pad
    taps = numpy.arange(ksize) * dilate
    return (taps[:, None] + out[None, :]).astype(dtype)


def axis_geometry(pos, low, size):
    """Lower corner, fraction and gradient flag of coordinates on one axis.

    Positions are clamped to ``[-1, size]``: beyond that both corners are
    zero, so clamping changes no value, and it keeps infinite offsets from
    overflowing an integer index. ``floor`` is capped at ``size - 1`` so the
    far corner stays inside a one-pixel zero border. A NaN position keeps a
    NaN fraction (so it poisons exactly the outputs that use it) but gets a
    valid corner. Every step is exact.

    Args:
        pos: Coordinates (array or scalar).
        low: -1, and ``size`` the image's size along the axis, both of the
            coordinates' dtype: compiled code then computes in that dtype.

    Returns:
        ``(lower, frac, inside)``: the lower corner (a float holding an
        integer in ``[-1, size - 1]``), ``pos - lower`` clamped as above,
        and whether the coordinate gradient flows (``-1 <= pos < size``;
        -1 itself included, as the gradient at an integer coordinate is the
        forward difference).
    """
    clamped = numpy.minimum(numpy.maximum(pos, low), size)
    lower = numpy.fmin(numpy.floor(clamped), size + low)
    return lower, clamped - lower, (pos >= low) & (pos < size)
