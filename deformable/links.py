"""``DeformableConvolution2D``: offset prediction plus deformable sampling."""

import numpy

import chainer
from chainer import backend
from chainer import initializers
from chainer import link
import chainer.functions
import chainer.links

from deformable import arguments
from deformable import functions


class DeformableConvolution2DSampler(link.Link):
    """Holds ``W`` and ``b`` and applies the deformable sampler.

    Args:
        in_channels (int or None): Input channels; ``None`` defers
            initialization of ``W`` to the first call.
        out_channels (int): Output channels.
        ksize, stride, pad, dilate (int or pair of ints): As in
            :func:`~deformable.deformable_convolution_2d_sampler`.
        groups (int): Convolution groups; ``W`` is ``(out_channels,
            in_channels / groups, kh, kw)``.
        nobias (bool): If ``True``, no bias.
        initialW: Initializer of ``W``; ``None`` is Chainer's default
            convolution initializer (LeCun normal).
        initial_bias: Initializer of ``b``; ``None`` is zero.
    """

    def __init__(self, in_channels, out_channels, ksize, stride=1, pad=0,
                 nobias=False, initialW=None, initial_bias=None, dilate=1,
                 groups=1):
        super(DeformableConvolution2DSampler, self).__init__()
        self.ksize = arguments.int_pair(ksize, 'ksize', 1)
        self.stride = arguments.int_pair(stride, 'stride', 1)
        self.pad = arguments.int_pair(pad, 'pad', 0)
        self.dilate = arguments.int_pair(dilate, 'dilate', 1)
        self.groups = arguments.positive_int(groups, 'groups')
        self.out_channels = out_channels
        with self.init_scope():
            self.W = chainer.Parameter(
                _initializer(initialW, initializers.LeCunNormal()))
            if in_channels is not None:
                self._initialize_params(in_channels)
            if nobias:
                self.b = None
            else:
                self.b = chainer.Parameter(
                    _initializer(initial_bias, initializers.Zero()),
                    out_channels)

    def _initialize_params(self, in_channels):
        if in_channels % self.groups:
            raise ValueError(
                'groups={} does not divide the {} input channels'.format(
                    self.groups, in_channels))
        self.W.initialize((self.out_channels, in_channels // self.groups)
                          + self.ksize)

    def forward(self, x, offset, mask=None):
        """Samples ``x`` at ``offset`` (modulated by ``mask``), convolves."""
        if self.W.array is None:
            self._initialize_params(x.shape[1])
        return functions.deformable_convolution_2d_sampler(
            x, offset, self.W, self.b, self.stride, self.pad, self.dilate,
            self.groups, mask)


def _initializer(value, default):
    """An initializer, a scalar or an array as an initializer (``default``
    for None), as Chainer's links take them. (Chainer's own function for
    this, ``initializers._get_initializer``, is private.)"""
    if value is None:
        return default
    if isinstance(value, chainer.get_array_types()) or numpy.isscalar(value):
        return initializers.Constant(value)
    return value


class OffsetConvolution2D(chainer.links.Convolution2D):
    """``chainer.links.Convolution2D`` that, on the CPU, computes with the
    deformable op at zero offsets: the same convolution, about twice as fast
    as ``F.convolution_2d`` there (``benchmarks/bench_sampler.py``). Being a
    link called as one, its hooks run on every device."""

    def forward(self, x):
        if backend.get_array_module(x) is not numpy:
            return super(OffsetConvolution2D, self).forward(x)
        kh, kw = arguments.int_pair(self.ksize, 'ksize', 1)
        if self.W.array is None:
            self.W.initialize((self.out_channels, x.shape[1] // self.groups,
                               kh, kw))
        (sy, sx), (ph, pw), (dy, dx) = (
            arguments.int_pair(self.stride, 'stride', 1),
            arguments.int_pair(self.pad, 'pad', 0),
            arguments.int_pair(self.dilate, 'dilate', 1))
        n, _, h, w = x.shape
        out_h = chainer.utils.conv.get_conv_outsize(h, kh, sy, ph, d=dy)
        out_w = chainer.utils.conv.get_conv_outsize(w, kw, sx, pw, d=dx)
        zeros = numpy.zeros((n, 2 * kh * kw, out_h, out_w), x.dtype)
        return functions.deformable_convolution_2d_sampler(
            x, zeros, self.W, self.b, (sy, sx), (ph, pw), (dy, dx),
            self.groups)


class DeformableConvolution2D(link.Chain):
    """Two-dimensional deformable convolution layer (Dai et al., 2017).

    A plain convolution ``offset_conv`` predicts, for every output pixel,
    ``2 * G * kh * kw`` offsets (``G = offset_groups``; layout in
    :func:`~deformable.deformable_convolution_2d_sampler`), and
    ``deform_conv`` convolves the input sampled at the offset positions.

    With ``modulated=True`` this is DCNv2's modulated deformable
    convolution (Zhu et al., 2019): ``offset_conv`` predicts ``3 * G * kh *
    kw`` channels, the offsets and then the logits of the modulation mask,
    and each sample is multiplied by ``sigmoid(logit)``.

    **Initialization follows the papers**: ``offset_conv`` starts at zero
    (weights and bias), so a fresh layer is exactly a plain convolution
    (scaled by 0.5 when modulated, ``sigmoid(0)``) and learns to deform
    from there; ``deform_conv.W`` uses Chainer's default convolution
    initializer and ``deform_conv.b`` starts at zero.
    ``chainer.links.DeformableConvolution2D`` does the reverse (main weights
    zero, offset conv random), which with its defaults gives the offset conv
    zero gradient on the first step. Parameter names are the same as
    Chainer's link (``offset_conv/W``, ``offset_conv/b``, ``deform_conv/W``,
    ``deform_conv/b``), so its ``.npz`` snapshots load into this one.

    Args:
        in_channels (int or None): Input channels; ``None`` defers
            initialization to the first call.
        out_channels (int): Output channels.
        ksize (int or pair of ints): Kernel size.
        stride (int or pair of ints): Stride of both convolutions.
        pad (int or pair of ints): Padding of both convolutions.
        offset_nobias (bool): No bias in ``offset_conv``.
        offset_initialW: Initializer of ``offset_conv.W``; ``None`` is zero.
        offset_initial_bias: Initializer of ``offset_conv.b``; ``None`` is
            zero.
        deform_nobias (bool): No bias in ``deform_conv``.
        deform_initialW: Initializer of ``deform_conv.W``; ``None`` is
            Chainer's default.
        deform_initial_bias: Initializer of ``deform_conv.b``; ``None`` is
            zero.
        dilate (int or pair of ints): Dilation of both convolutions.
        groups (int): Convolution groups of ``deform_conv``.
        offset_groups (int): Offset groups ``G``: input channels ``[g *
            c_in / G, (g + 1) * c_in / G)`` are sampled with the offsets
            (and mask) of group ``g``.
        modulated (bool): DCNv2's modulation mask.
    """

    def __init__(self, in_channels, out_channels, ksize, stride=1, pad=0,
                 offset_nobias=False, offset_initialW=None,
                 offset_initial_bias=None, deform_nobias=False,
                 deform_initialW=None, deform_initial_bias=None, dilate=1,
                 groups=1, offset_groups=1, modulated=False):
        super(DeformableConvolution2D, self).__init__()
        kh, kw = arguments.int_pair(ksize, 'ksize', 1)
        offset_groups = arguments.positive_int(offset_groups, 'offset_groups')
        if in_channels is not None and in_channels % offset_groups:
            raise ValueError(
                'offset_groups={} does not divide the {} input '
                'channels'.format(offset_groups, in_channels))
        self.modulated = bool(modulated)
        self.n_offsets = 2 * offset_groups * kh * kw
        n_predicted = self.n_offsets * 3 // 2 if modulated else self.n_offsets
        if offset_initialW is None:
            offset_initialW = initializers.Zero()
        if offset_initial_bias is None:
            offset_initial_bias = initializers.Zero()
        with self.init_scope():
            self.offset_conv = OffsetConvolution2D(
                in_channels, n_predicted, ksize, stride, pad,
                nobias=offset_nobias, initialW=offset_initialW,
                initial_bias=offset_initial_bias, dilate=dilate)
            self.deform_conv = DeformableConvolution2DSampler(
                in_channels, out_channels, ksize, stride, pad,
                nobias=deform_nobias, initialW=deform_initialW,
                initial_bias=deform_initial_bias, dilate=dilate,
                groups=groups)

    def offsets_and_mask(self, x):
        """``(offset, mask)`` that ``offset_conv`` predicts for ``x``;
        ``mask`` is None unless the layer is modulated."""
        self._check_kernel_fits(x.shape[2:])
        predicted = self.offset_conv(x)
        if not self.modulated:
            return predicted, None
        offset, logits = chainer.functions.split_axis(
            predicted, [self.n_offsets], axis=1)
        return offset, chainer.functions.sigmoid(logits)

    def _check_kernel_fits(self, size):
        conv = self.deform_conv
        out = [chainer.utils.conv.get_conv_outsize(*args) for args in zip(
            size, conv.ksize, conv.stride, conv.pad, (False, False),
            conv.dilate)]
        if min(out) < 1:
            raise ValueError(
                'the {0[0]}x{0[1]} kernel (dilate {1[0]}x{1[1]}, pad '
                '{2[0]}x{2[1]}) does not fit the {3[0]}x{3[1]} input: the '
                'output would be {4[0]}x{4[1]}'.format(
                    conv.ksize, conv.dilate, conv.pad, size, out))

    def forward(self, x):
        """Applies the deformable convolution to ``x``."""
        return self.deform_conv(x, *self.offsets_and_mask(x))
