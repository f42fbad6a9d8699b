"""Where the samples of a deformable convolution fall: the one definition.

Every path uses these functions: the NumPy path applies them to arrays, the
Numba loops compile the very same functions for scalars, and the CUDA
kernels (``_gpu.PREAMBLE``) mirror them line for line (the tests run those
kernels on the CPU against the NumPy path).

Tap ``k`` of output pixel ``(i, j)`` samples the input at
``y = offset_y + tap_grid(i, ...)[k // kw]`` and likewise ``x`` (see
:func:`deformable.deformable_convolution_2d_sampler`); the input is
extended by zeros, and :func:`axis_geometry` turns a coordinate into the
bilinear corners and fraction.
"""

import numpy


def compute_dtype(dtype):
    """The dtype samples are computed in: float16 has too little precision
    for sample coordinates (at x = 150 it resolves an eighth of a pixel), so
    float32 for it."""
    return numpy.dtype(numpy.float32 if dtype == numpy.float16 else dtype)


def tap_grid(out, stride, pad, ksize, dilate):
    """Where the taps of outputs ``out`` fall along one axis, before their
    offsets: ``grid[t, ...] = out * stride - pad + t * dilate``.

    Args:
        out: Output coordinates, an array or a scalar (fractional ones,
            e.g. a pooled unit's centre, are allowed).

    Returns:
        ``(ksize,) + shape(out)`` array; the sample of kernel tap ``t`` at
        output ``out`` is at ``offset + grid[t]``.
    """
    out = numpy.asarray(out)
    taps = (numpy.arange(ksize) * dilate).reshape((-1,) + (1,) * out.ndim)
    return taps + (out * stride - pad)


def tap_bases(out_size, stride, pad, ksize, dilate, dtype):
    """:func:`tap_grid` of the outputs ``0 .. out_size - 1``, in ``dtype``:
    ``(ksize, out_size)``, exact (integers), so that the sample of tap ``t``
    at output ``o`` is ``offset + base[t, o]`` with one rounding."""
    return tap_grid(numpy.arange(out_size), stride, pad, ksize,
                    dilate).astype(dtype)


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
