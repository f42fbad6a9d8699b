"""The GPU backend: CuPy kernels for the sampling, cuBLAS for the products.

The columns (``layout``) are stored ``(columns, P)``, ``P = n * out_h *
out_w`` samples in image-major order (in the deterministic mode, one such
matrix per block of images), and multiplied with the weight matrix one
convolution group at a time. Each thread of a kernel handles one
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

**Two types.** ``T`` is the storage type of the images, the columns and
their gradients, ``C`` the type positions, bilinear weights and every
gradient sum are computed in: the same for float32 and float64, while for
float16 the columns and the products are half precision (cuBLAS on the
tensor cores, accumulating in float32) and ``C`` is float32.

**Chunks.** The batch goes through in chunks of whole images whose
buffers fit in ``chainer.config.deformable_workspace_size`` bytes.

**Deterministic mode.** Under ``chainer.config.cudnn_deterministic`` the
backward uses no floating-point atomics: each input pixel gathers its
corners' contributions in a fixed order (a stable sort of the corners by
pixel). The products are made block by block, forward and backward, and
the weight gradient adds the blocks' products in order. A block's number
of images is set by the layer (``tuning.GPU_DETERMINISTIC_BLOCK_BYTES``),
never by the workspace, and chunks are whole blocks: cuBLAS picks its
algorithm by a product's shape, and no shape depends on the chunk, so the
output and the gradients are the same bits for any workspace. (A chunk
holds one block at least, even where the workspace is smaller.)
"""

import collections
import numbers

import numpy

import chainer
from chainer.backends import cuda
from chainer import utils

from deformable import geometry
from deformable import tuning
from deformable.backends import layout


# Blocks of the columns start this many entries apart (512 bytes at least,
# as fresh CuPy arrays): a block's products then see the same alignment in
# any chunk.
BLOCK_ALIGNMENT = 256

