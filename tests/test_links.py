import os
import tempfile
import unittest

import numpy
import pytest

import chainer
from chainer import backend
import chainer.functions as F
from chainer import initializers
import chainer.links as L
from chainer import testing

import deformable

from helpers import BACKENDS


def to_cpu(array):
    return backend.CpuDevice().send(array)


@testing.inject_backend_tests(None, BACKENDS)
class TestDeformableConvolution2D(unittest.TestCase):

    def setUp(self):
        self.x = numpy.random.RandomState(0).uniform(
            -1, 1, (2, 3, 7, 6)).astype(numpy.float32)

    def test_fresh_link_is_plain_convolution(self, backend_config):
        link = deformable.DeformableConvolution2D(3, 4, 3, 1, 1)
        assert not link.offset_conv.W.array.any()
        assert not link.offset_conv.b.array.any()
        assert not link.deform_conv.b.array.any()
        assert link.deform_conv.W.array.std() > 0
        expected = F.convolution_2d(
            self.x, link.deform_conv.W, link.deform_conv.b, 1, 1).array
        link.to_device(backend_config.device)
        y = link(backend_config.device.send(self.x))
        numpy.testing.assert_allclose(to_cpu(y.array), expected,
                                      rtol=1e-5, atol=1e-5)

    def test_offset_conv_learns_from_the_first_step(self, backend_config):
        link = deformable.DeformableConvolution2D(3, 4, 3, 1, 1)
        link.to_device(backend_config.device)
        link.cleargrads()
        F.sum(link(backend_config.device.send(self.x)) ** 2).backward()
        assert abs(to_cpu(link.offset_conv.W.grad)).max() > 1e-3
        assert abs(to_cpu(link.deform_conv.W.grad)).max() > 1e-3

    def test_deferred_initialization(self, backend_config):
        link = deformable.DeformableConvolution2D(None, 5, (2, 3), 2, (1, 0))
        assert link.deform_conv.W.array is None
        link.to_device(backend_config.device)
        y = link(backend_config.device.send(self.x))
        assert y.shape == (2, 5, 4, 2)
        assert link.deform_conv.W.shape == (5, 3, 2, 3)
        assert link.offset_conv.W.shape == (12, 3, 2, 3)

    def test_load_chainer_link_snapshot(self, backend_config):
        # Chainer's link initializes the offset conv randomly, so the
        # loaded layer really deforms.
        theirs = L.DeformableConvolution2D(
            3, 4, 3, 1, 1, deform_initialW=initializers.Normal(0.5),
            offset_initialW=initializers.Normal(0.5))
        expected = theirs(self.x).array
        ours = deformable.DeformableConvolution2D(3, 4, 3, 1, 1)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, 'theirs.npz')
            chainer.serializers.save_npz(path, theirs)
            chainer.serializers.load_npz(path, ours)
        assert sorted(n for n, _ in ours.namedparams()) == sorted(
            n for n, _ in theirs.namedparams())
        ours.to_device(backend_config.device)
        y = ours(backend_config.device.send(self.x))
        assert abs(to_cpu(theirs.offset_conv(self.x).array)).max() > 0.1
        numpy.testing.assert_allclose(to_cpu(y.array), expected,
                                      rtol=1e-4, atol=1e-4)

    def test_save_load_and_copy_round_trip(self, backend_config):
        link = deformable.DeformableConvolution2D(
            3, 4, 3, 1, 1, offset_initialW=initializers.Normal(0.3))
        link.to_device(backend_config.device)
        x = backend_config.device.send(self.x)
        expected = to_cpu(link(x).array)
        clone = link.copy(mode='copy')
        numpy.testing.assert_array_equal(to_cpu(clone(x).array), expected)

        restored = deformable.DeformableConvolution2D(3, 4, 3, 1, 1)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, 'ours.npz')
            chainer.serializers.save_npz(path, link)
            chainer.serializers.load_npz(path, restored)
        restored.to_device(backend_config.device)
        numpy.testing.assert_array_equal(to_cpu(restored(x).array), expected)

        link.to_cpu()
        numpy.testing.assert_allclose(
            link(self.x).array, expected, rtol=1e-5, atol=1e-5)

    def test_options(self, backend_config):
        link = deformable.DeformableConvolution2D(
            3, 4, 3, offset_nobias=True, deform_nobias=True,
            deform_initialW=initializers.Constant(0.5),
            offset_initial_bias=None)
        assert link.offset_conv.b is None
        assert link.deform_conv.b is None
        assert (link.deform_conv.W.array == 0.5).all()
        link = deformable.DeformableConvolution2D(
            3, 4, 3, offset_initial_bias=initializers.Constant(0.25),
            deform_initial_bias=initializers.Constant(2.0))
        assert (link.offset_conv.b.array == 0.25).all()
        assert (link.deform_conv.b.array == 2.0).all()


