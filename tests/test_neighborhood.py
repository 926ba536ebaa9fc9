"""Tests for nanas_jax.neighborhood: discrete neighbors, perturbations, aggregations."""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanas_jax import neighborhood as nbh
from nanas_jax.spaces import darts, genotypes, nb201

DARTS_SPACE = darts.DARTS_SPACE
NB201_SPACE = nb201.NB201_SPACE
DARTS_CODES = DARTS_SPACE.encode(genotypes.DARTS_V2)
NB201_CODES = NB201_SPACE.encode(NB201_SPACE.parse(
    '|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|'
    '+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|'))
ALL_NB201 = np.array(list(itertools.product(range(5), repeat=6)), np.int32)[:, None, :]


def _closed_form(editable, alternatives, radius):
  return sum(math.comb(editable, d) * alternatives**d for d in range(1, radius + 1))


def _rows(codes):
  return {c.tobytes() for c in np.asarray(codes, np.int32)}


def test_distance():
  other = NB201_CODES.copy()
  other[0, [1, 4]] = 0
  assert nbh.distance(NB201_CODES, other) == 2
  assert nbh.distance(DARTS_CODES, DARTS_CODES) == 0
  with pytest.raises(ValueError, match=r'shapes \(1, 6\) and \(2, 14\)'):
    nbh.distance(NB201_CODES, DARTS_CODES)


@pytest.mark.parametrize('radius', [1, 2, 6])
def test_nb201_enumeration_equals_brute_force(radius):
  neighbors = nbh.enumerate_neighbors(NB201_SPACE, NB201_CODES, radius)
  distances = (ALL_NB201 != NB201_CODES).sum(axis=(1, 2))
  brute = ALL_NB201[(distances >= 1) & (distances <= radius)]
  assert len(neighbors) == len(brute) == _closed_form(6, 4, radius)
  assert _rows(neighbors) == _rows(brute)
  assert len(_rows(neighbors)) == len(neighbors)
  assert neighbors.dtype == np.int32 and neighbors.shape[1:] == (1, 6)


def test_nb201_radius_one_is_24_and_radius_six_is_the_whole_space():
  assert len(nbh.enumerate_neighbors(NB201_SPACE, NB201_CODES, 1)) == 24
  assert nbh.neighborhood_size(NB201_SPACE, NB201_CODES, 6) == 5**6 - 1


def test_enumeration_order_and_center():
  with_center = nbh.enumerate_neighbors(NB201_SPACE, NB201_CODES, 2, include_center=True)
  np.testing.assert_array_equal(with_center[0], NB201_CODES)
  without = nbh.enumerate_neighbors(NB201_SPACE, NB201_CODES, 2)
  np.testing.assert_array_equal(with_center[1:], without)
  distances = [nbh.distance(n, NB201_CODES) for n in without]
  assert distances == sorted(distances)
  # First neighbor: edge 0 (op 3) takes the smallest other op.
  np.testing.assert_array_equal(without[0], [[0, 3, 4, 1, 3, 1]])


@pytest.mark.parametrize('radius', [1, 2])
def test_darts_enumeration_counts_and_validity(radius):
  neighbors = nbh.enumerate_neighbors(DARTS_SPACE, DARTS_CODES, radius)
  assert len(neighbors) == _closed_form(16, 6, radius) == {1: 96, 2: 4416}[radius]
  assert len(_rows(neighbors)) == len(neighbors)
  used = DARTS_CODES != 0
  # Same edge set, never none, distance 1..radius.
  assert ((neighbors != 0) == used).all()
  distances = (neighbors != DARTS_CODES).sum(axis=(1, 2))
  assert distances.min() == 1 and distances.max() == radius
  DARTS_SPACE.decode(neighbors[-1])