PREAMBLE = '#define BLOCK_ALIGNMENT {}\n'.format(BLOCK_ALIGNMENT) + r"""
// Lower corner, fraction and "gradient flows" flag along one axis.
template <typename C>
__device__ int axis_geometry(C pos, int size, C* frac, bool* inside) {
    // Comparisons are false for NaN, so NaN passes through to frac.
    C clamped = pos < (C)-1 ? (C)-1 : (pos > (C)size ? (C)size : pos);
    C lower = floor(clamped);
    if (!(lower <= (C)(size - 1))) lower = (C)(size - 1);  // also NaN
    *frac = clamped - lower;
    *inside = pos >= (C)-1 && pos < (C)size;
    return (int)lower;
}

// The weights of the four corners in the sample's derivative of order
// (order_y, order_x): geometry.corner_weights.
template <typename C>
__device__ void corner_weights(C fy, C fx, bool inside_y, bool inside_x,
                               int order_y, int order_x, C* weight) {
    const C y0 = order_y == 0 ? 1 - fy : -(C)inside_y;
    const C y1 = order_y == 0 ? fy : (C)inside_y;
    const C x0 = order_x == 0 ? 1 - fx : -(C)inside_x;
    const C x1 = order_x == 0 ? fx : (C)inside_x;
    weight[0] = y0 * x0;
    weight[1] = y0 * x1;
    weight[2] = y1 * x0;
    weight[3] = y1 * x1;
}

// Row of channel ch, tap k in the columns: (group, tap, channel) order.
__device__ ptrdiff_t column_row(ptrdiff_t ch, int k, int K, int c_group) {
    return (ch / c_group * K + k) * c_group + ch % c_group;
}

// Where row `row`, sample p is in the columns: blocks of `block` samples
// (the last one shorter), each (rows, its samples), BLOCK_ALIGNMENT entries
// aligned. One block, (rows, P), in the default mode; blocks of a number of
// images fixed by the layer in the deterministic mode (``column_blocks``).
__device__ ptrdiff_t column_at(ptrdiff_t row, ptrdiff_t p, ptrdiff_t P,
                               ptrdiff_t rows, ptrdiff_t block) {
    const ptrdiff_t index = p / block;
    const ptrdiff_t first = index * block;
    const ptrdiff_t size = P - first < block ? P - first : block;
    const ptrdiff_t stride = (rows * block + BLOCK_ALIGNMENT - 1)
                             / BLOCK_ALIGNMENT * BLOCK_ALIGNMENT;
    return index * stride + row * size + (p - first);
}

// Channel ch's entry of the columns at tap k, sample p.
#define COLUMN_AT(ch)                                                      \
    column_at(column_row(ch, k, K, c_in / groups), p, P, c_in * K, block)

template <typename C, typename T>
__device__ C pixel(const T* image, int h, int w, int y, int x) {
    return (0 <= y && y < h && 0 <= x && x < w) ? (C)image[y * w + x] : (C)0;
}

// The adjoint of a bilinear sample: g times each corner's weight added to
// the corners inside the image (atomicAdd: other threads add there too).
template <typename C>
__device__ void add_to_corners(C* image, int h, int w, int y0, int x0, C g,
                               const C* weight) {
    for (int q = 0; q < 4; ++q) {
        const int y = y0 + q / 2;
        const int x = x0 + q % 2;
        if (0 <= y && y < h && 0 <= x && x < w) {
            atomicAdd(&image[y * w + x], g * weight[q]);
        }
    }
}

// One thread per (offset group, tap, sample) i: decodes them, finds where
// the sample falls and its modulation m.
#define SAMPLE_POSITION(C)                                                 \
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
    const C pos_x = offset[off] + (C)(ox * sx - pw + k % kw * dil_x);      \
    const C pos_y = offset[off + K * plane]                                \
                    + (C)(oy * sy - ph + k / kw * dil_y);                  \
    const C m = has_mask ? mask[mask_at] : (C)1;                           \
    C fy, fx;                                                              \
    bool inside_y, inside_x;                                               \
    const int y0 = axis_geometry(pos_y, h, &fy, &inside_y);                \
    const int x0 = axis_geometry(pos_x, w, &fx, &inside_x);

// The channels of the thread's offset group.
#define GROUP_CHANNELS                                                     \
    const int group_channels = c_in / G;                                   \
    const ptrdiff_t first_channel = (ptrdiff_t)group * group_channels;
"""

# Sizes and geometry, the trailing parameters of every kernel that finds
# samples. Without a mask, has_mask is 0 and mask is any array (never read).
GEOMETRY_PARAMS = ('raw C offset, raw C mask, int32 has_mask, int64 P, '
                   'int32 c_in, int32 h, int32 w, int32 out_h, int32 out_w, '
                   'int32 kh, int32 kw, int32 sy, int32 sx, int32 ph, '
                   'int32 pw, int32 dil_y, int32 dil_x, int32 G, '
                   'int32 groups, int64 block')


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
    'deformable_sample_columns', 'raw T x', 'raw T col', r"""
    SAMPLE_POSITION(C)
    GROUP_CHANNELS
    for (ptrdiff_t ch = first_channel; ch < first_channel + group_channels;
         ++ch) {
        const T* image = &x[(n * c_in + ch) * h * w];
        col[COLUMN_AT(ch)] = (T)(
            m * ((1 - fy) * ((1 - fx) * pixel<C>(image, h, w, y0, x0)
                             + fx * pixel<C>(image, h, w, y0, x0 + 1))
                 + fy * ((1 - fx) * pixel<C>(image, h, w, y0 + 1, x0)
                         + fx * pixel<C>(image, h, w, y0 + 1, x0 + 1))));
    }
    """)

