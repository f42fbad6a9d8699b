#!/usr/bin/env python
"""The README's figures, made from the committed files that hold them.

    python tools/readme.py           # rewrites the generated blocks
    python tools/readme.py --check   # says which blocks are out of date

Each block of README.md between ``<!-- generated: NAME -->`` and ``<!--
end: NAME -->`` is the output of the producer of that name below, made
from files under ``results/`` (training logs, benchmark outputs, checks),
which the commands named next to each block write. ``tests/test_readme.py``
checks that the README shows exactly this output.
"""

import argparse
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, 'README.md')
RESULTS = os.path.join(ROOT, 'results')
sys.path.insert(0, os.path.join(ROOT, 'experiments'))

import results_tables  # NOQA: E402


def _read(*path):
    with open(os.path.join(RESULTS, *path)) as f:
        return f.read()


def _benchmark(name):
    """A benchmark's output as ``benchmarks/record.sh`` wrote it: its
    command, its conditions and the rows of its table, as dicts."""
    lines = _read('benchmarks', name + '.md').strip('\n').split('\n')
    conditions = [line[2:] for line in lines[1:] if line.startswith('# ')]
    return lines[0][2:], conditions, _table_rows(lines)


def _table_rows(lines):
    """The rows of the one Markdown table among ``lines``, as dicts by its
    header's names."""
    table = [[cell.strip() for cell in line.strip('|').split('|')]
             for line in lines if line.startswith('| ')]
    return [dict(zip(table[0], row)) for row in table[1:]]


def _caption(command, conditions):
    return '`{}`: {}\n'.format(command, '; '.join(conditions))


def bench_op():
    """The op benchmark: one row a shape and pass, one column an
    implementation, each cell its median and its ratio to the reference."""
    command, conditions, rows = _benchmark('cpu-op')
    names = list(dict.fromkeys(row['implementation'] for row in rows))
    cases = list(dict.fromkeys((row['shape'], row['pass']) for row in rows))
    cells = {(row['shape'], row['pass'], row['implementation']):
             '{} ({})'.format(row['median (s)'], row['vs reference'])
             for row in rows}
    peaks = {(row['shape'], row['pass']): row['peak MiB'] for row in rows
             if row['peak MiB']}
    out = [_caption(command, conditions),
           '| shape | pass | {} | peak MiB (ours) |'.format(
               ' | '.join(name + ', s' for name in names)),
           '|---' * (len(names) + 3) + '|']
    for shape, pass_ in cases:
        out.append('| {} | {} | {} | {} |'.format(
            shape, pass_, ' | '.join(cells[shape, pass_, name]
                                     for name in names),
            peaks.get((shape, pass_), '')))
    return '\n'.join(out)


def bench_train():
    """The training-step benchmark: one row a convnet."""
    command, conditions, rows = _benchmark('cpu-train')
    out = [_caption(command, conditions),
           '| convnet, one update of batch 100 | median (s) | vs regular |',
           '|---|---|---|']
    for row in rows:
        out.append('| {} | {} | {} |'.format(
            row['implementation'], row['median (s)'], row['vs reference']))
    return '\n'.join(out)


def demo():
    """``make demo``'s two runs (``results/demo/``)."""
    out = ['| run | validation accuracy (2000 test images) | seconds, '
           'evaluation included |', '|---|---|---|']
    for name in ('regular', 'deformable'):
        entry = json.loads(_read('demo', name, 'log'))[-1]
        out.append('| {} | {:.4f} | {:.0f} |'.format(
            name, entry['validation/main/accuracy'], entry['elapsed_time']))
    out += ['', _read('demo', 'make-demo.txt').strip()]
    return '\n'.join(out)


_CHECK = re.compile(
    r'^(\w+) \(batch (\d+)\): largest logit error (\S+) .*same class on '
    r'(\d+/\d+) images, accuracy Chainer (\S+) ONNX Runtime (\S+): ok$')


def onnx():
    """The ONNX Runtime check (``results/onnx/verify.txt``), in one table."""
    lines = _read('onnx', 'verify.txt').strip().split('\n')
    if not lines[-1].startswith('all checks passed'):
        raise ValueError('results/onnx/verify.txt: the check failed')
    runtime = next(line for line in lines
                   if line.startswith('ONNX Runtime '))
    checks = [match.groups() for match in map(_CHECK.match, lines) if match]
    times = {(row['convnet'], row['batch']): row
             for row in _table_rows(lines)}
    out = ['`{}` ([its output](results/onnx/verify.txt)), {}.'.format(
               lines[1].strip(), lines[0]), '',
           '{}; against {}:'.format(lines[2], runtime), '',
           '| convnet | batch | largest logit error, relative | same class | '
           'accuracy (Chainer / ONNX Runtime) | '
           'ms per image (Chainer / ONNX Runtime) |',
           '|---|---|---|---|---|---|']
    for name, batch, error, same, accuracy, accuracy_runtime in checks:
        row = times[name, batch]
        out.append('| {} | {} | {} | {} | {} / {} | {} / {} ({}) |'.format(
            name, batch, error, same, accuracy, accuracy_runtime,
            row['Chainer (ms)'], row['ONNX Runtime (ms)'],
            row['Chainer / ONNX Runtime']))
    return '\n'.join(out)


PRODUCERS = {
    'results': results_tables.markdown,
    'demo': demo,
    'bench-op': bench_op,
    'bench-train': bench_train,
    'onnx': onnx,
}

_BLOCK = re.compile(r'(<!-- generated: ([\w-]+) -->\n)(.*?)(<!-- end: \2 -->)',
                    re.S)


def blocks(text):
    """``{name: content}`` of the README's generated blocks."""
    return {m.group(2): m.group(3) for m in _BLOCK.finditer(text)}


def regenerate(text, producers=PRODUCERS):
    """The README text with every generated block made anew."""
    unknown = set(blocks(text)) - set(producers)
    if unknown:
        raise ValueError('unknown generated blocks: {}'.format(
            ', '.join(sorted(unknown))))
    return _BLOCK.sub(lambda m: '{}{}\n{}'.format(
        m.group(1), producers[m.group(2)]().strip('\n'), m.group(4)), text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--check', action='store_true',
                        help='only say which blocks are out of date')
    args = parser.parse_args(argv)
    with open(README) as f:
        text = f.read()
    try:
        updated = regenerate(text)
    except (OSError, ValueError) as e:
        raise SystemExit('error: {}'.format(e))
    stale = sorted(name for name, content in blocks(updated).items()
                   if blocks(text)[name] != content)
    missing = sorted(set(PRODUCERS) - set(blocks(text)))
    if args.check:
        for name in stale:
            print('out of date: {}'.format(name))
        for name in missing:
            print('not in the README: {}'.format(name))
        return 1 if stale or missing else 0
    with open(README, 'w') as f:
        f.write(updated)
    print('README.md: {} blocks, {} rewritten'.format(
        len(blocks(updated)), len(stale)))
    return 0


if __name__ == '__main__':
    sys.exit(main())
