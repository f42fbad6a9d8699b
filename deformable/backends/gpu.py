"""The GPU backend: CuPy kernels for the sampling, cuBLAS for the products.

The columns (``layout``) are stored ``(columns, P)``, ``P = n * out_h *
out_w`` samples in image-major order, and multiplied with the weight
matrix one convolution group at a time. Each thread of a kernel handles one
(offset group, tap, sample): it finds where the sample falls once and loops
over the group's channels, and neighbouring threads touch neighbouring
output pixels. The sampling rules are ``geometry``'s, line for line
(``axis_geometry`` below): positions clamped to ``[-1, size]``, floor
capped at ``size - 1``, NaN kept in the fraction, forward difference at
integers.

Each kernel's CUDA source is defined once here (:data:`PREAMBLE` and the
:class:`KernelSource` constants) and compiled by CuPy as it stands; the
tests compile the same strings for the CPU (``tests/kernel_emulation.py``).
Flat indices that are products of sizes are ``ptrdiff_t``: a batch of
feature maps can pass 2**31 elements.
"""

import collections

from chainer.backends import cuda
from chainer import utils

from deformable import geometry
from deformable.backends import layout


PREAMBLE = r'''
// Lower corner, fraction and "gradient flows" flag along one axis.
template <typename T>
__device__ int axis_geometry(T pos, int size, T* frac, bool* inside) {
    // Comparisons are false for NaN, so NaN passes through to frac.
    T clamped = pos < (T)-1 ? (T)-1 : (pos > (T)size ? (T)size : pos);
    T lower = floor(clamped);
    if (!(lower <= (T)(size - 1))) lower = (T)(size - 1);  // also NaN
    *frac = clamped - lower;
    *inside = pos >= (T)-1 && pos < (T)size;
    return (int)lower;
}

// The weights of the four corners in the sample's derivative of order
// (order_y, order_x): geometry.corner_weights.
template <typename T>
__device__ void corner_weights(T fy, T fx, bool inside_y, bool inside_x,
                               int order_y, int order_x, T* weight) {
    const T y0 = order_y == 0 ? 1 - fy : -(T)inside_y;
    const T y1 = order_y == 0 ? fy : (T)inside_y;
    const T x0 = order_x == 0 ? 1 - fx : -(T)inside_x;
    const T x1 = order_x == 0 ? fx : (T)inside_x;
    weight[0] = y0 * x0;
    weight[1] = y0 * x1;
    weight[2] = y1 * x0;
    weight[3] = y1 * x1;
}

// Row of channel ch, tap k in the columns: (group, tap, channel) order.
__device__ ptrdiff_t column_row(ptrdiff_t ch, int k, int K, int c_group) {
    return (ch / c_group * K + k) * c_group + ch % c_group;
}

template <typename T>
__device__ T pixel(const T* image, int h, int w, int y, int x) {
    return (0 <= y && y < h && 0 <= x && x < w) ? image[y * w + x] : (T)0;
}

// The adjoint of a bilinear sample: g times each corner's weight added to
// the corners inside the image (atomicAdd: other threads add there too).
template <typename T>
__device__ void add_to_corners(T* image, int h, int w, int y0, int x0, T g,
                               const T* weight) {
    for (int q = 0; q < 4; ++q) {
        const int y = y0 + q / 2;
        const int x = x0 + q % 2;
        if (0 <= y && y < h && 0 <= x && x < w) {
            atomicAdd(&image[y * w + x], g * weight[q]);
        }
    }
}

// One thread per (offset group, tap, sample) i: decodes them, finds where
// the sample falls and its modulation m, and the group's channels.
#define SAMPLE_POSITION(T)                                                 \
    const ptrdiff_t p = i % P;                                             \
    const int k = (i / P) % K;                                             \
    const int group = (i / P) / K;                                         \
    const int ox = p % out_w;                                              \
    const int oy = (p / out_w) % out_h;                                    \
    const ptrdiff_t n = p / ((ptrdiff_t)out_w * out_h);                    \
    const ptrdiff_t plane = (ptrdiff_t)out_h * out_w;                      \
    const ptrdiff_t n_group = n * G + group;                               \
    const ptrdiff_t off = (n_group * 2 * K + k) * plane + oy * out_w + ox; \
    const ptrdiff_t mask_at = (n_group * K + k) * plane + oy * out_w + ox; \
    const T pos_x = offset[off] + (T)(ox * sx - pw + k % kw * dil_x);      \
    const T pos_y = offset[off + K * plane]                                \
                    + (T)(oy * sy - ph + k / kw * dil_y);                  \
    const T m = has_mask ? mask[mask_at] : (T)1;                           \
    T fy, fx;                                                              \
    bool inside_y, inside_x;                                               \
    const int y0 = axis_geometry(pos_y, h, &fy, &inside_y);                \
    const int x0 = axis_geometry(pos_x, w, &fx, &inside_x);                \
    const int group_channels = c_in / G;                                   \
    const ptrdiff_t first_channel = (ptrdiff_t)group * group_channels;
'''

