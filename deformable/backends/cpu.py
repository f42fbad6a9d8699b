"""The CPU backends: one driver, two kinds of loops.

:class:`CpuBackend` cuts a call into blocks of output rows, copies images
into bordered planes, multiplies columns with the weight (BLAS) and
assembles outputs and gradients; its loops (``numpy_loops`` or
``numba_loops``, the same interface) gather a block's columns and do the
per-sample work of its backward.

Planes. The input is copied into a zero-bordered, channels-last plane
``(images, h + 2, w + 2, c)``: each bilinear corner of a sample is one
contiguous run of channels, and corners outside the image land on the zero
border instead of needing a branch. Each thread copies the images it works
on into a plane of its own, reused from one group of images to the next
(the forward and the backward each copy them: a plane of the whole batch
would cost as much memory as the input, and its gradient's as much again;
these stay in the core's cache).

Blocks. Columns (``layout``) exist for a block of output rows at a time
(about ``tuning.BLOCK_BYTES``), never for the whole batch: memory stays
small and a block's columns are still in cache when its product reads them.
The compiled backward fills them again, in the pass that loads the corners
for the gradients anyway, rather than keep them; the NumPy loops keep them,
as their gather costs as much as the rest of their backward.

Threads (``threads``). With the compiled loops blocks run on every core.
The backward's unit of work is a group of whole images (their samples
scatter only into their own planes) and the weight's gradient is summed
over image groups in order, so the results are the same, bit for bit, on
every run and for any number of threads. The NumPy loops run blocks one
after another, bigger ones, as their cost is Python's overhead per call.
"""

import collections

import numpy

from deformable import geometry
from deformable.backends import layout
from deformable.backends import threads


class Block(collections.namedtuple(
        'Block', 'start_image stop_image first_row stop_row')):
    """Output rows ``[first_row, stop_row)`` of images ``[start_image,
    stop_image)``, counted ``b * out_h + oy`` within those images: whole
    images, or rows of one."""

    @property
    def images(self):
        return slice(self.start_image, self.stop_image)


