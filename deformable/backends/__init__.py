"""The backends of the deformable-convolution op, behind one interface.

Three backends compute the op: the CPU path with pure-NumPy loops
(``numpy_loops``) or with loops compiled by Numba (``numba_loops``), both
driven by ``cpu.CpuBackend``, and the CuPy kernels (``gpu.GpuBackend``).
Each offers:

``forward(hyperparameters, x, offset, W, b, mask) -> (y, kept)``
    The output, of ``x``'s dtype, and what the backward may reuse (the
    backend's own business: the NumPy loops' columns by block, the GPU's
    columns, or None).

``backward(hyperparameters, x, offset, W, gy, mask, kept, needed) ->
{name: gradient}``
    The gradients named in ``needed`` (a set of ``'x'``, ``'offset'``,
    ``'W'``, ``'mask'``), each of its input's dtype, computing nothing
    for the others.

``b`` and ``mask`` may be None; ``hyperparameters`` is an
``arguments.Hyperparameters``. Where samples fall is ``geometry``'s one
definition; how the columns and the weight are laid out is ``layout``'s.
"""

import importlib
import os

import chainer

from deformable import tuning


# 'auto': compiled loops where Numba imports; 'never': pure NumPy; 'always':
# Numba or an error. Chainer config, so `chainer.using_config` switches it.
if not hasattr(chainer.global_config, 'deformable_use_numba'):
    chainer.global_config.deformable_use_numba = os.environ.get(
        'DEFORMABLE_USE_NUMBA', 'auto')

# Bytes the GPU's buffers for one chunk of images may take (the batch goes
# through in chunks of whole images; gpu.workspace_size checks the value).
if not hasattr(chainer.global_config, 'deformable_workspace_size'):
    _size = os.environ.get('DEFORMABLE_WORKSPACE_SIZE', '').strip()
    chainer.global_config.deformable_workspace_size = (
        (int(_size) if _size.isdigit() else _size) if _size
        else tuning.GPU_WORKSPACE_BYTES)

_cpu_backends = {}


def cpu_backend():
    """The CPU backend that ``chainer.config.deformable_use_numba`` picks."""
    mode = chainer.config.deformable_use_numba
    if mode not in ('auto', 'never', 'always'):
        raise ValueError(
            "chainer.config.deformable_use_numba must be 'auto', 'never' or "
            "'always', not {!r}".format(mode))
    loops = None
    if mode != 'never':
        try:
            loops = importlib.import_module(
                'deformable.backends.numba_loops').Loops
        except ImportError:
            if mode == 'always':
                raise ImportError(
                    "deformable_use_numba is 'always' but Numba is not "
                    "installed: pip install numba (or pip install "
                    "'deformable[fast]')")
    if loops is None:
        from deformable.backends import numpy_loops
        loops = numpy_loops.Loops
    if loops not in _cpu_backends:
        from deformable.backends import cpu
        _cpu_backends[loops] = cpu.CpuBackend(loops)
    return _cpu_backends[loops]


def gpu_backend():
    """The CuPy backend."""
    from deformable.backends import gpu
    return gpu.BACKEND