@testing.inject_backend_tests(None, BACKENDS)
class TestGeneralDeformableConvolution2D(unittest.TestCase):
    """Dilation, groups, offset groups and DCNv2's modulation."""

    def setUp(self):
        self.x = numpy.random.RandomState(1).uniform(
            -1, 1, (2, 4, 9, 8)).astype(numpy.float32)

    def test_shapes(self, backend_config):
        link = deformable.DeformableConvolution2D(
            4, 6, 3, 1, 2, dilate=2, groups=2, offset_groups=4,
            modulated=True)
        assert link.offset_conv.W.shape == (3 * 4 * 9, 4, 3, 3)
        assert link.deform_conv.W.shape == (6, 2, 3, 3)
        link.to_device(backend_config.device)
        x = backend_config.device.send(self.x)
        offset, mask = link.offsets_and_mask(x)
        assert offset.shape == (2, 2 * 4 * 9, 9, 8)
        assert mask.shape == (2, 4 * 9, 9, 8)
        assert link(x).shape == (2, 6, 9, 8)

    def test_fresh_modulated_link_is_half_a_convolution(self, backend_config):
        link = deformable.DeformableConvolution2D(
            4, 6, 3, 1, 2, dilate=2, groups=2, offset_groups=2,
            modulated=True)
        W, b = link.deform_conv.W.array, link.deform_conv.b.array
        b[...] = 0.3
        expected = F.convolution_2d(self.x, W, b, 1, 2, dilate=2,
                                    groups=2).array
        expected -= 0.3
        link.to_device(backend_config.device)
        y = to_cpu(link(backend_config.device.send(self.x)).array)
        numpy.testing.assert_allclose(y - 0.3, 0.5 * expected,
                                      rtol=1e-5, atol=1e-5)

    def test_unmodulated_link_is_a_convolution(self, backend_config):
        link = deformable.DeformableConvolution2D(
            4, 6, (2, 3), 2, 1, dilate=(1, 2), groups=2, offset_groups=2)
        expected = F.convolution_2d(
            self.x, link.deform_conv.W, link.deform_conv.b, 2, 1,
            dilate=(1, 2), groups=2).array
        link.to_device(backend_config.device)
        y = link(backend_config.device.send(self.x))
        numpy.testing.assert_allclose(to_cpu(y.array), expected,
                                      rtol=1e-5, atol=1e-5)

    def test_modulated_offset_conv_learns_from_the_first_step(
            self, backend_config):
        link = deformable.DeformableConvolution2D(
            4, 6, 3, 1, 1, offset_groups=2, modulated=True)
        link.to_device(backend_config.device)
        link.cleargrads()
        F.sum(link(backend_config.device.send(self.x)) ** 2).backward()
        grad = to_cpu(link.offset_conv.W.grad)
        # Offsets and mask logits both get a gradient.
        assert abs(grad[:36]).max() > 1e-3
        assert abs(grad[36:]).max() > 1e-3

    def test_deferred_initialization_with_groups(self, backend_config):
        link = deformable.DeformableConvolution2D(
            None, 6, 3, 1, 1, groups=2, offset_groups=4, modulated=True)
        link.to_device(backend_config.device)
        y = link(backend_config.device.send(self.x))
        assert y.shape == (2, 6, 9, 8)
        assert link.deform_conv.W.shape == (6, 2, 3, 3)
        assert link.offset_conv.W.shape == (108, 4, 3, 3)

    def test_modulated_save_load(self, backend_config):
        link = deformable.DeformableConvolution2D(
            4, 6, 3, 1, 1, offset_groups=2, modulated=True,
            offset_initialW=initializers.Normal(0.3))
        expected = link(self.x).array
        restored = deformable.DeformableConvolution2D(
            4, 6, 3, 1, 1, offset_groups=2, modulated=True)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, 'ours.npz')
            chainer.serializers.save_npz(path, link)
            chainer.serializers.load_npz(path, restored)
        restored.to_device(backend_config.device)
        y = restored(backend_config.device.send(self.x))
        numpy.testing.assert_allclose(to_cpu(y.array), expected,
                                      rtol=1e-5, atol=1e-5)


