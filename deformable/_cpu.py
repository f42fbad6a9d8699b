"""CPU implementation of deformable-convolution sampling.

Layout: the input is copied once into a zero-bordered, channels-last plane
``(n * (h + 2) * (w + 2), c)``, so that each bilinear corner of a sample is
one contiguous row (a fast ``take``) and corners outside the image land on
the zero border instead of needing a branch. Everything else is per kernel
tap ``k``: the columns are ``(K, P, c)`` with ``P = n * out_h * out_w``
samples, so each tap's block is contiguous and element-wise work on it runs
in NumPy's fast contiguous loops. Large arrays are allocated once and
filled with ``out=``: fresh large allocations cost page faults here.
"""

import importlib
import os

import numpy

import chainer


# 'auto': compiled loops where Numba imports; 'never': pure NumPy; 'always':
# Numba or an error. Chainer config, so `chainer.using_config` switches it.
if not hasattr(chainer.global_config, 'deformable_use_numba'):
    chainer.global_config.deformable_use_numba = os.environ.get(
        'DEFORMABLE_USE_NUMBA', 'auto')


def compiled_kernels():
    """The ``deformable._numba`` module, or None for the pure-NumPy path."""
    mode = chainer.config.deformable_use_numba
    if mode not in ('auto', 'never', 'always'):
        raise ValueError(
            "chainer.config.deformable_use_numba must be 'auto', 'never' or "
            "'always', not {!r}".format(mode))
    if mode == 'never':
        return None
    try:
        return importlib.import_module('deformable._numba')
    except ImportError:
        if mode == 'always':
            raise ImportError(
                "deformable_use_numba is 'always' but Numba is not "
                "installed: pip install numba (or pip install "
                "'deformable[fast]')")
        return None


# Contributions to one input pixel beyond this many (per tap) are summed
# with a segmented reduction instead of rounds of scatter-adds.
_MAX_ROUNDS = 8


class Geometry(object):
    """Where each tap of each sample reads the bordered plane.

    Taps are numbered ``t = g * K + k`` over the ``G`` offset groups and the
    ``K`` kernel taps; offset group ``g`` serves the input channels
    :meth:`channels` ``(g)``. Arrays are ``(G * K, P)``: ``top_left`` is
    the plane row of the top-left bilinear corner (the others are
    ``top_left + corner_shift[q]``), ``weights[:, q]`` corner q's bilinear
    weight (``(G * K, 4, P)``), ``frac_y``, ``frac_x`` the fractional
    position, ``inside_y``, ``inside_x`` mark where the coordinate gradient
    is not cut by clamping, and ``contributing`` the samples with a corner
    inside the image. With a modulation ``mask`` (``(G * K, P)``),
    ``sample_weights`` are the bilinear weights times the mask; without one
    they are ``weights`` itself.
    """

    def __init__(self, offset, x_shape, ksize, stride, pad, dtype,
                 dilate=(1, 1), mask=None):
        n, c, h, w = x_shape
        kh, kw = ksize
        sy, sx = stride
        ph, pw = pad
        dy, dx = dilate
        _, offset_channels, out_h, out_w = offset.shape
        n_taps = kh * kw
        self.n_groups = offset_channels // (2 * n_taps)
        self.group_channels = c // self.n_groups
        n_total = self.n_groups * n_taps

        offset = offset.astype(dtype, copy=False).reshape(
            n, self.n_groups, 2, n_taps, out_h, out_w)
        tap_y = numpy.repeat(numpy.arange(kh) * dy, kw).astype(dtype)
        tap_x = numpy.tile(numpy.arange(kw) * dx, kh).astype(dtype)
        grid_y = (numpy.arange(out_h) * sy - ph).astype(dtype)
        grid_x = (numpy.arange(out_w) * sx - pw).astype(dtype)
        # (G, K, n, out_h, out_w)
        pos_y = (offset[:, :, 1].transpose(1, 2, 0, 3, 4)
                 + tap_y[:, None, None, None] + grid_y[:, None])
        pos_x = (offset[:, :, 0].transpose(1, 2, 0, 3, 4)
                 + tap_x[:, None, None, None] + grid_x)

        row, fy, self.inside_y = _axis_geometry(pos_y, h)
        col, fx, self.inside_x = _axis_geometry(pos_x, w)

        plane_w = w + 2
        image_start = numpy.arange(n) * ((h + 2) * plane_w)
        self.top_left = (row * plane_w + col
                         + image_start[:, None, None]).reshape(n_total, -1)
        self.row_shift = plane_w
        self.corner_shift = (0, 1, plane_w, plane_w + 1)

        self.frac_y = fy = fy.reshape(n_total, -1)
        self.frac_x = fx = fx.reshape(n_total, -1)
        self.inside_y = self.inside_y.reshape(n_total, -1)
        self.inside_x = self.inside_x.reshape(n_total, -1)
        # Samples with a corner in the image; the rest only touch the border.
        self.contributing = self.inside_y & self.inside_x
        gy = 1 - fy
        gx = 1 - fx
        self.weights = numpy.stack((gy * gx, gy * fx, fy * gx, fy * fx), 1)
        self.mask = None
        self.sample_weights = self.weights
        if mask is not None:
            self.mask = mask.astype(dtype, copy=False).reshape(
                n, n_total, -1).transpose(1, 0, 2).reshape(n_total, -1)
            self.sample_weights = self.weights * self.mask[:, None]

    def channels(self, group):
        """The input channels that offset group ``group`` samples."""
        if self.n_groups == 1:
            return slice(None)
        return slice(group * self.group_channels,
                     (group + 1) * self.group_channels)

    def gather_corners(self, plane, t, out):
        """The four corners of tap t's samples into ``out`` ``(4, P, c)``.

        ``plane`` holds the channels of tap t's offset group.
        """
        top_left = self.top_left[t]
        for shift, corner in zip(self.corner_shift, out):
            plane.take(top_left + shift, axis=0, out=corner, mode='clip')


