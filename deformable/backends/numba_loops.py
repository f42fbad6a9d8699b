"""The CPU loops compiled by Numba (see ``cpu.CpuBackend`` for the
interface), used when Numba is installed.

Each call handles a block of output rows of a few images: :func:`gather`
fills the block's columns; :func:`backward` computes the offset and mask
gradients, scatters the columns' gradient back onto the input plane and
fills the columns again for the weight's gradient, each if wanted, all
from one load of each sample's corners.

Both go through a block ``tuning.SPAN`` samples at a time, and an offset
group at a time. First :func:`_span_geometry` finds where the group's taps
of those samples fall, with ``geometry.axis_geometry`` (the function the
NumPy loops apply to arrays, compiled here for scalars) in loops over the
samples that LLVM vectorizes. Then a run of the group's channels at a time
(within one convolution group) goes over the samples and their taps: a
tap's four corners are each a contiguous run of channels in the
channels-last plane, which ``simd`` blends, scatters and multiplies a
vector at a time.

The kernels take a call's sizes and geometry as one :class:`Sampling`
bundle, and the backward's choices as one :class:`Wanted`.
"""

import collections

import numba
from numba.core import types
from numba.experimental import structref
import numpy

from deformable import geometry
from deformable import tuning
from deformable.backends import cpu
from deformable.backends import simd
from deformable.backends import threads


axis_geometry = numba.njit(inline='always')(geometry.axis_geometry)
corner_weights = numba.njit(inline='always')(geometry.corner_weights)

SPAN = tuning.SPAN


_SAMPLING_FIELDS = ('offset', 'mask', 'has_mask', 'base_y', 'base_x', 'kw',
                    'low', 'one', 'h', 'w', 'segments', 'group_width',
                    'index_dtype')


@structref.register
class _SamplingType(types.StructRef):
    def preprocess_fields(self, fields):
        return tuple((name, types.unliteral(typ)) for name, typ in fields)


class Sampling(structref.StructRefProxy):
    """Where a call's samples fall, as the kernels take it: one object,
    which Numba passes as a pointer (a tuple of these fields took several
    microseconds to pass, holding the GIL the other threads wait for).

    Attributes:
        offset: ``(n, G, 2, K, out_h * out_w)``; ``[:, :, 0]`` is x.
        mask: ``(n, G, K, out_h * out_w)`` if ``has_mask`` (else a
            placeholder, never read).
        base_y, base_x: ``(kh, out_h * out_w)``, ``(kw, out_h * out_w)``:
            each sample's tap bases (``geometry.tap_bases``).
        kw: Kernel width.
        low, one, h, w: -1, 1 and the image's size in the data's dtype
            (number literals would turn the arithmetic into float64).
        segments: ``(G, S, 3)``: per offset group, runs of channels
            ``[start, stop)`` whose column is ``shift + k * group_width +
            channel`` (``stop == start`` pads unused runs; ``cpu.Plan``).
        group_width: Input channels per convolution group.
        index_dtype: The integer type of positions within an image's
            bordered plane: int32 where they fit (less to compute and to
            keep in cache), else int64.
    """

    def __new__(cls, *fields):
        return structref.StructRefProxy.__new__(cls, *fields)


structref.define_proxy(Sampling, _SamplingType, list(_SAMPLING_FIELDS))


# What the backward computes: columns (for the weight's gradient), the
# scatter (for x's), the offset's and the mask's gradients.
Wanted = collections.namedtuple('Wanted', 'columns scatter offset mask')


