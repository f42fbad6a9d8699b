"""The deformable convolution as Chainer function nodes: type checks, and
dispatch to a backend (``deformable.backends``), which computes."""

import collections

import chainer
from chainer import function_node
import chainer.functions
from chainer.utils import conv
from chainer.utils import type_check

from deformable import arguments
from deformable import backends
from deformable import second_order


# The op's inputs by name; b and mask may be None.
Inputs = collections.namedtuple('Inputs', 'x offset W b mask')


class DeformableConvolution2DFunction(function_node.FunctionNode):
    """Deformable convolution given its offsets (and modulation mask).

    Inputs are ``(x, offset, W)``, then ``b`` if given, then ``mask`` if
    ``with_mask``. See :func:`deformable_convolution_2d_sampler` for the
    semantics.
    """

    def __init__(self, stride=1, pad=0, dilate=1, groups=1, with_mask=False):
        self.hyperparameters = arguments.Hyperparameters.checked(
            stride, pad, dilate, groups)
        self.with_mask = bool(with_mask)
        # What the backend's forward keeps for the backward (its own kind
        # of thing, or None); freed with this node.
        self._kept = None

    def named_inputs(self, inputs):
        """``inputs`` (arrays, variables or types) by name, as
        :data:`Inputs`; the one place that tells b and mask apart by their
        count."""
        x, offset, W = inputs[:3]
        b = inputs[3] if len(inputs) == 4 + self.with_mask else None
        mask = inputs[-1] if self.with_mask else None
        return Inputs(x, offset, W, b, mask)

    def input_names(self, n_inputs):
        """The names of this node's ``n_inputs`` inputs, in order."""
        named = self.named_inputs(range(n_inputs))
        return [name for name in Inputs._fields
                if getattr(named, name) is not None]

    def check_type_forward(self, in_types):
        n_in = in_types.size()
        type_check.expect(2 + self.with_mask < n_in, n_in < 5 + self.with_mask)
        types = self.named_inputs(
            [in_types[i] for i in range(type_check.eval(n_in))])
        type_check.expect(
            types.x.dtype.kind == 'f',
            types.x.ndim == 4,
            types.offset.dtype == types.x.dtype,
            types.offset.ndim == 4,
            types.W.dtype == types.x.dtype,
            types.W.ndim == 4,
        )
        # Shapes only once the ranks are known to be right.
        type_check.expect(
            types.x.shape[1] == types.W.shape[1] * self.hyperparameters.groups,
            types.offset.shape[0] == types.x.shape[0],
        )
        if types.b is not None:
            type_check.expect(
                types.b.dtype == types.x.dtype,
                types.b.ndim == 1,
            )
            type_check.expect(types.b.shape[0] == types.W.shape[0])
        if types.mask is not None:
            type_check.expect(
                types.mask.dtype == types.x.dtype,
                types.mask.ndim == 4,
            )
        shapes = [type_check.eval(t.shape) for t in in_types]
        if any(shape is None for shape in shapes):
            return
        self._check_sizes(self.named_inputs(shapes))

    def _check_sizes(self, shapes):
        (n, c, h, w), (out_c, _, kh, kw) = shapes.x, shapes.W
        (sy, sx), (ph, pw), (dy, dx), groups = self.hyperparameters
        if c < 1:
            raise type_check.InvalidType(
                'x has at least one channel', 'x has 0 channels')
        if kh < 1 or kw < 1:
            raise type_check.InvalidType(
                "W's kernel is at least 1x1",
                "W's kernel is {}x{}".format(kh, kw))
        self._check_groups(c, out_c, shapes.offset[1], kh * kw)
        # Output size, as in F.convolution_2d (cover_all=False).
        out_h = conv.get_conv_outsize(h, kh, sy, ph, d=dy)
        out_w = conv.get_conv_outsize(w, kw, sx, pw, d=dx)
        if out_h < 1 or out_w < 1:
            raise type_check.InvalidType(
                'output size >= 1',
                'output size is {}x{} (input {}x{}, kernel {}x{}, '
                'stride {}, pad {}, dilate {})'.format(
                    out_h, out_w, h, w, kh, kw, (sy, sx), (ph, pw),
                    (dy, dx)))
        if shapes.offset[2:] != (out_h, out_w):
            raise type_check.InvalidType(
                "offset's size == the output's = {}x{}".format(out_h, out_w),
                "offset's size is {}x{}".format(*shapes.offset[2:]))
        if shapes.mask is not None:
            n_groups = shapes.offset[1] // (2 * kh * kw)
            expected = (n, n_groups * kh * kw, out_h, out_w)
            if shapes.mask != expected:
                raise type_check.InvalidType(
                    'mask shape == (n, G*kh*kw, out_h, out_w) = {}'.format(
                        expected),
                    'mask shape is {}'.format(shapes.mask))

    def _check_groups(self, c, out_c, offset_channels, n_taps):
        groups = self.hyperparameters.groups
        if c % groups or out_c % groups:
            raise type_check.InvalidType(
                'groups divides the input and output channels',
                'groups={}, {} input and {} output channels'.format(
                    groups, c, out_c))
        if offset_channels % (2 * n_taps) or not offset_channels:
            raise type_check.InvalidType(
                'offset channels a positive multiple of 2*kh*kw = {}'.format(
                    2 * n_taps),
                'offset has {} channels'.format(offset_channels))
        n_groups = offset_channels // (2 * n_taps)
        if c % n_groups:
            raise type_check.InvalidType(
                'the offset groups G = offset channels / (2*kh*kw) divide '
                'the input channels',
                'G = {}, {} input channels'.format(n_groups, c))

    def forward_cpu(self, inputs):
        return self._forward(backends.cpu_backend(), inputs)

    def forward_gpu(self, inputs):
        return self._forward(backends.gpu_backend(), inputs)

    def _forward(self, backend, inputs):
        # x, offset, W and the mask: the backward needs them.
        self.retain_inputs(tuple(
            i for i, name in enumerate(self.input_names(len(inputs)))
            if name != 'b'))
        x, offset, W, b, mask = self.named_inputs(inputs)
        y, self._kept = backend.forward(self.hyperparameters, x, offset, W,
                                        b, mask)
        return y,

    def backward(self, indexes, grad_outputs):
        gy, = grad_outputs
        names = self.input_names(len(self.inputs))
        wanted = [names[i] for i in indexes]
        grads = {}
        needed = tuple(name for name in DeformableConvolution2DGradFunction
                       .GRADIENTS if name in wanted)
        if needed:
            retained = self.get_retained_inputs()
            x, offset, W = retained[:3]
            grad_inputs = (x, offset, W, gy) + tuple(retained[3:])
            grads.update(zip(needed, DeformableConvolution2DGradFunction(
                self.hyperparameters, needed, self._kept).apply(grad_inputs)))
        if 'b' in wanted:
            grads['b'] = chainer.functions.sum(gy, axis=(0, 2, 3))
        return tuple(grads[name] for name in wanted)


