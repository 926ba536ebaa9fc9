"""The architecture objective of DARTS and NA-DARTS, as pure functions.

NA-DARTS minimises over alpha

    L_NA(w, alpha) = AGG_{k=1..K} L_val(w, T_k(softmax(alpha)), batch_k)

with K perturbations T_k sampled afresh from a key (`neighborhood.sample_perturbed_weights`:
``swap`` by default, see DESIGN.md), aggregated by ``mean``, ``max`` or ``softmax_tau``.
DARTS is the case K = 1, T = identity, AGG = mean: `Neighborhood.from_config` says so for
``algorithm='darts'`` and nothing below has a branch of its own for it.

- `objective` is the whole objective as one function of the parameters and alpha: what the
  exact second order differentiates through the virtual step, and the oracle of the tests.
- `chain_to_alpha` takes the K neighbors' losses and gradients, however they were computed,
  and returns the objective's value and its gradients: the aggregate's VJP weights each
  neighbor, and the gradient reaches alpha through the perturbation and the softmax.

How the K evaluations are compiled and batched (one shared compiled gradient called K
times, or one ``vmap``) is the execution strategy of `nanas_jax.search.bilevel`; it cannot
change what is computed here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from nanas_jax import neighborhood
from nanas_jax.spaces import SearchSpace

NEIGHBOR_BATCHES = ("full", "split")


@dataclasses.dataclass(frozen=True)
class Neighborhood:
  """The neighbors an architecture step evaluates and how their losses are aggregated.

  The defaults are DARTS: one neighbor, the identity perturbation, the mean.
  ``batch='split'`` gives neighbor k its own 1/K slice of the validation batch."""
  num: int = 1
  kind: str = "identity"
  radius: int = 1
  include_center: bool = False
  eps: float = neighborhood.DEFAULT_EPS
  sigma: float = neighborhood.DEFAULT_SIGMA
  aggregation: str = "mean"
  tau: float = neighborhood.DEFAULT_TAU
  batch: str = "full"

  @classmethod
  def from_config(cls, search: ml_collections.ConfigDict) -> Neighborhood:
    """DARTS's neighborhood for ``algorithm='darts'``, else ``search.neighbors``'."""
    if search.algorithm == "darts":
      return cls()
    nb = search.neighbors
    return cls(num=nb.num, kind=nb.kind, radius=nb.radius,
               include_center=nb.include_center, eps=nb.eps, sigma=nb.sigma,
               aggregation=nb.aggregation, tau=nb.tau, batch=nb.batch)

  @property
  def size(self) -> int:
    """How many architectures the objective evaluates."""
    return self.num + int(self.include_center)


def architecture_weights(space: SearchSpace, nbh: Neighborhood, alpha: jax.Array,
                         key: jax.Array) -> jax.Array:
  """The K architectures the objective evaluates: weights ``[K, T, E, O]``."""
  return neighborhood.sample_perturbed_weights(
      space, key, alpha, nbh.num, nbh.kind, nbh.radius, nbh.include_center, nbh.eps,
      nbh.sigma)


def neighbor_batches(nbh: Neighborhood, images, labels) -> list[tuple[Any, Any]]:
  """Each neighbor's validation batch: all the same, or 1/K slices (``'split'``)."""
  k = nbh.size
  if nbh.batch == "split":
    per = images.shape[0] // k
    return [(images[i * per:(i + 1) * per], labels[i * per:(i + 1) * per])
            for i in range(k)]
  return [(images, labels)] * k


def aggregate(nbh: Neighborhood, losses: jax.Array) -> jax.Array:
  """AGG over the neighbors' losses ``[K]``."""
  return neighborhood.aggregate(losses, nbh.aggregation, nbh.tau)


def objective(loss_fn: Callable[..., tuple[jax.Array, jax.Array]], space: SearchSpace,
              nbh: Neighborhood, params: Any, alpha: jax.Array, key: jax.Array, images,
              labels) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  """``(AGG_k L_k, (losses [K], accuracies [K]))``, differentiable in ``params`` and
  ``alpha``; ``loss_fn(params, weights, images, labels) -> (loss, accuracy)``."""
  weights = architecture_weights(space, nbh, alpha, key)
  results = [loss_fn(params, w, x, y)
             for w, (x, y) in zip(weights, neighbor_batches(nbh, images, labels))]
  losses = jnp.stack([loss for loss, _ in results])
  accuracies = jnp.stack([acc for _, acc in results])
  return aggregate(nbh, losses), (losses, accuracies)


def chain_to_alpha(space: SearchSpace, nbh: Neighborhood, alpha: jax.Array, key: jax.Array,
                   losses: jax.Array, grad_params: Any | None, grad_weights: jax.Array):
  """`objective`'s value and gradients from the neighbors' own: ``(loss, d/d params,
  d/d alpha)``, given each neighbor's loss ``[K]``, parameter gradient (a tree whose
  leaves have a leading neighbor axis ``K``, or None when not needed: then ``d/d params``
  is None) and gradient with respect to its architecture weights ``[K, T, E, O]``."""
  loss, dloss = jax.value_and_grad(lambda l: aggregate(nbh, l))(losses)
  if grad_params is not None:
    grad_params = jax.tree.map(lambda g: jnp.tensordot(dloss, g, axes=1), grad_params)
  _, weights_vjp = jax.vjp(lambda a: architecture_weights(space, nbh, a, key), alpha)
  (grad_alpha,) = weights_vjp(dloss[:, None, None, None] * grad_weights)
  return loss, grad_params, grad_alpha