@pytest.mark.parametrize('radius', [1, 2, 3, 5])
def test_neighborhood_size_closed_form(radius):
  assert nbh.neighborhood_size(DARTS_SPACE, DARTS_CODES, radius) == _closed_form(16, 6, radius)
  assert nbh.neighborhood_size(NB201_SPACE, NB201_CODES, radius) == _closed_form(6, 4, radius)


@pytest.mark.parametrize('radius', [1, 2, 3, 6])
def test_every_architecture_of_a_space_has_the_space_wide_neighborhood_size(radius):
  """`space_neighborhood_size` (no architecture) against each of 50 random architectures'
  own count per space, and the closed form."""
  rng = np.random.default_rng(radius)
  for space, closed in ((DARTS_SPACE, _closed_form(16, 6, radius)),
                        (NB201_SPACE, _closed_form(6, 4, radius))):
    assert nbh.space_neighborhood_size(space, radius) == closed
    for _ in range(50):
      codes = space.encode(space.random(rng))
      assert nbh.neighborhood_size(space, codes, radius) == closed


def test_check_reach_names_the_field_and_the_farthest_neighbor():
  assert nbh.check_reach(DARTS_SPACE, 16, 'config.x') == 16
  assert nbh.check_reach(NB201_SPACE, 6, 'config.x') == 6
  with pytest.raises(ValueError, match=r"^config\.x = 7 is invalid: a nb201 architecture's "
                     r'neighbors are at most 6 edges away \(the edges it keeps\); use a '
                     r'radius <= 6\.$'):
    nbh.check_reach(NB201_SPACE, 7, 'config.x')
  with pytest.raises(ValueError, match='radius must be an integer >= 1, got 0'):
    nbh.check_reach(DARTS_SPACE, 0, 'config.x')


def test_sample_large_neighborhood_without_enumerating():
  # 125,376 neighbors at radius 3: above the enumeration limit, so drawn one by one.
  size = nbh.neighborhood_size(DARTS_SPACE, DARTS_CODES, 3)
  assert size > nbh._ENUMERATE_LIMIT
  sample = nbh.sample_neighbors(DARTS_SPACE, DARTS_CODES, 3, 2000, np.random.default_rng(0))
  assert sample.shape == (2000, 2, 14) and len(_rows(sample)) == 2000
  assert ((sample != 0) == (DARTS_CODES != 0)).all()
  distances = (sample != DARTS_CODES).sum(axis=(1, 2))
  assert distances.min() >= 1 and distances.max() <= 3
  # Uniform over the set: P(d = 2) = C(16,2) 6^2 / 125376 = 0.0344, ~69 of 2000, sd ~8.
  assert 35 < (distances == 2).sum() < 105


def test_sample_small_neighborhood_exhausts_it_and_refuses_more():
  rng = np.random.default_rng(1)
  sample = nbh.sample_neighbors(NB201_SPACE, NB201_CODES, 2, 264, rng, include_center=True)
  np.testing.assert_array_equal(sample[0], NB201_CODES)
  assert _rows(sample[1:]) == _rows(nbh.enumerate_neighbors(NB201_SPACE, NB201_CODES, 2))
  with pytest.raises(ValueError, match=r'k=265 neighbors but only 264 exist at distance 1\.\.2'):
    nbh.sample_neighbors(NB201_SPACE, NB201_CODES, 2, 265, rng)
  assert nbh.sample_neighbors(NB201_SPACE, NB201_CODES, 1, 0, rng).shape == (0, 1, 6)


def test_one_by_one_sampler_is_uniform(monkeypatch):
  monkeypatch.setattr(nbh, '_ENUMERATE_LIMIT', 0)
  rng = np.random.default_rng(2)
  neighbors = nbh.enumerate_neighbors(NB201_SPACE, NB201_CODES, 2)
  index = {row.tobytes(): i for i, row in enumerate(neighbors)}
  draws = 6000
  counts = np.zeros(len(neighbors))
  for _ in range(draws):
    counts[index[nbh.sample_neighbors(NB201_SPACE, NB201_CODES, 2, 1, rng)[0].tobytes()]] += 1
  expected = draws / len(neighbors)
  chi2 = ((counts - expected) ** 2 / expected).sum()
  # Chi-square with 263 degrees of freedom: mean 263, sd ~23.
  assert chi2 < 263 + 5 * 23, chi2
  assert (counts > 0).all()


