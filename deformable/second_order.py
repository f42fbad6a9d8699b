"""Derivatives of the deformable convolution's gradients, to any order.

Notation, per sample (an output pixel ``p`` of image ``n``) and tap ``k``:
``T_ab(z)[c]`` is channel ``c`` of an image ``z`` sampled where the tap
falls, differentiated ``a`` times along y and ``b`` times along x w.r.t.
the sample's coordinates (``a, b`` in {0, 1}; ``geometry.corner_weights``).
Bilinear interpolation is linear along each axis within a cell, so
``d T_ab / d offset_y = T_(a+1)b`` and every derivative of order 2 along one
axis is zero; at an integer coordinate the cell above is used (the forward
difference), as in the first derivatives. ``T_ab`` is linear in ``z``; its
adjoint ``U_ab`` adds samples back to the corners (:class:`ScatterTaps`).
With ``m`` the mask (1 without one), broadcast over each offset group's
channels, and ``sum_g`` the sum over those channels:

    y = W * (m T_00(x)) + b                  (* : the convolution's product)
    gcol = W^T gy                            (per channel and tap)
    gx = U_00(m gcol)       gW = gy (m T_00(x))^T
    goffset_y = sum_g(gcol m T_10(x))        goffset_x likewise with T_01
    gmask = sum_g(gcol T_00(x))

Given gradients ``ggx, ggW, ggoffset_y, ggoffset_x, ggmask`` of some loss
w.r.t. those, its derivatives (the double backward) follow by the product
rule; with ``E = m T_00(ggx) + ggoffset_y m T_10(x) + ggoffset_x m T_01(x)
+ ggmask T_00(x)`` and ``hcol = ggW^T gy``:

    d/dgy     = W * E + ggW * (m T_00(x))
    d/dW      = gy E^T
    d/dx      = U_10(m gcol ggoffset_y) + U_01(m gcol ggoffset_x)
                + U_00(gcol ggmask) + U_00(m hcol)
    d/doffset_y = sum_g(gcol (m T_10(ggx) + ggoffset_x m T_11(x)
                  + ggmask T_10(x)) + hcol m T_10(x))
    d/doffset_x = the same with y and x swapped (T_01, T_11, T_01)
    d/dmask   = sum_g(gcol (T_00(ggx) + ggoffset_y T_10(x)
                + ggoffset_x T_01(x)) + hcol T_00(x))

(``T_ab`` of the offsets of order 1 along an axis carry the flag that the
coordinate gradient flows there, as the first derivatives do.) These are
built from :class:`SampleTaps` and :class:`ScatterTaps`, whose own
gradients are built from them again, and Chainer's differentiable
functions, so every order has its derivatives.
"""

import chainer
from chainer import function_node
import chainer.functions as F

from deformable import backends


class _TapsNode(function_node.FunctionNode):
    """A node of every channel's samples at every tap, ``(n, c, K, out_h,
    out_w)`` (``backends.layout``), in their derivative of ``order``
    ``(a, b)``; the backend's ``compute`` method does the work."""

    compute = None   # the backend's method's name

    def __init__(self, hyperparameters, ksize, order):
        self.hyperparameters = hyperparameters
        self.ksize = tuple(ksize)
        self.order = tuple(order)

    def forward_cpu(self, inputs):
        return self._forward(backends.cpu_backend(), inputs)

    def forward_gpu(self, inputs):
        return self._forward(backends.gpu_backend(), inputs)

    def _forward(self, backend, inputs):
        self.retain_inputs((0, 1))
        return getattr(backend, self.compute)(
            self.hyperparameters, *inputs, **self._sizes()),

    def _sizes(self):
        return {'ksize': self.ksize, 'order': self.order}


class SampleTaps(_TapsNode):
    """``T_ab(z)``: inputs ``(z, offset)``."""

    compute = 'sample_taps'

    def backward(self, indexes, grad_outputs):
        z, offset = self.get_retained_inputs()
        g, = grad_outputs
        grads = []
        if 0 in indexes:
            grads.append(scatter_taps(self.hyperparameters, g, offset,
                                      z.shape, self.ksize, self.order))
        if 1 in indexes:
            grads.append(_offset_gradient(self.hyperparameters, self.ksize,
                                          self.order, g, z, offset))
        return tuple(grads)


