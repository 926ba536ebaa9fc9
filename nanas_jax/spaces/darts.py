"""The DARTS CNN search space (Liu et al. 2019) and its ``Genotype`` text format.

A cell has two inputs (states 0 and 1, the outputs of the two previous cells) and four
intermediate nodes (states 2..5). Node ``k`` has an edge from every earlier state, 2 + k
edges, 14 in all, in the order of the reference ``model_search.py``: node by node, source
by source. The search keeps two incoming edges per node. A ``Genotype`` lists, per node,
the two kept ``(op, source)`` pairs, exactly as the reference ``genotypes.py`` prints them,
so published genotypes paste in verbatim and ``Genotype.parse(str(g)) == g``.
"""

from __future__ import annotations

import ast
import dataclasses
from typing import Any

import numpy as np

from nanas_jax.spaces import base

# The search operations, in the reference order (op id = index): encodings, alpha and
# published weights all depend on it.
PRIMITIVES = (
    'none',
    'max_pool_3x3',
    'avg_pool_3x3',
    'skip_connect',
    'sep_conv_3x3',
    'sep_conv_5x5',
    'dil_conv_3x3',
    'dil_conv_5x5',
)

# Every operation the reference networks can build; NASNet and AmoebaNet use the two that
# the search space lacks.
REFERENCE_OPS = PRIMITIVES + ('sep_conv_7x7', 'conv_7x1_1x7')

NUM_NODES = 4
INPUTS_PER_NODE = 2
NUM_CELL_INPUTS = 2
DEFAULT_CONCAT = tuple(range(NUM_CELL_INPUTS, NUM_CELL_INPUTS + NUM_NODES))

_CELL_FIELDS = ('normal', 'reduce')
_FIELDS = ('normal', 'normal_concat', 'reduce', 'reduce_concat')


def _check_cell(field: str, value: Any) -> tuple[tuple[str, int], ...]:
  """Validates one cell's ``(op, source)`` list and returns it as a tuple of pairs."""
  if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
    raise ValueError(
        f'Genotype.{field} must be a list of (op, source) pairs, got {value!r}.')
  if not value or len(value) % INPUTS_PER_NODE:
    raise ValueError(
        f'Genotype.{field} has {len(value)} pairs; every node takes exactly '
        f'{INPUTS_PER_NODE} inputs, so give a non-zero, even number of (op, source) '
        'pairs, two per node in node order.')
  pairs = []
  for position, pair in enumerate(value):
    node = position // INPUTS_PER_NODE
    if not isinstance(pair, (list, tuple)) or len(pair) != 2:
      raise ValueError(
          f'Genotype.{field}[{position}] (node {node}) is {pair!r}; expected an '
          "(op, source) pair such as ('sep_conv_3x3', 0).")
    op, source = pair
    if op not in REFERENCE_OPS:
      raise ValueError(
          f'Genotype.{field}[{position}] (node {node}) has unknown op {op!r}; valid '
          f'ops: {REFERENCE_OPS}.')
    if isinstance(source, bool) or not isinstance(source, (int, np.integer)):
      raise ValueError(
          f'Genotype.{field}[{position}] (node {node}) has source {source!r}; expected '
          'an integer state index.')
    last = node + NUM_CELL_INPUTS - 1
    if not 0 <= source <= last:
      raise ValueError(
          f'Genotype.{field}[{position}]: node {node} takes input {source}, but node '
          f'{node} may only take inputs 0..{last} (0, 1: the cell inputs; 2 + k: '
          'node k).')
    pairs.append((str(op), int(source)))
  return tuple(pairs)


def _check_concat(field: str, value: Any, num_nodes: int) -> tuple[int, ...]:
  """Validates a concat list (list, tuple or range) and returns it as a tuple."""
  if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, range)):
    raise ValueError(
        f'Genotype.{field} must be a list of state indices such as [2, 3, 4, 5] or '
        f'range(2, 6), got {value!r}.')
  last = num_nodes + NUM_CELL_INPUTS - 1
  if not value:
    raise ValueError(f'Genotype.{field} is empty; list the states to concatenate.')
  for index in value:
    if (isinstance(index, bool) or not isinstance(index, (int, np.integer))
        or not 0 <= index <= last):
      raise ValueError(
          f'Genotype.{field} contains {index!r}; with {num_nodes} nodes the states '
          f'are 0..{last}.')
  if len(set(value)) != len(value):
    raise ValueError(f'Genotype.{field} = {list(value)} repeats a state; list each once.')
  return tuple(int(i) for i in value)


