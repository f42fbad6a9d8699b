"""Compiled CPU loops for the NumPy path, used when Numba is installed.

Pure NumPy needs several passes over ``(P, c)`` temporaries per tap for the
bilinear gather and rounds of fancy-indexed adds for its adjoint; these
loops do each in one pass. They take the geometry computed by
:class:`deformable._cpu.Geometry`, so both paths share one definition of
where samples fall, and give the same results up to float rounding. The
scatter runs serially, so the CPU gradient stays deterministic.
"""

import numba


@numba.njit(cache=True, nogil=True)
def sample_tap(plane, top_left, weights, row_shift, out):
    """``out[p] = sum_q weights[q, p] * plane[top_left[p] + shift_q]``."""
    n_samples, c = out.shape
    for p in range(n_samples):
        t = top_left[p]
        w00 = weights[0, p]
        w01 = weights[1, p]
        w10 = weights[2, p]
        w11 = weights[3, p]
        for ch in range(c):
            out[p, ch] = (w00 * plane[t, ch] + w01 * plane[t + 1, ch]
                          + w10 * plane[t + row_shift, ch]
                          + w11 * plane[t + row_shift + 1, ch])


@numba.njit(cache=True, nogil=True)
def backward_tap(plane, top_left, scatter_weights, weights, frac_y, frac_x,
                 contributing, row_shift, grad_column, grad_plane, grad_y,
                 grad_x, grad_mask, with_mask):
    """One tap's coordinate (and mask) gradients and its adjoint scatter.

    ``grad_y``/``grad_x`` get ``d/dy = (1 - fx)(s10 - s00) + fx (s11 - s01)``
    and its mirror, with ``s_q = <grad column, corner q>``; ``grad_mask``,
    if ``with_mask``, the unmodulated sample ``sum_q weights[q] s_q``. The
    scatter adds ``scatter_weights[q] * grad column`` to corner q.
    """
    n_samples, c = grad_column.shape
    for p in range(n_samples):
        t = top_left[p]
        u = t + row_shift
        s00 = s01 = s10 = s11 = grad_column[p, 0] * 0
        for ch in range(c):
            g = grad_column[p, ch]
            s00 += g * plane[t, ch]
            s01 += g * plane[t + 1, ch]
            s10 += g * plane[u, ch]
            s11 += g * plane[u + 1, ch]
        fy = frac_y[p]
        fx = frac_x[p]
        grad_y[p] = (1 - fx) * (s10 - s00) + fx * (s11 - s01)
        grad_x[p] = (1 - fy) * (s01 - s00) + fy * (s11 - s10)
        if with_mask:
            grad_mask[p] = (weights[0, p] * s00 + weights[1, p] * s01
                            + weights[2, p] * s10 + weights[3, p] * s11)
        if contributing[p]:
            w00 = scatter_weights[0, p]
            w01 = scatter_weights[1, p]
            w10 = scatter_weights[2, p]
            w11 = scatter_weights[3, p]
            for ch in range(c):
                g = grad_column[p, ch]
                grad_plane[t, ch] += w00 * g
                grad_plane[t + 1, ch] += w01 * g
                grad_plane[u, ch] += w10 * g
                grad_plane[u + 1, ch] += w11 * g
