"""The GPU path's chunks of images, its half precision and its deterministic
mode: on the CPU through the kernel emulation, and on a GPU where there is
one (``gpu``).

- **Chunks.** ``chainer.config.deformable_workspace_size`` bounds the
  buffers of one chunk of images; any chunking gives the same results.
- **float16.** Columns and products are half precision, positions and
  gradient sums float32: errors against float64 on the same rounded inputs
  stay within 1e-3 (output) and 1e-2 (gradients) of the largest value.
- **Deterministic mode.** Under ``cudnn_deterministic`` the backward uses no
  atomics and its gradients are bit for bit the same across runs and chunk
  sizes.
"""

import contextlib
import os
import subprocess
import sys
import warnings
from unittest import mock

import numpy
import pytest

import chainer
from chainer import testing

import deformable
from deformable.backends import gpu

import helpers
import kernel_emulation


needs_compiler = pytest.mark.skipif(
    not kernel_emulation.compiler_available(),
    reason='needs a C++ compiler ({}) to run the CUDA kernels on the '
           'CPU'.format(kernel_emulation.CXX))
PATHS = [pytest.param('emulated', marks=needs_compiler),
         pytest.param('gpu', marks=pytest.mark.gpu)]
NAMES = ('x', 'offset', 'W', 'b', 'mask')
PARAMS = {'stride': (1, 2), 'pad': (2, 1), 'dilate': (2, 1), 'groups': 2}


@contextlib.contextmanager
def on(path):
    """The device the op runs on along ``path``: NumPy arrays through the
    emulated kernels, or the first GPU."""
    if path == 'gpu':
        yield chainer.get_device('@cupy:0')
    else:
        with kernel_emulation.gpu_path_on_cpu():
            yield chainer.backend.CpuDevice()


def general_case(dtype=numpy.float64, n=3, seed=0):
    """Every feature on (offset groups, groups, dilation, stride, a mask),
    samples across and outside the image, a NaN and an infinite offset."""
    rng = numpy.random.RandomState(seed)
    inputs = helpers.make_general_inputs(
        rng, n, 4, 4, 7, 9, (3, 3), PARAMS['stride'], PARAMS['pad'],
        PARAMS['dilate'], PARAMS['groups'], 2, True, spread=4, dtype=dtype)
    inputs[1][0, 3, 1, 2] = numpy.nan
    inputs[1][n - 1, 20, 2, 1] = numpy.inf
    gy = rng.uniform(-1, 1, (n, 4) + inputs[1].shape[2:]).astype(dtype)
    return inputs, gy


@contextlib.contextmanager
def using_configs(**config):
    with contextlib.ExitStack() as stack:
        for name, value in config.items():
            stack.enter_context(chainer.using_config(name, value))
        yield


def run(device, inputs, gy, params=PARAMS, **config):
    """Output and gradients (NumPy arrays, by name) under ``config``."""
    cpu = chainer.backend.CpuDevice()
    with using_configs(**config):
        variables = {name: chainer.Variable(device.send(a.copy()))
                     for name, a in zip(NAMES, inputs) if a is not None}
        y = deformable.deformable_convolution_2d_sampler(
            variables['x'], variables['offset'], variables['W'],
            variables.get('b'), mask=variables.get('mask'), **params)
        y.grad = device.send(gy.copy())
        y.backward()
    results = {'y': cpu.send(y.array)}
    results.update(('g' + name, cpu.send(v.grad))
                   for name, v in variables.items())
    return results


def image_bytes(inputs, itemsize=8):
    """One image's columns."""
    x, offset, W = inputs[:3]
    return (x.shape[1] * W.shape[2] * W.shape[3] * offset.shape[2]
            * offset.shape[3] * itemsize)


def blocks_of(images, monkeypatch):
    """The deterministic mode's blocks of ``images`` images, whatever the
    layer."""
    monkeypatch.setattr(gpu.Problem, 'deterministic_block_images',
                        lambda self, n: min(n, images))


# --- Chunks ----------------------------------------------------------------

