"""What the library's tests share: the CPU loops a test runs with, grids of
cases, inputs, and running and comparing the op.

**CPU loops.** A test that depends on which CPU loops compute (the NumPy
loops or the Numba ones) has a parameter ``cpu_loops``, one of
:data:`CPU_LOOPS`: an attribute of a ``unittest`` class (set by
``chainer.testing.parameterize`` or in the class body) or a
``pytest.mark.parametrize`` argument. The autouse fixture in
``conftest.py`` then runs the whole test, ``setUp`` to ``tearDown``, inside
:func:`using_cpu_loops` (``check_backward`` calls the backward after the
test method has returned). 'numba' skips where Numba is not installed. A
test that compares the two loops with each other uses
:func:`using_cpu_loops` itself. :func:`parameterize_backends` adds the GPU
to a parameterization, once per case whatever its ``cpu_loops``.

**Grids.** :func:`pairwise` makes all-pairs grids (every pair of values of
two parameters in some case) where a full product reaches no code that the
pairs do not; :data:`DCNV1_GRID` and :data:`GENERAL_GRID` are the op's.

Test modules import from here (and from ``naive`` and
``kernel_emulation``), never from each other.
"""

import contextlib
import itertools

import numpy
import pytest

import chainer
from chainer import backend
from chainer import testing

import deformable
from deformable import backends

import kernel_emulation


# The CPU backends' names (``backends.cpu_backend().name``), and the
# ``deformable_use_numba`` setting that picks each.
CPU_LOOPS = ('numpy', 'numba')
_USE_NUMBA = {'numpy': 'never', 'numba': 'always'}

# Where Chainer's backend tests run: the CPU, and the GPU where there is one.
CPU = {}
GPU = {'use_cuda': True}
BACKENDS = [CPU, GPU]


@contextlib.contextmanager
def using_cpu_loops(name):
    """The CPU path computes with the loops named ``name`` (of
    :data:`CPU_LOOPS`) inside; 'numba' skips the test without Numba."""
    if name not in _USE_NUMBA:
        raise ValueError('cpu_loops must be one of {}, not {!r}'.format(
            CPU_LOOPS, name))
    if name == 'numba':
        pytest.importorskip('numba')
    with chainer.using_config('deformable_use_numba', _USE_NUMBA[name]):
        # The loops the test says it runs, not merely a setting.
        assert backends.cpu_backend().name == name
        yield


def parameterize_backends(*cases):
    """``testing.parameterize(*cases)`` and ``inject_backend_tests`` in one
    class decorator: each case on the CPU with its ``cpu_loops``, and on the
    GPU once per case as it is without ``cpu_loops`` (which plays no part
    there), so cases that differ only in their loops run there once.

    Chainer's decorators add the classes they make to the test's module, so
    the GPU's and the CPU's classes are both collected.
    """
    gpu_cases = without(cases, 'cpu_loops')

    def decorate(cls):
        testing.parameterize(*gpu_cases)(
            testing.inject_backend_tests(None, [GPU])(cls))
        return testing.parameterize(*cases)(
            testing.inject_backend_tests(None, [CPU])(cls))
    return decorate


def without(cases, *names):
    """``cases`` without the parameters ``names``, each distinct case
    once, in order."""
    result = []
    for case in cases:
        case = {k: v for k, v in case.items() if k not in names}
        if case not in result:
            result.append(case)
    return result


def pytest_cases(cases):
    """``pytest.mark.parametrize`` over ``cases`` (dicts with the same
    keys), the test's arguments named by the keys."""
    names = sorted(cases[0])
    assert all(sorted(case) == names for case in cases)
    return pytest.mark.parametrize(
        ','.join(names), [tuple(case[n] for n in names) for case in cases])


def pairwise(dimensions, required=()):
    """All-pairs cases: every value of each dimension meets every value of
    each other one in at least one case. Deterministic (greedy).

    Args:
        dimensions: ``(name, values)`` pairs. A name may be a tuple of
            names whose values are tuples: parameters that vary together
            (their combinations are then values of one dimension).
        required: Partial cases (dicts) that must be among the cases;
            the parameters they leave out are chosen like the others'.

    Returns:
        A list of dicts, the required cases first.
    """
    names = [name for name, _ in dimensions]
    values = [list(v) for _, v in dimensions]
    dims = range(len(names))
    uncovered = {(i, a, j, b)
                 for i, j in itertools.combinations(dims, 2)
                 for a in range(len(values[i]))
                 for b in range(len(values[j]))}

    def pairs(row):
        return {(i, row[i], j, row[j])
                for i, j in itertools.combinations(dims, 2)}

    def complete(fixed):
        # Each unset dimension in turn takes the value that covers the most
        # uncovered pairs with those already set (the first, on ties).
        row = dict(fixed)
        for dim in dims:
            if dim not in row:
                row[dim] = max(range(len(values[dim])), key=lambda v: (sum(
                    (d, row[d], dim, v) in uncovered if d < dim
                    else (dim, v, d, row[d]) in uncovered
                    for d in row), -v))
        return row

    rows = [complete(_fixed(partial, names, values)) for partial in required]
    for row in rows:
        uncovered -= pairs(row)
    while uncovered:
        # Of the rows started from each uncovered pair of the first value
        # with one, the one that covers the most.
        i, a = min(uncovered)[:2]
        candidates = [complete({i: a, j: b})
                      for i_, a_, j, b in sorted(uncovered)
                      if (i_, a_) == (i, a)]
        rows.append(max(candidates,
                        key=lambda row: len(pairs(row) & uncovered)))
        uncovered -= pairs(rows[-1])

    cases = []
    for row in rows:
        case = {}
        for dim, name in enumerate(names):
            value = values[dim][row[dim]]
            if isinstance(name, tuple):
                case.update(zip(name, value))
            else:
                case[name] = value
        cases.append(case)
    return cases


