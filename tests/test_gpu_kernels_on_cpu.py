"""The GPU path, CUDA kernels included, run on the CPU against the NumPy path.

``kernel_emulation`` compiles the kernels' own CUDA source for the CPU with
the semantics of CuPy's ``ElementwiseKernel``, so these tests execute
``forward_gpu`` and the gradient's ``forward_gpu`` in every CI run, where no
GPU is. They also compile the same source for real GPUs with ``nvcc``.
"""

import os
import re
import subprocess
import unittest

import numpy
import pytest

from chainer import testing

from deformable.backends import gpu

import helpers
from helpers import make_general_inputs
from helpers import make_inputs
from helpers import random_offset
import kernel_emulation


pytestmark = pytest.mark.skipif(
    not kernel_emulation.compiler_available(),
    reason='needs a C++ compiler ({}) to run the CUDA kernels on the '
           'CPU'.format(kernel_emulation.CXX))

run_op = helpers.run_op
disagreements = helpers.gpu_path_disagreements


def tolerance(dtype):
    return {numpy.float64: 1e-12, numpy.float32: 1e-5,
            numpy.float16: 2e-3}[dtype]


# The CPU path is the reference: either loops will do.
@testing.parameterize(*helpers.without(helpers.DCNV1_GRID, 'cpu_loops'))
class TestGpuPathOnCpu(unittest.TestCase):
    """Random offsets that push samples across and out of the image."""

    def test_agrees_with_numpy_path(self):
        seed = sum(self.ksize + self.stride + self.pad)
        rng = numpy.random.RandomState(seed)
        h, w = 6 + seed % 2, 7                    # rectangular
        inputs = make_inputs(self.n, 2, 3, h, w, self.ksize, self.stride,
                             self.pad, self.dtype, rng, spread=h,
                             nobias=self.nobias)
        gy = rng.uniform(-1, 1, (self.n, 3) + inputs[1].shape[2:]).astype(
            self.dtype)
        problems = disagreements(inputs, gy, tolerance(self.dtype),
                                 stride=self.stride, pad=self.pad)
        assert not problems, problems


@testing.parameterize(*helpers.pairwise(
    helpers.GENERAL_DIMENSIONS
    + [('dtype', [numpy.float64, numpy.float32, numpy.float16])],
    required=[dict(helpers.ALL_FEATURES, dtype=dtype)
              for dtype in (numpy.float64, numpy.float32, numpy.float16)]))
class TestGeneralGpuPathOnCpu(unittest.TestCase):
    """Dilation, groups, offset groups and the mask, and combinations."""

    def test_agrees_with_numpy_path(self):
        seed = (sum(self.dilate) + 3 * self.groups + 5 * self.offset_groups
                + self.with_mask)
        rng = numpy.random.RandomState(seed)
        x, offset, W, b, mask = make_general_inputs(
            rng, self.n, 8, 4, 7, 9, self.ksize, self.stride, self.pad,
            self.dilate, self.groups, self.offset_groups, self.with_mask,
            spread=7, nobias=self.nobias, dtype=self.dtype)
        gy = rng.uniform(-1, 1, (self.n, 4) + offset.shape[2:]).astype(
            self.dtype)
        problems = disagreements(
            (x, offset, W, b, mask), gy, tolerance(self.dtype),
            stride=self.stride, pad=self.pad, dilate=self.dilate,
            groups=self.groups)
        assert not problems, problems


def exact_case(dtype=numpy.float64, seed=0):
    rng = numpy.random.RandomState(seed)
    x = rng.uniform(-1, 1, (2, 3, 6, 5)).astype(dtype)
    W = rng.uniform(-1, 1, (4, 3, 3, 3)).astype(dtype)
    b = rng.uniform(-1, 1, (4,)).astype(dtype)
    gy = rng.uniform(-1, 1, (2, 4, 6, 5)).astype(dtype)
    offset = random_offset((2, 18, 6, 5), 2, rng).astype(dtype)
    return x, offset, W, b, gy, rng