@pytest.mark.parametrize('path', PATHS)
@pytest.mark.parametrize('deterministic', [False, True])
def test_any_chunking_gives_the_same_results(path, deterministic,
                                             monkeypatch):
    # Blocks of 2 images: 5 images in chunks of one block (2, 2, 1), of
    # two (4, 1) and of all.
    blocks_of(2, monkeypatch)
    inputs, gy = general_case(n=5)
    one = image_bytes(inputs)
    with on(path) as device:
        results = [run(device, inputs, gy, deformable_workspace_size=size,
                       cudnn_deterministic=deterministic)
                   for size in (2 ** 40, 1, 3 * one, 5 * one)]
    for other in results[1:]:
        if deterministic:
            # Bit for bit, runs and chunk sizes alike.
            for name in results[0]:
                numpy.testing.assert_array_equal(other[name],
                                                 results[0][name], name)
        else:
            problems = helpers.disagreements(other, results[0], 1e-13)
            assert not problems, problems


@needs_compiler
@pytest.mark.parametrize('deterministic,gather', [
    (False, False), (False, True), (True, False)])
def test_chunks_bound_the_buffers(deterministic, gather, monkeypatch):
    from deformable import tuning
    monkeypatch.setattr(tuning, 'GPU_GATHER_GRAD_X', gather)
    blocks_of(1, monkeypatch)
    inputs, gy = general_case(n=5)
    one = image_bytes(inputs)
    workspace = 4 * one
    chunks = []
    sample = gpu.sample_columns

    def recording(x, kernel_args):
        columns = sample(x, kernel_args)
        chunks.append((x.shape[0], columns.nbytes))
        return columns
    monkeypatch.setattr(gpu, 'sample_columns', recording)
    with on('emulated') as device:
        results = run(device, inputs, gy, deformable_workspace_size=workspace,
                      cudnn_deterministic=deterministic)
    # The forward's chunks hold columns only: four images at a time (the
    # deterministic mode's blocks each padded to BLOCK_ALIGNMENT entries).
    padding = gpu.BLOCK_ALIGNMENT * 8 if deterministic else 0
    assert [images for images, _ in chunks[:2]] == [4, 1]
    assert 4 * one <= chunks[0][1] <= 4 * (one + padding)
    # The backward's, columns and their gradients (and the gather's
    # entries): at most half the workspace of columns each.
    backward = chunks[2:]
    assert sum(images for images, _ in backward) == 5
    assert max(size for _, size in backward) <= workspace / 2 + padding
    most = 1 if deterministic or gather else 2
    assert max(images for images, _ in backward) == most
    with on('emulated') as device:
        whole = run(device, inputs, gy, cudnn_deterministic=deterministic)
    problems = helpers.disagreements(results, whole, 1e-13)
    assert not problems, problems


@needs_compiler
def test_columns_are_kept_only_where_they_fit(monkeypatch):
    inputs, gy = general_case()
    calls = []
    sample = gpu.sample_columns

    def counting(x, kernel_args):
        calls.append(x.shape[0])
        return sample(x, kernel_args)
    monkeypatch.setattr(gpu, 'sample_columns', counting)
    everything = 2 * 3 * image_bytes(inputs)
    with on('emulated') as device:
        for size, expected in [(everything, [3]),
                               (everything - 1, [3, 2, 1])]:
            del calls[:]
            run(device, inputs, gy, deformable_workspace_size=size)
            assert calls == expected, size
    # With the gather the backward needs room for its entries too: the
    # columns that would fit beside their gradient alone are not kept.
    from deformable import arguments
    from deformable import tuning
    x, offset, W, b, mask = inputs
    hyperparameters = arguments.Hyperparameters.checked(
        PARAMS['stride'], PARAMS['pad'], PARAMS['dilate'], PARAMS['groups'])
    # The gather's entries: 32 bytes for each corner of each sample.
    entries = 4 * offset.size // 2 * 32
    for gather, deterministic, size, kept in [
            (False, False, everything, True), (True, False, everything, False),
            (False, True, everything, False),
            (False, True, everything + entries, True)]:
        monkeypatch.setattr(tuning, 'GPU_GATHER_GRAD_X', gather)
        with on('emulated'), chainer.using_config(
                'deformable_workspace_size', size), chainer.using_config(
                    'cudnn_deterministic', deterministic):
            _, columns = gpu.BACKEND.forward(hyperparameters, x, offset, W,
                                             b, mask)
        assert (columns is not None) == kept, (gather, deterministic, size)


