import sys
import unittest
from unittest import mock

import numpy
import pytest

import chainer
from chainer import backend
import chainer.functions as F
from chainer import testing
from chainer.utils import type_check

import deformable
from deformable import backends
from deformable import functions
from deformable import tuning

import helpers
from helpers import forward_backward
from helpers import make_inputs
from helpers import random_offset
from helpers import relative_error
import naive


@helpers.parameterize_backends(*helpers.DCNV1_GRID)
class TestSamplerGradients(testing.FunctionTestCase):
    """Forward against the loop reference, and check_backward, on a grid
    (a rectangular input, batch 1-3)."""

    def setUp(self):
        self.rng = numpy.random.RandomState(
            sum(self.ksize + self.stride + self.pad))
        if self.dtype == numpy.float16:
            self.check_forward_options = {'atol': 5e-2, 'rtol': 5e-2}
            self.check_backward_options = {'atol': 5e-1, 'rtol': 1e-1}
        elif self.dtype == numpy.float32:
            self.check_forward_options = {'atol': 1e-5, 'rtol': 1e-5}
            self.check_backward_options = {'atol': 1e-3, 'rtol': 1e-3}
        else:
            self.check_forward_options = {'atol': 1e-12, 'rtol': 1e-12}
            self.check_backward_options = {'atol': 1e-7, 'rtol': 1e-7}
        self.check_double_backward_options = self.check_backward_options

    def generate_inputs(self):
        return make_inputs(self.n, 2, 3, 6, 7, self.ksize, self.stride,
                           self.pad, self.dtype, self.rng, nobias=self.nobias)

    def forward(self, inputs, device):
        return deformable.deformable_convolution_2d_sampler(
            *inputs, stride=self.stride, pad=self.pad),

    def forward_expected(self, inputs):
        inputs = [a.astype(numpy.float64) for a in inputs]
        y = naive.forward(*inputs, stride=self.stride, pad=self.pad)
        return y.astype(self.dtype),


@helpers.parameterize_backends(*testing.product({
    'seed': list(range(12)), 'cpu_loops': helpers.CPU_LOOPS}))
class TestAgreementWithChainer(unittest.TestCase):
    """Values and all four gradients equal Chainer's built-in, float64, on
    random shapes and offsets.

    Ours runs on the backend under test; the reference on the CPU.
    """

    def test_agreement(self, backend_config):
        rng = numpy.random.RandomState(self.seed)
        ksize = tuple(rng.randint(1, 4, size=2))
        stride = tuple(rng.randint(1, 4, size=2))
        pad = tuple(rng.randint(0, 3, size=2))
        h, w = rng.randint(max(ksize), 9, size=2)
        inputs = make_inputs(rng.randint(1, 4), rng.randint(1, 5),
                             rng.randint(1, 5), h, w, ksize, stride, pad,
                             numpy.float64, rng, spread=max(h, w) + 2)
        gy = rng.uniform(-1, 1, (inputs[0].shape[0], inputs[2].shape[0],
                                 inputs[1].shape[2], inputs[1].shape[3]))
        device = backend_config.device
        y, grads = forward_backward(
            deformable.deformable_convolution_2d_sampler,
            device.send(inputs), device.send(gy), stride, pad)
        y_ref, grads_ref = forward_backward(
            F.deformable_convolution_2d_sampler, inputs, gy, stride, pad)
        assert relative_error(y, y_ref) < 1e-10
        for name, g, g_ref in zip('x offset W b'.split(), grads, grads_ref):
            assert relative_error(g, g_ref) < 1e-10, name


@helpers.parameterize_backends(
    *testing.product({'cpu_loops': helpers.CPU_LOOPS}))