class TestSpecialOffsets(unittest.TestCase):

    def check(self, x, offset, W, b, gy):
        problems = disagreements((x, offset, W, b), gy,
                                 tolerance(x.dtype.type), stride=1, pad=1)
        assert not problems, problems

    def test_integer_positions(self):
        # Exactly on pixels, on the borders and beyond: the kinks of
        # bilinear interpolation and the forward-difference convention.
        x, offset, W, b, gy, rng = exact_case()
        offset = rng.randint(-7, 8, size=offset.shape).astype(numpy.float64)
        self.check(x, offset, W, b, gy)

    def test_clamping_limits(self):
        # -1 and the far border, where clamping starts.
        x, offset, W, b, gy, rng = exact_case()
        grid_y = numpy.arange(6)[:, None] - 1 + numpy.repeat(
            numpy.arange(3), 3)[:, None, None]
        grid_x = numpy.arange(5)[None, :] - 1 + numpy.tile(
            numpy.arange(3), 3)[:, None, None]
        for target_y, target_x in [(-1, -1), (6, 5), (5, 4), (-1.5, 5.5)]:
            offset[:, 9:] = target_y - grid_y
            offset[:, :9] = target_x - grid_x
            self.check(x, offset, W, b, gy)

    def test_infinite_and_huge(self):
        x, offset, W, b, gy, _ = exact_case()
        offset[0, 3, 1, 2] = numpy.inf
        offset[0, 12, 4, 4] = -numpy.inf
        offset[1, 0, 0, 0] = 1e30
        offset[1, 17, 5, 1] = -1e10
        offset[1, 9:, 3] = numpy.inf
        self.check(x, offset, W, b, gy)

    def test_nan(self):
        x, offset, W, b, gy, _ = exact_case()
        offset[1, 4, 2, 3] = numpy.nan
        offset[0, 10, 0, 4] = numpy.nan
        offset[0, :, 5, 0] = numpy.nan
        self.check(x, offset, W, b, gy)

    def test_float32_and_float16(self):
        for dtype in (numpy.float32, numpy.float16):
            x, offset, W, b, gy, _ = exact_case(dtype)
            offset[0, 3, 1, 2] = numpy.inf
            offset[1, 4, 2, 3] = numpy.nan
            self.check(x, offset, W, b, gy)


# Bugs planted in the kernels, each of which these tests must catch:
# (kernel constant in gpu, old text, new text).
PLANTED_BUGS = {
    'swapped fraction': (
        'SAMPLE_COLUMNS', '(1 - fy) * ((1 - fx) * pixel',
        '(1 - fx) * ((1 - fy) * pixel'),
    'wrong tap decode': (
        'PREAMBLE', 'k / kw * dil_y', 'k % kw * dil_y'),
    'dropped corner': (
        'PREAMBLE', 'q < 4', 'q < 3'),
    'offset gradient sign': (
        'COLUMN_GRADS', 'grad_x = (1 - fy) * (s01 - s00)',
        'grad_x = (1 - fy) * (s00 - s01)'),
    'NaN sample scattered': (
        'COLUMN_GRADS', 'want_x && inside_y && inside_x', 'want_x'),
    'mask left out of the scatter': (
        'COLUMN_GRADS', 'modulated[q] = weight[q] * m',
        'modulated[q] = weight[q]'),
    'mask gradient of the wrong corner': (
        'COLUMN_GRADS', '+ weight[2] * s10', '+ weight[2] * s11'),
    'wrong offset group': (
        'PREAMBLE', 'const ptrdiff_t n_group = n * G + group;',
        'const ptrdiff_t n_group = n * G;'),
    'dilation dropped': (
        'PREAMBLE', 'k % kw * dil_x', 'k % kw'),
}


@testing.parameterize(*testing.product({'bug': sorted(PLANTED_BUGS)}))
class TestPlantedBugsAreCaught(unittest.TestCase):

    def test_caught(self):
        # One case with every feature on, and a NaN offset.
        rng = numpy.random.RandomState(0)
        x, offset, W, b, mask = make_general_inputs(
            rng, 2, 4, 4, 6, 7, (3, 3), (1, 1), (2, 1), (2, 2), 2, 2, True,
            spread=3)
        offset[1, 4, 2, 3] = numpy.nan
        gy = rng.uniform(-1, 1, (2, 4) + offset.shape[2:])
        params = {'pad': (2, 1), 'dilate': (2, 2), 'groups': 2}
        assert not disagreements((x, offset, W, b, mask), gy, 1e-12,
                                 **params)
        with kernel_emulation.planted(*PLANTED_BUGS[self.bug]):
            problems = disagreements((x, offset, W, b, mask), gy, 1e-12,
                                     **params)
        assert problems, 'planted bug not caught: ' + self.bug


