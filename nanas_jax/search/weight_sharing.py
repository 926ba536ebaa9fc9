"""Random search with weight sharing (Li & Talwalkar): the supernet's training phase.

Every step trains the supernet weights on one uniformly sampled architecture, given to the
supernet as one-hot architecture weights (the same module DARTS uses, since architecture
weights are an input), in the compute dtype ``config.dtype`` (`bilevel.apply_supernet`).
The trained weights then score candidates through `evaluators.SupernetEvaluator`, for
random search or NA-RS (`random_search.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from nanas_jax import neighborhood
from nanas_jax.search.bilevel import (accuracy, apply_supernet, check_compute_dtype,
                                      check_gpu_autotune, compute_dtype, cross_entropy,
                                      xla_compiler_options)
from nanas_jax.search.state import SearchState, weight_lr_schedule, weight_optimizer
from nanas_jax.spaces import SearchSpace

RS_ALGORITHMS = ("rs", "na_rs")
RS_EVALUATORS = ("supernet", "table")


class WeightSharingTrainer:
  """Builds the state and the step of supernet training on sampled architectures."""

  def __init__(self, model, space: SearchSpace, config: ml_collections.ConfigDict,
               steps_per_epoch: int, platform: str | None = None):
    validate_rs_config(config)
    self.model = model
    self.space = space
    self.config = config
    self.weight_tx = weight_optimizer(config.weights, config.epochs, steps_per_epoch)
    self.lr_schedule = weight_lr_schedule(config.weights, config.epochs, steps_per_epoch)
    self.compute_dtype = compute_dtype(config)
    # XLA's options for the programs of a search on ``platform`` (default: JAX's default
    # backend): on a GPU, no autotuning unless ``config.gpu_autotune``.
    self.compiler_options = xla_compiler_options(config, platform or jax.default_backend())
    self._options = dict(self.compiler_options) or None
    self._step = jax.jit(self._train_step, donate_argnums=0, compiler_options=self._options)

  def init(self, rng: jax.Array, sample_images: jax.Array) -> SearchState:
    """A fresh state. ``alpha`` stays uniform (zeros): random search does not learn it."""
    param_rng, state_rng = jax.random.split(rng)
    alpha = jnp.zeros(self.space.alpha_shape, jnp.float32)
    variables = self.model.init(param_rng, sample_images[:1], jax.nn.softmax(alpha, -1),
                                train=True)
    params = variables["params"]
    # One small program instead of a zeros program per parameter shape (eagerly).
    weight_opt_state = jax.jit(self.weight_tx.init, compiler_options=self._options)(params)
    return SearchState(step=jnp.zeros((), jnp.int32), params=params,
                       batch_stats=variables.get("batch_stats", {}), alpha=alpha,
                       weight_opt_state=weight_opt_state, arch_opt_state=(), rng=state_rng)

  def sample_weights(self, rng: np.random.Generator) -> np.ndarray:
    """One-hot weights of a uniformly sampled architecture of the space."""
    codes = self.space.encode(self.space.random(rng))
    return np.eye(self.space.num_ops, dtype=np.float32)[codes]

  def _train_step(self, state: SearchState, weights, images, labels):
    def loss_fn(params):
      logits, batch_stats = apply_supernet(self.model, self.compute_dtype, params,
                                           state.batch_stats, images, weights, train=True)
      return cross_entropy(logits, labels), (logits, batch_stats)

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    updates, opt_state = self.weight_tx.update(grads, state.weight_opt_state, state.params)
    metrics = {"train_loss": loss, "train_accuracy": accuracy(logits, labels),
               "learning_rate": self.lr_schedule(state.step),
               "weight_grad_norm": optax.tree.norm(grads)}
    return state.replace(step=state.step + 1,
                         params=optax.apply_updates(state.params, updates),
                         batch_stats=batch_stats, weight_opt_state=opt_state), metrics

  def step(self, state: SearchState, train_batch, rng: np.random.Generator,
           put: Callable[[np.ndarray], Any] = jnp.asarray):
    """One weight step on a freshly sampled architecture: ``(new state, metrics)``.
    ``put`` places the sampled weights (replicated over a device mesh in data-parallel
    runs)."""
    return self._step(state, put(self.sample_weights(rng)), *train_batch)


def validate_rs_config(config: ml_collections.ConfigDict) -> None:
  """Fails fast, naming the field, on random-search values that cannot run."""

  def check(ok: bool, field: str, value: Any, expected: str):
    if not ok:
      raise ValueError(f"config.search.{field} = {value!r} is invalid: expected {expected}.")

  check(config.algorithm in RS_ALGORITHMS, "algorithm", config.algorithm,
        f"one of {RS_ALGORITHMS}")
  check(isinstance(config.epochs, int) and config.epochs >= 1, "epochs", config.epochs,
        "an integer >= 1")
  check_compute_dtype(config)
  check_gpu_autotune(config)
  rs = config.rs
  check(rs.evaluator in RS_EVALUATORS, "rs.evaluator", rs.evaluator,
        f"one of {RS_EVALUATORS}")
  if rs.evaluator == "table":
    check(bool(rs.table_path) != bool(rs.nats_bench_path), "rs.table_path",
          rs.table_path, "a table file (JSON or CSV), or else rs.nats_bench_path, not both")
  check(isinstance(rs.num_candidates, int) and rs.num_candidates >= 1, "rs.num_candidates",
        rs.num_candidates, "an integer >= 1")
  check(isinstance(rs.radius, int) and rs.radius >= 1, "rs.radius", rs.radius,
        "an integer >= 1")
  check(rs.num_neighbors is None or (isinstance(rs.num_neighbors, int)
                                     and rs.num_neighbors >= 1),
        "rs.num_neighbors", rs.num_neighbors, "None (all) or an integer >= 1")
  check(isinstance(rs.eval_batches, int) and rs.eval_batches >= 1, "rs.eval_batches",
        rs.eval_batches, "an integer >= 1")
  recalibrate = rs.get("recalibrate_batches", 0)
  check(isinstance(recalibrate, int) and recalibrate >= 0, "rs.recalibrate_batches",
        recalibrate, "an integer >= 0 (0: no BatchNorm recalibration)")
  check(isinstance(rs.chunk_size, int) and rs.chunk_size >= 1, "rs.chunk_size",
        rs.chunk_size, "an integer >= 1")
  check(rs.aggregation in neighborhood.AGGREGATIONS, "rs.aggregation", rs.aggregation,
        f"one of {neighborhood.AGGREGATIONS}")
  check(rs.tau > 0, "rs.tau", rs.tau, "> 0")
  w = config.weights
  check(w.lr > 0, "weights.lr", w.lr, "> 0")
  check(0 <= w.lr_min <= w.lr, "weights.lr_min", w.lr_min, "in [0, weights.lr]")
