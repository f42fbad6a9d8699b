"""The deformable-convolution sampler as a Chainer ``FunctionNode``."""

import numpy

import chainer
from chainer.backends import cuda
from chainer import function_node
import chainer.functions
from chainer import utils
from chainer.utils import conv
from chainer.utils import type_check

from deformable import _cpu
from deformable import arguments


def _compute_dtype(dtype):
    # float16 has too little precision for sample coordinates; compute in
    # float32 and cast the results back.
    return numpy.float32 if dtype == numpy.float16 else dtype


def _gpu_array(array, dtype):
    # The kernels index their raw inputs as C-contiguous.
    return cuda.cupy.ascontiguousarray(array, dtype=dtype)


def _by_group(array, groups):
    """``(rows, columns)`` as ``(groups, rows / groups, columns)``."""
    return array.reshape(groups, -1, array.shape[-1])


class DeformableConvolution2DSampler(function_node.FunctionNode):
    """Deformable convolution given its offsets (and modulation mask).

    Inputs are ``(x, offset, W)``, then ``b`` if given, then ``mask`` if
    ``with_mask``. See :func:`deformable_convolution_2d_sampler` for the
    semantics.
    """

    def __init__(self, stride=1, pad=0, dilate=1, groups=1, with_mask=False):
        self.sy, self.sx = arguments.int_pair(stride, 'stride', 1)
        self.ph, self.pw = arguments.int_pair(pad, 'pad', 0)
        self.dy, self.dx = arguments.int_pair(dilate, 'dilate', 1)
        self.groups = arguments.positive_int(groups, 'groups')
        self.with_mask = bool(with_mask)
        # The forward's columns, which the gradient reuses (the GPU's array,
        # the CPU's by block, or None); freed with this node.
        self._columns = None

    @property
    def _with_bias(self):
        return len(self.inputs) == 4 + self.with_mask

    def check_type_forward(self, in_types):
        n_in = in_types.size()
        type_check.expect(2 + self.with_mask < n_in, n_in < 5 + self.with_mask)
        x_type, offset_type, w_type = in_types[:3]
        type_check.expect(
            x_type.dtype.kind == 'f',
            x_type.ndim == 4,
            offset_type.dtype == x_type.dtype,
            offset_type.ndim == 4,
            w_type.dtype == x_type.dtype,
            w_type.ndim == 4,
        )
        # Shapes only once the ranks are known to be right.
        type_check.expect(
            x_type.shape[1] == w_type.shape[1] * self.groups,
            offset_type.shape[0] == x_type.shape[0],
        )
        with_bias = type_check.eval(n_in) == 4 + self.with_mask
        if with_bias:
            b_type = in_types[3]
            type_check.expect(
                b_type.dtype == x_type.dtype,
                b_type.ndim == 1,
            )
            type_check.expect(b_type.shape[0] == w_type.shape[0])
        if self.with_mask:
            mask_type = in_types[type_check.eval(n_in) - 1]
            type_check.expect(
                mask_type.dtype == x_type.dtype,
                mask_type.ndim == 4,
            )
        shapes = [type_check.eval(t.shape) for t in in_types]
        if any(shape is None for shape in shapes):
            return
        (n, c, h, w), offset_shape, (out_c, _, kh, kw) = shapes[:3]
        self._check_groups(c, out_c, offset_shape[1], kh * kw)
        # Output size, as in F.convolution_2d (cover_all=False).
        out_h = conv.get_conv_outsize(h, kh, self.sy, self.ph, d=self.dy)
        out_w = conv.get_conv_outsize(w, kw, self.sx, self.pw, d=self.dx)
        if out_h < 1 or out_w < 1:
            raise type_check.InvalidType(
                'output size >= 1',
                'output size is {}x{} (input {}x{}, kernel {}x{}, '
                'stride {}, pad {}, dilate {})'.format(
                    out_h, out_w, h, w, kh, kw, (self.sy, self.sx),
                    (self.ph, self.pw), (self.dy, self.dx)))
        type_check.expect(
            offset_type.shape[2] == out_h,
            offset_type.shape[3] == out_w,
        )
        if self.with_mask:
            n_groups = offset_shape[1] // (2 * kh * kw)
            expected = (n, n_groups * kh * kw, out_h, out_w)
            if shapes[-1] != expected:
                raise type_check.InvalidType(
                    'mask shape == (n, G*kh*kw, out_h, out_w) = {}'.format(
                        expected),
                    'mask shape is {}'.format(shapes[-1]))

    def _check_groups(self, c, out_c, offset_channels, n_taps):
        if c % self.groups or out_c % self.groups:
            raise type_check.InvalidType(
                'groups divides the input and output channels',
                'groups={}, {} input and {} output channels'.format(
                    self.groups, c, out_c))
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

    @property
    def _geometry_params(self):
        return ((self.sy, self.sx), (self.ph, self.pw), (self.dy, self.dx),
                self.groups)

    def _split_inputs(self, inputs):
        """``(x, offset, W, b or None, mask or None)``."""
        x, offset, W = inputs[:3]
        b = inputs[3] if len(inputs) == 4 + self.with_mask else None
        mask = inputs[-1] if self.with_mask else None
        return x, offset, W, b, mask

    def _retain(self, inputs):
        retained = (0, 1, 2)
        if self.with_mask:
            retained += (len(inputs) - 1,)
        self.retain_inputs(retained)

    def forward_cpu(self, inputs):
        self._retain(inputs)
        x, offset, W, b, mask = self._split_inputs(inputs)
        stride, pad, dilate, groups = self._geometry_params
        problem = _cpu.Problem(x.shape, offset.shape, W.shape, stride, pad,
                               dilate, groups, _compute_dtype(x.dtype))
        y, self._columns = _cpu.forward(x, offset, W, b, mask, problem)
        return y.astype(x.dtype, copy=False),

    def forward_gpu(self, inputs):
        from deformable import _gpu
        self._retain(inputs)
        x, offset, W, b, mask = self._split_inputs(inputs)
        dtype = _compute_dtype(x.dtype)
        out_c, _, kh, kw = W.shape
        n, _, out_h, out_w = offset.shape
        stride, pad, dilate, groups = self._geometry_params

        kernel_args = _gpu.KernelArgs(
            x.shape, _gpu_array(offset, dtype),
            None if mask is None else _gpu_array(mask, dtype),
            (kh, kw), stride, pad, dilate)
        columns = _gpu.sample_columns(_gpu_array(x, dtype), kernel_args)
        weight = W.astype(dtype, copy=False).reshape(out_c, -1)
        if groups == 1:
            y = weight.dot(columns)
        else:
            y = cuda.cupy.matmul(_by_group(weight, groups),
                                 _by_group(columns, groups))
            y = y.reshape(out_c, -1)
        if b is not None:
            y += b.astype(dtype, copy=False)[:, None]
        y = y.reshape(out_c, n, out_h, out_w).transpose(1, 0, 2, 3)
        self._columns = columns
        return cuda.cupy.ascontiguousarray(y.astype(x.dtype, copy=False)),

    def backward(self, indexes, grad_outputs):
        retained = self.get_retained_inputs()
        x, offset, W = retained[:3]
        mask = retained[3] if self.with_mask else None
        gy, = grad_outputs
        # Offsets that need no gradient (constants) spare the CPU its sums.
        grad_node = DeformableConvolution2DSamplerGrad(
            self._geometry_params, offset_grad=1 in indexes,
            columns=self._columns)
        grad_inputs = (x, offset, W, gy)
        if mask is not None:
            grad_inputs += (mask,)
        grads = grad_node.apply(grad_inputs)
        # (gx, goffset, gW[, gmask]) -> the order of this node's inputs.
        by_input = list(grads[:3])
        if self._with_bias:
            by_input.append(chainer.functions.sum(gy, axis=(0, 2, 3)))
        if mask is not None:
            by_input.append(grads[3])
        return tuple(by_input[i] for i in indexes)