def _fixed(partial, names, values):
    """A required partial case as ``{dimension: value index}``."""
    fixed = {}
    for dim, name in enumerate(names):
        parts = name if isinstance(name, tuple) else (name,)
        given = [p for p in parts if p in partial]
        if not given:
            continue
        if len(given) != len(parts):
            raise ValueError('a required case sets all of {} or none'.format(
                name))
        value = tuple(partial[p] for p in parts) \
            if isinstance(name, tuple) else partial[name]
        matches = [index for index, candidate in enumerate(values[dim])
                   if candidate is value or candidate == value]
        if not matches:
            raise ValueError('{!r} is not a value of {}'.format(value, name))
        fixed[dim] = matches[0]
    unknown = set(partial) - {p for name in names for p in (
        name if isinstance(name, tuple) else (name,))}
    if unknown:
        raise ValueError('no dimensions {}'.format(sorted(unknown)))
    return fixed


# --- The op's grids ----------------------------------------------------------

# DCNv1 (no dilation, groups or mask). Kernel, stride and pad enter the op
# only through the output size and where the taps fall (arithmetic with no
# branch), so pairs of them are enough: each value, and each value beside
# each other one. The dtype decides the compute dtype (float16 in float32)
# and which compiled code runs; the batch, the image offsets; no bias, a
# branch of the forward.
DCNV1_GRID = pairwise([
    ('stride', [(1, 1), (2, 3), (3, 2), (2, 2)]),
    ('pad', [(0, 0), (1, 2), (2, 1), (1, 1)]),
    ('ksize', [(1, 1), (3, 3), (2, 3)]),
    ('dtype', [numpy.float64, numpy.float32, numpy.float16]),
    ('n', [1, 2, 3]),
    ('nobias', [False, True]),
    ('cpu_loops', CPU_LOOPS),
])

# The general op: dilation, convolution groups, offset groups (G) and the
# DCNv2 mask, for 4 input channels. What the features change in the code
# depends on one of them (the mask's branches, the grouped products) or on
# two (how the offset groups' channels fall into the convolution groups:
# one run each, or two runs of one offset group), so every pair; plus the
# case with every feature on.
GENERAL_DIMENSIONS = [
    ('stride', [(1, 1), (2, 1), (1, 3), (2, 2)]),
    ('pad', [(1, 1), (0, 2), (2, 0)]),
    ('ksize', [(3, 3), (2, 3), (1, 2)]),
    ('offset_groups', [1, 2, 4]),
    ('dilate', [(1, 1), (2, 1), (2, 3)]),
    ('groups', [1, 2]),
    ('with_mask', [False, True]),
    ('nobias', [False, True]),
    ('n', [1, 2]),
]
ALL_FEATURES = {'dilate': (2, 3), 'groups': 2, 'offset_groups': 4,
                'with_mask': True, 'nobias': False}
GENERAL_GRID = pairwise(GENERAL_DIMENSIONS + [('cpu_loops', CPU_LOOPS)],
                        required=[ALL_FEATURES])


# --- Inputs ------------------------------------------------------------------

def output_size(size, k, s, p, d=1):
    """The output size along one axis, as ``F.convolution_2d``'s."""
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def random_offset(shape, spread, rng):
    """Offsets whose sample points sit at least 0.2 from any integer.

    Sample positions are integers plus the offset, so a fraction in
    [0.2, 0.8] keeps every sample clear of the bilinear kinks (and of the
    clamping at -1 and the far border) that numerical gradients would trip
    over. ``spread`` is the range of the integer part: large enough to push
    samples across the border and out of the image.
    """
    whole = rng.randint(-spread, spread + 1, size=shape)
    frac = rng.uniform(0.2, 0.8, size=shape)
    return whole + frac


def make_inputs(n, c_in, c_out, h, w, ksize, stride, pad, dtype, rng,
                spread=3, nobias=False):
    """DCNv1 inputs ``(x, offset, W, b)`` (``(x, offset, W)`` with
    ``nobias``), random, in ``dtype``."""
    kh, kw = ksize
    out_h = output_size(h, kh, stride[0], pad[0])
    out_w = output_size(w, kw, stride[1], pad[1])
    x = rng.uniform(-1, 1, (n, c_in, h, w))
    offset = random_offset((n, 2 * kh * kw, out_h, out_w), spread, rng)
    W = rng.uniform(-1, 1, (c_out, c_in, kh, kw))
    b = rng.uniform(-1, 1, (c_out,))
    arrays = (x, offset, W) if nobias else (x, offset, W, b)
    return tuple(a.astype(dtype) for a in arrays)


