"""Compiled CPU loops, used when Numba is installed.

Each call handles a block of output rows of a few images (see ``_cpu``,
which runs blocks on every core): :func:`gather` fills the block's columns
and :func:`backward` computes the coordinate and mask gradients and scatters
the columns' gradient back onto the input plane.

Both find where samples fall with ``_geometry.axis_geometry``, the same
function the NumPy path applies to arrays, compiled here for scalars. They
work out one output row's corners and weights for every tap first (a loop
over the row that LLVM vectorizes), then run over each sample's channels,
contiguous in the channels-last plane. Those inner loops index 1-D slices
with the loop counter, which LLVM turns into SIMD code (it does not for
computed 2-D indices), and keep to the data's dtype.
"""

import numba
import numpy

from deformable import _geometry


axis_geometry = numba.njit(inline='always')(_geometry.axis_geometry)


@numba.njit(nogil=True, cache=True)
def _row_geometry(offset, mask, has_mask, base_y, base_x, kw, constants, b,
                  oy, top, left, frac_y, frac_x, inside, weights,
                  for_backward):
    """Corners and weights of every tap of output row ``oy`` of image b.

    Fills ``(G * K, out_w)`` arrays: ``top``, ``left`` the top-left corner
    in the bordered plane, ``frac_y``, ``frac_x``, ``inside`` (where the
    coordinate gradient flows, 1 or 0 for each axis: ``(G * K, 2, out_w)``)
    and ``weights`` ``(G * K, 4, out_w)``, the corners' bilinear weights
    times the mask; the fractions and ``inside`` only ``for_backward``.
    ``constants`` are -1, 1, h and w in the data's dtype (number literals
    would turn the arithmetic into float64).
    """
    _, n_groups, _, n_taps, _, out_w = offset.shape
    low, one, h, w = constants[0], constants[1], constants[2], constants[3]
    for g in range(n_groups):
        for k in range(n_taps):
            t = g * n_taps + k
            ky = k // kw
            by = base_y[ky, oy]
            bx = base_x[k - ky * kw]
            dy = offset[b, g, 1, k, oy]
            dx = offset[b, g, 0, k, oy]
            for ox in range(out_w):
                ly, fy, in_y = axis_geometry(dy[ox] + by, low, h)
                lx, fx, in_x = axis_geometry(dx[ox] + bx[ox], low, w)
                m = mask[b, g, k, oy, ox] if has_mask else one
                # +1: the plane has a zero border row and column in front.
                top[t, ox] = int(ly) + 1
                left[t, ox] = int(lx) + 1
                if for_backward:
                    frac_y[t, ox] = fy
                    frac_x[t, ox] = fx
                    inside[t, 0, ox] = one if in_y else low + one
                    inside[t, 1, ox] = one if in_x else low + one
                weights[t, 0, ox] = (one - fy) * (one - fx) * m
                weights[t, 1, ox] = (one - fy) * fx * m
                weights[t, 2, ox] = fy * (one - fx) * m
                weights[t, 3, ox] = fy * fx * m


@numba.njit(inline='always')
def _row_buffers(offset, like):
    """Empty ``_row_geometry`` arrays; ``like`` gives the dtype."""
    _, n_groups, _, n_taps, _, out_w = offset.shape
    n_total = n_groups * n_taps
    return (numpy.empty((n_total, out_w), numpy.int64),
            numpy.empty((n_total, out_w), numpy.int64),
            numpy.empty((n_total, out_w), like.dtype),
            numpy.empty((n_total, out_w), like.dtype),
            numpy.empty((n_total, 2, out_w), like.dtype),
            numpy.empty((n_total, 4, out_w), like.dtype))


@numba.njit(nogil=True, cache=True)
def gather(plane, offset, mask, has_mask, base_y, base_x, kw, constants,
           segments, group_width, first_row, stop_row, columns):
    """Bilinear (and modulated) samples of a block into ``columns``.

    Args:
        plane: ``(n, h + 2, w + 2, c)`` bordered, channels-last input.
        offset: ``(n, G, 2, K, out_h, out_w)``; ``[:, :, 0]`` is x.
        mask: ``(n, G, K, out_h, out_w)`` if ``has_mask``.
        base_y, base_x: ``(kh, out_h)``, ``(kw, out_w)`` tap bases.
        kw: Kernel width.
        constants: -1, 1, h and w in the data's dtype.
        segments: ``(G, S, 3)``: per offset group, runs of channels
            ``[start, stop)`` whose column is ``shift + k * group_width +
            channel`` (``stop == start`` pads unused runs).
        group_width: Input channels per convolution group.
        first_row, stop_row: The block: rows ``b * out_h + oy`` of the
            ``n`` images.
        columns: ``((stop_row - first_row) * out_w, K * c)`` output.
    """
    _, n_groups, _, n_taps, out_h, out_w = offset.shape
    top, left, frac_y, frac_x, inside, weights = _row_buffers(offset, plane)
    for row in range(first_row, stop_row):
        b = row // out_h
        oy = row - b * out_h
        _row_geometry(offset, mask, has_mask, base_y, base_x, kw, constants,
                      b, oy, top, left, frac_y, frac_x, inside, weights,
                      False)
        for ox in range(out_w):
            column = columns[(row - first_row) * out_w + ox]
            for g in range(n_groups):
                for k in range(n_taps):
                    t = g * n_taps + k
                    y0, x0 = top[t, ox], left[t, ox]
                    w00, w01 = weights[t, 0, ox], weights[t, 1, ox]
                    w10, w11 = weights[t, 2, ox], weights[t, 3, ox]
                    for s in range(segments.shape[1]):
                        start, stop = segments[g, s, 0], segments[g, s, 1]
                        first = segments[g, s, 2] + k * group_width + start
                        out = column[first:first + stop - start]
                        v00 = plane[b, y0, x0, start:stop]
                        v01 = plane[b, y0, x0 + 1, start:stop]
                        v10 = plane[b, y0 + 1, x0, start:stop]
                        v11 = plane[b, y0 + 1, x0 + 1, start:stop]
                        for i in range(stop - start):
                            out[i] = (w00 * v00[i] + w01 * v01[i]
                                      + w10 * v10[i] + w11 * v11[i])


