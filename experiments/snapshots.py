"""Loading ``.npz`` snapshots without running anything they carry.

``chainer.serializers.load_npz`` opens files with ``allow_pickle=True``: an
object array in a snapshot is unpickled, and unpickling can run any code.
Snapshots of this project hold numbers and strings only, so every script
reads them through :func:`load_npz` here, which refuses a file holding an
object array before Chainer reads any of it, and then reads it with pickles
refused as well.
"""

import zipfile

import numpy

import chainer


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


def load_npz(path, obj, prefix=''):
    """``chainer.serializers.load_npz(path, obj, path=prefix)``, but a file
    holding object arrays is refused before anything of it is read.

    Raises:
        UnsafeSnapshotError: The file holds object arrays (named in the
            message); nothing was loaded and nothing ran.
        KeyError, ValueError, OSError, zipfile.BadZipFile: As Chainer's
            ``load_npz`` for missing entries and unreadable files.
    """
    refuse_pickles(path)
    # allow_pickle=False too: nothing unpickles even if the file changed
    # since the check.
    with numpy.load(path, allow_pickle=False) as npz:
        chainer.serializers.NpzDeserializer(npz, path=prefix).load(obj)
