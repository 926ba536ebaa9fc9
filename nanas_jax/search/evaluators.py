"""Evaluators: what random search (RS) and NA-RS ask for an architecture's score.

An evaluator is any callable ``evaluate(codes [N, T, E]) -> losses [N]`` taking the integer
encodings of N architectures of one search space (``codes[n, cell_type, edge] = op id``)
and returning one LOSS per architecture: lower is better. Accuracies become losses as
errors: ``TabularEvaluator`` returns ``accuracy_scale - accuracy`` (the error in percent for
tables in percent), ``SupernetEvaluator`` the mean cross-entropy.

- ``CountingEvaluator`` wraps any evaluator and counts the architectures it was asked for:
  the budget a search reports. Caching is off unless asked for, and even then a request
  served from the cache still counts (``count``); ``unique_count`` counts distinct ones.
- ``TabularEvaluator`` looks architectures up in a table of accuracies: NAS-Bench-201 /
  NATS-Bench (topology) through the ``nats_bench`` package, or a JSON / CSV file.
- ``SupernetEvaluator`` scores one-hot architectures with a weight-sharing supernet (RS-WS):
  N architectures in one ``jax.vmap``-ed call per validation batch.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Callable, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nanas_jax.nn import recalibration
from nanas_jax.spaces import SearchSpace, get_space

NATS_TSS_SIMPLE = 'NATS-tss-v1_0-3ffb9-simple'
_OBTAIN_BENCHMARK = (
    'To use NAS-Bench-201 / NATS-Bench, download the topology benchmark directory '
    f'{NATS_TSS_SIMPLE} as the NATS-Bench README (https://github.com/D-X-Y/NATS-Bench) '
    'describes, `pip install nats_bench`, and load it with '
    'TabularEvaluator.from_nats_bench(path). Or write a small table yourself: a JSON object '
    '{"|nor_conv_3x3~0|+|...|": 93.1, ...} or a CSV file with the header arch,accuracy '
    '(accuracy in percent), and load it with TabularEvaluator.from_file(path).')


@runtime_checkable
class Evaluator(Protocol):
  """``(codes int [N, T, E]) -> float losses [N]``; lower is better."""

  def __call__(self, codes: np.ndarray) -> np.ndarray:
    ...


def check_codes_batch(space: SearchSpace, codes: Any) -> np.ndarray:
  """``codes`` as int32 ``[N, T, E]`` after checking the shape and the op ids."""
  codes = np.asarray(codes)
  if codes.ndim != 3 or codes.shape[1:] != space.codes_shape:
    raise ValueError(
        f'{space.name} evaluator expects codes of shape [N, {space.codes_shape[0]}, '
        f'{space.codes_shape[1]}] (architectures x cell types x edges), got {codes.shape}.')
  if not np.issubdtype(codes.dtype, np.integer):
    raise ValueError(f'codes have dtype {codes.dtype}; expected integer op ids.')
  if codes.size and (codes.min() < 0 or codes.max() >= space.num_ops):
    raise ValueError(
        f'codes contain op ids outside 0..{space.num_ops - 1} ({space.name} ops: '
        f'{space.ops}).')
  return codes.astype(np.int32)


def _check_losses(losses: Any, n: int) -> np.ndarray:
  losses = np.asarray(losses, np.float64)
  if losses.shape != (n,):
    raise ValueError(
        f'an evaluator must return one loss per architecture, shape ({n},); got '
        f'{losses.shape}.')
  return losses


class CountingEvaluator:
  """Wraps an evaluator and counts what it was asked to evaluate.

  ``count``: architectures requested, each once per request (the search budget);
  ``calls``: batched calls; ``unique_count``: distinct architectures requested;
  ``forwarded``: architectures passed on to the wrapped evaluator (``count`` unless
  ``cache``). With ``cache=True``, repeated architectures are answered from a cache instead
  of re-evaluated, which changes nothing for a deterministic evaluator and still counts
  every request in ``count``.
  """

  def __init__(self, evaluate: Callable[[np.ndarray], Any], cache: bool = False):
    if not callable(evaluate):
      raise TypeError(f'CountingEvaluator wraps a callable, got {type(evaluate).__name__}.')
    self.evaluate = evaluate
    self.cache = cache
    self.count = 0
    self.calls = 0
    self.forwarded = 0
    self._seen: set[bytes] = set()
    self._cached: dict[bytes, float] = {}

  @property
  def unique_count(self) -> int:
    return len(self._seen)

  def __call__(self, codes: np.ndarray) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.ndim != 3:
      raise ValueError(
          f'evaluators take codes [N, cell types, edges]; got shape {codes.shape}.')
    codes = codes.astype(np.int32)
    keys = [row.tobytes() for row in codes]
    self.calls += 1
    self.count += len(keys)
    self._seen.update(keys)
    if not self.cache:
      self.forwarded += len(keys)
      return _check_losses(self.evaluate(codes), len(keys))
    missing = {}
    for i, key in enumerate(keys):
      if key not in self._cached and key not in missing:
        missing[key] = i
    if missing:
      fresh = _check_losses(self.evaluate(codes[list(missing.values())]), len(missing))
      self.forwarded += len(missing)
      self._cached.update(zip(missing, fresh.tolist()))
    return np.array([self._cached[key] for key in keys], np.float64)

  def __repr__(self) -> str:
    return (f'CountingEvaluator(count={self.count}, calls={self.calls}, '
            f'unique={self.unique_count}, cache={self.cache})')


# --------------------------------------------------------------------------- tables
class _NatsBenchTable(Mapping):
  """NATS-Bench (topology) accuracies, read per architecture on first use."""

  def __init__(self, api, dataset: str, hp: str, metric: str):
    self.api = api
    self.dataset = dataset
    self.hp = hp
    self.metric = metric
    self._values: dict[str, float] = {}

  def __getitem__(self, arch: str) -> float:
    if arch not in self._values:
      index = self.api.query_index_by_arch(arch)
      if index is None or index < 0:
        raise KeyError(arch)
      info = self.api.get_more_info(index, self.dataset, hp=self.hp, is_random=False)
      if self.metric not in info:
        raise ValueError(
            f'NATS-Bench has no {self.metric!r} for dataset {self.dataset!r} (hp='
            f'{self.hp!r}); available: {sorted(info)}. Use dataset="cifar10-valid" for '
            'the CIFAR-10 validation accuracy, or metric="test-accuracy".')
      self._values[arch] = float(info[self.metric])
    return self._values[arch]

  def __iter__(self) -> Iterator[str]:
    return iter(self.api.meta_archs)

  def __len__(self) -> int:
    return len(self.api)


class TabularEvaluator:
  """Losses looked up in a table of accuracies keyed by the architecture's text form.

  The key of an architecture is ``space.format(space.decode(codes))``: for NAS-Bench-201
  the benchmark string ``|op~0|+|op~0|op~1|+|op~0|op~1|op~2|``. The loss is the error
  ``accuracy_scale - accuracy``: the error in percent for accuracies in percent
  (``accuracy_scale=100``, the default), ``1 - accuracy`` for fractions
  (``accuracy_scale=1``). An architecture missing from the table raises KeyError.
  """

  def __init__(self, table: Mapping[str, float], space: SearchSpace | str = 'nb201',
               accuracy_scale: float = 100.0, source: str = 'table'):
    self.space = get_space(space) if isinstance(space, str) else space
    self.table = table
    self.accuracy_scale = float(accuracy_scale)
    self.source = source

  def key(self, codes: np.ndarray) -> str:
    """The table key of one architecture ``codes [T, E]``."""
    return self.space.format(self.space.decode(codes))

  def accuracy(self, arch: str) -> float:
    """The table's accuracy of an architecture given in text form."""
    try:
      return float(self.table[arch])
    except KeyError:
      raise KeyError(
          f'architecture {arch} is not in {self.source} ({len(self.table)} '
          'architectures).') from None

  def __call__(self, codes: np.ndarray) -> np.ndarray:
    codes = check_codes_batch(self.space, codes)
    return np.array([self.accuracy_scale - self.accuracy(self.key(c)) for c in codes],
                    np.float64)

  def __len__(self) -> int:
    return len(self.table)

  def __repr__(self) -> str:
    return (f'TabularEvaluator({self.space.name}, {len(self.table)} architectures from '
            f'{self.source})')

  @classmethod
  def from_file(cls, path: str | os.PathLike, space: SearchSpace | str = 'nb201',
                accuracy_scale: float = 100.0) -> TabularEvaluator:
    """Reads a table of accuracies from a ``.json`` or ``.csv`` file.

    JSON: one object ``{"arch string": accuracy, ...}``. CSV: two columns ``arch,accuracy``
    with an optional header row. Keys are parsed and written back in the space's canonical
    form; every key must be an architecture of ``space`` and every value a number in
    ``[0, accuracy_scale]``.
    """
    space = get_space(space) if isinstance(space, str) else space
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise FileNotFoundError(f'no accuracy table at {path!r}. {_OBTAIN_BENCHMARK}')
    extension = os.path.splitext(path)[1].lower()
    if extension == '.json':
      rows = _read_json_table(path)
    elif extension == '.csv':
      rows = _read_csv_table(path)
    else:
      raise ValueError(
          f'{path!r}: unknown table format {extension!r}; write a .json object '
          '{"arch": accuracy} or a .csv file with columns arch,accuracy.')
    table: dict[str, float] = {}
    for where, arch, value in rows:
      try:
        key = space.format(space.parse(arch))
      except ValueError as e:
        raise ValueError(f'{path}, {where}: {arch!r} is not a {space.name} architecture: '
                         f'{e}') from e
      accuracy = _as_number(value)
      if not 0 <= accuracy <= accuracy_scale:
        raise ValueError(
            f'{path}, {where}: accuracy {value!r} of {key} is not a number in '
            f'[0, {accuracy_scale:g}] (accuracy_scale={accuracy_scale:g}).')
      if key in table:
        raise ValueError(f'{path}, {where}: architecture {key} appears twice.')
      table[key] = accuracy
    if not table:
      raise ValueError(f'{path}: the table is empty.')
    if accuracy_scale == 100 and max(table.values()) <= 1:
      warnings.warn(
          f'{path}: every accuracy is <= 1 but accuracy_scale=100 (percent); pass '
          'accuracy_scale=1.0 if the table holds fractions.', stacklevel=2)
    return cls(table, space, accuracy_scale, source=path)

  @classmethod
  def from_nats_bench(cls, path: str | os.PathLike, dataset: str = 'cifar10-valid',
                      hp: str = '200', metric: str = 'valid-accuracy') -> TabularEvaluator:
    """NAS-Bench-201 accuracies from the NATS-Bench topology benchmark at ``path``.

    ``path`` is the ``NATS-tss-v1_0-3ffb9-simple`` directory (fast mode); each
    architecture's record is read on first use. The default is the search signal of the
    NAS-Bench-201 protocol: validation accuracy (percent) on CIFAR-10's validation split
    after 200 epochs, averaged over the trial seeds. NATS-Bench's ``'cifar10'`` entry
    (trained on train + valid) has no validation accuracy; report its ``'test-accuracy'``
    with a second evaluator.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
      raise FileNotFoundError(f'no NATS-Bench benchmark at {path!r}. {_OBTAIN_BENCHMARK}')
    try:
      import nats_bench  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(
          'TabularEvaluator.from_nats_bench needs the NATS-Bench API: '
          '`pip install nats_bench`.') from e
    api = nats_bench.create(path, 'tss', fast_mode=True, verbose=False)
    table = _NatsBenchTable(api, dataset, str(hp), metric)
    return cls(table, 'nb201', 100.0,
               source=f'NATS-Bench {path} ({dataset}, hp={hp}, {metric})')


def _as_number(value: Any) -> float:
  """``value`` as a float; NaN for anything that is not a number (booleans included)."""
  if isinstance(value, bool):
    return math.nan
  try:
    return float(value)
  except (TypeError, ValueError):
    return math.nan


def _read_json_table(path: str) -> list[tuple[str, Any, Any]]:
  try:
    with open(path, encoding='utf-8') as f:
      # Pairs, not a dict: a key written twice must be an error, not silently the last.
      data = json.load(f, object_pairs_hook=lambda pairs: pairs)
  except json.JSONDecodeError as e:
    raise ValueError(f'{path} is not valid JSON ({e}); expected {{"arch": accuracy}}.') from e
  # The hook turns every object into a list of tuples; arrays stay lists of lists.
  if not isinstance(data, list) or (data and not isinstance(data[0], tuple)):
    raise ValueError(f'{path}: expected a JSON object {{"arch": accuracy, ...}}.')
  return [(f'key {arch!r}', arch, value) for arch, value in data]


def _read_csv_table(path: str) -> list[tuple[str, Any, Any]]:
  rows = []
  with open(path, newline='', encoding='utf-8') as f:
    for line, row in enumerate(csv.reader(f), start=1):
      if not row or all(not cell.strip() for cell in row):
        continue
      if len(row) != 2:
        raise ValueError(
            f'{path}, line {line}: expected two columns arch,accuracy, got {len(row)}: '
            f'{row!r}.')
      arch, value = row[0].strip(), row[1].strip()
      if not rows and line == 1 and arch.lower() == 'arch':
        continue  # The header.
      rows.append((f'line {line}', arch, value))
  return rows


# ------------------------------------------------------------------ weight sharing
def _batch_stats_update(model, variables, weights, images):
  """Per architecture, the running statistics after one training-mode pass from
  ``variables['batch_stats']`` (the recalibration pass): leaves ``[K, ...]``."""

  def one(w):
    _, updates = model.apply(variables, images, w, train=True, mutable=['batch_stats'])
    return updates['batch_stats']

  return jax.vmap(one)(weights)


def _loss_and_hits(model, train: bool, per_arch_stats: bool, params, batch_stats, weights,
                   images, labels):
  """Per architecture, the summed cross-entropy over one batch and the number of correct
  predictions: ``[K]``, ``[K]``. With ``per_arch_stats`` the leaves of ``batch_stats``
  carry a leading architecture axis (recalibrated statistics, one set per architecture)."""

  def one(w, stats):
    variables = {'params': params, 'batch_stats': stats}
    if train:
      # Batch statistics, as the search's architecture step uses; updates discarded.
      logits, _ = model.apply(variables, images, w, train=True, mutable=['batch_stats'])
    else:
      logits = model.apply(variables, images, w, train=False)
    logits = logits.astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum()
    return loss, jnp.sum(jnp.argmax(logits, -1) == labels)

  return jax.vmap(one, in_axes=(0, 0 if per_arch_stats else None))(weights, batch_stats)


@functools.lru_cache(maxsize=None)
def _evaluation_programs(compiler_options: tuple[tuple[str, Any], ...]):
  """``(loss_and_hits, batch_stats_update)`` jitted with XLA's ``compiler_options``
  (pairs), the model static. Jitted once for the process (a Flax module hashes and
  compares by its fields), not once per evaluator: the evaluators of a search, its
  flatness report and a study's other runs evaluate equal supernets at the same shapes,
  and share the traces and the compiled programs."""
  options = dict(compiler_options) or None
  return (jax.jit(_loss_and_hits, static_argnums=(0, 1, 2), compiler_options=options),
          jax.jit(_batch_stats_update, static_argnums=0, compiler_options=options))


def _unpadded(batches, what: str) -> list[tuple[jax.Array, jax.Array]]:
  """``(images, labels)`` batches, the rows of ``(images, labels, mask)`` batches that the
  mask keeps: padding must enter neither the loss nor any BatchNorm statistics."""
  out = []
  for i, batch in enumerate(batches):
    if len(batch) not in (2, 3):
      raise ValueError(f'{what} batch {i}: expected (images, labels) or (images, labels, '
                       f'mask), got {len(batch)} arrays.')
    x, y = np.asarray(batch[0]), np.asarray(batch[1])
    if y.ndim != 1 or x.shape[0] != y.shape[0]:
      raise ValueError(
          f'{what} batch {i}: images {x.shape} and labels {y.shape} do not match; labels '
          'must be integer class ids [B] for images [B, ...].')
    if len(batch) == 3:
      keep = np.asarray(batch[2], bool)
      x, y = x[keep], y[keep]
    if len(y):
      out.append((jnp.asarray(x), jnp.asarray(y)))
  return out


class SupernetEvaluator:
  """Validation cross-entropy of one-hot architectures in a weight-sharing supernet.

  ``model.__call__(images, weights, train)`` takes architecture weights of shape
  ``space.alpha_shape``; an architecture ``codes`` is evaluated at
  ``one_hot(codes, space.num_ops)``. The loss is the mean cross-entropy over every example
  of ``batches`` (``(images, labels)``, or ``(images, labels, mask)`` whose padded rows are
  dropped).

  BatchNorm, by protocol:
  - ``recalibration`` given (a sequence of training images batches; the default protocol of
    every search run): each architecture's BatchNorm statistics are re-estimated on those
    batches (`nanas_jax.nn.recalibration`), then it is evaluated in evaluation mode with
    them. This is the standard one-shot protocol: the supernet's running statistics belong
    to the mixture it was trained with, not to the architecture.
  - otherwise ``train=True``: BatchNorm on each evaluation batch's own statistics (updates
    discarded); ``train=False``: the supernet's running statistics.

  Architectures are evaluated ``chunk_size`` at a time under one ``jax.vmap``, the rest of
  a request filled up to a chunk when the request held one, else in power-of-two pieces
  (`chunk_sizes`): the function compiles for a few sizes whatever N is. With
  ``with_accuracy`` a call answers ``(losses, accuracies)``. ``compiler_options``: XLA's
  options (pairs) for its programs, as the search's
  (`nanas_jax.search.bilevel.xla_compiler_options`).
  """

  def __init__(self, model, variables, space: SearchSpace | str,
               batches: Sequence[tuple[Any, ...]], chunk_size: int = 32,
               train: bool = True, with_accuracy: bool = False,
               recalibration: Sequence[Any] | None = None,
               compiler_options: tuple[tuple[str, Any], ...] = ()):
    self.space = get_space(space) if isinstance(space, str) else space
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
      raise ValueError(f'chunk_size must be an integer >= 1, got {chunk_size!r}.')
    batches = _unpadded(batches, 'evaluation')
    if not batches:
      raise ValueError('SupernetEvaluator needs at least one (images, labels) batch.')
    self.recalibration = None
    if recalibration is not None:
      self.recalibration = [(jnp.asarray(x),) for x in recalibration]
      if not self.recalibration:
        raise ValueError('recalibration needs at least one batch of training images (or '
                         'None for no recalibration).')
    self.model = model
    self.variables = variables
    self.batches = batches
    self.chunk_size = chunk_size
    self.train = train and self.recalibration is None
    self.num_examples = sum(int(y.shape[0]) for _, y in batches)
    self.with_accuracy = with_accuracy
    self.compiler_options = tuple(compiler_options)
    sums, update = _evaluation_programs(self.compiler_options)
    self._sums = functools.partial(sums, model, self.train, self.recalibration is not None)
    self._update = functools.partial(update, model)

  def _chunk_metrics(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # On the host: a one-hot on the device would be a program of its own, run eagerly.
    weights = jnp.asarray(np.eye(self.space.num_ops, dtype=np.float32)[codes])
    params, stats = self.variables['params'], self.variables['batch_stats']
    if self.recalibration is not None:
      stats = recalibration.average_batch_statistics(
          lambda zeros, x: self._update({'params': params, 'batch_stats': zeros}, weights,
                                        x),
          stats, self.recalibration, self.compiler_options)
    sums = [self._sums(params, stats, weights, x, y) for x, y in self.batches]
    # Summed on the host, in float64: on the device each sum would be a program run eagerly.
    loss = sum(np.asarray(batch_loss, np.float64) for batch_loss, _ in sums)
    hits = sum(np.asarray(batch_hits, np.float64) for _, batch_hits in sums)
    return loss / self.num_examples, hits / self.num_examples

  def __call__(self, codes: np.ndarray):
    codes = check_codes_batch(self.space, codes)
    parts, start = [], 0
    for size in chunk_sizes(codes.shape[0], self.chunk_size):
      piece = codes[start:start + size]
      parts.append([m[:len(piece)] for m in self._chunk_metrics(filled(piece, size))])
      start += size
    losses = np.asarray([v for p in parts for v in np.asarray(p[0])], np.float64)
    if not self.with_accuracy:
      return losses
    accuracies = np.asarray([v for p in parts for v in np.asarray(p[1])], np.float64)
    return losses, accuracies


def chunk_sizes(n: int, chunk_size: int) -> list[int]:
  """How `SupernetEvaluator` cuts a request of ``n`` architectures into calls of its
  vmapped function: full chunks, then the remainder. A request that held a full chunk
  has that size compiled by then, so its remainder is `filled` up to one more chunk
  (35 with chunks of 16: 16 + 16 + 16, 13 copies); a smaller request goes in powers of
  two (9: 8 + 1), nothing evaluated for filling. So a request pads less than a chunk,
  only when it is a chunk or more, and the function compiles for at most
  ``log2(chunk_size) + 1`` sizes, only the chunk for large requests: on a CPU a size
  compiles for 16-24 s where an architecture evaluates in about 0.1-0.3 s. The sizes may
  sum past ``n``: the last call is then filled."""
  sizes = [chunk_size] * (n // chunk_size)
  rest = n % chunk_size
  if rest and sizes:
    return sizes + [chunk_size]
  while rest:
    sizes.append(1 << (rest.bit_length() - 1))
    rest -= sizes[-1]
  return sizes


def filled(codes: np.ndarray, size: int) -> np.ndarray:
  """``codes [N, ...]`` filled up to ``size`` rows with copies of its first architecture
  (a valid one, whose answers the caller drops), so that a short piece of work runs the
  program compiled for ``size``."""
  return np.concatenate([codes, np.repeat(codes[:1], size - len(codes), axis=0)])