class TestOffsetConvolution(unittest.TestCase):
    """On the CPU ``offset_conv`` computes with the sampler at zero offsets:
    the same convolution as ``F.convolution_2d``, and the same gradients."""

    def test_same_as_convolution_2d(self):
        x = numpy.random.RandomState(2).uniform(
            -1, 1, (2, 4, 9, 8)).astype(numpy.float64)
        with chainer.using_config('dtype', numpy.float64):
            link = deformable.DeformableConvolution2D(
                None, 6, (3, 2), (2, 1), (1, 2), dilate=(1, 2),
                offset_groups=2, modulated=True,
                offset_initialW=initializers.Normal(0.3),
                offset_initial_bias=initializers.Normal(0.3))
            link(x)   # initializes
        conv = link.offset_conv
        results = []
        for function in (conv, lambda v: F.convolution_2d(
                v, conv.W, conv.b, conv.stride, conv.pad,
                dilate=conv.dilate)):
            link.cleargrads()
            xv = chainer.Variable(x)
            y = function(xv)
            F.sum(y ** 2).backward()
            results.append((y.array, conv.W.grad.copy(), conv.b.grad.copy(),
                            xv.grad))
        for ours, reference in zip(*results):
            numpy.testing.assert_allclose(ours, reference, rtol=1e-12,
                                          atol=1e-12)


class _Calls(chainer.LinkHook):
    name = 'calls'

    def __init__(self):
        self.links = []

    def forward_preprocess(self, args):
        self.links.append(args.link)


@testing.inject_backend_tests(None, BACKENDS)
class TestLinkHooks(unittest.TestCase):

    def test_hooks_on_offset_conv_run(self, backend_config):
        link = deformable.DeformableConvolution2D(3, 4, 3, pad=1)
        link.to_device(backend_config.device)
        hook = _Calls()
        link.offset_conv.add_hook(hook)
        link(backend_config.device.send(
            numpy.zeros((1, 3, 5, 5), numpy.float32)))
        assert hook.links == [link.offset_conv]


class TestInitializers(unittest.TestCase):

    def test_arrays_scalars_and_initializers(self):
        W = numpy.arange(4 * 3 * 9, dtype=numpy.float32).reshape(4, 3, 3, 3)
        link = deformable.DeformableConvolution2D(
            None, 4, 3, deform_initialW=W, deform_initial_bias=0.5,
            offset_initialW=initializers.Constant(0.25),
            offset_initial_bias=numpy.full(18, 2, numpy.float32))
        link(numpy.zeros((1, 3, 5, 5), numpy.float32))   # deferred init
        numpy.testing.assert_array_equal(link.deform_conv.W.array, W)
        assert (link.deform_conv.b.array == 0.5).all()
        assert (link.offset_conv.W.array == 0.25).all()
        assert (link.offset_conv.b.array == 2).all()
        default = deformable.DeformableConvolution2D(3, 4, 3)
        assert default.deform_conv.W.array.std() > 0
        assert not default.deform_conv.b.array.any()


class TestGeneralBadArguments(unittest.TestCase):

    def test_offset_groups(self):
        with pytest.raises(ValueError, match='offset_groups=3 does not'):
            deformable.DeformableConvolution2D(4, 6, 3, offset_groups=3)
        with pytest.raises(ValueError, match='offset_groups must be'):
            deformable.DeformableConvolution2D(4, 6, 3, offset_groups=0)

    def test_groups_at_deferred_initialization(self):
        link = deformable.DeformableConvolution2D(None, 6, 3, groups=4)
        with pytest.raises(ValueError, match='groups=4 does not divide'):
            link(numpy.zeros((1, 6, 5, 5), numpy.float32))


testing.run_module(__name__, __file__)
