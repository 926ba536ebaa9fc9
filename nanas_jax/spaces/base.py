"""The interface every search space implements, and the registry that names them.

A search space is pure data plus conversions: which operations exist, which edges a cell
has, how an architecture is written as text / JSON, how it maps to an integer encoding
``codes[cell_type, edge] = op id`` (the form the neighborhood code works on) and how a
discrete architecture is derived from continuous weights. Nothing here knows about Flax.
"""

from __future__ import annotations

import abc
from typing import Any

import numpy as np


class SearchSpace(abc.ABC):
  """A cell-based search space.

  Subclasses set the data attributes in ``__init__`` and implement the conversions.

  Attributes:
    name: registry name.
    ops: operation names; the index is the op id used by encodings and weights.
    cell_types: the cell types that have their own architecture.
    edges: ``(target_node, source_node)`` per edge index, in the reference order.
    none_index: op id of the ``none`` (zero) operation.
    swap_ops: bool ``[num_ops]``, the ops a neighbor may swap in or out of an edge.
    edge_targets: int ``[num_edges]``, the target of each edge, numbered 0.. over the
      nodes that have incoming edges.
    inputs_per_node: how many incoming edges a derived node keeps, ``None`` for all.
  """

  name: str
  ops: tuple[str, ...]
  cell_types: tuple[str, ...]
  edges: tuple[tuple[int, int], ...]
  none_index: int
  swap_ops: np.ndarray
  edge_targets: np.ndarray
  inputs_per_node: int | None

  @property
  def num_edges(self) -> int:
    return len(self.edges)

  @property
  def num_ops(self) -> int:
    return len(self.ops)

  @property
  def num_targets(self) -> int:
    return int(self.edge_targets.max()) + 1

  @property
  def alpha_shape(self) -> tuple[int, int, int]:
    return (len(self.cell_types), self.num_edges, self.num_ops)

  @property
  def codes_shape(self) -> tuple[int, int]:
    return (len(self.cell_types), self.num_edges)

  @abc.abstractmethod
  def parse(self, text: str) -> Any:
    """Reads an architecture from its textual form."""

  @abc.abstractmethod
  def format(self, arch: Any) -> str:
    """Writes an architecture in the textual form ``parse`` reads."""

  @abc.abstractmethod
  def encode(self, arch: Any) -> np.ndarray:
    """int32 ``[T, E]``: op id per edge, ``none_index`` where the arch has no edge."""

  @abc.abstractmethod
  def decode(self, codes: np.ndarray) -> Any:
    """The architecture of an encoding; raises ValueError if it is not one."""

  @abc.abstractmethod
  def derive(self, weights: np.ndarray) -> Any:
    """The discrete architecture that continuous weights ``[T, E, O]`` select."""

  @abc.abstractmethod
  def random(self, rng: np.random.Generator) -> Any:
    """An architecture drawn uniformly from the space."""

  @abc.abstractmethod
  def to_json(self, arch: Any) -> dict:
    """A JSON-serialisable dict, tagged with the space name."""

  @abc.abstractmethod
  def from_json(self, data: dict) -> Any:
    """Inverse of ``to_json``."""

  @abc.abstractmethod
  def editable_edges(self, codes: np.ndarray) -> np.ndarray:
    """bool ``[T, E]``: the edges whose op a discrete neighbor may change."""

  def check_codes(self, codes: Any) -> np.ndarray:
    """Returns ``codes`` as int32 after checking its shape and op ids."""
    codes = np.asarray(codes)
    if codes.shape != self.codes_shape:
      raise ValueError(
          f'{self.name} encoding has shape {codes.shape}; expected {self.codes_shape} '
          '(cell types x edges).')
    if not np.issubdtype(codes.dtype, np.integer):
      raise ValueError(
          f'{self.name} encoding has dtype {codes.dtype}; expected integer op ids.')
    bad = (codes < 0) | (codes >= self.num_ops)
    if bad.any():
      t, e = np.argwhere(bad)[0]
      raise ValueError(
          f'{self.name} encoding: op id {codes[t, e]} at cell {self.cell_types[t]!r}, '
          f'edge {e} is out of range; op ids are 0..{self.num_ops - 1} ({self.ops}).')
    return codes.astype(np.int32)

  def check_weights(self, weights: Any) -> np.ndarray:
    """Returns ``weights`` as a numpy array after checking its shape."""
    weights = np.asarray(weights)
    if weights.shape != self.alpha_shape:
      raise ValueError(
          f'{self.name} weights have shape {weights.shape}; expected {self.alpha_shape} '
          '(cell types x edges x ops).')
    return weights

  def check_json_space(self, data: dict) -> None:
    """Checks that a JSON dict is tagged with this space."""
    if not isinstance(data, dict):
      raise ValueError(f'{self.name} JSON must be an object, got {type(data).__name__}.')
    if data.get('space') != self.name:
      raise ValueError(
          f'JSON architecture has "space": {data.get("space")!r}; expected '
          f'{self.name!r}. Load it with get_space({data.get("space")!r}).')

  def __repr__(self) -> str:
    return f'<SearchSpace {self.name}>'


_REGISTRY: dict[str, SearchSpace] = {}


def register_space(space: SearchSpace) -> SearchSpace:
  """Adds a space instance to the registry under ``space.name``."""
  if space.name in _REGISTRY:
    raise ValueError(f'search space {space.name!r} is registered twice.')
  _REGISTRY[space.name] = space
  return space


def space_names() -> tuple[str, ...]:
  return tuple(sorted(_REGISTRY))


def get_space(name: str) -> SearchSpace:
  """The (singleton) search space called ``name`` (case-insensitive)."""
  key = str(name).lower()
  if key not in _REGISTRY:
    raise ValueError(f'unknown search space {name!r}; known spaces: {space_names()}.')
  return _REGISTRY[key]


def read_only(array: np.ndarray) -> np.ndarray:
  """Marks an array read-only: space attributes are shared by every user of a singleton."""
  array.setflags(write=False)
  return array
