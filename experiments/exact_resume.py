"""Resuming ``train_mnist.py`` so that it repeats an unbroken run exactly.

A trainer snapshot of Chainer holds the weights, the optimizer and the
extensions' states. For a resumed run to make the same updates as one that
was never interrupted it needs more, which the extensions here keep in it:

* :class:`ProcessStates`: every process's random states (the training
  images are drawn from Python's ``random``, the shuffling from NumPy's)
  and its iterator's order;
* :class:`RunFlags`: the flags the run must share with the one that wrote
  the snapshot, so that a snapshot of another run is refused.

:func:`resume` loads a snapshot with both checks, and refuses one that has
trained as far as asked already, before anything is written.
"""

import pickle
import random
import zipfile
import zlib

import numpy

import chainer
from chainer import training

import snapshots


def process_seed(seed, rank):
    """The seed of process ``rank``: ``seed`` itself for rank 0, so that a
    single process trains as without ChainerMN; for the others one derived
    from both, different for each."""
    if rank == 0:
        return seed
    return int(numpy.random.SeedSequence([seed, rank]).generate_state(1)[0])


def _random_states(serializer):
    """(De)serializes Python's and NumPy's global random states."""
    version, words, gauss_next = random.getstate()
    _, keys, pos, has_gauss, cached_gaussian = numpy.random.get_state()
    words = serializer('python_words', numpy.array(words, numpy.uint32))
    gauss_next = serializer('python_gauss_next', numpy.nan
                            if gauss_next is None else gauss_next)
    keys = serializer('numpy_keys', keys)
    pos = serializer('numpy_pos', pos)
    has_gauss = serializer('numpy_has_gauss', has_gauss)
    cached_gaussian = serializer('numpy_cached_gaussian', cached_gaussian)
    if isinstance(serializer, chainer.serializer.Deserializer):
        random.setstate((version, tuple(int(w) for w in words),
                         None if numpy.isnan(gauss_next)
                         else float(gauss_next)))
        numpy.random.set_state(('MT19937', keys, int(pos), int(has_gauss),
                                float(cached_gaussian)))


class ProcessStates(training.Extension):
    """Carries each process's random states and training order in trainer
    snapshots.

    The training images are drawn from Python's ``random`` and the
    shuffling from NumPy's; each process has its own, and under ChainerMN
    its own share of the data in its own order. With these restored a run
    resumed from a snapshot makes the same updates as one that was never
    interrupted. Rank 0 alone writes snapshots, so at each snapshot the
    other processes send it their states.
    """

    # After every other extension (they may draw), before the snapshots
    # (-100); with the snapshots' trigger.
    priority = -50

    def __init__(self, iterator, comm=None):
        self._iterator = iterator
        self._comm = comm
        self._gathered = None

    def _serialize_own(self, serializer):
        self._iterator.serialize(serializer['iterator'])
        _random_states(serializer['random'])

    def _own(self):
        state = {}
        self._serialize_own(chainer.serializers.DictionarySerializer(state))
        return state

    def __call__(self, trainer):
        if self._comm is not None:
            self._gathered = self._comm.gather_obj(self._own())

    def serialize(self, serializer):
        if isinstance(serializer, chainer.serializer.Serializer):
            states = [self._own()] if self._comm is None else self._gathered
            for rank, state in enumerate(states):
                for key, value in state.items():
                    serializer['rank{}'.format(rank)](key, value)
        else:
            rank = 0 if self._comm is None else self._comm.rank
            self._serialize_own(serializer['rank{}'.format(rank)])


class FlagMismatch(Exception):
    pass


class RunFlags(training.Extension):
    """Keeps in trainer snapshots the flags that a run resumed from one must
    share with the run that wrote it; loading one written with other values
    raises :class:`FlagMismatch`, naming the flag."""

    trigger = None  # state only: never called
    # How each flag is named in messages.
    NAMES = {'deformable': '--deformable', 'batchsize': '--batchsize',
             'train_size': '--train-size', 'test_size': '--test-size',
             'processes': 'mpiexec -n', 'double_backprop': '--double-backprop'}
    # The values of flags that snapshots written before them did not keep.
    DEFAULTS = {'double_backprop': 0.0}

    def __init__(self, **flags):
        self.flags = flags

    def __call__(self, trainer):
        pass

    def serialize(self, serializer):
        for key, value in sorted(self.flags.items()):
            try:
                saved = type(value)(serializer(key, value))
            except KeyError:
                if key not in self.DEFAULTS:
                    raise
                saved = self.DEFAULTS[key]
            if saved != value:
                raise FlagMismatch(
                    'it was written by a run with {0} {1}, this one has {0} '
                    '{2}'.format(self.NAMES[key], saved, value))


def resume(trainer, path, flags, epochs):
    """Loads a trainer snapshot into ``trainer``, which is to train until
    ``epochs`` (``--epoch``); returns an error message (None on success).

    ``flags``, a :class:`RunFlags` of the trainer, are read first: a
    snapshot of a run with other flags is refused, naming the flag, before
    anything of it is loaded. So is a snapshot written at or after
    ``epochs``: Chainer's stop trigger would carry on to the next multiple
    of ``epochs`` without a word.
    """
    try:
        with snapshots.open_npz(path) as npz:
            chainer.serializers.NpzDeserializer(
                npz, path='extensions/{}/'.format(flags.name)).load(flags)
            chainer.serializers.NpzDeserializer(npz).load(trainer)
    except snapshots.UnsafeSnapshotError as e:
        return 'cannot resume: {}.'.format(e)
    except FlagMismatch as e:
        return 'cannot resume from {}: {}; resume with the same ' \
            'flags.'.format(path, e)
    except KeyError as e:
        return 'cannot resume from {}: not a trainer snapshot of ' \
            'train_mnist.py (snapshot_[non_]deformable_N or ' \
            'snapshot_modulated_N), or one written ' \
            'before it kept its flags ({}).'.format(path, e.args[0])
    except (ValueError, OSError, EOFError, pickle.UnpicklingError,
            zipfile.BadZipFile, zlib.error) as e:
        return 'cannot resume from {}: unreadable ({}): not a trainer ' \
            'snapshot, or a truncated or damaged one.'.format(path, e)
    done = trainer.updater.epoch
    if epochs <= done:
        return 'cannot resume from {0}: it was written after epoch {1}, ' \
            'and --epoch {2} is the epoch to end at, not a number of ' \
            'epochs to add: pass --epoch {3} or more to train on.'.format(
                path, done, epochs, done + 1)
    return None