def _literal_field(name: str, node: ast.expr) -> Any:
  """The value of one keyword of a Genotype call: a literal or ``range(...)``."""
  if isinstance(node, ast.Call):
    if not (isinstance(node.func, ast.Name) and node.func.id == 'range'):
      raise ValueError(
          f'Genotype field {name!r}: the only call allowed is range(...), got '
          f'{ast.unparse(node)!r}.')
    if node.keywords or not 1 <= len(node.args) <= 3:
      raise ValueError(
          f'Genotype field {name!r}: write range(start, stop[, step]), got '
          f'{ast.unparse(node)!r}.')
    try:
      args = [ast.literal_eval(a) for a in node.args]
    except ValueError as e:
      raise ValueError(
          f'Genotype field {name!r}: range arguments must be integers, got '
          f'{ast.unparse(node)!r}.') from e
    if not all(isinstance(a, int) and not isinstance(a, bool) for a in args):
      raise ValueError(
          f'Genotype field {name!r}: range arguments must be integers, got '
          f'{ast.unparse(node)!r}.')
    return range(*args)
  try:
    return ast.literal_eval(node)
  except ValueError as e:
    raise ValueError(
        f'Genotype field {name!r} is not a literal list: {ast.unparse(node)!r}. Write '
        "e.g. [('sep_conv_3x3', 0), ...] or range(2, 6).") from e


@dataclasses.dataclass(frozen=True, repr=False)
class Genotype:
  """A discrete DARTS-style architecture: per cell type, two (op, source) pairs per node.

  Constructing one validates and normalises it: lists become tuples, ``range`` concats
  become tuples of ints. Ops may come from the full ``REFERENCE_OPS`` set and the number
  of nodes is free, so NASNet and AmoebaNet are Genotypes too; the DARTS search space
  (``DartsSpace.encode``) accepts only its own 8 ops, 4 nodes and concat [2, 3, 4, 5].
  """

  normal: tuple[tuple[str, int], ...]
  normal_concat: tuple[int, ...]
  reduce: tuple[tuple[str, int], ...]
  reduce_concat: tuple[int, ...]

  def __post_init__(self):
    for cell in _CELL_FIELDS:
      pairs = _check_cell(cell, getattr(self, cell))
      object.__setattr__(self, cell, pairs)
      concat_field = f'{cell}_concat'
      concat = _check_concat(
          concat_field, getattr(self, concat_field), len(pairs) // INPUTS_PER_NODE)
      object.__setattr__(self, concat_field, concat)

  def num_nodes(self, cell: str) -> int:
    """Intermediate nodes of cell type ``cell`` ('normal' or 'reduce')."""
    return len(getattr(self, cell)) // INPUTS_PER_NODE

  def canonical(self) -> Genotype:
    """The same cell with each node's pairs sorted by source (then op).

    The pair order inside a node carries no meaning for the network; searched genotypes
    list the stronger edge first, ``DartsSpace.decode`` lists them by source. Compare
    ``a.canonical() == b.canonical()`` to ask whether two genotypes are the same network.
    """
    fields = {}
    for cell in _CELL_FIELDS:
      pairs = getattr(self, cell)
      fields[cell] = tuple(
          pair for start in range(0, len(pairs), INPUTS_PER_NODE)
          for pair in sorted(pairs[start:start + INPUTS_PER_NODE], key=lambda p: (p[1], p[0])))
      fields[f'{cell}_concat'] = getattr(self, f'{cell}_concat')
    return Genotype(**fields)

  @classmethod
  def parse(cls, text: str) -> Genotype:
    """Reads ``Genotype(normal=[...], normal_concat=..., reduce=[...], reduce_concat=...)``.

    Accepts the reference text verbatim: keyword (or positional) fields, lists or tuples,
    ``range(a, b)`` concats, any whitespace. Nothing is evaluated: the text is parsed
    with ``ast`` and only literals and ``range`` are read.
    """
    if not isinstance(text, str):
      raise ValueError(f'Genotype.parse expects a string, got {type(text).__name__}.')
    try:
      tree = ast.parse(text.strip(), mode='eval')
    except SyntaxError as e:
      raise ValueError(
          f'genotype text is not valid syntax ({e.msg}); expected '
          "Genotype(normal=[('sep_conv_3x3', 0), ...], normal_concat=[2, 3, 4, 5], "
          'reduce=[...], reduce_concat=[2, 3, 4, 5]).') from e
    call = tree.body
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)
            and call.func.id == 'Genotype'):
      raise ValueError(
          'genotype text must be one call Genotype(normal=..., normal_concat=..., '
          f'reduce=..., reduce_concat=...); got {text.strip()[:60]!r}.')
    if len(call.args) > len(_FIELDS):
      raise ValueError(
          f'Genotype(...) has {len(call.args)} positional arguments; it has only the '
          f'fields {_FIELDS}.')
    fields = {}
    for name, node in zip(_FIELDS, call.args):
      fields[name] = _literal_field(name, node)
    for keyword in call.keywords:
      if keyword.arg not in _FIELDS:
        raise ValueError(
            f'Genotype(...) has unknown field {keyword.arg!r}; fields are {_FIELDS}.')
      if keyword.arg in fields:
        raise ValueError(f'Genotype(...) gives field {keyword.arg!r} twice.')
      fields[keyword.arg] = _literal_field(keyword.arg, keyword.value)
    missing = [f for f in _FIELDS if f not in fields]
    if missing:
      raise ValueError(f'Genotype(...) lacks field(s) {missing}; give all of {_FIELDS}.')
    return cls(**fields)

  def __str__(self) -> str:
    # Lists, as the reference repository prints a searched genotype, so the text pastes
    # into either code base.
    return (f'Genotype(normal={list(self.normal)}, '
            f'normal_concat={list(self.normal_concat)}, '
            f'reduce={list(self.reduce)}, '
            f'reduce_concat={list(self.reduce_concat)})')

  __repr__ = __str__


