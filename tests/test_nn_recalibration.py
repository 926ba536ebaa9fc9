"""Tests of nanas_jax.nn.recalibration: BatchNorm statistics re-estimated per architecture.

Oracles: a float64 numpy recomputation of every batch's statistics for a small network;
and, the point of recalibration, a one-hot architecture of either search supernet,
recalibrated and evaluated by `SupernetEvaluator`, scores exactly what the discrete
network of that architecture (``nn/networks.py``, ``nn/nb201_network.py``) scores with the
same weights and BatchNorm statistics estimated on the same batches."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nanas_jax.nn import nb201_network, nb201_supernet, networks, ops, supernet
from nanas_jax.nn.recalibration import average_batch_statistics
from nanas_jax.search.evaluators import SupernetEvaluator
from nanas_jax.spaces import Genotype, NB201Arch, get_space
from supernet_weights import discrete_network_params, nb201_discrete_variables

EPS = 1e-5


class TwoBatchNorms(nn.Module):
  """Dense -> affine BatchNorm -> ReLU -> affine-free BatchNorm, on [B, 1, 1, D]."""

  @nn.compact
  def __call__(self, x, train):
    h = nn.Dense(3, use_bias=False, name="dense")(x)
    h = jax.nn.relu(ops.BatchNorm(name="bn1")(h, train))
    return ops.BatchNorm(affine=False, name="bn2")(h, train)


def _np_batch_norm_stats(x):
  flat = x.reshape(-1, x.shape[-1])
  return flat.mean(0), flat.var(0, ddof=1), (x - flat.mean(0)) / np.sqrt(flat.var(0) + EPS)


def test_average_batch_statistics_equals_numpy_mean_of_batch_statistics():
  rng = np.random.default_rng(0)
  batches = [rng.normal(1.0, 2.0, size=(5, 1, 1, 4)).astype(np.float32) for _ in range(3)]
  model = TwoBatchNorms()
  variables = model.init(jax.random.key(0), batches[0], train=True)
  params = jax.tree.map(lambda p: p + 0.3 * rng.normal(size=p.shape).astype(np.float32),
                        variables["params"])
  # Stale running statistics: recalibration must not depend on them.
  stale = jax.tree.map(lambda s: s + 7.0, variables["batch_stats"])

  def update(stats, x):
    return model.apply({"params": params, "batch_stats": stats}, x, train=True,
                       mutable=["batch_stats"])[1]["batch_stats"]

  got = average_batch_statistics(jax.jit(update), stale, [(x,) for x in batches])

  want = {"bn1": [], "bn2": []}
  kernel = np.asarray(params["dense"]["kernel"], np.float64)
  scale, bias = (np.asarray(params["bn1"][k], np.float64) for k in ("scale", "bias"))
  for x in batches:
    mean1, var1, z1 = _np_batch_norm_stats(x.astype(np.float64) @ kernel)
    mean2, var2, _ = _np_batch_norm_stats(np.maximum(z1 * scale + bias, 0.0))
    want["bn1"].append((mean1, var1))
    want["bn2"].append((mean2, var2))
  for name, per_batch in want.items():
    np.testing.assert_allclose(got[name]["mean"], np.mean([m for m, _ in per_batch], 0),
                               rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(got[name]["var"], np.mean([v for _, v in per_batch], 0),
                               rtol=1e-5, atol=1e-6, err_msg=name)
  with pytest.raises(ValueError, match="at least one batch"):
    average_batch_statistics(update, stale, [])


def _mean_cross_entropy(logits_fn, batches):
  total = sum(float(optax.softmax_cross_entropy_with_integer_labels(logits_fn(x), y).sum())
              for x, y in batches)
  return total / sum(len(y) for _, y in batches)


def _data(seed, channels=1, size=8, batch=6, classes=5):
  rng = np.random.default_rng(seed)
  make = lambda n: (rng.normal(size=(n, size, size, channels)).astype(np.float32),
                    rng.integers(0, classes, n).astype(np.int32))
  calibration = [make(batch)[0] for _ in range(3)]
  return calibration, [make(batch), make(batch - 2)]


def _perturbed(variables, seed):
  """Parameters moved off their initial values, running statistics far from any batch's
  (as after training on another architecture mixture)."""
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda p: p * (1 + 0.2 * rng.normal(size=p.shape)).astype(p.dtype),
                        variables["params"])
  stats = jax.tree.map(lambda s: s + np.float32(2.0), variables["batch_stats"])
  return {"params": params, "batch_stats": stats}


# Every parameterised DARTS op, no pools: the search MixedOp adds a BatchNorm after each
# pool that the discrete network has not (supernet_weights.pool_batch_norm).
NO_POOLS = Genotype(
    normal=[("sep_conv_3x3", 0), ("skip_connect", 1), ("dil_conv_3x3", 0),
            ("sep_conv_5x5", 2), ("dil_conv_5x5", 1), ("skip_connect", 3),
            ("sep_conv_3x3", 4), ("dil_conv_3x3", 0)],
    normal_concat=[2, 3, 4, 5],
    reduce=[("skip_connect", 0), ("sep_conv_5x5", 1), ("dil_conv_5x5", 0),
            ("skip_connect", 2), ("sep_conv_3x3", 1), ("dil_conv_3x3", 3),
            ("skip_connect", 4), ("sep_conv_3x3", 2)],
    reduce_concat=[2, 3, 4, 5])


def test_recalibrated_one_hot_darts_supernet_equals_the_discrete_network():
  space = get_space("darts")
  calibration, batches = _data(1)
  model = supernet.SearchNetwork(num_classes=5, channels=4, layers=3)
  uniform = jnp.full(space.alpha_shape, 1 / space.num_ops)
  variables = _perturbed(model.init(jax.random.key(0), calibration[0], uniform, train=True),
                         seed=2)
  codes = space.encode(NO_POOLS)
  evaluator = SupernetEvaluator(model, variables, space, batches, chunk_size=2,
                                recalibration=calibration)
  got = evaluator(codes[None])[0]

  discrete = networks.NetworkCIFAR(NO_POOLS, C=4, num_classes=5, layers=3, auxiliary=False)
  params = discrete_network_params(variables["params"], NO_POOLS, layers=3)
  init = discrete.init(jax.random.key(0), calibration[0], train=True)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, init["params"])

  def update(stats, x):
    return discrete.apply({"params": params, "batch_stats": stats}, x, train=True,
                          mutable=["batch_stats"])[1]["batch_stats"]

  stats = average_batch_statistics(update, init["batch_stats"], [(x,) for x in calibration])
  want = _mean_cross_entropy(
      lambda x: discrete.apply({"params": params, "batch_stats": stats}, x, train=False)[0],
      batches)
  np.testing.assert_allclose(got, want, rtol=2e-5)
  # The supernet's stale running statistics give another number.
  stale = SupernetEvaluator(model, variables, space, batches, train=False)(codes[None])[0]
  assert abs(stale - got) > 0.1


def test_recalibrated_one_hot_nb201_supernet_equals_the_tiny_network():
  space = get_space("nb201")
  calibration, batches = _data(3, channels=3)
  archs = ["|nor_conv_3x3~0|+|nor_conv_1x1~0|avg_pool_3x3~1|"
           "+|skip_connect~0|nor_conv_3x3~1|none~2|",
           "|avg_pool_3x3~0|+|none~0|nor_conv_3x3~1|+|nor_conv_1x1~0|skip_connect~1|"
           "nor_conv_3x3~2|"]
  model = nb201_supernet.SearchNetworkNB201(5, channels=4, cells_per_stage=1)
  uniform = jnp.full(space.alpha_shape, 1 / space.num_ops)
  variables = _perturbed(model.init(jax.random.key(4), calibration[0], uniform, train=True),
                         seed=5)
  codes = np.stack([space.encode(NB201Arch.parse(a)) for a in archs])
  got = SupernetEvaluator(model, variables, space, batches, chunk_size=4,
                          recalibration=calibration)(codes)
  for arch, loss in zip(archs, got):
    discrete = nb201_network.TinyNetwork(arch, C=4, N=1, num_classes=5)
    mapped = nb201_discrete_variables(variables, arch, 1)

    def update(stats, x, discrete=discrete, mapped=mapped):
      return discrete.apply({"params": mapped["params"], "batch_stats": stats}, x,
                            train=True, mutable=["batch_stats"])[1]["batch_stats"]

    stats = average_batch_statistics(update, mapped["batch_stats"],
                                     [(x,) for x in calibration])
    want = _mean_cross_entropy(
        lambda x, discrete=discrete, mapped=mapped: discrete.apply(
            {"params": mapped["params"], "batch_stats": stats}, x, train=False),
        batches)
    np.testing.assert_allclose(loss, want, rtol=2e-5, err_msg=arch)
