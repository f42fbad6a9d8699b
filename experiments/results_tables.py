#!/usr/bin/env python
"""The README's results tables, made from the committed training logs.

    python experiments/results_tables.py            # prints the Markdown

``results/`` holds the runs (see the README, "Results"):

* ``regular/``, ``deformable/`` and ``modulated/`` (DCNv2): the full runs
  (``train_mnist.py`` with its default flags and ``--seed 0``): ``log``,
  plots and the final model;
* ``seeds/seed<N>/<model>/``: the seed check, shorter runs with other seeds
  (``log`` and plots);
* ``machine.txt``: where they ran.

``tools/readme.py`` puts it in the README, and ``tests/test_readme.py``
checks that the README shows exactly this output.
"""

import argparse
import glob
import json
import os
import re
import statistics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, 'results')
MODELS = ('regular', 'deformable', 'modulated')
# The seed table's differences: (minuend, subtrahend).
DIFFERENCES = (('deformable', 'regular'), ('modulated', 'deformable'))
TITLES = {
    'regular': 'Results on a convnet without Deformable Convolutions',
    'deformable': 'Results on a convnet with Deformable Convolutions',
    'modulated': 'Results on a convnet with Modulated Deformable '
                 'Convolutions (DCNv2)',
}
FULL_EPOCHS = 20
SEED_EPOCHS = 10  # the seed check's shorter runs
MAIN_SEED = 0
# Columns of train_mnist.py's PrintReport, as in the original's tables.
COLUMNS = ('epoch', 'main/loss', 'validation/main/loss', 'main/accuracy',
           'validation/main/accuracy', 'elapsed_time')
# The original README's figures (20 epochs, batch 100, Adam, a GPU); it
# has no modulated convnet.
ORIGINAL = {
    'regular': {'final': 0.9773, 'best': 0.9797, 'best_epoch': 19,
                'elapsed': 375.998},
    'deformable': {'final': 0.9853, 'best': 0.9862, 'best_epoch': 18,
                   'elapsed': 1179.27},
}


def read_log(path):
    with open(path) as f:
        return json.load(f)


def epoch_table(log):
    """The log in the layout of Chainer's PrintReport (the original's)."""
    widths = [max(10, len(column)) for column in COLUMNS]
    lines = ['  '.join('{:{}}'.format(column, width)
                       for column, width in zip(COLUMNS, widths))]
    for entry in log:
        lines.append(''.join('{:<{}g}  '.format(entry[column], width)
                             for column, width in zip(COLUMNS, widths)))
    return '\n'.join(line.rstrip() for line in lines)


def accuracy(entry):
    return entry['validation/main/accuracy']


def best(log):
    entry = max(log, key=accuracy)
    return accuracy(entry), entry['epoch']


def seed_runs(results=RESULTS):
    """``{seed: {model: log}}`` of the seed check (a model not run yet has no
    entry)."""
    runs = {}
    for path in sorted(glob.glob(os.path.join(results, 'seeds', 'seed*'))):
        seed = int(re.match(r'seed(\d+)$', os.path.basename(path)).group(1))
        runs[seed] = {model: read_log(os.path.join(path, model, 'log'))
                      for model in MODELS
                      if os.path.isfile(os.path.join(path, model, 'log'))}
    return runs


def _fmt(value):
    return '{:.4f}'.format(value)


def _mean_std(values):
    if len(values) < 2:
        return _fmt(values[0])
    return '{} ± {}'.format(_fmt(statistics.mean(values)),
                            _fmt(statistics.stdev(values)))


