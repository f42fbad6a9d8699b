"""ChainerMN set-up for ``train_mnist.py --communicator``: checks, the
communicator and each process's device, data read by rank 0 and scattered.

Without ``--communicator`` every function here takes ``comm=None`` and
does what a single process does.
"""

import chainer
import chainermn

COMMUNICATORS = ('naive', 'pure_nccl')  # ChainerMN's, for --communicator

# pure_nccl packs the parameters into one buffer with two CUDA kernels of
# ChainerMN 7.8.1 (chainermn/communicators/_memory_utility.py) that use
# CUDA's `half`. CuPy 13's <cupy/carray.cuh> included <cuda_fp16.h>, which
# declares it; CuPy 14's does not (its float16 moved to cupy/float16.cuh),
# so they fail to compile ("error: expected an expression"). Including
# <cuda_fp16.h> after <cupy/carray.cuh> declares `half` under CuPy 14 and
# changes nothing under CuPy 13, where it is already in.
_CARRAY = '#include <cupy/carray.cuh>\n'
_FP16 = '#include <cuda_fp16.h>  // half; CuPy 14 no longer includes it\n'
HALF_KERNELS = ('_cupy_batched_pack_params', '_cupy_batched_unpack_params')


def check_args(parser, args):
    """Refuses, through ``parser``, a ``--communicator`` that cannot run:
    pure_nccl on the CPU, or no MPI."""
    if args.communicator == 'pure_nccl' and args.gpu < 0:
        parser.error('--communicator pure_nccl runs on GPUs only: add --gpu '
                     '0, or use --communicator naive on the CPU')
    if args.communicator is not None:
        try:
            import mpi4py.MPI  # NOQA: F401
        except (ImportError, RuntimeError) as e:
            parser.error('--communicator needs mpi4py and an MPI library '
                         '({}): pip install -e ".[distributed]"'.format(e))


def mpi_takes_gpu_arrays(mpi_comm):
    """Whether the MPI library reads GPU memory (is CUDA-aware), as the
    memory kinds it reports say (MPI 4.1); None where it reports none."""
    info = mpi_comm.Get_info()
    kinds = info.get('mpi_memory_alloc_kinds')
    info.Free()
    if kinds is None:
        return None
    return any(kind.startswith('cuda') for kind in kinds.split(','))


def fail(comm, message):
    """Ends this process; rank 0 says why (``comm``: a ChainerMN or MPI
    communicator, or None)."""
    if comm is None or comm.rank == 0:
        raise SystemExit('error: {}'.format(message))
    raise SystemExit(1)


def declare_half_in_chainermn_kernels():
    """Adds ``#include <cuda_fp16.h>`` to the CUDA sources of ChainerMN's
    packing kernels (``HALF_KERNELS``), which pure_nccl compiles on its
    first update, so that they compile under CuPy 14 too; a second call
    changes nothing. Raises RuntimeError where they are not ChainerMN
    7.8.1's."""
    from chainermn.communicators import _memory_utility
    for name in HALF_KERNELS:
        # Each function returns chainer.cuda.raw(SOURCE, NAME), SOURCE a
        # constant of its code: the constant is replaced, nothing else.
        code = getattr(getattr(_memory_utility, name, None), '__code__',
                       None)
        consts = code.co_consts if code is not None else ()
        found = [i for i, c in enumerate(consts)
                 if isinstance(c, str) and _CARRAY in c and 'half*' in c]
        if len(found) != 1:
            raise RuntimeError(
                "ChainerMN's {}.{} is not the CUDA kernel that "
                'experiments/distributed.py makes compile under CuPy 14 '
                "(ChainerMN 7.8.1's): see declare_half_in_chainermn_kernels "
                'there'.format(_memory_utility.__name__, name))
        i, = found
        if _FP16 in consts[i]:
            continue  # done before
        source = consts[i].replace(_CARRAY, _CARRAY + _FP16, 1)
        getattr(_memory_utility, name).__code__ = code.replace(
            co_consts=consts[:i] + (source,) + consts[i + 1:])


def create_communicator(communicator, gpu):
    """ChainerMN's communicator named ``communicator`` (None for None), and
    the device of this process (``gpu``: a GPU ID or negative)."""
    if communicator is None:
        return None, chainer.get_device(gpu)
    from mpi4py import MPI
    # A process that dies of an exception takes the others with it instead
    # of leaving them waiting for it.
    chainermn.global_except_hook.add_hook()
    try:
        if communicator == 'pure_nccl':
            declare_half_in_chainermn_kernels()  # for CuPy 14
        comm = chainermn.create_communicator(communicator)
    except RuntimeError as e:  # e.g. pure_nccl without NCCL
        fail(MPI.COMM_WORLD, '--communicator {}: {}'.format(communicator, e))
    if gpu < 0:
        return comm, chainer.get_device(-1)
    # naive gives MPI the GPU arrays themselves; an MPI that cannot read GPU
    # memory (like PyPI's MPICH) would crash on them.
    if (communicator == 'naive' and comm.size > 1
            and mpi_takes_gpu_arrays(comm.mpi_comm) is False):
        fail(comm, '--communicator naive with --gpu needs an MPI library '
             'that reads GPU memory (CUDA-aware), and this one does not: '
             'use --communicator pure_nccl on GPUs, or naive on the CPU')
    gpus = chainer.backends.cuda.cupy.cuda.runtime.getDeviceCount()
    # Every process learns whether any machine lacks GPUs, so all stop.
    if comm.allreduce_obj(int(comm.intra_size > gpus)):
        fail(comm, '--gpu: each process needs a GPU of its own, but a '
             'machine runs more processes than it has GPUs (here {} '
             'processes, {} GPUs): start fewer processes per '
             'machine'.format(comm.intra_size, gpus))
    return comm, chainer.get_device(comm.intra_rank)


def check_on_rank0(comm, check):
    """Runs ``check()``, which returns an error message or None, on rank 0
    alone; if it reports an error, every process stops, rank 0 saying
    why."""
    error = check() if comm is None or comm.rank == 0 else None
    if comm is not None:
        # In a list: ChainerMN's root broadcasts no bare None.
        error, = comm.bcast_obj([error] if comm.rank == 0 else None)
    if error:
        fail(comm, error)


def load_on_rank0(comm, load, errors):
    """``load()``'s ``(train, test)``, read by rank 0 alone and scattered
    over the processes (each gets its own contiguous share); and the whole
    sets' sizes. An exception of the classes ``errors`` stops every
    process, rank 0 saying why."""
    train = test = error = sizes = None
    if comm is None or comm.rank == 0:
        try:
            train, test = load()
            sizes = len(train), len(test)
        except errors as e:
            error = str(e)
    if comm is not None:
        error, sizes = comm.bcast_obj(
            (error, sizes) if comm.rank == 0 else None)
    if error:
        fail(comm, error)
    if comm is not None:
        train = chainermn.scatter_dataset(train, comm)
        test = chainermn.scatter_dataset(test, comm)
    return train, test, sizes


def start_from_rank0s_weights(comm, model, optimizer):
    """Gives every process rank 0's weights before the first update."""
    if comm is None:
        return
    # ChainerMN's optimizer spends its first update after each start on
    # broadcasting rank 0's weights; done here, every update trains, and a
    # resumed run repeats an unbroken one.
    comm.bcast_data(model)
    optimizer.is_changed(model)  # records the weights as broadcast
