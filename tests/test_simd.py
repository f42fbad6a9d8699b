"""The vector loops of ``deformable.backends.simd`` against NumPy, at every
channel count around the vector width (whole vectors, one vector exactly, a
tail only, vectors and a tail), and the compiled op at those widths against the
pure-NumPy loops."""

import itertools

import numpy
import pytest

import chainer

import deformable
from deformable import tuning

import helpers

numba = pytest.importorskip('numba')
simd = pytest.importorskip('deformable.backends.simd')

COUNTS = [0, 1, 3, 4, 5, 7, 8, 9, 15, 16, 17, 24, 33]
DTYPES = [numpy.float32, numpy.float64]

# A bordered plane (h, w, c) and a corner in it, with the corners' steps.
PLANE_SHAPE = (5, 6, 40)
STEP_X = PLANE_SHAPE[2]
STEP_Y = PLANE_SHAPE[1] * PLANE_SHAPE[2]
STEPS = (0, STEP_X, STEP_Y, STEP_Y + STEP_X)
CORNER = (1 * PLANE_SHAPE[1] + 2) * PLANE_SHAPE[2] + 3
AT = 7


@numba.njit
def call_blend(out, at, source, corner, count, weights):
    simd.blend(out, at, source, corner, (STEP_X, STEP_Y), count,
               (weights[0], weights[1], weights[2], weights[3]))


# Where tap_backward's four sums go in its array of them.
SUMS_AT = 4


@numba.njit
def call_tap_backward(source, target, count, columns, grad_columns,
                      weights, dots, scatter, fill, sums, accumulate):
    simd.tap_backward(
        (source, target), CORNER, (STEP_X, STEP_Y), count,
        (columns, grad_columns), AT,
        (weights[0], weights[1], weights[2], weights[3]),
        (dots, scatter, fill, accumulate), sums, SUMS_AT)


def tap_sums(source, target, count, columns, grad_columns, weights,
             dots=True, scatter=False, fill=True, before=0,
             accumulate=False):
    """The sums tap_backward leaves (from ``before``), checking that it
    writes nothing else of their array."""
    sums = numpy.full(12, before, source.dtype)
    call_tap_backward(source, target, count, columns, grad_columns, weights,
                      dots, scatter, fill, sums, accumulate)
    assert (sums[:SUMS_AT] == before).all()
    assert (sums[SUMS_AT + 4:] == before).all()
    return sums[SUMS_AT:SUMS_AT + 4]


def arrays(count, dtype, seed=0):
    rng = numpy.random.RandomState(seed + count)
    source = rng.uniform(-1, 1, PLANE_SHAPE).astype(dtype)
    weights = rng.uniform(0, 1, 4).astype(dtype)
    grad_columns = rng.uniform(-1, 1, (2, 30)).astype(dtype)
    return source, weights, grad_columns


def corners(source, count):
    flat = source.reshape(-1)
    return [flat[CORNER + step:CORNER + step + count] for step in STEPS]


def blended(source, weights, count):
    values = corners(source, count)
    # The scalar code's order: ((w00 v00 + w01 v01) + w10 v10) + w11 v11.
    total = weights[0] * values[0] + weights[1] * values[1]
    return (total + weights[2] * values[2]) + weights[3] * values[3]


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('count', COUNTS)
def test_blend(count, dtype):
    source, weights, _ = arrays(count, dtype)
    out = numpy.full((3, 20), 7, dtype)
    call_blend(out, AT, source, CORNER, count, weights)
    flat = out.reshape(-1)
    # Bit for bit: the same operations in the same order.
    numpy.testing.assert_array_equal(flat[AT:AT + count],
                                     blended(source, weights, count))
    assert (flat[:AT] == 7).all() and (flat[AT + count:] == 7).all()


def lanes(dtype):
    return tuning.VECTOR_BYTES // numpy.dtype(dtype).itemsize


def tap_backward_cases():
    """tap_backward's cases: every pair of count, dtype and flag; and for
    each dtype (its own compiled code) each of its eight loops (one per
    choice of dots, scatter and fill) at exactly one vector, and at whole
    vectors and a tail (both loops entered and left), so every branch of
    each; accumulating and not, after dots."""
    required = []
    for dtype in DTYPES:
        # Vectors and a tail at this width, taken in turn by the loops.
        both = [c for c in COUNTS if c > lanes(dtype) and c % lanes(dtype)]
        for index, (dots, scatter, fill) in enumerate(
                itertools.product([False, True], repeat=3)):
            leaf = {'dtype': dtype, 'dots': dots, 'scatter': scatter,
                    'fill': fill}
            required.append(dict(leaf, count=lanes(dtype),
                                 accumulate=False))
            required.append(dict(leaf, count=both[index % len(both)],
                                 accumulate=True))
    return helpers.pairwise([
        ('count', COUNTS), ('dtype', DTYPES), ('dots', [False, True]),
        ('scatter', [False, True]), ('fill', [False, True]),
        ('accumulate', [False, True])], required=required)