# The adjoint of SAMPLE_COLUMNS and the gradients of the offsets and the
# mask, from one read of the columns' gradient: each thread adds its entries
# to their four corners (want_x) and sums over its group's channels each
# entry times each corner's pixel (want_offset). Outputs not wanted are any
# arrays of type C, never written.
COLUMN_GRADS = KernelSource(
    'deformable_column_grads',
    'raw T x, raw T gcol, int32 want_x, int32 want_offset',
    'raw C gx, raw C goffset, raw C gmask', r"""
    SAMPLE_POSITION(C)
    GROUP_CHANNELS
    // As on the CPU, samples with no corner in the image (NaN ones too)
    // add nothing to gx.
    const bool scatter = want_x && inside_y && inside_x;
    // Each corner's bilinear weight, and modulated: what it adds to gx.
    C weight[4], modulated[4];
    corner_weights(fy, fx, inside_y, inside_x, 0, 0, weight);
    for (int q = 0; q < 4; ++q) modulated[q] = weight[q] * m;
    C s00 = 0, s01 = 0, s10 = 0, s11 = 0;
    for (ptrdiff_t ch = first_channel; ch < first_channel + group_channels;
         ++ch) {
        const C g = (C)gcol[COLUMN_AT(ch)];
        if (scatter) {
            add_to_corners(&gx[(n * c_in + ch) * h * w], h, w, y0, x0, g,
                           modulated);
        }
        if (want_offset) {
            const T* image = &x[(n * c_in + ch) * h * w];
            s00 += g * pixel<C>(image, h, w, y0, x0);
            s01 += g * pixel<C>(image, h, w, y0, x0 + 1);
            s10 += g * pixel<C>(image, h, w, y0 + 1, x0);
            s11 += g * pixel<C>(image, h, w, y0 + 1, x0 + 1);
        }
    }
    if (want_offset) {
        const C grad_y = (1 - fx) * (s10 - s00) + fx * (s11 - s01);
        const C grad_x = (1 - fy) * (s01 - s00) + fy * (s11 - s10);
        // Multiplying (not branching) keeps NaN from a NaN fraction.
        goffset[off] = grad_x * (C)inside_x * m;
        goffset[off + K * plane] = grad_y * (C)inside_y * m;
        if (has_mask) {
            gmask[mask_at] = weight[0] * s00 + weight[1] * s01
                             + weight[2] * s10 + weight[3] * s11;
        }
    }
    """)

# Second order (``layout``): every channel's sample at every tap, ``(n, c,
# K, out_h, out_w)``, in a derivative w.r.t. the sample's coordinates
# (unmodulated: the mask is arithmetic on these), and its adjoint.
SAMPLE_TAPS = KernelSource(
    'deformable_sample_taps', 'raw T x, int32 order_y, int32 order_x',
    'raw T samples', r"""
    SAMPLE_POSITION(C)
    GROUP_CHANNELS
    C weight[4];
    corner_weights(fy, fx, inside_y, inside_x, order_y, order_x, weight);
    for (ptrdiff_t ch = first_channel; ch < first_channel + group_channels;
         ++ch) {
        const T* image = &x[(n * c_in + ch) * h * w];
        samples[((n * c_in + ch) * K + k) * plane + oy * out_w + ox] = (T)(
            weight[0] * pixel<C>(image, h, w, y0, x0)
            + weight[1] * pixel<C>(image, h, w, y0, x0 + 1)
            + weight[2] * pixel<C>(image, h, w, y0 + 1, x0)
            + weight[3] * pixel<C>(image, h, w, y0 + 1, x0 + 1));
    }
    """)

SCATTER_TAPS = KernelSource(
    'deformable_scatter_taps', 'raw T samples, int32 order_y, int32 order_x',
    'raw C gx', r"""
    SAMPLE_POSITION(C)
    GROUP_CHANNELS
    // As in the backward, samples with no corner in the image add nothing.
    if (inside_y && inside_x) {
        C weight[4];
        corner_weights(fy, fx, inside_y, inside_x, order_y, order_x, weight);
        for (ptrdiff_t ch = first_channel;
             ch < first_channel + group_channels; ++ch) {
            add_to_corners(&gx[(n * c_in + ch) * h * w], h, w, y0, x0,
                           (C)samples[((n * c_in + ch) * K + k) * plane
                                      + oy * out_w + ox],
                           weight);
        }
    }
    """)

