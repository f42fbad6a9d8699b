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


def _pair(value):
    if hasattr(value, '__getitem__'):
        return tuple(int(v) for v in value)
    return int(value), int(value)


def _compute_dtype(dtype):
    # float16 has too little precision for sample coordinates; compute in
    # float32 and cast the results back.
    return numpy.float32 if dtype == numpy.float16 else dtype


def _cpu_weight(W, dtype):
    """``W`` as ``(K, c_in, c_out)``, the CPU columns' weight layout."""
    out_c, c, kh, kw = W.shape
    return numpy.ascontiguousarray(
        W.transpose(2, 3, 1, 0).reshape(kh * kw, c, out_c), dtype=dtype)


def _gpu_array(array, dtype):
    # The kernels index their raw inputs as C-contiguous.
    return cuda.cupy.ascontiguousarray(array, dtype=dtype)


class DeformableConvolution2DSampler(function_node.FunctionNode):
    """Deformable convolution given its offsets: ``y = W * sample(x)``.

    See :func:`deformable_convolution_2d_sampler` for the semantics.
    """

    def __init__(self, stride=1, pad=0):
        self.sy, self.sx = _pair(stride)
        self.ph, self.pw = _pair(pad)
        if min(self.sy, self.sx) < 1:
            raise ValueError('stride must be positive, got {}'.format(stride))
        if min(self.ph, self.pw) < 0:
            raise ValueError('pad must be non-negative, got {}'.format(pad))
        # Forward results the gradient reuses; freed with this node.
        self._saved = {}

    def check_type_forward(self, in_types):
        n_in = in_types.size()
        type_check.expect(2 < n_in, n_in < 5)
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
            x_type.shape[1] == w_type.shape[1],
            offset_type.shape[0] == x_type.shape[0],
            offset_type.shape[1] == 2 * w_type.shape[2] * w_type.shape[3],
        )
        if type_check.eval(n_in) == 4:
            b_type = in_types[3]
            type_check.expect(
                b_type.dtype == x_type.dtype,
                b_type.ndim == 1,
            )
            type_check.expect(b_type.shape[0] == w_type.shape[0])
        if all(type_check.eval(t.shape) is not None
               for t in (x_type, w_type)):
            # Output size, as in F.convolution_2d (cover_all=False).
            h, w = type_check.eval(x_type.shape[2:])
            kh, kw = type_check.eval(w_type.shape[2:])
            out_h = conv.get_conv_outsize(h, kh, self.sy, self.ph)
            out_w = conv.get_conv_outsize(w, kw, self.sx, self.pw)
            if out_h < 1 or out_w < 1:
                raise type_check.InvalidType(
                    'output size >= 1',
                    'output size is {}x{} (input {}x{}, kernel {}x{}, '
                    'stride {}, pad {})'.format(
                        out_h, out_w, h, w, kh, kw, (self.sy, self.sx),
                        (self.ph, self.pw)))
            type_check.expect(
                offset_type.shape[2] == out_h,
                offset_type.shape[3] == out_w,
            )

    @property
    def _geometry_params(self):
        return (self.sy, self.sx), (self.ph, self.pw)

    def forward_cpu(self, inputs):
        self.retain_inputs((0, 1, 2))
        x, offset, W = inputs[:3]
        dtype = _compute_dtype(x.dtype)
        out_c, _, kh, kw = W.shape
        n, _, out_h, out_w = offset.shape
        stride, pad = self._geometry_params

        geometry = _cpu.Geometry(offset, x.shape, (kh, kw), stride, pad, dtype)
        plane = _cpu.bordered_plane(x, dtype)
        columns = _cpu.sample_columns(plane, geometry)
        y = _cpu.convolve_columns(columns, _cpu_weight(W, dtype))
        if len(inputs) == 4:
            y += inputs[3]
        y = y.reshape(n, out_h, out_w, out_c).transpose(0, 3, 1, 2)
        self._saved = {'geometry': geometry, 'plane': plane,
                       'columns': columns}
        return numpy.ascontiguousarray(y, dtype=x.dtype),

    def forward_gpu(self, inputs):
        from deformable import _gpu
        self.retain_inputs((0, 1, 2))
        x, offset, W = inputs[:3]
        dtype = _compute_dtype(x.dtype)
        out_c, c, kh, kw = W.shape
        n, _, out_h, out_w = offset.shape
        stride, pad = self._geometry_params

        columns = _gpu.sample_columns(
            _gpu_array(x, dtype), _gpu_array(offset, dtype), (kh, kw),
            stride, pad)
        weight = W.astype(dtype, copy=False).reshape(out_c, c * kh * kw)
        y = weight.dot(columns)
        if len(inputs) == 4:
            y += inputs[3].astype(dtype, copy=False)[:, None]
        y = y.reshape(out_c, n, out_h, out_w).transpose(1, 0, 2, 3)
        self._saved = {'columns': columns}
        return cuda.cupy.ascontiguousarray(y.astype(x.dtype, copy=False)),

    def backward(self, indexes, grad_outputs):
        x, offset, W = self.get_retained_inputs()
        gy, = grad_outputs
        grad_node = DeformableConvolution2DSamplerGrad(
            self._geometry_params, **self._saved)
        grads = grad_node.apply((x, offset, W, gy))
        if 3 in indexes:
            grads += chainer.functions.sum(gy, axis=(0, 2, 3)),
        return tuple(grads[i] for i in indexes)