@needs_compiler
@pytest.mark.parametrize('forward_deterministic', [False, True])
def test_columns_kept_in_one_mode_serve_only_it(forward_deterministic,
                                                monkeypatch):
    # The modes lay out the columns differently (one block, blocks of an
    # image here): a backward in the other mode makes its own.
    blocks_of(1, monkeypatch)
    inputs, gy = general_case()
    backward_deterministic = not forward_deterministic
    with on('emulated') as device:
        expected = run(device, inputs, gy,
                       cudnn_deterministic=backward_deterministic)
        variables = [chainer.Variable(device.send(a)) for a in inputs]
        with chainer.using_config('cudnn_deterministic',
                                  forward_deterministic):
            y = deformable.deformable_convolution_2d_sampler(
                *variables[:4], mask=variables[4], **PARAMS)
        y.grad = device.send(gy)
        with chainer.using_config('cudnn_deterministic',
                                  backward_deterministic):
            y.backward()
    for name, v in zip(NAMES, variables):
        numpy.testing.assert_allclose(v.grad, expected['g' + name],
                                      rtol=1e-13, atol=1e-13, err_msg=name)


def test_chunks_are_whole_blocks():
    def sizes(*args):
        return [(s.start, s.stop) for s in gpu.chunks(*args)]
    with chainer.using_config('deformable_workspace_size', 10):
        assert sizes(7, 3) == [(0, 3), (3, 6), (6, 7)]
        # Rounded down to whole blocks; one block at least; all that fit.
        assert sizes(7, 3, 2) == [(0, 2), (2, 4), (4, 6), (6, 7)]
        assert sizes(7, 6, 4) == [(0, 4), (4, 7)]
        assert sizes(7, 1, 4) == [(0, 7)]
        assert sizes(0, 3, 2) == []


@needs_compiler
def test_deterministic_blocks_are_set_by_the_layer(monkeypatch):
    from deformable import arguments
    from deformable import tuning
    x, offset, W, b, mask = general_case(n=5)[0]
    hyperparameters = arguments.Hyperparameters.checked(
        PARAMS['stride'], PARAMS['pad'], PARAMS['dilate'], PARAMS['groups'])

    def block_images(deterministic=True, workspace=2 ** 26):
        with on('emulated'), using_configs(
                cudnn_deterministic=deterministic,
                deformable_workspace_size=workspace):
            problem = gpu.Problem(hyperparameters, x, offset, W, mask)
            return problem.block_images, problem.backward_bytes(True)
    assert block_images(False)[0] is None
    blocks, per_image = block_images()
    assert blocks == 5      # the whole (small) batch fits 64 MiB
    for room, expected in [(1, 1), (2 * per_image - 1, 1),
                           (2 * per_image, 2), (10 ** 9, 5)]:
        monkeypatch.setattr(tuning, 'GPU_DETERMINISTIC_BLOCK_BYTES', room)
        # The same whatever the workspace.
        assert block_images(workspace=1)[0] == expected
        assert block_images(workspace=2 ** 40)[0] == expected


@pytest.mark.parametrize('size', [0, -5, 1.5, '64', True, None])
def test_bad_workspace_is_named(size):
    with pytest.raises(ValueError, match='deformable_workspace_size'):
        with chainer.using_config('deformable_workspace_size', size):
            gpu.workspace_size()


def test_workspace_size_from_the_environment():
    # The default comes from DEFORMABLE_WORKSPACE_SIZE where it is set.
    code = ('import chainer, deformable.backends; '
            'print(chainer.config.deformable_workspace_size)')
    for value, expected in [('12345', '12345'), ('', str(64 * 2 ** 20))]:
        env = dict(os.environ, DEFORMABLE_WORKSPACE_SIZE=value)
        out = subprocess.run([sys.executable, '-c', code], env=env,
                             stdout=subprocess.PIPE, check=True,
                             universal_newlines=True).stdout
        assert out.strip() == expected


