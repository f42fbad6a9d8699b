"""benchmarks/bench_gpu_layers.py: its --smoke run on the CPU (every table
and goal printed, the numbers numbers) and its pure helpers."""

import contextlib
import importlib.util
import math
import os
import subprocess
import sys
import time

import numpy
import pytest

import helpers

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
import bench_gpu_layers  # NOQA
import bench_sampler  # NOQA

# PyTorch on the CPU, where installed, fills the reference columns too.
HAVE_TORCHVISION = importlib.util.find_spec('torchvision') is not None


def table(tables, prefix):
    titles = [t for t in tables if t.startswith(prefix)]
    assert len(titles) == 1, (prefix, list(tables))
    return tables[titles[0]]


def number(cell, suffix=''):
    """A finite number, written with ``suffix`` (e.g. ``x``)."""
    assert cell.endswith(suffix), cell
    value = float(cell[:len(cell) - len(suffix)])
    assert math.isfinite(value), cell
    return value


@pytest.fixture(scope='module')
def smoke():
    """The output of ``--smoke --gpu -1`` (pure NumPy loops, which need no
    compilation, and one repeat: a few seconds) and its tables."""
    env = dict(os.environ, DEFORMABLE_USE_NUMBA='never',
               PYTHONPATH=os.pathsep.join(
                   [ROOT] + [p for p in [os.environ.get('PYTHONPATH')] if p]))
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, '-W', 'ignore',
         os.path.join(ROOT, 'benchmarks', 'bench_gpu_layers.py'),
         '--smoke', '--gpu', '-1', '--repeats', '1'],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        universal_newlines=True, timeout=300)
    assert result.returncode == 0, result.stdout
    print('smoke run: {:.1f} s'.format(time.perf_counter() - start))
    return result.stdout, helpers.parse_tables(result.stdout)


CONFIGS = [bench_gpu_layers.config_label(c)
           for c in bench_gpu_layers.make_configs(bench_gpu_layers.LAYERS,
                                                  smoke=True)]


def test_smoke_speed_table(smoke):
    rows = table(smoke[1], 'Speed')
    assert [(r['config'], r['dtype'], r['pass']) for r in rows] == [
        (config, dtype, direction) for config in CONFIGS
        for dtype in ('float32', 'float16')
        for direction in ('fwd', 'fwd+bwd', 'bwd')]
    for row in rows:
        assert number(row['ours']) > 0
        if row['pass'] != 'fwd':
            number(row['ours deterministic'])
            number(row['deterministic / default'], 'x')
        for name in ('torchvision', 'cuDNN'):
            cell = row['ours / ' + name]
            if HAVE_TORCHVISION and row['pass'] != 'bwd':
                number(cell, 'x')
            else:
                assert cell == '-'


def test_smoke_accuracy_table(smoke):
    rows = table(smoke[1], 'float16 accuracy')
    assert [r['config'] for r in rows] == CONFIGS
    for row in rows:
        names = ['y', 'grad x', 'grad offset', 'grad W', 'grad b']
        if row['config'].endswith('mask'):
            names.append('grad mask')
        else:
            assert row['grad mask'] == '-'
        for name in names:
            ours, theirs = row[name].split(' / ')
            # Computed in float32 and rounded: within the goals.
            assert number(ours) <= (1e-3 if name == 'y' else 1e-2)
            if HAVE_TORCHVISION:
                number(theirs)
        if HAVE_TORCHVISION:
            assert number(row['ours vs torchvision, float64']) <= 1e-9


def test_smoke_memory_table(smoke):
    rows = table(smoke[1], 'Peak CPU memory')
    assert [(r['config'], r['dtype']) for r in rows] == [
        (config, dtype) for config in CONFIGS
        for dtype in ('float32', 'float16')]
    for row in rows:
        assert number(row['ours']) > 0
        assert row['ours / torchvision'] == '-'  # not measured on the CPU


def test_smoke_summary_names_every_goal(smoke):
    output, tables = smoke
    rows = table(tables, 'Goals')
    assert [r['goal'] for r in rows] == [
        name for name, _ in bench_gpu_layers.GOALS.values()]
    for row in rows:
        if row['met'] == 'no data':
            assert row['worst'] == row['median'] == '-'
            assert row['values'] == '0'
            continue
        assert row['met'] in ('yes', 'NO')
        assert int(row['values']) > 0
        suffix = '' if 'error' in row['goal'] else 'x'
        assert number(row['median'], suffix) <= number(row['worst'], suffix)
    met = {r['goal']: r['met'] for r in rows}
    assert met['float16 forward error, ours'] == 'yes'
    assert met['float16 gradient error (each), ours'] == 'yes'
    assert met['deterministic bwd / default bwd'] in ('yes', 'NO')
    assert output.rstrip().splitlines()[-1].startswith('# elapsed ')


