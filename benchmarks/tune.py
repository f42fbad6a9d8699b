#!/usr/bin/env python
"""Each tuning constant of ``deformable/tuning.py`` against other values.

Some constants are compiled into the Numba loops, so each value runs in a
process of its own (with a Numba cache of its own), alternating with the
default's process, and a value's time is compared with the default's
measured in the neighbouring processes (this machine drifts):

    python benchmarks/tune.py                  # every constant
    python benchmarks/tune.py SPAN BLOCK_BYTES # some

Each process times the op's forward + backward (median of ``--repeats``)
on one core's worth of threads (``DEFORMABLE_NUM_THREADS=1``; pin it with
``taskset`` for steadier figures), float32.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy

# name: (values to try, shape, CPU loops)
CANDIDATES = {
    'BLOCK_BYTES': ([2 ** 18, 2 ** 22], 'mnist-l2', 'always'),
    'NUMPY_BLOCK_BYTES': ([2 ** 21, 2 ** 25], 'mnist-l2', 'never'),
    'SPAN': ([48, 256], 'mnist-l2', 'always'),
    'CACHE_LINE': ([16], 'mnist-l2', 'always'),
    'VECTOR_BYTES': ([16], 'mnist-l2', 'always'),
    'INT32_PLANE_LIMIT': ([0], 'mnist-l2', 'always'),
    'MAX_SCATTER_ROUNDS': ([2, 32], 'collapsed', 'never'),
}


def child(name, value, shape, loops, repeats):
    """Runs in the child: the op's median time with ``tuning.name =
    value``."""
    import time
    import chainer
    from deformable import tuning
    if name is not None:
        setattr(tuning, name, type(getattr(tuning, name))(value))
    import deformable
    rng = numpy.random.RandomState(0)
    if shape == 'collapsed':
        # Offsets that send most samples to a few points: the NumPy
        # scatter's rounds.
        n, c, size = 20, 32, 28
        offset = rng.uniform(-0.5, 0.5, (n, 18, size, size))
        offset += (numpy.arange(size) % 4)[None, None, :, None]
    else:
        n, c, size = 100, 32, 28
        offset = rng.uniform(-2, 2, (n, 18, size, size))
    x = rng.uniform(-1, 1, (n, c, size, size))
    W = rng.uniform(-1, 1, (c, c, 3, 3)) / numpy.sqrt(9 * c)
    arrays = [a.astype(numpy.float32) for a in (x, offset, W)]

    def step():
        variables = [chainer.Variable(a) for a in arrays]
        y = deformable.deformable_convolution_2d_sampler(*variables, pad=1)
        y.grad = y.array
        y.backward()
    with chainer.using_config('deformable_use_numba', loops):
        step()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    return float(numpy.median(times))


def measure(name, value, shape, loops, repeats, cache):
    env = dict(os.environ, DEFORMABLE_NUM_THREADS='1',
               OPENBLAS_THREAD_TIMEOUT='4', NUMBA_CACHE_DIR=cache)
    command = [sys.executable, __file__, '--child', json.dumps(
        [name, value, shape, loops, repeats])]
    output = subprocess.run(command, env=env, check=True,
                            stdout=subprocess.PIPE,
                            universal_newlines=True).stdout
    return float(output.split()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('names', nargs='*', metavar='NAME',
                        help='constants to try (default: all): {}'.format(
                            ', '.join(CANDIDATES)))
    parser.add_argument('--repeats', type=int, default=9)
    parser.add_argument('--rounds', type=int, default=3,
                        help='default / value pairs of processes per value')
    parser.add_argument('--child', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(child(*json.loads(args.child)))
        return
    unknown = set(args.names) - set(CANDIDATES)
    if unknown:
        parser.error('unknown constants: {}'.format(', '.join(unknown)))
    from deformable import tuning
    print('| constant | value | vs default ({}) | rounds |'.format(
        'median of per-round ratios'))
    print('|---|---|---|---|')
    for name in args.names or CANDIDATES:
        values, shape, loops = CANDIDATES[name]
        with tempfile.TemporaryDirectory() as default_cache:
            for value in values:
                with tempfile.TemporaryDirectory() as cache:
                    ratios = []
                    for _ in range(args.rounds):
                        before = measure(None, None, shape, loops,
                                         args.repeats, default_cache)
                        tried = measure(name, value, shape, loops,
                                        args.repeats, cache)
                        after = measure(None, None, shape, loops,
                                        args.repeats, default_cache)
                        ratios.append(tried / ((before + after) / 2))
                print('| {} | {} (default {}) | {:.3f}x | {} |'.format(
                    name, value, getattr(tuning, name),
                    float(numpy.median(ratios)),
                    ' '.join('{:.2f}'.format(r) for r in ratios)))
                sys.stdout.flush()


if __name__ == '__main__':
    main()
