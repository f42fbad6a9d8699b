"""The convnets of the scaled-MNIST experiment.

The regular and the deformable (DCNv1) convnet are the original's; the
modulated one swaps DCNv2's modulated deformable convolutions in.
"""

import functools

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


class ModulatedDeformableConvnet(Convnet):
    """:class:`Convnet` with modulated deformable (DCNv2) ``l2`` and ``l3``."""

    def _conv(self, in_channels, out_channels):
        return deformable.DeformableConvolution2D(
            in_channels, out_channels, 3, pad=1, modulated=True)


class DoubleBackpropClassifier(L.Classifier):
    """``chainer.links.Classifier`` trained with double backpropagation
    (Drucker and LeCun, 1992, on handwritten digits).

    In training, the loss gains ``penalty`` times the mean over the batch of
    ``||d loss_i / d x_i||^2``, the squared norm of each image's own loss's
    gradient w.r.t. the image, which asks for predictions that small
    changes of the input do not move. The term is reported as ``penalty``
    (``main/penalty``); ``loss`` stays the cross entropy. Evaluation (no
    backprop) computes no penalty. With ``penalty`` 0 it is
    ``L.Classifier``.
    """

    def __init__(self, predictor, penalty=0.0):
        # The cross entropy's gradient itself differentiable.
        super(DoubleBackpropClassifier, self).__init__(
            predictor, lossfun=functools.partial(
                F.softmax_cross_entropy, enable_double_backprop=True)
            if penalty else F.softmax_cross_entropy)
        self.penalty = penalty

    def forward(self, x, t):
        if not (self.penalty and chainer.config.train
                and chainer.config.enable_backprop):
            return super(DoubleBackpropClassifier, self).forward(x, t)
        x = chainer.Variable(x)   # an array from the updater
        loss = super(DoubleBackpropClassifier, self).forward(x, t)
        # loss is the batch's mean: row i of its gradient is d loss_i /
        # d x_i over the batch size.
        grad_x, = chainer.grad([loss], [x], enable_double_backprop=True)
        term = self.penalty * len(x) * F.sum(grad_x * grad_x)
        chainer.report({'penalty': term}, self)
        return loss + term


class Kind(object):
    """One kind of convnet: its class, ``--deformable`` value and the
    names ``train_mnist.py`` gives its snapshots."""

    def __init__(self, flag, model_class, label, model_prefix,
                 trainer_prefix):
        self.flag = flag
        self.model_class = model_class
        self.label = label
        self.model_prefix = model_prefix        # + epoch: the predictor
        self.trainer_prefix = trainer_prefix    # + epoch: the trainer


# By --deformable; the first two names are the original's.
KINDS = {
    0: Kind(0, Convnet, 'regular', 'non_deformable_',
            'snapshot_non_deformable_'),
    1: Kind(1, DeformableConvnet, 'deformable', 'model_iter_',
            'snapshot_deformable_'),
    2: Kind(2, ModulatedDeformableConvnet, 'modulated (DCNv2)',
            'modulated_iter_', 'snapshot_modulated_'),
}


def kind_of(model):
    """The :class:`Kind` of a convnet instance."""
    for kind in KINDS.values():
        if type(model) is kind.model_class:
            return kind
    raise TypeError('not a convnet of this experiment: {}'.format(
        type(model).__name__))