class Loops(cpu.Loops):
    """The compiled loops of one call."""

    name = 'numba'
    threaded = True
    keeps_columns = False
    split_images = True

    @property
    def block_bytes(self):
        return tuning.BLOCK_BYTES

    def __init__(self, plan, operands):
        super(Loops, self).__init__(plan, operands)
        dtype = plan.dtype
        plane_size = (plan.h + 2) * (plan.w + 2) * plan.c
        index_dtype = numpy.dtype(
            numpy.int32 if plane_size <= tuning.INT32_PLANE_LIMIT
            else numpy.int64)
        per_image = plan.out_h * plan.out_w
        offset = operands.offset
        self.index_dtype = index_dtype
        self.sampling = Sampling(
            offset.reshape(offset.shape[:4] + (per_image,)),
            operands.mask.reshape(operands.mask.shape[:3] + (
                operands.mask.shape[3] * operands.mask.shape[4],)),
            operands.has_mask,
            numpy.repeat(plan.base_y, plan.out_w, axis=1),
            numpy.tile(plan.base_x, (1, plan.out_h)), plan.kw, dtype.type(-1),
            dtype.type(1), dtype.type(plan.h), dtype.type(plan.w),
            plan.segments, plan.group_width, index_dtype)
        self.out_w = plan.out_w
        self.per_image = per_image
        # Stand-ins for the arrays not wanted (never written).
        self._unused = numpy.empty((1,) * 5, dtype)

    def gather(self, block, plane, columns):
        _gather(plane, self.sampling, self._samples(block), columns)

    def backward(self, block, plane, columns, grad_columns, grad_plane,
                 grad_offset, grad_mask):
        unused = self._unused
        wanted = Wanted(columns is not None, grad_plane is not None,
                        grad_offset is not None, grad_mask is not None)
        if grad_offset is not None:
            grad_offset = grad_offset.reshape(
                grad_offset.shape[:4] + (self.per_image,))
        if grad_mask is not None:
            grad_mask = grad_mask.reshape(
                grad_mask.shape[:3] + (self.per_image,))
        _backward(plane, self.sampling, self._samples(block), wanted,
                  unused[0, 0, 0] if columns is None else columns,
                  grad_columns,
                  unused[0] if grad_plane is None else grad_plane,
                  unused if grad_offset is None else grad_offset,
                  unused[0] if grad_mask is None else grad_mask)

    def sample_taps(self, plane, order, out):
        threads.run(lambda b: _sample_taps(plane, self.sampling, b, order,
                                           out),
                    list(range(len(plane))), threaded=True)

    def scatter_taps(self, samples, order, grad_plane):
        threads.run(lambda b: _scatter_taps(grad_plane, self.sampling, b,
                                            order, samples),
                    list(range(len(grad_plane))), threaded=True)

    def _samples(self, block):
        # The block's samples, counted over its images, and its first image.
        return (block.first_row * self.out_w, block.stop_row * self.out_w,
                block.start_image)


@numba.njit(nogil=True, cache=True)
def _span_geometry(sampling, b, g, first, stop, plane_w, c, span_arrays,
                   for_backward):
    """Where offset group g's taps of samples ``[first, stop)`` of image b
    (of the call's batch) fall. (One group at a time: the arrays below stay
    in the core's first cache, which four groups' would not.)

    ``plane_w`` and ``c`` are the bordered plane's width and channels;
    ``span_arrays`` (:func:`_span_arrays`) are filled: for the group's taps
    and the span's samples, ``corner`` ``(K, SPAN)``, the flat index of
    the top-left corner in the image's bordered plane, ``frac_y``,
    ``frac_x``, the fractions; ``weights`` ``(K, 4, SPAN)``, unless
    ``for_backward``, the corners' bilinear weights (00, 01, 10, 11) times
    the mask (the backward works them out tap by tap: there the rows cost
    more than they save); ``inside`` ``(K, 2, SPAN)``, ``for_backward``, 1
    where the coordinate gradient flows along y (``[:, 0]``) and x, else 0.
    """
    corner, frac_y, frac_x, weights, inside = span_arrays
    offset, mask = sampling.offset, sampling.mask
    low, one, h, w = sampling.low, sampling.one, sampling.h, sampling.w
    kw = sampling.kw
    zero = low + one
    span = stop - first
    for k in range(offset.shape[3]):
        ky = k // kw
        dy = offset[b, g, 1, k, first:stop]
        dx = offset[b, g, 0, k, first:stop]
        by = sampling.base_y[ky, first:stop]
        bx = sampling.base_x[k - ky * kw, first:stop]
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
            m = mask[b, g, k, first:stop] if sampling.has_mask else fy_t
            # A literal corner each: the loops compile for it alone.
            _weight_row(weights[k, 0], fy_t, fx_t, m, sampling.has_mask,
                        one, 0)
            _weight_row(weights[k, 1], fy_t, fx_t, m, sampling.has_mask,
                        one, 1)
            _weight_row(weights[k, 2], fy_t, fx_t, m, sampling.has_mask,
                        one, 2)
            _weight_row(weights[k, 3], fy_t, fx_t, m, sampling.has_mask,
                        one, 3)
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
def _span_arrays(sampling, for_backward):
    """Empty ``(corner, frac_y, frac_x, weights, inside)`` for
    :func:`_span_geometry`."""
    n_taps = sampling.offset.shape[3]
    dtype = sampling.offset.dtype
    return (numpy.empty((n_taps, SPAN), sampling.index_dtype),
            numpy.empty((n_taps, SPAN), dtype),
            numpy.empty((n_taps, SPAN), dtype),
            numpy.empty((n_taps, 4, 0 if for_backward else SPAN), dtype),
            numpy.empty((n_taps, 2, SPAN if for_backward else 0), dtype))


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
def _gather(plane, sampling, samples, columns):
    """:meth:`Loops.gather`; ``samples``: the block's ``(first, stop)``
    samples, counted over the images of ``plane``, and the first of those
    images in the batch."""
    _, _, plane_w, c = plane.shape
    n_groups, n_taps = sampling.offset.shape[1], sampling.offset.shape[3]
    per_image = sampling.offset.shape[4]
    segments, group_width = sampling.segments, sampling.group_width
    image_size = plane[0].size
    row_size = plane_w * c
    span_arrays = _span_arrays(sampling, False)
    corner, _, _, weights, _ = span_arrays
    start_sample, stop, first_image = samples
    sample = start_sample
    while sample < stop:
        b, first, last = _span(sample, stop, per_image)
        for g in range(n_groups):
            _span_geometry(sampling, first_image + b, g, first, last,
                           plane_w, c, span_arrays, False)
            # A run of channels at a time: the taps' loop then holds
            # nothing else (and LLVM hoists nothing into it).
            for s in range(segments.shape[1]):
                start, end = segments[g, s, 0], segments[g, s, 1]
                shift = segments[g, s, 2] + start
                for i in range(last - first):
                    row = ((sample + i - start_sample) * columns.shape[1]
                           + shift)
                    for k in range(n_taps):
                        simd.blend(columns, row + k * group_width, plane,
                                   b * image_size + corner[k, i] + start,
                                   (c, row_size), end - start,
                                   (weights[k, 0, i], weights[k, 1, i],
                                    weights[k, 2, i], weights[k, 3, i]))
        sample += last - first