class TestExactCases(unittest.TestCase):

    def setUp(self):
        rng = numpy.random.RandomState(0)
        self.x = rng.uniform(-1, 1, (2, 3, 6, 5))
        self.W = rng.uniform(-1, 1, (4, 3, 3, 3))
        self.b = rng.uniform(-1, 1, (4,))
        self.rng = rng

    def run_sampler(self, device, offset, stride=1, pad=1):
        x, offset, W, b = device.send((self.x, offset, self.W, self.b))
        y = deformable.deformable_convolution_2d_sampler(
            x, offset, W, b, stride, pad)
        return backend.CpuDevice().send(y.array)

    def test_zero_offset_is_convolution(self, backend_config):
        for stride, pad in [(1, 1), (2, 0), ((1, 2), (2, 1))]:
            y_conv = F.convolution_2d(self.x, self.W, self.b, stride, pad)
            offset = numpy.zeros((2, 18) + y_conv.shape[2:])
            y = self.run_sampler(backend_config.device, offset, stride, pad)
            numpy.testing.assert_allclose(y, y_conv.array, rtol=0, atol=1e-13)

    def test_integer_offset_is_shifted_convolution(self, backend_config):
        # Every tap shifted by (dy, dx) is the plain convolution moved by
        # (dy, dx) on an input zero-extended far enough to contain it.
        h, w = self.x.shape[2:]
        for dy, dx in [(1, 0), (-2, 1), (0, -3), (7, 7)]:
            margin = max(abs(dy), abs(dx))
            y_wide = F.convolution_2d(
                self.x, self.W, self.b, 1, 1 + margin).array
            y_conv = y_wide[:, :, margin + dy:margin + dy + h,
                            margin + dx:margin + dx + w]
            offset = numpy.zeros((2, 18, h, w))
            offset[:, :9] = dx
            offset[:, 9:] = dy
            y = self.run_sampler(backend_config.device, offset)
            numpy.testing.assert_allclose(y, y_conv, rtol=0, atol=1e-13)

    def test_integer_offset_gradient_is_forward_difference(
            self, backend_config):
        offset = self.rng.randint(-3, 4, size=(2, 18, 6, 5)).astype(
            numpy.float64)
        gy = self.rng.uniform(-1, 1, (2, 4, 6, 5))
        x, offset_d, W, b, gy_d = backend_config.device.send(
            (self.x, offset, self.W, self.b, gy))
        offset_v = chainer.Variable(offset_d)
        y = deformable.deformable_convolution_2d_sampler(
            x, offset_v, W, b, 1, 1)
        y.grad = gy_d
        y.backward()
        expected = naive.offset_grad(self.x, offset, self.W, gy,
                                     (1, 1), (1, 1))
        numpy.testing.assert_allclose(
            backend.CpuDevice().send(offset_v.grad), expected,
            rtol=0, atol=1e-12)

    def test_non_finite_offsets(self, backend_config):
        offset = random_offset((2, 18, 6, 5), 2, self.rng)
        offset[0, 3, 1, 2] = numpy.inf
        offset[0, 12, 4, 4] = -numpy.inf
        offset[1, 0, 0, 0] = 1e30
        offset[1, 17, 5, 1] = -1e10
        y = self.run_sampler(backend_config.device, offset)
        assert numpy.isfinite(y).all()
        y_ref = F.deformable_convolution_2d_sampler(
            self.x, offset, self.W, self.b, 1, 1).array
        numpy.testing.assert_allclose(y, y_ref, rtol=0, atol=1e-12)

        offset[1, 4, 2, 3] = numpy.nan
        offset[0, 10, 0, 4] = numpy.nan
        y = self.run_sampler(backend_config.device, offset)
        y_ref = F.deformable_convolution_2d_sampler(
            self.x, offset, self.W, self.b, 1, 1).array
        numpy.testing.assert_array_equal(numpy.isnan(y), numpy.isnan(y_ref))
        # All output channels at exactly those two output pixels.
        assert numpy.isnan(y).sum() == 2 * self.W.shape[0]

    def test_nan_offset_leaves_input_gradient_finite(self, backend_config):
        # A NaN sample has no place in the image, so it adds nothing to the
        # gradient of x; NaN stays in its own offset gradient.
        offset = random_offset((2, 18, 6, 5), 2, self.rng)
        offset[1, 4, 2, 3] = numpy.nan
        variables = [chainer.Variable(a) for a in backend_config.device.send(
            (self.x, offset, self.W, self.b))]
        y = deformable.deformable_convolution_2d_sampler(*variables, 1, 1)
        F.sum(y).backward()
        gx = backend.CpuDevice().send(variables[0].grad)
        assert numpy.isfinite(gx).all()
        nan_at = numpy.argwhere(numpy.isnan(
            backend.CpuDevice().send(variables[1].grad)))
        assert [tuple(i) for i in nan_at] == [(1, 13, 2, 3)]

    def test_gradients_finite_for_infinite_offsets(self, backend_config):
        offset = random_offset((2, 18, 6, 5), 2, self.rng)
        offset[:, ::4] = numpy.inf
        offset[:, 1::4] = -1e30
        variables = [chainer.Variable(a) for a in backend_config.device.send(
            (self.x, offset, self.W, self.b))]
        y = deformable.deformable_convolution_2d_sampler(*variables, 1, 1)
        F.sum(y).backward()
        for v in variables:
            assert numpy.isfinite(backend.CpuDevice().send(v.grad)).all()
        goffset = backend.CpuDevice().send(variables[1].grad)
        assert (goffset[:, ::4] == 0).all()

    def test_collapsed_offsets(self, backend_config):
        # Every sample on the same point: the scatter's worst case.
        offset = numpy.zeros((2, 18, 6, 5))
        grid_y = numpy.arange(6)[:, None] - 1 + numpy.repeat(
            numpy.arange(3), 3)[:, None, None]
        grid_x = numpy.arange(5)[None, :] - 1 + numpy.tile(
            numpy.arange(3), 3)[:, None, None]
        offset[:, 9:] = 2.25 - grid_y
        offset[:, :9] = 1.5 - grid_x
        inputs = (self.x, offset, self.W, self.b)
        gy = self.rng.uniform(-1, 1, (2, 4, 6, 5))
        y, grads = forward_backward(
            deformable.deformable_convolution_2d_sampler,
            backend_config.device.send(inputs),
            backend_config.device.send(gy), 1, 1)
        y_ref, grads_ref = forward_backward(
            F.deformable_convolution_2d_sampler, inputs, gy, 1, 1)
        assert relative_error(y, y_ref) < 1e-10
        for g, g_ref in zip(grads, grads_ref):
            assert relative_error(g, g_ref) < 1e-10


