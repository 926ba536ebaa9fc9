"""The train-from-scratch state pytree, learning-rate schedules and optimizer.

Everything a resumed run needs lives in one `TrainState`: weights, BatchNorm statistics,
the optimizer state, the step counter and the random key. The learning rate and the drop
path rate are functions of the step, so a restored state continues the same schedules.

The schedules are the reference's (quark0/darts), both stepped once per epoch, so the
learning rate is constant within an epoch:
- ``'cosine'`` (``train.py``): ``CosineAnnealingLR(T_max=epochs, eta_min=lr_min)``,
  ``lr(e) = lr_min + (lr - lr_min) * (1 + cos(pi * e / epochs)) / 2``.
- ``'exponential'`` (``train_imagenet.py``): ``StepLR(step_size=decay_period, gamma)``,
  ``lr(e) = lr * gamma ** (e // decay_period)``.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

SCHEDULES = ("cosine", "exponential")


@flax.struct.dataclass
class TrainState:
  """All state of training one network from scratch.

  ``rng`` holds raw key data (``jax.random.key_data``, uint32) rather than a typed key,
  so msgpack and orbax checkpoints store it as a plain array.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array


def lr_schedule(optim: ml_collections.ConfigDict, epochs: int,
                steps_per_epoch: int) -> Callable[[jax.Array], jax.Array]:
  """``step -> learning rate`` of ``optim.schedule``, constant within an epoch."""
  if optim.schedule == "cosine":
    def per_epoch(epoch):
      return optim.lr_min + (optim.lr - optim.lr_min) * 0.5 * (
          1.0 + jnp.cos(jnp.pi * epoch / epochs))
  elif optim.schedule == "exponential":
    def per_epoch(epoch):
      return optim.lr * jnp.asarray(optim.gamma, jnp.float32) ** (
          epoch // optim.decay_period)
  else:
    raise ValueError(f"config.train.optim.schedule = {optim.schedule!r} is invalid: "
                     f"expected one of {SCHEDULES}.")
  return lambda step: jnp.asarray(per_epoch(step // steps_per_epoch), jnp.float32)


def train_optimizer(optim: ml_collections.ConfigDict, epochs: int,
                    steps_per_epoch: int) -> optax.GradientTransformation:
  """PyTorch's SGD as the reference uses it.

  Order of the reference: ``clip_grad_norm_`` on the loss gradient first, then SGD adds
  ``weight_decay * w`` to the clipped gradient, then the momentum buffer
  ``b = momentum * b + d`` (``b = d`` at the first step, which optax's zero-initialised
  trace reproduces) and ``w -= lr * b``. Weight decay applies to every parameter, BatchNorm
  included, as in the reference.
  """
  return optax.chain(
      optax.clip_by_global_norm(optim.grad_clip),
      optax.add_decayed_weights(optim.weight_decay),
      optax.sgd(lr_schedule(optim, epochs, steps_per_epoch), momentum=optim.momentum))
