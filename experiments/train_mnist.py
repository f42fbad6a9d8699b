#!/usr/bin/env python
"""Trains a deformable or a regular convnet on scaled MNIST.

    python train_mnist.py --gpu 0 --deformable 1  # result/model_iter_N
    python train_mnist.py --gpu 0 --deformable 0  # result/non_deformable_N
"""

import argparse
import os
import pickle
import random
import zipfile
import zlib

import matplotlib
import numpy

import chainer
import chainer.links as L
from chainer import training
from chainer.training import extensions

import mnist_data
from models import Convnet
from models import DeformableConvnet
import plots
import scaled_mnist


def positive_int(value):
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(
            'must be a positive integer, got {}'.format(value))
    return number


class RandomStates(training.Extension):
    """Carries Python's and NumPy's global random states in trainer snapshots.

    The training images are drawn from Python's ``random`` and the shuffling
    from NumPy's, so with these restored a run resumed from a snapshot makes
    the same updates as one that was never interrupted.
    """

    trigger = 1, 'epoch'

    def __call__(self, trainer):
        pass  # nothing to do between snapshots; see serialize

    def serialize(self, serializer):
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
            numpy.random.set_state(('MT19937', keys, int(pos),
                                    int(has_gauss), float(cached_gaussian)))


class FlagMismatch(Exception):
    pass


class RunFlags(training.Extension):
    """Keeps in trainer snapshots the flags that a run resumed from one must
    share with the run that wrote it; loading one written with other values
    raises :class:`FlagMismatch`, naming the flag."""

    trigger = None  # state only: never called
    # How each flag is named in messages.
    NAMES = {'deformable': '--deformable', 'batchsize': '--batchsize',
             'train_size': '--train-size', 'test_size': '--test-size'}

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
                        help='GPU ID (negative value indicates CPU)')
    parser.add_argument('--deformable', '-d', type=int, choices=(0, 1),
                        default=1, help='use deformable convolutions (1/0)')
    parser.add_argument('--batchsize', '-b', type=positive_int, default=100,
                        help='number of images in each mini-batch')
    parser.add_argument('--epoch', '-e', type=positive_int, default=20,
                        help='number of sweeps over the dataset to train')
    parser.add_argument('--out', '-o', default='result',
                        help='directory to write the results to')
    parser.add_argument('--seed', type=int, default=None,
                        help='random seed of the initialization, the '
                        'shuffling and the training images')
    parser.add_argument('--resume', '-r', default=None,
                        help='trainer snapshot to continue from '
                        '(OUT/snapshot_deformable_N or '
                        'OUT/snapshot_non_deformable_N)')
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
    args = parser.parse_args(argv)

    if args.gpu >= 0 and not chainer.backends.cuda.available:
        parser.error('--gpu {} needs CuPy and a CUDA GPU, which this Python '
                     'does not have (pip install -e ".[gpu]", or run on the '
                     'CPU with --gpu -1)'.format(args.gpu))
    if args.resume is not None and not os.path.isfile(args.resume):
        parser.error('--resume: no such file: {}'.format(args.resume))
    return args


def resume(trainer, path, flags):
    """Loads a trainer snapshot into ``trainer``; returns an error message
    (None on success).

    ``flags``, a :class:`RunFlags` of the trainer, are read first: a
    snapshot of a run with other flags is refused, naming the flag, before
    anything of it is loaded.
    """
    try:
        chainer.serializers.load_npz(
            path, flags, path='extensions/{}/'.format(flags.name))
        chainer.serializers.load_npz(path, trainer)
    except FlagMismatch as e:
        return 'cannot resume from {}: {}; resume with the same ' \
            'flags.'.format(path, e)
    except KeyError as e:
        return 'cannot resume from {}: not a trainer snapshot of ' \
            'train_mnist.py (snapshot_[non_]deformable_N), or one written ' \
            'before it kept its flags ({}).'.format(path, e.args[0])
    except (ValueError, OSError, EOFError, pickle.UnpicklingError,
            zipfile.BadZipFile, zlib.error) as e:
        return 'cannot resume from {}: unreadable ({}): not a trainer ' \
            'snapshot, or a truncated or damaged one.'.format(path, e)
    return None


def main(argv=None):
    args = parse_args(argv)
    matplotlib.use('Agg')  # PlotReport draws without a display

    print('GPU: {}'.format(args.gpu))
    print('# Minibatch-size: {}'.format(args.batchsize))
    print('# epoch: {}'.format(args.epoch))
    print('deformable: {}'.format(args.deformable))
    print('')

    if args.seed is not None:
        # random_expand draws from Python's random; the rest from NumPy's.
        random.seed(args.seed)
        numpy.random.seed(args.seed)

    if args.deformable:
        predictor = DeformableConvnet(10)
    else:
        predictor = Convnet(10)
    model = L.Classifier(predictor)
    device = chainer.get_device(args.gpu)
    device.use()
    model.to_device(device)

    optimizer = chainer.optimizers.Adam()
    optimizer.setup(model)

    try:
        train, test = scaled_mnist.get_scaled_mnist(
            args.mnist_dir, args.train_size, args.test_size,
            verify=False if args.mnist_no_verify else None)
    except (mnist_data.MNISTError, ValueError) as e:
        raise SystemExit('error: {}'.format(e))

    train_iter = chainer.iterators.SerialIterator(train, args.batchsize)
    test_iter = chainer.iterators.SerialIterator(
        test, args.batchsize, repeat=False, shuffle=False)

    updater = training.updaters.StandardUpdater(
        train_iter, optimizer, device=device)
    trainer = training.Trainer(updater, (args.epoch, 'epoch'), out=args.out)

    trainer.extend(extensions.Evaluator(test_iter, model, device=device))
    trainer.extend(extensions.dump_graph('main/loss'))

    # The predictor alone, named as the original README expects, for
    # test_mnist.py; and the whole trainer, for --resume, named by kind too
    # since both kinds write to result/ by default.
    if args.deformable:
        model_filename = 'model_iter_{.updater.epoch}'
        trainer_filename = 'snapshot_deformable_{.updater.epoch}'
    else:
        model_filename = 'non_deformable_{.updater.epoch}'
        trainer_filename = 'snapshot_non_deformable_{.updater.epoch}'
    trainer.extend(extensions.snapshot_object(predictor, model_filename),
                   trigger=(1, 'epoch'))
    trainer.extend(extensions.snapshot(filename=trainer_filename),
                   trigger=(1, 'epoch'))
    trainer.extend(RandomStates())
    flags = RunFlags(deformable=args.deformable, batchsize=args.batchsize,
                     train_size=len(train), test_size=len(test))
    trainer.extend(flags)

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
            raise SystemExit('error: ' + error)

    trainer.run()


if __name__ == '__main__':
    main()
