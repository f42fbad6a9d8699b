"""Derivatives of the op's gradients (to third order) against a composite
op built from Chainer's own differentiable functions, analytically, on
every backend (the GPU's kernels emulated where there is no GPU)."""

import numpy
import pytest

import chainer
import chainer.functions as F
from chainer import gradient_check

import deformable

import helpers
import kernel_emulation


def composite(x, offset, W, b, mask, stride, pad, dilate, groups):
    """The deformable convolution from ``F.get_item``, arithmetic and
    ``F.matmul``: bilinear weights from the fractions (Variables), corners
    picked by their (constant) integer positions, zero outside the image.
    Differentiable to any order where no sample is at an integer."""
    n, c, h, w = x.shape
    out_c, c_group, kh, kw = W.shape
    n_taps = kh * kw
    _, channels, out_h, out_w = offset.shape
    n_groups = channels // (2 * n_taps)
    offset = F.reshape(offset, (n, n_groups, 2, n_taps, 1, out_h, out_w))
    taps = numpy.arange(n_taps)
    base_y = ((taps // kw) * dilate[0])[:, None, None] \
        + (numpy.arange(out_h) * stride[0] - pad[0])[:, None]
    base_x = ((taps % kw) * dilate[1])[:, None, None] \
        + (numpy.arange(out_w) * stride[1] - pad[1])[None, :]
    # (n, G, K, 1, out_h, out_w): the channel axis broadcast later.
    pos_y = offset[:, :, 1] + base_y[:, None].astype(x.dtype)
    pos_x = offset[:, :, 0] + base_x[:, None].astype(x.dtype)
    lower_y = numpy.floor(pos_y.array).astype(numpy.int64)
    lower_x = numpy.floor(pos_x.array).astype(numpy.int64)
    fy, fx = pos_y - lower_y.astype(x.dtype), pos_x - lower_x.astype(x.dtype)
    # (n, G, c / G, K, out_h, out_w) indices into x, flat.
    shape = (n, n_groups, c // n_groups, n_taps, out_h, out_w)
    image = numpy.arange(n).reshape(n, 1, 1, 1, 1, 1)
    channel = numpy.arange(c).reshape(1, n_groups, c // n_groups, 1, 1, 1)
    flat = F.reshape(x, (-1,))

    def corner(dy, dx):
        y = numpy.broadcast_to(lower_y.transpose(0, 1, 3, 2, 4, 5) + dy,
                               shape)
        x_ = numpy.broadcast_to(lower_x.transpose(0, 1, 3, 2, 4, 5) + dx,
                                shape)
        inside = (y >= 0) & (y < h) & (x_ >= 0) & (x_ < w)
        index = ((image * c + channel) * h + numpy.clip(y, 0, h - 1)) * w \
            + numpy.clip(x_, 0, w - 1)
        return F.get_item(flat, index.ravel()).reshape(shape) \
            * inside.astype(x.dtype)

    def per_channel(v):
        # (n, G, K, 1, out_h, out_w) -> the samples' shape.
        return F.broadcast_to(F.transpose(v, (0, 1, 3, 2, 4, 5)), shape)

    fy, fx = per_channel(fy), per_channel(fx)
    samples = ((1 - fy) * ((1 - fx) * corner(0, 0) + fx * corner(0, 1))
               + fy * ((1 - fx) * corner(1, 0) + fx * corner(1, 1)))
    if mask is not None:
        samples = samples * per_channel(F.reshape(
            mask, (n, n_groups, n_taps, 1, out_h, out_w)))
    # (n, groups, c_group * K, P) against W as (groups, out_group, ...).
    samples = F.reshape(samples, (n, groups, c_group * n_taps, -1))
    y = F.matmul(F.reshape(W, (groups, out_c // groups, -1)), samples)
    y = F.reshape(y, (n, out_c, out_h, out_w))
    if b is not None:
        y = y + F.broadcast_to(F.reshape(b, (1, out_c, 1, 1)), y.shape)
    return y


CASES = [
    # (n, c, out_c, h, w, ksize, stride, pad, dilate, groups, G, mask, bias)
    (1, 2, 3, 5, 6, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, False, True),
    (2, 4, 4, 6, 7, (3, 3), (1, 2), (1, 2), (2, 1), 2, 2, True, True),
    (3, 4, 2, 6, 5, (2, 3), (2, 1), (0, 1), (1, 2), 1, 4, True, False),
    (2, 6, 6, 5, 5, (1, 2), (1, 1), (2, 0), (1, 1), 3, 2, False, False),
    (1, 4, 4, 7, 6, (3, 2), (3, 2), (2, 1), (2, 2), 2, 1, True, True),
]


def make_case(case, seed):
    (n, c, out_c, h, w, (kh, kw), stride, pad, dilate, groups, n_groups,
     with_mask, with_bias) = case
    rng = numpy.random.RandomState(seed)
    out_h = (h + 2 * pad[0] - dilate[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (w + 2 * pad[1] - dilate[1] * (kw - 1) - 1) // stride[1] + 1
    # Fractions in [0.2, 0.8]: no sample near the kinks; some outside.
    shape = (n, 2 * n_groups * kh * kw, out_h, out_w)
    offset = rng.randint(-3, 4, shape) + rng.uniform(0.2, 0.8, shape)
    arrays = {
        'x': rng.uniform(-1, 1, (n, c, h, w)),
        'offset': offset,
        'W': rng.uniform(-1, 1, (out_c, c // groups, kh, kw)),
        'b': rng.uniform(-1, 1, out_c) if with_bias else None,
        'mask': rng.uniform(0, 1.5, (n, n_groups * kh * kw, out_h, out_w))
        if with_mask else None,
        'gy': rng.uniform(-1, 1, (n, out_c, out_h, out_w)),
    }
    params = {'stride': stride, 'pad': pad, 'dilate': dilate,
              'groups': groups}
    return {k: v for k, v in arrays.items() if v is not None}, params, rng


def derivatives(function, arrays, params, rng_seed, orders=3,
                device=None):
    """The output and, order by order, the gradients of a random linear
    combination of the previous order's results w.r.t. every input (gy
    included), each as a list of NumPy arrays; computed on ``device``
    (a ``chainer.backend.Device``; default the CPU)."""
    device = device or chainer.backend.CpuDevice()
    cpu = chainer.backend.CpuDevice()
    variables = {name: chainer.Variable(device.send(a.copy()))
                 for name, a in arrays.items()}
    y = function(variables['x'], variables['offset'], variables['W'],
                 variables.get('b'), variables.get('mask'), **params)
    rng = numpy.random.RandomState(rng_seed)
    names = sorted(variables)
    inputs = [variables[name] for name in names if name != 'gy']
    results = [[cpu.send(y.array)]]
    # First order: d(sum(gy * y))/d inputs, gy a Variable.
    outputs = chainer.grad([F.sum(y * variables['gy'])], inputs,
                           enable_double_backprop=True)
    results.append([cpu.send(g.array) for g in outputs])
    inputs = [variables[name] for name in names]
    for _ in range(orders - 1):
        loss = sum(F.sum(g * device.send(rng.uniform(-1, 1, g.shape)))
                   for g in outputs if g is not None)
        outputs = chainer.grad([loss], inputs, enable_double_backprop=True)
        results.append([None if g is None else cpu.send(g.array)
                        for g in outputs])
    return results


def ours(x, offset, W, b, mask, **params):
    return deformable.deformable_convolution_2d_sampler(
        x, offset, W, b, mask=mask, **params)


def check_against_the_composite(index, device=None):
    arrays, params, _ = make_case(CASES[index], index)
    expected = derivatives(composite, arrays, params, index)
    actual = derivatives(ours, arrays, params, index, device=device)
    for order, (got, want) in enumerate(zip(actual, expected)):
        for a, e in zip(got, want):
            if e is None:
                assert a is None or not numpy.any(a), order
                continue
            a = numpy.zeros_like(e) if a is None else a
            scale = max(numpy.abs(e).max(), 1e-300)
            assert numpy.abs(a - e).max() / scale <= 1e-10, order


@pytest.mark.parametrize('cpu_loops', helpers.CPU_LOOPS)
@pytest.mark.parametrize('index', range(len(CASES)))
def test_derivatives_match_the_composite(cpu_loops, index):
    check_against_the_composite(index)


@pytest.mark.skipif(not kernel_emulation.compiler_available(),
                    reason='needs a C++ compiler')
@pytest.mark.parametrize('index', range(len(CASES)))
def test_derivatives_on_the_gpu_path_match_the_composite(index):
    with kernel_emulation.gpu_path_on_cpu():
        check_against_the_composite(index)


@pytest.mark.gpu
@pytest.mark.parametrize('index', range(len(CASES)))
def test_derivatives_on_the_gpu_match_the_composite(index):
    check_against_the_composite(index, chainer.get_device('@cupy:0'))


# Bugs planted in the second derivatives' kernels, each of which the
# composite must catch: (constant of deformable.backends.gpu, old, new).
PLANTED_BUGS = {
    'cross derivative of the wrong corner': (
        'PREAMBLE', 'weight[3] = y1 * x1;', 'weight[3] = y1 * x0;'),
    'corner of the wrong weight': (
        'SAMPLE_TAPS', 'weight[1] * pixel<C>(image, h, w, y0, x0 + 1)',
        'weight[2] * pixel<C>(image, h, w, y0, x0 + 1)'),
    'orders swapped in the adjoint': (
        'SCATTER_TAPS', 'order_y, order_x, weight);',
        'order_x, order_y, weight);'),
}


@pytest.mark.skipif(not kernel_emulation.compiler_available(),
                    reason='needs a C++ compiler')
@pytest.mark.parametrize('bug', sorted(PLANTED_BUGS))
def test_planted_kernel_bugs_are_caught(bug):
    with kernel_emulation.gpu_path_on_cpu():
        check_against_the_composite(1)
        with kernel_emulation.planted(*PLANTED_BUGS[bug]):
            with pytest.raises(AssertionError):
                check_against_the_composite(1)


def test_gradient_of_one_output_needs_only_it():
    # The gradient node's outputs one at a time (x needs no gradient in a
    # network's first layer): each one's derivatives as when all are out.
    arrays, params, rng = make_case(CASES[1], 1)
    gg = {name: rng.uniform(-1, 1, a.shape) for name, a in arrays.items()
          if name != 'gy'}
    full = {}
    variables = {n: chainer.Variable(a) for n, a in arrays.items()}
    y = ours(variables['x'], variables['offset'], variables['W'],
             variables['b'], variables['mask'], **params)
    names = ['x', 'offset', 'W', 'b', 'mask']
    grads = chainer.grad([F.sum(y * variables['gy'])],
                         [variables[n] for n in names],
                         enable_double_backprop=True)
    for name, g in zip(names, grads):
        full[name] = chainer.grad([F.sum(g * gg[name])],
                                  [variables[n] for n in names + ['gy']])
    for name in names:
        variables = {n: chainer.Variable(a) for n, a in arrays.items()}
        y = ours(variables['x'], variables['offset'], variables['W'],
                 variables['b'], variables['mask'], **params)
        g, = chainer.grad([F.sum(y * variables['gy'])], [variables[name]],
                          enable_double_backprop=True)
        alone = chainer.grad([F.sum(g * gg[name])],
                             [variables[n] for n in names + ['gy']])
        for a, e in zip(alone, full[name]):
            if e is None or a is None:
                assert (a is None or not a.array.any()) and (
                    e is None or not e.array.any())
            else:
                numpy.testing.assert_allclose(a.array, e.array, rtol=1e-12,
                                              atol=1e-12)


@pytest.mark.parametrize('modulated', [False, True])
@pytest.mark.parametrize('cpu_loops', helpers.CPU_LOOPS)
def test_link_double_backprop(modulated, cpu_loops):
    # chainer.grad with enable_double_backprop through the link, offsets
    # predicted by offset_conv (random weights: non-zero offsets).
    rng = numpy.random.RandomState(5)
    with chainer.using_config('dtype', numpy.float64):
        link = deformable.DeformableConvolution2D(
            4, 3, 3, pad=1, offset_groups=2, modulated=modulated,
            offset_initialW=chainer.initializers.Normal(0.5),
            offset_initial_bias=chainer.initializers.Normal(0.5))
    x = rng.uniform(-1, 1, (2, 4, 5, 6))
    gy = rng.uniform(-1, 1, (2, 3, 5, 6))
    params = tuple(link.params())
    grad_grads = (rng.uniform(-1, 1, x.shape),) + tuple(
        rng.uniform(-1, 1, p.shape) for p in params)
    gradient_check.check_double_backward(
        link, x, gy, grad_grads, params=params, eps=1e-6, atol=1e-5,
        rtol=1e-5)


def test_each_tap_sample_is_made_once(monkeypatch):
    # The samples are large: a gradient node makes each order of each
    # array once, though T_11(x) serves both offset axes.
    from deformable import second_order
    made = []
    forward = second_order.SampleTaps.forward_cpu

    def counted(node, inputs):
        made.append(node.order)
        return forward(node, inputs)
    monkeypatch.setattr(second_order.SampleTaps, 'forward_cpu', counted)
    rng = numpy.random.RandomState(0)
    x = chainer.Variable(rng.randn(2, 3, 5, 5))
    offset = chainer.Variable(rng.uniform(-2, 2, (2, 18, 5, 5)))
    W = chainer.Variable(rng.randn(4, 3, 3, 3))
    y = deformable.deformable_convolution_2d_sampler(x, offset, W, pad=1)
    gx, goffset = chainer.grad([F.sum(y * y)], [x, offset],
                               enable_double_backprop=True)
    made.clear()
    (F.sum(gx * gx) + F.sum(goffset * goffset)).backward()
    # T_00, T_10, T_01 of ggx; T_10, T_01, T_11 of x.
    assert sorted(made) == [(0, 0), (0, 1), (0, 1), (1, 0), (1, 0), (1, 1)]
