#!/usr/bin/env python
"""Trains a deformable or a regular convnet on scaled MNIST.

    python train_mnist.py --gpu 0 --deformable 1  # result/model_iter_N
    python train_mnist.py --gpu 0 --deformable 0  # result/non_deformable_N
    python train_mnist.py --gpu 0 --deformable 2  # result/modulated_iter_N

Data-parallel over N processes with ChainerMN (``--batchsize`` images per
process and update):

    mpiexec -n 2 python train_mnist.py --communicator naive --deformable 1
"""

import argparse
import os
import pickle
import random
import zipfile
import zlib

# OpenBLAS's idle threads would busy-wait 0.1 s after every call, taking a
# core from the deformable op's threads (README, CPU implementations).
# Read when NumPy loads.
os.environ.setdefault('OPENBLAS_THREAD_TIMEOUT', '4')

import matplotlib
import numpy

import chainer
import chainer.links as L
from chainer import training
from chainer.training import extensions
import chainermn

import mnist_data
from models import KINDS
import plots
import scaled_mnist
import snapshots

COMMUNICATORS = ('naive', 'pure_nccl')  # ChainerMN's, for --communicator


def positive_int(value):
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(
            'must be a positive integer, got {}'.format(value))
    return number


def process_seed(seed, rank):
    """The seed of process ``rank``: ``seed`` itself for rank 0, so that a
    single process trains as without ChainerMN; for the others one derived
    from both, different for each."""
    if rank == 0:
        return seed
    return int(numpy.random.SeedSequence([seed, rank]).generate_state(1)[0])


def _random_states(serializer):
    """(De)serializes Python's and NumPy's global random states."""
    version, words, gauss_next = random.getstate()
    _, keys, pos, has_gauss, cached_gaussian = numpy.random.get_state()
    words = serializer('python_words', numpy.array(words, numpy.uint32))
    gauss_next = serializer('python_gauss_next', numpy.nan
                            if gauss_next is None else gauss_next)
    keys = serializer('numpy_keys', keys)
    pos = serializer('numpy_pos', pos)
    has_gauss = serializer('numpy_has_gauss', has_gauss)
    cached_gaussian = serializer('numpy_cached_gaussian', cached_gaussian)
    if isinstance(serializer, chainer.serializer.Deserializer):
        random.setstate((version, tuple(int(w) for w in words),
                         None if numpy.isnan(gauss_next)
                         else float(gauss_next)))
        numpy.random.set_state(('MT19937', keys, int(pos), int(has_gauss),
                                float(cached_gaussian)))


class ProcessStates(training.Extension):
    """Carries each process's random states and training order in trainer
    snapshots.

    The training images are drawn from Python's ``random`` and the
    shuffling from NumPy's; each process has its own, and under ChainerMN
    its own share of the data in its own order. With these restored a run
    resumed from a snapshot makes the same updates as one that was never
    interrupted. Rank 0 alone writes snapshots, so at each snapshot the
    other processes send it their states.
    """

    # After every other extension (they may draw), before the snapshots
    # (-100); with the snapshots' trigger.
    priority = -50

    def __init__(self, iterator, comm=None):
        self._iterator = iterator
        self._comm = comm
        self._gathered = None

    def _serialize_own(self, serializer):
        self._iterator.serialize(serializer['iterator'])
        _random_states(serializer['random'])

    def _own(self):
        state = {}
        self._serialize_own(chainer.serializers.DictionarySerializer(state))
        return state

    def __call__(self, trainer):
        if self._comm is not None:
            self._gathered = self._comm.gather_obj(self._own())

    def serialize(self, serializer):
        if isinstance(serializer, chainer.serializer.Serializer):
            states = [self._own()] if self._comm is None else self._gathered
            for rank, state in enumerate(states):
                for key, value in state.items():
                    serializer['rank{}'.format(rank)](key, value)
        else:
            rank = 0 if self._comm is None else self._comm.rank
            self._serialize_own(serializer['rank{}'.format(rank)])


class FlagMismatch(Exception):
    pass


