"""Loading ``.npz`` snapshots without running anything they carry, and the
experiment's convnets from them.

``chainer.serializers.load_npz`` opens files with ``allow_pickle=True``: an
object array in a snapshot is unpickled, and unpickling can run any code.
Snapshots of this project hold numbers and strings only, so every script
reads them through :func:`open_npz` here (or :func:`load_npz`), which
refuses a file holding an object array before Chainer reads any of it, and
then reads it with pickles refused as well.
"""

import contextlib
import os
import zipfile

import numpy

import chainer

from models import KINDS


class UnsafeSnapshotError(ValueError):
    """A snapshot holds an object (pickled) array."""


def pickled_members(path):
    """The names of the arrays in the ``.npz`` file ``path`` that hold
    pickled objects, read from their headers alone (no data is read).

    Raises:
        ValueError, OSError, zipfile.BadZipFile: ``path`` is not a readable
            ``.npz`` file.
    """
    pickled = []
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            with archive.open(info) as member:
                if _holds_objects(member):
                    pickled.append(info.filename[:-len('.npy')]
                                   if info.filename.endswith('.npy')
                                   else info.filename)
    return pickled


def _holds_objects(member):
    version = numpy.lib.format.read_magic(member)
    if version == (1, 0):
        _, _, dtype = numpy.lib.format.read_array_header_1_0(member)
    elif version == (2, 0):
        _, _, dtype = numpy.lib.format.read_array_header_2_0(member)
    else:
        # No public header reader: read the array, pickles refused.
        try:
            numpy.lib.format.read_array(member, allow_pickle=False)
        except ValueError:
            return True
        return False
    return dtype.hasobject


def refuse_pickles(path):
    """Raises :class:`UnsafeSnapshotError` if the ``.npz`` file ``path``
    holds object arrays (see :func:`pickled_members`)."""
    pickled = pickled_members(path)
    if pickled:
        raise UnsafeSnapshotError(
            '{} holds pickled Python objects ({}), which can run code when '
            'loaded; snapshots of this project hold none, so it is not '
            'loaded'.format(path, ', '.join(pickled[:3])
                            + (', ...' if len(pickled) > 3 else '')))


@contextlib.contextmanager
def open_npz(path):
    """The ``.npz`` file ``path``, opened for Chainer's ``NpzDeserializer``
    once :func:`refuse_pickles` has found no object array in it; read with
    pickles refused as well, so that nothing unpickles even if the file
    changed since the check. Open it once for several objects.

    Raises:
        UnsafeSnapshotError: The file holds object arrays (named in the
            message); nothing was loaded and nothing ran.
        ValueError, OSError, zipfile.BadZipFile: It is not a readable
            ``.npz`` file.
    """
    refuse_pickles(path)
    with numpy.load(path, allow_pickle=False) as npz:
        yield npz


def load_npz(path, obj, prefix=''):
    """``chainer.serializers.load_npz(path, obj, path=prefix)``, but a file
    holding object arrays is refused before anything of it is read
    (:func:`open_npz`).

    Raises:
        UnsafeSnapshotError: The file holds object arrays.
        KeyError, ValueError, OSError, zipfile.BadZipFile: As Chainer's
            ``load_npz`` for missing entries and unreadable files.
    """
    with open_npz(path) as npz:
        chainer.serializers.NpzDeserializer(npz, path=prefix).load(obj)


# Where trainer snapshots keep the predictor's parameters.
_TRAINER_PREFIX = 'updater/model:main/predictor/'


class SnapshotError(Exception):
    """A model snapshot that is missing, not one of the convnets', or of
    another kind than asked for."""


def load_model(path, deformable=None):
    """Loads a model snapshot (or a trainer snapshot) of any of the convnets.

    Args:
        path (str): ``model_iter_N``, ``non_deformable_N``,
            ``modulated_iter_N`` or ``snapshot_<kind>_N``.
        deformable (int or None): The kind expected (``--deformable``: 0,
            1 or 2); ``None`` takes the snapshot's kind.

    Raises:
        SnapshotError: The file is missing, not a snapshot of these models,
            or of another kind than ``deformable``.
    """
    if not os.path.isfile(path):
        raise SnapshotError('no such file: {}'.format(path))
    try:
        with open_npz(path) as npz:
            shapes = {name: npz[name].shape for name in npz.files}
            prefix, kind = _prefix_and_kind(path, shapes, deformable)
            model = kind.model_class(10)
            try:
                chainer.serializers.NpzDeserializer(npz, path=prefix).load(
                    model)
            except (KeyError, ValueError) as e:
                raise SnapshotError('cannot load {}: {}'.format(path, e))
    except UnsafeSnapshotError as e:
        raise SnapshotError(str(e))
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise SnapshotError('{} is not an .npz snapshot ({})'.format(path, e))
    return model


def _prefix_and_kind(path, shapes, deformable):
    """Where the convnet's parameters are in a snapshot whose arrays have
    ``shapes``, and which of :data:`KINDS` it is (checked against
    ``deformable`` unless None)."""
    if 'l1/W' in shapes:
        prefix = ''
    elif _TRAINER_PREFIX + 'l1/W' in shapes:
        prefix = _TRAINER_PREFIX
    else:
        raise SnapshotError(
            '{} is not a snapshot of the experiment\'s convnets (no l1/W); '
            'pass model_iter_N, non_deformable_N or modulated_iter_N (or a '
            'trainer snapshot) from train_mnist.py'.format(path))
    offset_conv = shapes.get(prefix + 'l2/offset_conv/W')
    if offset_conv is None:
        kind = KINDS[0]
    else:
        # 2 offsets per tap; DCNv2 adds a mask logit.
        kind = KINDS[2] if offset_conv[0] == 27 else KINDS[1]
    if deformable is not None and deformable != kind.flag:
        raise SnapshotError(
            '{} is a snapshot of the {} model; run with --deformable '
            '{}'.format(path, kind.label, kind.flag))
    return prefix, kind


def add_model_arguments(parser):
    """The ``--deformable`` and ``--resume`` flags of the scripts that read a
    trained convnet (for :func:`load_model`)."""
    parser.add_argument('--deformable', '-d', type=int, choices=(0, 1, 2),
                        default=1, help='kind of the --resume snapshot '
                        '(1: deformable, 0: regular, 2: modulated, DCNv2)')
    parser.add_argument('--resume', '-r', required=True,
                        help='model snapshot (result/model_iter_N, '
                        'result/non_deformable_N or result/modulated_iter_N; '
                        'a trainer snapshot works too)')
