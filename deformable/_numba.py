"""Compiled CPU loops, used when Numba is installed.

Each call handles a block of output rows of a few images (see ``_cpu``,
which runs blocks on every core): :func:`gather` fills the block's columns;
:func:`backward` computes the offset and mask gradients, scatters the
columns' gradient back onto the input plane and fills the columns again
for the weight's gradient, all from one load of each sample's corners.

Both go through a block :data:`SPAN` samples at a time, and an offset
group at a time. First :func:`_span_geometry` finds where the group's taps
of those samples fall, with ``geometry.axis_geometry`` (the function the
NumPy path applies to arrays, compiled here for scalars) in loops over the
samples that LLVM vectorizes. Then a run of the group's channels at a time
(within one convolution group) goes over the samples and their taps: a
tap's four corners are each a contiguous run of channels in the
channels-last plane, which ``_simd`` blends, scatters and multiplies a
vector at a time.
"""

import numba
import numpy

from deformable import geometry
from deformable import _simd


axis_geometry = numba.njit(inline='always')(geometry.axis_geometry)

# Samples whose geometry is computed at once: long enough loops to pay for
# vectorizing them, short enough to stay in the core's cache.
SPAN = 112


@numba.njit(nogil=True, cache=True)
def _span_geometry(offset, mask, has_mask, base_y, base_x, kw, constants, b,
                   g, first, stop, plane_w, c, corner, frac_y, frac_x,
                   weights, inside, for_backward):
    """Where offset group g's taps of samples ``[first, stop)`` of image b
    fall. (One group at a time: the arrays below stay in the core's first
    cache, which four groups' would not.)

    Args:
        offset: ``(n, G, 2, K, out_h * out_w)``; ``[:, :, 0]`` is x.
        mask: ``(n, G, K, out_h * out_w)`` if ``has_mask``.
        base_y, base_x: ``(kh, out_h * out_w)``, ``(kw, out_h * out_w)``:
            each sample's tap bases.
        constants: -1, 1, h and w in the data's dtype (number literals
            would turn the arithmetic into float64).
        plane_w, c: The bordered plane's width and channels.
        corner, frac_y, frac_x: ``(K, SPAN)``, filled for the group's taps
            and the span's samples: the flat index of the top-left corner
            in the image's bordered plane (int32 where it fits, see
            ``_cpu.Problem``), and the fractions.
        weights: ``(K, 4, SPAN)``, filled unless ``for_backward``: the
            corners' bilinear weights (00, 01, 10, 11) times the mask. (The
            backward works them out tap by tap: there the rows cost more
            than they save.)
        inside: ``(K, 2, SPAN)``, filled ``for_backward``: 1 where the
            coordinate gradient flows along y (``[:, 0]``) and x, else 0.
    """
    n_taps = offset.shape[3]
    low, one, h, w = constants[0], constants[1], constants[2], constants[3]
    zero = low + one
    span = stop - first
    for k in range(n_taps):
        ky = k // kw
        dy = offset[b, g, 1, k, first:stop]
        dx = offset[b, g, 0, k, first:stop]
        by = base_y[ky, first:stop]
        bx = base_x[k - ky * kw, first:stop]
        corner_t, fy_t, fx_t = corner[k], frac_y[k], frac_x[k]
        # A loop per axis: LLVM vectorizes a loop only if it can check
        # its few arrays for overlap. +1: the plane's zero border.
        for i in range(span):
            lower, fy, _ = axis_geometry(dy[i] + by[i], low, h)
            corner_t[i] = (int(lower) + 1) * plane_w
            fy_t[i] = fy
        for i in range(span):
            lower, fx, _ = axis_geometry(dx[i] + bx[i], low, w)
            corner_t[i] = (corner_t[i] + int(lower) + 1) * c
            fx_t[i] = fx
        if not for_backward:
            m = mask[b, g, k, first:stop] if has_mask else fy_t
            # A literal corner each: the loops compile for it alone.
            _weight_row(weights[k, 0], fy_t, fx_t, m, has_mask, one, 0)
            _weight_row(weights[k, 1], fy_t, fx_t, m, has_mask, one, 1)
            _weight_row(weights[k, 2], fy_t, fx_t, m, has_mask, one, 2)
            _weight_row(weights[k, 3], fy_t, fx_t, m, has_mask, one, 3)
        else:
            inside_y, inside_x = inside[k, 0], inside[k, 1]
            for i in range(span):
                _, _, flows = axis_geometry(dy[i] + by[i], low, h)
                inside_y[i] = one if flows else zero
            for i in range(span):
                _, _, flows = axis_geometry(dx[i] + bx[i], low, w)
                inside_x[i] = one if flows else zero


