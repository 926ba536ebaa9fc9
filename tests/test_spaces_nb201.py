"""Tests for nanas_jax.spaces.nb201: the NAS-Bench-201 space and its strings."""

import itertools

import numpy as np
import pytest

from nanas_jax.spaces import nb201
from nanas_jax.spaces.nb201 import NB201Arch

SPACE = nb201.NB201_SPACE
EXAMPLE = ('|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|'
           '+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|')
# By hand: edges (1,0) (2,0) (2,1) (3,0) (3,1) (3,2); ids none=0 skip=1 1x1=2 3x3=3 pool=4.
EXAMPLE_CODES = np.array([[3, 3, 4, 1, 3, 1]])


def test_ops_and_edges():
  assert SPACE.ops == ('none', 'skip_connect', 'nor_conv_1x1', 'nor_conv_3x3', 'avg_pool_3x3')
  assert SPACE.cell_types == ('cell',)
  assert SPACE.edges == ((1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2))
  assert SPACE.edge_targets.tolist() == [0, 1, 1, 2, 2, 2]
  assert SPACE.none_index == 0 and SPACE.inputs_per_node is None
  assert SPACE.swap_ops.all() and SPACE.swap_ops.shape == (5,)


def test_parse_and_print_exactly():
  arch = NB201Arch.parse(EXAMPLE)
  assert arch.nodes == (
      (('nor_conv_3x3', 0),),
      (('nor_conv_3x3', 0), ('avg_pool_3x3', 1)),
      (('skip_connect', 0), ('nor_conv_3x3', 1), ('skip_connect', 2)))
  assert str(arch) == SPACE.format(arch) == EXAMPLE
  assert repr(arch) == f'NB201Arch.parse({EXAMPLE!r})'
  assert SPACE.parse(' ' + EXAMPLE + '\n') == arch


def test_encode_decode_by_hand():
  arch = NB201Arch.parse(EXAMPLE)
  np.testing.assert_array_equal(SPACE.encode(arch), EXAMPLE_CODES)
  assert SPACE.encode(arch).dtype == np.int32
  assert SPACE.decode(EXAMPLE_CODES) == arch


def test_every_architecture_round_trips():
  # Brute force over all 5**6 = 15625 cells: codes -> arch -> string -> arch -> codes.
  seen = set()
  for ops in itertools.product(range(5), repeat=6):
    codes = np.array([ops])
    text = SPACE.format(SPACE.decode(codes))
    seen.add(text)
    np.testing.assert_array_equal(SPACE.encode(SPACE.parse(text)), codes)
  assert len(seen) == 15625


@pytest.mark.parametrize('text, message', [
    ('|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|', 'has 3 target nodes, got 2'),
    (EXAMPLE + '+|none~0|none~1|none~2|none~3|', 'has 3 target nodes, got 4'),
    (EXAMPLE.replace('avg_pool_3x3', 'max_pool_3x3'),
     r"node 2: unknown op 'max_pool_3x3'; valid ops: \('none', 'skip_connect'"),
    (EXAMPLE.replace('avg_pool_3x3~1', 'avg_pool_3x3~2'),
     r'node 2: input 1 has source 2; list the sources 0\.\.1'),
    (EXAMPLE.replace('|avg_pool_3x3~1|', '|'),
     r'node 2 has 1 inputs; it takes exactly one from each of nodes 0\.\.1'),
    (EXAMPLE.replace('|+|', '||', 1), 'must be op~source'),
    (EXAMPLE.replace('|+|', '+', 1), r'must be written \|op~source\|'),
    (EXAMPLE.replace('~0', '-0', 1), "'nor_conv_3x3-0' must be op~source"),
    (EXAMPLE.replace('~0', '~x', 1), 'integer source'),
    (EXAMPLE.replace('~0', '~-1', 1), 'integer source'),
    ('', r'must be written \|op~source\|'),
])
def test_parse_errors_name_the_problem(text, message):
  with pytest.raises(ValueError, match=message):
    NB201Arch.parse(text)


def test_derive_is_argmax_with_none_allowed():
  weights = np.full((1, 6, 5), 0.1)
  expected = [0, 1, 2, 3, 4, 3]
  for edge, op in enumerate(expected):
    weights[0, edge, op] = 0.6
  weights[0, 5, 1] = 0.6  # A tie: the first op wins.
  expected[5] = 1
  assert SPACE.derive(weights) == SPACE.decode(np.array([expected]))
  assert str(SPACE.derive(weights)) == ('|none~0|+|skip_connect~0|nor_conv_1x1~1|'
                                        '+|nor_conv_3x3~0|avg_pool_3x3~1|skip_connect~2|')


def test_random_is_uniform_over_ops():
  rng = np.random.default_rng(0)
  counts = np.zeros((6, 5), int)
  for _ in range(2000):
    codes = SPACE.encode(SPACE.random(rng))[0]
    counts[np.arange(6), codes] += 1
  # 2000 draws per edge over 5 ops: 400 each, sd ~18.
  assert ((counts > 320) & (counts < 480)).all(), counts


def test_json_round_trip_and_errors():
  arch = NB201Arch.parse(EXAMPLE)
  assert SPACE.to_json(arch) == {'space': 'nb201', 'arch': EXAMPLE}
  assert SPACE.from_json(SPACE.to_json(arch)) == arch
  with pytest.raises(ValueError, match='expected exactly "space" and "arch"'):
    SPACE.from_json({'space': 'nb201', 'arch': EXAMPLE, 'acc': 93.7})
  with pytest.raises(ValueError, match="expected 'nb201'"):
    SPACE.from_json({'space': 'darts', 'arch': EXAMPLE})
  with pytest.raises(ValueError, match='NB201Arch instances'):
    SPACE.to_json(EXAMPLE)


def test_editable_edges_are_all_edges():
  assert SPACE.editable_edges(np.zeros((1, 6), int)).all()