def _axis_geometry(pos, size):
    """Row/column in the bordered plane, fraction, and gradient mask.

    Positions are clamped to ``[-1, size]``: beyond that both corners are
    zero, so clamping changes no value, and it keeps infinite offsets from
    overflowing the integer index. ``floor`` is capped at ``size - 1`` so the
    far corner stays inside the one-pixel border. A NaN position keeps a NaN
    fraction (so it poisons exactly the outputs that use it) but gets a
    valid index.
    """
    clamped = numpy.clip(pos, -1, size)
    lower = numpy.fmin(numpy.floor(clamped), size - 1)
    frac = clamped - lower
    # +1: the plane has a zero border row/column in front.
    index = lower.astype(numpy.intp) + 1
    # -1 itself included: the floor convention makes the gradient at an
    # integer coordinate the forward difference.
    inside = (pos >= -1) & (pos < size)
    return index, frac, inside


def bordered_plane(x, dtype):
    """Channels-last copy of ``x`` with a zero border, as rows ``(R, c)``."""
    n, c, h, w = x.shape
    plane = numpy.zeros((n, h + 2, w + 2, c), dtype=dtype)
    plane[:, 1:-1, 1:-1] = x.transpose(0, 2, 3, 1)
    return plane.reshape(-1, c)


def sample_columns(plane, geometry):
    """Bilinear (and modulated) samples of every tap: ``(K, P, c)``."""
    n_total, n_samples = geometry.top_left.shape
    n_taps = n_total // geometry.n_groups
    c = plane.shape[1]
    columns = numpy.empty((n_taps, n_samples, c), dtype=plane.dtype)
    kernels = compiled_kernels()
    if kernels is None:
        corners = numpy.empty((4, n_samples, geometry.group_channels),
                              dtype=plane.dtype)
    for t in range(n_total):
        group, k = divmod(t, n_taps)
        channels = geometry.channels(group)
        out = columns[k][:, channels]
        if kernels is not None:
            kernels.sample_tap(plane[:, channels], geometry.top_left[t],
                               geometry.sample_weights[t], geometry.row_shift,
                               out)
            continue
        geometry.gather_corners(plane[:, channels], t, corners)
        corners *= geometry.sample_weights[t, :, :, None]
        numpy.add(corners[0], corners[1], out=out)
        out += corners[2]
        out += corners[3]
    return columns