class ScatterTaps(_TapsNode):
    """``U_ab(samples)``, the adjoint of :class:`SampleTaps` in ``z``:
    inputs ``(samples, offset)``, output like ``z`` (``x_shape``)."""

    compute = 'scatter_taps'

    def __init__(self, hyperparameters, x_shape, ksize, order):
        super(ScatterTaps, self).__init__(hyperparameters, ksize, order)
        self.x_shape = tuple(x_shape)

    def _sizes(self):
        return dict(super(ScatterTaps, self)._sizes(), x_shape=self.x_shape)

    def backward(self, indexes, grad_outputs):
        samples, offset = self.get_retained_inputs()
        g, = grad_outputs
        grads = []
        if 0 in indexes:
            grads.append(sample_taps(self.hyperparameters, g, offset,
                                     self.ksize, self.order))
        if 1 in indexes:
            # <g, U(samples)> = <T(g), samples>.
            grads.append(_offset_gradient(self.hyperparameters, self.ksize,
                                          self.order, samples, g, offset))
        return tuple(grads)


def sample_taps(hyperparameters, z, offset, ksize, order):
    return SampleTaps(hyperparameters, ksize, order).apply((z, offset))[0]


def scatter_taps(hyperparameters, samples, offset, x_shape, ksize, order):
    return ScatterTaps(hyperparameters, x_shape, ksize, order).apply(
        (samples, offset))[0]


def _offset_gradient(hyperparameters, ksize, order, weights, z, offset):
    """d<weights, T_order(z)>/d offset, ``offset``'s shape: each axis's is
    ``sum_g(weights T(z))`` one order up, zero where the order is 1 already
    (None if both are)."""
    n_groups = _offset_groups(offset, ksize)
    by_axis = []
    for axis, up in ((1, (order[0], order[1] + 1)),    # x, then y
                     (0, (order[0] + 1, order[1]))):
        by_axis.append(None if order[axis] else _sum_groups(
            weights * sample_taps(hyperparameters, z, offset, ksize, up),
            n_groups))
    return _by_axes(by_axis, offset.shape)


def _by_axes(by_axis, offset_shape):
    """The offset's gradient from its x and y parts ``(n, G, K, out_h,
    out_w)`` (None: zero; None if both are)."""
    if all(a is None for a in by_axis):
        return None
    present = next(a for a in by_axis if a is not None)
    zeros = chainer.Variable(present.xp.zeros(present.shape, present.dtype))
    return F.reshape(F.stack([zeros if a is None else a for a in by_axis],
                             axis=2), offset_shape)


def _offset_groups(offset, ksize):
    return offset.shape[1] // (2 * ksize[0] * ksize[1])