class DeformableConvolution2DSamplerGrad(function_node.FunctionNode):
    """Gradients of the sampler w.r.t. ``x``, ``offset`` and ``W``.

    Not differentiable itself: double backward through bilinear sampling is
    not implemented.
    """

    def __init__(self, geometry_params, columns=None, geometry=None,
                 plane=None):
        # columns, geometry, plane: the forward's, to save recomputing them.
        self.stride, self.pad = geometry_params
        self._columns = columns
        self._geometry = geometry
        self._plane = plane

    def forward_cpu(self, inputs):
        x, offset, W, gy = inputs
        dtype = _compute_dtype(x.dtype)
        out_c, c, kh, kw = W.shape
        n_taps = kh * kw

        geometry = self._geometry
        if geometry is None:
            geometry = _cpu.Geometry(
                offset, x.shape, (kh, kw), self.stride, self.pad, dtype)
        plane = self._plane
        if plane is None:
            plane = _cpu.bordered_plane(x, dtype)
        columns = self._columns
        if columns is None:
            columns = _cpu.sample_columns(plane, geometry)
        # (P, out_c), rows in the columns' sample order.
        gy = numpy.ascontiguousarray(
            gy.transpose(0, 2, 3, 1).reshape(-1, out_c), dtype=dtype)
        grad_plane, grad_y, grad_x, grad_weight = _cpu.backward(
            plane, geometry, columns, gy, _cpu_weight(W, dtype))

        gx = _cpu.crop_plane(grad_plane, x.shape)
        n, _, out_h, out_w = offset.shape
        goffset = numpy.concatenate((grad_x, grad_y)).reshape(
            2 * n_taps, n, out_h, out_w).transpose(1, 0, 2, 3)
        gW = grad_weight.reshape(kh, kw, c, out_c).transpose(3, 2, 0, 1)
        return tuple(numpy.ascontiguousarray(g, dtype=x.dtype)
                     for g in (gx, goffset, gW))

    def forward_gpu(self, inputs):
        from deformable import _gpu
        x, offset, W, gy = inputs
        dtype = _compute_dtype(x.dtype)
        x_c = _gpu_array(x, dtype)
        offset_c = _gpu_array(offset, dtype)
        out_c, c, kh, kw = W.shape
        ksize = (kh, kw)

        columns = self._columns
        if columns is None:
            columns = _gpu.sample_columns(
                x_c, offset_c, ksize, self.stride, self.pad)
        # (out_c, P), columns in the kernels' sample order.
        gy = gy.astype(dtype, copy=False).transpose(1, 0, 2, 3).reshape(
            out_c, -1)
        weight = W.astype(dtype, copy=False).reshape(out_c, -1)

        gW = gy.dot(columns.T).reshape(W.shape)
        grad_columns = weight.T.dot(gy)
        utils.nondeterministic('atomicAdd')
        gx = _gpu.scatter_columns(
            grad_columns, x.shape, offset_c, ksize, self.stride, self.pad)
        goffset = _gpu.offset_grads(
            x_c, grad_columns, offset_c, ksize, self.stride, self.pad)
        return tuple(g.astype(x.dtype, copy=False) for g in (gx, goffset, gW))

    def backward(self, indexes, grad_outputs):
        raise NotImplementedError(
            'double backward of deformable_convolution_2d_sampler is not '
            'supported')


