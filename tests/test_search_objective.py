"""Tests of nanas_jax.search.objective: the NA-DARTS / DARTS architecture objective.

Oracles: the objective written out by hand for DARTS (one identity neighbor) and NA-DARTS
(the sampled perturbations in a Python loop), and ``jax.grad`` of `objective` itself for
`chain_to_alpha`, which assembles the same gradient from per-neighbor gradients.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import quickstart
from nanas_jax import neighborhood, spaces
from nanas_jax.search import objective
from nanas_jax.search.objective import Neighborhood

SPACE = spaces.get_space("nb201")


def loss_fn(params, weights, x, y):
  """A smooth toy 'supernet': logits = x @ sum_teo w[t,e,o] P[t,e,o]."""
  logits = x @ jnp.einsum("teo,teoij->ij", weights, params)
  loss = -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(y)), y])
  return loss, jnp.mean(jnp.argmax(logits, -1) == y)


def setup(seed=0):
  rng = np.random.default_rng(seed)
  params = jnp.asarray(rng.normal(size=SPACE.alpha_shape + (4, 3)), jnp.float32)
  alpha = jnp.asarray(rng.normal(size=SPACE.alpha_shape), jnp.float32)
  x = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, 8))
  return params, alpha, x, y


def test_neighborhood_from_config_makes_darts_the_one_neighbor_identity_case():
  config = quickstart.get_config().search
  config.algorithm = "darts"
  assert Neighborhood.from_config(config) == Neighborhood(
      num=1, kind="identity", aggregation="mean", batch="full")
  assert Neighborhood.from_config(config).size == 1
  config.algorithm = "na_darts"
  config.neighbors.include_center = True
  nbh = Neighborhood.from_config(config)
  assert (nbh.num, nbh.kind, nbh.aggregation, nbh.size) == (4, "swap", "mean", 5)


def test_darts_objective_is_the_loss_at_softmax_alpha():
  params, alpha, x, y = setup()
  value, (losses, accs) = objective.objective(loss_fn, SPACE, Neighborhood(), params, alpha,
                                              jax.random.key(0), x, y)
  direct, acc = loss_fn(params, jax.nn.softmax(alpha, -1), x, y)
  assert value == direct and losses.tolist() == [direct] and accs.tolist() == [acc]


@pytest.mark.parametrize("aggregation,batch", [
    ("mean", "full"), ("max", "full"), ("softmax_tau", "full"), ("mean", "split")])
def test_na_objective_is_the_aggregate_over_the_sampled_neighbors(aggregation, batch):
  params, alpha, x, y = setup(1)
  nbh = Neighborhood(num=4, kind="swap", aggregation=aggregation, tau=0.5, batch=batch)
  key = jax.random.key(3)
  value, (losses, _) = objective.objective(loss_fn, SPACE, nbh, params, alpha, key, x, y)
  weights = neighborhood.sample_perturbed_weights(SPACE, key, alpha, 4, "swap", 1)
  slices = [(x[2 * k:2 * k + 2], y[2 * k:2 * k + 2]) if batch == "split" else (x, y)
            for k in range(4)]
  expected = np.array([float(loss_fn(params, w, *b)[0]) for w, b in zip(weights, slices)])
  np.testing.assert_allclose(losses, expected, rtol=1e-6)
  want = {"mean": expected.mean(), "max": expected.max(),
          "softmax_tau": 0.5 * (np.log(np.exp(expected / 0.5).sum()) - np.log(4))}
  np.testing.assert_allclose(value, want[aggregation], rtol=1e-6)


@pytest.mark.parametrize("nbh", [
    Neighborhood(),
    Neighborhood(num=3, kind="swap", aggregation="max"),
    Neighborhood(num=2, kind="mix", include_center=True, aggregation="softmax_tau", tau=0.3),
    Neighborhood(num=4, kind="swap", radius=2, batch="split"),
])
def test_chain_to_alpha_equals_the_gradient_of_the_objective(nbh):
  params, alpha, x, y = setup(2)
  key = jax.random.key(7)
  (value, _), (grad_params, grad_alpha) = jax.value_and_grad(
      lambda p, a: objective.objective(loss_fn, SPACE, nbh, p, a, key, x, y),
      argnums=(0, 1), has_aux=True)(params, alpha)
  # The per-neighbor route: each neighbor's own gradients, then the chain.
  weights = objective.architecture_weights(SPACE, nbh, alpha, key)
  per = [jax.value_and_grad(lambda p, w, b=b: loss_fn(p, w, *b)[0], argnums=(0, 1))(
      params, w) for w, b in zip(weights, objective.neighbor_batches(nbh, x, y))]
  loss, got_params, got_alpha = objective.chain_to_alpha(
      SPACE, nbh, alpha, key, jnp.stack([v for v, _ in per]),
      jnp.stack([g[0] for _, g in per]), jnp.stack([g[1] for _, g in per]))
  np.testing.assert_allclose(loss, value, rtol=1e-6)
  np.testing.assert_allclose(got_params, grad_params, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(got_alpha, grad_alpha, rtol=1e-5, atol=1e-7)
  assert float(jnp.abs(got_alpha).max()) > 0
  # Without parameter gradients (the first order): the same alpha gradient.
  _, none, alpha_only = objective.chain_to_alpha(
      SPACE, nbh, alpha, key, jnp.stack([v for v, _ in per]), None,
      jnp.stack([g[1] for _, g in per]))
  assert none is None and np.array_equal(alpha_only, got_alpha)


def test_neighbor_batches_split_into_equal_slices():
  x, y = np.arange(10), np.arange(10) * 2
  full = objective.neighbor_batches(Neighborhood(num=2, kind="swap"), x, y)
  assert len(full) == 2 and all(b[0] is x for b in full)
  split = objective.neighbor_batches(
      Neighborhood(num=2, kind="swap", include_center=True, batch="split"), x, y)
  assert [b[0].tolist() for b in split] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
  assert split[1][1].tolist() == [6, 8, 10]