class Test64BitIndices(unittest.TestCase):
    """Arrays of more than 2**31 elements, with indices past 2**31.

    The big arrays are zeros that are never touched but for a few pages,
    so the operating system maps them lazily: 8 GiB each of address space,
    tens of megabytes of memory. Only the threads of the last samples run
    (``begin``); for the last channel they must compute what the same
    threads compute in a one-channel problem, whose indices are small.
    """

    c, h, w = 2 ** 11 + 8, 2 ** 10, 2 ** 10     # c * h * w > 2 ** 31
    rows = 3

    def setUp(self):
        assert self.c * self.h * self.w > 2 ** 31
        rng = numpy.random.RandomState(0)
        self.plane = self.h * self.w
        self.window = self.rows * self.w
        self.last_rows = rng.uniform(-1, 1, (self.rows + 1, self.w)).astype(
            numpy.float32)
        self.offset = numpy.zeros((1, 2, self.h, self.w), numpy.float32)
        self.offset.reshape(2, -1)[:, -self.window:] = rng.uniform(
            -1.7, 0.6, (2, self.window))
        self.gcol = rng.uniform(-1, 1, self.window).astype(numpy.float32)

    def run_kernel(self, source, c, inputs, outputs, size=None, **kwargs):
        # A 1x1 kernel, stride 1, no pad, no mask: one thread per sample,
        # the columns one block.
        geometry = (self.offset, self.offset, 0, self.plane, c, self.h,
                    self.w, self.h, self.w, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1,
                    self.plane)
        kernel_emulation.elementwise(
            source.all_in_params, source.out_params, source.body,
            source.name, preamble=gpu.PREAMBLE)(
                *(inputs + geometry + outputs), size=size or self.plane,
                **kwargs)

    def gather(self, gcol, gx, **kwargs):
        """The deterministic adjoint: the corners' entries, their stable
        sort by pixel, and one thread per pixel of gx."""
        keys = numpy.empty(4 * self.plane, numpy.int64)
        weights = numpy.empty(4 * self.plane, numpy.float32)
        self.run_kernel(gpu.CORNER_ENTRIES, gx.shape[1], (0, 0),
                        (keys, weights))
        entries = numpy.argsort(keys, kind='stable')
        starts = numpy.searchsorted(keys[entries],
                                    numpy.arange(self.plane + 1))
        self.run_kernel(gpu.GATHER_CORNERS, gx.shape[1],
                        (gcol, entries, starts, weights, 0), (gx,),
                        size=gx.size, **kwargs)

    def scatter(self, gcol, gx, **kwargs):
        # x is not read: any array will do.
        unused = numpy.zeros(0, numpy.float32)
        self.run_kernel(gpu.COLUMN_GRADS, gx.shape[1], (unused, gcol, 1, 0),
                        (gx, unused, unused), **kwargs)

    def offset_grads(self, x, gcol, goffset, **kwargs):
        unused = numpy.zeros(0, numpy.float32)
        self.run_kernel(gpu.COLUMN_GRADS, x.shape[1], (x, gcol, 0, 1),
                        (unused, goffset, unused), **kwargs)

    def small_problem(self):
        """The last channel alone: (columns, gx, goffset)."""
        x = numpy.zeros((1, 1, self.h, self.w), numpy.float32)
        x[0, 0, -self.rows - 1:] = self.last_rows
        columns = numpy.zeros((1, self.plane), numpy.float32)
        self.run_kernel(gpu.SAMPLE_COLUMNS, 1, (x,), (columns,))
        gcol = numpy.zeros_like(columns)
        gcol[0, -self.window:] = self.gcol
        gx = numpy.zeros_like(x)
        self.scatter(gcol, gx)
        gathered = numpy.zeros_like(x)
        self.gather(gcol, gathered)
        goffset = numpy.zeros_like(self.offset)
        self.offset_grads(x, gcol, goffset)
        return columns[0], gx[0, 0], gathered[0, 0], goffset

    def test_indices_past_2_31(self):
        columns_1, gx_1, gathered_1, goffset_1 = self.small_problem()
        c, plane, window = self.c, self.plane, self.window
        last = {'begin': plane - window}
        x = numpy.zeros((1, c, self.h, self.w), numpy.float32)
        x[0, -1, -self.rows - 1:] = self.last_rows
        columns = numpy.zeros((c, plane), numpy.float32)
        self.run_kernel(gpu.SAMPLE_COLUMNS, c, (x,), (columns,), **last)
        numpy.testing.assert_array_equal(
            columns[-1, -window:], columns_1[-window:])

        columns[-1, -window:] = self.gcol
        goffset = numpy.zeros_like(self.offset)
        self.offset_grads(x, columns, goffset, **last)
        numpy.testing.assert_array_equal(goffset, goffset_1)
        del x

        gx = numpy.zeros((1, c, self.h, self.w), numpy.float32)
        self.scatter(columns, gx, **last)
        numpy.testing.assert_array_equal(gx[0, -1], gx_1)
        del gx

        # The gather, from the pixels of the last channel's last rows on
        # (its window's samples land there).
        gx = numpy.zeros((1, c, self.h, self.w), numpy.float32)
        self.gather(columns, gx, begin=gx.size - (self.rows + 3) * self.w)
        numpy.testing.assert_array_equal(gx[0, -1], gathered_1)
        assert numpy.abs(gathered_1 - gx_1).max() <= 1e-6

    def test_index_types_in_source(self):
        # Every flat index that is a product of sizes is ptrdiff_t.
        text = gpu.PREAMBLE + ''.join(k.operation for k in gpu.KERNELS)
        names = ('p|ch|n|off|plane|n_group|mask_at|first_channel|first|'
                 'stride')
        declared = dict((name, kind) for kind, name in re.findall(
            r'\b(int|ptrdiff_t)\s+(' + names + r')\b\s*=', text))
        assert set(declared) == set(names.split('|'))
        assert set(declared.values()) == {'ptrdiff_t'}, declared
        assert 'int64 P' in gpu.GEOMETRY_PARAMS


