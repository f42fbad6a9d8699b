"""Deformable convolution for Chainer (Dai et al., 2017)."""

from deformable.functions import deformable_convolution_2d_sampler  # NOQA
from deformable.functions import DeformableConvolution2DFunction  # NOQA
from deformable.functions import DeformableConvolution2DGradFunction  # NOQA
from deformable.links import DeformableConvolution2D  # NOQA

__version__ = '0.1.0'
