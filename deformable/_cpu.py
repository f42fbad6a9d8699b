"""NumPy implementation of deformable-convolution sampling.

Layout: the input is copied once into a zero-bordered, channels-last plane
``(n * (h + 2) * (w + 2), c)`` so that each bilinear corner of a sample is one
contiguous row (a fast ``take``) and out-of-image corners land on the zero
border instead of needing a branch. The sampled columns are ``(P, K, c)``
with ``P = n * out_h * out_w`` samples and ``K = kh * kw`` taps, matching a
weight matrix ``(K * c, out_c)`` for one BLAS product.
"""

import numpy


class Geometry(object):
    """Bilinear corners and weights of every sample, shape ``(P, K)``.

    ``top_left`` indexes the zero-bordered plane; the other corners are
    ``top_left + corner_shift[q]``. ``weights[q]`` is corner q's bilinear
    weight. ``frac_y``/``frac_x`` are the fractional positions and
    ``inside_y``/``inside_x`` mark samples whose coordinate gradient is
    non-zero (clamped samples have none).
    """

    def __init__(self, offset, x_shape, ksize, stride, pad, dtype):
        n, _, h, w = x_shape
        kh, kw = ksize
        sy, sx = stride
        ph, pw = pad
        _, _, out_h, out_w = offset.shape
        n_taps = kh * kw

        # (n, out_h, out_w, 2K): the tap axis last, to match the columns.
        offset = offset.astype(dtype, copy=False).transpose(0, 2, 3, 1)
        tap_y = numpy.repeat(numpy.arange(kh), kw).astype(dtype)
        tap_x = numpy.tile(numpy.arange(kw), kh).astype(dtype)
        grid_y = (numpy.arange(out_h) * sy - ph).astype(dtype)
        grid_x = (numpy.arange(out_w) * sx - pw).astype(dtype)
        pos_y = (offset[..., n_taps:] + tap_y
                 + grid_y[None, :, None, None])
        pos_x = (offset[..., :n_taps] + tap_x
                 + grid_x[None, None, :, None])

        row, self.frac_y, self.inside_y = _axis_geometry(pos_y, h)
        col, self.frac_x, self.inside_x = _axis_geometry(pos_x, w)

        plane_w = w + 2
        image_start = numpy.arange(n) * ((h + 2) * plane_w)
        top_left = (row * plane_w + col
                    + image_start[:, None, None, None])
        self.top_left = top_left.reshape(-1, n_taps)
        self.corner_shift = (0, 1, plane_w, plane_w + 1)

        fy = self.frac_y = self.frac_y.reshape(-1, n_taps)
        fx = self.frac_x = self.frac_x.reshape(-1, n_taps)
        self.inside_y = self.inside_y.reshape(-1, n_taps)
        self.inside_x = self.inside_x.reshape(-1, n_taps)
        gy = 1 - fy
        gx = 1 - fx
        self.weights = (gy * gx, gy * fx, fy * gx, fy * fx)


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
    # Equal to -1 included: the floor convention makes the gradient at an
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
    """Bilinear samples of every tap: ``(P, K, c)``."""
    n_samples, n_taps = geometry.top_left.shape
    c = plane.shape[1]
    columns = numpy.empty((n_samples, n_taps, c), dtype=plane.dtype)
    for k in range(n_taps):
        top_left = geometry.top_left[:, k]
        acc = None
        for shift, weight in zip(geometry.corner_shift, geometry.weights):
            corner = plane.take(top_left + shift, axis=0)
            corner *= weight[:, k, None]
            if acc is None:
                acc = corner
            else:
                acc += corner
        columns[:, k] = acc
    return columns


def coordinate_grads(plane, geometry, grad_columns):
    """Gradients of the loss w.r.t. the sample coordinates, ``(P, K)`` each.

    With ``s_q = <grad column, corner q>``, bilinear interpolation gives
    ``d/dy = (1 - fx)(s10 - s00) + fx (s11 - s01)`` and the mirror for x.
    """
    n_samples, n_taps = geometry.top_left.shape
    grad_y = numpy.empty((n_samples, n_taps), dtype=plane.dtype)
    grad_x = numpy.empty((n_samples, n_taps), dtype=plane.dtype)
    for k in range(n_taps):
        top_left = geometry.top_left[:, k]
        g = grad_columns[:, k]
        s00, s01, s10, s11 = [
            numpy.einsum('pc,pc->p', plane.take(top_left + shift, axis=0), g)
            for shift in geometry.corner_shift]
        fy = geometry.frac_y[:, k]
        fx = geometry.frac_x[:, k]
        grad_y[:, k] = (1 - fx) * (s10 - s00) + fx * (s11 - s01)
        grad_x[:, k] = (1 - fy) * (s01 - s00) + fy * (s11 - s10)
    # Multiplying (not masking) keeps NaN where a fraction was NaN.
    grad_y *= geometry.inside_y
    grad_x *= geometry.inside_x
    return grad_y, grad_x


def scatter_columns(grad_columns, geometry, n_rows):
    """Adjoint of :func:`sample_columns`: sums into the bordered plane.

    NumPy 1.23 has no fast scatter-add (``numpy.add.at`` is per element), so
    contributions are sorted by target row and added in rounds: round r adds
    the r-th contribution of every row that has one, a fancy-indexed ``+=``
    with no repeated index. The number of rounds is the largest number of
    contributions to one row.
    """
    n_samples, n_taps, c = grad_columns.shape
    n_corners = len(geometry.corner_shift)
    # Entry e = (sample, tap, corner); its column row is e // n_corners.
    targets = (geometry.top_left[..., None]
               + numpy.asarray(geometry.corner_shift)).ravel()
    weights = numpy.stack(geometry.weights, axis=-1).ravel()
    order = numpy.argsort(targets, kind='stable')
    sorted_targets = targets[order]

    # Rank of each entry within its target's run of the sorted order.
    position = numpy.arange(order.size)
    run_start = numpy.ones(order.size, dtype=bool)
    run_start[1:] = sorted_targets[1:] != sorted_targets[:-1]
    rank = position - numpy.maximum.accumulate(
        numpy.where(run_start, position, 0))
    by_rank = numpy.argsort(rank, kind='stable')
    round_sizes = numpy.bincount(rank)

    grad_rows = grad_columns.reshape(n_samples * n_taps, c)
    grad_plane = numpy.zeros((n_rows, c), dtype=grad_columns.dtype)
    start = 0
    for size in round_sizes:
        entries = order[by_rank[start:start + size]]
        start += size
        contribution = grad_rows.take(entries // n_corners, axis=0)
        contribution *= weights[entries, None]
        grad_plane[targets[entries]] += contribution
    return grad_plane


def crop_plane(grad_plane, x_shape):
    """Gradient w.r.t. ``x`` from the bordered plane's gradient."""
    n, c, h, w = x_shape
    grad_plane = grad_plane.reshape(n, h + 2, w + 2, c)
    return grad_plane[:, 1:-1, 1:-1].transpose(0, 3, 1, 2)