def test_bad_arguments():
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match='radius must be an integer >= 1'):
    nbh.enumerate_neighbors(NB201_SPACE, NB201_CODES, 0)
  with pytest.raises(ValueError, match='k must be an integer >= 0'):
    nbh.sample_neighbors(NB201_SPACE, NB201_CODES, 1, -1, rng)
  with pytest.raises(ValueError, match='op id 9'):
    nbh.enumerate_neighbors(NB201_SPACE, np.full((1, 6), 9), 1)
  invalid = DARTS_CODES.copy()
  invalid[0, 4] = 5  # A third input for node 1.
  with pytest.raises(ValueError, match='normal node 1 has 3 non-none incoming edges'):
    nbh.sample_neighbors(DARTS_SPACE, invalid, 1, 1, rng)


def _one_hot_alpha(space, codes):
  """Logits whose softmax is exactly the one-hot encoding of ``codes``."""
  one_hot = np.arange(space.num_ops) == np.asarray(codes)[..., None]
  return jnp.asarray(np.where(one_hot, 0.0, -np.inf), jnp.float32)


def _normal(seed, shape, dtype=np.float32):
  # numpy, not jax.random: every jax.random call compiles a kernel, seconds on a CPU.
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


SPACES = {'darts': (DARTS_SPACE, DARTS_CODES), 'nb201': (NB201_SPACE, NB201_CODES)}
# One sample size for every swap test below, so they share one compiled sampler per
# (space, radius): on a CPU the compile, not the sampling, is what costs time.
NUM_SWAPS = 2400


@pytest.mark.parametrize('space_name', ['darts', 'nb201'])
@pytest.mark.parametrize('radius', [1, 2])
def test_swap_of_a_one_hot_arch_is_a_neighbor_at_exactly_radius(space_name, radius):
  space, codes = SPACES[space_name]
  weights = nbh.sample_perturbed_weights(
      space, jax.random.key(radius), _one_hot_alpha(space, codes), NUM_SWAPS, 'swap', radius)
  weights = np.asarray(weights)
  assert set(np.unique(weights)) == {0.0, 1.0}
  np.testing.assert_array_equal(weights.sum(-1), 1.0)
  neighbor_codes = weights.argmax(-1).astype(np.int32)
  assert {nbh.distance(n, codes) for n in neighbor_codes} == {radius}
  neighborhood = nbh.enumerate_neighbors(space, codes, radius)
  assert _rows(neighbor_codes) <= _rows(neighborhood)
  for n in neighbor_codes[:20]:
    one_hot = n[..., None] == np.arange(space.num_ops)
    np.testing.assert_array_equal(space.encode(space.derive(one_hot)), n)
  if radius == 1:
    # Uniform over the radius-1 neighborhood: 2400 draws over 24 (NB201) or 96 (DARTS).
    index = {row.tobytes(): i for i, row in enumerate(neighborhood)}
    counts = np.bincount([index[n.tobytes()] for n in neighbor_codes], minlength=len(index))
    expected = NUM_SWAPS / len(index)
    chi2 = ((counts - expected) ** 2 / expected).sum()
    dof = len(index) - 1
    assert chi2 < dof + 5 * math.sqrt(2 * dof), (chi2, counts)