@numba.njit(nogil=True, cache=True)
def _backward(plane, sampling, samples, wanted, columns, grad_columns,
              grad_plane, grad_offset, grad_mask):
    """:meth:`Loops.backward`, for the block's ``samples`` (see
    :func:`_gather`); ``grad_offset`` and ``grad_mask`` have their samples
    flat, ``(images, G, 2, K, out_h * out_w)`` and ``(images, G, K, out_h *
    out_w)``. Arrays not ``wanted`` are placeholders.

    With ``s_q`` the column's gradient times corner q summed over a tap's
    channels, the sample's derivative along y is ``(1 - fx)(s10 - s00) +
    fx (s11 - s01)``, and likewise along x; times the mask, it is the
    offset's gradient. The mask's is ``sum_q weight_q s_q``.
    """
    _, _, plane_w, c = plane.shape
    n_groups, n_taps = sampling.offset.shape[1], sampling.offset.shape[3]
    per_image = sampling.offset.shape[4]
    segments, group_width = sampling.segments, sampling.group_width
    mask, has_mask, one = sampling.mask, sampling.has_mask, sampling.one
    image_size = plane[0].size
    row_size = plane_w * c
    zero = sampling.low + one
    span_arrays = _span_arrays(sampling, True)
    corner, frac_y, frac_x, _, inside = span_arrays
    # Each of a group's taps' four sums over a span (over all of the group's
    # runs).
    sums = numpy.empty((n_taps, SPAN, 4), plane.dtype)
    with_sums = wanted.offset or wanted.mask
    start_sample, stop, first_image = samples
    sample = start_sample
    while sample < stop:
        # b: the image in the block's (planes, gradients), image: in the
        # batch's (offsets, mask).
        b, first, last = _span(sample, stop, per_image)
        image = first_image + b
        span = last - first
        for g in range(n_groups):
            _span_geometry(sampling, image, g, first, last, plane_w, c,
                           span_arrays, True)
            for s in range(segments.shape[1]):
                start, end = segments[g, s, 0], segments[g, s, 1]
                shift = segments[g, s, 2] + start
                for i in range(span):
                    row = ((sample + i - start_sample) * grad_columns.shape[1]
                           + shift)
                    for k in range(n_taps):
                        m = mask[image, g, k, first + i] if has_mask else one
                        weights = _bilinear_weights(
                            frac_y[k, i], frac_x[k, i], m, one)
                        # Samples with no corner in the image (NaN ones
                        # too) scatter nothing.
                        scatter = wanted.scatter and (
                            inside[k, 0, i] * inside[k, 1, i] > zero)
                        simd.tap_backward(
                            (plane, grad_plane),
                            b * image_size + corner[k, i] + start,
                            (c, row_size), end - start,
                            (columns, grad_columns), row + k * group_width,
                            weights, (with_sums, scatter, wanted.columns,
                                      s > 0),
                            sums, (k * SPAN + i) * 4)
            # The group's gradients from its sums. (Without a mask, its
            # placeholder's row stands in, unread.)
            for k in range(n_taps if with_sums else 0):
                _gradients_from_sums(
                    sums[k], frac_y[k], frac_x[k], inside[k, 0], inside[k, 1],
                    mask[image, g, k, first:last] if has_mask
                    else mask[image, 0, 0],
                    has_mask, wanted, grad_offset, grad_mask, b, g, k, first,
                    last, one)
        sample += span


