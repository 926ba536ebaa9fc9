"""Random search (RS) and neighborhood-aware random search (NA-RS) over a pluggable evaluator.

Both draw candidate architectures uniformly and without repeats, and return the candidate
with the lowest score; the evaluator (see ``evaluators.py``) returns LOSSES, lower is
better (errors for accuracy tables, cross-entropy for a supernet).

- RS scores a candidate by its own loss.
- NA-RS scores a candidate ``a`` by ``AGG_{a' in N(a)} loss(a')`` over its neighborhood:
  every architecture at distance 1..``radius`` (``num_neighbors=None``) or ``num_neighbors``
  of them drawn uniformly without replacement, plus ``a`` itself if ``include_center``.
  AGG is `neighborhood.aggregate` on the losses: ``mean`` (the paper), ``max`` (the worst
  neighbor) or ``softmax_tau`` (a smooth worst neighbor). A candidate's whole neighborhood
  goes to the evaluator in one batched call, with the next candidates' up to
  ``batch_size`` architectures: a supernet evaluator runs large calls in full chunks of
  one compiled size.

Budget. Every architecture handed to the evaluator counts once per request, repeats
included (neighborhoods of different candidates overlap): ``budget['total_evaluations']``.
NA-RS with ``C`` candidates and ``K`` neighbors each costs ``C * (K + 1)`` evaluations with
the centre included; without it, ``C * K + 1``, the last one being the winner's own loss,
evaluated once at the end so that every result reports it. For an honest comparison run
`random_search_same_budget`: plain RS given as many evaluations as the NA-RS run used.

Progress: each search takes an optional ``progress(done, total)`` callback, called with
the number of candidates scored after every evaluator call (e.g. `nanas_jax.loop.Progress`,
which logs the rate and the ETA).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import numpy as np

from nanas_jax import neighborhood
from nanas_jax.search.evaluators import CountingEvaluator
from nanas_jax.spaces import SearchSpace, get_space

# Above this many neighbors per candidate, NA-RS refuses to enumerate them all.
MAX_ENUMERATED_NEIGHBORS = 5000
# Spaces with at most this many encodings are sampled by drawing encoding indices.
_ENUMERABLE_CODES = 1_000_000
DEFAULT_BATCH_SIZE = 256


@dataclasses.dataclass
class SearchResult:
  """The outcome of RS / NA-RS.

  Attributes:
    method: 'random_search' or 'na_random_search'.
    space: the search space's name.
    best_codes: int32 ``[T, E]`` of the chosen architecture.
    best_arch: its text form (``space.format``).
    best_loss: its own loss.
    best_score: its score: the aggregate over its neighborhood (NA-RS), its own loss (RS).
    candidates: int32 ``[C, T, E]``, in the order they were drawn.
    candidate_scores: float ``[C]``, the score of each candidate.
    candidate_losses: float ``[C]``, each candidate's own loss, NaN where the search did not
      evaluate it (NA-RS without the centre).
    budget: ``candidates``, ``neighbors_evaluated`` (neighbors, centres excluded),
      ``centers_evaluated``, ``total_evaluations`` (every architecture handed to the
      evaluator, repeats included), ``unique_evaluations`` (distinct architectures),
      ``evaluator_calls``.
    settings: the search's arguments (radius, num_neighbors, ...).
  """

  method: str
  space: str
  best_codes: np.ndarray
  best_arch: str
  best_loss: float
  best_score: float
  candidates: np.ndarray
  candidate_scores: np.ndarray
  candidate_losses: np.ndarray
  budget: dict[str, int]
  settings: dict[str, Any]

  def to_json(self) -> dict[str, Any]:
    """A JSON-serialisable dict (NaN losses become None)."""

    def floats(values):
      return [None if math.isnan(v) else float(v) for v in np.asarray(values).tolist()]

    return {
        'method': self.method,
        'space': self.space,
        'best_arch': self.best_arch,
        'best_codes': np.asarray(self.best_codes).tolist(),
        'best_loss': float(self.best_loss),
        'best_score': float(self.best_score),
        'candidates': np.asarray(self.candidates).tolist(),
        'candidate_scores': floats(self.candidate_scores),
        'candidate_losses': floats(self.candidate_losses),
        'budget': {k: int(v) for k, v in self.budget.items()},
        'settings': dict(self.settings),
    }


# ------------------------------------------------------------------------ validation
def _as_space(space: SearchSpace | str) -> SearchSpace:
  return get_space(space) if isinstance(space, str) else space


def _check_count(name: str, value: Any, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f'{name} must be an integer >= {minimum}, got {value!r}.')
  return int(value)


def _check_aggregation(aggregation: str, tau: float) -> None:
  if aggregation not in neighborhood.AGGREGATIONS:
    raise ValueError(
        f'unknown aggregation {aggregation!r}; valid: {neighborhood.AGGREGATIONS}.')
  if aggregation == 'softmax_tau' and not (isinstance(tau, (int, float)) and tau > 0):
    raise ValueError(f"aggregation 'softmax_tau' needs tau > 0, got {tau!r}.")


def _as_rng(rng: np.random.Generator | int | None) -> np.random.Generator:
  return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


# ------------------------------------------------------------------------- sampling
def _enumerable(space: SearchSpace) -> bool:
  num_types, num_edges = space.codes_shape
  return space.num_ops ** (num_types * num_edges) <= _ENUMERABLE_CODES


def _codes_of_indices(space: SearchSpace, indices: np.ndarray) -> np.ndarray:
  """Encodings whose flat op ids are the base-``num_ops`` digits of ``indices``."""
  size = math.prod(space.codes_shape)
  digits = (indices[:, None] // space.num_ops ** np.arange(size - 1, -1, -1)) % space.num_ops
  return digits.reshape((-1,) + space.codes_shape).astype(np.int32)


def _is_architecture(space: SearchSpace, codes: np.ndarray) -> bool:
  try:
    space.decode(codes)
  except ValueError:
    return False
  return True


@functools.lru_cache(maxsize=None)
def space_size(space: SearchSpace) -> int | None:
  """The number of architectures of a small space (NB201: 15625); None when too many to
  count by enumeration (DARTS)."""
  if not _enumerable(space):
    return None
  every = _codes_of_indices(space, np.arange(space.num_ops ** math.prod(space.codes_shape)))
  return sum(_is_architecture(space, codes) for codes in every)


def sample_candidates(space: SearchSpace | str, num_candidates: int,
                      rng: np.random.Generator | int | None) -> np.ndarray:
  """``num_candidates`` distinct architectures drawn uniformly: int32 ``[C, T, E]``."""
  space = _as_space(space)
  num_candidates = _check_count('num_candidates', num_candidates, 1)
  rng = _as_rng(rng)
  if _enumerable(space):
    size = space_size(space)
    if num_candidates > size:
      raise ValueError(
          f'asked for {num_candidates} distinct candidates but the {space.name} space has '
          f'only {size} architectures.')
    # A random order of every encoding, keeping those that are architectures.
    order = rng.permutation(space.num_ops ** math.prod(space.codes_shape))
    chosen = []
    for start in range(0, order.size, 4 * num_candidates):
      block = _codes_of_indices(space, order[start:start + 4 * num_candidates])
      chosen.extend(c for c in block if _is_architecture(space, c))
      if len(chosen) >= num_candidates:
        break
    return np.stack(chosen[:num_candidates])
  seen, chosen = set(), []
  while len(chosen) < num_candidates:
    codes = space.encode(space.random(rng)).astype(np.int32)
    if codes.tobytes() not in seen:
      seen.add(codes.tobytes())
      chosen.append(codes)
  return np.stack(chosen)


def _candidate_pool(space: SearchSpace, num_candidates: int | None, rng,
                    candidates: Any) -> np.ndarray:
  """The given candidates (checked) or freshly sampled ones."""
  if candidates is None:
    if num_candidates is None:
      raise ValueError('give num_candidates (or an explicit candidates array).')
    return sample_candidates(space, num_candidates, rng)
  pool = np.asarray(candidates)
  if pool.ndim != 3 or pool.shape[0] < 1:
    raise ValueError(
        f'candidates must be a non-empty int array [C, {space.codes_shape[0]}, '
        f'{space.codes_shape[1]}], got shape {pool.shape}.')
  if num_candidates is not None and _check_count('num_candidates', num_candidates,
                                                 1) != pool.shape[0]:
    raise ValueError(
        f'num_candidates={num_candidates} but {pool.shape[0]} candidates were given; '
        'pass num_candidates=None with an explicit pool.')
  pool = np.stack([space.check_codes(c) for c in pool])
  for c in pool:
    space.decode(c)  # Raises unless the candidate is an architecture.
  if len({c.tobytes() for c in pool}) != len(pool):
    raise ValueError('candidates contain repeats; give distinct architectures.')
  return pool


Progress = Callable[[int, int], None]


def _evaluate_in_batches(evaluator: Callable, codes: np.ndarray, batch_size: int,
                         progress: Progress | None = None) -> np.ndarray:
  losses = []
  for i in range(0, len(codes), batch_size):
    losses.append(evaluator(codes[i:i + batch_size]))
    if progress:
      progress(min(i + batch_size, len(codes)), len(codes))
  return np.concatenate(losses)


def _budget(counter: CountingEvaluator, candidates: int, neighbors: int,
            centers: int) -> dict[str, int]:
  assert counter.count == neighbors + centers, (counter.count, neighbors, centers)
  return {
      'candidates': candidates,
      'neighbors_evaluated': neighbors,
      'centers_evaluated': centers,
      'total_evaluations': counter.count,
      'unique_evaluations': counter.unique_count,
      'evaluator_calls': counter.calls,
  }


# --------------------------------------------------------------------------- searches
def random_search(space: SearchSpace | str, evaluator: Callable[[np.ndarray], Any],
                  num_candidates: int | None, rng: np.random.Generator | int | None, *,
                  candidates: Any = None, batch_size: int = DEFAULT_BATCH_SIZE,
                  progress: Progress | None = None) -> SearchResult:
  """Plain random search: the candidate with the lowest own loss.

  ``num_candidates`` distinct architectures drawn uniformly (or the given ``candidates``
  ``[C, T, E]``), evaluated ``batch_size`` per evaluator call. Ties go to the earlier
  candidate.
  """
  space = _as_space(space)
  batch_size = _check_count('batch_size', batch_size, 1)
  pool = _candidate_pool(space, num_candidates, _as_rng(rng), candidates)
  counter = CountingEvaluator(evaluator)
  losses = _evaluate_in_batches(counter, pool, batch_size, progress)
  best = int(np.argmin(losses))
  return SearchResult(
      method='random_search', space=space.name, best_codes=pool[best],
      best_arch=space.format(space.decode(pool[best])), best_loss=float(losses[best]),
      best_score=float(losses[best]), candidates=pool, candidate_scores=losses,
      candidate_losses=losses.copy(),
      budget=_budget(counter, len(pool), neighbors=0, centers=len(pool)),
      settings={'num_candidates': len(pool), 'batch_size': batch_size})


def na_random_search(space: SearchSpace | str, evaluator: Callable[[np.ndarray], Any],
                     num_candidates: int | None, rng: np.random.Generator | int | None,
                     radius: int = 1, num_neighbors: int | None = None,
                     include_center: bool = True, aggregation: str = 'mean',
                     tau: float = neighborhood.DEFAULT_TAU, *,
                     candidates: Any = None, batch_size: int = DEFAULT_BATCH_SIZE,
                     progress: Progress | None = None) -> SearchResult:
  """Neighborhood-aware random search: the candidate with the lowest aggregated
  neighborhood loss (see the module docstring).

  ``num_neighbors=None`` enumerates the whole neighborhood at distance 1..``radius``
  (refused above ``MAX_ENUMERATED_NEIGHBORS`` neighbors: DARTS at radius 3 has ~125,000);
  an integer samples that many distinct neighbors per candidate. Consecutive candidates'
  neighborhoods go to the evaluator together, at most ``batch_size`` architectures a call
  (a neighborhood is never split; one larger than that goes alone). Every argument and
  every candidate's neighborhood size is checked before the first evaluation. Ties go to
  the earlier candidate.
  """
  space = _as_space(space)
  batch_size = _check_count('batch_size', batch_size, 1)
  radius = _check_count('radius', radius, 1)
  if num_neighbors is not None:
    num_neighbors = _check_count('num_neighbors', num_neighbors, 1)
  _check_aggregation(aggregation, tau)
  rng = _as_rng(rng)
  pool = _candidate_pool(space, num_candidates, rng, candidates)
  for codes in pool:
    size = neighborhood.neighborhood_size(space, codes, radius)
    if num_neighbors is None and size > MAX_ENUMERATED_NEIGHBORS:
      raise ValueError(
          f'{space.name} candidate {space.format(space.decode(codes))} has {size} '
          f'neighbors within radius {radius}, more than the {MAX_ENUMERATED_NEIGHBORS} '
          'that NA-RS enumerates; pass num_neighbors=K to sample K of them.')
    if num_neighbors is not None and num_neighbors > size:
      raise ValueError(
          f'num_neighbors={num_neighbors} exceeds the {size} neighbors within radius '
          f'{radius} of {space.name} candidate {space.format(space.decode(codes))}; '
          'lower num_neighbors or raise radius.')

  counter = CountingEvaluator(evaluator)
  scores = np.empty(len(pool), np.float64)
  own = np.full(len(pool), np.nan)
  neighbors_evaluated = 0
  pending: list[np.ndarray] = []  # the neighborhoods of the next evaluator call

  def score_pending(last: int) -> None:
    """Evaluates the pending neighborhoods, those of the candidates up to ``last``."""
    losses = np.split(counter(np.concatenate(pending)),
                      np.cumsum([len(g) for g in pending])[:-1])
    for i, group_losses in zip(range(last + 1 - len(pending), last + 1), losses):
      scores[i] = float(neighborhood.aggregate(group_losses, aggregation, tau))
      if include_center:
        own[i] = group_losses[0]
    pending.clear()
    if progress:
      progress(last + 1, len(pool))

  for i, codes in enumerate(pool):
    if num_neighbors is None:
      group = neighborhood.enumerate_neighbors(space, codes, radius, include_center)
    else:
      group = neighborhood.sample_neighbors(space, codes, radius, num_neighbors, rng,
                                            include_center)
    if pending and sum(map(len, pending)) + len(group) > batch_size:
      score_pending(i - 1)
    pending.append(group)
    neighbors_evaluated += len(group) - int(include_center)
  score_pending(len(pool) - 1)
  best = int(np.argmin(scores))
  centers = len(pool) if include_center else 1
  if not include_center:
    own[best] = counter(pool[best:best + 1])[0]
  return SearchResult(
      method='na_random_search', space=space.name, best_codes=pool[best],
      best_arch=space.format(space.decode(pool[best])), best_loss=float(own[best]),
      best_score=float(scores[best]), candidates=pool, candidate_scores=scores,
      candidate_losses=own,
      budget=_budget(counter, len(pool), neighbors_evaluated, centers),
      settings={'num_candidates': len(pool), 'radius': radius,
                'num_neighbors': num_neighbors, 'include_center': bool(include_center),
                'aggregation': aggregation, 'tau': float(tau), 'batch_size': batch_size})


def random_search_same_budget(space: SearchSpace | str,
                              evaluator: Callable[[np.ndarray], Any],
                              total_evaluations: int | SearchResult,
                              rng: np.random.Generator | int | None, *,
                              batch_size: int = DEFAULT_BATCH_SIZE,
                              progress: Progress | None = None) -> SearchResult:
  """Plain RS with as many evaluations as another run used (an int, or a `SearchResult`
  whose ``budget['total_evaluations']`` is taken).

  One candidate costs one evaluation, so RS draws ``total_evaluations`` candidates; in a
  space with fewer architectures than that (NB201 has 15625) it evaluates all of them,
  the best RS can do with any budget, and ``budget['requested_evaluations']`` records the
  budget it was given.
  """
  space = _as_space(space)
  if isinstance(total_evaluations, SearchResult):
    total_evaluations = total_evaluations.budget['total_evaluations']
  requested = _check_count('total_evaluations', total_evaluations, 1)
  size = space_size(space)
  num_candidates = requested if size is None else min(requested, size)
  result = random_search(space, evaluator, num_candidates, rng, batch_size=batch_size,
                         progress=progress)
  result.budget['requested_evaluations'] = requested
  result.settings['requested_evaluations'] = requested
  return result
