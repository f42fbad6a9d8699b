"""CPU implementation of deformable-convolution sampling.

Layout. The input is copied into a zero-bordered, channels-last plane
``(images, h + 2, w + 2, c)``: each bilinear corner of a sample is one
contiguous run of channels, and corners outside the image land on the zero
border instead of needing a branch. Each thread copies the images it works
on into a plane of its own, reused from one group of images to the next
(the forward and the backward each copy them: a plane of the whole batch
would cost as much memory as the input, and its gradient's as much again;
these stay in the core's cache). A block's columns are ``(P, groups * K
* c_group)`` (``P`` samples), ordered (convolution group, tap, channel), so
that each convolution group is one contiguous block of a row and the whole
block is one matrix product per group, against the weight as ``(K *
c_group, out_group)``.

Blocks. Columns exist for a block of output rows at a time (about
:data:`CHUNK_BYTES`, a core's share of the cache), never for the whole
batch: memory stays small and a block's columns are still in cache when its
product reads them. The compiled backward fills them again, in the pass
that loads the corners for the gradients anyway, rather than keep them; the
NumPy loops keep them, as their gather costs as much as the rest of their
backward.

Threads. With the compiled loops (``deformable._numba``, when Numba is
installed), blocks run on every core, each in one thread from gathering to
writing its output; BLAS is held to one thread meanwhile (threadpoolctl),
so the two kinds of threads never compete for the cores. The backward's
unit of work is an image (its samples scatter only into its own part of
the plane) and the weight's gradient is summed over images in order, so
the gradients are the same, bit for bit, on every run. The pure-NumPy loops
(without Numba) run blocks one after another, bigger ones, as their cost
is Python's overhead per call.

Both kinds of loops find where samples fall with ``deformable.geometry``.
"""

import concurrent.futures
import contextlib
import importlib
import itertools
import math
import os
import threading

import numpy

import chainer

from deformable import geometry


# 'auto': compiled loops where Numba imports; 'never': pure NumPy; 'always':
# Numba or an error. Chainer config, so `chainer.using_config` switches it.
if not hasattr(chainer.global_config, 'deformable_use_numba'):
    chainer.global_config.deformable_use_numba = os.environ.get(
        'DEFORMABLE_USE_NUMBA', 'auto')

# Largest bordered image (elements) whose positions the compiled loops keep
# in 32 bits.
INT32_PLANE_LIMIT = 2 ** 31 - 1

# Columns per block, in bytes.
CHUNK_BYTES = 2 ** 20
NUMPY_CHUNK_BYTES = 8 * 2 ** 20

# Bytes; the threads' buffers start on one (see _aligned_empty).
CACHE_LINE = 64


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


# --- Threads ---------------------------------------------------------------

_pool = None          # (threads, ThreadPoolExecutor)
_blas = None


def n_workers():
    """Threads the compiled loops use: ``DEFORMABLE_NUM_THREADS`` if set,
    else one per core this process may use."""
    if os.environ.get('DEFORMABLE_NUM_THREADS'):
        return max(1, int(os.environ['DEFORMABLE_NUM_THREADS']))
    if hasattr(os, 'sched_getaffinity'):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _forget_pool():
    # A forked child has the pool object but not its threads.
    global _pool
    _pool = None


if hasattr(os, 'register_at_fork'):
    os.register_at_fork(after_in_child=_forget_pool)


def _single_threaded_blas():
    """BLAS held to one thread (threadpoolctl), or nothing without it."""
    global _blas
    if _blas is None:
        try:
            import threadpoolctl
            _blas = threadpoolctl.ThreadpoolController()
        except ImportError:
            _blas = False
    if not _blas:
        return contextlib.nullcontext()
    return _blas.limit(limits=1, user_api='blas')


