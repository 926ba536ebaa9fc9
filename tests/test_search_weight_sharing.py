"""Tests of supernet training on sampled architectures (random search with weight sharing)."""

import collections

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import na_rs_quickstart
from nanas_jax import spaces
from nanas_jax.search import weight_sharing


class ToyArchModel(nn.Module):
  """logits = tanh(sum_teo w[t,e,o] * x @ P[t,e,o]) @ V."""

  @nn.compact
  def __call__(self, x, weights, train):
    x = x.reshape(x.shape[0], -1)
    proj = self.param("proj", nn.initializers.normal(0.5), weights.shape + (x.shape[-1], 5))
    return nn.Dense(3)(jnp.tanh(jnp.einsum("teo,bd,teodh->bh", weights, x, proj)))


@pytest.mark.parametrize("space_name", ["darts", "nb201"])
def test_sampled_weights_are_one_hot_architectures_of_the_space(space_name):
  space = spaces.get_space(space_name)
  trainer = weight_sharing.WeightSharingTrainer(
      ToyArchModel(), space, na_rs_quickstart.get_config().search, steps_per_epoch=5)
  rng = np.random.default_rng(0)
  seen = set()
  for _ in range(50):
    weights = trainer.sample_weights(rng)
    assert weights.shape == space.alpha_shape
    np.testing.assert_array_equal(weights.sum(-1), 1.0)
    arch = space.decode(weights.argmax(-1))  # raises on an invalid architecture
    seen.add(space.format(arch))
  assert len(seen) > 40  # uniform sampling rarely repeats in spaces this large


def _one_step(dtype: str):
  """One training step of a fresh trainer in ``dtype`` on a fixed batch: the trainer, the
  batch, the parameters before the step, the new state, its metrics and the sampled
  architecture's weights."""
  config = na_rs_quickstart.get_config().search
  config.dtype = dtype
  trainer = weight_sharing.WeightSharingTrainer(ToyArchModel(), spaces.get_space("darts"),
                                                config, 5)
  rng = np.random.default_rng(1)
  x = rng.normal(size=(6, 4)).astype(np.float32)
  y = rng.integers(0, 3, 6)
  state = trainer.init(jax.random.key(0), jnp.asarray(x))
  params = jax.tree.map(jnp.copy, state.params)  # the step donates the state
  new, metrics = trainer.step(state, (x, y), np.random.default_rng(7))
  weights = trainer.sample_weights(np.random.default_rng(7))
  return trainer, (x, y), params, new, metrics, weights


def test_train_step_is_sgd_on_the_sampled_architecture():
  trainer, (x, y), params, new, metrics, weights = _one_step("float32")

  def loss(p):
    logits = trainer.model.apply({"params": p}, x, weights, train=True)
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(6), y])

  grads = jax.grad(loss)(params)
  w = trainer.config.weights
  norm = jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads)))
  scale = jnp.minimum(1.0, w.grad_clip / norm)
  expected = jax.tree.map(lambda p, g: p - w.lr * (scale * g + w.weight_decay * p), params,
                          grads)
  for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(metrics["train_loss"], loss(params), rtol=1e-6)
  assert int(new.step) == 1


def test_train_step_in_bfloat16_computes_in_bfloat16_and_keeps_float32_state():
  trainer, (x, y), params, new, metrics, weights = _one_step("bfloat16")

  def loss(dtype):
    cast = lambda a: jnp.asarray(a).astype(dtype)
    logits = trainer.model.apply({"params": jax.tree.map(cast, params)}, cast(x),
                                 cast(weights), train=True).astype(jnp.float32)
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(6), y])

  # The loss of the bfloat16 forward pass written out, not the float32 one.
  np.testing.assert_allclose(metrics["train_loss"], loss(jnp.bfloat16), rtol=1e-6)
  assert abs(float(loss(jnp.bfloat16)) / float(loss(jnp.float32)) - 1) > 1e-5
  assert {a.dtype.name for a in jax.tree.leaves(new.params)} == {"float32"}


@pytest.mark.parametrize("field,value", [("algorithm", "darts"), ("rs.num_candidates", 0),
                                         ("rs.radius", 0), ("rs.num_neighbors", 0),
                                         ("rs.aggregation", "median"), ("rs.chunk_size", 0),
                                         ("epochs", 0), ("dtype", "float16")])
def test_bad_values_name_the_field(field, value):
  config = na_rs_quickstart.get_config().search
  *path, leaf = field.split(".")
  node = config
  for part in path:
    node = node[part]
  node[leaf] = value
  with pytest.raises(ValueError, match=f"config.search.{field}".replace(".", r"\.")):
    weight_sharing.validate_rs_config(config)


def test_on_a_gpu_its_programs_and_the_evaluators_compile_with_autotuning_off(tmp_path,
                                                                             monkeypatch):
  """Random search's programs for a GPU (here compiled for the CPU, which takes the GPU's
  options and ignores them): the trainer's (its optimizer's initial state, its step) and
  those of the evaluator built with its options (the candidates' losses, their BatchNorm
  recalibration), every one dumped by XLA with `bilevel.GPU_WITHOUT_AUTOTUNING` (the
  oracle, `test_search_bilevel.assert_dumped_with_options`); the scores equal those of
  the CPU's programs."""
  from nanas_jax.search.evaluators import SupernetEvaluator
  from test_search_bilevel import assert_dumped_with_options, dumping_options, record_compiles
  dump = tmp_path / "xla"
  dumping_options(monkeypatch, dump)
  space = spaces.get_space("darts")
  rng = np.random.default_rng(1)
  x, y = rng.normal(size=(6, 4)).astype(np.float32), rng.integers(0, 3, 6)
  codes = space.encode(space.random(np.random.default_rng(2)))[None]
  losses, compiled = {}, {}
  for platform in ("gpu", "cpu"):
    trainer = weight_sharing.WeightSharingTrainer(
        ToyArchModel(), space, na_rs_quickstart.get_config().search, 5, platform=platform)

    # `init`'s own program, the optimizer's state (its parameters are drawn eagerly).
    init = collections.Counter(name for name, _ in record_compiles(
        lambda trainer=trainer: losses.update(state=trainer.init(jax.random.key(0),
                                                                  jnp.asarray(x)))))
    assert init["jit(init_fn)"] == 1

    def run(trainer=trainer, platform=platform, state=losses.pop("state")):
      for step in range(2):
        state, _ = trainer.step(state, (x, y), np.random.default_rng(step))
      evaluator = SupernetEvaluator(
          trainer.model, {"params": state.params, "batch_stats": state.batch_stats}, space,
          [(x, y)], recalibration=[x, x], compiler_options=trainer.compiler_options)
      losses[platform] = evaluator(codes)

    # JAX's own program that moves a host array to the device ("stage") left out.
    compiled[platform] = collections.Counter(
        name.removeprefix("jit(").removesuffix(")") for name, _ in record_compiles(run)
        if name != "jit(stage)")
  assert_dumped_with_options(dump, compiled["gpu"] + collections.Counter(["init_fn"]))
  assert {"_train_step", "_loss_and_hits", "_batch_stats_update"} <= set(compiled["gpu"])
  np.testing.assert_array_equal(losses["gpu"], losses["cpu"])