@numba.njit(inline='always')
def _weight_row(out, frac_y, frac_x, mask, has_mask, one, corner_index):
    """One corner's weights, in a loop of its own (for LLVM to vectorize:
    it would not with the four)."""
    for i in range(len(out)):
        out[i] = _bilinear_weights(frac_y[i], frac_x[i],
                                   mask[i] if has_mask else one,
                                   one)[corner_index]


@numba.njit(inline='always')
def _span_buffers(n_total, like, index_like, for_backward):
    """Empty ``_span_geometry`` arrays; ``like`` gives the dtype,
    ``index_like`` the corners'."""
    return (numpy.empty((n_total, SPAN), index_like.dtype),
            numpy.empty((n_total, SPAN), like.dtype),
            numpy.empty((n_total, SPAN), like.dtype),
            numpy.empty((n_total, 4, 0 if for_backward else SPAN),
                        like.dtype),
            numpy.empty((n_total, 2, SPAN if for_backward else 0),
                        like.dtype))


@numba.njit(inline='always')
def _span(sample, stop, per_image):
    """Image, first and stop sample within it of the span from ``sample``
    (a sample of the ``n`` images) to at most ``stop``."""
    b = sample // per_image
    first = sample - b * per_image
    return b, first, min(first + SPAN, per_image, stop - b * per_image)


@numba.njit(inline='always')
def _bilinear_weights(fy, fx, m, one):
    ey, ex = one - fy, one - fx
    return ey * ex * m, ey * fx * m, fy * ex * m, fy * fx * m


@numba.njit(nogil=True, cache=True)
def gather(plane, offset, mask, has_mask, base_y, base_x, kw, constants,
           index_like, segments, group_width, first_row, stop_row, columns):
    """Bilinear (and modulated) samples of a block into ``columns``.

    Args:
        plane: ``(n, h + 2, w + 2, c)`` bordered, channels-last input.
        offset: ``(n, G, 2, K, out_h, out_w)``; ``[:, :, 0]`` is x.
        mask: ``(n, G, K, out_h, out_w)`` if ``has_mask``.
        base_y, base_x: ``(kh, out_h * out_w)``, ``(kw, out_h * out_w)``:
            each sample's tap bases.
        kw: Kernel width.
        constants: -1, 1, h and w in the data's dtype.
        index_like: An array of the integer type that holds positions in
            an image's bordered plane (int32 where they fit).
        segments: ``(G, S, 3)``: per offset group, runs of channels
            ``[start, stop)`` whose column is ``shift + k * group_width +
            channel`` (``stop == start`` pads unused runs).
        group_width: Input channels per convolution group.
        first_row, stop_row: The block: rows ``b * out_h + oy`` of the
            ``n`` images.
        columns: ``((stop_row - first_row) * out_w, K * c)`` output.
    """
    n, _, plane_w, c = plane.shape
    _, n_groups, _, n_taps, out_h, out_w = offset.shape
    per_image = out_h * out_w
    offset = offset.reshape(n, n_groups, 2, n_taps, per_image)
    mask = mask.reshape(mask.shape[0], mask.shape[1], mask.shape[2], -1)
    image_size = plane[0].size
    row_size = plane_w * c
    corner, frac_y, frac_x, weights, inside = _span_buffers(
        n_taps, plane, index_like, False)
    sample, stop = first_row * out_w, stop_row * out_w
    while sample < stop:
        b, first, last = _span(sample, stop, per_image)
        for g in range(n_groups):
            _span_geometry(offset, mask, has_mask, base_y, base_x, kw,
                           constants, b, g, first, last, plane_w, c, corner,
                           frac_y, frac_x, weights, inside, False)
            # A run of channels at a time: the taps' loop then holds
            # nothing else (and LLVM hoists nothing into it).
            for s in range(segments.shape[1]):
                start, end = segments[g, s, 0], segments[g, s, 1]
                shift = segments[g, s, 2] + start
                for i in range(last - first):
                    row = ((sample + i - first_row * out_w)
                           * columns.shape[1] + shift)
                    for k in range(n_taps):
                        _simd.blend(columns, row + k * group_width, plane,
                                    b * image_size + corner[k, i] + start, c,
                                    row_size, end - start, weights[k, 0, i],
                                    weights[k, 1, i], weights[k, 2, i],
                                    weights[k, 3, i])
        sample += last - first


