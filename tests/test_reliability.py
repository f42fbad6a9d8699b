"""The op under concurrent callers and any number of threads, and at the
edges: an empty batch, sizes and arguments it refuses."""

import threading

import numpy
import pytest

import chainer
from chainer.utils import type_check

import deformable
from deformable.backends import threads

import helpers
import kernel_emulation


GENERAL = {'pad': (2, 1), 'dilate': (2, 1), 'groups': 2}


def general_case(seed, n=3, c=8, size=(9, 10)):
    """Inputs with every feature: offset groups, groups (``GENERAL``),
    mask and dilation."""
    rng = numpy.random.RandomState(seed)
    h, w = size
    x = rng.uniform(-1, 1, (n, c, h, w)).astype(numpy.float32)
    offset = rng.uniform(-3, 3, (n, 36, h, w)).astype(numpy.float32)
    W = rng.uniform(-1, 1, (6, c // 2, 3, 3)).astype(numpy.float32)
    b = rng.uniform(-1, 1, 6).astype(numpy.float32)
    mask = rng.uniform(0, 1, (n, 18, h, w)).astype(numpy.float32)
    gy = rng.uniform(-1, 1, (n, 6, h, w)).astype(numpy.float32)
    return (x, offset, W, b, mask), gy


def dcnv1_case(seed, n=7, c=32, out_c=16, size=(14, 14)):
    """DCNv1 (pad 1): products big enough for BLAS to take threads."""
    rng = numpy.random.RandomState(seed)
    h, w = size
    x = rng.uniform(-1, 1, (n, c, h, w)).astype(numpy.float32)
    offset = rng.uniform(-3, 3, (n, 18, h, w)).astype(numpy.float32)
    W = rng.uniform(-1, 1, (out_c, c, 3, 3)).astype(numpy.float32)
    b = rng.uniform(-1, 1, out_c).astype(numpy.float32)
    gy = rng.uniform(-1, 1, (n, out_c, h, w)).astype(numpy.float32)
    return (x, offset, W, b), gy


def forward_backward(inputs, gy):
    """Output and gradients of a :func:`general_case` (with a mask) or a
    :func:`dcnv1_case`."""
    variables = [chainer.Variable(a.copy()) for a in inputs]
    if len(variables) == 5:
        x, offset, W, b, mask = variables
        y = deformable.deformable_convolution_2d_sampler(
            x, offset, W, b, mask=mask, **GENERAL)
    else:
        y = deformable.deformable_convolution_2d_sampler(*variables, pad=1)
    y.grad = gy.copy()
    y.backward()
    return [y.array] + [v.grad for v in variables]


def assert_same_bits(results, expected):
    for a, e in zip(results, expected):
        assert a.dtype == e.dtype and a.shape == e.shape
        assert a.tobytes() == e.tobytes()


def blas_threads():
    threadpoolctl = pytest.importorskip('threadpoolctl')
    return [info['num_threads'] for info in threadpoolctl.threadpool_info()
            if info['user_api'] == 'blas']


class TestConcurrentCallers(object):

    @pytest.mark.parametrize('cpu_loops', helpers.CPU_LOOPS)
    def test_each_call_gives_its_single_caller_result(self, cpu_loops):
        # Several Python threads calling the op at once, on every core.
        cases = [general_case(seed) for seed in range(3)] + [
            general_case(3, n=1, size=(30, 27)), dcnv1_case(4)]
        expected = [forward_backward(*case) for case in cases]
        before = blas_threads()
        failures = []
        # chainer.config is per thread: each caller picks the loops again.
        use_numba = chainer.config.deformable_use_numba

        def caller(index):
            with chainer.using_config('deformable_use_numba', use_numba):
                for repeat in range(8):
                    case = (index + repeat) % len(cases)
                    try:
                        assert_same_bits(forward_backward(*cases[case]),
                                         expected[case])
                    except AssertionError:
                        failures.append(case)
        callers = [threading.Thread(target=caller, args=(i,))
                   for i in range(4)]
        for thread in callers:
            thread.start()
        for thread in callers:
            thread.join()
        assert not failures
        assert blas_threads() == before

    def test_overlapping_calls_leave_blas_as_it_was(self, monkeypatch):
        # The interleaving that undid the limit: A limits BLAS, B limits it
        # (saving A's limit), A restores, B restores A's limit. One call at
        # a time makes A's items wait out their timeout instead.
        threadpoolctl = pytest.importorskip('threadpoolctl')
        monkeypatch.setenv(threads.ENV_THREADS, '2')
        b_entered, a_returned = threading.Event(), threading.Event()

        def a_item(_):
            b_entered.wait(timeout=1)

        def b_item(_):
            b_entered.set()
            a_returned.wait(timeout=1)

        def call_a():
            threads.run(a_item, [0, 1], threaded=True)
            a_returned.set()

        with threadpoolctl.threadpool_limits(limits=2, user_api='blas'):
            before = blas_threads()
            callers = [threading.Thread(target=call_a),
                       threading.Thread(target=threads.run,
                                        args=(b_item, [0, 1], True))]
            for thread in callers:
                thread.start()
            for thread in callers:
                thread.join()
            assert blas_threads() == before


@pytest.mark.parametrize('cpu_loops', helpers.CPU_LOOPS)
def test_results_do_not_depend_on_the_number_of_threads(cpu_loops,
                                                        monkeypatch):
    # Several image groups, one big image (rows of it in parallel), and
    # products big enough for BLAS to take several threads if let.
    cases = [general_case(0, n=7), general_case(1, n=1, size=(40, 33)),
             dcnv1_case(2)]
    results = {}
    for workers in ('1', '2', '7'):
        monkeypatch.setenv(threads.ENV_THREADS, workers)
        results[workers] = [forward_backward(*case) for case in cases]
    for workers in ('2', '7'):
        for case, expected in zip(results[workers], results['1']):
            assert_same_bits(case, expected)


@pytest.mark.parametrize('value', ['0', '-3', 'abc', '1.5'])
def test_bad_thread_count_is_named(value, monkeypatch):
    monkeypatch.setenv(threads.ENV_THREADS, value)
    with pytest.raises(ValueError, match='DEFORMABLE_NUM_THREADS=.*must be '
                       'a positive integer'):
        threads.n_workers()


# --- An empty batch ----------------------------------------------------------

def empty_batch():
    (x, offset, W, b, mask), gy = general_case(0)
    return [x[:0], offset[:0], W, b, mask[:0]], gy[:0]


def check_empty_batch_results(results, inputs):
    y, gx, goffset, gW, gb, gmask = results
    assert y.shape == (0, 6, 9, 10)
    for grad, array in zip((gx, goffset, gW, gb, gmask), inputs):
        assert grad.shape == array.shape and grad.dtype == array.dtype
    assert not gW.any() and not gb.any()


@pytest.mark.parametrize('cpu_loops', helpers.CPU_LOOPS)
def test_empty_batch(cpu_loops):
    inputs, gy = empty_batch()
    check_empty_batch_results(forward_backward(inputs, gy), inputs)


@pytest.mark.skipif(not kernel_emulation.compiler_available(),
                    reason='needs a C++ compiler')
@pytest.mark.parametrize('deterministic', [False, True])
def test_empty_batch_on_the_gpu_path(deterministic):
    inputs, gy = empty_batch()
    with kernel_emulation.gpu_path_on_cpu(), chainer.using_config(
            'cudnn_deterministic', deterministic):
        results = forward_backward(inputs, gy)
        check_empty_batch_results(results, inputs)
        # Differentiated twice too: the second order's own kernels.
        variables = [chainer.Variable(a.copy()) for a in inputs]
        x, offset, W, b, mask = variables
        y = deformable.deformable_convolution_2d_sampler(
            x, offset, W, b, mask=mask, **GENERAL)
        grads = chainer.grad([chainer.functions.sum(y * y)], [x, offset],
                             enable_double_backprop=True)
        F = chainer.functions
        (F.sum(grads[0] * grads[0]) + F.sum(grads[1] * grads[1])).backward()
    for v in variables:
        assert v.grad.shape == v.shape and not v.grad.any()


@pytest.mark.parametrize('modulated', [False, True])
def test_empty_batch_through_the_link(modulated):
    link = deformable.DeformableConvolution2D(3, 4, 3, pad=1,
                                              modulated=modulated)
    x = chainer.Variable(numpy.zeros((0, 3, 5, 5), numpy.float32))
    y = link(x)
    assert y.shape == (0, 4, 5, 5)
    link.cleargrads()
    y.grad = numpy.zeros_like(y.array)
    y.backward()
    assert x.grad.shape == x.shape
    for param in link.params():
        assert param.grad.shape == param.shape and not param.grad.any()


# --- Refused sizes and arguments ---------------------------------------------

def op(x_shape=(1, 3, 5, 5), w_shape=(4, 3, 3, 3), offset_shape=None,
       **kwargs):
    x = numpy.zeros(x_shape, numpy.float32)
    W = numpy.zeros(w_shape, numpy.float32)
    if offset_shape is None:
        offset_shape = (1, 2 * w_shape[2] * w_shape[3], 5, 5)
    return deformable.deformable_convolution_2d_sampler(
        x, numpy.zeros(offset_shape, numpy.float32), W, **kwargs)


def test_zero_channels_are_named():
    with pytest.raises(type_check.InvalidType, match='x has 0 channels'):
        op((1, 0, 5, 5), (4, 0, 3, 3), pad=1)


def test_zero_kernel_is_named():
    with pytest.raises(type_check.InvalidType, match="W's kernel is 0x0"):
        op(w_shape=(4, 3, 0, 0), offset_shape=(1, 0, 6, 6))


def test_link_whose_kernel_does_not_fit():
    link = deformable.DeformableConvolution2D(3, 4, 7, dilate=(1, 2))
    with pytest.raises(ValueError, match=r'the 7x7 kernel \(dilate 1x2, pad '
                       r'0x0\) does not fit the 5x6 input: the output would '
                       r'be -1x-6'):
        link(numpy.zeros((1, 3, 5, 6), numpy.float32))


@pytest.mark.parametrize('name, value, message', [
    ('stride', '2', "stride must be an int or a pair of ints, got '2'"),
    ('stride', 1.5, 'stride must be an int or a pair of ints, got 1.5'),
    ('pad', 0.5, 'pad must be an int or a pair of ints, got 0.5'),
    ('pad', (1, 1.0), r'pad must be an int or a pair of ints, got \(1, '
     r'1.0\)'),
    ('dilate', (1, 2, 3), 'dilate must be an int or a pair of ints'),
    ('dilate', True, 'dilate must be an int or a pair of ints, got True'),
    ('groups', 1.0, 'groups must be an int, got 1.0'),
    ('groups', None, 'groups must be an int, got None'),
])
def test_non_integer_arguments_are_named(name, value, message):
    with pytest.raises(TypeError, match=message):
        op(**dict({'pad': 1}, **{name: value}))
    with pytest.raises(TypeError, match=message):
        deformable.DeformableConvolution2D(3, 4, 3, **{name: value})


@pytest.mark.parametrize('name, value, message', [
    ('stride', 0, 'stride must be at least 1, got 0'),
    ('pad', (0, -1), r'pad must be at least 0, got \(0, -1\)'),
    ('dilate', 0, 'dilate must be at least 1, got 0'),
    ('groups', 0, 'groups must be at least 1, got 0'),
])
def test_out_of_range_arguments_are_named(name, value, message):
    with pytest.raises(ValueError, match=message):
        op(**dict({'pad': 1}, **{name: value}))
