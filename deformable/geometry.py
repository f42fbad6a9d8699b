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


def corner_weights(frac_y, frac_x, inside_y, inside_x, order_y, order_x,
                   one):
    """The weights of a sample's four corners (00, 01, 10, 11) in its
    derivative of order ``(order_y, order_x)`` (each 0 or 1) with respect
    to its coordinates.

    Order ``(0, 0)`` gives the bilinear weights themselves; ``(1, 0)``,
    d/dy, ``(-(1 - fx), -fx, 1 - fx, fx)`` where the gradient flows along
    y (``inside_y``, 1 or 0, from :func:`axis_geometry`); ``(0, 1)``
    likewise for x; ``(1, 1)``, the cross derivative. Bilinear
    interpolation is linear along each axis within a cell, so every higher
    derivative is zero, and at an integer coordinate these are the cell
    above's (the forward difference, as everywhere).

    Args:
        frac_y, frac_x, inside_y, inside_x: From :func:`axis_geometry`, the
            flags as 0 or 1 of the fractions' dtype.
        one: 1 in the fractions' dtype.
    """
    # Along each axis, the lower and upper corner's weight: 1 - f and f, or
    # their derivative where it flows.
    y0, y1 = ((one - frac_y, frac_y) if order_y == 0
              else (-inside_y, inside_y))
    x0, x1 = ((one - frac_x, frac_x) if order_x == 0
              else (-inside_x, inside_x))
    return y0 * x0, y0 * x1, y1 * x0, y1 * x1