# Sizes and geometry, the trailing parameters of every kernel. Without a
# mask, has_mask is 0 and mask is any array (never read).
GEOMETRY_PARAMS = ('raw T offset, raw T mask, int32 has_mask, int64 P, '
                   'int32 c_in, int32 h, int32 w, int32 out_h, int32 out_w, '
                   'int32 kh, int32 kw, int32 sy, int32 sx, int32 ph, '
                   'int32 pw, int32 dil_y, int32 dil_x, int32 G, '
                   'int32 groups')


class KernelSource(collections.namedtuple(
        'KernelSource', 'name in_params out_params operation')):
    """One ``ElementwiseKernel``: its parameters and its CUDA operation."""

    @property
    def all_in_params(self):
        return self.in_params + ', ' + GEOMETRY_PARAMS

    @property
    def body(self):
        return 'const int K = kh * kw;\n' + self.operation


# Each thread writes its sample of every channel of its offset group:
# neighbouring threads write neighbouring entries of a column row.
SAMPLE_COLUMNS = KernelSource(
    'deformable_sample_columns', 'raw T x', 'raw T col', r'''
    SAMPLE_POSITION(T)
    for (ptrdiff_t ch = first_channel; ch < first_channel + group_channels;
         ++ch) {
        const T* image = &x[(n * c_in + ch) * h * w];
        col[column_row(ch, k, K, c_in / groups) * P + p] =
            m * ((1 - fy) * ((1 - fx) * pixel(image, h, w, y0, x0)
                             + fx * pixel(image, h, w, y0, x0 + 1))
                 + fy * ((1 - fx) * pixel(image, h, w, y0 + 1, x0)
                         + fx * pixel(image, h, w, y0 + 1, x0 + 1)));
    }
    ''')

# The adjoint of SAMPLE_COLUMNS: each thread adds its column entries to
# their four corners.
SCATTER_COLUMNS = KernelSource(
    'deformable_scatter_columns', 'raw T gcol', 'raw T gx', r'''
    SAMPLE_POSITION(T)
    // As on the CPU, samples with no corner in the image (NaN ones too)
    // add nothing.
    if (inside_y && inside_x) {
        const T corner_weight[4] = {
            (1 - fy) * (1 - fx) * m, (1 - fy) * fx * m,
            fy * (1 - fx) * m, fy * fx * m};
        for (ptrdiff_t ch = first_channel;
             ch < first_channel + group_channels; ++ch) {
            add_to_corners(&gx[(n * c_in + ch) * h * w], h, w, y0, x0,
                           gcol[column_row(ch, k, K, c_in / groups) * P + p],
                           corner_weight);
        }
    }
    ''')

# Each thread sums over its group's channels and writes both of its offset
# gradients and, with a mask, the mask's gradient (the unmodulated sample).
OFFSET_GRADS = KernelSource(
    'deformable_offset_grads', 'raw T x, raw T gcol',
    'raw T goffset, raw T gmask', r'''
    SAMPLE_POSITION(T)
    T s00 = 0, s01 = 0, s10 = 0, s11 = 0;
    for (ptrdiff_t ch = first_channel; ch < first_channel + group_channels;
         ++ch) {
        const T* image = &x[(n * c_in + ch) * h * w];
        const T g = gcol[column_row(ch, k, K, c_in / groups) * P + p];
        s00 += g * pixel(image, h, w, y0, x0);
        s01 += g * pixel(image, h, w, y0, x0 + 1);
        s10 += g * pixel(image, h, w, y0 + 1, x0);
        s11 += g * pixel(image, h, w, y0 + 1, x0 + 1);
    }
    const T grad_y = (1 - fx) * (s10 - s00) + fx * (s11 - s01);
    const T grad_x = (1 - fy) * (s01 - s00) + fy * (s11 - s10);
    // Multiplying (not branching) keeps NaN from a NaN fraction.
    goffset[off] = grad_x * (T)inside_x * m;
    goffset[off + K * plane] = grad_y * (T)inside_y * m;
    if (has_mask) {
        gmask[mask_at] = (1 - fy) * (1 - fx) * s00 + (1 - fy) * fx * s01
                         + fy * (1 - fx) * s10 + fy * fx * s11;
    }
    ''')