# The deterministic adjoint, in two kernels. First each sample's four
# corners as entries 4 * i + q: the input pixel (per offset group) each
# lands on, as a sort key (n_keys for none), and its weight in the
# derivative of order (order_y, order_x), modulated.
CORNER_ENTRIES = KernelSource(
    'deformable_corner_entries', 'int32 order_y, int32 order_x',
    'raw int64 keys, raw C weights', r"""
    SAMPLE_POSITION(C)
    C weight[4];
    corner_weights(fy, fx, inside_y, inside_x, order_y, order_x, weight);
    const ptrdiff_t n_keys = P / plane * G * h * w;
    for (int q = 0; q < 4; ++q) {
        const int y = y0 + q / 2;
        const int x = x0 + q % 2;
        // As in the scatter, samples with no corner in the image add
        // nothing (NaN ones too).
        const bool lands = inside_y && inside_x
                           && 0 <= y && y < h && 0 <= x && x < w;
        keys[4 * i + q] = lands ? (n_group * h + y) * w + x : n_keys;
        weights[4 * i + q] = weight[q] * m;
    }
    """)

# Then one thread per input pixel of every channel adds its corners' values
# in the sorted order (`order`, entries grouped by key from `starts`):
# columns, or with `taps_layout` the second order's tap samples.
GATHER_CORNERS = KernelSource(
    'deformable_gather_corners',
    'raw T values, raw int64 order, raw int64 starts, raw C weights, '
    'int32 taps_layout', 'raw C gx', r"""
    const ptrdiff_t image_size = (ptrdiff_t)h * w;
    const ptrdiff_t ch = i / image_size % c_in;
    const ptrdiff_t n = i / image_size / c_in;
    const ptrdiff_t plane = (ptrdiff_t)out_h * out_w;
    const ptrdiff_t key = (n * G + ch / (c_in / G)) * image_size
                          + i % image_size;
    C sum = 0;
    for (ptrdiff_t e = starts[key]; e < starts[key + 1]; ++e) {
        const ptrdiff_t entry = order[e];
        const ptrdiff_t p = entry / 4 % P;
        const int k = entry / 4 / P % K;
        const ptrdiff_t at = taps_layout
            ? ((n * c_in + ch) * K + k) * plane + p % plane
            : COLUMN_AT(ch);
        sum += (C)values[at] * weights[entry];
    }
    gx[i] = sum;
    """)


KERNELS = (SAMPLE_COLUMNS, COLUMN_GRADS, SAMPLE_TAPS, SCATTER_TAPS,
           CORNER_ENTRIES, GATHER_CORNERS)


def _kernel(source):
    return cuda.elementwise(source.all_in_params, source.out_params,
                            source.body, source.name, preamble=PREAMBLE)


def workspace_size():
    """``chainer.config.deformable_workspace_size``, checked: the bytes the
    buffers of one chunk of images may take."""
    size = chainer.config.deformable_workspace_size
    if (isinstance(size, bool) or not isinstance(size, numbers.Integral)
            or size < 1):
        raise ValueError(
            'chainer.config.deformable_workspace_size must be a positive '
            'number of bytes, not {!r} (set it with chainer.using_config or '
            'the DEFORMABLE_WORKSPACE_SIZE variable)'.format(size))
    return int(size)


