"""Scaled MNIST: digits shrunk by a random factor in [1, 3] at a random place.

Each 28x28 digit is put at a random position on a zero canvas ``r`` times
larger, ``r ~ U[1, max_ratio]`` (:func:`chainercv.transforms.random_expand`),
and the canvas is resized back to 28x28 (:func:`chainercv.transforms.resize`).

Training images are re-drawn on every access, as in the original. Test
images are drawn once per index: the same index always gives the same image
(within an environment: ChainerCV resizes with OpenCV when it is installed,
else with PIL), so accuracies of different runs are comparable. The
original re-drew test images at every evaluation.
"""

import random

import numpy

import chainer
from chainercv import transforms

import mnist_data


MAX_RATIO = 3
# Seed of the test set's draws; changing it changes the test set.
TEST_SEED = 0


def scale(img, max_ratio=MAX_RATIO):
    """Shrinks a CHW image by a random factor at a random place, same size.

    ``random_expand`` draws from Python's :mod:`random` module; seed it to
    repeat a draw.
    """
    size = img.shape[1:]
    img = transforms.random_expand(img, max_ratio=max_ratio)
    return transforms.resize(img, size)


class RandomScale(object):
    """``(img, label) -> (scaled img, label)`` drawn anew on every call."""

    def __init__(self, max_ratio=MAX_RATIO):
        self.max_ratio = max_ratio

    def __call__(self, in_data):
        img, label = in_data
        return scale(img, self.max_ratio), label


class SeededScale(object):
    """``(img, label, index) -> (scaled img, label)``, the same per index.

    Python's global random state is restored afterwards, so the training
    draws are not disturbed. Swapping that state is not thread-safe: use
    the serial or the multiprocess iterator, not the multithread one.
    """

    def __init__(self, seed=TEST_SEED, max_ratio=MAX_RATIO):
        self.seed = seed
        self.max_ratio = max_ratio

    def __call__(self, in_data):
        img, label, index = in_data
        state = random.getstate()
        try:
            random.seed((int(self.seed) << 32) + int(index))
            img = scale(img, self.max_ratio)
        finally:
            random.setstate(state)
        return img, label


def _first(dataset, size):
    if size is None:
        return dataset
    if not 0 < size <= len(dataset):
        raise ValueError('size must be in [1, {}], got {}'.format(
            len(dataset), size))
    return chainer.datasets.SubDataset(dataset, 0, size)


def with_index(dataset):
    """``(img, label)`` examples -> ``(img, label, index)``."""
    images, labels = chainer.dataset.concat_examples(dataset[:])
    return chainer.datasets.TupleDataset(
        images, labels, numpy.arange(len(dataset), dtype=numpy.int64))


def get_scaled_mnist(mnist_dir=None, train_size=None, test_size=None,
                     verify=None, test_seed=TEST_SEED, max_ratio=MAX_RATIO,
                     **kwargs):
    """Scaled MNIST: ``(train, test)`` transform datasets.

    Args:
        mnist_dir (str or None): See :func:`mnist_data.load_mnist`.
        train_size, test_size (int or None): Use the first N examples.
        verify (bool or None): See :func:`mnist_data.load_mnist`.
        test_seed (int): Seed of the test set's draws.
        max_ratio (float): Largest shrinking factor.
        kwargs: Passed to :func:`mnist_data.load_mnist`.

    Returns:
        Two :class:`chainer.datasets.TransformDataset` of ``(img, label)``,
        ``img`` float32 of shape ``(1, 28, 28)`` in ``[0, 1]``, ``label``
        int32.
    """
    train, test = mnist_data.load_mnist(mnist_dir, verify=verify, **kwargs)
    return scale_datasets(train, test, train_size, test_size, test_seed,
                          max_ratio)


def scale_datasets(train, test, train_size=None, test_size=None,
                   test_seed=TEST_SEED, max_ratio=MAX_RATIO):
    """Scaled MNIST from MNIST's ``(train, test)`` (``(img, label)`` each).

    See :func:`get_scaled_mnist`.
    """
    train = _first(train, train_size)
    # Index before taking the first N, so an index names one image whatever
    # the test size.
    test = _first(with_index(test), test_size)
    return (chainer.datasets.TransformDataset(train, RandomScale(max_ratio)),
            chainer.datasets.TransformDataset(
                test, SeededScale(test_seed, max_ratio)))
