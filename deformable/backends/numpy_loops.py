"""The CPU loops in pure NumPy (see ``cpu.CpuBackend`` for the interface).

A block's geometry comes from ``geometry`` applied to arrays: where every
tap of every sample falls (:class:`BlockGeometry`). The gather takes each
tap's four corners with ``take`` and weighs them with one ``einsum``; the
backward scatters a tap's column gradient onto the plane in rounds of
fancy-indexed adds (:func:`_scatter_tap`). Blocks are whole images, big
ones: the cost is Python's, per call.
"""

import numpy

from deformable import geometry
from deformable import tuning
from deformable.backends import cpu


class Loops(cpu.Loops):
    """The NumPy loops of one call."""

    name = 'numpy'
    threaded = False
    # Their gather costs as much as the rest of their backward.
    keeps_columns = True
    split_images = False

    @property
    def block_bytes(self):
        return tuning.NUMPY_BLOCK_BYTES

    def gather(self, block, plane, columns):
        _gather(plane, self._geometry(block), self.plan, columns)

    def backward(self, block, plane, columns, grad_columns, grad_plane,
                 grad_offset, grad_mask):
        block_geometry = self._geometry(block)
        if columns is not None:
            _gather(plane, block_geometry, self.plan, columns)
        _backward(plane, block_geometry, self.plan, grad_columns,
                  grad_plane, grad_offset, grad_mask)

    def sample_taps(self, plane, order, out):
        plan = self.plan
        block_geometry, weights = self._taps_geometry(order)
        rows = plane.reshape(-1, plan.c)
        out = out.reshape(-1, plan.n_taps, plan.c)
        buffer = numpy.empty(4 * out.shape[0] * plan.c, plan.dtype)
        for t in range(plan.n_groups * plan.n_taps):
            channels = self._offset_group_channels(t)
            corners = _corner_buffer(buffer, out.shape[0], channels)
            block_geometry.gather_corners(rows[:, channels], t, corners)
            numpy.einsum('qpc,qp->pc', corners, weights[t],
                         out=out[:, t % plan.n_taps, channels])

    def scatter_taps(self, samples, order, grad_plane):
        plan = self.plan
        block_geometry, weights = self._taps_geometry(order)
        grad_rows = grad_plane.reshape(-1, plan.c)
        samples = samples.reshape(-1, plan.n_taps, plan.c)
        for t in range(plan.n_groups * plan.n_taps):
            channels = self._offset_group_channels(t)
            column = numpy.ascontiguousarray(
                samples[:, t % plan.n_taps, channels])
            _scatter_tap(grad_rows[:, channels], column, block_geometry, t,
                         weights[t])

    def _taps_geometry(self, order):
        # Every image's, and its corners' weights in that derivative.
        block_geometry = self._geometry(
            cpu.Block(0, self.plan.n, 0, self.plan.n * self.plan.out_h))
        return block_geometry, block_geometry.derivative_weights(order)

    def _offset_group_channels(self, t):
        width = self.plan.c // self.plan.n_groups
        g = t // self.plan.n_taps
        return slice(g * width, (g + 1) * width)

    def _geometry(self, block):
        operands = self.operands
        return BlockGeometry(
            operands.offset[block.images],
            operands.mask[block.images] if operands.has_mask else None,
            self.plan)


