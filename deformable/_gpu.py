"""CuPy kernels for deformable-convolution sampling.

Columns are laid out ``(c * K, P)`` (``P = n * out_h * out_w``) so that
neighbouring threads read neighbouring output pixels, and the weight matrix
is ``(out_c, c * K)``. The sampling rules are the CPU path's (see
``_cpu._axis_geometry``): positions clamped to ``[-1, size]``, floor capped
at ``size - 1``, NaN kept in the fraction, forward difference at integers.

Each kernel's CUDA source is defined once here (:data:`PREAMBLE` and the
:class:`KernelSource` constants) and compiled by CuPy as it stands; the
tests compile the same strings for the CPU (``tests/kernel_emulation.py``).
Flat indices that are products of sizes are ``ptrdiff_t``: a batch of
feature maps can pass 2**31 elements.
"""

import collections

from chainer.backends import cuda


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

template <typename T>
__device__ T pixel(const T* image, int h, int w, int y, int x) {
    return (0 <= y && y < h && 0 <= x && x < w) ? image[y * w + x] : (T)0;
}

// Decodes sample p and tap k, and finds their position in the image.
#define SAMPLE_POSITION(T, p, k)                                          \
    const int ox = p % out_w;                                             \
    const int oy = (p / out_w) % out_h;                                   \
    const ptrdiff_t n = p / ((ptrdiff_t)out_w * out_h);                   \
    const ptrdiff_t plane = (ptrdiff_t)out_h * out_w;                     \
    const ptrdiff_t off = (n * 2 * K + k) * plane + oy * out_w + ox;      \
    const T pos_x = offset[off] + (T)(ox * sx - pw + k % kw);             \
    const T pos_y = offset[off + K * plane] + (T)(oy * sy - ph + k / kw); \
    T fy, fx;                                                             \
    bool inside_y, inside_x;                                              \
    const int y0 = axis_geometry(pos_y, h, &fy, &inside_y);               \
    const int x0 = axis_geometry(pos_x, w, &fx, &inside_x);