# --- Deterministic mode ----------------------------------------------------

@needs_compiler
@testing.parameterize(*testing.product({
    'dtype': [numpy.float64, numpy.float32],
    'with_mask': [False, True],
}))
class TestDeterministicAgreesWithCpu(object):

    def test_agrees(self):
        inputs, gy = general_case(self.dtype)
        if not self.with_mask:
            inputs = inputs[:4] + (None,)
        rtol = 1e-12 if self.dtype == numpy.float64 else 1e-5
        with chainer.using_config('cudnn_deterministic', True):
            problems = helpers.gpu_path_disagreements(inputs, gy, rtol,
                                                      **PARAMS)
        assert not problems, problems


@needs_compiler
@pytest.mark.parametrize('dtype', [numpy.float64, numpy.float16])
def test_default_mode_can_gather_too(dtype, monkeypatch):
    # tuning.GPU_GATHER_GRAD_X: the gather in the default mode, with the
    # columns as they are there (not by image).
    from deformable import tuning
    monkeypatch.setattr(tuning, 'GPU_GATHER_GRAD_X', True)
    inputs, gy = general_case(dtype)
    rtol = 1e-12 if dtype == numpy.float64 else 2e-3
    problems = helpers.gpu_path_disagreements(inputs, gy, rtol, **PARAMS)
    assert not problems, problems
    column_grads = gpu.column_grads
    scattered = []

    def recording(*args):
        scattered.append(args[3] is not None)
        return column_grads(*args)
    monkeypatch.setattr(gpu, 'column_grads', recording)
    with on('emulated') as device:
        run(device, inputs, gy)
    assert scattered and not any(scattered)


@needs_compiler
@pytest.mark.parametrize('double_backward', [False, True])
def test_deterministic_mode_uses_no_atomics(double_backward, monkeypatch):
    inputs, gy = general_case()
    atomic = []
    column_grads, kernel = gpu.column_grads, gpu._kernel

    def recording_column_grads(*args):
        if args[3] is not None:         # grad_x: added to with atomicAdd
            atomic.append('column_grads to gx')
        return column_grads(*args)

    def recording_kernel(source):
        if source is gpu.SCATTER_TAPS:
            atomic.append(source.name)
        return kernel(source)
    monkeypatch.setattr(gpu, 'column_grads', recording_column_grads)
    monkeypatch.setattr(gpu, '_kernel', recording_kernel)
    for deterministic in (False, True):
        del atomic[:]
        with on('emulated') as device, warnings.catch_warnings(
                record=True) as caught, chainer.using_config(
                    'cudnn_deterministic', deterministic), \
                chainer.using_config('warn_nondeterministic', True):
            warnings.simplefilter('always')
            variables = [chainer.Variable(device.send(a)) for a in inputs]
            y = deformable.deformable_convolution_2d_sampler(
                *variables[:4], mask=variables[4], **PARAMS)
            grads = chainer.grad([chainer.functions.sum(y * y)],
                                 variables[:2],
                                 enable_double_backprop=double_backward)
            if double_backward:
                # Through the taps' samples and their adjoint.
                F = chainer.functions
                F.sum(grads[0] * F.sum(grads[1][:, :1]) + grads[0]) \
                    .backward()
        nondeterministic = [w for w in caught
                            if 'nondeterministic' in str(w.message).lower()
                            or 'atomic' in str(w.message).lower()]
        if deterministic:
            assert not atomic
            assert not nondeterministic
        else:
            assert atomic
            assert (gpu.SCATTER_TAPS.name in atomic) == double_backward
            assert nondeterministic


