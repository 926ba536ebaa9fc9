"""Tests of the search optimizers against PyTorch's update rules written out by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import darts_cifar10, quickstart
from nanas_jax.search import state as state_lib


def test_weight_optimizer_is_torch_sgd_with_clipping_weight_decay_and_momentum():
  config = quickstart.get_config().search
  w = config.weights
  tx = state_lib.weight_optimizer(w, epochs=4, steps_per_epoch=2)
  params = {"a": jnp.array([1.0, -2.0, 0.5]), "b": jnp.array([[3.0]])}
  opt_state = tx.init(params)
  rng = np.random.default_rng(0)
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  buf = None
  for step in range(5):
    grads = {k: rng.normal(scale=4.0, size=v.shape) for k, v in p.items()}
    updates, opt_state = tx.update(jax.tree.map(jnp.asarray, grads), opt_state, params)
    params = optax.apply_updates(params, updates)
    # torch: clip_grad_norm_(5) on the raw gradient, then SGD adds wd * p, momentum buffer
    # b = mu * b + d (b = d at the first step), p -= lr(epoch) * b.
    norm = np.sqrt(sum((g**2).sum() for g in grads.values()))
    scale = min(1.0, w.grad_clip / (norm + 1e-6))
    d = {k: scale * grads[k] + w.weight_decay * p[k] for k in p}
    buf = d if buf is None else {k: w.momentum * buf[k] + d[k] for k in p}
    epoch = step // 2
    lr = w.lr_min + (w.lr - w.lr_min) * (1 + np.cos(np.pi * epoch / 4)) / 2
    p = {k: p[k] - lr * buf[k] for k in p}
    for k in p:
      np.testing.assert_allclose(params[k], p[k], rtol=1e-5, atol=1e-6)
  momentum = state_lib.momentum_buffer(opt_state)
  for k in p:
    np.testing.assert_allclose(momentum[k], buf[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("config", ["darts_cifar10", "quickstart"])
def test_arch_optimizer_is_torch_adam_with_l2_weight_decay(config):
  # DARTS: constant lr 3e-4, L2 1e-3; the quick start: lr 0.15 cosine-annealed, no L2.
  a = {"darts_cifar10": darts_cifar10.get_config, "quickstart": quickstart.get_config}[
      config]().search.arch
  arch_steps = 4
  tx = state_lib.arch_optimizer(a, arch_steps)
  alpha = jnp.array([[0.3, -0.1], [0.0, 0.2]])
  opt_state = tx.init(alpha)
  x = np.asarray(alpha, np.float64)
  m = v = np.zeros_like(x)
  rng = np.random.default_rng(1)
  for t in range(1, arch_steps + 1):
    g = rng.normal(size=x.shape)
    updates, opt_state = tx.update(jnp.asarray(g, jnp.float32), opt_state, alpha)
    alpha = optax.apply_updates(alpha, updates)
    g = g + a.weight_decay * x
    m = a.b1 * m + (1 - a.b1) * g
    v = a.b2 * v + (1 - a.b2) * g**2
    lr = a.lr
    if a.schedule == "cosine":
      lr = a.lr * (1 + np.cos(np.pi * (t - 1) / arch_steps)) / 2
    x = x - lr * (m / (1 - a.b1**t)) / (np.sqrt(v / (1 - a.b2**t)) + 1e-8)
    # optax computes Adam's bias corrections in float32, where 1 - 0.999 is off by 1.3e-5
    # relative: a step's error is that fraction of the learning rate.
    np.testing.assert_allclose(alpha, x, rtol=1e-5, atol=1e-4 * a.lr)


def test_init_alpha_has_the_requested_scale_and_shape():
  alpha = state_lib.init_alpha(jax.random.key(0), (2, 14, 8), 1e-3)
  assert alpha.shape == (2, 14, 8)
  assert 0.8e-3 < float(jnp.std(alpha)) < 1.2e-3
