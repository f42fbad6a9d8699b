"""Whether a script can write where it is told to, checked before any work:
otherwise a run finds out at its first snapshot, an epoch later."""

import os
import tempfile


def directory_problem(path, flag='--out'):
    """Why ``path`` (given as ``flag``) is not a directory this process can
    write in, nor one it can create; None if it is or can be.

    Permission bits do not tell (root ignores them, and some file systems
    refuse everyone), so this tries: it makes an empty directory in ``path``,
    or in its nearest existing ancestor, and removes it at once. Nothing else
    is created.
    """
    problem = _directory_problem(path)
    return problem and '{}: {}'.format(flag, problem)


def file_problem(path, flag='--out'):
    """Why the file ``path`` (given as ``flag``) cannot be written, or made,
    checking its directory as :func:`directory_problem` does; None if it
    can."""
    if os.path.isdir(path) or not os.path.basename(path):
        return '{}: {} is a directory; name a file'.format(flag, path)
    return directory_problem(os.path.dirname(path) or os.curdir, flag)


def _directory_problem(path):
    whole = os.path.abspath(path)
    existing = whole
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        kind = ('is a file, not a directory' if os.path.isfile(existing)
                else 'is not a directory')
        if existing == whole:
            return '{} {}'.format(path, kind)
        return 'cannot make {}: {} {}'.format(path, existing, kind)
    try:
        probe = tempfile.mkdtemp(prefix='.write-check-', dir=existing)
    except OSError as e:
        if existing == whole:
            return 'cannot write in {} ({})'.format(path, e.strerror)
        return 'cannot make {} in {} ({})'.format(path, existing, e.strerror)
    os.rmdir(probe)
    return None