@pytest.mark.parametrize('space_name', ['darts', 'nb201'])
def test_swap_permutes_exactly_radius_kept_edges(space_name):
  space, _ = SPACES[space_name]
  alpha = _normal(0, space.alpha_shape)
  centre = np.asarray(jax.nn.softmax(alpha))
  kept = np.asarray(nbh.kept_edges(space, centre))
  weights = np.asarray(
      nbh.sample_perturbed_weights(space, jax.random.key(1), alpha, NUM_SWAPS, 'swap', 2))
  np.testing.assert_array_equal(np.sort(weights, -1),
                                np.broadcast_to(np.sort(centre, -1), weights.shape))
  changed = np.abs(weights - centre).max(-1) > 0
  assert (changed.sum(axis=(1, 2)) == 2).all()
  assert (changed <= kept).all()
  # Uniform over the kept edges: each kept edge is picked with probability 2 / kept.
  frequency = changed.mean(0)[kept]
  np.testing.assert_allclose(frequency, 2 / kept.sum(), atol=0.04)
  # The edge's strongest swappable op is the one moved.
  strongest = np.argmax(np.where(space.swap_ops, centre, -np.inf), -1)
  for k, t, e in np.argwhere(changed)[:200]:
    assert weights[k, t, e, strongest[t, e]] < centre[t, e, strongest[t, e]]


def _finite_difference_check(loss, alpha, step=1e-6):
  # One compiled function for both the values and the gradient.
  value_and_grad = jax.jit(jax.value_and_grad(loss))
  grad = np.asarray(value_and_grad(alpha)[1])
  basis = np.eye(alpha.size).reshape((-1,) + alpha.shape)
  finite = np.array([(value_and_grad(alpha + step * b)[0] - value_and_grad(alpha - step * b)[0])
                     / (2 * step) for b in basis]).reshape(alpha.shape)
  np.testing.assert_allclose(grad, finite, rtol=1e-6, atol=1e-9)
  return grad


def test_gradient_through_swap_matches_finite_differences():
  with jax.enable_x64(True):
    alpha = _normal(3, DARTS_SPACE.alpha_shape, jnp.float64)
    probe = _normal(4, DARTS_SPACE.alpha_shape, jnp.float64)
    key = jax.random.key(5)
    grad = _finite_difference_check(lambda a: jnp.sum(jnp.sin(
        nbh.perturb_weights(DARTS_SPACE, key, a, 'swap', radius=2) * probe)), alpha)
    # Unperturbed, by hand: dL/dp = probe cos(p probe), dL/da = p (dL/dp - <p, dL/dp>).
    p = np.exp(alpha) / np.exp(alpha).sum(-1, keepdims=True)
    dp = np.asarray(probe) * np.cos(p * probe)
    plain = p * (dp - (p * dp).sum(-1, keepdims=True))
    differs = np.abs(grad - plain).max(-1) > 1e-8
    # The swap changes the gradient of exactly the two perturbed edges.
    assert differs.sum() == 2


def test_gradient_through_mix_and_logit_noise_matches_finite_differences():
  with jax.enable_x64(True):
    alpha = _normal(6, NB201_SPACE.alpha_shape, jnp.float64)
    probe = _normal(7, NB201_SPACE.alpha_shape, jnp.float64)
    key = jax.random.key(8)
    _finite_difference_check(lambda a: jnp.sum(jnp.sin(
        nbh.perturb_weights(NB201_SPACE, key, a, 'mix', radius=2, eps=0.3) * probe
        + nbh.perturb_weights(NB201_SPACE, key, a, 'logit_noise', sigma=0.5) ** 2)), alpha)


def test_kept_edges_agrees_with_derive():
  rng = np.random.default_rng(0)
  batch = np.concatenate([
      rng.dirichlet(np.ones(8), size=(100, 2, 14)),
      rng.integers(0, 3, size=(100, 2, 14, 8)) / 3.0,  # Ties between edges.
  ]).astype(np.float32)
  kept = np.asarray(jax.jit(jax.vmap(functools.partial(nbh.kept_edges, DARTS_SPACE)))(batch))
  for w, k in zip(batch, kept):
    np.testing.assert_array_equal(k, DARTS_SPACE.encode(DARTS_SPACE.derive(w)) != 0)
  assert (kept.sum(-1) == 8).all()
  assert np.asarray(nbh.kept_edges(NB201_SPACE, np.zeros((1, 6, 5)))).all()


