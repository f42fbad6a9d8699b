"""The general op: dilation, groups, offset groups and the DCNv2 mask.

Gradients by ``check_backward`` and values against the loop reference
(``naive.py``) on an all-pairs grid of every feature, for both CPU
implementations and the GPU; values against independent implementations:
the ONNX reference evaluator's ``DeformConv``, and Chainer's DCNv1 for the
defaults; and every bad input.
"""

import functools
import unittest

import numpy
import pytest

import chainer
import chainer.functions as F
from chainer import testing
from chainer.utils import type_check

import deformable

import helpers
from helpers import make_general_inputs
import naive


@helpers.parameterize_backends(*helpers.GENERAL_GRID)
class TestGeneralGradients(testing.FunctionTestCase):
    """Forward against the loop reference, and check_backward, on a grid of
    every feature (4 input channels)."""

    def setUp(self):
        self.check_forward_options = {'atol': 1e-12, 'rtol': 1e-12}
        self.check_backward_options = {'atol': 1e-7, 'rtol': 1e-7}
        self.check_double_backward_options = self.check_backward_options

    def generate_inputs(self):
        rng = numpy.random.RandomState(
            sum(self.ksize + self.stride + self.pad + self.dilate)
            + 10 * self.offset_groups + self.groups)
        inputs = make_general_inputs(
            rng, self.n, 4, 4, 6, 7, self.ksize, self.stride, self.pad,
            self.dilate, self.groups, self.offset_groups, self.with_mask,
            spread=3, nobias=self.nobias)
        return tuple(a for a in inputs if a is not None)

    def _split(self, inputs):
        x, offset, W = inputs[:3]
        b = None if self.nobias else inputs[3]
        mask = inputs[-1] if self.with_mask else None
        return x, offset, W, b, mask

    def forward(self, inputs, device):
        x, offset, W, b, mask = self._split(inputs)
        return deformable.deformable_convolution_2d_sampler(
            x, offset, W, b, stride=self.stride, pad=self.pad,
            dilate=self.dilate, groups=self.groups, mask=mask),

    def forward_expected(self, inputs):
        x, offset, W, b, mask = self._split(inputs)
        return naive.forward(x, offset, W, b, self.stride, self.pad,
                             self.dilate, self.groups, mask),


@testing.parameterize(*testing.product({'cpu_loops': helpers.CPU_LOOPS}))
class TestDefaultsAreDCNv1(unittest.TestCase):

    def test_defaults_spelled_out_are_chainers_dcnv1(self):
        # No dilation, one group and no mask, left out or spelled out, are
        # DCNv1: Chainer's own implementation, values and every gradient.
        rng = numpy.random.RandomState(1)
        x, offset, W, b, _ = make_general_inputs(
            rng, 2, 3, 4, 6, 5, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, False,
            spread=3)
        gy = rng.uniform(-1, 1, (2, 4, 6, 5))

        def run(function, **features):
            variables = [chainer.Variable(a.copy())
                         for a in (x, offset, W, b)]
            y = function(*variables, stride=1, pad=1, **features)
            y.grad = gy
            y.backward()
            return [y.array] + [v.grad for v in variables]

        expected = run(F.deformable_convolution_2d_sampler)
        for features in ({}, {'dilate': 1, 'groups': 1, 'mask': None},
                         {'dilate': (1, 1), 'groups': 1, 'mask': None}):
            actual = run(deformable.deformable_convolution_2d_sampler,
                         **features)
            for name, a, e in zip(['y', 'gx', 'goffset', 'gW', 'gb'],
                                  actual, expected):
                numpy.testing.assert_allclose(
                    a, e, rtol=1e-12, atol=1e-12,
                    err_msg='{} with {}'.format(name, features))

    def test_mask_of_ones_is_no_mask(self):
        rng = numpy.random.RandomState(2)
        x, offset, W, b, _ = make_general_inputs(
            rng, 2, 4, 2, 6, 5, (3, 3), (1, 1), (1, 1), (1, 1), 1, 2, False,
            spread=3)
        ones = numpy.ones((2, 18, 6, 5))
        y = deformable.deformable_convolution_2d_sampler(
            x, offset, W, b, 1, 1, mask=ones)
        y_plain = deformable.deformable_convolution_2d_sampler(
            x, offset, W, b, 1, 1)
        numpy.testing.assert_array_equal(y.array, y_plain.array)

    def test_offset_gradient_with_mask_at_integers(self):
        # The forward-difference convention, modulated, against the loops.
        rng = numpy.random.RandomState(3)
        x, _, W, b, mask = make_general_inputs(
            rng, 2, 4, 2, 6, 5, (3, 3), (1, 1), (2, 1), (2, 1), 2, 2, True,
            spread=3)
        offset = rng.randint(-3, 4, size=(2, 36, 6, 5)).astype(numpy.float64)
        gy = rng.uniform(-1, 1, (2, 2, 6, 5))
        offset_v = chainer.Variable(offset)
        y = deformable.deformable_convolution_2d_sampler(
            x, offset_v, W, b, 1, (2, 1), (2, 1), 2, mask)
        y.grad = gy
        y.backward()
        expected = naive.offset_grad(x, offset, W, gy, (1, 1), (2, 1),
                                     (2, 1), 2, mask)
        numpy.testing.assert_allclose(offset_v.grad, expected,
                                      rtol=0, atol=1e-12)


