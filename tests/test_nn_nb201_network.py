"""Tests of nanas_jax.nn.nb201_network: parameter counts against a closed form of the
reference TinyNetwork and the benchmark's published extremes, cells and reduction blocks
against float64 numpy, and a tiny forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanas_jax.nn import nb201_network as nb
from nanas_jax.nn.networks import count_params
from nanas_jax.spaces import NB201Arch

EPS = 1e-5
EXAMPLE = ("|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|"
           "+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|")


def uniform_arch(op):
  return "+".join("|" + "|".join(f"{op}~{s}" for s in range(t)) + "|" for t in (1, 2, 3))


def tiny_network_params(arch, C=16, N=5, num_classes=10, in_channels=3):
  """Parameters of the reference TinyNetwork, from the definitions in AutoDL-Projects
  cell_operations.py / tiny_network.py (ReLUConvBN: conv without bias, affine BN)."""
  per_edge = {"none": lambda c: 0, "skip_connect": lambda c: 0, "avg_pool_3x3": lambda c: 0,
              "nor_conv_1x1": lambda c: c * c + 2 * c,
              "nor_conv_3x3": lambda c: 9 * c * c + 2 * c}
  ops = [token.split("~")[0] for token in arch.replace("+", "").split("|") if token]
  total = in_channels * C * 9 + 2 * C  # Stem.
  for stage in range(3):
    c = C * 2 ** stage
    if stage:  # ResNetBasicblock(c / 2, c, stride 2): conv_a, conv_b, pool + 1x1 conv.
      total += (9 * (c // 2) * c + 2 * c) + (9 * c * c + 2 * c) + (c // 2) * c
    total += N * sum(per_edge[op](c) for op in ops)
  return total + 2 * 4 * C + 4 * C * num_classes + num_classes


def flax_count(arch, num_classes=10):
  model = nb.TinyNetwork(arch, 16, 5, num_classes)
  variables = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, True),
      jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  return count_params(variables["params"])


def test_published_extremes_of_the_benchmark():
  # NAS-Bench-201 CIFAR-10 parameter range: 0.073306 MB (no conv) to 1.531546 MB (all
  # nor_conv_3x3); CIFAR-100 maximum 1.537396 MB.
  assert tiny_network_params(uniform_arch("nor_conv_3x3")) == 1_531_546
  assert tiny_network_params(uniform_arch("none")) == 73_306
  assert flax_count(uniform_arch("nor_conv_3x3")) == 1_531_546
  assert flax_count(uniform_arch("nor_conv_3x3"), num_classes=100) == 1_537_396
  for op in ("none", "skip_connect", "avg_pool_3x3"):
    assert flax_count(uniform_arch(op)) == 73_306


@pytest.mark.parametrize("arch", [EXAMPLE, uniform_arch("nor_conv_1x1")])
def test_param_count_matches_closed_form(arch):
  assert flax_count(arch) == tiny_network_params(arch)
  assert flax_count(NB201Arch.parse(arch)) == tiny_network_params(arch)


def np_conv(x, w, stride=1, pad=0):
  """Direct float64 NHWC convolution with an HWIO kernel (sum over taps)."""
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  k = w.shape[0]
  ho = (x.shape[1] - k) // stride + 1
  wo = (x.shape[2] - k) // stride + 1
  out = np.zeros((x.shape[0], ho, wo, w.shape[-1]))
  for i in range(k):
    for j in range(k):
      out += x[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride] @ w[i, j]
  return out


def np_relu_conv_bn(x, p, stride=1):
  k = p["conv"]["kernel"].shape[0]
  y = np_conv(np.maximum(x, 0.0), p["conv"]["kernel"], stride, k // 2)
  mean, var = y.mean(axis=(0, 1, 2)), y.var(axis=(0, 1, 2))
  return (y - mean) / np.sqrt(var + EPS) * p["bn"]["scale"] + p["bn"]["bias"]


def np_avg_pool_3x3(x):
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=np.nan)
  h, w = x.shape[1:3]
  return np.nanmean(np.stack([padded[:, i:i + h, j:j + w] for i in range(3)
                              for j in range(3)]), axis=0)


def random_variables(module, x_shape, seed=0):
  """(variables, float64 numpy params): the shapes of ``module.init`` filled from numpy
  without compiling the initialisers; params N(0, 0.5^2), BN means 0, variances 1."""
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros(x_shape), True))
  rng = np.random.default_rng(seed)
  params = jax.tree_util.tree_map(lambda a: rng.normal(0.0, 0.5, a.shape), shapes["params"])
  stats = jax.tree_util.tree_map_with_path(
      lambda path, a: jnp.full(a.shape, 0.0 if path[-1].key == "mean" else 1.0),
      shapes["batch_stats"])
  jax_params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)
  return {"params": jax_params, "batch_stats": stats}, params


def test_infer_cell_against_numpy():
  x = np.random.default_rng(1).normal(size=(2, 5, 5, 3))
  cell = nb.InferCell(EXAMPLE, 3)
  variables, p = random_variables(cell, x.shape)
  y, _ = cell.apply(variables, jnp.asarray(x, jnp.float32), True, mutable=["batch_stats"])
  # Edges in string order: 1<-0 conv, 2<-0 conv, 2<-1 pool, 3<-0 skip, 3<-1 conv, 3<-2 skip.
  node1 = np_relu_conv_bn(x, p["layers_0"])
  node2 = np_relu_conv_bn(x, p["layers_1"]) + np_avg_pool_3x3(node1)
  node3 = x + np_relu_conv_bn(node1, p["layers_4"]) + node2
  np.testing.assert_allclose(y, node3, rtol=2e-4, atol=2e-4)
  assert set(p) == {"layers_0", "layers_1", "layers_4"}


def test_resnet_basicblock_against_numpy():
  x = np.random.default_rng(2).normal(size=(2, 6, 4, 3))
  block = nb.ResNetBasicblock(3, 5, 2)
  variables, p = random_variables(block, x.shape)
  y, _ = block.apply(variables, jnp.asarray(x, jnp.float32), True, mutable=["batch_stats"])
  out = np_relu_conv_bn(np_relu_conv_bn(x, p["conv_a"], stride=2), p["conv_b"])
  pooled = (x[:, 0::2, 0::2] + x[:, 0::2, 1::2] + x[:, 1::2, 0::2] + x[:, 1::2, 1::2]) / 4
  residual = pooled @ p["downsample"]["kernel"][0, 0]  # No ReLU, no BN on the shortcut.
  np.testing.assert_allclose(y, out + residual, rtol=2e-4, atol=2e-4)


def test_tiny_network_forward_train_and_eval():
  model = nb.TinyNetwork(EXAMPLE, C=4, N=1, num_classes=10)
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 8, 8, 3)), jnp.float32)
  variables, _ = random_variables(model, x.shape)
  assert len([k for k in variables["params"] if k.startswith("cells_")]) == 3 * 1 + 2
  logits, updated = jax.jit(lambda v, x: model.apply(v, x, True, mutable=["batch_stats"]))(
      variables, x)
  assert logits.shape == (2, 10) and np.all(np.isfinite(logits))
  assert not np.allclose(updated["batch_stats"]["stem_bn"]["mean"], 0.0)
  logits = jax.jit(lambda v, x: model.apply(v, x, False))(variables, x)
  assert logits.shape == (2, 10) and np.all(np.isfinite(logits))


def test_bad_input_raises_value_error():
  def abstract_init(module, shape):
    jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros(shape), True))

  with pytest.raises(ValueError, match="Unknown NAS-Bench-201 operation 'sep_conv_3x3'"):
    nb.nb201_op("sep_conv_3x3", 4)
  with pytest.raises(ValueError, match="unknown op 'sep_conv_3x3'"):
    abstract_init(nb.TinyNetwork(EXAMPLE.replace("avg_pool_3x3", "sep_conv_3x3")),
                  (1, 8, 8, 3))
  with pytest.raises(ValueError, match="node 2 has 1 inputs"):
    abstract_init(nb.TinyNetwork("|nor_conv_3x3~0|+|nor_conv_3x3~0|+|skip_connect~0|"),
                  (1, 8, 8, 3))
  with pytest.raises(ValueError, match="expects 4 input channels, got 3"):
    abstract_init(nb.InferCell(EXAMPLE, 4), (1, 8, 8, 3))
  with pytest.raises(ValueError, match="even spatial sizes, got 7x8"):
    abstract_init(nb.ResNetBasicblock(4, 8, 2), (1, 7, 8, 4))
