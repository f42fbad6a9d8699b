"""A loop-by-loop deformable convolution, written from the definition.

Independent of the library's vectorized code; slow, for small test shapes.
Covers DCNv2's generality: dilation, convolution groups, offset groups and
the modulation mask.
"""

import math

import numpy


def _pixel(image, y, x):
    h, w = image.shape
    return image[y, x] if 0 <= y < h and 0 <= x < w else 0.0


def sample_positions(offset, ksize, stride, pad, dilate=(1, 1)):
    """(y, x) of every tap: arrays ``(n, G, kh*kw, out_h, out_w)``."""
    kh, kw = ksize
    n_taps = kh * kw
    n, channels, out_h, out_w = offset.shape
    n_groups = channels // (2 * n_taps)
    pos_y = numpy.empty((n, n_groups, n_taps, out_h, out_w))
    pos_x = numpy.empty_like(pos_y)
    for g in range(n_groups):
        dx_at = 2 * n_taps * g        # the group's [dx of K taps, dy of K]
        dy_at = dx_at + n_taps
        for k in range(n_taps):
            for i in range(out_h):
                for j in range(out_w):
                    pos_y[:, g, k, i, j] = (
                        i * stride[0] - pad[0] + (k // kw) * dilate[0]
                        + offset[:, dy_at + k, i, j])
                    pos_x[:, g, k, i, j] = (
                        j * stride[1] - pad[1] + (k % kw) * dilate[1]
                        + offset[:, dx_at + k, i, j])
    return pos_y, pos_x


def bilinear(image, y, x):
    """Bilinear sample of a zero-extended image and its (d/dy, d/dx).

    Derivatives at integer coordinates are forward differences.
    """
    y0, x0 = math.floor(y), math.floor(x)
    fy, fx = y - y0, x - x0
    v00, v01 = _pixel(image, y0, x0), _pixel(image, y0, x0 + 1)
    v10, v11 = _pixel(image, y0 + 1, x0), _pixel(image, y0 + 1, x0 + 1)
    value = ((1 - fy) * ((1 - fx) * v00 + fx * v01)
             + fy * ((1 - fx) * v10 + fx * v11))
    d_dy = (1 - fx) * (v10 - v00) + fx * (v11 - v01)
    d_dx = (1 - fy) * (v01 - v00) + fy * (v11 - v10)
    return value, d_dy, d_dx


def _modulation(mask, offset, n_groups, n_taps):
    if mask is None:
        n, _, out_h, out_w = offset.shape
        return numpy.ones((n, n_groups, n_taps, out_h, out_w))
    return mask.reshape(mask.shape[0], n_groups, n_taps, *mask.shape[2:])


def _loops(x, offset, W, stride, pad, dilate, groups):
    """Yields (b, o, ch, g, k, i, j, (y, x), weight) over every product."""
    n, c, _, _ = x.shape
    out_c, c_group, kh, kw = W.shape
    n_taps = kh * kw
    _, channels, out_h, out_w = offset.shape
    n_groups = channels // (2 * n_taps)
    pos_y, pos_x = sample_positions(offset, (kh, kw), stride, pad, dilate)
    for b in range(n):
        for o in range(out_c):
            conv_group = o // (out_c // groups)
            for ch_in_group in range(c_group):
                ch = conv_group * c_group + ch_in_group
                g = ch // (c // n_groups)
                for k in range(n_taps):
                    weight = W[o, ch_in_group, k // kw, k % kw]
                    for i in range(out_h):
                        for j in range(out_w):
                            yield (b, o, ch, g, k, i, j,
                                   (pos_y[b, g, k, i, j],
                                    pos_x[b, g, k, i, j]), weight)


def forward(x, offset, W, b=None, stride=(1, 1), pad=(0, 0), dilate=(1, 1),
            groups=1, mask=None):
    """Deformable convolution output, float64."""
    n = x.shape[0]
    out_c, _, kh, kw = W.shape
    _, channels, out_h, out_w = offset.shape
    n_groups = channels // (2 * kh * kw)
    m = _modulation(mask, offset, n_groups, kh * kw)
    y = numpy.zeros((n, out_c, out_h, out_w))
    for bi, o, ch, g, k, i, j, position, weight in _loops(
            x, offset, W, stride, pad, dilate, groups):
        value, _, _ = bilinear(x[bi, ch], *position)
        y[bi, o, i, j] += weight * m[bi, g, k, i, j] * value
    if b is not None:
        y += b[None, :, None, None]
    return y


def offset_grad(x, offset, W, gy, stride=(1, 1), pad=(0, 0), dilate=(1, 1),
                groups=1, mask=None):
    """d(sum(gy * y))/d(offset) with the forward-difference convention."""
    _, _, kh, kw = W.shape
    n_taps = kh * kw
    n_groups = offset.shape[1] // (2 * n_taps)
    m = _modulation(mask, offset, n_groups, n_taps)
    grad = numpy.zeros(offset.shape)
    for b, o, ch, g, k, i, j, position, weight in _loops(
            x, offset, W, stride, pad, dilate, groups):
        _, d_dy, d_dx = bilinear(x[b, ch], *position)
        factor = gy[b, o, i, j] * weight * m[b, g, k, i, j]
        grad[b, 2 * n_taps * g + k, i, j] += factor * d_dx
        grad[b, 2 * n_taps * g + n_taps + k, i, j] += factor * d_dy
    return grad