def _node_offsets(num_nodes: int) -> tuple[int, ...]:
  """Index of the first edge of each node: node k has 2 + k incoming edges."""
  offsets, start = [], 0
  for node in range(num_nodes):
    offsets.append(start)
    start += NUM_CELL_INPUTS + node
  return tuple(offsets)


class DartsSpace(base.SearchSpace):
  """The DARTS space: 8 ops, normal + reduce cells, 4 nodes of 2 inputs each."""

  def __init__(self):
    self.name = 'darts'
    self.ops = PRIMITIVES
    self.cell_types = _CELL_FIELDS
    self.edges = tuple((NUM_CELL_INPUTS + node, source)
                       for node in range(NUM_NODES)
                       for source in range(NUM_CELL_INPUTS + node))
    self.none_index = PRIMITIVES.index('none')
    self.swap_ops = base.read_only(np.arange(len(PRIMITIVES)) != self.none_index)
    self.edge_targets = base.read_only(
        np.array([target - NUM_CELL_INPUTS for target, _ in self.edges], np.int32))
    self.inputs_per_node = INPUTS_PER_NODE
    self._offsets = _node_offsets(NUM_NODES)

  def _edges_of_node(self, node: int) -> range:
    return range(self._offsets[node], self._offsets[node] + NUM_CELL_INPUTS + node)

  def parse(self, text: str) -> Genotype:
    return Genotype.parse(text)

  def format(self, arch: Genotype) -> str:
    return str(self._check_arch(arch))

  def _check_arch(self, arch: Any) -> Genotype:
    if not isinstance(arch, Genotype):
      raise ValueError(
          f'darts architectures are Genotype instances, got {type(arch).__name__}; '
          'build one with Genotype.parse(text).')
    return arch

  def encode(self, arch: Genotype) -> np.ndarray:
    arch = self._check_arch(arch)
    codes = np.full(self.codes_shape, self.none_index, np.int32)
    for t, cell in enumerate(self.cell_types):
      pairs = getattr(arch, cell)
      if len(pairs) != INPUTS_PER_NODE * NUM_NODES:
        raise ValueError(
            f'Genotype.{cell} has {len(pairs) // INPUTS_PER_NODE} nodes; the darts '
            f'search space has {NUM_NODES} (use a searched genotype, not NASNet/AmoebaNet).')
      concat = getattr(arch, f'{cell}_concat')
      if concat != DEFAULT_CONCAT:
        raise ValueError(
            f'Genotype.{cell}_concat = {list(concat)}; the darts search space always '
            f'concatenates {list(DEFAULT_CONCAT)}.')
      for position, (op, source) in enumerate(pairs):
        node = position // INPUTS_PER_NODE
        if op not in PRIMITIVES or op == 'none':
          raise ValueError(
              f'Genotype.{cell}[{position}] uses {op!r}, which is not a darts search '
              f'op; valid ops: {PRIMITIVES[1:]}.')
        edge = self._offsets[node] + source
        if codes[t, edge] != self.none_index:
          raise ValueError(
              f'Genotype.{cell}: node {node} takes input {source} twice; the search '
              'space has one op per edge, so give two different sources.')
        codes[t, edge] = PRIMITIVES.index(op)
    return codes

  def decode(self, codes: np.ndarray) -> Genotype:
    codes = self.check_codes(codes)
    cells = {}
    for t, cell in enumerate(self.cell_types):
      pairs = []
      for node in range(NUM_NODES):
        used = [e for e in self._edges_of_node(node) if codes[t, e] != self.none_index]
        if len(used) != INPUTS_PER_NODE:
          raise ValueError(
              f'darts encoding: {cell} node {node} has {len(used)} non-none incoming '
              f'edges; each node needs exactly {INPUTS_PER_NODE} (set the others to '
              f'none = {self.none_index}).')
        pairs += [(PRIMITIVES[codes[t, e]], self.edges[e][1]) for e in used]
      cells[cell] = tuple(pairs)
    return Genotype(normal=cells['normal'], normal_concat=DEFAULT_CONCAT,
                    reduce=cells['reduce'], reduce_concat=DEFAULT_CONCAT)

  def derive(self, weights: np.ndarray) -> Genotype:
    """The reference ``Network.genotype()`` rule on weights (softmax already applied).

    Per node, incoming edges are ranked by their strongest non-none weight (a stable
    sort, so on ties the earlier source wins) and the top two kept, strongest first, each
    with its strongest non-none op (the first on ties).
    """
    weights = self.check_weights(weights).astype(np.float64)
    without_none = weights.copy()
    without_none[..., self.none_index] = -np.inf
    cells = {}
    for t, cell in enumerate(self.cell_types):
      pairs = []
      for node in range(NUM_NODES):
        node_edges = list(self._edges_of_node(node))
        strength = without_none[t, node_edges].max(axis=-1)
        ranked = np.argsort(-strength, kind='stable')[:INPUTS_PER_NODE]
        for source in ranked:
          op = int(np.argmax(without_none[t, node_edges[source]]))
          pairs.append((PRIMITIVES[op], int(source)))
      cells[cell] = tuple(pairs)
    return Genotype(normal=cells['normal'], normal_concat=DEFAULT_CONCAT,
                    reduce=cells['reduce'], reduce_concat=DEFAULT_CONCAT)

  def random(self, rng: np.random.Generator) -> Genotype:
    """Per node two distinct sources (sorted) and uniform non-none ops, independently."""
    search_ops = [op for op in PRIMITIVES if op != 'none']
    cells = {}
    for cell in self.cell_types:
      pairs = []
      for node in range(NUM_NODES):
        sources = np.sort(rng.choice(NUM_CELL_INPUTS + node, INPUTS_PER_NODE,
                                     replace=False))
        ops = rng.integers(0, len(search_ops), size=INPUTS_PER_NODE)
        pairs += [(search_ops[o], int(s)) for o, s in zip(ops, sources)]
      cells[cell] = tuple(pairs)
    return Genotype(normal=cells['normal'], normal_concat=DEFAULT_CONCAT,
                    reduce=cells['reduce'], reduce_concat=DEFAULT_CONCAT)

  def to_json(self, arch: Genotype) -> dict:
    arch = self._check_arch(arch)
    data = {'space': self.name}
    for cell in self.cell_types:
      data[cell] = [[op, source] for op, source in getattr(arch, cell)]
      data[f'{cell}_concat'] = list(getattr(arch, f'{cell}_concat'))
    return data

  def from_json(self, data: dict) -> Genotype:
    self.check_json_space(data)
    fields = {k: v for k, v in data.items() if k != 'space'}
    unknown = sorted(set(fields) - set(_FIELDS))
    missing = [f for f in _FIELDS if f not in fields]
    if unknown or missing:
      raise ValueError(
          f'darts JSON has unknown keys {unknown} / lacks keys {missing}; expected '
          f'"space" and {list(_FIELDS)}.')
    return Genotype(**fields)

  def editable_edges(self, codes: np.ndarray) -> np.ndarray:
    # A neighbor changes ops, never the edge set: the edges the genotype uses.
    return self.check_codes(codes) != self.none_index


DARTS_SPACE = base.register_space(DartsSpace())