def markdown(results=RESULTS):
    logs = {model: read_log(os.path.join(results, model, 'log'))
            for model in MODELS}
    with open(os.path.join(results, 'machine.txt')) as f:
        machine = f.read().strip()
    out = []

    for model in MODELS:
        out += ['#### {} (ours, seed {})'.format(TITLES[model], MAIN_SEED),
                '', '```', epoch_table(logs[model]), '```', '']

    originals = [m for m in MODELS if m in ORIGINAL]
    out += ['#### Summary', '',
            '| | {} | {} |'.format(
                ' | '.join('{} (ours)'.format(m) for m in MODELS),
                ' | '.join('{} (original)'.format(m) for m in originals)),
            '|---|' + '---|' * (len(MODELS) + len(originals))]
    epochs = {model: logs[model][-1]['epoch'] for model in MODELS}
    bests = {model: best(logs[model]) for model in MODELS}
    rows = [
        ('epochs trained',
         [str(epochs[model]) + ('' if epochs[model] == FULL_EPOCHS
                                else ' of {} (in progress)'.format(
                                    FULL_EPOCHS)) for model in MODELS],
         [str(FULL_EPOCHS)] * len(originals)),
        ('validation accuracy, last epoch',
         [_fmt(accuracy(logs[model][-1])) for model in MODELS],
         [_fmt(ORIGINAL[model]['final']) for model in originals]),
        ('best validation accuracy (epoch)',
         ['{} ({})'.format(_fmt(bests[m][0]), bests[m][1]) for m in MODELS],
         ['{} ({})'.format(_fmt(ORIGINAL[m]['best']),
                           ORIGINAL[m]['best_epoch']) for m in originals]),
        ('seconds per epoch',
         ['{:.0f}'.format(logs[m][-1]['elapsed_time'] / epochs[m])
          for m in MODELS],
         ['{:.1f}'.format(ORIGINAL[m]['elapsed'] / FULL_EPOCHS)
          for m in originals]),
        ('machine', [machine] * len(MODELS),
         ['a GPU (not named)'] * len(originals)),
    ]
    for name, ours, original in rows:
        out.append('| {} | {} |'.format(name, ' | '.join(ours + original)))
    out.append('')

    seeds = seed_runs(results)
    if seeds:
        out += seed_table(seeds, logs)
    return '\n'.join(out).rstrip('\n')


def seed_table(seeds, logs):
    """The seed check's table: each model's accuracy after SEED_EPOCHS
    epochs by seed, the DIFFERENCES, and their means and spreads."""
    # The main run after SEED_EPOCHS epochs is the same as a run of
    # SEED_EPOCHS epochs with its seed: nothing depends on the total.
    seeds[MAIN_SEED] = {m: logs[m][:SEED_EPOCHS] for m in MODELS}
    differences = ['{} - {}'.format(*pair) for pair in DIFFERENCES]
    out = ['#### Seed check: validation accuracy after {} epochs'.format(
        SEED_EPOCHS), '',
        '| seed | {} |'.format(' | '.join(MODELS + tuple(differences))),
        '|---|' + '---|' * (len(MODELS) + len(DIFFERENCES))]
    done = {column: [] for column in MODELS + tuple(differences)}
    for seed in sorted(seeds):
        cells, finished = [], {}
        for model in MODELS:
            log = seeds[seed].get(model, [])
            if len(log) >= SEED_EPOCHS:
                finished[model] = accuracy(log[SEED_EPOCHS - 1])
                done[model].append(finished[model])
                cells.append(_fmt(finished[model]))
            else:
                cells.append('epoch {} of {} (in progress)'.format(
                    len(log), SEED_EPOCHS) if log else 'not run yet')
        for name, (a, b) in zip(differences, DIFFERENCES):
            if a in finished and b in finished:
                done[name].append(finished[a] - finished[b])
                cells.append('{:+.4f}'.format(done[name][-1]))
            else:
                cells.append('')
        out.append('| {} | {} |'.format(seed, ' | '.join(cells)))
    out.append('| mean ± std | {} |'.format(' | '.join(
        '{} (n = {})'.format(_mean_std(done[k]), len(done[k]))
        if done[k] else '' for k in MODELS + tuple(differences))))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--results', default=RESULTS,
                        help='results directory (default: %(default)s)')
    args = parser.parse_args(argv)
    try:
        print(markdown(args.results))
    except (OSError, ValueError) as e:
        raise SystemExit('error: {}'.format(e))


if __name__ == '__main__':
    main()
