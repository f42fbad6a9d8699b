"""Checking and normalizing the hyperparameters of a convolution."""

import collections
import numbers


def int_pair(value, name, minimum):
    """``value`` (an int or a pair of ints) as a pair of ints.

    Raises:
        TypeError: ``value`` is neither, e.g. ``1.5`` or ``'2'`` (as
            :func:`chainer.functions.convolution_2d` refuses them).
        ValueError: An element is below ``minimum``.
    """
    pair = (value, value) if _is_int(value) else value
    if (isinstance(pair, (str, bytes)) or not hasattr(pair, '__len__')
            or len(pair) != 2 or not all(_is_int(v) for v in pair)):
        raise TypeError('{} must be an int or a pair of ints, got {!r}'.format(
            name, value))
    pair = tuple(int(v) for v in pair)
    if min(pair) < minimum:
        raise ValueError('{} must be at least {}, got {!r}'.format(
            name, minimum, value))
    return pair


def positive_int(value, name):
    """``value``, an int of at least 1 (see :func:`int_pair`)."""
    if not _is_int(value):
        raise TypeError('{} must be an int, got {!r}'.format(name, value))
    if value < 1:
        raise ValueError('{} must be at least 1, got {!r}'.format(
            name, value))
    return int(value)


def _is_int(value):
    # bool is an int to Python, never a size.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


class Hyperparameters(collections.namedtuple(
        'Hyperparameters', 'stride pad dilate groups')):
    """A convolution's ``stride``, ``pad``, ``dilate`` (pairs of ints) and
    ``groups``, as every backend takes them."""

    @classmethod
    def checked(cls, stride=1, pad=0, dilate=1, groups=1):
        """The hyperparameters, each checked (see :func:`int_pair`)."""
        return cls(int_pair(stride, 'stride', 1), int_pair(pad, 'pad', 0),
                   int_pair(dilate, 'dilate', 1),
                   positive_int(groups, 'groups'))
