#!/usr/bin/env python
"""Trains a deformable or a regular convnet on scaled MNIST.

    python train_mnist.py --gpu 0 --deformable 1  # result/model_iter_N
    python train_mnist.py --gpu 0 --deformable 0  # result/non_deformable_N
    python train_mnist.py --gpu 0 --deformable 2  # result/modulated_iter_N

Data-parallel over N processes with ChainerMN (``--batchsize`` images per
process and update):

    mpiexec -n 2 python train_mnist.py --communicator naive --deformable 1

ChainerMN's set-up is in distributed.py; what makes a resumed run repeat an
unbroken one, in exact_resume.py.
"""

import argparse
import os
import random

# OpenBLAS's idle threads would busy-wait 0.1 s after every call, taking a
# core from the deformable op's threads (README, CPU implementations).
# Read when NumPy loads.
os.environ.setdefault('OPENBLAS_THREAD_TIMEOUT', '4')

import matplotlib
import numpy

import chainer
from chainer import training
from chainer.training import extensions
import chainermn

import distributed
import exact_resume
import mnist_data
from models import DoubleBackpropClassifier
from models import KINDS
import plots
import scaled_mnist
import writable


def positive_int(value):
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(
            'must be a positive integer, got {}'.format(value))
    return number


def non_negative_float(value):
    number = float(value)
    if not number >= 0 or number == float('inf'):
        raise argparse.ArgumentTypeError(
            'must be a non-negative number, got {}'.format(value))
    return number


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
    parser.add_argument('--double-backprop', type=non_negative_float,
                        default=0.0, metavar='LAMBDA',
                        help='double backpropagation: add LAMBDA times the '
                        "mean over the batch of the squared norm of each "
                        "image's loss gradient w.r.t. the image (reported "
                        'as main/penalty; default 0: off)')
    parser.add_argument('--mnist-dir', default=None,
                        help='directory holding the four MNIST IDX files '
                        '(raw or .gz); default ${}, else the cache {}, else '
                        'fetched'.format(mnist_data.ENV_DIR,
                                         mnist_data.cache_dir()))
    parser.add_argument('--mnist-no-verify', action='store_true',
                        help='accept files in --mnist-dir that are not '
                        "MNIST's own (e.g. Fashion-MNIST); fetched and "
                        'cached files are always verified')
    parser.add_argument('--communicator', choices=distributed.COMMUNICATORS,
                        default=None, help='train data-parallel with '
                        'ChainerMN over the processes of mpiexec, with this '
                        'communicator (default: a single process without '
                        'ChainerMN)')
    args = parser.parse_args(argv)

    if args.gpu >= 0 and not chainer.backends.cuda.available:
        parser.error('--gpu {} needs CuPy and a CUDA GPU, which this Python '
                     'does not have (pip install -e ".[gpu]", or run on the '
                     'CPU with --gpu -1)'.format(args.gpu))
    distributed.check_args(parser, args)
    if args.resume is not None and not os.path.isfile(args.resume):
        parser.error('--resume: no such file: {}'.format(args.resume))
    return args


def load_data(args):
    """Scaled MNIST's training and test sets, as the flags ask."""
    return scaled_mnist.get_scaled_mnist(
        args.mnist_dir, args.train_size, args.test_size,
        verify=False if args.mnist_no_verify else None)


def main(argv=None):
    args = parse_args(argv)
    matplotlib.use('Agg')  # PlotReport draws without a display
    comm, device = distributed.create_communicator(
        args.communicator, args.gpu)
    rank = 0 if comm is None else comm.rank
    writer = rank == 0  # rank 0 alone prints and writes the results
    # Before any work, not at the first snapshot an epoch later.
    distributed.check_on_rank0(
        comm, lambda: writable.directory_problem(args.out))
    processes = 1 if comm is None else comm.size

    if writer:
        print('GPU: {}'.format(args.gpu))
        print('# Minibatch-size: {}'.format(args.batchsize))
        print('# epoch: {}'.format(args.epoch))
        print('deformable: {}'.format(args.deformable))
        if comm is not None:
            print('# processes: {} ({})'.format(processes, args.communicator))
        print('')

    train, test, (train_size, test_size) = distributed.load_on_rank0(
        comm, lambda: load_data(args), (mnist_data.MNISTError, ValueError))

    if args.seed is not None:
        # random_expand draws from Python's random; the rest from NumPy's.
        seed = exact_resume.process_seed(args.seed, rank)
        random.seed(seed)
        numpy.random.seed(seed)

    kind = KINDS[args.deformable]
    predictor = kind.model_class(10)
    model = DoubleBackpropClassifier(predictor, args.double_backprop)
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
    flags = exact_resume.RunFlags(
        deformable=args.deformable, batchsize=args.batchsize,
        train_size=train_size, test_size=test_size, processes=processes,
        double_backprop=args.double_backprop)
    trainer.extend(flags)
    trainer.extend(exact_resume.ProcessStates(train_iter, comm),
                   trigger=snapshot_trigger)

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
            ['epoch', 'main/loss'] + (['main/penalty'] if args.double_backprop
                                      else [])
            + ['validation/main/loss', 'main/accuracy',
               'validation/main/accuracy', 'elapsed_time']))
        trainer.extend(extensions.ProgressBar())

    # Before anything is written to --out.
    if args.resume is not None:
        error = exact_resume.resume(trainer, args.resume, flags,
                                    args.epoch)
        if error:
            distributed.fail(comm, error)
    distributed.start_from_rank0s_weights(comm, model, optimizer)

    trainer.run()
    return trainer


if __name__ == '__main__':
    main()
