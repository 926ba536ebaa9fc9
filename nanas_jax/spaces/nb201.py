"""The NAS-Bench-201 cell search space (Dong & Yang 2020) and its architecture strings.

One cell type; nodes 0..3, node 0 the input, node 3 the output; every node takes every
earlier node, 6 edges, each holding one of 5 ops (``none`` included, so an edge may be
cut). An architecture is written as the benchmark writes it, e.g.
``|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|``
(one ``|op~source|`` group per target node, groups joined by ``+``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from nanas_jax.spaces import base

# Op order of the benchmark's search space (op id = index).
NB201_OPS = ('none', 'skip_connect', 'nor_conv_1x1', 'nor_conv_3x3', 'avg_pool_3x3')
NUM_NODES = 4  # Including the input node 0.

_EXAMPLE = ('|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|'
            '+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|')


def _check_nodes(nodes: Any) -> tuple[tuple[tuple[str, int], ...], ...]:
  """Validates per-target-node ``(op, source)`` tuples and returns them as tuples."""
  if isinstance(nodes, (str, bytes)) or not isinstance(nodes, (list, tuple)):
    raise ValueError(f'NB201Arch.nodes must be a list of nodes, got {nodes!r}.')
  if len(nodes) != NUM_NODES - 1:
    raise ValueError(
        f'an NB201 cell has {NUM_NODES - 1} target nodes, got {len(nodes)}; e.g. '
        f'{_EXAMPLE}.')
  checked = []
  for target, inputs in enumerate(nodes, start=1):
    if isinstance(inputs, (str, bytes)) or not isinstance(inputs, (list, tuple)):
      raise ValueError(f'NB201 node {target} must be a list of (op, source), got {inputs!r}.')
    if len(inputs) != target:
      raise ValueError(
          f'NB201 node {target} has {len(inputs)} inputs; it takes exactly one from each '
          f'of nodes 0..{target - 1} (use none~j to cut an edge).')
    pairs = []
    for expected_source, pair in enumerate(inputs):
      if not isinstance(pair, (list, tuple)) or len(pair) != 2:
        raise ValueError(
            f'NB201 node {target}: input {pair!r} is not an (op, source) pair.')
      op, source = pair
      if op not in NB201_OPS:
        raise ValueError(
            f'NB201 node {target}: unknown op {op!r}; valid ops: {NB201_OPS}.')
      if source != expected_source or isinstance(source, bool):
        raise ValueError(
            f'NB201 node {target}: input {len(pairs)} has source {source!r}; list the '
            f'sources 0..{target - 1} in order, one op each.')
      pairs.append((str(op), int(source)))
    checked.append(tuple(pairs))
  return tuple(checked)


@dataclasses.dataclass(frozen=True, repr=False)
class NB201Arch:
  """An NB201 cell: ``nodes[i]`` holds the ``(op, source)`` inputs of node ``i + 1``."""

  nodes: tuple[tuple[tuple[str, int], ...], ...]

  def __post_init__(self):
    object.__setattr__(self, 'nodes', _check_nodes(self.nodes))

  @classmethod
  def parse(cls, text: str) -> NB201Arch:
    """Reads the benchmark's ``|op~source|...|+|...|`` string."""
    if not isinstance(text, str):
      raise ValueError(f'NB201Arch.parse expects a string, got {type(text).__name__}.')
    groups = text.strip().split('+')
    nodes = []
    for target, group in enumerate(groups, start=1):
      if len(group) < 2 or not (group.startswith('|') and group.endswith('|')):
        raise ValueError(
            f'NB201 string: node {target} group {group!r} must be written |op~source|...| '
            f'with groups joined by "+", e.g. {_EXAMPLE}.')
      pairs = []
      for token in group[1:-1].split('|'):
        op, sep, source = token.partition('~')
        if not sep or not (source.isascii() and source.isdigit()):
          raise ValueError(
              f'NB201 string: node {target} entry {token!r} must be op~source with an '
              f'integer source, e.g. nor_conv_3x3~0.')
        pairs.append((op, int(source)))
      nodes.append(tuple(pairs))
    return cls(nodes=tuple(nodes))

  def __str__(self) -> str:
    return '+'.join(
        '|' + '|'.join(f'{op}~{source}' for op, source in inputs) + '|'
        for inputs in self.nodes)

  def __repr__(self) -> str:
    return f'NB201Arch.parse({str(self)!r})'


class NB201Space(base.SearchSpace):
  """The NAS-Bench-201 space: 5 ops on 6 edges, 5**6 = 15625 architectures."""

  def __init__(self):
    self.name = 'nb201'
    self.ops = NB201_OPS
    self.cell_types = ('cell',)
    self.edges = tuple((target, source)
                       for target in range(1, NUM_NODES) for source in range(target))
    self.none_index = NB201_OPS.index('none')
    # Cutting an edge (none) is a legal move in this space.
    self.swap_ops = base.read_only(np.ones(len(NB201_OPS), bool))
    self.edge_targets = base.read_only(
        np.array([target - 1 for target, _ in self.edges], np.int32))
    self.inputs_per_node = None

  def _check_arch(self, arch: Any) -> NB201Arch:
    if not isinstance(arch, NB201Arch):
      raise ValueError(
          f'nb201 architectures are NB201Arch instances, got {type(arch).__name__}; '
          'build one with NB201Arch.parse(text).')
    return arch

  def parse(self, text: str) -> NB201Arch:
    return NB201Arch.parse(text)

  def format(self, arch: NB201Arch) -> str:
    return str(self._check_arch(arch))

  def encode(self, arch: NB201Arch) -> np.ndarray:
    arch = self._check_arch(arch)
    ops = [NB201_OPS.index(op) for inputs in arch.nodes for op, _ in inputs]
    return np.array([ops], np.int32)

  def decode(self, codes: np.ndarray) -> NB201Arch:
    flat = iter(self.check_codes(codes)[0])
    return NB201Arch(nodes=tuple(
        tuple((NB201_OPS[next(flat)], source) for source in range(target))
        for target in range(1, NUM_NODES)))

  def derive(self, weights: np.ndarray) -> NB201Arch:
    """Argmax over all ops (``none`` included) per edge, as NB201's DARTS genotype()."""
    return self.decode(np.argmax(self.check_weights(weights), axis=-1).astype(np.int32))

  def random(self, rng: np.random.Generator) -> NB201Arch:
    return self.decode(rng.integers(0, len(NB201_OPS), size=self.codes_shape))

  def to_json(self, arch: NB201Arch) -> dict:
    return {'space': self.name, 'arch': self.format(arch)}

  def from_json(self, data: dict) -> NB201Arch:
    self.check_json_space(data)
    if set(data) != {'space', 'arch'}:
      raise ValueError(
          f'nb201 JSON has keys {sorted(data)}; expected exactly "space" and "arch" '
          f'(the benchmark string, e.g. {_EXAMPLE}).')
    return self.parse(data['arch'])

  def editable_edges(self, codes: np.ndarray) -> np.ndarray:
    return np.ones(self.check_codes(codes).shape, bool)


NB201_SPACE = base.register_space(NB201Space())
