"""The search state pytree and the two optimizers of the bilevel search.

Everything a search needs to resume lives in one `SearchState`: the supernet weights, their
BatchNorm statistics, the architecture parameters ``alpha``, both optimizer states, the
step counter and the random key. Checkpointing, sharding and resume then treat alpha like
every other leaf (DARTS-family repos that keep alpha outside the model lose it on resume).
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax


@flax.struct.dataclass
class SearchState:
  """All state of a bilevel architecture search."""
  step: jax.Array
  params: Any
  batch_stats: Any
  alpha: jax.Array  # [cell types, edges, ops]
  weight_opt_state: Any
  arch_opt_state: Any
  rng: jax.Array


def weight_lr_schedule(config: ml_collections.ConfigDict, epochs: int,
                       steps_per_epoch: int):
  """Cosine annealing per epoch from ``lr`` to ``lr_min`` over ``epochs`` (PyTorch's
  CosineAnnealingLR stepped once per epoch, as the reference search does)."""
  per_epoch = optax.cosine_decay_schedule(
      init_value=config.lr, decay_steps=epochs, alpha=config.lr_min / config.lr)
  return lambda step: per_epoch(step // steps_per_epoch)


def weight_optimizer(config: ml_collections.ConfigDict, epochs: int, steps_per_epoch: int):
  """SGD with momentum on the supernet weights: clip the gradient norm, then add L2 weight
  decay to the gradient (PyTorch SGD's ``weight_decay``), then the momentum step."""
  return optax.chain(
      optax.clip_by_global_norm(config.grad_clip),
      optax.add_decayed_weights(config.weight_decay),
      optax.sgd(weight_lr_schedule(config, epochs, steps_per_epoch),
                momentum=config.momentum))


ARCH_SCHEDULES = ("constant", "cosine")


def arch_lr_schedule(config: ml_collections.ConfigDict, arch_steps: int):
  """The architecture learning rate per architecture step: DARTS's constant ``lr``, or
  (``schedule='cosine'``) cosine-annealed from ``lr`` to 0 over the ``arch_steps``
  architecture steps of the search, as the weights' learning rate is annealed."""
  if config.get("schedule", "constant") == "cosine":
    return optax.cosine_decay_schedule(config.lr, max(arch_steps, 1))
  return optax.constant_schedule(config.lr)


def arch_optimizer(config: ml_collections.ConfigDict, arch_steps: int = 0):
  """Adam on alpha with L2 weight decay added to the gradient (PyTorch Adam's
  ``weight_decay``, which is not AdamW's decoupled decay), at `arch_lr_schedule`."""
  return optax.chain(
      optax.add_decayed_weights(config.weight_decay),
      optax.adam(arch_lr_schedule(config, arch_steps), b1=config.b1, b2=config.b2))


def momentum_buffer(weight_opt_state) -> Any:
  """The SGD momentum buffer inside the weight optimizer state (for the unrolled step)."""
  return optax.tree_utils.tree_get(weight_opt_state, "trace")


def init_alpha(rng: jax.Array, shape: tuple[int, ...], scale: float) -> jax.Array:
  """Architecture parameters ``scale * N(0, 1)`` (the reference uses 1e-3)."""
  return scale * jax.random.normal(rng, shape, jnp.float32)
