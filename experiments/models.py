"""The two convnets of the scaled-MNIST experiment (as in the original)."""

import chainer
import chainer.functions as F
import chainer.links as L

import deformable


class Convnet(chainer.Chain):
    """Three 3x3 convolutions, a max pooling and a linear classifier.

    ``l1``: conv 1->32, ``l2``: conv 32->32, max pooling 4x4 stride 2 pad 1
    (28x28 -> 14x14), ``l3``: conv 32->32, ``fc``: linear 32*14*14 -> 10,
    ReLU after each convolution.

    Args:
        n_class (int): Number of classes.
    """

    def __init__(self, n_class=10):
        super(Convnet, self).__init__()
        with self.init_scope():
            self.l1 = L.Convolution2D(1, 32, 3, pad=1)
            self.l2 = self._conv(32, 32)
            self.l3 = self._conv(32, 32)
            self.fc = L.Linear(32 * 14 * 14, n_class)

    def _conv(self, in_channels, out_channels):
        return L.Convolution2D(in_channels, out_channels, 3, pad=1)

    def features(self, x):
        """Returns the intermediate activations, by name.

        ``'l1'`` and ``'pool'`` are the inputs of ``l2`` and ``l3`` (what
        their offset convolutions see); ``'l3'`` is the output of ``l3``
        before its ReLU.
        """
        h1 = F.relu(self.l1(x))
        h2 = F.relu(self.l2(h1))
        pool = F.max_pooling_2d(h2, 4, stride=2, pad=1)
        return {'l1': h1, 'l2': h2, 'pool': pool, 'l3': self.l3(pool)}

    def forward(self, x):
        return self.fc(F.relu(self.features(x)['l3']))


class DeformableConvnet(Convnet):
    """:class:`Convnet` with deformable ``l2`` and ``l3``."""

    def _conv(self, in_channels, out_channels):
        return deformable.DeformableConvolution2D(
            in_channels, out_channels, 3, pad=1)