def _run(function, items, threaded):
    """``function(item)`` for every item, on every core if ``threaded``."""
    global _pool
    workers = n_workers() if threaded else 1
    if workers == 1 or len(items) == 1:
        for item in items:
            function(item)
        return
    if _pool is None or _pool[0] != workers:
        _pool = workers, concurrent.futures.ThreadPoolExecutor(
            workers, thread_name_prefix='deformable')
    # The threads take the next item as they finish one (next() on a
    # counter is atomic): the faster core does more, with no hand-offs.
    counter = itertools.count()

    def share(_):
        for index in iter(counter.__next__, None):
            if index >= len(items):
                return
            function(items[index])
    with _single_threaded_blas():
        for _ in _pool[1].map(share, range(workers)):
            pass


class _Buffers(object):
    """Each thread's reusable arrays, by name, starting on a cache line."""

    def __init__(self):
        self._local = threading.local()

    def get(self, name, shape, dtype):
        arrays = self._local.__dict__.setdefault('arrays', {})
        array = arrays.get(name)
        # math.prod: numpy.prod costs microseconds, several times a block.
        size = math.prod(shape)
        if array is None or array.size < size:
            array = arrays[name] = _aligned_empty(size, dtype)
        return array[:size].reshape(shape)


def _aligned_empty(size, dtype):
    """A 1-D array starting on a cache line. (NumPy's large arrays start 16
    bytes past one: half of the loops' 32-byte vectors would straddle two
    lines.)"""
    dtype = numpy.dtype(dtype)
    spare = CACHE_LINE // dtype.itemsize
    raw = numpy.empty(size + spare, dtype)
    start = (-raw.ctypes.data % CACHE_LINE) // dtype.itemsize
    return raw[start:start + size]


# --- The problem and its blocks --------------------------------------------