def deformable_convolution_2d_sampler(x, offset, W, b=None, stride=1, pad=0):
    """Two-dimensional deformable convolution, given the offsets.

    Same arguments and semantics as Chainer's
    ``chainer.functions.deformable_convolution_2d_sampler``; implemented by
    :class:`DeformableConvolution2DSampler` with a NumPy and a CuPy path.

    **Offset layout.** ``offset`` has shape ``(n, 2 * kh * kw, out_h,
    out_w)``. Channels ``0 .. kh*kw - 1`` are the *horizontal* (x)
    offsets and channels ``kh*kw .. 2*kh*kw - 1`` the *vertical* (y)
    offsets: planar ``[dx..., dy...]``, not interleaved ``(dy, dx)`` pairs.
    Taps are in row-major order, so tap ``k`` is kernel row ``k // kw``,
    column ``k % kw``. Tap ``k`` of output pixel ``(i, j)`` samples the
    input at::

        y = i * sy - ph + k // kw + offset[:, kh*kw + k, i, j]
        x = j * sx - pw + k % kw  + offset[:, k, i, j]

    in input pixel coordinates (pixel centres at integers).

    **Outside the image.** Samples are bilinear interpolations of the
    input extended by zeros in every direction: a sample partly outside
    mixes in zeros, one entirely outside is zero, and its offset gets zero
    gradient. Padding only shifts the sampling grid. An infinite (or huge)
    offset is simply far away: its sample is zero and the output stays
    finite. A NaN offset makes NaN every output that uses it, that is all
    output channels at that output pixel (as Chainer's built-in does); the
    sample adds nothing to the gradient of ``x``.

    **Gradients.** ``x``, ``offset``, ``W`` and ``b`` all get gradients.
    Bilinear interpolation has kinks at integer coordinates; there the
    offset gradient is the *forward* difference (the corner pair is
    ``floor(pos)`` and ``floor(pos) + 1``). On the GPU the gradient of
    ``x`` is summed with ``atomicAdd``, so it is not bit-for-bit
    deterministic (``chainer.utils.nondeterministic`` warns when
    ``chainer.config.warn_nondeterministic`` is set); the CPU path is
    deterministic. Double backward is not supported.

    float16 inputs are computed in float32 and cast back.

    Args:
        x (:class:`~chainer.Variable` or :ref:`ndarray`): Input
            ``(n, c_in, h, w)``.
        offset (:class:`~chainer.Variable` or :ref:`ndarray`): Offsets
            ``(n, 2 * kh * kw, out_h, out_w)``, with ``out_h = (h + 2 * ph
            - kh) // sy + 1`` and likewise ``out_w``.
        W (:class:`~chainer.Variable` or :ref:`ndarray`): Weight
            ``(c_out, c_in, kh, kw)``.
        b (:class:`~chainer.Variable` or :ref:`ndarray`): Bias ``(c_out,)``
            or ``None``.
        stride (int or pair of ints): ``(sy, sx)``.
        pad (int or pair of ints): ``(ph, pw)``.

    Returns:
        ~chainer.Variable: Output ``(n, c_out, out_h, out_w)``.
    """
    inputs = (x, offset, W) if b is None else (x, offset, W, b)
    y, = DeformableConvolution2DSampler(stride, pad).apply(inputs)
    return y