# Bugs planted in the deterministic mode's kernels, each of which the
# comparison with the CPU path must catch: (constant of gpu, old, new).
PLANTED_BUGS = {
    'corner key of the wrong column': (
        'CORNER_ENTRIES', '(n_group * h + y) * w + x', '(n_group * h + y) * w'
        ' + x0'),
    'mask left out of the entries': (
        'CORNER_ENTRIES', 'weight[q] * m', 'weight[q]'),
    'gather of the wrong tap': (
        'GATHER_CORNERS', 'const int k = entry / 4 / P % K;',
        'const int k = entry / 4 / P % K / 2;'),
    'last entry of each pixel dropped': (
        'GATHER_CORNERS', 'e < starts[key + 1]', 'e + 1 < starts[key + 1]'),
    'blocks transposed': (
        'PREAMBLE', 'row * size + (p - first)', '(p - first) * rows + row'),
    'blocks not aligned': (
        'PREAMBLE', 'return index * stride', 'return index * rows * block'),
}


@needs_compiler
@pytest.mark.parametrize('bug', sorted(PLANTED_BUGS))
def test_planted_bugs_are_caught(bug, monkeypatch):
    # Blocks of 2 images: 3 images make a full block and a short one.
    blocks_of(2, monkeypatch)
    inputs, gy = general_case()
    with chainer.using_config('cudnn_deterministic', True):
        assert not helpers.gpu_path_disagreements(inputs, gy, 1e-12,
                                                  **PARAMS)
        with kernel_emulation.planted(*PLANTED_BUGS[bug]):
            assert helpers.gpu_path_disagreements(inputs, gy, 1e-12,
                                                  **PARAMS)


def deterministic_bits_table(capsys, monkeypatch, *planted):
    """gpu_checks/deterministic_bits.py --smoke through the emulation: its
    exit status and its table's rows, each a dict by column."""
    monkeypatch.syspath_prepend(os.path.join(
        os.path.dirname(os.path.abspath(__file__)), '..', 'gpu_checks'))
    import deterministic_bits
    with kernel_emulation.gpu_path_on_cpu(), contextlib.ExitStack() as s:
        for target, name, value in planted:
            s.enter_context(mock.patch.object(target, name, value))
        status = deterministic_bits.main(
            ['--smoke', '--gpu', '-1', '--layers', 'cls-c5', 'det-c3'])
    tables = helpers.parse_tables(capsys.readouterr().out)
    return status, tables['Each result against the first run, bit for bit']


@needs_compiler
def test_deterministic_bits_check(capsys, monkeypatch):
    blocks_of(1, monkeypatch)
    status, rows = deterministic_bits_table(capsys, monkeypatch)
    assert status == 0
    # 2 layers x 2 variants x 2 dtypes x 2 modes x 3 workspaces.
    assert len(rows) == 48
    gradients = ('x', 'offset', 'W', 'b', 'mask')
    for row in rows:
        deterministic = row['mode'] == 'deterministic'
        if deterministic:
            assert {row[n] for n in gradients} <= {'same', '-'}, row
        chunks = {'1 byte': '2 of 1', '4 GiB': '1 of 2'}.get(
            row['workspace'], '1 of 2')
        if deterministic:
            chunks += ' (blocks of 1)'
        assert row['backward chunks'] == chunks, row
    # The default mode's sums follow the chunks: the check sees that.
    assert any(row['W'] != 'same' for row in rows
               if row['mode'] == 'default')
    # And it fails where the deterministic mode is not.
    status, rows = deterministic_bits_table(
        capsys, monkeypatch, (gpu, 'deterministic', lambda: False))
    assert status == 1


# --- float16 ---------------------------------------------------------------

HALF_PARAMS = {'pad': 1}


def half_case():
    """float16 inputs on a wide image (positions past 150, where float16
    resolves an eighth of a pixel), their exact float64 values, and the
    float64 reference computed from them on the CPU."""
    rng = numpy.random.RandomState(3)
    inputs = helpers.make_general_inputs(
        rng, 2, 16, 8, 6, 170, (3, 3), (1, 1), (1, 1), (1, 1), 1, 2, True,
        spread=3, dtype=numpy.float16)
    gy = rng.uniform(-1, 1, (2, 8) + inputs[1].shape[2:]).astype(
        numpy.float16)
    exact = [a.astype(numpy.float64) for a in inputs]
    expected = run(chainer.backend.CpuDevice(), exact,
                   gy.astype(numpy.float64), HALF_PARAMS)
    return inputs, gy, expected