def conv_groups(c, out_c, groups):
    """``(input channels, output channels)`` slices of each group."""
    if groups == 1:
        return [(slice(None), slice(None))]
    c_group, out_group = c // groups, out_c // groups
    return [(slice(j * c_group, (j + 1) * c_group),
             slice(j * out_group, (j + 1) * out_group))
            for j in range(groups)]


def convolve_columns(columns, weight, groups=1):
    """``sum_k columns[k] @ weight[k]`` within each group: ``(P, out_c)``.

    ``weight`` is ``(K, c / groups, out_c)``.
    """
    if groups == 1:
        y = columns[0].dot(weight[0])
        product = numpy.empty_like(y)
        for k in range(1, len(columns)):
            numpy.dot(columns[k], weight[k], out=product)
            y += product
        return y
    n_samples = columns.shape[1]
    out_c = weight.shape[2]
    y = numpy.empty((n_samples, out_c), dtype=columns.dtype)
    for inputs, outputs in conv_groups(columns.shape[2], out_c, groups):
        y[:, outputs] = sum(columns[k][:, inputs].dot(weight[k][:, outputs])
                            for k in range(len(columns)))
    return y


def backward(plane, geometry, columns, gy, weight, groups=1):
    """Gradients w.r.t. the plane, the coordinates, the weight and the mask.

    Args:
        plane: ``(R, c)`` bordered input.
        columns: ``(K, P, c)`` from :func:`sample_columns`.
        gy: ``(P, out_c)`` output gradient in sample order.
        weight: ``(K, c / groups, out_c)``.
        groups: Convolution groups.

    Returns:
        ``(grad_plane (R, c), grad_y (G*K, P), grad_x (G*K, P),
        grad_weight (K, c / groups, out_c), grad_mask (G*K, P) or None)``.
    """
    n_total, n_samples = geometry.top_left.shape
    n_taps = len(columns)
    c = plane.shape[1]
    dtype = plane.dtype
    with_mask = geometry.mask is not None
    grad_plane = numpy.zeros_like(plane)
    grad_y = numpy.empty((n_total, n_samples), dtype=dtype)
    grad_x = numpy.empty((n_total, n_samples), dtype=dtype)
    grad_mask = numpy.empty((n_total, n_samples), dtype=dtype) \
        if with_mask else None
    grad_weight = numpy.empty(weight.shape, dtype=dtype)
    grad_column = numpy.empty((n_samples, c), dtype=dtype)
    groups_of_channels = conv_groups(c, gy.shape[1], groups)
    kernels = compiled_kernels()
    if kernels is None:
        corners = numpy.empty((4, n_samples, geometry.group_channels),
                              dtype=dtype)
    for k in range(n_taps):
        if groups == 1:
            numpy.dot(columns[k].T, gy, out=grad_weight[k])
            numpy.dot(gy, weight[k].T, out=grad_column)
        else:
            for inputs, outputs in groups_of_channels:
                grad_weight[k][:, outputs] = columns[k][:, inputs].T.dot(
                    gy[:, outputs])
                grad_column[:, inputs] = gy[:, outputs].dot(
                    weight[k][:, outputs].T)
        for group in range(geometry.n_groups):
            t = group * n_taps + k
            channels = geometry.channels(group)
            _backward_tap(kernels, plane[:, channels], geometry, t,
                          grad_column[:, channels], grad_plane[:, channels],
                          grad_y[t], grad_x[t],
                          grad_mask[t] if with_mask else None,
                          corners if kernels is None else None)
    # Multiplying (not masking) keeps NaN where a fraction was NaN.
    grad_y *= geometry.inside_y
    grad_x *= geometry.inside_x
    if with_mask:
        grad_y *= geometry.mask
        grad_x *= geometry.mask
    return grad_plane, grad_y, grad_x, grad_weight, grad_mask