@helpers.pytest_cases(tap_backward_cases())
def test_tap_backward(count, dtype, dots, scatter, fill, accumulate):
    source, weights, grad_columns = arrays(count, dtype)
    target = numpy.zeros_like(source)
    columns = numpy.full_like(grad_columns, 7)
    before = 0.25
    sums = tap_sums(source, target, count, columns, grad_columns, weights,
                    dots, scatter, fill, before, accumulate)

    flat_columns = columns.reshape(-1)
    if fill:
        numpy.testing.assert_array_equal(flat_columns[AT:AT + count],
                                         blended(source, weights, count))
    else:
        assert (flat_columns[AT:AT + count] == 7).all()
    assert (flat_columns[:AT] == 7).all()
    assert (flat_columns[AT + count:] == 7).all()

    gradient = grad_columns.reshape(-1)[AT:AT + count]
    expected_sums = [
        (before if accumulate or not dots else 0)
        + (numpy.dot(gradient.astype(numpy.float64),
                     values.astype(numpy.float64)) if dots else 0)
        for values in corners(source, count)]
    tolerance = 1e-5 if dtype == numpy.float32 else 1e-13
    numpy.testing.assert_allclose(sums, expected_sums, rtol=tolerance,
                                  atol=tolerance)

    expected_target = numpy.zeros_like(source).reshape(-1)
    if scatter:
        for step, weight in zip(STEPS, weights):
            expected_target[CORNER + step:CORNER + step + count] += (
                weight * gradient)
    numpy.testing.assert_array_equal(target.reshape(-1), expected_target)


def test_dot_order_is_fixed():
    # The same inputs give the same bits, call after call.
    source, weights, grad_columns = arrays(33, numpy.float32)
    results = {tuple(tap_sums(source, numpy.zeros_like(source), 33,
                              numpy.empty_like(grad_columns), grad_columns,
                              weights))
               for _ in range(5)}
    assert len(results) == 1


def test_mixed_dtypes_are_refused():
    source, weights, _ = arrays(8, numpy.float32)
    out = numpy.zeros((3, 20), numpy.float64)
    with pytest.raises(numba.core.errors.TypingError):
        call_blend(out, AT, source, CORNER, 8, weights)


# --- The op at those widths ------------------------------------------------

# Each width with each dtype (whose vector width tells whole vectors from a
# tail); the mask, a runtime branch, with each.
@helpers.pytest_cases(helpers.pairwise([
    (('width', 'offset_groups', 'groups'), [
        (8, 1, 1), (8, 4, 1), (16, 2, 1), (17, 1, 1), (9, 2, 2), (33, 1, 1),
        (12, 2, 1), (4, 1, 1)]),
    ('dtype', DTYPES),
    ('with_mask', [False, True])]))
def test_compiled_op_agrees_with_numpy_loops(width, offset_groups, groups,
                                             dtype, with_mask):
    """``width`` channels per offset group; all the gradients."""
    rng = numpy.random.RandomState(width * offset_groups + groups)
    c = width * offset_groups
    n, h, w, k = 2, 7, 6, 3
    x = rng.uniform(-1, 1, (n, c, h, w)).astype(dtype)
    offset = rng.uniform(-3, 3, (n, 2 * offset_groups * k * k, h, w)).astype(
        dtype)
    W = rng.uniform(-1, 1, (2 * groups, c // groups, k, k)).astype(dtype)
    b = rng.uniform(-1, 1, 2 * groups).astype(dtype)
    mask = (rng.uniform(0, 1, (n, offset_groups * k * k, h, w)).astype(
        dtype) if with_mask else None)
    gy = rng.uniform(-1, 1, (n, 2 * groups, h, w)).astype(dtype)

    results = []
    for cpu_loops in helpers.CPU_LOOPS:
        inputs = [chainer.Variable(a) for a in (x, offset, W, b)]
        mask_v = None if mask is None else chainer.Variable(mask)
        with helpers.using_cpu_loops(cpu_loops):
            y = deformable.deformable_convolution_2d_sampler(
                *inputs, stride=1, pad=1, groups=groups, mask=mask_v)
            y.grad = gy
            y.backward()
        results.append([y.array] + [v.grad for v in inputs] + (
            [] if mask_v is None else [mask_v.grad]))
    tolerance = 1e-4 if dtype == numpy.float32 else 1e-12
    for numpy_result, compiled in zip(*results):
        scale = max(1.0, numpy.abs(numpy_result).max())
        numpy.testing.assert_allclose(compiled, numpy_result, rtol=0,
                                      atol=tolerance * scale)


@pytest.mark.parametrize('cpu_loops', ['numba'])
def test_64_bit_plane_positions_give_the_same_results(monkeypatch,
                                                      cpu_loops):
    """Images too large for 32-bit positions take 64-bit ones (forced here
    on a small image): the same results, bit for bit."""
    from deformable.backends import cpu
    from deformable.backends import numba_loops
    rng = numpy.random.RandomState(7)
    x = rng.uniform(-1, 1, (2, 8, 7, 6))
    offset = rng.uniform(-3, 3, (2, 36, 7, 6))
    W = rng.uniform(-1, 1, (3, 8, 3, 3))
    mask = rng.uniform(0, 1, (2, 18, 7, 6))
    gy = rng.uniform(-1, 1, (2, 3, 7, 6))

    def run():
        inputs = [chainer.Variable(a) for a in (x, offset, W, mask)]
        y = deformable.deformable_convolution_2d_sampler(
            inputs[0], inputs[1], inputs[2], pad=1, mask=inputs[3])
        y.grad = gy
        y.backward()
        return [y.array] + [v.grad for v in inputs]

    narrow = run()
    monkeypatch.setattr(tuning, 'INT32_PLANE_LIMIT', 0)
    hyperparameters = deformable.arguments.Hyperparameters.checked(pad=1)
    plan = cpu.Plan(x.shape, offset.shape, W.shape, hyperparameters,
                    x.dtype)
    loops = numba_loops.Loops(plan, cpu.Operands(offset, W, mask, plan))
    assert loops.index_dtype == numpy.int64
    wide = run()
    for a, b in zip(narrow, wide):
        numpy.testing.assert_array_equal(a, b)
