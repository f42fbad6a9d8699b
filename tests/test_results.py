"""The committed results (``results/``): tables, snapshots and accuracies.

The accuracy check needs MNIST in the cache (``python
experiments/mnist_data.py`` puts it there) and skips without it; nothing
here fetches.
"""

import json
import os
import shutil
import sys

import numpy
import pytest

import chainer
import chainer.links as L
from chainer.training import extensions

# The experiments need ChainerCV, which builds only on Python <= 3.10.
pytest.importorskip('chainercv')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'experiments'))

import mnist_data  # NOQA: E402
from models import Convnet  # NOQA: E402
from models import DeformableConvnet  # NOQA: E402
from models import ModulatedDeformableConvnet  # NOQA: E402
import plots  # NOQA: E402
import results_tables  # NOQA: E402
import scaled_mnist  # NOQA: E402
import snapshots  # NOQA: E402

# Model class and snapshot name (train_mnist.py's) of each results folder.
KINDS = {'regular': (Convnet, 'non_deformable_{}'),
         'deformable': (DeformableConvnet, 'model_iter_{}'),
         'modulated': (ModulatedDeformableConvnet, 'modulated_iter_{}')}


def _log(model):
    return results_tables.read_log(
        os.path.join(results_tables.RESULTS, model, 'log'))


def _snapshot(model):
    """The committed model after the last epoch of its log."""
    return os.path.join(results_tables.RESULTS, model, KINDS[model][1].format(
        _log(model)[-1]['epoch']))


def _restored(model):
    # As test_mnist.py loads it, checking the kind too.
    return snapshots.load_model(_snapshot(model), deformable={
        'regular': 0, 'deformable': 1, 'modulated': 2}[model])


@pytest.mark.parametrize('run', [
    os.path.relpath(run, ROOT) for run in plots.committed_runs()])
def test_plots_are_those_of_the_log(run, tmp_path):
    # Byte for byte as training draws them (tests/test_experiments.py
    # checks that redrawing from a log does).
    shutil.copy(os.path.join(ROOT, run, 'log'), str(tmp_path))
    plots.redraw(str(tmp_path))
    for name, _ in plots.PLOTS:
        with open(os.path.join(ROOT, run, name), 'rb') as f:
            assert f.read() == (tmp_path / name).read_bytes(), (
                '{}/{} is not the plot of its log: run python '
                'experiments/plots.py'.format(run, name))


def test_every_run_is_checked():
    runs = {os.path.relpath(run, results_tables.RESULTS)
            for run in plots.committed_runs()}
    assert {'regular', 'deformable', 'modulated', 'seeds/seed1/regular',
            'seeds/seed2/deformable', 'seeds/seed2/modulated'} <= runs


@pytest.mark.parametrize('model', sorted(KINDS))
def test_snapshot_restores_and_runs(model):
    predictor = KINDS[model][0](10)
    expected = {name.lstrip('/'): param.shape
                for name, param in predictor.namedparams()}
    with numpy.load(_snapshot(model)) as npz:
        saved = {name: npz[name].shape for name in npz.files}
    assert saved == expected

    predictor = _restored(model)
    x = numpy.random.RandomState(0).uniform(
        0, 1, (3, 1, 28, 28)).astype(numpy.float32)
    with chainer.using_config('train', False), chainer.no_backprop_mode():
        y = predictor(x).array
    assert y.shape == (3, 10)
    assert numpy.isfinite(y).all()


@pytest.mark.parametrize('model', sorted(KINDS))
def test_snapshot_accuracy_is_the_logged_one(model):
    try:
        _, test = scaled_mnist.get_scaled_mnist(download=False,
                                                log=lambda message: None)
    except mnist_data.MNISTNotFoundError:
        pytest.skip('MNIST is not in the cache ({}); run python '
                    'experiments/mnist_data.py to check the accuracies '
                    'too'.format(mnist_data.cache_dir()))
    logged = _log(model)[-1]['validation/main/accuracy']
    # As train_mnist.py evaluates: batches of its default size, in order.
    iterator = chainer.iterators.SerialIterator(
        test, 100, repeat=False, shuffle=False)
    evaluator = extensions.Evaluator(iterator, L.Classifier(_restored(model)))
    computed = evaluator()['main/accuracy']
    # The precision of the printed table (PrintReport's '{:g}').
    assert '{:g}'.format(computed) == '{:g}'.format(logged)


def _write_log(path, accuracies):
    path.mkdir(parents=True)
    log = [{'epoch': i + 1, 'iteration': 600 * (i + 1), 'main/loss': 0.5,
            'validation/main/loss': 0.25, 'main/accuracy': 0.9,
            'validation/main/accuracy': value, 'elapsed_time': 10. * (i + 1)}
           for i, value in enumerate(accuracies)]
    (path / 'log').write_text(json.dumps(log))


def test_tables_of_made_up_runs(tmp_path):
    epochs = results_tables.SEED_EPOCHS
    full = results_tables.FULL_EPOCHS
    # Main runs: the regular and modulated ones finished, the deformable one
    # halfway.
    _write_log(tmp_path / 'regular', [0.9] * (epochs - 1) + [0.97] +
               [0.98] * (full - epochs))
    _write_log(tmp_path / 'deformable', [0.95] * epochs + [0.99])
    _write_log(tmp_path / 'modulated', [0.96] * epochs +
               [0.985] * (full - epochs))
    _write_log(tmp_path / 'seeds' / 'seed1' / 'regular', [0.9] * epochs)
    _write_log(tmp_path / 'seeds' / 'seed1' / 'deformable', [0.94] * epochs)
    _write_log(tmp_path / 'seeds' / 'seed1' / 'modulated', [0.95] * epochs)
    _write_log(tmp_path / 'seeds' / 'seed2' / 'regular', [0.9] * 3)
    (tmp_path / 'machine.txt').write_text('a test machine\n')

    text = results_tables.markdown(str(tmp_path))
    assert ('| | regular (ours) | deformable (ours) | modulated (ours) | '
            'regular (original) | deformable (original) |') in text
    assert ('| epochs trained | 20 | 11 of 20 (in progress) | 20 | 20 | 20 |'
            in text)
    assert ('| best validation accuracy (epoch) | 0.9800 (11) | '
            '0.9900 (11) | 0.9850 (11) | 0.9797 (19) | 0.9862 (18) |') in text
    assert '| seconds per epoch | 10 | 10 | 10 | 18.8 | 59.0 |' in text
    assert ('| seed | regular | deformable | modulated | deformable - regular '
            '| modulated - deformable |') in text
    # Seed 0 is the main runs after SEED_EPOCHS epochs.
    assert '| 0 | 0.9700 | 0.9500 | 0.9600 | -0.0200 | +0.0100 |' in text
    assert '| 1 | 0.9000 | 0.9400 | 0.9500 | +0.0400 | +0.0100 |' in text
    assert ('| 2 | epoch 3 of {} (in progress) | not run yet | not run yet '
            '|  |  |'.format(epochs)) in text
    # Means and sample standard deviations over the finished seeds only.
    assert ('| mean ± std | 0.9350 ± 0.0495 (n = 2) | 0.9450 ± 0.0071 '
            '(n = 2) | 0.9550 ± 0.0071 (n = 2) | 0.0100 ± 0.0424 (n = 2) | '
            '0.0100 ± 0.0000 (n = 2) |') in text
    assert text.count('```') == 6