class Problem(object):
    """Sizes and hyperparameters of one call, and how it is cut up.

    ``segments`` ``(G, S, 3)``: for each offset group, the runs of its
    channels that fall in one convolution group, as ``(start, stop,
    shift)``: channel ``ch`` of tap ``k`` is column ``shift + k *
    group_width + ch`` (runs with ``start == stop`` are padding).
    """

    def __init__(self, x_shape, offset_shape, w_shape, stride, pad, dilate,
                 groups, dtype):
        self.n, self.c, self.h, self.w = x_shape
        self.out_c, self.group_width, self.kh, self.kw = w_shape
        _, offset_channels, self.out_h, self.out_w = offset_shape
        self.n_taps = self.kh * self.kw
        self.n_groups = offset_channels // (2 * self.n_taps)
        self.groups = groups
        self.dtype = dtype = numpy.dtype(dtype)
        self.base_y = geometry.tap_bases(
            self.out_h, stride[0], pad[0], self.kh, dilate[0], dtype)
        self.base_x = geometry.tap_bases(
            self.out_w, stride[1], pad[1], self.kw, dilate[1], dtype)
        # The same by sample (``oy * out_w + ox``), for the compiled loops.
        self.sample_base_y = numpy.repeat(self.base_y, self.out_w, axis=1)
        self.sample_base_x = numpy.tile(self.base_x, (1, self.out_h))
        self.segments = self._segments()
        # One image's bordered, channels-last plane.
        self.image_plane_shape = (self.h + 2, self.w + 2, self.c)
        self.n_columns = self.n_taps * self.c
        # -1, 1, h and w in the compute dtype, for the compiled loops.
        self.constants = numpy.array([-1, 1, self.h, self.w], dtype)
        # The compiled loops' type for positions within an image's plane:
        # 32 bits where they fit (less to compute and to keep in cache).
        plane_size = (self.h + 2) * (self.w + 2) * self.c
        self.index_like = numpy.empty(
            0, numpy.int32 if plane_size <= INT32_PLANE_LIMIT else numpy.int64)

    def _segments(self):
        offset_width = self.c // self.n_groups
        runs = [[] for _ in range(self.n_groups)]
        for g in range(self.n_groups):
            for j in range(self.groups):
                start = max(g * offset_width, j * self.group_width)
                stop = min((g + 1) * offset_width,
                           (j + 1) * self.group_width)
                if start < stop:
                    shift = j * (self.n_taps - 1) * self.group_width
                    runs[g].append((start, stop, shift))
        longest = max(len(r) for r in runs)
        segments = numpy.zeros((self.n_groups, longest, 3), numpy.int64)
        for g, group_runs in enumerate(runs):
            segments[g, :len(group_runs)] = group_runs
        return segments

    def rows_per_block(self, chunk_bytes):
        row_bytes = self.out_w * self.n_columns * self.dtype.itemsize
        return max(1, chunk_bytes // row_bytes)

    def blocks(self, images, chunk_bytes, split_images=True):
        """``(images, first_row, stop_row)`` blocks of some images: rows
        ``b * out_h + oy`` of those images, about ``chunk_bytes`` of
        columns each, whole images or rows of one image (or, without
        ``split_images``, all of them)."""
        n_rows = (images.stop - images.start) * self.out_h
        step = self.rows_per_block(chunk_bytes)
        if step >= self.out_h or not split_images:
            step = n_rows
        return [(images, row, min(row + step, n_rows))
                for row in range(0, n_rows, step)]

    def image_groups(self, chunk_bytes):
        """Slices of whole images, about ``chunk_bytes`` of columns each
        (one image at least)."""
        per = max(1, self.rows_per_block(chunk_bytes) // self.out_h)
        return [slice(b, min(b + per, self.n)) for b in range(0, self.n, per)]

    def conv_groups(self):
        """``(column block, output channels)`` slices of each group."""
        block = self.n_taps * self.group_width
        out_group = self.out_c // self.groups
        return [(slice(j * block, (j + 1) * block),
                 slice(j * out_group, (j + 1) * out_group))
                for j in range(self.groups)]

    def block_view(self, array, block):
        """``array`` ``(n, C, out_h, out_w)`` restricted to a block, as
        ``(images, C, rows, out_w)`` (rows within one image, or all)."""
        images, first, stop = block
        if stop - first >= self.out_h:
            return array[images]
        oy = first % self.out_h
        b = images.start + first // self.out_h
        return array[b:b + 1, :, oy:oy + stop - first]


def bordered_plane(x, problem):
    """Channels-last copy of ``x`` with a zero border: ``(n,) +
    problem.image_plane_shape``."""
    plane = numpy.empty((len(x),) + problem.image_plane_shape, problem.dtype)
    fill_plane(plane, x)
    return plane


def fill_plane(plane, x):
    """Writes ``x`` ``(n, c, h, w)`` into ``plane``, border zeroed."""
    plane[:, 0] = 0
    plane[:, -1] = 0
    plane[:, :, 0] = 0
    plane[:, :, -1] = 0
    plane[:, 1:-1, 1:-1] = x.transpose(0, 2, 3, 1)


def weight_matrix(W, groups, dtype):
    """``W`` as ``(groups, K * c_group, out_group)``, rows (tap, channel)."""
    out_c, c_group, kh, kw = W.shape
    return numpy.ascontiguousarray(
        W.reshape(groups, out_c // groups, c_group, kh * kw).transpose(
            0, 3, 2, 1).reshape(groups, kh * kw * c_group, out_c // groups),
        dtype=dtype)


def _mask_or_dummy(mask, problem):
    """The mask as ``(n, G, K, out_h, out_w)``, or a placeholder."""
    if mask is None:
        return numpy.ones((problem.n, 1, 1, 1, 1), problem.dtype)
    return numpy.ascontiguousarray(mask, dtype=problem.dtype).reshape(
        problem.n, problem.n_groups, problem.n_taps, problem.out_h,
        problem.out_w)


def _offset6(offset, problem):
    """The offset as ``(n, G, 2, K, out_h, out_w)``; ``[:, :, 0]`` is x."""
    return numpy.ascontiguousarray(offset, dtype=problem.dtype).reshape(
        problem.n, problem.n_groups, 2, problem.n_taps, problem.out_h,
        problem.out_w)


def _grouped_dot(problem, a, weight, out, transposed=False):
    """``out = a @ weight`` within each convolution group.

    ``a`` and ``out`` are ``(P, columns)`` and ``(P, out_c)``, or the
    reverse with ``transposed`` (``weight`` then ``(groups, out_group, K *
    c_group)``).
    """
    if problem.groups == 1:
        numpy.dot(a, weight[0], out=out)
        return
    for j, (block, outputs) in enumerate(problem.conv_groups()):
        if transposed:
            block, outputs = outputs, block
        out[:, outputs] = a[:, block].dot(weight[j])


class _Inputs(object):
    """A call's arrays in the loops' layouts, and its loops."""

    def __init__(self, offset, W, mask, problem):
        self.kernels = compiled_kernels()
        self.problem = problem
        self.offset = _offset6(offset, problem)
        self.has_mask = mask is not None
        self.mask = _mask_or_dummy(mask, problem)
        self.weight = weight_matrix(W, problem.groups, problem.dtype)
        self.chunk_bytes = (CHUNK_BYTES if self.kernels is not None
                            else NUMPY_CHUNK_BYTES)
        self.buffers = _Buffers()

    def blocks(self, images):
        # The NumPy loops take whole images.
        return self.problem.blocks(images, self.chunk_bytes,
                                   split_images=self.kernels is not None)

    def columns_shape(self, block):
        _, first, stop = block
        return (stop - first) * self.problem.out_w, self.problem.n_columns

    def plane(self, images, x=None):
        """This thread's bordered plane of ``images``: of ``x``, else
        zeros."""
        shape = ((images.stop - images.start,)
                 + self.problem.image_plane_shape)
        plane = self.buffers.get('plane' if x is not None else 'zeros', shape,
                                 self.problem.dtype)
        if x is None:
            plane[...] = 0
        else:
            fill_plane(plane, x[images])
        return plane

    def columns(self, block, name='columns'):
        """This thread's reusable columns for a block."""
        return self.buffers.get(name, self.columns_shape(block),
                                self.problem.dtype)

    def geometry(self, block):
        """The NumPy loops' geometry of a block."""
        images = block[0]
        return ChunkGeometry(
            self.offset[images], self.mask[images] if self.has_mask else None,
            self.problem)

    def gather(self, block, plane, columns):
        """The block's columns from ``plane``, its images' bordered plane;
        for the NumPy loops, also its geometry."""
        images, first, stop = block
        problem = self.problem
        if self.kernels is not None:
            self.kernels.gather(
                plane, self.offset[images], self.mask[images],
                self.has_mask, problem.sample_base_y, problem.sample_base_x,
                problem.kw, problem.constants, problem.index_like,
                problem.segments, problem.group_width, first, stop, columns)
            return None
        geometry = self.geometry(block)
        _numpy_gather(plane, geometry, problem, columns)
        return geometry


def _key(block):
    images, first, stop = block
    return images.start, images.stop, first, stop


def forward(x, offset, W, b, mask, problem):
    """Output ``(n, out_c, out_h, out_w)`` and, from the NumPy loops, the
    columns by block for the backward (else None; see the module's
    docstring)."""
    inputs = _Inputs(offset, W, mask, problem)
    y = numpy.empty((problem.n, problem.out_c, problem.out_h, problem.out_w),
                    problem.dtype)
    bias = None if b is None else b.astype(problem.dtype)[:, None, None]
    kept = None if inputs.kernels is not None else {}

    def run(block, plane):
        if kept is None:
            columns = inputs.columns(block)
        else:
            columns = kept[_key(block)] = numpy.empty(
                inputs.columns_shape(block), problem.dtype)
        inputs.gather(block, plane, columns)
        product = inputs.buffers.get(
            'product', (columns.shape[0], problem.out_c), problem.dtype)
        _grouped_dot(problem, columns, inputs.weight, product)
        # (P, out_c) rows in sample order -> the block of y.
        out = problem.block_view(y, block)
        product = product.reshape(out.shape[0], out.shape[2], out.shape[3],
                                  problem.out_c).transpose(0, 3, 1, 2)
        if bias is None:
            out[...] = product
        else:
            numpy.add(product, bias, out=out)

    def run_images(images):
        plane = inputs.plane(images, x)
        for block in inputs.blocks(images):
            run(block, plane)

    image_groups = problem.image_groups(inputs.chunk_bytes)
    threaded = inputs.kernels is not None
    if len(image_groups) >= n_workers() or not threaded:
        # Each thread copies its own images into its plane.
        _run(run_images, image_groups, threaded)
    else:
        # Few, big images: their rows in parallel, from one plane.
        plane = bordered_plane(x, problem)
        _run(lambda block: run(block, plane[block[0]]),
             [block for images in image_groups
              for block in inputs.blocks(images)], threaded)
    return y, kept


def backward(x, offset, W, gy, mask, problem, offset_grad=True,
             columns=None):
    """Gradients w.r.t. ``x``, ``offset``, ``W`` and ``mask`` (or None);
    without ``offset_grad``, the offset's is left zero. ``columns``: the
    forward's, by block, if it kept them."""
    kept = columns
    inputs = _Inputs(offset, W, mask, problem)
    dtype = problem.dtype
    gx = numpy.empty((problem.n, problem.c, problem.h, problem.w), dtype)
    grad_offset = (numpy.empty if offset_grad else numpy.zeros)(
        inputs.offset.shape, dtype)
    grad_mask = numpy.empty(inputs.mask.shape, dtype) if inputs.has_mask \
        else inputs.mask
    image_groups = problem.image_groups(inputs.chunk_bytes)
    # The weight's gradient of each group of images, summed in order below.
    grad_weights = [None] * len(image_groups)

    def run(index):
        images = image_groups[index]
        grad_weight = numpy.zeros(inputs.weight.shape, dtype)
        product = inputs.buffers.get('product', inputs.weight.shape[1:],
                                     dtype)
        plane = inputs.plane(images, x)
        grad_plane = inputs.plane(images)
        # An image's blocks in one thread: they scatter into its plane.
        for block in inputs.blocks(images):
            _, first, stop = block
            columns = None if kept is None else kept.get(_key(block))
            gathered = columns is None
            if gathered:
                columns = inputs.columns(block)
            grad_columns = inputs.columns(block, 'grad_columns')
            # The block of gy -> (P, out_c), rows in sample order.
            gy_block = inputs.buffers.get(
                'gy', (columns.shape[0], problem.out_c), dtype)
            view = problem.block_view(gy, block)
            gy_block.reshape(view.shape[0], view.shape[2], view.shape[3],
                             problem.out_c)[...] = view.transpose(0, 2, 3, 1)
            _grouped_dot(problem, gy_block,
                         inputs.weight.transpose(0, 2, 1), grad_columns,
                         transposed=True)
            if inputs.kernels is not None:
                # Also gathers the columns, from the corners it loads.
                inputs.kernels.backward(
                    plane, inputs.offset[images],
                    inputs.mask[images], inputs.has_mask,
                    problem.sample_base_y, problem.sample_base_x, problem.kw,
                    problem.constants, problem.index_like, problem.segments,
                    problem.group_width,
                    first, stop, offset_grad, columns, grad_columns,
                    grad_plane, grad_offset[images],
                    grad_mask[images])
            else:
                geometry = (inputs.gather(block, plane, columns) if gathered
                            else inputs.geometry(block))
                _numpy_backward(plane, geometry, problem,
                                grad_columns, grad_plane,
                                grad_offset[images] if offset_grad else None,
                                grad_mask[images] if inputs.has_mask
                                else None)
            for j, (cols, outputs) in enumerate(problem.conv_groups()):
                numpy.dot(columns[:, cols].T, gy_block[:, outputs],
                          out=product)
                grad_weight[j] += product
        grad_weights[index] = grad_weight
        gx[images] = grad_plane[:, 1:-1, 1:-1].transpose(0, 3, 1, 2)

    _run(run, list(range(len(image_groups))), inputs.kernels is not None)
    grad_weight = grad_weights[0]
    for partial in grad_weights[1:]:
        grad_weight += partial

    out_group = problem.out_c // problem.groups
    gW = grad_weight.reshape(
        problem.groups, problem.kh, problem.kw, problem.group_width,
        out_group).transpose(0, 4, 3, 1, 2).reshape(
            problem.out_c, problem.group_width, problem.kh, problem.kw)
    shape = (problem.n, -1, problem.out_h, problem.out_w)
    return (gx, grad_offset.reshape(shape), gW,
            grad_mask.reshape(shape) if inputs.has_mask else None)


# --- The pure-NumPy loops ----------------------------------------------------

# Contributions to one input pixel beyond this many (per tap) are summed
# with a segmented reduction instead of rounds of scatter-adds.
_MAX_ROUNDS = 8


class ChunkGeometry(object):
    """Where each tap of each sample of a chunk reads its bordered plane.

    Taps are numbered ``t = g * K + k`` over the offset groups and kernel
    taps, and arrays are ``(G * K, P)``: ``top_left`` is the row of the
    top-left bilinear corner in the chunk's plane as rows ``(R, c)`` (the
    others are ``top_left + corner_shift[q]``), ``weights[:, q]`` corner q's
    bilinear weight (``(G * K, 4, P)``), ``sample_weights`` the same times
    the mask (``weights`` itself without one), ``frac_y``, ``frac_x`` the
    fractional position, ``inside_y``, ``inside_x`` where the coordinate
    gradient flows, and ``contributing`` the samples with a corner inside
    the image.
    """

    def __init__(self, offset, mask, problem):
        n, n_groups, _, n_taps, out_h, out_w = offset.shape
        h, w = problem.h, problem.w
        n_total = n_groups * n_taps
        taps = numpy.arange(n_taps)
        base_y = problem.base_y[taps // problem.kw]      # (K, out_h)
        base_x = problem.base_x[taps % problem.kw]       # (K, out_w)
        # (G, K, n, out_h, out_w), as offset + base in the compute dtype.
        pos_y = (offset[:, :, 1].transpose(1, 2, 0, 3, 4)
                 + base_y[:, None, :, None])
        pos_x = (offset[:, :, 0].transpose(1, 2, 0, 3, 4)
                 + base_x[:, None, None, :])
        lower_y, fy, inside_y = geometry.axis_geometry(pos_y, -1.0, h)
        lower_x, fx, inside_x = geometry.axis_geometry(pos_x, -1.0, w)

        plane_w = w + 2
        image_start = numpy.arange(n) * ((h + 2) * plane_w)
        # +1: the plane has a zero border row and column in front.
        self.top_left = ((lower_y.astype(numpy.intp) + 1) * plane_w
                         + lower_x.astype(numpy.intp) + 1
                         + image_start[:, None, None]).reshape(n_total, -1)
        self.corner_shift = (0, 1, plane_w, plane_w + 1)
        self.frac_y = fy = fy.reshape(n_total, -1)
        self.frac_x = fx = fx.reshape(n_total, -1)
        self.inside_y = inside_y.reshape(n_total, -1)
        self.inside_x = inside_x.reshape(n_total, -1)
        # Samples with a corner in the image; the rest only touch the border.
        self.contributing = self.inside_y & self.inside_x
        self.weights = numpy.stack(((1 - fy) * (1 - fx), (1 - fy) * fx,
                                    fy * (1 - fx), fy * fx), 1)
        self.mask = None
        self.sample_weights = self.weights
        if mask is not None:
            self.mask = mask.transpose(1, 2, 0, 3, 4).reshape(n_total, -1)
            self.sample_weights = self.weights * self.mask[:, None]

    def gather_corners(self, plane, t, out):
        """The four corners of tap t's samples into ``out`` ``(4, P, c')``.

        ``plane`` is ``(R, c')``: rows of the chunk's plane, some channels.
        """
        top_left = self.top_left[t]
        for shift, corner in zip(self.corner_shift, out):
            plane.take(top_left + shift, axis=0, out=corner, mode='clip')


def _runs(problem, g, k):
    """``(channels, columns)`` slices of offset group g's runs, tap k."""
    for start, stop, shift in problem.segments[g]:
        if start < stop:
            first = shift + k * problem.group_width
            yield slice(start, stop), slice(first + start, first + stop)


def _numpy_gather(plane, geometry, problem, columns):
    rows = plane.reshape(-1, problem.c)
    # Allocated once: a fresh large array costs page faults every time.
    buffer = numpy.empty(4 * columns.shape[0] * problem.c, problem.dtype)
    for t in range(problem.n_groups * problem.n_taps):
        g, k = divmod(t, problem.n_taps)
        for channels, to_columns in _runs(problem, g, k):
            corners = _corner_buffer(buffer, columns.shape[0], channels)
            geometry.gather_corners(rows[:, channels], t, corners)
            # One pass (einsum adds the 4 products in order), where
            # multiplying and then adding took four.
            numpy.einsum('qpc,qp->pc', corners, geometry.sample_weights[t],
                         out=columns[:, to_columns])


def _corner_buffer(buffer, n_samples, channels):
    width = channels.stop - channels.start
    return buffer[:4 * n_samples * width].reshape(4, n_samples, width)


def _numpy_backward(plane, geometry, problem, grad_columns, grad_plane,
                    grad_offset, grad_mask):
    """See ``_numba.backward``; ``grad_offset``, ``grad_mask`` are chunk
    views ``(n, G, 2, K, out_h, out_w)``, ``(n, G, K, out_h, out_w)``, or
    None where not wanted."""
    rows = plane.reshape(-1, problem.c)
    grad_rows = grad_plane.reshape(-1, problem.c)
    n_samples = grad_columns.shape[0]
    sample_shape = (plane.shape[0], problem.out_h, problem.out_w)
    buffer = numpy.empty(4 * n_samples * problem.c, problem.dtype)
    grad_column = numpy.empty(n_samples * problem.c, problem.dtype)
    for t in range(problem.n_groups * problem.n_taps):
        g, k = divmod(t, problem.n_taps)
        # s_q = <grad column, corner q> over the group's channels.
        s = 0
        for channels, to_columns in _runs(problem, g, k):
            corners = _corner_buffer(buffer, n_samples, channels)
            geometry.gather_corners(rows[:, channels], t, corners)
            # Contiguous, for einsum and the scatter's fancy indexing.
            column = grad_column[:corners[0].size].reshape(corners[0].shape)
            column[...] = grad_columns[:, to_columns]
            if grad_offset is not None or grad_mask is not None:
                s = s + numpy.einsum('qpc,pc->qp', corners, column)
            _scatter_tap(grad_rows[:, channels], column, geometry, t)
        if grad_offset is None and grad_mask is None:
            continue
        s00, s01, s10, s11 = s
        fy = geometry.frac_y[t]
        fx = geometry.frac_x[t]
        # Multiplying (not masking) keeps NaN where a fraction was NaN.
        grad_y = ((1 - fx) * (s10 - s00) + fx * (s11 - s01)) \
            * geometry.inside_y[t]
        grad_x = ((1 - fy) * (s01 - s00) + fy * (s11 - s10)) \
            * geometry.inside_x[t]
        if geometry.mask is not None:
            grad_y *= geometry.mask[t]
            grad_x *= geometry.mask[t]
            w00, w01, w10, w11 = geometry.weights[t]
            grad_mask[:, g, k] = (w00 * s00 + w01 * s01 + w10 * s10
                                  + w11 * s11).reshape(sample_shape)
        if grad_offset is not None:
            grad_offset[:, g, 1, k] = grad_y.reshape(sample_shape)
            grad_offset[:, g, 0, k] = grad_x.reshape(sample_shape)


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
