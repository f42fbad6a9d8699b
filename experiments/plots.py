#!/usr/bin/env python
"""The loss and accuracy plots of train_mnist.py, drawn during training or
again from a run's log.

    python experiments/plots.py              # every committed run in results/
    python experiments/plots.py RUN_DIR ...  # RUN_DIR/log -> RUN_DIR/*.png

A run's ``loss.png`` and ``accuracy.png`` are drawn by Chainer's PlotReport
from the same means as its ``log`` (LogReport's), so redrawing them from the
log gives the same files, byte for byte (``tests/test_results.py`` checks
the committed ones).
"""

import argparse
import glob
import json
import os
import types

import matplotlib
import numpy

import chainer
from chainer.training import extensions

RESULTS = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'results')
# File name and the log's keys it shows, against the epoch.
PLOTS = (('loss.png', ('main/loss', 'validation/main/loss')),
         ('accuracy.png', ('main/accuracy', 'validation/main/accuracy')))


class PlotReport(extensions.PlotReport):
    """Chainer's PlotReport whose state in a trainer snapshot includes its
    trigger and summary, as LogReport's does.

    Chainer 7.8.1's keeps only the points: resumed, its trigger starts from
    epoch 0 again, fires at the first update and adds a point holding that
    one batch's loss and accuracy.
    """

    def serialize(self, serializer):
        super(PlotReport, self).serialize(serializer)
        self._trigger.serialize(serializer['_trigger'])
        self._summary.serialize(serializer['_summary'])


def plot_reports():
    """The trainer extensions that draw the plots, one per file."""
    if not extensions.PlotReport.available():
        return []
    return [PlotReport(list(keys), 'epoch', filename=name)
            for name, keys in PLOTS]


def draw(log, out):
    """Draws the plots of a ``log`` (LogReport's list of entries) in ``out``
    as the trainer that wrote the log drew them at its last epoch."""
    matplotlib.use('Agg')
    last = log[-1]
    # A stand-in for the trainer at its last epoch, with nothing new to add.
    trainer = types.SimpleNamespace(
        observation={}, is_before_training=True, out=out,
        updater=types.SimpleNamespace(epoch=last['epoch'],
                                      iteration=last['iteration']))
    for (name, keys), report in zip(PLOTS, plot_reports()):
        # Restored as from a snapshot, with the log's points.
        state = {}
        report.serialize(chainer.serializers.DictionarySerializer(state))
        state['_plot_' + name] = json.dumps(
            {key: [[entry['epoch'], entry[key]] for entry in log
                   if key in entry] for key in keys})
        report.serialize(chainer.serializers.NpzDeserializer(
            {key: numpy.asarray(value) for key, value in state.items()}))
        report(trainer)


def redraw(run_dir):
    """``run_dir/log`` -> ``run_dir/loss.png``, ``run_dir/accuracy.png``."""
    with open(os.path.join(run_dir, 'log')) as f:
        draw(json.load(f), run_dir)


def committed_runs(results=RESULTS):
    """The directories of ``results/`` that hold a training log."""
    return sorted(os.path.dirname(path) for path in glob.glob(
        os.path.join(results, '**', 'log'), recursive=True))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('runs', nargs='*', metavar='RUN_DIR',
                        help='directories holding a log (default: those '
                        'under {})'.format(RESULTS))
    args = parser.parse_args(argv)
    for run_dir in args.runs or committed_runs():
        try:
            redraw(run_dir)
        except (OSError, ValueError, KeyError, IndexError) as e:
            raise SystemExit('error: cannot redraw {}: {}: {}'.format(
                run_dir, type(e).__name__, e))
        print(run_dir)


if __name__ == '__main__':
    main()