# Second order (``layout``): every channel's sample at every tap, ``(n, c,
# K, out_h, out_w)``, in a derivative w.r.t. the sample's coordinates
# (unmodulated: the mask is arithmetic on these), and its adjoint.
SAMPLE_TAPS = KernelSource(
    'deformable_sample_taps', 'raw T x, int32 order_y, int32 order_x',
    'raw T samples', r'''
    SAMPLE_POSITION(T)
    T weight[4];
    corner_weights(fy, fx, inside_y, inside_x, order_y, order_x, weight);
    for (ptrdiff_t ch = first_channel; ch < first_channel + group_channels;
         ++ch) {
        const T* image = &x[(n * c_in + ch) * h * w];
        samples[((n * c_in + ch) * K + k) * plane + oy * out_w + ox] =
            weight[0] * pixel(image, h, w, y0, x0)
            + weight[1] * pixel(image, h, w, y0, x0 + 1)
            + weight[2] * pixel(image, h, w, y0 + 1, x0)
            + weight[3] * pixel(image, h, w, y0 + 1, x0 + 1);
    }
    ''')

SCATTER_TAPS = KernelSource(
    'deformable_scatter_taps', 'raw T samples, int32 order_y, int32 order_x',
    'raw T gx', r'''
    SAMPLE_POSITION(T)
    // As in the backward, samples with no corner in the image add nothing.
    if (inside_y && inside_x) {
        T weight[4];
        corner_weights(fy, fx, inside_y, inside_x, order_y, order_x, weight);
        for (ptrdiff_t ch = first_channel;
             ch < first_channel + group_channels; ++ch) {
            add_to_corners(&gx[(n * c_in + ch) * h * w], h, w, y0, x0,
                           samples[((n * c_in + ch) * K + k) * plane
                                   + oy * out_w + ox],
                           weight);
        }
    }
    ''')

KERNELS = (SAMPLE_COLUMNS, SCATTER_COLUMNS, OFFSET_GRADS, SAMPLE_TAPS,
           SCATTER_TAPS)


def _kernel(source):
    return cuda.elementwise(source.all_in_params, source.out_params,
                            source.body, source.name, preamble=PREAMBLE)


class KernelArgs(object):
    """The sizes and geometry arguments the kernels share."""

    def __init__(self, x_shape, offset, mask, ksize, hyperparameters):
        n, c, h, w = x_shape
        _, offset_channels, out_h, out_w = offset.shape
        stride, pad, dilate, groups = hyperparameters
        n_taps = ksize[0] * ksize[1]
        self.n_groups = offset_channels // (2 * n_taps)
        self.n_samples = n * out_h * out_w
        self.n_threads = self.n_groups * n_taps * self.n_samples
        self.columns_shape = (c * n_taps, self.n_samples)
        self.args = ((offset, offset if mask is None else mask,
                      int(mask is not None), self.n_samples, c, h, w,
                      out_h, out_w) + tuple(ksize) + tuple(stride)
                     + tuple(pad) + tuple(dilate) + (self.n_groups, groups))


def sample_columns(x, kernel_args):
    """Bilinear (and modulated) samples, ``(c * K, P)``."""
    columns = cuda.cupy.empty(kernel_args.columns_shape, dtype=x.dtype)
    _kernel(SAMPLE_COLUMNS)(x, *kernel_args.args, columns,
                            size=kernel_args.n_threads)
    return columns


def scatter_columns(grad_columns, x_shape, kernel_args):
    """Adjoint of :func:`sample_columns` with atomicAdd: ``(n, c, h, w)``."""
    grad_x = cuda.cupy.zeros(x_shape, dtype=grad_columns.dtype)
    _kernel(SCATTER_COLUMNS)(grad_columns, *kernel_args.args, grad_x,
                             size=kernel_args.n_threads)
    return grad_x


def offset_grads(x, grad_columns, offset, mask, kernel_args):
    """Gradients w.r.t. ``offset`` and ``mask`` (None without one)."""
    grad_offset = cuda.cupy.empty_like(offset)
    # Without a mask nothing is written to the placeholder.
    grad_mask = cuda.cupy.empty_like(mask if mask is not None else offset[:0])
    _kernel(OFFSET_GRADS)(x, grad_columns, *kernel_args.args, grad_offset,
                          grad_mask, size=kernel_args.n_threads)
    return grad_offset, (grad_mask if mask is not None else None)


def _grouped_matmul(a, b):
    """``a @ b`` for stacks ``(groups, ., .)`` of matrices."""
    if len(a) == 1:
        return a[0].dot(b[0])[None]
    return cuda.cupy.matmul(a, b)