class BlockGeometry(object):
    """Where each tap of each sample of a block reads its bordered plane.

    Taps are numbered ``t = g * K + k`` over the offset groups and kernel
    taps, and arrays are ``(G * K, P)``: ``top_left`` is the row of the
    top-left bilinear corner in the block's plane as rows ``(R, c)`` (the
    others are ``top_left + corner_shift[q]``), ``weights[:, q]`` corner q's
    bilinear weight (``(G * K, 4, P)``), ``sample_weights`` the same times
    the mask (``weights`` itself without one), ``frac_y``, ``frac_x`` the
    fractional position, ``inside_y``, ``inside_x`` where the coordinate
    gradient flows, and ``contributing`` the samples with a corner inside
    the image.
    """

    def __init__(self, offset, mask, plan):
        n, n_groups, _, n_taps, out_h, out_w = offset.shape
        h, w = plan.h, plan.w
        n_total = n_groups * n_taps
        taps = numpy.arange(n_taps)
        base_y = plan.base_y[taps // plan.kw]      # (K, out_h)
        base_x = plan.base_x[taps % plan.kw]       # (K, out_w)
        # (G, K, n, out_h, out_w), as offset + base in the compute dtype.
        pos_y = (offset[:, :, 1].transpose(1, 2, 0, 3, 4)
                 + base_y[:, None, :, None])
        pos_x = (offset[:, :, 0].transpose(1, 2, 0, 3, 4)
                 + base_x[:, None, None, :])
        lower_y, fy, inside_y = geometry.axis_geometry(pos_y, -1.0, h)
        lower_x, fx, inside_x = geometry.axis_geometry(pos_x, -1.0, w)

        plane_w = w + 2
        image_start = numpy.arange(n) * ((h + 2) * plane_w)
        # +1: the plane has a zero border row and column in front.
        self.top_left = ((lower_y.astype(numpy.intp) + 1) * plane_w
                         + lower_x.astype(numpy.intp) + 1
                         + image_start[:, None, None]).reshape(n_total, -1)
        self.corner_shift = (0, 1, plane_w, plane_w + 1)
        self.frac_y = fy = fy.reshape(n_total, -1)
        self.frac_x = fx = fx.reshape(n_total, -1)
        self.inside_y = inside_y.reshape(n_total, -1)
        self.inside_x = inside_x.reshape(n_total, -1)
        # Samples with a corner in the image; the rest only touch the border.
        self.contributing = self.inside_y & self.inside_x
        self.weights = numpy.stack(((1 - fy) * (1 - fx), (1 - fy) * fx,
                                    fy * (1 - fx), fy * fx), 1)
        self.mask = None
        self.sample_weights = self.weights
        if mask is not None:
            self.mask = mask.transpose(1, 2, 0, 3, 4).reshape(n_total, -1)
            self.sample_weights = self.weights * self.mask[:, None]

    def derivative_weights(self, order):
        """The corners' weights ``(G * K, 4, P)`` in the samples'
        derivative of ``order`` (``geometry.corner_weights``), unmodulated."""
        dtype = self.frac_y.dtype
        return numpy.stack(geometry.corner_weights(
            self.frac_y, self.frac_x, self.inside_y.astype(dtype),
            self.inside_x.astype(dtype), order[0], order[1], dtype.type(1)),
            1)

    def gather_corners(self, plane, t, out):
        """The four corners of tap t's samples into ``out`` ``(4, P, c')``.

        ``plane`` is ``(R, c')``: rows of the block's plane, some channels.
        """
        top_left = self.top_left[t]
        for shift, corner in zip(self.corner_shift, out):
            plane.take(top_left + shift, axis=0, out=corner, mode='clip')


def _runs(plan, g, k):
    """``(channels, columns)`` slices of offset group g's runs, tap k."""
    for start, stop, shift in plan.segments[g]:
        if start < stop:
            first = shift + k * plan.group_width
            yield slice(start, stop), slice(first + start, first + stop)


def _gather(plane, block_geometry, plan, columns):
    rows = plane.reshape(-1, plan.c)
    # Allocated once: a fresh large array costs page faults every time.
    buffer = numpy.empty(4 * columns.shape[0] * plan.c, plan.dtype)
    for t in range(plan.n_groups * plan.n_taps):
        g, k = divmod(t, plan.n_taps)
        for channels, to_columns in _runs(plan, g, k):
            corners = _corner_buffer(buffer, columns.shape[0], channels)
            block_geometry.gather_corners(rows[:, channels], t, corners)
            # One pass (einsum adds the 4 products in order), where
            # multiplying and then adding took four.
            numpy.einsum('qpc,qp->pc', corners,
                         block_geometry.sample_weights[t],
                         out=columns[:, to_columns])


def _corner_buffer(buffer, n_samples, channels):
    width = channels.stop - channels.start
    return buffer[:4 * n_samples * width].reshape(4, n_samples, width)


def _backward(plane, block_geometry, plan, grad_columns, grad_plane,
              grad_offset, grad_mask):
    """See :meth:`Loops.backward`."""
    rows = plane.reshape(-1, plan.c)
    n_samples = grad_columns.shape[0]
    sample_shape = (plane.shape[0], plan.out_h, plan.out_w)
    buffer = numpy.empty(4 * n_samples * plan.c, plan.dtype)
    grad_column = numpy.empty(n_samples * plan.c, plan.dtype)
    with_sums = grad_offset is not None or grad_mask is not None
    for t in range(plan.n_groups * plan.n_taps):
        g, k = divmod(t, plan.n_taps)
        # s_q = <grad column, corner q> over the group's channels.
        s = 0
        for channels, to_columns in _runs(plan, g, k):
            # Contiguous, for einsum and the scatter's fancy indexing.
            column = grad_column[:n_samples * (channels.stop
                                               - channels.start)].reshape(
                n_samples, -1)
            column[...] = grad_columns[:, to_columns]
            if with_sums:
                corners = _corner_buffer(buffer, n_samples, channels)
                block_geometry.gather_corners(rows[:, channels], t, corners)
                s = s + numpy.einsum('qpc,pc->qp', corners, column)
            if grad_plane is not None:
                _scatter_tap(grad_plane.reshape(-1, plan.c)[:, channels],
                             column, block_geometry, t,
                             block_geometry.sample_weights[t])
        if not with_sums:
            continue
        s00, s01, s10, s11 = s
        if grad_mask is not None:
            w00, w01, w10, w11 = block_geometry.weights[t]
            grad_mask[:, g, k] = (w00 * s00 + w01 * s01 + w10 * s10
                                  + w11 * s11).reshape(sample_shape)
        if grad_offset is None:
            continue
        fy = block_geometry.frac_y[t]
        fx = block_geometry.frac_x[t]
        # Multiplying (not masking) keeps NaN where a fraction was NaN.
        grad_y = ((1 - fx) * (s10 - s00) + fx * (s11 - s01)) \
            * block_geometry.inside_y[t]
        grad_x = ((1 - fy) * (s01 - s00) + fy * (s11 - s10)) \
            * block_geometry.inside_x[t]
        if block_geometry.mask is not None:
            grad_y *= block_geometry.mask[t]
            grad_x *= block_geometry.mask[t]
        grad_offset[:, g, 1, k] = grad_y.reshape(sample_shape)
        grad_offset[:, g, 0, k] = grad_x.reshape(sample_shape)


def _scatter_tap(grad_plane, grad_column, block_geometry, t, weights):
    """Adds tap t's column gradient to the four corners of its samples,
    times their ``weights`` ``(4, P)``.

    NumPy 1.23 has no fast scatter-add (``numpy.add.at`` is per element).
    Samples are sorted by target row; round r adds the r-th sample of every
    target in one fancy-indexed ``+=``, which has no repeated index. Rows
    hit more than ``tuning.MAX_SCATTER_ROUNDS`` times (offsets collapsing
    onto one point) get the rest as a segmented sum. Samples entirely
    outside the image are skipped: all their weight is on the border, which
    is cropped.
    """
    contributing = numpy.flatnonzero(block_geometry.contributing[t])
    targets = block_geometry.top_left[t, contributing]
    order = numpy.argsort(targets, kind='stable')
    sorted_targets = targets[order]
    run_start = numpy.flatnonzero(numpy.concatenate(
        ([True], sorted_targets[1:] != sorted_targets[:-1])))
    run_length = numpy.diff(numpy.append(run_start, len(order)))

    samples_by_target = contributing[order]
    top_left = block_geometry.top_left[t]
    rounds = tuning.MAX_SCATTER_ROUNDS
    for r in range(rounds):
        alive = run_length > r
        run_start, run_length = run_start[alive], run_length[alive]
        if not len(run_start):
            return
        samples = samples_by_target[run_start + r]
        _add_to_corners(grad_plane, top_left[samples],
                        block_geometry.corner_shift, weights[:, samples],
                        grad_column[samples])

    # The rest of each run longer than the rounds, run by run.
    longer = run_length > rounds
    run_start, run_length = run_start[longer], run_length[longer]
    if not len(run_start):
        return
    tail_length = run_length - rounds
    tail_offset = numpy.cumsum(tail_length) - tail_length
    within = numpy.arange(tail_length.sum()) - numpy.repeat(
        tail_offset, tail_length)
    samples = samples_by_target[
        numpy.repeat(run_start + rounds, tail_length) + within]
    rows = grad_column[samples]
    first = samples[tail_offset]
    for shift, corner_weights in zip(block_geometry.corner_shift, weights):
        # reduceat along the contiguous axis is the fast direction.
        summed = numpy.add.reduceat(
            (rows * corner_weights[samples, None]).T, tail_offset, axis=1)
        grad_plane[top_left[first] + shift] += summed.T


def _add_to_corners(grad_plane, top_left, corner_shift, weights, rows):
    """``grad_plane[corner q] += weights[q] * rows``, rows of distinct
    samples with distinct ``top_left``."""
    contribution = numpy.empty_like(rows)
    for shift, corner_weights in zip(corner_shift, weights):
        target = top_left + shift
        numpy.multiply(rows, corner_weights[:, None], out=contribution)
        contribution += grad_plane.take(target, axis=0, mode='clip')
        grad_plane[target] = contribution
