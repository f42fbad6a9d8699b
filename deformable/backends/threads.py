"""The CPU path's threads: a pool, each thread's buffers, and BLAS's limit.

The compiled loops run blocks on every core, each block in one thread from
gathering to writing its output, with BLAS held to one thread meanwhile so
that the two kinds of threads never compete for the cores (and so that
BLAS's products, and the results, are the same for any number of threads).
Holding BLAS to one thread is process-wide state (threadpoolctl), so one
call at a time runs its work (:data:`_calls`): callers from several Python
threads then never undo each other's limit, and each call's result is the
one it gives alone.
"""

import concurrent.futures
import contextlib
import itertools
import math
import os
import threading

import numpy

from deformable import tuning


ENV_THREADS = 'DEFORMABLE_NUM_THREADS'

_pool = None          # (threads, ThreadPoolExecutor)
_blas = None          # threadpoolctl's controller, or False without it
_calls = threading.Lock()


def n_workers():
    """Threads the compiled loops use: ``DEFORMABLE_NUM_THREADS`` if set,
    else one per core this process may use."""
    value = os.environ.get(ENV_THREADS, '').strip()
    if value:
        try:
            workers = int(value)
        except ValueError:
            workers = 0
        if workers < 1:
            raise ValueError(
                '{}={!r}: must be a positive integer (the number of threads '
                'of the CPU loops), or unset for one per core'.format(
                    ENV_THREADS, os.environ[ENV_THREADS]))
        return workers
    if hasattr(os, 'sched_getaffinity'):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _forget_pool():
    # A forked child has the pool object but not its threads.
    global _pool
    _pool = None


if hasattr(os, 'register_at_fork'):
    os.register_at_fork(after_in_child=_forget_pool)


def _single_threaded_blas():
    """BLAS held to one thread (threadpoolctl), or nothing without it."""
    global _blas
    if _blas is None:
        try:
            import threadpoolctl
            _blas = threadpoolctl.ThreadpoolController()
        except ImportError:
            _blas = False
    if not _blas:
        return contextlib.nullcontext()
    return _blas.limit(limits=1, user_api='blas')


def run(function, items, threaded):
    """``function(item)`` for every item: on every core if ``threaded``,
    with BLAS on one thread whatever the number of threads (so that its
    products, and the results, are the same for any number); else in this
    thread, with BLAS as it is."""
    global _pool
    if not threaded:
        for item in items:
            function(item)
        return
    workers = min(n_workers(), len(items))
    with _calls, _single_threaded_blas():
        if workers <= 1:
            for item in items:
                function(item)
            return
        if _pool is None or _pool[0] < workers:
            _pool = workers, concurrent.futures.ThreadPoolExecutor(
                workers, thread_name_prefix='deformable')
        # The threads take the next item as they finish one (next() on a
        # counter is atomic): the faster core does more, with no hand-offs.
        counter = itertools.count()

        def share(_):
            for index in iter(counter.__next__, None):
                if index >= len(items):
                    return
                function(items[index])
        for _ in _pool[1].map(share, range(workers)):
            pass


class Buffers(object):
    """Each thread's reusable arrays, by name, starting on a cache line."""

    def __init__(self):
        self._local = threading.local()

    def get(self, name, shape, dtype):
        arrays = self._local.__dict__.setdefault('arrays', {})
        array = arrays.get(name)
        # math.prod: numpy.prod costs microseconds, several times a block.
        size = math.prod(shape)
        if array is None or array.size < size or array.dtype != dtype:
            array = arrays[name] = aligned_empty(size, dtype)
        return array[:size].reshape(shape)


def aligned_empty(size, dtype):
    """A 1-D array starting on a cache line. (NumPy's large arrays start 16
    bytes past one: half of the loops' 32-byte vectors would straddle two
    lines.)"""
    dtype = numpy.dtype(dtype)
    spare = tuning.CACHE_LINE // dtype.itemsize
    raw = numpy.empty(size + spare, dtype)
    start = (-raw.ctypes.data % tuning.CACHE_LINE) // dtype.itemsize
    return raw[start:start + size]
