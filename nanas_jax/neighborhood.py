"""Architecture neighborhoods: discrete neighbors and differentiable perturbations.

Discrete side (numpy), on encodings ``codes[cell_type, edge] = op id``: the distance
between two architectures is the number of entries whose op differs, and the neighbors at
distance 1..r change the op of up to r editable edges (``space.editable_edges``) to
another op of ``space.swap_ops``. They are enumerated in a fixed order or sampled
uniformly without enumerating (NA-RS).

Differentiable side (jax.numpy, jittable and vmappable with ``space`` and the string /
size arguments static), on architecture parameters ``alpha [T, E, O]``: perturbations of
``softmax(alpha)`` that stand for a neighbor (NA-DARTS, see DESIGN.md: ``swap`` by default),
and the aggregations of the neighbors' losses.
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special

from nanas_jax.spaces.base import SearchSpace

PERTURBATIONS = ('swap', 'mix', 'logit_noise', 'identity')
# The perturbations that move ops on ``radius`` of the kept edges.
RADIUS_PERTURBATIONS = ('swap', 'mix')
AGGREGATIONS = ('mean', 'max', 'softmax_tau')

# Ablation knobs without a published value: 'mix' moves half an edge's weight to another
# op; 'logit_noise' is small next to trained alpha (|alpha| ~ 1).
DEFAULT_EPS = 0.5
DEFAULT_SIGMA = 0.3
DEFAULT_TAU = 1.0

# Below this many neighbors, sampling enumerates them and picks without replacement;
# above it, it draws one at a time and rejects repeats.
_ENUMERATE_LIMIT = 50_000


def check_radius(radius: int) -> int:
  """``radius`` as an int, or a ValueError unless it is an integer >= 1."""
  if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)) or radius < 1:
    raise ValueError(f'radius must be an integer >= 1, got {radius!r}.')
  return int(radius)


def distance(a: np.ndarray, b: np.ndarray) -> int:
  """Number of (cell type, edge) entries whose op differs between two encodings."""
  a, b = np.asarray(a), np.asarray(b)
  if a.shape != b.shape:
    raise ValueError(
        f'distance: encodings have shapes {a.shape} and {b.shape}; both must be '
        '[cell types, edges] of the same space.')
  return int(np.count_nonzero(a != b))


def _moves(space: SearchSpace, codes: np.ndarray):
  """Flat codes, the flat positions a neighbor may edit, and their alternative ops."""
  codes = space.check_codes(codes)
  space.decode(codes)  # Raises unless codes is an architecture of the space.
  flat = codes.ravel()
  swap = np.flatnonzero(space.swap_ops)
  positions, alternatives = [], []
  for position in np.flatnonzero(space.editable_edges(codes).ravel()):
    others = swap[swap != flat[position]]
    if others.size:
      positions.append(position)
      alternatives.append(others)
  return codes, np.array(positions, np.int64), alternatives


def _elementary_table(counts: list[int], radius: int) -> list[list[int]]:
  """``table[i][d]``: number of ways to change d of the first i positions (exact ints).

  This is the elementary symmetric polynomial e_d(counts[:i]); it sizes the neighborhood
  and drives uniform sampling of the changed positions.
  """
  table = [[1] + [0] * radius]
  for count in counts:
    previous = table[-1]
    table.append([previous[0]] + [previous[d] + count * previous[d - 1]
                                  for d in range(1, radius + 1)])
  return table


def _distances(radius: int, exact: bool) -> list[int]:
  """The distances a neighborhood covers: 1..radius, or exactly radius."""
  return [radius] if exact else list(range(1, radius + 1))


def neighborhood_size(space: SearchSpace, codes: np.ndarray, radius: int,
                      exact: bool = False) -> int:
  """Number of neighbors at distance 1..radius (exactly ``radius`` with ``exact``; the
  centre not counted)."""
  radius = check_radius(radius)
  _, _, alternatives = _moves(space, codes)
  table = _elementary_table([len(a) for a in alternatives], radius)
  return sum(table[-1][d] for d in _distances(radius, exact))


def enumerate_neighbors(space: SearchSpace, codes: np.ndarray, radius: int,
                        include_center: bool = False, exact: bool = False) -> np.ndarray:
  """All neighbors at distance 1..radius (exactly ``radius`` with ``exact``), int32
  ``[N, T, E]``.

  Order: the centre first if included, then by distance, then by the changed positions
  (lexicographic over flat (cell type, edge) indices), then by the new op ids.
  """
  radius = check_radius(radius)
  codes, positions, alternatives = _moves(space, codes)
  flat = codes.ravel()
  blocks = [flat[None]] if include_center else []
  for d in _distances(radius, exact):
    for combo in itertools.combinations(range(len(positions)), d):
      grids = np.meshgrid(*[alternatives[i] for i in combo], indexing='ij')
      new_ops = np.stack(grids, axis=-1).reshape(-1, d)
      block = np.repeat(flat[None], len(new_ops), axis=0)
      block[:, positions[list(combo)]] = new_ops
      blocks.append(block)
  if not blocks:
    return np.zeros((0,) + codes.shape, np.int32)
  return np.concatenate(blocks).reshape((-1,) + codes.shape).astype(np.int32)


def _sample_one(rng: np.random.Generator, flat: np.ndarray, positions: np.ndarray,
                alternatives: list[np.ndarray], table: list[list[int]],
                distances: list[int]) -> np.ndarray:
  """One neighbor drawn uniformly from all neighbors at the given distances."""
  n = len(positions)
  per_distance = [table[n][d] for d in distances]
  total = sum(per_distance)
  d = distances[rng.choice(len(distances), p=[count / total for count in per_distance])]
  neighbor = flat.copy()
  # Walk positions from the last: include position i-1 with the share of the d-subsets
  # of the first i positions that contain it, weighted by its number of alternatives,
  # so every (positions, ops) change of size d is equally likely.
  for i in range(n, 0, -1):
    if d == 0:
      break
    with_it = len(alternatives[i - 1]) * table[i - 1][d - 1]
    if rng.random() * table[i][d] < with_it:
      neighbor[positions[i - 1]] = rng.choice(alternatives[i - 1])
      d -= 1
  return neighbor


def sample_neighbors(space: SearchSpace, codes: np.ndarray, radius: int, k: int,
                     rng: np.random.Generator, include_center: bool = False,
                     exact: bool = False) -> np.ndarray:
  """``k`` distinct neighbors at distance 1..radius (exactly ``radius`` with ``exact``),
  uniform without replacement, int32 ``[k (+1), T, E]``.

  With ``include_center`` the centre comes first, followed by the k neighbors.
  """
  radius = check_radius(radius)
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
    raise ValueError(f'k must be an integer >= 0, got {k!r}.')
  codes, positions, alternatives = _moves(space, codes)
  table = _elementary_table([len(a) for a in alternatives], radius)
  distances = _distances(radius, exact)
  size = sum(table[-1][d] for d in distances)
  if k > size:
    where = f'exactly {radius}' if exact else f'1..{radius}'
    raise ValueError(
        f'asked for k={k} neighbors but only {size} exist at distance {where}; '
        'lower k or raise radius.')
  if size <= max(_ENUMERATE_LIMIT, 2 * k):
    every = enumerate_neighbors(space, codes, radius, exact=exact)
    chosen = every[rng.choice(size, size=k, replace=False)].reshape(k, codes.size)
  else:
    flat, seen, rows = codes.ravel(), set(), []
    while len(rows) < k:
      neighbor = _sample_one(rng, flat, positions, alternatives, table, distances)
      if neighbor.tobytes() not in seen:
        seen.add(neighbor.tobytes())
        rows.append(neighbor)
    chosen = np.stack(rows) if rows else np.zeros((0, flat.size), np.int32)
  if include_center:
    chosen = np.concatenate([codes.reshape(1, -1), chosen])
  return chosen.reshape((-1,) + codes.shape).astype(np.int32)


def _check_alpha(space: SearchSpace, alpha) -> jax.Array:
  alpha = jnp.asarray(alpha)
  if alpha.shape != space.alpha_shape:
    raise ValueError(
        f'{space.name} architecture parameters have shape {alpha.shape}; expected '
        f'{space.alpha_shape} (cell types x edges x ops).')
  return alpha


@functools.partial(jax.jit, static_argnames='space')
def kept_edges(space: SearchSpace, weights) -> jax.Array:
  """bool ``[T, E]``: the edges of the architecture ``space.derive(weights)``.

  DARTS: per node the two edges with the largest non-none weight, the earlier source
  winning ties (the reference's stable sort); NB201 keeps every edge.
  """
  weights = _check_alpha(space, weights)
  num_types, num_edges, num_ops = space.alpha_shape
  if space.inputs_per_node is None:
    return jnp.ones((num_types, num_edges), bool)
  not_none = np.arange(num_ops) != space.none_index
  strength = jnp.max(jnp.where(not_none, weights, -jnp.inf), axis=-1)
  # An edge's rank within its node = the number of same-node edges that a stable
  # descending sort puts before it.
  same_node = space.edge_targets[:, None] == space.edge_targets[None, :]
  earlier = np.arange(num_edges)[None, :] < np.arange(num_edges)[:, None]
  mine, other = strength[:, :, None], strength[:, None, :]
  ahead = same_node & ((other > mine) | ((other == mine) & earlier))
  return jnp.sum(ahead, axis=-1) < space.inputs_per_node


def max_kept_edges(space: SearchSpace) -> int:
  """How many edges ``kept_edges`` selects, whatever the weights: also the farthest any
  neighbor of an architecture can be, since a move changes ops, never edges (DARTS 16,
  NAS-Bench-201 6)."""
  num_types, num_edges, _ = space.alpha_shape
  if space.inputs_per_node is None:
    return num_types * num_edges
  return num_types * space.num_targets * space.inputs_per_node


def check_reach(space: SearchSpace, radius: int, field: str) -> int:
  """``radius``, if a neighbor of ``space``'s architectures can lie that far: none is
  farther than `max_kept_edges`. For checks before a run starts; ``field`` names the
  setting in the error."""
  radius = check_radius(radius)
  farthest = max_kept_edges(space)
  if radius > farthest:
    raise ValueError(
        f"{field} = {radius} is invalid: a {space.name} architecture's neighbors are at "
        f"most {farthest} edges away (the edges it keeps); use a radius <= {farthest}.")
  return radius


def space_neighborhood_size(space: SearchSpace, radius: int) -> int:
  """Neighbors at distance 1..radius of any architecture of ``space`` (`neighborhood_size`
  without one): the same number for every architecture, since each keeps `max_kept_edges`
  edges, each holding a swappable op whose alternatives are the other swappable ops."""
  alternatives = int(np.count_nonzero(space.swap_ops)) - 1
  table = _elementary_table([alternatives] * max_kept_edges(space), check_radius(radius))
  return sum(table[-1][1:])


def _uniform_choice(noise: jax.Array, allowed: jax.Array) -> jax.Array:
  """Per row of uniform ``noise [..., O]``, an index drawn uniformly where ``allowed``."""
  return jnp.argmax(jnp.where(allowed, noise, -1.0), axis=-1)


def _choose_edges(space: SearchSpace, noise: jax.Array, weights: jax.Array,
                  radius: int) -> jax.Array:
  """bool ``[T, E]``: ``radius`` distinct kept edges, drawn uniformly with ``noise [T, E]``."""
  kept = kept_edges(space, weights).ravel()
  _, picked = jax.lax.top_k(jnp.where(kept, noise.ravel(), -1.0), radius)
  chosen = jnp.zeros(kept.shape, bool).at[picked].set(True)
  return chosen.reshape(weights.shape[:-1])


def _check_kind(kind: str, valid: tuple[str, ...], what: str) -> None:
  if kind not in valid:
    raise ValueError(f'unknown {what} {kind!r}; valid: {valid}.')


@functools.partial(jax.jit, static_argnames=('space', 'kind', 'radius'))
def perturb_weights(space: SearchSpace, key: jax.Array, alpha, kind: str = 'swap',
                    radius: int = 1, eps: float = DEFAULT_EPS,
                    sigma: float = DEFAULT_SIGMA) -> jax.Array:
  """Weights ``[T, E, O]`` of one random neighbor of the architecture ``alpha``.

  - 'identity': ``softmax(alpha)``.
  - 'swap': on ``radius`` distinct kept edges, swap the weight of the edge's strongest
    swappable op with that of another swappable op drawn uniformly. A permutation per
    edge, differentiable in alpha; on one-hot weights, a neighbor at distance radius.
  - 'mix': on ``radius`` distinct kept edges, ``(1 - eps) p + eps onehot(o)`` with ``o``
    another swappable op than the edge's strongest (as 'swap' picks it): a move towards a
    neighbor, never towards the architecture itself.
  - 'logit_noise': ``softmax(alpha + sigma N(0, 1))`` on every edge, a random point near
    alpha in logit space for the architecture step. This is not SDARTS's random smoothing
    (SDARTS-RS perturbs alpha in the *weight* step, so that the supernet weights become
    robust to it); here the noise enters the architecture objective.
  """
  _check_kind(kind, PERTURBATIONS, 'perturbation')
  alpha = _check_alpha(space, alpha)
  if kind == 'logit_noise':
    return jax.nn.softmax(alpha + sigma * jax.random.normal(key, alpha.shape, alpha.dtype),
                          axis=-1)
  weights = jax.nn.softmax(alpha, axis=-1)
  if kind == 'identity':
    return weights
  radius = check_reach(space, radius, 'radius')
  num_ops = space.num_ops
  # One draw for the edges and the ops: each random draw is a threefry kernel that XLA
  # compiles separately, and on a CPU those compiles dominate this function's cost.
  noise = jax.random.uniform(key, weights.shape[:-1] + (1 + num_ops,), weights.dtype)
  chosen = _choose_edges(space, noise[..., 0], weights, radius)[..., None]
  op_noise = noise[..., 1:]
  swap_ops = jnp.asarray(space.swap_ops)
  current = jnp.argmax(jnp.where(swap_ops, weights, -jnp.inf), axis=-1)
  current_hot = jax.nn.one_hot(current, num_ops, dtype=weights.dtype)
  new_op = _uniform_choice(op_noise, swap_ops & (current_hot == 0))
  new_hot = jax.nn.one_hot(new_op, num_ops, dtype=weights.dtype)
  if kind == 'mix':
    return jnp.where(chosen, (1 - eps) * weights + eps * new_hot, weights)
  # Gathered values, not constants: the gradient reaches alpha through both entries.
  # Selecting them (rather than adding their difference) keeps the swap an exact
  # permutation in floating point.
  p_current = jnp.sum(weights * current_hot, axis=-1, keepdims=True)
  p_new = jnp.sum(weights * new_hot, axis=-1, keepdims=True)
  swapped = jnp.where(current_hot > 0, p_new, jnp.where(new_hot > 0, p_current, weights))
  return jnp.where(chosen, swapped, weights)


@functools.partial(
    jax.jit, static_argnames=('space', 'num', 'kind', 'radius', 'include_center'))
def sample_perturbed_weights(space: SearchSpace, key: jax.Array, alpha, num: int,
                             kind: str = 'swap', radius: int = 1,
                             include_center: bool = False, eps: float = DEFAULT_EPS,
                             sigma: float = DEFAULT_SIGMA) -> jax.Array:
  """``num`` independent perturbations, ``[num (+1), T, E, O]``; the centre first if asked."""
  if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num < 1:
    raise ValueError(f'num (neighbors per step) must be an integer >= 1, got {num!r}.')
  alpha = _check_alpha(space, alpha)
  perturbed = jax.vmap(
      lambda k: perturb_weights(space, k, alpha, kind, radius, eps, sigma)
  )(jax.random.split(key, num))
  if include_center:
    perturbed = jnp.concatenate([jax.nn.softmax(alpha, axis=-1)[None], perturbed])
  return perturbed


def aggregate(losses, kind: str = 'mean', tau: float = DEFAULT_TAU):
  """Aggregates the neighbors' losses ``[K]`` into one scalar.

  'softmax_tau' is ``tau * (logsumexp(losses / tau) - log K)``: a smooth maximum that lies
  between the mean (its limit as tau -> inf) and the max (tau -> 0).

  A numpy array is aggregated with numpy in its own precision (NA-RS scores float64 table
  and supernet losses; JAX would compute in float32 unless x64 is on); anything else with
  jax.numpy, differentiably (the NA-DARTS objective).
  """
  _check_kind(kind, AGGREGATIONS, 'aggregation')
  xp, logsumexp = ((np, scipy.special.logsumexp) if isinstance(losses, np.ndarray)
                   else (jnp, jax.nn.logsumexp))
  losses = xp.asarray(losses)
  if losses.ndim != 1 or losses.shape[0] == 0:
    raise ValueError(f'aggregate expects a non-empty vector of losses, got shape {losses.shape}.')
  if kind == 'mean':
    return xp.mean(losses)
  if kind == 'max':
    return xp.max(losses)
  if isinstance(tau, (int, float)) and not tau > 0:
    raise ValueError(f'softmax_tau needs tau > 0, got {tau!r}.')
  return tau * (logsumexp(losses / tau) - math.log(losses.shape[0]))