class DeformableConvolution2DGradFunction(function_node.FunctionNode):
    """Gradients of :class:`DeformableConvolution2DFunction`.

    Inputs are ``(x, offset, W, gy)``, then ``mask`` if there is one;
    outputs the gradients named in ``needed`` (of :data:`GRADIENTS`, in
    that order), and nothing is computed for the others. Differentiable
    itself, to any order (``deformable.second_order``).
    """

    GRADIENTS = ('x', 'offset', 'W', 'mask')

    def __init__(self, hyperparameters, needed, kept=None):
        # kept: what the forward's backend kept, to save recomputing it.
        self.hyperparameters = hyperparameters
        self.needed = tuple(needed)
        self._kept = kept

    def forward_cpu(self, inputs):
        return self._forward(backends.cpu_backend(), inputs)

    def forward_gpu(self, inputs):
        return self._forward(backends.gpu_backend(), inputs)

    def _forward(self, backend, inputs):
        self.retain_inputs(tuple(range(len(inputs))))
        x, offset, W, gy = inputs[:4]
        mask = inputs[4] if len(inputs) == 5 else None
        grads = backend.backward(self.hyperparameters, x, offset, W, gy,
                                 mask, self._kept, frozenset(self.needed))
        return tuple(grads[name] for name in self.needed)

    def backward(self, indexes, grad_outputs):
        return second_order.grad_backward(
            self.hyperparameters, self.get_retained_inputs(), self.needed,
            grad_outputs, indexes)


