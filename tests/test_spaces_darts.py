"""Tests for nanas_jax.spaces.darts: the DARTS space and the Genotype text format."""

import itertools

import numpy as np
import pytest

from nanas_jax.spaces import darts, genotypes
from nanas_jax.spaces.darts import Genotype

SPACE = darts.DARTS_SPACE

# DARTS_V2 as printed in quark0/darts cnn/genotypes.py.
DARTS_V2_TEXT = (
    "Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), "
    "('sep_conv_3x3', 1), ('sep_conv_3x3', 1), ('skip_connect', 0), ('skip_connect', 0), "
    "('dil_conv_3x3', 2)], normal_concat=[2, 3, 4, 5], reduce=[('max_pool_3x3', 0), "
    "('max_pool_3x3', 1), ('skip_connect', 2), ('max_pool_3x3', 1), ('max_pool_3x3', 0), "
    "('skip_connect', 2), ('skip_connect', 2), ('max_pool_3x3', 1)], "
    "reduce_concat=[2, 3, 4, 5])")

# DARTS_V2 by hand: op id per edge; edges are node 0: sources 0-1, node 1: 0-2,
# node 2: 0-3, node 3: 0-4; ids none=0 max=1 avg=2 skip=3 sep3=4 sep5=5 dil3=6 dil5=7.
DARTS_V2_CODES = np.array([
    [4, 4, 4, 4, 0, 3, 4, 0, 0, 3, 0, 6, 0, 0],
    [1, 1, 0, 1, 3, 1, 0, 3, 0, 0, 1, 3, 0, 0],
])


def test_ops_and_edges_follow_the_reference_order():
  assert SPACE.ops == ('none', 'max_pool_3x3', 'avg_pool_3x3', 'skip_connect',
                       'sep_conv_3x3', 'sep_conv_5x5', 'dil_conv_3x3', 'dil_conv_5x5')
  assert SPACE.cell_types == ('normal', 'reduce')
  assert SPACE.edges == ((2, 0), (2, 1), (3, 0), (3, 1), (3, 2), (4, 0), (4, 1), (4, 2),
                         (4, 3), (5, 0), (5, 1), (5, 2), (5, 3), (5, 4))
  assert SPACE.edge_targets.tolist() == [0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 3]
  assert SPACE.none_index == 0 and SPACE.inputs_per_node == 2
  assert SPACE.swap_ops.tolist() == [False] + [True] * 7
  assert set(darts.REFERENCE_OPS) - set(darts.PRIMITIVES) == {'sep_conv_7x7', 'conv_7x1_1x7'}


def test_parse_reference_text_and_print_it_back_verbatim():
  genotype = Genotype.parse(DARTS_V2_TEXT)
  assert genotype.normal[7] == ('dil_conv_3x3', 2)
  assert genotype.reduce_concat == (2, 3, 4, 5)
  assert str(genotype) == DARTS_V2_TEXT
  assert repr(genotype) == DARTS_V2_TEXT
  assert SPACE.format(genotype) == DARTS_V2_TEXT
  assert SPACE.parse(DARTS_V2_TEXT) == genotype


def test_parse_accepts_tuples_ranges_newlines_and_positional_fields():
  text = """
      Genotype(
        normal = (('sep_conv_3x3', 0), ('sep_conv_3x3', 1),
                  ('sep_conv_3x3', 0), ('sep_conv_3x3', 1),
                  ('sep_conv_3x3', 1), ('skip_connect', 0),
                  ('skip_connect', 0), ('dil_conv_3x3', 2),),
        normal_concat = range(2, 6),
        reduce = [['max_pool_3x3', 0], ['max_pool_3x3', 1], ['skip_connect', 2],
                  ['max_pool_3x3', 1], ['max_pool_3x3', 0], ['skip_connect', 2],
                  ['skip_connect', 2], ['max_pool_3x3', 1]],
        reduce_concat = range(2, 6, 1),
      )
  """
  assert Genotype.parse(text) == Genotype.parse(DARTS_V2_TEXT)
  positional = DARTS_V2_TEXT.replace('normal=', '').replace('normal_concat=', '')
  assert Genotype.parse(positional) == Genotype.parse(DARTS_V2_TEXT)


def _mutate(old, new):
  assert old in DARTS_V2_TEXT
  return DARTS_V2_TEXT.replace(old, new, 1)