def test_identity_mix_and_logit_noise():
  alpha = _one_hot_alpha(DARTS_SPACE, DARTS_CODES)
  centre = np.asarray(jax.nn.softmax(alpha))
  key = jax.random.key(0)
  np.testing.assert_array_equal(nbh.perturb_weights(DARTS_SPACE, key, alpha, 'identity'), centre)
  mixed = np.asarray(nbh.perturb_weights(DARTS_SPACE, key, alpha, 'mix', radius=2, eps=0.25))
  changed = np.abs(mixed - centre).max(-1) > 0
  assert changed.sum() <= 2 and (changed <= (DARTS_CODES != 0)).all()
  for t, e in np.argwhere(changed):
    moved = mixed[t, e] - 0.75 * centre[t, e]
    assert sorted(np.round(moved, 6)) == [0.0] * 7 + [0.25] and moved[0] == 0
  np.testing.assert_allclose(mixed.sum(-1), 1.0, rtol=1e-6)
  soft = _normal(1, DARTS_SPACE.alpha_shape)
  noisy = np.asarray(nbh.perturb_weights(DARTS_SPACE, key, soft, 'logit_noise', sigma=0.5))
  np.testing.assert_allclose(noisy.sum(-1), 1.0, rtol=1e-6)
  assert np.abs(noisy - np.asarray(jax.nn.softmax(soft))).min() > 0
  np.testing.assert_allclose(nbh.perturb_weights(DARTS_SPACE, key, soft, 'logit_noise', sigma=0.0),
                             jax.nn.softmax(soft), rtol=1e-6)


@pytest.mark.parametrize('space, codes', [(DARTS_SPACE, DARTS_CODES), (NB201_SPACE, None)])
def test_mix_never_moves_weight_to_the_current_op(space, codes):
  """Each chosen edge gains ``eps`` on another swappable op than its strongest, for every
  draw (before the fix about 1 draw in 7 picked the current op: no move at all)."""
  if codes is None:
    codes = space.encode(space.random(np.random.default_rng(0)))
  alpha = 3.0 * _one_hot_alpha(space, codes)
  centre = np.asarray(jax.nn.softmax(alpha))
  current = np.where(space.swap_ops, centre, -np.inf).argmax(-1)
  mixed = np.asarray(nbh.sample_perturbed_weights(space, jax.random.key(7), alpha, num=200,
                                                  kind='mix', radius=1, eps=0.5))
  for weights in mixed:
    (t, e), = np.argwhere(np.abs(weights - centre).max(-1) > 1e-7)
    gained = np.flatnonzero(weights[t, e] - 0.5 * centre[t, e] > 0.25)
    assert len(gained) == 1 and gained[0] != current[t, e]
    assert space.swap_ops[gained[0]]


def test_sample_perturbed_weights_puts_the_centre_first():
  alpha = _normal(2, NB201_SPACE.alpha_shape)
  weights = nbh.sample_perturbed_weights(NB201_SPACE, jax.random.key(3), alpha, num=4,
                                         kind='swap', radius=1, include_center=True)
  assert weights.shape == (5, 1, 6, 5)
  np.testing.assert_allclose(weights[0], jax.nn.softmax(alpha), rtol=1e-6)
  changed_edges = (np.abs(np.asarray(weights[1:] - weights[0])).max(-1) > 0).sum(-1)
  assert changed_edges.tolist() == [[1]] * 4


