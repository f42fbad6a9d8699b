"""The scaled-MNIST experiment with modulated (DCNv2) layers:
``train_mnist.py --deformable 2`` and ``test_mnist.py`` drawing it."""

import json

import numpy
import pytest

pytest.importorskip('chainercv')

from test_experiments import _env  # NOQA: E402
from test_experiments import _run  # NOQA: E402
from test_experiments import EXPERIMENTS  # NOQA: E402
from test_experiments import make_mnist  # NOQA: E402


@pytest.fixture(scope='module')
def modulated(tmp_path_factory):
    """The modulated convnet trained one epoch on synthetic data."""
    tmp = tmp_path_factory.mktemp('modulated')
    make_mnist(tmp / 'mnist', n_train=100, n_test=40)
    env = _env(str(tmp / 'mnist'), str(tmp / 'xdg'))
    out = tmp / 'result'
    result = _run(['train_mnist.py', '--deformable', '2', '--batchsize', '50',
                   '--train-size', '100', '--test-size', '40', '--seed', '0',
                   '--epoch', '1', '--out', str(out)], EXPERIMENTS, env)
    return tmp, env, out, result.stdout


def test_train_writes_modulated_snapshots(modulated):
    _, _, out, stdout = modulated
    assert 'deformable: 2' in stdout
    with open(str(out / 'log')) as f:
        assert [e['epoch'] for e in json.load(f)] == [1]
    model = numpy.load(str(out / 'modulated_iter_1'))
    # Offsets and mask logits: 3 * 9 channels.
    assert model['l2/offset_conv/W'].shape == (27, 32, 3, 3)
    assert model['l3/offset_conv/W'].shape == (27, 32, 3, 3)
    assert (out / 'snapshot_modulated_1').stat().st_size > 0


def test_load_model_knows_the_kinds(modulated):
    import test_mnist
    from models import ModulatedDeformableConvnet
    _, _, out, _ = modulated
    model = test_mnist.load_model(str(out / 'modulated_iter_1'))
    assert type(model) is ModulatedDeformableConvnet
    model = test_mnist.load_model(str(out / 'snapshot_modulated_1'), 2)
    assert type(model) is ModulatedDeformableConvnet
    with pytest.raises(test_mnist.SnapshotError,
                       match=r'modulated \(DCNv2\) model; run with '
                             r'--deformable 2'):
        test_mnist.load_model(str(out / 'modulated_iter_1'), 1)


def test_visualize_modulated(modulated):
    import matplotlib.image
    tmp, env, out, _ = modulated
    png = tmp / 'vis.png'
    result = _run(['test_mnist.py', '--deformable', '2', '--resume',
                   str(out / 'modulated_iter_1'), '--index', '0',
                   '--out', str(png)], EXPERIMENTS, env)
    assert str(png) in result.stdout
    assert matplotlib.image.imread(str(png)).shape[0] > 200


def test_resume_refuses_the_other_kind(modulated):
    tmp, env, out, _ = modulated
    result = _run(['train_mnist.py', '--deformable', '1', '--epoch', '2',
                   '--train-size', '100', '--out', str(tmp / 'other'),
                   '--resume', str(out / 'snapshot_modulated_1')],
                  EXPERIMENTS, env, ok=False)
    assert result.returncode != 0
    assert 'cannot resume' in result.stdout
    assert 'Traceback' not in result.stdout
