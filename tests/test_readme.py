"""The README: its generated figures are those of the committed files, and
the files it names exist, and it names every file of the project."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'tools'))

import readme  # NOQA: E402


@pytest.fixture(scope='module')
def text():
    with open(readme.README) as f:
        return f.read()


def _section(text, title):
    """The README's section ``## title``, up to the next of its level."""
    match = re.search(r'^## {}\n(.*?)(?=^## |\Z)'.format(re.escape(title)),
                      text, re.S | re.M)
    assert match, 'no section ' + title
    return match.group(1)


def test_generated_figures_are_the_committed_ones(text):
    assert set(readme.blocks(text)) == set(readme.PRODUCERS)
    assert readme.regenerate(text) == text, (
        'README.md is out of date: run python tools/readme.py')


def test_regenerate_replaces_only_the_blocks():
    text = ('intro\n<!-- generated: a -->\nold\n<!-- end: a -->\nmiddle\n'
            '<!-- generated: b -->\n<!-- end: b -->\noutro\n')
    new = readme.regenerate(text, {'a': lambda: 'A', 'b': lambda: 'B\n'})
    assert new == ('intro\n<!-- generated: a -->\nA\n<!-- end: a -->\n'
                   'middle\n<!-- generated: b -->\nB\n<!-- end: b -->\n'
                   'outro\n')
    with pytest.raises(ValueError, match='unknown generated blocks: c'):
        readme.regenerate('<!-- generated: c -->\n<!-- end: c -->\n', {})


def test_named_files_exist(text):
    tops = ('deformable', 'experiments', 'tests', 'benchmarks', 'gpu_checks',
            'results', 'tools', 'notebooks', 'images', '.ci')
    paths = set(re.findall(r'\]\(([^)#]+)\)', text))
    paths |= {p for p in re.findall(r'`([\w./-]+)`', text)
              if p.split('/')[0] in tops}
    # experiments/result/: where the scripts write, by default.
    missing = [p for p in sorted(paths) if not p.startswith('http')
               and not p.startswith('experiments/result/')
               and not os.path.exists(os.path.join(ROOT, p))]
    assert not missing


def _tracked(*directories):
    files = subprocess.run(
        ['git', 'ls-files'] + list(directories), cwd=ROOT,
        stdout=subprocess.PIPE, universal_newlines=True).stdout.split()
    return [f for f in files if '__pycache__' not in f]


def test_layout_names_every_source_file(text):
    layout = _section(text, 'Layout')
    files = _tracked('deformable', 'experiments', 'benchmarks', 'gpu_checks',
                     'tools')
    if not files:
        pytest.skip('not a git checkout')
    unnamed = [f for f in files if os.path.basename(f) not in layout
               and os.path.dirname(f) + '/' not in layout]
    assert not unnamed


def test_tests_section_names_every_test_module(text):
    tests = _section(text, 'Tests')
    modules = [f for f in os.listdir(os.path.join(ROOT, 'tests'))
               if f.endswith('.py') and f != 'conftest.py']
    assert [m for m in sorted(modules) if m not in tests] == []


def test_pictures_exist(text):
    pictures = re.findall(r'!\[[^\]]*\]\(([^)]+)\)', text)
    assert {'images/deform_vis_1.png', 'images/non_deformable_vis_1.png',
            'images/modulated_vis_1.png'} <= set(pictures)
    for picture in pictures:
        assert os.path.isfile(os.path.join(ROOT, picture)), picture


def test_benchmark_tables_keep_every_figure():
    _, _, rows = readme._benchmark('cpu-op')
    table = readme.bench_op()
    assert len(rows) >= 6
    for row in rows:
        assert '{} ({})'.format(row['median (s)'], row['vs reference']) \
            in table


def test_onnx_block_refuses_a_failed_check(monkeypatch):
    real = readme._read('onnx', 'verify.txt')
    assert readme.onnx().count('1000/1000') == 6
    failed = real.replace('all checks passed', 'FAILED')
    monkeypatch.setattr(readme, '_read', lambda *path: failed)
    with pytest.raises(ValueError, match='the check failed'):
        readme.onnx()