def make_general_inputs(rng, n, c_in, c_out, h, w, ksize, stride, pad,
                        dilate, groups, offset_groups, with_mask, spread,
                        nobias=False, dtype=numpy.float64):
    """``(x, offset, W, b, mask)``, ``b`` and ``mask`` possibly None."""
    kh, kw = ksize
    out_h = output_size(h, kh, stride[0], pad[0], dilate[0])
    out_w = output_size(w, kw, stride[1], pad[1], dilate[1])
    n_taps = kh * kw
    x = rng.uniform(-1, 1, (n, c_in, h, w))
    offset = random_offset((n, 2 * offset_groups * n_taps, out_h, out_w),
                           spread, rng)
    W = rng.uniform(-1, 1, (c_out, c_in // groups, kh, kw))
    b = None if nobias else rng.uniform(-1, 1, (c_out,))
    mask = rng.uniform(-0.5, 1.5, (n, offset_groups * n_taps, out_h, out_w)) \
        if with_mask else None
    return tuple(None if a is None else a.astype(dtype)
                 for a in (x, offset, W, b, mask))


# --- Running and comparing ---------------------------------------------------

def forward_backward(function, inputs, gy, stride, pad):
    """``function(*inputs, stride=stride, pad=pad)`` and its backward from
    ``gy``: the output array and the inputs' gradients (inputs copied)."""
    variables = [chainer.Variable(a.copy()) for a in inputs]
    y = function(*variables, stride=stride, pad=pad)
    y.grad = gy
    y.backward()
    return y.array, [v.grad for v in variables]


def relative_error(actual, expected):
    """The largest difference relative to the largest ``expected`` value;
    ``actual`` may be on the GPU; 0 for empty arrays."""
    actual = backend.CpuDevice().send(actual)
    return (numpy.abs(actual - expected).max(initial=0)
            / max(numpy.abs(expected).max(initial=0), 1e-300))


INPUTS = ('x', 'offset', 'W', 'b', 'mask')


def run_op(inputs, gy, **params):
    """Output and the gradients of every input, by name.

    ``inputs`` are ``(x, offset, W[, b[, mask]])``, ``b`` and ``mask``
    possibly None; ``params`` the op's keyword arguments.
    """
    variables = {name: chainer.Variable(a.copy())
                 for name, a in zip(INPUTS, inputs) if a is not None}
    y = deformable.deformable_convolution_2d_sampler(
        variables['x'], variables['offset'], variables['W'],
        b=variables.get('b'), mask=variables.get('mask'), **params)
    y.grad = gy.copy()
    y.backward()
    results = {'y': y.array}
    results.update(('g' + name, v.grad) for name, v in variables.items())
    return results


def disagreements(actual, expected, rtol):
    """Where two sets of results (dicts of arrays by name) differ.

    NaN must appear exactly where ``expected`` has it; elsewhere the
    largest difference, relative to the largest expected value, is at most
    rtol.
    """
    problems = []
    for name, e in expected.items():
        a = actual[name]
        if a.shape != e.shape or a.dtype != e.dtype:
            problems.append('{}: {} {} instead of {} {}'.format(
                name, a.shape, a.dtype, e.shape, e.dtype))
            continue
        nan = numpy.isnan(e)
        if (numpy.isnan(a) != nan).any():
            problems.append('{}: NaN in other places'.format(name))
            continue
        a = a[~nan].astype(numpy.float64)
        e = e[~nan].astype(numpy.float64)
        if not numpy.isfinite(a).all():
            problems.append('{}: infinite values'.format(name))
            continue
        error = relative_error(a, e)
        if error > rtol:
            problems.append('{}: relative error {:.2e}'.format(name, error))
    return problems


def gpu_path_disagreements(inputs, gy, rtol, **params):
    """Where the GPU path on the CPU differs from the NumPy path
    (:func:`disagreements`)."""
    expected = run_op(inputs, gy, **params)
    with kernel_emulation.gpu_path_on_cpu():
        actual = run_op(inputs, gy, **params)
    return disagreements(actual, expected, rtol)


def parse_tables(text):
    """``{title: [row as {column: cell}]}`` of each Markdown table under a
    ``## title`` line."""
    tables, title, header = {}, None, None
    for line in text.splitlines():
        if line.startswith('## '):
            title, header = line[3:], None
            tables[title] = []
        elif line.startswith('|'):
            cells = [c.strip() for c in line.strip().strip('|').split('|')]
            if header is None:
                header = cells
            elif not set(line.strip()) <= set('|-'):
                assert len(cells) == len(header), line
                tables[title].append(dict(zip(header, cells)))
    return tables