def _sum_groups(samples, n_groups):
    """``(n, c, K, out_h, out_w)`` summed over each offset group's
    channels: ``(n, G, K, out_h, out_w)``."""
    n, c = samples.shape[:2]
    return F.sum(F.reshape(samples, (n, n_groups, c // n_groups)
                           + samples.shape[2:]), axis=2)


def _per_channel(by_group, c):
    """``(n, G, K, out_h, out_w)`` repeated over each group's channels."""
    n, n_groups = by_group.shape[:2]
    rest = by_group.shape[2:]
    return F.reshape(F.broadcast_to(
        F.expand_dims(by_group, 2), (n, n_groups, c // n_groups) + rest),
        (n, c) + rest)


class _Convolution(object):
    """The convolution's product between samples ``(n, c, K, out_h,
    out_w)`` and weights, as Chainer functions."""

    def __init__(self, W, groups, n, out_size):
        self.w_shape = W.shape
        self.out_c, self.c_group, kh, kw = W.shape
        self.groups = groups
        self.n = n
        self.out_size = out_size
        self.width = self.c_group * kh * kw
        self.n_samples = out_size[0] * out_size[1]

    def _weight(self, W):
        return F.reshape(W, (self.groups, self.out_c // self.groups,
                             self.width))

    def _grouped(self, array, rows):
        return F.reshape(array, (self.n, self.groups, rows, self.n_samples))

    def taps(self, W, gy):
        """``W^T gy``: ``(n, c, K, out_h, out_w)``."""
        out = F.matmul(self._weight(W), self._grouped(
            gy, self.out_c // self.groups), transa=True)
        return F.reshape(out, (self.n, self.groups * self.c_group,
                               self.width // self.c_group) + self.out_size)

    def outputs(self, W, samples):
        """``W * samples``: ``(n, out_c, out_h, out_w)``."""
        out = F.matmul(self._weight(W),
                       self._grouped(samples, self.width))
        return F.reshape(out, (self.n, self.out_c) + self.out_size)

    def weight(self, gy, samples):
        """``gy samples^T`` summed over images: ``W``'s shape."""
        out = F.matmul(self._grouped(gy, self.out_c // self.groups),
                       self._grouped(samples, self.width), transb=True)
        return F.reshape(F.sum(out, axis=0), self.w_shape)


def grad_backward(hyperparameters, inputs, needed, grad_outputs, indexes):
    """The backward of ``DeformableConvolution2DGradFunction``: gradients
    w.r.t. its inputs ``(x, offset, W, gy[, mask])`` numbered in
    ``indexes``, given those of its outputs (named ``needed``), from the
    formulas of the module's docstring."""
    x, offset, W, gy = inputs[:4]
    mask = inputs[4] if len(inputs) == 5 else None
    upstream = {name: g for name, g in zip(needed, grad_outputs)
                if g is not None}
    n, c = x.shape[:2]
    kh, kw = W.shape[2:]
    ksize = (kh, kw)
    n_groups = _offset_groups(offset, ksize)
    n_taps = kh * kw
    out_size = gy.shape[2:]
    conv = _Convolution(W, hyperparameters.groups, n, out_size)
    by_tap = (n, n_groups, n_taps) + out_size

    sampled = {}

    def sample(z, order):
        # Each is large and some are used twice (T_11(x) by both axes).
        key = id(z), order
        if key not in sampled:
            sampled[key] = sample_taps(hyperparameters, z, offset, ksize,
                                       order)
        return sampled[key]

    def scatter(samples, order):
        return scatter_taps(hyperparameters, samples, offset, x.shape,
                            ksize, order)

    def per_channel(by_group):
        return _per_channel(F.reshape(by_group, by_tap), c)

    m = None if mask is None else per_channel(mask)

    def modulated(samples):
        return samples if m is None else samples * m

    gg_x = upstream.get('x')
    gg_W = upstream.get('W')
    gg_mask = None if 'mask' not in upstream else per_channel(
        upstream['mask'])
    gg_y = gg_x_axis = None
    if 'offset' in upstream:
        gg_offset = F.reshape(upstream['offset'],
                              (n, n_groups, 2, n_taps) + out_size)
        gg_x_axis = per_channel(gg_offset[:, :, 0])
        gg_y = per_channel(gg_offset[:, :, 1])

    names = ('x', 'offset', 'W', 'gy', 'mask')
    wanted = {names[i] for i in indexes}
    gcol = conv.taps(W, gy)
    hcol = None if gg_W is None else conv.taps(gg_W, gy)
    grads = {}

    # The samples' change along (ggx, ggoffset), before the mask: E is it
    # times the mask (plus ggmask's term), and the mask's gradient is made
    # of it. Sums are taken before products: each term is a large array.
    change = None
    if wanted & {'gy', 'W', 'mask'}:
        terms = []
        if gg_x is not None:
            terms.append(sample(gg_x, (0, 0)))
        if gg_y is not None:
            terms.append(gg_y * sample(x, (1, 0)))
            terms.append(gg_x_axis * sample(x, (0, 1)))
        change = _total(terms)

    if wanted & {'gy', 'W'}:
        E = _total([None if change is None else modulated(change),
                    None if gg_mask is None else gg_mask * sample(x, (0, 0))])
        if 'gy' in wanted:
            grads['gy'] = _total([
                None if E is None else conv.outputs(W, E),
                None if gg_W is None else conv.outputs(
                    gg_W, modulated(sample(x, (0, 0))))])
        if 'W' in wanted:
            grads['W'] = None if E is None else conv.weight(gy, E)

    if 'x' in wanted:
        terms = []
        if gg_y is not None:
            terms.append(scatter(modulated(gcol * gg_y), (1, 0)))
            terms.append(scatter(modulated(gcol * gg_x_axis), (0, 1)))
        if gg_mask is not None:
            terms.append(scatter(gcol * gg_mask, (0, 0)))
        if hcol is not None:
            terms.append(scatter(modulated(hcol), (0, 0)))
        grads['x'] = _total(terms)

    if 'offset' in wanted:
        by_axis = []
        for order, cross, other in (((0, 1), (1, 1), gg_y),
                                    ((1, 0), (1, 1), gg_x_axis)):
            along = _total([
                None if gg_x is None else sample(gg_x, order),
                None if other is None else other * sample(x, cross)])
            with_gcol = _total([
                None if along is None else modulated(along),
                None if gg_mask is None else gg_mask * sample(x, order)])
            total = _total([
                None if with_gcol is None else gcol * with_gcol,
                None if hcol is None else hcol * modulated(sample(x, order))])
            by_axis.append(None if total is None
                           else _sum_groups(total, n_groups))
        grads['offset'] = _by_axes(by_axis, offset.shape)

    if 'mask' in wanted:
        total = _total([
            None if change is None else gcol * change,
            None if hcol is None else hcol * sample(x, (0, 0))])
        grads['mask'] = None if total is None else F.reshape(
            _sum_groups(total, n_groups), mask.shape)

    return tuple(grads.get(names[i]) for i in indexes)


def _total(terms):
    """The sum of the terms that are not None (None if there are none)."""
    terms = [t for t in terms if t is not None]
    if not terms:
        return None
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total
