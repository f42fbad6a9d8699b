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


def benchmark(name):
    """A benchmark's output as ``benchmarks/record.sh`` wrote it: the
    command, the conditions (its first line) and its tables."""
    def produce():
        lines = _read('benchmarks', name + '.md').strip('\n').split('\n')
        out = ['`{}`'.format(lines[0][2:]), '']
        for line in lines[2:]:
            # Tables need blank lines around them in Markdown.
            is_row = line.startswith('|')
            if is_row != out[-1].startswith('|'):
                out.append('')
            out.append(line[2:] if line.startswith('# ') else line)
        return '\n'.join(out)
    return produce


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


def onnx():
    """The ONNX Runtime check (``results/onnx/verify.txt``)."""
    return '```\n{}\n```'.format(_read('onnx', 'verify.txt').strip())


PRODUCERS = {
    'results': results_tables.markdown,
    'demo': demo,
    'bench-op': benchmark('cpu-op'),
    'bench-train': benchmark('cpu-train'),
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