@pytest.mark.skipif(not kernel_emulation.compiler_available(
    kernel_emulation.NVCC), reason='needs nvcc (the CUDA compiler)')
@pytest.mark.parametrize('arch', ['sm_75', 'sm_90'])
def test_kernels_compile_for_gpus(arch, tmp_path):
    source = tmp_path / 'kernels.cu'
    source.write_text(kernel_emulation.cuda_source())
    result = subprocess.run(
        [kernel_emulation.NVCC, '-c', '-arch=' + arch, '-Werror',
         'all-warnings', '-o', os.devnull, str(source)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        universal_newlines=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.skipif(not kernel_emulation.compiler_available(),
                    reason='needs a C++ compiler')
def test_memcheck_case_runs(monkeypatch, capsys):
    # gpu_checks/memcheck_case.py, which compute-sanitizer runs on a GPU,
    # end to end on the emulated path: every case, dtype and mode.
    import sys
    import types
    from deformable import tuning
    fake_cupy = types.SimpleNamespace(
        asarray=numpy.asarray, asnumpy=numpy.asarray,
        cuda=types.SimpleNamespace(
            set_allocator=lambda allocator: None,
            Device=lambda: types.SimpleNamespace(synchronize=lambda: None)))
    monkeypatch.setitem(sys.modules, 'cupy', fake_cupy)
    monkeypatch.setattr(sys, 'argv', ['memcheck_case.py'])
    monkeypatch.setattr(tuning, 'GPU_DETERMINISTIC_BLOCK_BYTES',
                        tuning.GPU_DETERMINISTIC_BLOCK_BYTES)
    monkeypatch.syspath_prepend(os.path.join(
        os.path.dirname(os.path.abspath(__file__)), '..', 'gpu_checks'))
    import memcheck_case
    blocks = []
    chunks = gpu.chunks

    def recording(n_images, bytes_per_image, block_images=None):
        blocks.append(block_images)
        return chunks(n_images, bytes_per_image, block_images)
    monkeypatch.setattr(gpu, 'chunks', recording)
    with kernel_emulation.gpu_path_on_cpu():
        memcheck_case.main()
    assert '5 cases x 3 dtypes x 5 modes' in capsys.readouterr().out
    # The deterministic mode in blocks of one image and of whole batches.
    assert {None, 1, 2, 3} <= set(blocks)
