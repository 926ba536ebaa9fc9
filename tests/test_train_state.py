"""Tests of nanas_jax.train.state: the schedules against PyTorch's closed forms and the
optimizer against PyTorch's SGD update written out in float64 numpy."""

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from nanas_jax.train import state as state_lib


def optim_config(**overrides):
  config = ml_collections.ConfigDict(dict(
      lr=0.1, lr_min=0.0, momentum=0.9, weight_decay=3e-4, grad_clip=5.0,
      schedule="cosine", gamma=0.97, decay_period=1))
  config.update(overrides)
  return config


def torch_lr(optim, epochs, epoch):
  """CosineAnnealingLR / StepLR in closed form, stepped once per epoch from epoch 0."""
  if optim.schedule == "cosine":
    return optim.lr_min + (optim.lr - optim.lr_min) * (1 + np.cos(np.pi * epoch / epochs)) / 2
  return optim.lr * optim.gamma ** (epoch // optim.decay_period)


@pytest.mark.parametrize("overrides", [
    dict(schedule="cosine"), dict(schedule="cosine", lr_min=1e-3),
    dict(schedule="exponential"), dict(schedule="exponential", gamma=0.5, decay_period=2)])
def test_schedule_is_the_torch_closed_form_constant_within_an_epoch(overrides):
  optim, epochs, steps_per_epoch = optim_config(**overrides), 5, 3
  schedule = jax.jit(state_lib.lr_schedule(optim, epochs, steps_per_epoch))
  for step in range(epochs * steps_per_epoch):
    np.testing.assert_allclose(schedule(jnp.int32(step)),
                               torch_lr(optim, epochs, step // steps_per_epoch), rtol=1e-6)
  assert float(schedule(0)) == pytest.approx(optim.lr)


def test_exponential_schedule_over_the_imagenet_run_length():
  optim = optim_config(schedule="exponential")
  schedule = state_lib.lr_schedule(optim, 250, 10)
  for epoch in (0, 1, 100, 249):
    np.testing.assert_allclose(schedule(jnp.int32(epoch * 10 + 9)), 0.1 * 0.97**epoch,
                               rtol=1e-5)


def test_unknown_schedule_names_the_field():
  with pytest.raises(ValueError, match=r"config\.train\.optim\.schedule = 'step'"):
    state_lib.lr_schedule(optim_config(schedule="step"), 5, 3)


@pytest.mark.parametrize("schedule", ["cosine", "exponential"])
def test_optimizer_is_torch_sgd_clip_then_weight_decay_then_momentum(schedule):
  optim = optim_config(schedule=schedule, lr_min=1e-3, gamma=0.5, weight_decay=0.05)
  epochs = 3
  tx = state_lib.train_optimizer(optim, epochs, steps_per_epoch=1)
  params = {"conv": {"kernel": jnp.array([[1.0, -2.0], [0.5, 0.25]])},
            "bn": {"scale": jnp.array([1.0, 1.5])}}
  opt_state = tx.init(params)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  buf = None
  rng = np.random.default_rng(0)
  # The first two gradients are clipped (norm > 5), the third is not.
  for step, scale in enumerate([10.0, 20.0, 0.1]):
    grads = jax.tree.map(lambda a: rng.normal(scale=scale, size=a.shape), p)
    updates, opt_state = tx.update(jax.tree.map(jnp.float32, grads), opt_state, params)
    params = optax.apply_updates(params, updates)
    # PyTorch: clip_grad_norm_ scales by max_norm / (norm + 1e-6) when below 1, then SGD
    # adds weight_decay * p, then b = d on the first step and b = momentum * b + d after.
    leaves = jax.tree.leaves(grads)
    norm = np.sqrt(sum((g**2).sum() for g in leaves))
    clip = min(1.0, optim.grad_clip / (norm + 1e-6))
    assert (clip < 1.0) == (step < 2)
    d = jax.tree.map(lambda g, w: clip * g + optim.weight_decay * w, grads, p)
    buf = d if buf is None else jax.tree.map(lambda b, x: optim.momentum * b + x, buf, d)
    lr = torch_lr(optim, epochs, step)
    p = jax.tree.map(lambda w, b: w - lr * b, p, buf)
    jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7),
                 params, p)


def test_train_state_is_a_pytree_that_round_trips_through_msgpack():
  state = state_lib.TrainState(
      step=jnp.int32(7), params={"w": jnp.arange(3.0)}, batch_stats={"mean": jnp.ones(2)},
      opt_state=(optax.TraceState(trace={"w": jnp.full(3, 0.5)}),),
      rng=jax.random.key_data(jax.random.key(3)))
  assert len(jax.tree.leaves(state)) == 5
  template = jax.tree.map(jnp.zeros_like, state)
  restored = flax.serialization.from_bytes(template, flax.serialization.to_bytes(state))
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  assert restored.rng.dtype == jnp.uint32