def test_perturbation_errors():
  alpha = jnp.zeros(DARTS_SPACE.alpha_shape)
  key = jax.random.key(0)
  with pytest.raises(ValueError, match=(r"unknown perturbation 'flip'; "
                                        r"valid: \('swap', 'mix', 'logit_noise', 'identity'\)")):
    nbh.perturb_weights(DARTS_SPACE, key, alpha, 'flip')
  with pytest.raises(ValueError, match="radius = 17 is invalid: a darts architecture's neighbors are at most 16"):
    nbh.perturb_weights(DARTS_SPACE, key, jnp.zeros((1, 14, 8)).repeat(2, 0), 'swap', 17)
  with pytest.raises(ValueError, match="radius = 7 is invalid: a nb201 architecture's neighbors are at most 6"):
    nbh.perturb_weights(NB201_SPACE, key, jnp.zeros(NB201_SPACE.alpha_shape), 'swap', 7)
  with pytest.raises(ValueError, match=r'shape \(14, 8\); expected \(2, 14, 8\)'):
    nbh.perturb_weights(DARTS_SPACE, key, alpha[0])
  with pytest.raises(ValueError, match='num .* >= 1'):
    nbh.sample_perturbed_weights(DARTS_SPACE, key, alpha, 0)
  assert nbh.PERTURBATIONS == ('swap', 'mix', 'logit_noise', 'identity')


def test_aggregate_values():
  losses = jnp.array([1.0, 2.0, 3.0, 6.0])
  assert float(nbh.aggregate(losses)) == 3.0
  assert float(nbh.aggregate(losses, 'max')) == 6.0
  # tau * (logsumexp(l / tau) - log K) for l = (0, ln 3), tau = 1: ln((1 + 3) / 2) = ln 2.
  np.testing.assert_allclose(nbh.aggregate(jnp.array([0.0, math.log(3.0)]), 'softmax_tau', 1.0),
                             math.log(2.0), rtol=1e-6)


def test_softmax_tau_between_mean_and_max_with_the_right_limits():
  losses = jnp.asarray(np.random.default_rng(0).uniform(0, 3, 8), jnp.float32)
  mean, top = float(jnp.mean(losses)), float(jnp.max(losses))
  taus = (0.01, 0.1, 1.0, 10.0, 1000.0)
  values = [float(nbh.aggregate(losses, 'softmax_tau', tau)) for tau in taus]
  assert all(mean - 1e-6 <= v <= top + 1e-6 for v in values)
  assert values == sorted(values, reverse=True)  # Decreasing in tau.
  # As tau -> 0 the gap to the max is at most tau log K; as tau -> inf it reaches the mean.
  assert top - values[0] <= 0.01 * math.log(8) + 1e-6
  np.testing.assert_allclose(values[-1], mean, atol=1e-3)


def test_aggregate_errors():
  with pytest.raises(ValueError,
                     match=r"unknown aggregation 'median'; valid: \('mean', 'max', 'softmax_tau'\)"):
    nbh.aggregate(jnp.ones(3), 'median')
  with pytest.raises(ValueError, match='tau > 0'):
    nbh.aggregate(jnp.ones(3), 'softmax_tau', 0.0)
  with pytest.raises(ValueError, match='non-empty vector'):
    nbh.aggregate(jnp.ones((2, 2)))
  assert nbh.AGGREGATIONS == ('mean', 'max', 'softmax_tau')


@pytest.mark.parametrize('radius', [1, 2, 3])
def test_exact_distance_neighborhoods_are_the_distance_shells(radius):
  space = nb201.NB201_SPACE
  codes = space.encode(space.random(np.random.default_rng(radius)))
  everything = nbh.enumerate_neighbors(space, codes, radius)
  shell = np.array([c for c in everything if nbh.distance(c, codes) == radius])
  exact = nbh.enumerate_neighbors(space, codes, radius, exact=True)
  np.testing.assert_array_equal(exact, shell)
  assert nbh.neighborhood_size(space, codes, radius, exact=True) == len(shell) == math.comb(6, radius) * 4**radius
  sampled = nbh.sample_neighbors(space, codes, radius, 10, np.random.default_rng(0), exact=True)
  assert len({s.tobytes() for s in sampled}) == 10
  assert all(nbh.distance(s, codes) == radius for s in sampled)
