"""How every backend lays out the columns and the weight.

**Columns.** For each sample (an output pixel of one image) the columns
hold its bilinear (and modulated) samples of every input channel at every
tap: ``groups * K * c_group`` values (``K = kh * kw`` taps, ``c_group = c_in
/ groups``), ordered (convolution group ``j``, tap ``k``, channel ``c``
within the group)::

    column (j * K + k) * c_group + c  =  channel j * c_group + c, tap k

so each convolution group is one contiguous run, multiplied by its block of
the weight matrix below. The CPU stores them ``(samples, columns)``: a
sample's channels are contiguous, as in its channels-last plane. The GPU
stores them ``(columns, samples)``: neighbouring threads write neighbouring
samples.

**Weight.** ``W`` ``(out_c, c_group, kh, kw)`` as ``(groups, K * c_group,
out_group)``, rows in the columns' order: ``matrix[j, k * c_group + c, o] =
W[j * out_group + o, c, k // kw, k % kw]``.

**Offsets and mask** by offset group: ``offset`` ``(n, 2 * G * K, out_h,
out_w)`` as ``(n, G, 2, K, out_h, out_w)`` (``[:, :, 0]`` is x), ``mask``
``(n, G * K, out_h, out_w)`` as ``(n, G, K, out_h, out_w)``.
"""

from chainer import backend


def weight_matrix(W, groups, dtype):
    """``W`` as the contiguous ``(groups, K * c_group, out_group)`` matrix
    (see the module's docstring)."""
    out_c, c_group, kh, kw = W.shape
    xp = backend.get_array_module(W)
    return xp.ascontiguousarray(
        W.reshape(groups, out_c // groups, c_group, kh * kw).transpose(
            0, 3, 2, 1).reshape(groups, kh * kw * c_group, out_c // groups),
        dtype=dtype)


def weight_from_matrix(matrix, w_shape):
    """The inverse of :func:`weight_matrix`: ``(out_c, c_group, kh,
    kw)``."""
    out_c, c_group, kh, kw = w_shape
    groups = matrix.shape[0]
    return matrix.reshape(groups, kh, kw, c_group, out_c // groups).transpose(
        0, 4, 3, 1, 2).reshape(w_shape)


def offset_by_group(offset, n_taps):
    """``offset`` as ``(n, G, 2, K, out_h, out_w)``."""
    n, channels, out_h, out_w = offset.shape
    return offset.reshape(n, channels // (2 * n_taps), 2, n_taps, out_h,
                          out_w)


def mask_by_group(mask, n_taps):
    """``mask`` as ``(n, G, K, out_h, out_w)``."""
    n, channels, out_h, out_w = mask.shape
    return mask.reshape(n, channels // n_taps, n_taps, out_h, out_w)