@pytest.mark.parametrize('text, message', [
    ('normal=[]', 'not valid syntax'),
    ('[1, 2]', 'one call Genotype'),
    ("Cell(normal=[('sep_conv_3x3', 0)])", 'one call Genotype'),
    ("__import__('os').system('true')", 'one call Genotype'),
    ('Genotype(normal=[', 'not valid syntax'),
    (_mutate("'sep_conv_3x3', 0)", "'conv_9x9', 0)"),
     r"Genotype.normal\[0\] \(node 0\) has unknown op 'conv_9x9'; valid ops: .*'sep_conv_3x3'"),
    (_mutate("('dil_conv_3x3', 2)", "('dil_conv_3x3', 5)"),
     r'node 3 takes input 5, but node 3 may only take inputs 0\.\.4'),
    (_mutate("normal=[('sep_conv_3x3', 0)", "normal=[('sep_conv_3x3', 2)"),
     r'normal\[0\]: node 0 takes input 2, but node 0 may only take inputs 0\.\.1'),
    (_mutate("('max_pool_3x3', 0), ", ''),
     r'Genotype.reduce has 7 pairs; every node takes exactly 2'),
    (_mutate("('sep_conv_3x3', 0), ", "('sep_conv_3x3', 0, 1), "),
     r"normal\[0\] \(node 0\) is \('sep_conv_3x3', 0, 1\); expected an \(op, source\) pair"),
    (_mutate('normal_concat', 'normal_cat'), "unknown field 'normal_cat'"),
    (_mutate(', reduce_concat=[2, 3, 4, 5]', ''), r"lacks field\(s\) \['reduce_concat'\]"),
    (_mutate('reduce_concat=', 'normal_concat='), "gives field 'normal_concat' twice"),
    (_mutate('[2, 3, 4, 5]', 'CONCAT'), "'normal_concat' is not a literal list"),
    (_mutate('[2, 3, 4, 5]', "__import__('os').getcwd()"), 'only call allowed is range'),
    (_mutate('[2, 3, 4, 5]', 'range(2, x)'), 'range arguments must be integers'),
    (_mutate('[2, 3, 4, 5]', 'range(2, 6.0)'), 'range arguments must be integers'),
    (_mutate('[2, 3, 4, 5]', '[2, 3, 4, 6]'),
     r'normal_concat contains 6; with 4 nodes the states are 0\.\.5'),
    (_mutate('[2, 3, 4, 5]', '[2, 2]'), 'repeats a state'),
    (_mutate('[2, 3, 4, 5]', '[]'), 'normal_concat is empty'),
    (_mutate("('sep_conv_3x3', 0)", "('sep_conv_3x3', True)"), 'integer state index'),
])
def test_parse_errors_name_the_problem(text, message):
  with pytest.raises(ValueError, match=message):
    Genotype.parse(text)


def test_round_trip_published_and_random_genotypes():
  rng = np.random.default_rng(0)
  for genotype in list(genotypes.GENOTYPES.values()) + [SPACE.random(rng) for _ in range(20)]:
    assert Genotype.parse(str(genotype)) == genotype
    assert SPACE.from_json(SPACE.to_json(genotype)) == genotype


def test_encode_decode_by_hand():
  genotype = Genotype.parse(DARTS_V2_TEXT)
  np.testing.assert_array_equal(SPACE.encode(genotype), DARTS_V2_CODES)
  assert SPACE.encode(genotype).dtype == np.int32
  decoded = SPACE.decode(DARTS_V2_CODES)
  # decode lists each node's pairs by source; the network is the same.
  assert decoded.normal[4:6] == (('skip_connect', 0), ('sep_conv_3x3', 1))
  assert decoded == genotype.canonical()
  assert decoded != genotype


def test_encode_rejects_what_the_search_space_cannot_hold():
  with pytest.raises(ValueError, match='has 5 nodes; the darts search space has 4'):
    SPACE.encode(genotypes.NASNet)
  with pytest.raises(ValueError, match=r"uses 'sep_conv_7x7', which is not a darts search op"):
    SPACE.encode(Genotype.parse(_mutate("('dil_conv_3x3', 2)", "('sep_conv_7x7', 2)")))
  with pytest.raises(ValueError, match="uses 'none'"):
    SPACE.encode(Genotype.parse(_mutate("('dil_conv_3x3', 2)", "('none', 2)")))
  with pytest.raises(ValueError, match=r'normal_concat = \[2, 3, 4\]; .* always concatenates'):
    SPACE.encode(Genotype.parse(_mutate('[2, 3, 4, 5]', '[2, 3, 4]')))
  with pytest.raises(ValueError, match='node 3 takes input 0 twice'):
    SPACE.encode(Genotype.parse(_mutate("('dil_conv_3x3', 2)", "('dil_conv_3x3', 0)")))
  with pytest.raises(ValueError, match='Genotype instances'):
    SPACE.encode(DARTS_V2_TEXT)


def test_decode_checks_two_inputs_per_node():
  codes = DARTS_V2_CODES.copy()
  codes[1, 12] = 5
  with pytest.raises(ValueError,
                     match='reduce node 3 has 3 non-none incoming edges; each node needs exactly 2'):
    SPACE.decode(codes)
  with pytest.raises(ValueError, match='expected'):
    SPACE.decode(DARTS_V2_CODES[:, :13])
  with pytest.raises(ValueError, match='op id 8'):
    SPACE.decode(np.where(DARTS_V2_CODES == 6, 8, DARTS_V2_CODES))


