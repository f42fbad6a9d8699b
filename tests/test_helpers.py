"""The tests' own machinery (helpers.py, conftest.py): the CPU loops a test
names are the ones that compute, and the grids have every pair."""

import itertools
import unittest

import numpy
import pytest

from chainer import testing

from deformable import backends

import helpers


def assert_all_pairs(dimensions, cases):
    for (name_a, values_a), (name_b, values_b) in itertools.combinations(
            dimensions, 2):
        for a, b in itertools.product(values_a, values_b):
            assert any(case[name_a] == a and case[name_b] == b
                       for case in cases), (name_a, a, name_b, b)


def test_pairwise_covers_every_pair():
    dimensions = [('a', range(4)), ('b', 'xyz'), ('c', [False, True]),
                  ('d', range(3)), ('e', [None, 1.5])]
    cases = helpers.pairwise(dimensions)
    assert_all_pairs(dimensions, cases)
    # Far fewer than the product (144); at least the two largest's 12.
    assert 12 <= len(cases) <= 16
    assert cases == helpers.pairwise(dimensions)


def test_pairwise_keeps_required_cases_and_joint_dimensions():
    dimensions = [(('width', 'groups'), [(8, 1), (9, 2), (4, 1)]),
                  ('dtype', [numpy.float32, numpy.float64]),
                  ('mask', [False, True])]
    required = [{'width': 9, 'groups': 2, 'dtype': numpy.float64,
                 'mask': True}, {'mask': False, 'dtype': numpy.float32}]
    cases = helpers.pairwise(dimensions, required=required)
    assert cases[0] == required[0]
    assert {k: cases[1][k] for k in required[1]} == required[1]
    joint = [(case['width'], case['groups']) for case in cases]
    assert set(joint) == {(8, 1), (9, 2), (4, 1)}
    assert_all_pairs([('joint', dimensions[0][1])] + dimensions[1:], [
        dict(case, joint=(case['width'], case['groups'])) for case in cases])
    with pytest.raises(ValueError, match='all of'):
        helpers.pairwise(dimensions, required=[{'width': 8}])
    with pytest.raises(ValueError, match='not a value'):
        helpers.pairwise(dimensions, required=[{'mask': 2}])


def test_op_grids_have_every_value_with_both_loops():
    for grid, names in [
            (helpers.DCNV1_GRID, ['stride', 'pad', 'ksize', 'dtype', 'n',
                                  'nobias']),
            (helpers.GENERAL_GRID, [name for name, _ in
                                    helpers.GENERAL_DIMENSIONS])]:
        for name in names:
            values = {repr(case[name]) for case in grid}
            for loops in helpers.CPU_LOOPS:
                assert values == {repr(case[name]) for case in grid
                                  if case['cpu_loops'] == loops}, name
    assert helpers.ALL_FEATURES.items() <= helpers.GENERAL_GRID[0].items()


@pytest.mark.parametrize('cpu_loops', helpers.CPU_LOOPS)
def test_parameter_picks_the_loops(cpu_loops):
    assert backends.cpu_backend().name == cpu_loops


@testing.parameterize(*testing.product({'cpu_loops': helpers.CPU_LOOPS}))
class TestAttributePicksTheLoops(unittest.TestCase):

    def setUp(self):
        self.in_setup = backends.cpu_backend().name

    def tearDown(self):
        # Still in force after the test method (check_backward's backward).
        assert backends.cpu_backend().name == self.cpu_loops

    def test_loops(self):
        assert self.in_setup == self.cpu_loops
        assert backends.cpu_backend().name == self.cpu_loops


def test_unknown_loops_are_refused():
    with pytest.raises(ValueError, match="cpu_loops must be one of"):
        with helpers.using_cpu_loops('never'):
            pass