def test_options_subset_and_workspace(capsys):
    """--layers, --dtypes and --workspace, in-process: a float32-only run
    has no float16 section, and the workspace stands in the header."""
    import chainer
    with chainer.using_config('deformable_use_numba', 'never'):
        bench_gpu_layers.main(['--smoke', '--gpu', '-1', '--repeats', '1',
                               '--layers', 'det-c5', '--dtypes', 'float32',
                               '--workspace', '12345'])
    output = capsys.readouterr().out
    assert 'workspace 12345 bytes (--workspace)' in output
    tables = helpers.parse_tables(output)
    assert not [t for t in tables if t.startswith('float16 accuracy')]
    rows = table(tables, 'Speed')
    assert {(r['config'].split(',')[0], r['dtype']) for r in rows} == {
        ('det-c5', 'float32')}
    assert len(rows) == 4 * 3


def test_relative_error():
    reference = numpy.array([0.5, -2.0, 1.0])
    error = bench_gpu_layers.relative_error
    assert error(reference.astype(numpy.float16), reference) == 0
    assert error(reference + [0, 0, 0.1], reference) == pytest.approx(0.05)
    assert math.isnan(error(numpy.array([numpy.nan, 0, 0]), reference))
    zero = numpy.zeros(3)
    assert error(zero, zero) == 0
    assert error(zero + 1, zero) == math.inf


def test_summarize():
    summarize = bench_gpu_layers.summarize
    assert summarize([], 1) is None
    assert summarize([0.2, 0.4, 0.3], 0.5) == (0.4, 0.3, True)
    assert summarize([0.2, 0.6, 0.3], 0.5) == (0.6, 0.3, False)
    worst, _, met = summarize([0.1, float('nan')], 0.5)
    assert math.isnan(worst) and not met


def test_smoke_shapes_keep_four_offset_groups():
    for shape in bench_gpu_layers.LAYERS.values():
        n, c, h, w = bench_gpu_layers.smoke_shape(shape)
        assert n <= 2 and c % 4 == 0 and h >= 1 and w >= 1
        assert c * 16 == shape[1]


def test_median_times_runs_prepare_untimed():
    calls = []

    def step():
        calls.append('step')

    def prepare():
        calls.append('prepare')
        time.sleep(0.02)
    step.prepare = prepare
    medians = bench_sampler.median_times({'step': step}, repeats=3)
    assert calls == ['prepare', 'step'] * 4  # warm-up and 3 repeats
    assert medians['step'] < 0.01


def test_backward_step_matches_forward_backward():
    config = bench_gpu_layers.Config('det-c5', (1, 8, 3, 4), True, 4)
    arrays, params, _ = bench_gpu_layers.make_inputs(config, 'float64',
                                                     numpy)
    ours = bench_gpu_layers.OursStep(arrays, params, lambda: None)
    step = ours.backward_step()
    step.prepare()
    got = step()
    _, expected = ours.run(True)
    assert len(got) == len(expected) == 5  # x, offset, W, b, mask
    for a, b in zip(got, expected):
        assert a.grad is not None
        numpy.testing.assert_array_equal(a.grad, b.grad)


class FakePool(object):
    """CuPy's memory pool as the GPU's peak measurement sees it."""

    def __init__(self):
        self.used = 100  # the inputs, in use before the call

    def used_bytes(self):
        return self.used

    def malloc(self, size):
        self.used += size
        return size

    def free(self, size):
        self.used -= size


class FakeCupy(object):
    def __init__(self):
        self.pool = FakePool()
        self.allocator = None
        fake = self

        class cuda(object):
            @staticmethod
            @contextlib.contextmanager
            def using_allocator(allocator):
                fake.allocator = allocator
                yield
                fake.allocator = None
        self.cuda = cuda

    def get_default_memory_pool(self):
        return self.pool


def test_gpu_peak_is_the_most_in_use_after_any_allocation():
    device = bench_gpu_layers.Device.__new__(bench_gpu_layers.Device)
    device.gpu, device.xp = 0, FakeCupy()
    device.synchronize = lambda: None

    def step():
        malloc = device.xp.allocator
        a = malloc(50)
        b = malloc(30)  # peak: 100 + 80
        device.xp.pool.free(a)
        device.xp.pool.free(b)
        malloc(60)  # what the call returns stays in use
    assert device.peak_ours(step) == 80
    assert device.xp.allocator is None  # the pool's own allocator again