@numba.njit(inline='always')
def _add_scaled(out, scale, values):
    for i in range(len(out)):
        out[i] += scale * values[i]


# reassoc: LLVM may reorder the sums over channels to vectorize them (the
# same way on every run); nothing is assumed about NaN or infinities.
@numba.njit(nogil=True, cache=True, fastmath={'reassoc'})
def backward(plane, offset, mask, has_mask, base_y, base_x, kw, constants,
             segments, group_width, first_row, stop_row, offset_grad,
             grad_columns, grad_plane, grad_offset, grad_mask):
    """Coordinate and mask gradients of a block, and the adjoint scatter.

    A sample's derivative along y is ``(1 - fx)(v10 - v00) + fx (v11 -
    v01)`` (corners ``v``), and likewise along x; times the mask and summed
    with the column's gradient over the channels, it is the offset's
    gradient. The mask's gradient is the unmodulated sample so summed.
    Without ``offset_grad`` the offset's gradient is not computed. Arguments
    as in
    :func:`gather`; ``grad_plane`` (like ``plane``) is added to,
    ``grad_offset`` (like ``offset``) and ``grad_mask`` (like ``mask``)
    are written.
    """
    _, n_groups, _, n_taps, out_h, out_w = offset.shape
    top, left, frac_y, frac_x, inside, weights = _row_buffers(offset, plane)
    one = constants[1]
    zero = constants[0] + one
    for row in range(first_row, stop_row):
        b = row // out_h
        oy = row - b * out_h
        _row_geometry(offset, mask, has_mask, base_y, base_x, kw, constants,
                      b, oy, top, left, frac_y, frac_x, inside, weights,
                      True)
        for ox in range(out_w):
            grad_column = grad_columns[(row - first_row) * out_w + ox]
            for g in range(n_groups):
                for k in range(n_taps):
                    t = g * n_taps + k
                    y0, x0 = top[t, ox], left[t, ox]
                    w00, w01 = weights[t, 0, ox], weights[t, 1, ox]
                    w10, w11 = weights[t, 2, ox], weights[t, 3, ox]
                    # Samples with no corner in the image (NaN ones too)
                    # scatter nothing.
                    scatter = inside[t, 0, ox] * inside[t, 1, ox] > 0
                    fy, fx = frac_y[t, ox], frac_x[t, ox]
                    ey, ex = one - fy, one - fx
                    # d/dy, d/dx of the sample and, for the mask, the
                    # unmodulated sample, each summed with the column's
                    # gradient over the channels.
                    sum_y = sum_x = sum_m = zero
                    for s in range(segments.shape[1]):
                        start, stop = segments[g, s, 0], segments[g, s, 1]
                        first = segments[g, s, 2] + k * group_width + start
                        gc = grad_column[first:first + stop - start]
                        v00 = plane[b, y0, x0, start:stop]
                        v01 = plane[b, y0, x0 + 1, start:stop]
                        v10 = plane[b, y0 + 1, x0, start:stop]
                        v11 = plane[b, y0 + 1, x0 + 1, start:stop]
                        if offset_grad:
                            for i in range(stop - start):
                                sum_y += gc[i] * (ex * (v10[i] - v00[i])
                                                  + fx * (v11[i] - v01[i]))
                                sum_x += gc[i] * (ey * (v01[i] - v00[i])
                                                  + fy * (v11[i] - v10[i]))
                        if has_mask:
                            for i in range(stop - start):
                                sum_m += gc[i] * (
                                    ey * (ex * v00[i] + fx * v01[i])
                                    + fy * (ex * v10[i] + fx * v11[i]))
                        if scatter:
                            # One loop per corner: LLVM cannot tell the
                            # corners apart, and vectorizes each alone.
                            _add_scaled(grad_plane[b, y0, x0, start:stop],
                                        w00, gc)
                            _add_scaled(grad_plane[b, y0, x0 + 1, start:stop],
                                        w01, gc)
                            _add_scaled(grad_plane[b, y0 + 1, x0, start:stop],
                                        w10, gc)
                            _add_scaled(
                                grad_plane[b, y0 + 1, x0 + 1, start:stop],
                                w11, gc)
                    m = mask[b, g, k, oy, ox] if has_mask else one
                    # Multiplying (not branching) keeps NaN from a NaN
                    # fraction.
                    if offset_grad:
                        grad_offset[b, g, 1, k, oy, ox] = (
                            sum_y * inside[t, 0, ox] * m)
                        grad_offset[b, g, 0, k, oy, ox] = (
                            sum_x * inside[t, 1, ox] * m)
                    if has_mask:
                        grad_mask[b, g, k, oy, ox] = sum_m