class RunFlags(training.Extension):
    """Keeps in trainer snapshots the flags that a run resumed from one must
    share with the run that wrote it; loading one written with other values
    raises :class:`FlagMismatch`, naming the flag."""

    trigger = None  # state only: never called
    # How each flag is named in messages.
    NAMES = {'deformable': '--deformable', 'batchsize': '--batchsize',
             'train_size': '--train-size', 'test_size': '--test-size',
             'processes': 'mpiexec -n'}

    def __init__(self, **flags):
        self.flags = flags

    def __call__(self, trainer):
        pass

    def serialize(self, serializer):
        for key, value in sorted(self.flags.items()):
            saved = int(serializer(key, value))
            if saved != value:
                raise FlagMismatch(
                    'it was written by a run with {0} {1}, this one has {0} '
                    '{2}'.format(self.NAMES[key], saved, value))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Scaled MNIST with and without deformable convolutions')
    parser.add_argument('--gpu', '-g', type=int, default=-1,
                        help='GPU ID (negative value indicates CPU); with '
                        '--communicator, any GPU ID puts each process on the '
                        'GPU numbered by its rank within its machine')
    parser.add_argument('--deformable', '-d', type=int, choices=(0, 1, 2),
                        default=1, help='1: deformable convolutions (DCNv1), '
                        '0: regular ones, 2: modulated deformable ones '
                        '(DCNv2)')
    parser.add_argument('--batchsize', '-b', type=positive_int, default=100,
                        help='number of images in each mini-batch (of each '
                        'process, with --communicator)')
    parser.add_argument('--epoch', '-e', type=positive_int, default=20,
                        help='number of sweeps over the dataset to train')
    parser.add_argument('--out', '-o', default='result',
                        help='directory to write the results to')
    parser.add_argument('--seed', type=int, default=None,
                        help='random seed of the initialization, the '
                        'shuffling and the training images')
    parser.add_argument('--resume', '-r', default=None,
                        help='trainer snapshot to continue from '
                        '(OUT/snapshot_deformable_N, '
                        'OUT/snapshot_non_deformable_N or '
                        'OUT/snapshot_modulated_N)')
    parser.add_argument('--train-size', type=positive_int, default=None,
                        help='use the first N training images (default all)')
    parser.add_argument('--test-size', type=positive_int, default=None,
                        help='use the first N test images (default all)')
    parser.add_argument('--mnist-dir', default=None,
                        help='directory holding the four MNIST IDX files '
                        '(raw or .gz); default ${}, else the cache {}, else '
                        'fetched'.format(mnist_data.ENV_DIR,
                                         mnist_data.cache_dir()))
    parser.add_argument('--mnist-no-verify', action='store_true',
                        help='accept files in --mnist-dir that are not '
                        "MNIST's own (e.g. Fashion-MNIST); fetched and "
                        'cached files are always verified')
    parser.add_argument('--communicator', choices=COMMUNICATORS,
                        default=None, help='train data-parallel with '
                        'ChainerMN over the processes of mpiexec, with this '
                        'communicator (default: a single process without '
                        'ChainerMN)')
    args = parser.parse_args(argv)

    if args.gpu >= 0 and not chainer.backends.cuda.available:
        parser.error('--gpu {} needs CuPy and a CUDA GPU, which this Python '
                     'does not have (pip install -e ".[gpu]", or run on the '
                     'CPU with --gpu -1)'.format(args.gpu))
    if args.communicator == 'pure_nccl' and args.gpu < 0:
        parser.error('--communicator pure_nccl runs on GPUs only: add --gpu '
                     '0, or use --communicator naive on the CPU')
    if args.communicator is not None:
        try:
            import mpi4py.MPI  # NOQA: F401
        except (ImportError, RuntimeError) as e:
            parser.error('--communicator needs mpi4py and an MPI library '
                         '({}): pip install -e ".[distributed]"'.format(e))
    if args.resume is not None and not os.path.isfile(args.resume):
        parser.error('--resume: no such file: {}'.format(args.resume))
    return args


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