class Plan(object):
    """Sizes and hyperparameters of one call, and how it is cut into
    blocks.

    ``segments`` ``(G, S, 3)``: for each offset group, the runs of its
    channels that fall in one convolution group, as ``(start, stop,
    shift)``: channel ``ch`` of tap ``k`` is column ``shift + k *
    group_width + ch`` (runs with ``start == stop`` are padding).
    """

    def __init__(self, x_shape, offset_shape, w_shape, hyperparameters,
                 dtype):
        (sy, sx), (ph, pw), (dy, dx), self.groups = hyperparameters
        self.n, self.c, self.h, self.w = x_shape
        self.out_c, self.group_width, self.kh, self.kw = w_shape
        _, offset_channels, self.out_h, self.out_w = offset_shape
        self.n_taps = self.kh * self.kw
        self.n_groups = offset_channels // (2 * self.n_taps)
        self.dtype = dtype = numpy.dtype(dtype)
        self.base_y = geometry.tap_bases(self.out_h, sy, ph, self.kh, dy,
                                         dtype)
        self.base_x = geometry.tap_bases(self.out_w, sx, pw, self.kw, dx,
                                         dtype)
        self.segments = self._segments()
        # One image's bordered, channels-last plane.
        self.image_plane_shape = (self.h + 2, self.w + 2, self.c)
        self.n_columns = self.n_taps * self.c

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

    def rows_per_block(self, block_bytes):
        row_bytes = self.out_w * self.n_columns * self.dtype.itemsize
        return max(1, block_bytes // row_bytes)

    def blocks(self, images, block_bytes, split_images):
        """The blocks of ``images`` (a slice), about ``block_bytes`` of
        columns each: whole images, or, if ``split_images``, rows of one
        image where an image's are more."""
        n_rows = (images.stop - images.start) * self.out_h
        step = self.rows_per_block(block_bytes)
        if step >= self.out_h or not split_images:
            step = n_rows
        return [Block(images.start, images.stop, row, min(row + step, n_rows))
                for row in range(0, n_rows, step)]

    def image_groups(self, block_bytes):
        """Slices of whole images, about ``block_bytes`` of columns each
        (one image at least)."""
        per = max(1, self.rows_per_block(block_bytes) // self.out_h)
        return [slice(b, min(b + per, self.n)) for b in range(0, self.n, per)]

    def conv_groups(self):
        """``(columns, output channels)`` slices of each convolution
        group."""
        width = self.n_taps * self.group_width
        out_group = self.out_c // self.groups
        return [(slice(j * width, (j + 1) * width),
                 slice(j * out_group, (j + 1) * out_group))
                for j in range(self.groups)]

    def block_view(self, array, block):
        """``array`` ``(n, C, out_h, out_w)`` restricted to a block, as
        ``(images, C, rows, out_w)`` (rows within one image, or all)."""
        if block.stop_row - block.first_row >= self.out_h:
            return array[block.images]
        oy = block.first_row % self.out_h
        b = block.start_image + block.first_row // self.out_h
        return array[b:b + 1, :, oy:oy + block.stop_row - block.first_row]

    def columns_shape(self, block):
        return ((block.stop_row - block.first_row) * self.out_w,
                self.n_columns)


class Operands(object):
    """A call's arrays in the loops' layouts (``layout``): the offsets
    ``(n, G, 2, K, out_h, out_w)``, the mask ``(n, G, K, out_h, out_w)``
    (ones ``(n, 1, 1, 1, 1)`` without one, never read) and the weight
    matrix (None without a weight)."""

    def __init__(self, offset, W, mask, plan):
        dtype = plan.dtype
        self.offset = numpy.ascontiguousarray(
            layout.offset_by_group(offset, plan.n_taps), dtype=dtype)
        self.has_mask = mask is not None
        if mask is None:
            self.mask = numpy.ones((plan.n, 1, 1, 1, 1), dtype)
        else:
            self.mask = numpy.ascontiguousarray(
                layout.mask_by_group(mask, plan.n_taps), dtype=dtype)
        self.weight = None if W is None else layout.weight_matrix(
            W, plan.groups, dtype)


def bordered_plane(x, plan):
    """Channels-last copy of ``x`` with a zero border: ``(n,) +
    plan.image_plane_shape``."""
    plane = numpy.empty((len(x),) + plan.image_plane_shape, plan.dtype)
    fill_plane(plane, x)
    return plane


def fill_plane(plane, x):
    """Writes ``x`` ``(n, c, h, w)`` into ``plane``, border zeroed."""
    plane[:, 0] = 0
    plane[:, -1] = 0
    plane[:, :, 0] = 0
    plane[:, :, -1] = 0
    plane[:, 1:-1, 1:-1] = x.transpose(0, 2, 3, 1)


def _grouped_dot(plan, a, weight, out, transposed=False):
    """``out = a @ weight`` within each convolution group.

    ``a`` and ``out`` are ``(P, columns)`` and ``(P, out_c)``, or the
    reverse with ``transposed`` (``weight`` then ``(groups, out_group, K *
    c_group)``).
    """
    if plan.groups == 1:
        numpy.dot(a, weight[0], out=out)
        return
    for j, (block, outputs) in enumerate(plan.conv_groups()):
        if transposed:
            block, outputs = outputs, block
        out[:, outputs] = a[:, block].dot(weight[j])


class Loops(object):
    """The loops of one call of a CPU backend: what they offer
    :class:`CpuBackend` (``numpy_loops.Loops`` and ``numba_loops.Loops``
    implement it)."""

    name = None
    threaded = False       # blocks in parallel, on every core
    keeps_columns = False  # the forward's columns kept for the backward
    split_images = False   # blocks may be rows of one image

    def __init__(self, plan, operands):
        self.plan = plan
        self.operands = operands

    @property
    def block_bytes(self):
        """Columns per block, in bytes."""
        raise NotImplementedError

    def gather(self, block, plane, columns):
        """The block's bilinear (and modulated) samples into ``columns``
        ``(P, K * c)`` (``layout``), from ``plane``, its images' bordered
        plane ``(images, h + 2, w + 2, c)``."""
        raise NotImplementedError

    def backward(self, block, plane, columns, grad_columns, grad_plane,
                 grad_offset, grad_mask):
        """The block's share of the gradients, from its column gradient:
        adds to ``grad_plane`` (the images' bordered plane), writes its rows
        of ``grad_offset`` ``(images, G, 2, K, out_h, out_w)`` and
        ``grad_mask`` ``(images, G, K, out_h, out_w)`` (each None where not
        needed), and fills ``columns`` unless None."""
        raise NotImplementedError

    def sample_taps(self, plane, order, out):
        """Every image's samples of every channel at every tap, in their
        derivative of ``order`` (``geometry.corner_weights``, unmodulated),
        into ``out`` ``(n, out_h, out_w, K, c)``."""
        raise NotImplementedError

    def scatter_taps(self, samples, order, grad_plane):
        """The adjoint of :meth:`sample_taps`: adds ``samples`` ``(n,
        out_h, out_w, K, c)`` to ``grad_plane``, the images' bordered
        plane."""
        raise NotImplementedError


class CpuBackend(object):
    """The CPU path with the given loops (see the module's docstring).

    ``loops`` is a :class:`Loops` class, made for each call from its
    :class:`Plan` and :class:`Operands`.
    """

    def __init__(self, loops):
        self.loops = loops
        self.name = loops.name

    def _plan(self, x, offset, W, hyperparameters):
        return Plan(x.shape, offset.shape, W.shape, hyperparameters,
                    geometry.compute_dtype(x.dtype))

    @staticmethod
    def _blocks(loops, plan, images):
        return plan.blocks(images, loops.block_bytes, loops.split_images)

    def _plane(self, buffers, plan, images, x=None):
        """This thread's bordered plane of ``images``: of ``x``, else
        zeros."""
        shape = (images.stop - images.start,) + plan.image_plane_shape
        plane = buffers.get('plane' if x is not None else 'zeros', shape,
                            plan.dtype)
        if x is None:
            plane[...] = 0
        else:
            fill_plane(plane, x[images])
        return plane

    def forward(self, hyperparameters, x, offset, W, b, mask):
        """Output ``(n, out_c, out_h, out_w)`` of ``x``'s dtype, and the
        columns by block if the loops keep them (else None)."""
        plan = self._plan(x, offset, W, hyperparameters)
        operands = Operands(offset, W, mask, plan)
        loops, buffers = self.loops(plan, operands), threads.Buffers()
        y = numpy.empty((plan.n, plan.out_c, plan.out_h, plan.out_w),
                        plan.dtype)
        bias = None if b is None else b.astype(plan.dtype)[:, None, None]
        kept = {} if loops.keeps_columns else None

        def run(block, plane):
            if kept is None:
                columns = buffers.get('columns', plan.columns_shape(block),
                                      plan.dtype)
            else:
                columns = kept[block] = numpy.empty(
                    plan.columns_shape(block), plan.dtype)
            loops.gather(block, plane, columns)
            product = buffers.get(
                'product', (columns.shape[0], plan.out_c), plan.dtype)
            _grouped_dot(plan, columns, operands.weight, product)
            # (P, out_c) rows in sample order -> the block of y.
            out = plan.block_view(y, block)
            product = product.reshape(out.shape[0], out.shape[2],
                                      out.shape[3], plan.out_c).transpose(
                                          0, 3, 1, 2)
            if bias is None:
                out[...] = product
            else:
                numpy.add(product, bias, out=out)

        def run_images(images):
            plane = self._plane(buffers, plan, images, x)
            for block in self._blocks(loops, plan, images):
                run(block, plane)

        image_groups = plan.image_groups(loops.block_bytes)
        if not loops.threaded or len(image_groups) >= threads.n_workers():
            # Each thread copies its own images into its plane.
            threads.run(run_images, image_groups, loops.threaded)
        else:
            # Few, big images: their rows in parallel, from one plane.
            plane = bordered_plane(x, plan)
            threads.run(lambda block: run(block, plane[block.images]),
                        [block for images in image_groups
                         for block in self._blocks(loops, plan, images)],
                        loops.threaded)
        return y.astype(x.dtype, copy=False), kept

    def backward(self, hyperparameters, x, offset, W, gy, mask, kept,
                 needed):
        """The gradients named in ``needed`` (of ``'x'``, ``'offset'``,
        ``'W'``, ``'mask'``), by name, in ``x``'s dtype. ``kept``: what the
        forward returned."""
        plan = self._plan(x, offset, W, hyperparameters)
        operands = Operands(offset, W, mask, plan)
        loops, buffers = self.loops(plan, operands), threads.Buffers()
        dtype = plan.dtype
        # The column gradient feeds all but the weight's gradient.
        per_sample = bool(needed & {'x', 'offset', 'mask'})
        gx = numpy.empty((plan.n, plan.c, plan.h, plan.w), dtype) \
            if 'x' in needed else None
        grad_offset = numpy.empty(operands.offset.shape, dtype) \
            if 'offset' in needed else None
        grad_mask = numpy.empty(operands.mask.shape, dtype) \
            if 'mask' in needed else None
        image_groups = plan.image_groups(loops.block_bytes)
        # The weight's gradient of each group of images, summed in order.
        grad_weights = [None] * len(image_groups)

        def run(index):
            images = image_groups[index]
            plane = self._plane(buffers, plan, images, x)
            grad_plane = self._plane(buffers, plan, images) \
                if gx is not None else None
            grad_weight = numpy.zeros(operands.weight.shape, dtype) \
                if 'W' in needed else None
            for block in self._blocks(loops, plan, images):
                columns = None if kept is None else kept[block]
                fill_columns = columns is None and grad_weight is not None
                if columns is None:
                    columns = buffers.get('columns', plan.columns_shape(block),
                                          dtype)
                # The block of gy -> (P, out_c), rows in sample order.
                gy_block = buffers.get(
                    'gy', (columns.shape[0], plan.out_c), dtype)
                view = plan.block_view(gy, block)
                gy_block.reshape(view.shape[0], view.shape[2], view.shape[3],
                                 plan.out_c)[...] = view.transpose(0, 2, 3, 1)
                if per_sample:
                    grad_columns = buffers.get(
                        'grad_columns', plan.columns_shape(block), dtype)
                    _grouped_dot(plan, gy_block,
                                 operands.weight.transpose(0, 2, 1),
                                 grad_columns, transposed=True)
                    loops.backward(
                        block, plane, columns if fill_columns else None,
                        grad_columns,
                        grad_plane, _images_or_none(grad_offset, images),
                        _images_or_none(grad_mask, images))
                elif fill_columns:
                    loops.gather(block, plane, columns)
                if grad_weight is not None:
                    product = buffers.get(
                        'product', operands.weight.shape[1:], dtype)
                    for j, (cols, outputs) in enumerate(plan.conv_groups()):
                        numpy.dot(columns[:, cols].T, gy_block[:, outputs],
                                  out=product)
                        grad_weight[j] += product
            grad_weights[index] = grad_weight
            if gx is not None:
                gx[images] = grad_plane[:, 1:-1, 1:-1].transpose(0, 3, 1, 2)

        threads.run(run, list(range(len(image_groups))), loops.threaded)
        grads = {'x': gx, 'offset': grad_offset, 'mask': grad_mask}
        if 'W' in needed:
            grad_weight = grad_weights[0] if grad_weights else numpy.zeros(
                operands.weight.shape, dtype)
            for partial in grad_weights[1:]:
                grad_weight += partial
            grads['W'] = layout.weight_from_matrix(grad_weight, W.shape)
        for name, like in (('offset', offset), ('mask', mask)):
            if grads[name] is not None:
                grads[name] = grads[name].reshape(like.shape)
        return {name: numpy.ascontiguousarray(grads[name], dtype=x.dtype)
                for name in needed}

    def _tap_loops(self, x_shape, offset, ksize, hyperparameters, dtype):
        # Samples of each channel: one convolution group, no weight.
        plan = Plan(x_shape, offset.shape, (1, x_shape[1]) + tuple(ksize),
                    hyperparameters._replace(groups=1),
                    geometry.compute_dtype(dtype))
        return plan, self.loops(plan, Operands(offset, None, None, plan))

    def sample_taps(self, hyperparameters, z, offset, ksize, order):
        """The samples of ``z`` at every tap, ``(n, c, K, out_h, out_w)``,
        in their derivative of ``order`` (``layout``, second order)."""
        plan, loops = self._tap_loops(z.shape, offset, ksize,
                                      hyperparameters, z.dtype)
        out = numpy.empty((plan.n, plan.out_h, plan.out_w, plan.n_taps,
                           plan.c), plan.dtype)
        loops.sample_taps(bordered_plane(z, plan), order, out)
        return _transposed(out, (0, 4, 3, 1, 2), z.dtype)

    def scatter_taps(self, hyperparameters, samples, offset, x_shape, ksize,
                     order):
        """The adjoint of :meth:`sample_taps`: ``x_shape``."""
        plan, loops = self._tap_loops(x_shape, offset, ksize,
                                      hyperparameters, samples.dtype)
        grad_plane = numpy.zeros((plan.n,) + plan.image_plane_shape,
                                 plan.dtype)
        loops.scatter_taps(_transposed(samples, (0, 3, 4, 2, 1), plan.dtype),
                           order, grad_plane)
        return _transposed(grad_plane[:, 1:-1, 1:-1], (0, 3, 1, 2),
                           samples.dtype)


def _transposed(array, axes, dtype):
    """``array.transpose(axes)`` (``axes[0] == 0``) as a new C-contiguous
    array of ``dtype``, copied image by image on every core: the second
    order's samples are large, and one thread's copy took a third of a
    double-backprop training step."""
    out = numpy.empty(tuple(array.shape[axis] for axis in axes), dtype)
    image_axes = tuple(axis - 1 for axis in axes[1:])

    def copy(image):
        out[image] = array[image].transpose(image_axes)
    threads.run(copy, list(range(len(array))), threaded=True)
    return out


def _images_or_none(array, images):
    return None if array is None else array[images]