def chunks(n_images, bytes_per_image, block_images=None):
    """Slices of the batch, each of as many whole images as fit in the
    workspace at ``bytes_per_image``: all of them where they fit, else a
    multiple of ``block_images`` (one block at least)."""
    block = block_images or 1
    fit = workspace_size() // max(1, bytes_per_image)
    per_chunk = max(1, n_images) if fit >= n_images else max(
        block, fit // block * block)
    return [slice(start, min(start + per_chunk, n_images))
            for start in range(0, n_images, per_chunk)]


def deterministic():
    """Whether the backward must be bit-for-bit reproducible: Chainer's own
    switch for cuDNN."""
    return bool(chainer.config.cudnn_deterministic)


class KernelArgs(object):
    """The sizes and geometry arguments the kernels share, for the images
    of ``offset`` (and ``mask``), and the columns' blocks: ``block_images``
    images each (the last one fewer), or one block of all."""

    def __init__(self, x_shape, offset, mask, ksize, hyperparameters,
                 block_images=None):
        n, c, h, w = x_shape
        _, offset_channels, out_h, out_w = offset.shape
        stride, pad, dilate, groups = hyperparameters
        n_taps = ksize[0] * ksize[1]
        self.n_groups = offset_channels // (2 * n_taps)
        self.n_samples = n * out_h * out_w
        self.n_threads = self.n_groups * n_taps * self.n_samples
        self.n_keys = n * self.n_groups * h * w
        self.rows = c * n_taps
        block_images = block_images or max(1, n)
        block = block_images * out_h * out_w
        self.args = ((offset, offset if mask is None else mask,
                      int(mask is not None), self.n_samples, c, h, w,
                      out_h, out_w) + tuple(ksize) + tuple(stride)
                     + tuple(pad) + tuple(dilate)
                     + (self.n_groups, groups, block))
        # Each block's first image, samples and first entry (column_at).
        block_stride = (-(-self.rows * block // BLOCK_ALIGNMENT)
                        * BLOCK_ALIGNMENT)
        self.blocks = [
            (first, min(block, self.n_samples - first * out_h * out_w),
             index * block_stride)
            for index, first in enumerate(range(0, n, block_images))]
        self.columns_size = (self.blocks[-1][2] + self.rows
                             * self.blocks[-1][1] if self.blocks else 0)

    def block_views(self, columns):
        """The ``(rows, samples)`` matrix of each block of ``columns``."""
        return [columns[at:at + self.rows * size].reshape(self.rows, size)
                for _, size, at in self.blocks]


class Problem(object):
    """The inputs as the kernels take them: ``x`` in its own dtype (the
    storage type ``T``, contiguous), offset and mask in the compute dtype
    (``C``), the weight as ``layout``'s matrix in ``T``."""

    def __init__(self, hyperparameters, x, offset, W, mask):
        self.hyperparameters = hyperparameters
        self.compute_dtype = geometry.compute_dtype(x.dtype)
        cupy = cuda.cupy
        self.x = cupy.ascontiguousarray(x)
        self.offset = cupy.ascontiguousarray(offset,
                                             dtype=self.compute_dtype)
        self.mask = None if mask is None else cupy.ascontiguousarray(
            mask, dtype=self.compute_dtype)
        self.weight = layout.weight_matrix(W, hyperparameters.groups,
                                           x.dtype)
        self.ksize = W.shape[2:]
        n_taps = self.ksize[0] * self.ksize[1]
        self.n_groups = offset.shape[1] // (2 * n_taps)
        self.plane = offset.shape[2] * offset.shape[3]
        self.column_bytes = (x.shape[1] * n_taps * self.plane
                             * x.dtype.itemsize)
        # The gather's key, weight, sorted key and place of each sample's
        # four corners, an image's.
        self.entry_bytes = 4 * self.n_groups * n_taps * self.plane * 32
        # gx gathered (no atomics) or scattered; the products' blocks.
        self.gather = deterministic() or tuning.GPU_GATHER_GRAD_X
        self.block_images = (self.deterministic_block_images(x.shape[0])
                             if deterministic() else None)

    def backward_bytes(self, gather):
        """Bytes of one image's buffers in the backward: the columns and
        their gradient, and the gather's entries."""
        return 2 * self.column_bytes + (self.entry_bytes if gather else 0)

    def deterministic_block_images(self, n):
        """The deterministic mode's images per block: as many as the
        backward fits in ``tuning.GPU_DETERMINISTIC_BLOCK_BYTES``, a number
        fixed by the layer (not the workspace), so that every product has
        the same shape in any chunk."""
        return max(1, min(n, tuning.GPU_DETERMINISTIC_BLOCK_BYTES
                          // self.backward_bytes(True)))

    def chunks(self, bytes_per_image):
        return chunks(self.x.shape[0], bytes_per_image, self.block_images)

    def args(self, images):
        """Kernel arguments for the images of the slice ``images``."""
        return KernelArgs(
            self.x[images].shape, self.offset[images],
            None if self.mask is None else self.mask[images], self.ksize,
            self.hyperparameters, self.block_images)


def sample_columns(x, kernel_args):
    """Bilinear (and modulated) samples: the columns' blocks, flat."""
    columns = cuda.cupy.empty(kernel_args.columns_size, dtype=x.dtype)
    _kernel(SAMPLE_COLUMNS)(x, *kernel_args.args, columns,
                            size=kernel_args.n_threads)
    return columns


def column_grads(x, grad_columns, kernel_args, grad_x=None,
                 grad_offset=None, grad_mask=None):
    """Adds the adjoint of :func:`sample_columns` to ``grad_x`` (with
    atomicAdd) and writes the gradients of the offsets and the mask, those
    of them given, in one kernel."""
    unused = kernel_args.args[0][:0]
    _kernel(COLUMN_GRADS)(
        x, grad_columns, int(grad_x is not None),
        int(grad_offset is not None), *kernel_args.args,
        *(unused if a is None else a
          for a in (grad_x, grad_offset, grad_mask)),
        size=kernel_args.n_threads)


def gather_corners(values, grad_x, kernel_args, order=(0, 0),
                   taps_layout=False):
    """Writes to ``grad_x`` the adjoint of the sampling, in the derivative
    of ``order``, of ``values`` (columns, or with ``taps_layout`` the tap
    samples) without atomics: each pixel adds its contributions in the
    order of its samples."""
    cupy = cuda.cupy
    n_entries = 4 * kernel_args.n_threads
    keys = cupy.empty(n_entries, numpy.int64)
    weights = cupy.empty(n_entries, grad_x.dtype)
    _kernel(CORNER_ENTRIES)(order[0], order[1], *kernel_args.args, keys,
                            weights, size=kernel_args.n_threads)
    # CuPy's sort is stable: a pixel's entries keep their samples' order.
    entries = cupy.argsort(keys)
    starts = cupy.searchsorted(keys[entries],
                               cupy.arange(kernel_args.n_keys + 1))
    _kernel(GATHER_CORNERS)(values, entries, starts, weights,
                            int(taps_layout), *kernel_args.args, grad_x,
                            size=grad_x.size)


def _grouped_matmul(a, b, out=None):
    """``a @ b`` for stacks ``(groups, ., .)`` of matrices."""
    if len(a) == 1:
        return a[0].dot(b[0], None if out is None else out[0])[None]
    return cuda.cupy.matmul(a, b, out=out)


# The forward's columns, kept for the backward, and their blocks' images.
Kept = collections.namedtuple('Kept', 'columns block_images')


class GpuBackend(object):
    """The CuPy backend (see ``backends`` for the interface)."""

    name = 'cupy'

    def forward(self, hyperparameters, x, offset, W, b, mask):
        """Output and, where the backward takes the whole batch at once,
        the columns, kept for it."""
        problem = Problem(hyperparameters, x, offset, W, mask)
        groups, width, out_group = problem.weight.shape
        n = x.shape[0]
        y = cuda.cupy.empty((n, groups * out_group) + offset.shape[2:],
                            x.dtype)
        keep = n * problem.backward_bytes(problem.gather) <= workspace_size()
        kept = None
        for images in problem.chunks(problem.column_bytes):
            kernel_args = problem.args(images)
            columns = sample_columns(problem.x[images], kernel_args)
            for (first, size, _), matrix in zip(
                    kernel_args.blocks, kernel_args.block_views(columns)):
                y_block = _grouped_matmul(
                    problem.weight.transpose(0, 2, 1),
                    matrix.reshape(groups, width, size))
                start = images.start + first
                y[start:start + size // problem.plane] = y_block.reshape(
                    (groups * out_group, -1) + offset.shape[2:]).transpose(
                        1, 0, 2, 3)
            if keep:
                kept = Kept(columns, problem.block_images)
        if b is not None:
            y += b.astype(x.dtype, copy=False)[:, None, None]
        return y, kept

    def backward(self, hyperparameters, x, offset, W, gy, mask, kept,
                 needed):
        """The gradients named in ``needed``; ``kept``: the forward's
        columns, or None."""
        cupy = cuda.cupy
        problem = Problem(hyperparameters, x, offset, W, mask)
        groups, width, out_group = problem.weight.shape
        n = x.shape[0]
        compute = problem.compute_dtype
        grads = {}
        if 'W' in needed:
            grads['W'] = cupy.zeros(problem.weight.shape, compute)
        if 'x' in needed:
            grads['x'] = cupy.zeros(x.shape, compute)
            if not problem.gather:
                utils.nondeterministic('atomicAdd')
        if needed & {'offset', 'mask'}:
            grads['offset'] = cupy.empty(offset.shape, compute)
            grads['mask'] = (cupy.empty(mask.shape, compute)
                             if mask is not None else None)
        for images in problem.chunks(problem.backward_bytes(problem.gather)):
            kernel_args = problem.args(images)
            if 'W' in needed:
                # The forward's, where they are the whole batch's in this
                # mode's blocks.
                columns = kept.columns if (
                    kept is not None and images == slice(0, n)
                    and kept.block_images == problem.block_images) else \
                    sample_columns(problem.x[images], kernel_args)
                column_blocks = kernel_args.block_views(columns)
            grad_columns = None
            if needed & {'x', 'offset', 'mask'}:
                grad_columns = cupy.empty(kernel_args.columns_size, x.dtype)
                grad_blocks = kernel_args.block_views(grad_columns)
            # Block by block, in order: the deterministic mode's sums.
            for index, (first, size, _) in enumerate(kernel_args.blocks):
                start = images.start + first
                # (groups, out_group, samples), in the columns' order.
                gy_block = gy[start:start + size // problem.plane].astype(
                    x.dtype, copy=False).transpose(1, 0, 2, 3).reshape(
                        groups, out_group, size)
                if 'W' in needed:
                    grads['W'] += _grouped_matmul(
                        column_blocks[index].reshape(groups, width, size),
                        gy_block.transpose(0, 2, 1))
                if grad_columns is not None:
                    _grouped_matmul(problem.weight, gy_block,
                                    out=grad_blocks[index].reshape(
                                        groups, width, size))
            if grad_columns is None:
                continue
            grad_x = grads['x'][images] if 'x' in needed else None
            if problem.gather and grad_x is not None:
                gather_corners(grad_columns, grad_x, kernel_args)
                grad_x = None
            grad_offset = grad_mask = None
            if needed & {'offset', 'mask'}:
                grad_offset = grads['offset'][images]
                if grads['mask'] is not None:
                    grad_mask = grads['mask'][images]
            if grad_x is not None or grad_offset is not None:
                column_grads(problem.x[images], grad_columns, kernel_args,
                             grad_x, grad_offset, grad_mask)
        if 'W' in needed:
            grads['W'] = layout.weight_from_matrix(grads['W'], W.shape)
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
        """The adjoint of :meth:`sample_taps`: ``x_shape``, with atomicAdd
        or, in the deterministic mode, gathered."""
        samples_c, kernel_args = self._tap_args(hyperparameters, samples,
                                                offset, x_shape, ksize)
        grad = cuda.cupy.zeros(x_shape, samples_c.dtype)
        if deterministic():
            gather_corners(samples_c, grad, kernel_args, order,
                           taps_layout=True)
        else:
            utils.nondeterministic('atomicAdd')
            _kernel(SCATTER_TAPS)(samples_c, order[0], order[1],
                                  *kernel_args.args, grad,
                                  size=kernel_args.n_threads)
        return grad.astype(samples.dtype, copy=False)


BACKEND = GpuBackend()