# --- ONNX's DeformConv: an independent implementation -----------------------

def to_interleaved(offset, n_groups, n_taps):
    """Our layout -> torchvision's and ONNX's (as in the README)."""
    n, _, out_h, out_w = offset.shape
    return offset.reshape(n, n_groups, 2, n_taps, out_h, out_w)[
        :, :, ::-1].transpose(0, 1, 3, 2, 4, 5).reshape(
            n, 2 * n_groups * n_taps, out_h, out_w)


def from_interleaved(offset, n_groups, n_taps):
    """torchvision's and ONNX's layout -> ours (as in the README)."""
    n, _, out_h, out_w = offset.shape
    return offset.reshape(n, n_groups, n_taps, 2, out_h, out_w)[
        :, :, :, ::-1].transpose(0, 1, 3, 2, 4, 5).reshape(
            n, 2 * n_groups * n_taps, out_h, out_w)


def onnx_deform_conv(x, offset, W, b, mask, stride, pad, dilate, groups,
                     offset_groups):
    """ONNX's ``DeformConv`` (opset 19) by ``onnx.reference``."""
    onnx = pytest.importorskip('onnx')
    from onnx import helper
    from onnx import TensorProto
    from onnx.reference import ReferenceEvaluator
    kh, kw = W.shape[2:]
    names = ['X', 'W', 'offset', 'B' if b is not None else '',
             'mask' if mask is not None else '']
    while not names[-1]:
        names.pop()
    node = helper.make_node(
        'DeformConv', names, ['Y'], kernel_shape=[kh, kw],
        strides=list(stride), pads=[pad[0], pad[1], pad[0], pad[1]],
        dilations=list(dilate), group=groups, offset_group=offset_groups)
    arrays = {'X': x, 'W': W, 'offset': offset, 'B': b, 'mask': mask}
    graph = helper.make_graph(
        [node], 'deform_conv',
        [helper.make_tensor_value_info(name, TensorProto.DOUBLE,
                                       arrays[name].shape)
         for name in names if name],
        [helper.make_tensor_value_info('Y', TensorProto.DOUBLE, [])])
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid('', 19)])
    onnx.checker.check_model(model)
    y, = ReferenceEvaluator(model).run(
        None, {name: arrays[name] for name in names if name})
    return y


def test_layout_conversion_round_trip():
    offset = numpy.arange(2 * 2 * 3 * 6 * 4 * 5, dtype=float).reshape(
        2, 36, 4, 5)
    theirs = to_interleaved(offset, 3, 6)
    # Group 1, tap 4: (dy, dx) next to each other in theirs.
    assert theirs[1, 2 * (6 + 4), 2, 3] == offset[1, 12 + 6 + 4, 2, 3]
    assert theirs[1, 2 * (6 + 4) + 1, 2, 3] == offset[1, 12 + 4, 2, 3]
    numpy.testing.assert_array_equal(from_interleaved(theirs, 3, 6), offset)