def deformable_convolution_2d_sampler(x, offset, W, b=None, stride=1, pad=0,
                                      dilate=1, groups=1, mask=None):
    """Two-dimensional deformable convolution, given the offsets.

    With the defaults, the same arguments and semantics as Chainer's
    ``chainer.functions.deformable_convolution_2d_sampler`` (DCNv1, Dai et
    al., 2017). It also has dilation, grouped convolution, several offset
    groups and the modulation mask of DCNv2 (Zhu et al., 2019), like
    torchvision's ``deform_conv2d`` and ONNX's ``DeformConv``. Implemented
    by :class:`DeformableConvolution2DFunction` on three backends (NumPy
    loops, Numba loops and CuPy kernels; ``deformable.backends``).

    **Offset layout.** ``offset`` has shape ``(n, 2 * G * kh * kw, out_h,
    out_w)`` for ``G`` offset groups (``G`` is read from its channels and
    must divide ``c_in``; input channels ``[g * c_in / G, (g + 1) * c_in /
    G)`` use group ``g``). The layout is group-major; within a group,
    channels ``0 .. kh*kw - 1`` are the *horizontal* (x) offsets and
    ``kh*kw .. 2*kh*kw - 1`` the *vertical* (y) offsets: planar ``[dx...,
    dy...]``, not interleaved ``(dy, dx)`` pairs as in torchvision and
    ONNX. Taps are in row-major order, so tap ``k`` is kernel row
    ``k // kw``, column ``k % kw``. Tap ``k`` of output pixel ``(i, j)``
    samples the input at::

        y = i * sy - ph + (k // kw) * dy + offset[:, g*2*K + K + k, i, j]
        x = j * sx - pw + (k % kw) * dx  + offset[:, g*2*K + k, i, j]

    (``K = kh * kw``, ``(dy, dx)`` the dilation) in input pixel coordinates
    (pixel centres at integers). With ``G = 1`` this is
    ``[dx of K taps, dy of K taps]``. To and from torchvision's and ONNX's
    layout (``o`` an offset array, ``K = kh * kw``)::

        theirs = o.reshape(n, G, 2, K, out_h, out_w)[:, :, ::-1].transpose(
            0, 1, 3, 2, 4, 5).reshape(n, 2 * G * K, out_h, out_w)
        ours = o.reshape(n, G, K, 2, out_h, out_w)[:, :, :, ::-1].transpose(
            0, 1, 3, 2, 4, 5).reshape(n, 2 * G * K, out_h, out_w)

    **Modulation (DCNv2).** ``mask``, if given, has shape ``(n, G * kh *
    kw, out_h, out_w)``, group-major with taps row-major (the same layout
    as torchvision's and ONNX's); it multiplies each bilinear sample.
    ``None`` means 1 everywhere.

    **Outside the image.** Samples are bilinear interpolations of the
    input extended by zeros in every direction: a sample partly outside
    mixes in zeros, one entirely outside is zero, and its offset gets zero
    gradient. Padding only shifts the sampling grid. An infinite (or huge)
    offset is simply far away: its sample is zero and the output stays
    finite. A NaN offset makes NaN every output that uses it, that is all
    output channels (of its convolution group) at that output pixel (as
    Chainer's built-in does); the sample adds nothing to the gradient of
    ``x``.

    **Gradients.** ``x``, ``offset``, ``W``, ``b`` and ``mask`` all get
    gradients. Bilinear interpolation has kinks at integer coordinates;
    there the offset gradient is the *forward* difference (the corner pair
    is ``floor(pos)`` and ``floor(pos) + 1``). On the GPU the gradient of
    ``x`` is summed with ``atomicAdd``, so it is not bit-for-bit
    deterministic (``chainer.utils.nondeterministic`` warns when
    ``chainer.config.warn_nondeterministic`` is set), unless
    ``chainer.config.cudnn_deterministic`` is set: then the GPU's backward
    uses no atomics, and the output and the gradients are the same bit for
    bit from run to run and for any workspace size. The CPU path is always
    deterministic. The gradients are differentiable again, to any order
    (``deformable.second_order``), with the same forward-difference rule.

    **float16.** On the GPU the columns and the matrix products are half
    precision (accumulated in float32), while sample positions, bilinear
    weights and the gradient sums are float32: at ``x = 150`` a float16
    position would resolve only an eighth of a pixel. The CPU computes
    float16 inputs in float32 and casts back.

    **Memory (GPU).** The batch goes through in chunks of whole images
    whose buffers fit in ``chainer.config.deformable_workspace_size``
    bytes (64 MiB by default, or the ``DEFORMABLE_WORKSPACE_SIZE``
    environment variable); one image always goes through whole.

    Args:
        x (:class:`~chainer.Variable` or :ref:`ndarray`): Input
            ``(n, c_in, h, w)``.
        offset (:class:`~chainer.Variable` or :ref:`ndarray`): Offsets
            ``(n, 2 * G * kh * kw, out_h, out_w)``, with ``out_h = (h + 2 *
            ph - dy * (kh - 1) - 1) // sy + 1`` and likewise ``out_w``.
        W (:class:`~chainer.Variable` or :ref:`ndarray`): Weight
            ``(c_out, c_in / groups, kh, kw)``.
        b (:class:`~chainer.Variable` or :ref:`ndarray`): Bias ``(c_out,)``
            or ``None``.
        stride (int or pair of ints): ``(sy, sx)``.
        pad (int or pair of ints): ``(ph, pw)``.
        dilate (int or pair of ints): ``(dy, dx)``, the spacing of the taps
            (as in :func:`chainer.functions.convolution_2d`).
        groups (int): Convolution groups, as in
            :func:`chainer.functions.convolution_2d`: output channels
            ``[j * c_out / groups, (j + 1) * c_out / groups)`` see input
            channels ``[j * c_in / groups, (j + 1) * c_in / groups)``.
        mask (:class:`~chainer.Variable` or :ref:`ndarray`): Modulation
            ``(n, G * kh * kw, out_h, out_w)`` or ``None``.

    Returns:
        ~chainer.Variable: Output ``(n, c_out, out_h, out_w)``.
    """
    inputs = (x, offset, W) if b is None else (x, offset, W, b)
    if mask is not None:
        inputs += (mask,)
    y, = DeformableConvolution2DFunction(
        stride, pad, dilate, groups, with_mask=mask is not None).apply(inputs)
    return y