@testing.parameterize(*testing.product({'cpu_loops': helpers.CPU_LOOPS}))
class TestScatterMultiplicity(unittest.TestCase):
    """Groups of 1 to 16 samples landing on one point, for every size."""

    def test_gradients(self):
        rng = numpy.random.RandomState(5)
        h = w = 12
        x = rng.uniform(-1, 1, (1, 2, h, w))
        W = rng.uniform(-1, 1, (3, 2, 1, 1))
        group = numpy.repeat(numpy.arange(17), numpy.r_[1:17, 8])
        target_y = 0.3 + 2 * (group // 4) + rng.uniform(0, 0.4, group.size)
        target_x = 0.6 + 2 * (group % 4) + rng.uniform(0, 0.3, group.size)
        grid_y, grid_x = numpy.mgrid[:h, :w]
        offset = numpy.stack([target_x - grid_x.ravel(),
                              target_y - grid_y.ravel()]).reshape(1, 2, h, w)
        gy = rng.uniform(-1, 1, (1, 3, h, w))
        y, grads = forward_backward(
            deformable.deformable_convolution_2d_sampler,
            (x, offset, W), gy, 1, 0)
        y_ref, grads_ref = forward_backward(
            F.deformable_convolution_2d_sampler, (x, offset, W), gy, 1, 0)
        assert relative_error(y, y_ref) < 1e-10
        for g, g_ref in zip(grads, grads_ref):
            assert relative_error(g, g_ref) < 1e-10


@testing.parameterize(*testing.product({'cpu_loops': helpers.CPU_LOOPS}))
class TestDeterministicAndBlocked(unittest.TestCase):
    """Bit-identical gradients from run to run, whatever the threads do;
    and the same results however the batch is cut into blocks."""

    def setUp(self):
        rng = numpy.random.RandomState(6)
        # Collapsed offsets: many samples scatter onto the same pixels.
        x, offset, W, b = make_inputs(7, 8, 6, 9, 8, (3, 3), (1, 1),
                                      (1, 1), numpy.float32, rng, spread=2)
        offset[:, :, 3:6] = offset[:, :, 4:5]
        self.inputs = (x, offset, W, b)
        self.gy = rng.uniform(-1, 1, (7, 6, 9, 8)).astype(numpy.float32)
        self.mask = rng.uniform(0, 1, (7, 9, 9, 8)).astype(numpy.float32)

    def run_op(self, **kwargs):
        _, grads = forward_backward(
            lambda *v, **p: deformable.deformable_convolution_2d_sampler(
                *v, mask=self.mask, **p),
            self.inputs, self.gy, 1, 1)
        return grads

    def test_two_backward_runs_are_bit_identical(self):
        first = self.run_op()
        for _ in range(3):
            for a, b in zip(first, self.run_op()):
                numpy.testing.assert_array_equal(a, b)

    def test_constant_offsets_skip_their_gradient_only(self):
        # An offset that is no Variable needs no gradient, which the CPU
        # path then skips; the other gradients are those of a full run.
        x, offset, W, b = self.inputs
        variables = [chainer.Variable(a) for a in (x, W, b)]
        y = deformable.deformable_convolution_2d_sampler(
            variables[0], offset, variables[1], variables[2], 1, 1,
            mask=self.mask)
        y.grad = self.gy
        y.backward()
        full = self.run_op()
        for v, expected in zip(variables, (full[0], full[2], full[3])):
            numpy.testing.assert_array_equal(v.grad, expected)

    def test_blocks_do_not_change_results(self):
        with mock.patch.multiple(tuning, BLOCK_BYTES=1, NUMPY_BLOCK_BYTES=1):
            blocked = self.run_op()     # a row (Numba) or image at a time
        with mock.patch.multiple(tuning, BLOCK_BYTES=2 ** 30,
                                 NUMPY_BLOCK_BYTES=2 ** 30):
            whole = self.run_op()       # all at once
        for a, b in zip(blocked, whole):
            numpy.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


class TestGradNodeWithoutCache(unittest.TestCase):

    # The NumPy loops keep the forward's columns.
    cpu_loops = 'numpy'

    def test_kept_columns_give_the_recomputed_gradients(self):
        # A gradient node without the forward's columns recomputes them,
        # to the same bits.
        rng = numpy.random.RandomState(3)
        x, offset, W = make_inputs(2, 3, 4, 5, 6, (3, 2), (1, 2), (1, 0),
                                   numpy.float64, rng, nobias=True)
        gy = rng.uniform(-1, 1, (2, 4, 5, 3))
        node = functions.DeformableConvolution2DFunction((1, 2), (1, 0))
        node.apply((x, offset, W))
        assert len(node._kept) == 1
        needed = functions.DeformableConvolution2DGradFunction.GRADIENTS[:3]
        kept = functions.DeformableConvolution2DGradFunction(
            node.hyperparameters, needed, node._kept).apply(
                (x, offset, W, gy))
        recomputed = functions.DeformableConvolution2DGradFunction(
            node.hyperparameters, needed).apply((x, offset, W, gy))
        for a, b in zip(kept, recomputed):
            numpy.testing.assert_array_equal(a.array, b.array)


class TestBadInput(unittest.TestCase):

    def setUp(self):
        self.x = numpy.zeros((2, 3, 6, 5), numpy.float32)
        self.offset = numpy.zeros((2, 18, 6, 5), numpy.float32)
        self.W = numpy.zeros((4, 3, 3, 3), numpy.float32)
        self.b = numpy.zeros((4,), numpy.float32)

    def check(self, message, x=None, offset=None, W=None, b=None,
              stride=1, pad=1):
        x = self.x if x is None else x
        offset = self.offset if offset is None else offset
        W = self.W if W is None else W
        b = self.b if b is None else b
        with pytest.raises(type_check.InvalidType, match=message):
            deformable.deformable_convolution_2d_sampler(
                x, offset, W, b, stride, pad)

    def test_wrong_ndim(self):
        self.check(r'in_types\[0\].ndim == 4', x=self.x[0])
        self.check(r'in_types\[1\].ndim == 4', offset=self.offset[0])
        self.check(r'in_types\[2\].ndim == 4', W=self.W[0])
        self.check(r'in_types\[3\].ndim == 1', b=self.b[None])

    def test_mismatched_dtypes(self):
        self.check(r'in_types\[1\].dtype == in_types\[0\].dtype',
                   offset=self.offset.astype(numpy.float64))
        self.check(r'in_types\[2\].dtype == in_types\[0\].dtype',
                   W=self.W.astype(numpy.float64))
        self.check(r'in_types\[3\].dtype == in_types\[0\].dtype',
                   b=self.b.astype(numpy.float64))
        self.check(r'in_types\[0\].dtype.kind == f',
                   x=self.x.astype(numpy.int32))

    def test_channel_mismatch(self):
        self.check(r'in_types\[0\].shape\[1\] == in_types\[2\].shape\[1\]',
                   W=numpy.zeros((4, 2, 3, 3), numpy.float32))
        self.check(r'in_types\[3\].shape\[0\] == in_types\[2\].shape\[0\]',
                   b=numpy.zeros((5,), numpy.float32))

    def test_offset_channels(self):
        self.check('offset has 17 channels', offset=self.offset[:, 1:])

    def test_offset_batch(self):
        self.check(r'in_types\[1\].shape\[0\] == in_types\[0\].shape\[0\]',
                   offset=self.offset[:1])

    def test_offset_spatial_size(self):
        self.check("offset's size == the output's = 6x5\n"
                   "Actual: offset's size is 5x5",
                   offset=self.offset[:, :, 1:])
        self.check("offset's size == the output's = 6x3\n"
                   "Actual: offset's size is 6x5",
                   offset=self.offset, stride=(1, 2))

    def test_output_size_below_one(self):
        x = numpy.zeros((2, 3, 2, 2), numpy.float32)
        offset = numpy.zeros((2, 18, 0, 0), numpy.float32)
        self.check('output size is 0x0', x=x, offset=offset, pad=0)
        # Named even when the offsets' size would not match it.
        self.check('output size is 0x0', x=x, pad=0)

    def test_bad_stride_and_pad(self):
        with pytest.raises(ValueError, match='stride'):
            deformable.deformable_convolution_2d_sampler(
                self.x, self.offset, self.W, stride=0)
        with pytest.raises(ValueError, match='pad'):
            deformable.deformable_convolution_2d_sampler(
                self.x, self.offset, self.W, pad=-1)


class TestCpuKernelSwitch(unittest.TestCase):

    def test_bad_mode(self):
        with chainer.using_config('deformable_use_numba', 'yes'):
            with pytest.raises(ValueError, match="'auto', 'never' or"):
                backends.cpu_backend()

    def test_always_without_numba(self):
        # A None entry in sys.modules makes the import fail.
        with mock.patch.dict(sys.modules, {
                'numba': None, 'deformable.backends.numba_loops': None}):
            with chainer.using_config('deformable_use_numba', 'always'):
                with pytest.raises(ImportError, match='pip install numba'):
                    backends.cpu_backend()
            with chainer.using_config('deformable_use_numba', 'auto'):
                assert backends.cpu_backend().name == 'numpy'


testing.run_module(__name__, __file__)
