"""A loop-by-loop deformable convolution, written from the definition.

Independent of the library's vectorized code; slow, for small test shapes.
"""

import math

import numpy


def _pixel(image, y, x):
    h, w = image.shape
    return image[y, x] if 0 <= y < h and 0 <= x < w else 0.0


def sample_positions(offset, ksize, stride, pad):
    """(y, x) of every tap: arrays ``(n, kh*kw, out_h, out_w)``."""
    kh, kw = ksize
    n, _, out_h, out_w = offset.shape
    pos_y = numpy.empty((n, kh * kw, out_h, out_w))
    pos_x = numpy.empty_like(pos_y)
    for k in range(kh * kw):
        for i in range(out_h):
            for j in range(out_w):
                pos_y[:, k, i, j] = (i * stride[0] - pad[0] + k // kw
                                     + offset[:, kh * kw + k, i, j])
                pos_x[:, k, i, j] = (j * stride[1] - pad[1] + k % kw
                                     + offset[:, k, i, j])
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


def forward(x, offset, W, b=None, stride=(1, 1), pad=(0, 0)):
    """Deformable convolution output, float64."""
    n, c, _, _ = x.shape
    out_c, _, kh, kw = W.shape
    _, _, out_h, out_w = offset.shape
    pos_y, pos_x = sample_positions(offset, (kh, kw), stride, pad)
    y = numpy.zeros((n, out_c, out_h, out_w))
    for b_ in range(n):
        for k in range(kh * kw):
            for i in range(out_h):
                for j in range(out_w):
                    samples = numpy.array([
                        bilinear(x[b_, ch], pos_y[b_, k, i, j],
                                 pos_x[b_, k, i, j])[0] for ch in range(c)])
                    y[b_, :, i, j] += W[:, :, k // kw, k % kw].dot(samples)
    if b is not None:
        y += b[None, :, None, None]
    return y


def offset_grad(x, offset, W, gy, stride=(1, 1), pad=(0, 0)):
    """d(sum(gy * y))/d(offset) with the forward-difference convention."""
    n, c, _, _ = x.shape
    _, _, kh, kw = W.shape
    n_taps = kh * kw
    _, _, out_h, out_w = offset.shape
    pos_y, pos_x = sample_positions(offset, (kh, kw), stride, pad)
    grad = numpy.zeros(offset.shape)
    for b_ in range(n):
        for k in range(n_taps):
            for i in range(out_h):
                for j in range(out_w):
                    # d(output channel o)/d(sample of channel ch)
                    w_k = W[:, :, k // kw, k % kw]
                    g = gy[b_, :, i, j].dot(w_k)
                    for ch in range(c):
                        _, d_dy, d_dx = bilinear(
                            x[b_, ch], pos_y[b_, k, i, j], pos_x[b_, k, i, j])
                        grad[b_, k, i, j] += g[ch] * d_dx
                        grad[b_, n_taps + k, i, j] += g[ch] * d_dy
    return grad