def create_communicator(args):
    """ChainerMN's communicator of ``--communicator`` (None without), and
    the device of this process."""
    if args.communicator is None:
        return None, chainer.get_device(args.gpu)
    from mpi4py import MPI
    # A process that dies of an exception takes the others with it instead
    # of leaving them waiting for it.
    chainermn.global_except_hook.add_hook()
    try:
        comm = chainermn.create_communicator(args.communicator)
    except RuntimeError as e:  # e.g. pure_nccl without NCCL
        fail(MPI.COMM_WORLD, '--communicator {}: {}'.format(
            args.communicator, e))
    if args.gpu < 0:
        return comm, chainer.get_device(-1)
    # naive gives MPI the GPU arrays themselves; an MPI that cannot read GPU
    # memory (like PyPI's MPICH) would crash on them.
    if (args.communicator == 'naive' and comm.size > 1
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


def load_data(args, comm):
    """Scaled MNIST on rank 0, scattered over the processes; and the whole
    sets' sizes."""
    train = test = error = sizes = None
    if comm is None or comm.rank == 0:
        try:
            train, test = scaled_mnist.get_scaled_mnist(
                args.mnist_dir, args.train_size, args.test_size,
                verify=False if args.mnist_no_verify else None)
            sizes = len(train), len(test)
        except (mnist_data.MNISTError, ValueError) as e:
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


def resume(trainer, path, flags):
    """Loads a trainer snapshot into ``trainer``; returns an error message
    (None on success).

    ``flags``, a :class:`RunFlags` of the trainer, are read first: a
    snapshot of a run with other flags is refused, naming the flag, before
    anything of it is loaded.
    """
    try:
        snapshots.load_npz(path, flags,
                           prefix='extensions/{}/'.format(flags.name))
        snapshots.load_npz(path, trainer)
    except snapshots.UnsafeSnapshotError as e:
        return 'cannot resume: {}.'.format(e)
    except FlagMismatch as e:
        return 'cannot resume from {}: {}; resume with the same ' \
            'flags.'.format(path, e)
    except KeyError as e:
        return 'cannot resume from {}: not a trainer snapshot of ' \
            'train_mnist.py (snapshot_[non_]deformable_N or ' \
            'snapshot_modulated_N), or one written ' \
            'before it kept its flags ({}).'.format(path, e.args[0])
    except (ValueError, OSError, EOFError, pickle.UnpicklingError,
            zipfile.BadZipFile, zlib.error) as e:
        return 'cannot resume from {}: unreadable ({}): not a trainer ' \
            'snapshot, or a truncated or damaged one.'.format(path, e)
    return None


def main(argv=None):
    args = parse_args(argv)
    matplotlib.use('Agg')  # PlotReport draws without a display
    comm, device = create_communicator(args)
    # Rank 0 alone prints and writes the results.
    writer = comm is None or comm.rank == 0
    processes = 1 if comm is None else comm.size

    if writer:
        print('GPU: {}'.format(args.gpu))
        print('# Minibatch-size: {}'.format(args.batchsize))
        print('# epoch: {}'.format(args.epoch))
        print('deformable: {}'.format(args.deformable))
        if comm is not None:
            print('# processes: {} ({})'.format(processes, args.communicator))
        print('')

    train, test, (train_size, test_size) = load_data(args, comm)

    if args.seed is not None:
        # random_expand draws from Python's random; the rest from NumPy's.
        seed = process_seed(args.seed, 0 if comm is None else comm.rank)
        random.seed(seed)
        numpy.random.seed(seed)

    kind = KINDS[args.deformable]
    predictor = kind.model_class(10)
    model = L.Classifier(predictor)
    device.use()
    model.to_device(device)

    optimizer = chainer.optimizers.Adam()
    if comm is not None:
        optimizer = chainermn.create_multi_node_optimizer(optimizer, comm)
    optimizer.setup(model)

    train_iter = chainer.iterators.SerialIterator(train, args.batchsize)
    test_iter = chainer.iterators.SerialIterator(
        test, args.batchsize, repeat=False, shuffle=False)

    updater = training.updaters.StandardUpdater(
        train_iter, optimizer, device=device)
    trainer = training.Trainer(updater, (args.epoch, 'epoch'), out=args.out)

    evaluator = extensions.Evaluator(test_iter, model, device=device)
    if comm is not None:
        evaluator = chainermn.create_multi_node_evaluator(evaluator, comm)
    trainer.extend(evaluator)

    snapshot_trigger = 1, 'epoch'
    flags = RunFlags(deformable=args.deformable, batchsize=args.batchsize,
                     train_size=train_size, test_size=test_size,
                     processes=processes)
    trainer.extend(flags)
    trainer.extend(ProcessStates(train_iter, comm), trigger=snapshot_trigger)

    if writer:
        trainer.extend(extensions.dump_graph('main/loss'))
        # The predictor alone, named as the original README expects, for
        # test_mnist.py; and the whole trainer, for --resume, named by kind
        # too since all kinds write to result/ by default.
        model_filename = kind.model_prefix + '{.updater.epoch}'
        trainer_filename = kind.trainer_prefix + '{.updater.epoch}'
        trainer.extend(extensions.snapshot_object(predictor, model_filename),
                       trigger=snapshot_trigger)
        trainer.extend(extensions.snapshot(filename=trainer_filename),
                       trigger=snapshot_trigger)

        trainer.extend(extensions.LogReport())
        for plot_report in plots.plot_reports():
            trainer.extend(plot_report)
        trainer.extend(extensions.PrintReport(
            ['epoch', 'main/loss', 'validation/main/loss',
             'main/accuracy', 'validation/main/accuracy', 'elapsed_time']))
        trainer.extend(extensions.ProgressBar())

    # Before anything is written to --out.
    if args.resume is not None:
        error = resume(trainer, args.resume, flags)
        if error:
            fail(comm, error)

    if comm is not None:
        # ChainerMN's optimizer spends its first update after each start on
        # broadcasting rank 0's weights; done here, every update trains, and
        # a resumed run repeats an unbroken one.
        comm.bcast_data(model)
        optimizer.is_changed(model)  # records the weights as broadcast

    trainer.run()
    return trainer


if __name__ == '__main__':
    main()