@numba.njit(nogil=True, cache=True)
def backward(plane, offset, mask, has_mask, base_y, base_x, kw, constants,
             index_like, segments, group_width, first_row, stop_row,
             offset_grad, columns, grad_columns, grad_plane, grad_offset,
             grad_mask):
    """Offset and mask gradients of a block, the adjoint scatter, and the
    block's columns again (as :func:`gather`; the corners are loaded
    anyway).

    With ``s_q`` the column's gradient times corner q summed over a tap's
    channels, the sample's derivative along y is ``(1 - fx)(s10 - s00) +
    fx (s11 - s01)``, and likewise along x; times the mask, it is the
    offset's gradient. The mask's is ``sum_q weight_q s_q``. Without
    ``offset_grad`` the offset's gradient is not computed. Arguments as in
    :func:`gather`; ``columns`` are written, ``grad_columns`` (like them)
    are read, ``grad_plane`` (like ``plane``) is added to,
    ``grad_offset`` (like ``offset``) and ``grad_mask`` (like ``mask``)
    are written.
    """
    n, _, plane_w, c = plane.shape
    _, n_groups, _, n_taps, out_h, out_w = offset.shape
    per_image = out_h * out_w
    offset = offset.reshape(n, n_groups, 2, n_taps, per_image)
    grad_offset = grad_offset.reshape(offset.shape)
    mask = mask.reshape(mask.shape[0], mask.shape[1], mask.shape[2], -1)
    grad_mask = grad_mask.reshape(mask.shape)
    image_size = plane[0].size
    row_size = plane_w * c
    one = constants[1]
    zero = constants[0] + one
    corner, frac_y, frac_x, weights, inside = _span_buffers(
        n_taps, plane, index_like, True)
    # Each of a group's taps' four sums over a span (over all of the group's
    # runs).
    sums = numpy.empty((n_taps, SPAN, 4), plane.dtype)
    with_sums = offset_grad or has_mask
    sample, stop = first_row * out_w, stop_row * out_w
    while sample < stop:
        b, first, last = _span(sample, stop, per_image)
        span = last - first
        for g in range(n_groups):
            _span_geometry(offset, mask, has_mask, base_y, base_x, kw,
                           constants, b, g, first, last, plane_w, c, corner,
                           frac_y, frac_x, weights, inside, True)
            for s in range(segments.shape[1]):
                start, end = segments[g, s, 0], segments[g, s, 1]
                shift = segments[g, s, 2] + start
                for i in range(span):
                    row = ((sample + i - first_row * out_w)
                           * columns.shape[1] + shift)
                    for k in range(n_taps):
                        m = mask[b, g, k, first + i] if has_mask else one
                        w00, w01, w10, w11 = _bilinear_weights(
                            frac_y[k, i], frac_x[k, i], m, one)
                        # Samples with no corner in the image (NaN ones
                        # too) scatter nothing.
                        scatter = inside[k, 0, i] * inside[k, 1, i] > zero
                        _simd.tap_backward(
                            plane, grad_plane,
                            b * image_size + corner[k, i] + start, c,
                            row_size, end - start, columns, grad_columns,
                            row + k * group_width, w00, w01, w10, w11,
                            with_sums, scatter, sums, (k * SPAN + i) * 4,
                            s > 0)
            # The group's gradients from its sums. (Without a mask, its
            # placeholder's row stands in, unread.)
            for k in range(n_taps if with_sums else 0):
                _gradients_from_sums(
                    sums[k], frac_y[k], frac_x[k], inside[k, 0], inside[k, 1],
                    mask[b, g, k, first:last] if has_mask else mask[b, 0, 0],
                    has_mask, offset_grad,
                    grad_offset[b, g, 1, k, first:last],
                    grad_offset[b, g, 0, k, first:last],
                    grad_mask[b, g, k, first:last] if has_mask
                    else grad_mask[b, 0, 0], span, one)
        sample += span


@numba.njit(inline='always')
def _gradients_from_sums(sums, frac_y, frac_x, inside_y, inside_x, mask,
                         has_mask, offset_grad, grad_y, grad_x, grad_mask,
                         span, one):
    """One tap's offset and mask gradients over a span, from its sums
    ``(SPAN, 4)``, a loop per output (each of a few rows: LLVM vectorizes
    them). Multiplying (not branching) keeps NaN from a NaN fraction."""
    if offset_grad:
        for i in range(span):
            m = mask[i] if has_mask else one
            grad_y[i] = ((one - frac_x[i]) * (sums[i, 2] - sums[i, 0])
                         + frac_x[i] * (sums[i, 3] - sums[i, 1])) \
                * inside_y[i] * m
        for i in range(span):
            m = mask[i] if has_mask else one
            grad_x[i] = ((one - frac_y[i]) * (sums[i, 1] - sums[i, 0])
                         + frac_y[i] * (sums[i, 3] - sums[i, 2])) \
                * inside_x[i] * m
    if has_mask:
        for i in range(span):
            u00, u01, u10, u11 = _bilinear_weights(frac_y[i], frac_x[i], one,
                                                   one)
            grad_mask[i] = (u00 * sums[i, 0] + u01 * sums[i, 1]
                            + u10 * sums[i, 2] + u11 * sums[i, 3])