def _reference_derive(weights):
  """The reference Network.genotype() loop, written out longhand as an oracle."""
  cells = []
  for cell_weights in weights:
    gene, start = [], 0
    for node in range(4):
      rows = cell_weights[start:start + node + 2]
      best = [max(rows[j][k] for k in range(1, 8)) for j in range(node + 2)]
      order = sorted(range(node + 2), key=lambda j: -best[j])[:2]
      for j in order:
        k_best = None
        for k in range(1, 8):
          if k_best is None or rows[j][k] > rows[j][k_best]:
            k_best = k
        gene.append((darts.PRIMITIVES[k_best], j))
      start += node + 2
    cells.append(gene)
  return Genotype(normal=cells[0], normal_concat=range(2, 6),
                  reduce=cells[1], reduce_concat=range(2, 6))


def test_derive_matches_the_reference_rule_including_ties():
  rng = np.random.default_rng(1)
  for trial in range(60):
    if trial % 2:
      weights = rng.dirichlet(np.ones(8), size=(2, 14))
    else:  # Coarse values: many ties between edges and between ops.
      weights = rng.integers(0, 3, size=(2, 14, 8)) / 3.0
    assert SPACE.derive(weights) == _reference_derive(weights)


def _weights_selecting(genotype):
  """Weights under which the reference rule yields ``genotype``, order included."""
  weights = np.full((2, 14, 8), 0.01)
  weights[..., 0] = 0.97  # A strong none must not make an edge win.
  offsets = [0, 2, 5, 9]
  for t, cell in enumerate(SPACE.cell_types):
    for position, (op, source) in enumerate(getattr(genotype, cell)):
      edge = offsets[position // 2] + source
      weights[t, edge, 0] = 0.2
      weights[t, edge, darts.PRIMITIVES.index(op)] = 0.5 - 0.1 * (position % 2)
  return weights


@pytest.mark.parametrize('name', ['DARTS_V1', 'DARTS_V2', 'PC_DARTS', 'PDARTS'])
def test_derive_recovers_published_genotypes(name):
  genotype = genotypes.GENOTYPES[name]
  assert SPACE.derive(_weights_selecting(genotype)) == genotype


def test_derive_uniform_weights_keeps_the_cell_inputs():
  derived = SPACE.derive(np.full((2, 14, 8), 1 / 8))
  expected = (('max_pool_3x3', 0), ('max_pool_3x3', 1)) * 4
  assert derived.normal == expected and derived.reduce == expected


def test_random_is_valid_and_uniform():
  rng = np.random.default_rng(2)
  samples = [SPACE.random(rng) for _ in range(2000)]
  pair_counts = {pair: 0 for pair in itertools.combinations(range(5), 2)}
  op_counts = dict.fromkeys(darts.PRIMITIVES[1:], 0)
  for genotype in samples:
    assert SPACE.decode(SPACE.encode(genotype)) == genotype
    pair_counts[(genotype.reduce[6][1], genotype.reduce[7][1])] += 1
    for op, _ in genotype.normal:
      op_counts[op] += 1
  # 2000 draws over 10 source pairs: 200 each, sd ~13.
  assert all(140 < count < 260 for count in pair_counts.values()), pair_counts
  # 16000 ops over 7 choices: ~2286 each, sd ~44.
  assert all(2050 < count < 2520 for count in op_counts.values()), op_counts


def test_json_format_and_errors():
  genotype = Genotype.parse(DARTS_V2_TEXT)
  data = SPACE.to_json(genotype)
  assert data['space'] == 'darts'
  assert data['normal'][7] == ['dil_conv_3x3', 2]
  assert data['reduce_concat'] == [2, 3, 4, 5]
  with pytest.raises(ValueError, match=r"unknown keys \['extra'\]"):
    SPACE.from_json({**data, 'extra': 1})
  with pytest.raises(ValueError, match=r"lacks keys \['normal'\]"):
    SPACE.from_json({k: v for k, v in data.items() if k != 'normal'})
  with pytest.raises(ValueError, match="expected 'darts'"):
    SPACE.from_json({**data, 'space': 'nb201'})


def test_editable_edges_are_the_used_edges():
  editable = SPACE.editable_edges(DARTS_V2_CODES)
  np.testing.assert_array_equal(editable, DARTS_V2_CODES != 0)
  assert editable.sum() == 16


def test_canonical_sorts_pairs_by_source():
  canonical = genotypes.DARTS_V1.canonical()
  assert canonical.normal[:2] == (('sep_conv_3x3', 0), ('sep_conv_3x3', 1))
  assert canonical.canonical() == canonical
