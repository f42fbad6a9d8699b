"""Another copy of the ``deformable`` package, loaded beside this one.

For same-process A/B timing (``bench_sampler.py --baseline DIR``): make a
copy of an older commit, e.g. ``git worktree add /tmp/before HEAD~3``, and
load it with :class:`Baseline`. Both copies are named ``deformable``, and
each imports its own modules by that name, some of them lazily (at call
time), so the baseline's modules stand in ``sys.modules`` only while one
of its calls runs (:meth:`Baseline.active`); everything else sees this
copy.
"""

import contextlib
import importlib
import os
import pkgutil
import sys


def _ours(name):
    return name == 'deformable' or name.startswith('deformable.')


def _take_modules():
    return {name: sys.modules.pop(name) for name in list(sys.modules)
            if _ours(name)}


class Baseline(object):
    """The ``deformable`` package under ``directory`` (its parent folder
    holding ``deformable/``), every module of it imported."""

    def __init__(self, directory):
        package_dir = os.path.join(directory, 'deformable')
        if not os.path.isfile(os.path.join(package_dir, '__init__.py')):
            raise ValueError('no deformable package in {}'.format(directory))
        current = _take_modules()
        sys.path.insert(0, os.path.abspath(directory))
        try:
            self.package = importlib.import_module('deformable')
            for module in pkgutil.walk_packages(self.package.__path__,
                                                'deformable.'):
                try:
                    importlib.import_module(module.name)
                except ImportError:   # e.g. its Numba loops without Numba
                    pass
            self.modules = _take_modules()
        finally:
            sys.path.remove(os.path.abspath(directory))
            sys.modules.update(current)

    @contextlib.contextmanager
    def active(self):
        """The baseline's modules are the ``deformable`` ones meanwhile."""
        current = _take_modules()
        sys.modules.update(self.modules)
        try:
            yield self.package
        finally:
            _take_modules()
            sys.modules.update(current)

    def wrap(self, step):
        """``step``, run with the baseline active."""
        def run(*args, **kwargs):
            with self.active():
                return step(*args, **kwargs)
        return run
