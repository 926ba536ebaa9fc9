"""One jitted bilevel step of DARTS / NA-DARTS on a `SearchState`.

Order of a step, as in the reference ``train_search.py``: first the architecture step on a
validation batch (moving alpha), then the weight step on a training batch with the new
architecture weights.

Architecture objective:
- DARTS: ``L_val(w, softmax(alpha))``.
- NA-DARTS: ``AGG_k L_val(w, T_k(softmax(alpha)))`` over K perturbations sampled afresh
  every step (`neighborhood.sample_perturbed_weights`), evaluated with ``jax.vmap`` over
  the K weight tensors: same parameters, and either the same validation batch for every
  neighbor (``batch='full'``) or a 1/K slice of it each (``batch='split'``).

Orders of the architecture gradient:
- ``first``: the gradient of the objective at the current weights.
- ``second_fd``: DARTS's unrolled approximation. Virtual step ``w' = w - xi (mu m + g + wd
  w)`` (the real SGD step without clipping, xi = current weight learning rate), then
  ``grad_alpha L(w', alpha) - xi * [grad_alpha L_train(w+) - grad_alpha L_train(w-)] / 2r``
  with ``w+- = w +- r v``, ``v = grad_w' L(w', alpha)``, ``r = 0.01 / ||v||``.
- ``second_exact``: ``jax.grad`` of ``L(w'(alpha), alpha)`` through the virtual step: the
  quantity the finite difference approximates (a test checks they agree).

BatchNorm statistics are updated by the weight step only; the architecture step and the
virtual step run in training mode (batch statistics) and discard their updates.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from nanas_jax import neighborhood
from nanas_jax.search.state import (SearchState, arch_optimizer, init_alpha,
                                    momentum_buffer, weight_lr_schedule, weight_optimizer)
from nanas_jax.spaces import SearchSpace

ORDERS = ("first", "second_fd", "second_exact")
ALGORITHMS = ("darts", "na_darts")
NEIGHBOR_BATCHES = ("full", "split")


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy with integer labels."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.mean(jnp.argmax(logits, axis=-1) == labels)


class BilevelSearch:
  """Builds the state and the jitted step of a DARTS / NA-DARTS search.

  ``model`` is a supernet whose ``__call__(images, weights, train)`` takes architecture
  weights of shape ``space.alpha_shape``. ``config`` is the ``search`` block of an
  experiment config (see ``configs/quickstart.py``).
  """

  def __init__(self, model, space: SearchSpace, config: ml_collections.ConfigDict,
               steps_per_epoch: int):
    validate_search_config(config)
    self.model = model
    self.space = space
    self.config = config
    self.steps_per_epoch = steps_per_epoch
    self.weight_tx = weight_optimizer(config.weights, config.epochs, steps_per_epoch)
    self.arch_tx = arch_optimizer(config.arch)
    self.lr_schedule = weight_lr_schedule(config.weights, config.epochs, steps_per_epoch)

  # ----------------------------------------------------------------------------- state
  def init(self, rng: jax.Array, sample_images: jax.Array) -> SearchState:
    """A fresh state; ``sample_images`` only fixes the input shape (one image is enough)."""
    param_rng, alpha_rng, state_rng = jax.random.split(rng, 3)
    alpha = init_alpha(alpha_rng, self.space.alpha_shape, self.config.arch.init_scale)
    variables = self.model.init(param_rng, sample_images[:1], jax.nn.softmax(alpha, -1),
                                train=True)
    params = variables["params"]
    return SearchState(
        step=jnp.zeros((), jnp.int32), params=params,
        batch_stats=variables.get("batch_stats", {}), alpha=alpha,
        weight_opt_state=self.weight_tx.init(params),
        arch_opt_state=self.arch_tx.init(alpha), rng=state_rng)

  # ---------------------------------------------------------------------------- losses
  def _logits(self, params, batch_stats, images, weights):
    logits, _ = self.model.apply({"params": params, "batch_stats": batch_stats}, images,
                                 weights, train=True, mutable=["batch_stats"])
    return logits

  def train_loss(self, params, batch_stats, weights, images, labels):
    """Training loss at architecture weights ``weights`` (and the BN statistics update)."""
    logits, updates = self.model.apply(
        {"params": params, "batch_stats": batch_stats}, images, weights, train=True,
        mutable=["batch_stats"])
    return cross_entropy(logits, labels), (logits, updates["batch_stats"])

  def arch_objective(self, params, batch_stats, alpha, images, labels, key):
    """The architecture objective and per-neighbor losses (DARTS: one 'neighbor')."""
    nb = self.config.neighbors
    if self.config.algorithm == "darts":
      logits = self._logits(params, batch_stats, images, jax.nn.softmax(alpha, -1))
      loss = cross_entropy(logits, labels)
      return loss, (loss[None], accuracy(logits, labels)[None])
    weights = neighborhood.sample_perturbed_weights(
        self.space, key, alpha, nb.num, nb.kind, nb.radius, nb.include_center, nb.eps,
        nb.sigma)
    k = weights.shape[0]
    if nb.batch == "split":
      per = images.shape[0] // k
      images = images[:per * k].reshape((k, per) + images.shape[1:])
      labels = labels[:per * k].reshape(k, per)
      in_axes = (0, 0, 0)
    else:
      in_axes = (0, None, None)

    def one(w, x, y):
      logits = self._logits(params, batch_stats, x, w)
      return cross_entropy(logits, y), accuracy(logits, y)

    losses, accs = jax.vmap(one, in_axes=in_axes)(weights, images, labels)
    return neighborhood.aggregate(losses, nb.aggregation, nb.tau), (losses, accs)

  # ------------------------------------------------------------------- arch gradients
  def arch_gradient(self, state: SearchState, train_batch, val_batch, key):
    """The architecture gradient of the configured order, and metrics."""
    val_x, val_y = val_batch
    objective = functools.partial(self.arch_objective, images=val_x, labels=val_y, key=key)
    order = self.config.order
    if order == "first":
      (loss, aux), grad = jax.value_and_grad(
          lambda a: objective(state.params, state.batch_stats, a), has_aux=True)(
              state.alpha)
      return grad, loss, aux

    train_x, train_y = train_batch
    xi = self.lr_schedule(state.step)
    wcfg = self.config.weights
    momentum = jax.tree.map(lambda m: wcfg.momentum * m,
                            momentum_buffer(state.weight_opt_state))

    def virtual_step(alpha):
      grads = jax.grad(lambda p: self.train_loss(
          p, state.batch_stats, jax.nn.softmax(alpha, -1), train_x, train_y)[0])(
              state.params)
      return jax.tree.map(lambda w, g, m: w - xi * (m + g + wcfg.weight_decay * w),
                          state.params, grads, momentum)

    if order == "second_exact":
      (loss, aux), grad = jax.value_and_grad(
          lambda a: objective(virtual_step(a), state.batch_stats, a), has_aux=True)(
              state.alpha)
      return grad, loss, aux

    unrolled = virtual_step(state.alpha)
    (loss, aux), (grad_w, grad_alpha) = jax.value_and_grad(
        lambda p, a: objective(p, state.batch_stats, a), argnums=(0, 1), has_aux=True)(
            unrolled, state.alpha)
    r = 0.01 / optax.global_norm(grad_w)

    def train_alpha_grad(params):
      return jax.grad(lambda a: self.train_loss(
          params, state.batch_stats, jax.nn.softmax(a, -1), train_x, train_y)[0])(
              state.alpha)

    plus = train_alpha_grad(jax.tree.map(lambda w, v: w + r * v, state.params, grad_w))
    minus = train_alpha_grad(jax.tree.map(lambda w, v: w - r * v, state.params, grad_w))
    return grad_alpha - xi * (plus - minus) / (2 * r), loss, aux

  # -------------------------------------------------------------------------- the step
  def step(self, state: SearchState, train_batch, val_batch):
    """One architecture step then one weight step. Pure; jit it (see ``jit_step``)."""
    rng, key = jax.random.split(state.rng)
    grad_alpha, arch_loss, (neighbor_losses, neighbor_accs) = self.arch_gradient(
        state, train_batch, val_batch, key)
    updates, arch_opt_state = self.arch_tx.update(grad_alpha, state.arch_opt_state,
                                                  state.alpha)
    alpha = optax.apply_updates(state.alpha, updates)

    train_x, train_y = train_batch
    (train_loss, (logits, batch_stats)), grads = jax.value_and_grad(
        self.train_loss, has_aux=True)(state.params, state.batch_stats,
                                       jax.nn.softmax(alpha, -1), train_x, train_y)
    updates, weight_opt_state = self.weight_tx.update(grads, state.weight_opt_state,
                                                      state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "train_loss": train_loss,
        "train_accuracy": accuracy(logits, train_y),
        "arch_loss": arch_loss,
        "neighbor_loss_mean": neighbor_losses.mean(),
        "neighbor_loss_std": neighbor_losses.std(),
        "neighbor_loss_max": neighbor_losses.max(),
        "neighbor_accuracy": neighbor_accs.mean(),
        "learning_rate": self.lr_schedule(state.step),
        "alpha_grad_norm": optax.global_norm(grad_alpha),
        "weight_grad_norm": optax.global_norm(grads),
    }
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              alpha=alpha, weight_opt_state=weight_opt_state,
                              arch_opt_state=arch_opt_state, rng=rng)
    return new_state, metrics

  def jit_step(self) -> Callable[..., tuple[SearchState, dict[str, jax.Array]]]:
    """The step under ``jax.jit`` with the state donated."""
    return jax.jit(self.step, donate_argnums=0)

  def eval_fn(self) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """Jitted ``(state, images, labels) -> (loss sum, correct count)`` of the supernet at
    ``softmax(alpha)`` in evaluation mode (running BatchNorm statistics)."""

    def evaluate(state: SearchState, images, labels):
      logits = self.model.apply({"params": state.params, "batch_stats": state.batch_stats},
                                images, jax.nn.softmax(state.alpha, -1), train=False)
      losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
      return losses.sum(), jnp.sum(jnp.argmax(logits, -1) == labels)

    return jax.jit(evaluate)


def validate_search_config(config: ml_collections.ConfigDict) -> None:
  """Fails fast, naming the field, on values the step cannot run with."""

  def check(ok: bool, field: str, value: Any, expected: str):
    if not ok:
      raise ValueError(f"config.search.{field} = {value!r} is invalid: expected {expected}.")

  check(config.algorithm in ALGORITHMS, "algorithm", config.algorithm, f"one of {ALGORITHMS}")
  check(config.order in ORDERS, "order", config.order, f"one of {ORDERS}")
  nb = config.neighbors
  if config.algorithm == "na_darts":
    check(isinstance(nb.num, int) and nb.num >= 1, "neighbors.num", nb.num, "an integer >= 1")
    check(nb.kind in neighborhood.PERTURBATIONS, "neighbors.kind", nb.kind,
          f"one of {neighborhood.PERTURBATIONS}")
    check(isinstance(nb.radius, int) and nb.radius >= 1, "neighbors.radius", nb.radius,
          "an integer >= 1")
    check(nb.aggregation in neighborhood.AGGREGATIONS, "neighbors.aggregation",
          nb.aggregation, f"one of {neighborhood.AGGREGATIONS}")
    check(nb.tau > 0, "neighbors.tau", nb.tau, "> 0")
    check(nb.batch in NEIGHBOR_BATCHES, "neighbors.batch", nb.batch,
          f"one of {NEIGHBOR_BATCHES}")
  w, a = config.weights, config.arch
  check(w.lr > 0, "weights.lr", w.lr, "> 0")
  check(0 <= w.lr_min <= w.lr, "weights.lr_min", w.lr_min, "in [0, weights.lr]")
  check(0 <= w.momentum < 1, "weights.momentum", w.momentum, "in [0, 1)")
  check(w.weight_decay >= 0, "weights.weight_decay", w.weight_decay, ">= 0")
  check(w.grad_clip > 0, "weights.grad_clip", w.grad_clip, "> 0")
  check(isinstance(config.epochs, int) and config.epochs >= 1, "epochs", config.epochs,
        "an integer >= 1")
  check(a.lr > 0, "arch.lr", a.lr, "> 0")
  check(0 <= a.b1 < 1 and 0 <= a.b2 < 1, "arch.b1/b2", (a.b1, a.b2), "in [0, 1)")
  check(a.weight_decay >= 0, "arch.weight_decay", a.weight_decay, ">= 0")


def neighbors_per_step(config: ml_collections.ConfigDict) -> int:
  """How many architectures the architecture step evaluates (for batch checks)."""
  if config.algorithm == "darts":
    return 1
  return config.neighbors.num + int(config.neighbors.include_center)