@numba.njit(inline='always')
def _gradients_from_sums(sums, frac_y, frac_x, inside_y, inside_x, mask,
                         has_mask, wanted, grad_offset, grad_mask, b, g, k,
                         first, last, one):
    """One tap's offset and mask gradients over a span, from its sums
    ``(SPAN, 4)``, a loop per output (each of a few rows: LLVM vectorizes
    them). Multiplying (not branching) keeps NaN from a NaN fraction."""
    span = last - first
    if wanted.offset:
        grad_y = grad_offset[b, g, 1, k, first:last]
        grad_x = grad_offset[b, g, 0, k, first:last]
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
    if wanted.mask:
        grad_m = grad_mask[b, g, k, first:last]
        for i in range(span):
            u00, u01, u10, u11 = _bilinear_weights(frac_y[i], frac_x[i], one,
                                                   one)
            grad_m[i] = (u00 * sums[i, 0] + u01 * sums[i, 1]
                         + u10 * sums[i, 2] + u11 * sums[i, 3])


@numba.njit(inline='always')
def _tap(sampling, b, g, k, p, plane_w, c, order):
    """Where tap k of offset group g of image b's sample p reads the
    bordered plane ``(images, h + 2, w + 2, c)``: the flat index of its
    top-left corner within the image's plane, the corners' weights in the
    derivative of ``order`` and whether any corner is in the image."""
    low, one = sampling.low, sampling.one
    kw = sampling.kw
    ky = k // kw
    lower_y, frac_y, flows_y = axis_geometry(
        sampling.offset[b, g, 1, k, p] + sampling.base_y[ky, p], low,
        sampling.h)
    lower_x, frac_x, flows_x = axis_geometry(
        sampling.offset[b, g, 0, k, p] + sampling.base_x[k - ky * kw, p],
        low, sampling.w)
    zero = low + one
    weights = corner_weights(frac_y, frac_x, one if flows_y else zero,
                             one if flows_x else zero, order[0], order[1],
                             one)
    # +1: the plane's zero border.
    corner = ((int(lower_y) + 1) * plane_w + int(lower_x) + 1) * c
    return corner, weights, flows_y and flows_x


@numba.njit(nogil=True, cache=True)
def _sample_taps(plane, sampling, b, order, out):
    """:meth:`Loops.sample_taps` of image b."""
    _, _, plane_w, c = plane.shape
    n_groups, n_taps = sampling.offset.shape[1], sampling.offset.shape[3]
    per_image = sampling.offset.shape[4]
    width = c // n_groups
    image = b * plane[0].size
    for p in range(per_image):
        for g in range(n_groups):
            for k in range(n_taps):
                corner, weights, _ = _tap(sampling, b, g, k, p, plane_w, c,
                                          order)
                simd.blend(out, ((b * per_image + p) * n_taps + k) * c
                           + g * width, plane, image + corner + g * width,
                           (c, plane_w * c), width, weights)


@numba.njit(nogil=True, cache=True)
def _scatter_taps(grad_plane, sampling, b, order, samples):
    """:meth:`Loops.scatter_taps` of image b. Samples with no corner in the
    image (NaN ones too) add nothing, as in the backward."""
    _, _, plane_w, c = grad_plane.shape
    n_groups, n_taps = sampling.offset.shape[1], sampling.offset.shape[3]
    per_image = sampling.offset.shape[4]
    width = c // n_groups
    image = b * grad_plane[0].size
    samples = samples.reshape(samples.shape[0], per_image * n_taps * c)
    unused_sums = numpy.empty(4, grad_plane.dtype)
    for p in range(per_image):
        for g in range(n_groups):
            for k in range(n_taps):
                corner, weights, contributes = _tap(sampling, b, g, k, p,
                                                    plane_w, c, order)
                if contributes:
                    simd.tap_backward(
                        (grad_plane, grad_plane), image + corner + g * width,
                        (c, plane_w * c), width, (samples, samples),
                        b * samples.shape[1] + (p * n_taps + k) * c
                        + g * width, weights, (False, True, False, False),
                        unused_sums, 0)