class GpuBackend(object):
    """The CuPy backend (see ``backends`` for the interface)."""

    name = 'cupy'

    def _prepare(self, hyperparameters, x, offset, W, mask):
        """The inputs in the compute dtype, C-contiguous as the kernels
        index them, the weight matrix and the kernels' arguments."""
        dtype = geometry.compute_dtype(x.dtype)
        x, offset = (cuda.cupy.ascontiguousarray(a, dtype=dtype)
                     for a in (x, offset))
        if mask is not None:
            mask = cuda.cupy.ascontiguousarray(mask, dtype=dtype)
        weight = layout.weight_matrix(W, hyperparameters.groups, dtype)
        kernel_args = KernelArgs(x.shape, offset, mask, W.shape[2:],
                                 hyperparameters)
        return x, offset, mask, weight, kernel_args

    def forward(self, hyperparameters, x, offset, W, b, mask):
        """Output and the columns, kept for the backward."""
        x_c, offset, mask, weight, kernel_args = self._prepare(
            hyperparameters, x, offset, W, mask)
        n, _, out_h, out_w = offset.shape
        columns = sample_columns(x_c, kernel_args)
        groups, width, out_group = weight.shape
        # Sizes written out: with no images, -1 would be ambiguous.
        n_samples = kernel_args.n_samples
        y = _grouped_matmul(weight.transpose(0, 2, 1),
                            columns.reshape(groups, width, n_samples))
        y = y.reshape(groups * out_group, n_samples)
        if b is not None:
            y += b.astype(y.dtype, copy=False)[:, None]
        y = y.reshape(groups * out_group, n, out_h, out_w).transpose(
            1, 0, 2, 3)
        return cuda.cupy.ascontiguousarray(y, dtype=x.dtype), columns

    def backward(self, hyperparameters, x, offset, W, gy, mask, kept,
                 needed):
        """The gradients named in ``needed``; ``kept``: the forward's
        columns, or None."""
        x_c, offset_c, mask_c, weight, kernel_args = self._prepare(
            hyperparameters, x, offset, W, mask)
        groups, width, out_group = weight.shape
        # (groups, out_group, P), samples in the columns' order.
        n_samples = kernel_args.n_samples
        gy = gy.astype(weight.dtype, copy=False).transpose(
            1, 0, 2, 3).reshape(groups, out_group, n_samples)
        grads = {}
        if 'W' in needed:
            columns = kept if kept is not None else sample_columns(
                x_c, kernel_args)
            grads['W'] = layout.weight_from_matrix(_grouped_matmul(
                columns.reshape(groups, width, n_samples),
                gy.transpose(0, 2, 1)),
                W.shape)
        if needed & {'x', 'offset', 'mask'}:
            grad_columns = _grouped_matmul(weight, gy).reshape(
                kernel_args.columns_shape)
            if 'x' in needed:
                utils.nondeterministic('atomicAdd')
                grads['x'] = scatter_columns(grad_columns, x.shape,
                                             kernel_args)
            if needed & {'offset', 'mask'}:
                grads['offset'], grads['mask'] = offset_grads(
                    x_c, grad_columns, offset_c, mask_c, kernel_args)
        return {name: grads[name].astype(x.dtype, copy=False)
                for name in needed}

    def _tap_args(self, hyperparameters, array, offset, x_shape, ksize):
        dtype = geometry.compute_dtype(array.dtype)
        array, offset = (cuda.cupy.ascontiguousarray(a, dtype=dtype)
                         for a in (array, offset))
        return array, KernelArgs(x_shape, offset, None, ksize,
                                 hyperparameters._replace(groups=1))

    def sample_taps(self, hyperparameters, z, offset, ksize, order):
        """The samples of ``z`` at every tap, ``(n, c, K, out_h, out_w)``,
        in their derivative of ``order``."""
        z_c, kernel_args = self._tap_args(hyperparameters, z, offset,
                                          z.shape, ksize)
        n, c = z.shape[:2]
        samples = cuda.cupy.empty(
            (n, c, ksize[0] * ksize[1]) + offset.shape[2:], z_c.dtype)
        _kernel(SAMPLE_TAPS)(z_c, order[0], order[1], *kernel_args.args,
                             samples, size=kernel_args.n_threads)
        return samples.astype(z.dtype, copy=False)

    def scatter_taps(self, hyperparameters, samples, offset, x_shape, ksize,
                     order):
        """The adjoint of :meth:`sample_taps`: ``x_shape``, with
        atomicAdd."""
        samples_c, kernel_args = self._tap_args(hyperparameters, samples,
                                                offset, x_shape, ksize)
        utils.nondeterministic('atomicAdd')
        grad = cuda.cupy.zeros(x_shape, samples_c.dtype)
        _kernel(SCATTER_TAPS)(samples_c, order[0], order[1],
                              *kernel_args.args, grad,
                              size=kernel_args.n_threads)
        return grad.astype(samples.dtype, copy=False)


BACKEND = GpuBackend()