'''

# Sizes and geometry, the trailing parameters of every kernel.
GEOMETRY_PARAMS = ('raw T offset, int64 P, int32 c_in, int32 h, int32 w, '
                   'int32 out_h, int32 out_w, int32 kh, int32 kw, '
                   'int32 sy, int32 sx, int32 ph, int32 pw')


class KernelSource(collections.namedtuple(
        'KernelSource', 'name in_params out_params operation')):
    """One ``ElementwiseKernel``: its parameters and its CUDA operation."""

    @property
    def all_in_params(self):
        return self.in_params + ', ' + GEOMETRY_PARAMS

    @property
    def body(self):
        return 'const int K = kh * kw;\n' + self.operation


# One thread per (channel, tap, sample) writes one column entry.
SAMPLE_COLUMNS = KernelSource(
    'deformable_sample_columns', 'raw T x', 'T col', r'''
    const ptrdiff_t p = i % P;
    const int k = (i / P) % K;
    const ptrdiff_t ch = i / (P * K);
    SAMPLE_POSITION(T, p, k)
    const T* image = &x[(n * c_in + ch) * h * w];
    col = (1 - fy) * ((1 - fx) * pixel(image, h, w, y0, x0)
                      + fx * pixel(image, h, w, y0, x0 + 1))
          + fy * ((1 - fx) * pixel(image, h, w, y0 + 1, x0)
                  + fx * pixel(image, h, w, y0 + 1, x0 + 1));
    ''')

# The adjoint of SAMPLE_COLUMNS: one thread per column entry adds it to its
# four corners.
SCATTER_COLUMNS = KernelSource(
    'deformable_scatter_columns', 'T gcol', 'raw T gx', r'''
    const ptrdiff_t p = i % P;
    const int k = (i / P) % K;
    const ptrdiff_t ch = i / (P * K);
    SAMPLE_POSITION(T, p, k)
    // As on the CPU, samples with no corner in the image (NaN ones too)
    // add nothing.
    if (inside_y && inside_x) {
        T* image = &gx[(n * c_in + ch) * h * w];
        const T corner_weight[4] = {(1 - fy) * (1 - fx), (1 - fy) * fx,
                                    fy * (1 - fx), fy * fx};
        for (int q = 0; q < 4; ++q) {
            const int y = y0 + q / 2;
            const int x = x0 + q % 2;
            if (0 <= y && y < h && 0 <= x && x < w) {
                atomicAdd(&image[y * w + x], gcol * corner_weight[q]);
            }
        }
    }
    ''')

# One thread per (tap, sample) sums over channels and writes both of its
# offset gradients.
OFFSET_GRADS = KernelSource(
    'deformable_offset_grads', 'raw T x, raw T gcol', 'raw T goffset', r'''
    const ptrdiff_t p = i % P;
    const int k = i / P;
    SAMPLE_POSITION(T, p, k)
    T s00 = 0, s01 = 0, s10 = 0, s11 = 0;
    for (ptrdiff_t ch = 0; ch < c_in; ++ch) {
        const T* image = &x[(n * c_in + ch) * h * w];
        const T g = gcol[(ch * K + k) * P + p];
        s00 += g * pixel(image, h, w, y0, x0);
        s01 += g * pixel(image, h, w, y0, x0 + 1);
        s10 += g * pixel(image, h, w, y0 + 1, x0);
        s11 += g * pixel(image, h, w, y0 + 1, x0 + 1);
    }
    const T grad_y = (1 - fx) * (s10 - s00) + fx * (s11 - s01);
    const T grad_x = (1 - fy) * (s01 - s00) + fy * (s11 - s10);
    // Multiplying (not branching) keeps NaN from a NaN fraction.
    goffset[off] = grad_x * (T)inside_x;
    goffset[off + K * plane] = grad_y * (T)inside_y;
    ''')

KERNELS = (SAMPLE_COLUMNS, SCATTER_COLUMNS, OFFSET_GRADS)


def _kernel(source):
    return cuda.elementwise(source.all_in_params, source.out_params,
                            source.body, source.name, preamble=PREAMBLE)


def _geometry_args(x_shape, offset, ksize, stride, pad):
    n, c, h, w = x_shape
    _, _, out_h, out_w = offset.shape
    return ((offset, n * out_h * out_w, c, h, w, out_h, out_w)
            + tuple(ksize) + tuple(stride) + tuple(pad))


def sample_columns(x, offset, ksize, stride, pad):
    """Bilinear samples, ``(c * K, P)``."""
    n, c, _, _ = x.shape
    _, _, out_h, out_w = offset.shape
    columns = cuda.cupy.empty(
        (c * ksize[0] * ksize[1], n * out_h * out_w), dtype=x.dtype)
    _kernel(SAMPLE_COLUMNS)(
        x, *_geometry_args(x.shape, offset, ksize, stride, pad), columns)
    return columns


def scatter_columns(grad_columns, x_shape, offset, ksize, stride, pad):
    """Adjoint of :func:`sample_columns` with atomicAdd: ``(n, c, h, w)``."""
    grad_x = cuda.cupy.zeros(x_shape, dtype=grad_columns.dtype)
    _kernel(SCATTER_COLUMNS)(
        grad_columns, *_geometry_args(x_shape, offset, ksize, stride, pad),
        grad_x)
    return grad_x


def offset_grads(x, grad_columns, offset, ksize, stride, pad):
    """Gradient w.r.t. ``offset``: ``(n, 2K, out_h, out_w)``."""
    n, _, _, _ = x.shape
    _, _, out_h, out_w = offset.shape
    grad_offset = cuda.cupy.empty_like(offset)
    _kernel(OFFSET_GRADS)(
        x, grad_columns, *_geometry_args(x.shape, offset, ksize, stride, pad),
        grad_offset, size=n * out_h * out_w * ksize[0] * ksize[1])
    return grad_offset