def _backward_tap(kernels, plane, geometry, t, grad_column, grad_plane,
                  grad_y, grad_x, grad_mask, corners):
    """Tap t's coordinate (and mask) gradients and its adjoint scatter."""
    if kernels is not None:
        with_mask = grad_mask is not None
        kernels.backward_tap(
            plane, geometry.top_left[t], geometry.sample_weights[t],
            geometry.weights[t], geometry.frac_y[t], geometry.frac_x[t],
            geometry.contributing[t], geometry.row_shift, grad_column,
            grad_plane, grad_y, grad_x,
            grad_mask if with_mask else grad_y, with_mask)
        return

    # With s_q = <grad column, corner q>, bilinear interpolation gives
    # d/dy = (1 - fx)(s10 - s00) + fx (s11 - s01), and d/dx likewise; the
    # mask's gradient is the unmodulated sample, sum_q weight_q s_q.
    geometry.gather_corners(plane, t, corners)
    s00, s01, s10, s11 = numpy.einsum('qpc,pc->qp', corners, grad_column)
    fy = geometry.frac_y[t]
    fx = geometry.frac_x[t]
    grad_y[...] = (1 - fx) * (s10 - s00) + fx * (s11 - s01)
    grad_x[...] = (1 - fy) * (s01 - s00) + fy * (s11 - s10)
    if grad_mask is not None:
        w00, w01, w10, w11 = geometry.weights[t]
        grad_mask[...] = w00 * s00 + w01 * s01 + w10 * s10 + w11 * s11
    _scatter_tap(grad_plane, grad_column, geometry, t)


def _scatter_tap(grad_plane, grad_column, geometry, t):
    """Adds tap t's column gradient to the four corners of its samples.

    NumPy 1.23 has no fast scatter-add (``numpy.add.at`` is per element).
    Samples are sorted by target row; round r adds the r-th sample of every
    target in one fancy-indexed ``+=``, which has no repeated index. Rows
    hit more than ``_MAX_ROUNDS`` times (offsets collapsing onto one point)
    get the rest as a segmented sum. Samples entirely outside the image are
    skipped: all their weight is on the border, which is cropped.
    """
    contributing = numpy.flatnonzero(geometry.contributing[t])
    targets = geometry.top_left[t, contributing]
    order = numpy.argsort(targets, kind='stable')
    sorted_targets = targets[order]
    run_start = numpy.flatnonzero(numpy.concatenate(
        ([True], sorted_targets[1:] != sorted_targets[:-1])))
    run_length = numpy.diff(numpy.append(run_start, len(order)))

    samples_by_target = contributing[order]
    top_left = geometry.top_left[t]
    weights = geometry.sample_weights[t]
    for r in range(_MAX_ROUNDS):
        alive = run_length > r
        run_start, run_length = run_start[alive], run_length[alive]
        if not len(run_start):
            return
        samples = samples_by_target[run_start + r]
        _add_to_corners(grad_plane, top_left[samples],
                        geometry.corner_shift, weights[:, samples],
                        grad_column[samples])

    # The rest of each run longer than _MAX_ROUNDS, run by run.
    longer = run_length > _MAX_ROUNDS
    run_start, run_length = run_start[longer], run_length[longer]
    if not len(run_start):
        return
    tail_length = run_length - _MAX_ROUNDS
    tail_offset = numpy.cumsum(tail_length) - tail_length
    within = numpy.arange(tail_length.sum()) - numpy.repeat(
        tail_offset, tail_length)
    samples = samples_by_target[
        numpy.repeat(run_start + _MAX_ROUNDS, tail_length) + within]
    rows = grad_column[samples]
    first = samples[tail_offset]
    for shift, corner_weights in zip(geometry.corner_shift, weights):
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


def crop_plane(grad_plane, x_shape):
    """Gradient w.r.t. ``x`` from the bordered plane's gradient."""
    n, c, h, w = x_shape
    grad_plane = grad_plane.reshape(n, h + 2, w + 2, c)
    return grad_plane[:, 1:-1, 1:-1].transpose(0, 3, 1, 2)