def half_errors(results, expected):
    """Each result's largest error relative to the largest reference
    value."""
    return {name: numpy.abs(results[name].astype(numpy.float64)
                            - e).max() / numpy.abs(e).max()
            for name, e in expected.items()}


@pytest.mark.parametrize('path', PATHS + ['cpu'])
@pytest.mark.parametrize('deterministic', [False, True])
def test_float16_accuracy(path, deterministic):
    inputs, gy, expected = half_case()
    context = (contextlib.nullcontext(chainer.backend.CpuDevice())
               if path == 'cpu' else on(path))
    with context as device:
        results = run(device, inputs, gy, HALF_PARAMS,
                      cudnn_deterministic=deterministic)
    assert all(results[name].dtype == numpy.float16 for name in results)
    errors = half_errors(results, expected)
    assert errors.pop('y') <= 1e-3
    assert max(errors.values()) <= 1e-2, errors


@needs_compiler
def test_float16_columns_are_half_and_positions_float32(monkeypatch):
    inputs, gy, _ = half_case()
    seen = {}
    sample, column_grads = gpu.sample_columns, gpu.column_grads

    def recording_sample(x, kernel_args):
        columns = sample(x, kernel_args)
        seen['columns'] = (columns.dtype, kernel_args.args[0].dtype)
        return columns

    def recording_column_grads(x, grad_columns, kernel_args, *grads):
        # grad_columns is a product's result: of half operands.
        seen['their gradient'] = (grad_columns.dtype,
                                  kernel_args.args[0].dtype)
        return column_grads(x, grad_columns, kernel_args, *grads)
    monkeypatch.setattr(gpu, 'sample_columns', recording_sample)
    monkeypatch.setattr(gpu, 'column_grads', recording_column_grads)
    with on('emulated') as device:
        run(device, inputs, gy, HALF_PARAMS)
    # The columns and their gradient half, the offsets (positions) float32.
    half, single = numpy.dtype(numpy.float16), numpy.dtype(numpy.float32)
    assert seen == {'columns': (half, single),
                    'their gradient': (half, single)}


@needs_compiler
def test_positions_in_half_would_miss_the_bounds(monkeypatch):
    # What float32 positions buy: the same kernels computing in half (as
    # torchvision does) miss both bounds on this case.
    from deformable import geometry
    inputs, gy, expected = half_case()
    monkeypatch.setattr(geometry, 'compute_dtype', numpy.dtype)
    with on('emulated') as device:
        results = run(device, inputs, gy, HALF_PARAMS)
    errors = half_errors(results, expected)
    assert errors.pop('y') > 1e-2
    assert max(errors.values()) > 1e-2, errors


@pytest.mark.parametrize('path', PATHS)
def test_deterministic_bits_on_a_large_layer(path, monkeypatch):
    # Products with long sums (4096 samples an image), where BLAS may split
    # or block them by their shapes: with blocks of an image, the output
    # and the gradients are the same bits for 1, 2 or 3 images a chunk.
    blocks_of(1, monkeypatch)
    rng = numpy.random.RandomState(5)
    inputs = helpers.make_general_inputs(
        rng, 3, 32, 32, 64, 64, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, True,
        spread=3, dtype=numpy.float32)
    gy = rng.uniform(-1, 1, (3, 32, 64, 64)).astype(numpy.float32)
    results = []
    for images in (3, 1, 2, 3):
        monkeypatch.setattr(gpu, 'chunks', lambda n, _, __, images=images: [
            slice(i, min(i + images, n)) for i in range(0, n, images)])
        with on(path) as device:
            results.append(run(device, inputs, gy, {'pad': 1},
                               cudnn_deterministic=True))
    for other in results[1:]:
        for name in results[0]:
            numpy.testing.assert_array_equal(other[name], results[0][name],
                                             name)