@functools.lru_cache(maxsize=None)
def onnx_case(seed):
    """Random arguments of every feature, and ONNX's output for them
    (computed once for both CPU loops: the evaluator is slow)."""
    rng = numpy.random.RandomState(100 + seed)
    groups = rng.choice([1, 2, 3])
    offset_groups = rng.choice([1, 2, 3, 6])
    c_in = 6 * rng.randint(1, 3)
    c_out = groups * rng.randint(1, 3)
    ksize = tuple(rng.randint(1, 4, size=2))
    stride = tuple(rng.randint(1, 4, size=2))
    pad = tuple(rng.randint(0, 3, size=2))
    dilate = tuple(rng.randint(1, 3, size=2))
    h, w = rng.randint(5, 9, size=2)
    with_mask, nobias = seed % 2 == 0, seed % 3 == 0
    x, offset, W, b, mask = make_general_inputs(
        rng, rng.randint(1, 3), c_in, c_out, h, w, ksize, stride, pad,
        dilate, groups, offset_groups, with_mask, spread=max(h, w),
        nobias=nobias)
    # onnx.reference's GridSample keeps sample coordinates in float32:
    # offsets on a 1/256 grid give positions it holds exactly.
    offset = numpy.round(offset * 256) / 256
    n_taps = ksize[0] * ksize[1]
    y_onnx = onnx_deform_conv(
        x, to_interleaved(offset, offset_groups, n_taps), W, b, mask,
        stride, pad, dilate, groups, offset_groups)
    return (x, offset, W, b, stride, pad, dilate, groups, mask), y_onnx


@pytest.mark.parametrize('seed', range(16))
@pytest.mark.parametrize('cpu_loops', helpers.CPU_LOOPS)
def test_agrees_with_onnx_reference(seed, cpu_loops):
    pytest.importorskip('onnx')
    arguments, y_onnx = onnx_case(seed)
    y = deformable.deformable_convolution_2d_sampler(*arguments).array
    assert y.shape == y_onnx.shape
    error = numpy.abs(y - y_onnx).max() / numpy.abs(y_onnx).max()
    assert error <= 1e-10


# --- Bad input -------------------------------------------------------------

class TestGeneralBadInput(unittest.TestCase):

    def setUp(self):
        self.x = numpy.zeros((2, 4, 6, 5), numpy.float32)
        self.offset = numpy.zeros((2, 36, 6, 5), numpy.float32)   # G = 2
        self.W = numpy.zeros((4, 2, 3, 3), numpy.float32)        # groups 2
        self.mask = numpy.zeros((2, 18, 6, 5), numpy.float32)

    def call(self, x=None, offset=None, W=None, mask=None, **kwargs):
        kwargs.setdefault('groups', 2)
        return deformable.deformable_convolution_2d_sampler(
            self.x if x is None else x,
            self.offset if offset is None else offset,
            self.W if W is None else W, pad=1,
            mask=self.mask if mask is None else mask, **kwargs)

    def check(self, message, **kwargs):
        with pytest.raises(type_check.InvalidType, match=message):
            self.call(**kwargs)

    def test_valid_call(self):
        assert self.call().shape == (2, 4, 6, 5)

    def test_groups_not_dividing_channels(self):
        self.check(r'groups=3, 6 input and 4 output channels',
                   x=numpy.zeros((2, 6, 6, 5), numpy.float32), groups=3)
        self.check(r'in_types\[0\].shape\[1\] == in_types\[2\].shape\[1\] '
                   r'\* 2', W=numpy.zeros((4, 3, 3, 3), numpy.float32))

    def test_offset_channels_not_a_multiple(self):
        self.check(r'offset has 35 channels.*|.*multiple of 2\*kh\*kw = 18',
                   offset=self.offset[:, 1:])
        self.check('offset has 0 channels', offset=self.offset[:, :0])

    def test_offset_groups_not_dividing_channels(self):
        self.check('G = 3, 4 input channels',
                   offset=numpy.zeros((2, 54, 6, 5), numpy.float32))

    def test_mask_shape_and_dtype(self):
        self.check(r'mask shape is \(2, 9, 6, 5\)', mask=self.mask[:, :9])
        self.check(r'mask shape is \(2, 18, 5, 5\)',
                   mask=self.mask[:, :, 1:])
        self.check(r'in_types\[3\].dtype == in_types\[0\].dtype',
                   mask=self.mask.astype(numpy.float64))
        self.check(r'in_types\[3\].ndim == 4', mask=self.mask[0])

    def test_dilation_and_groups_below_one(self):
        with pytest.raises(ValueError, match='dilate must be at least 1'):
            self.call(dilate=0)
        with pytest.raises(ValueError, match='dilate must be at least 1'):
            self.call(dilate=(1, -1))
        with pytest.raises(ValueError, match='groups must be at least 1'):
            self.call(groups=0)


testing.run_module(__name__, __file__)