class DeformableConvolution2DSamplerGrad(function_node.FunctionNode):
    """Gradients of the sampler w.r.t. ``x``, ``offset``, ``W`` and the mask.

    Inputs are ``(x, offset, W, gy)``, then ``mask`` if there is one;
    outputs ``(gx, goffset, gW)``, then ``gmask``. Not differentiable
    itself: double backward through bilinear sampling is not implemented.
    """

    def __init__(self, geometry_params, offset_grad=True, columns=None):
        # offset_grad: False leaves the offset's gradient zero (on the CPU).
        # columns (the GPU's array, the CPU's by block, or None): the
        # forward's, to save recomputing them.
        self.stride, self.pad, self.dilate, self.groups = geometry_params
        self.offset_grad = offset_grad
        self._columns = columns

    def forward_cpu(self, inputs):
        x, offset, W, gy = inputs[:4]
        mask = inputs[4] if len(inputs) == 5 else None
        problem = _cpu.Problem(x.shape, offset.shape, W.shape, self.stride,
                               self.pad, self.dilate, self.groups,
                               _compute_dtype(x.dtype))
        grads = _cpu.backward(x, offset, W, gy, mask, problem,
                              self.offset_grad, self._columns)
        if mask is None:
            grads = grads[:3]
        return tuple(numpy.ascontiguousarray(g, dtype=x.dtype)
                     for g in grads)

    def forward_gpu(self, inputs):
        from deformable import _gpu
        x, offset, W, gy = inputs[:4]
        mask = inputs[4] if len(inputs) == 5 else None
        dtype = _compute_dtype(x.dtype)
        x_c = _gpu_array(x, dtype)
        offset_c = _gpu_array(offset, dtype)
        mask_c = None if mask is None else _gpu_array(mask, dtype)
        out_c, _, kh, kw = W.shape
        groups = self.groups

        kernel_args = _gpu.KernelArgs(x.shape, offset_c, mask_c, (kh, kw),
                                      self.stride, self.pad, self.dilate)
        columns = self._columns
        if columns is None:
            columns = _gpu.sample_columns(x_c, kernel_args)
        # (out_c, P), columns in the kernels' sample order.
        gy = gy.astype(dtype, copy=False).transpose(1, 0, 2, 3).reshape(
            out_c, -1)
        weight = W.astype(dtype, copy=False).reshape(out_c, -1)
        if groups == 1:
            gW = gy.dot(columns.T)
            grad_columns = weight.T.dot(gy)
        else:
            gy_g = _by_group(gy, groups)
            gW = cuda.cupy.matmul(
                gy_g, _by_group(columns, groups).transpose(0, 2, 1))
            grad_columns = cuda.cupy.matmul(
                _by_group(weight, groups).transpose(0, 2, 1), gy_g)
            grad_columns = grad_columns.reshape(columns.shape)
        utils.nondeterministic('atomicAdd')
        gx = _gpu.scatter_columns(grad_columns, x.shape, kernel_args)
        goffset, gmask = _gpu.offset_grads(x_c, grad_columns, offset_c,
                                           mask_c, kernel_args)
        grads = (gx, goffset, gW.reshape(W.shape))
        if mask is not None:
            grads += gmask,
        return tuple(g.astype(x.dtype, copy=False) for g in grads)

    def backward(self, indexes, grad_outputs):
        raise NotImplementedError(
            'double backward of deformable_convolution_2d_sampler is not '
            'supported')


def deformable_convolution_2d_sampler(x, offset, W, b=None, stride=1, pad=0,
                                      dilate=1, groups=1, mask=None):
    """Two-dimensional deformable convolution, given the offsets.

    With the defaults, the same arguments and semantics as Chainer's
    ``chainer.functions.deformable_convolution_2d_sampler`` (DCNv1, Dai et
    al., 2017). It also has dilation, grouped convolution, several offset
    groups and the modulation mask of DCNv2 (Zhu et al., 2019), like
    torchvision's ``deform_conv2d`` and ONNX's ``DeformConv``. Implemented
    by :class:`DeformableConvolution2DSampler` with a NumPy and a CuPy path.

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
    ``chainer.config.warn_nondeterministic`` is set); the CPU path is
    deterministic. Double backward is not supported.

    float16 inputs are computed in float32 and cast back.

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
    y, = DeformableConvolution2DSampler(
        stride, pad, dilate, groups, with_mask=mask is not None).apply(inputs)
    return y
