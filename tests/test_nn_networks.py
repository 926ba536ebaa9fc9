"""Tests of nanas_jax.nn.networks: parameter counts against a closed form of the PyTorch
reference (and the published DARTS figure), the cell's drop path, the auxiliary heads
against numpy, and forward passes of tiny networks."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanas_jax.nn import networks
from nanas_jax.spaces import get_genotype

EPS = 1e-5

# Duck-typed genotypes for cells the published ones do not cover (or that are invalid).
LooseGenotype = collections.namedtuple(
    "LooseGenotype", "normal normal_concat reduce reduce_concat")


# ---------------------------------------------------------------------------------------
# Closed-form parameter counts, written from the definitions in quark0/darts
# cnn/operations.py and cnn/model.py (PyTorch: conv without bias, BN affine = 2 per channel).

def relu_conv_bn_params(c_in, c_out, k=1):
  return c_in * c_out * k * k + 2 * c_out


def factorized_reduce_params(c_in, c_out):
  return 2 * c_in * (c_out // 2) + 2 * c_out


def op_params(name, c, stride):
  if name in ("none", "avg_pool_3x3", "max_pool_3x3"):
    return 0
  if name == "skip_connect":
    return 0 if stride == 1 else factorized_reduce_params(c, c)
  k = int(name[-1])
  if name.startswith("sep_conv"):  # Two (depthwise k x k, pointwise 1x1, BN) blocks.
    return 2 * (c * k * k + c * c + 2 * c)
  if name.startswith("dil_conv"):
    return c * k * k + c * c + 2 * c
  assert name == "conv_7x1_1x7"
  return 2 * 7 * c * c + 2 * c


def cell_stack_params(genotype, c_pp, c_p, c, layers, reduction_prev):
  """Returns (parameters of all cells, channels into the auxiliary head, final channels)."""
  total, c_aux = 0, None
  for i in range(layers):
    reduction = i in (layers // 3, 2 * layers // 3)
    if reduction:
      c *= 2
    edges = genotype.reduce if reduction else genotype.normal
    concat = genotype.reduce_concat if reduction else genotype.normal_concat
    total += (factorized_reduce_params(c_pp, c) if reduction_prev
              else relu_conv_bn_params(c_pp, c))
    total += relu_conv_bn_params(c_p, c)
    total += sum(op_params(name, c, 2 if reduction and index < 2 else 1)
                 for name, index in edges)
    reduction_prev = reduction
    c_pp, c_p = c_p, len(concat) * c
    if i == 2 * layers // 3:
      c_aux = c_p
  return total, c_aux, c_p


def aux_head_params(c, num_classes, bn_after_conv2):
  return (c * 128 + 2 * 128 + 128 * 768 * 2 * 2 + (2 * 768 if bn_after_conv2 else 0)
          + 768 * num_classes + num_classes)


def cifar_params(genotype, c, num_classes, layers, in_channels=3):
  """(without auxiliary head, auxiliary head) of the reference NetworkCIFAR."""
  stem = in_channels * 3 * c * 9 + 2 * 3 * c
  cells, c_aux, c_last = cell_stack_params(genotype, 3 * c, 3 * c, c, layers, False)
  return (stem + cells + c_last * num_classes + num_classes,
          aux_head_params(c_aux, num_classes, True))


def imagenet_params(genotype, c, num_classes, layers):
  stem0 = 3 * (c // 2) * 9 + 2 * (c // 2) + (c // 2) * c * 9 + 2 * c
  stem1 = c * c * 9 + 2 * c
  cells, c_aux, c_last = cell_stack_params(genotype, c, c, c, layers, True)
  return (stem0 + stem1 + cells + c_last * num_classes + num_classes,
          aux_head_params(c_aux, num_classes, False))


def init_shapes(model, x_shape, train=True):
  """(output shapes, variable shapes) of ``model.init`` without compiling anything."""
  x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
  return jax.eval_shape(
      lambda x: model.init_with_output(
          {"params": jax.random.key(0), "drop_path": jax.random.key(1)}, x, train=train), x)


def assert_counts(model, x_shape, expected):
  outputs, variables = init_shapes(model, x_shape)
  without_aux, aux = expected
  assert networks.count_params(variables["params"]) == without_aux
  assert networks.count_params(variables["params"], exclude_auxiliary=False) == (
      without_aux + aux)
  return outputs


def test_darts_v2_cifar10_matches_published_param_size():
  genotype = get_genotype("DARTS_V2")
  expected = cifar_params(genotype, 36, 10, 20)
  # quark0/darts train.py logs "param size = 3.349342MB" for DARTS_V2 at C=36, 20 layers.
  assert expected[0] == 3_349_342
  assert_counts(networks.NetworkCIFAR(genotype, 36, 10, 20, True), (1, 32, 32, 3), expected)


def test_darts_v1_cifar10_param_count():
  genotype = get_genotype("DARTS_V1")
  assert_counts(networks.NetworkCIFAR(genotype, 36, 10, 20, True), (1, 32, 32, 3),
                cifar_params(genotype, 36, 10, 20))


@pytest.mark.parametrize("name", ["DARTS_V2", "DARTS_V1"])
def test_imagenet_mobile_param_count_and_output_shapes(name):
  genotype = get_genotype(name)
  expected = imagenet_params(genotype, 48, 1000, 14)
  if name == "DARTS_V2":
    assert 4.6e6 < expected[0] < 4.8e6  # The paper's "4.7M".
  model = networks.NetworkImageNet(genotype, 48, 1000, 14, True)
  logits, logits_aux = assert_counts(model, (2, 224, 224, 3), expected)
  # The auxiliary head sees the 7x7 map after the second reduction.
  assert logits.shape == logits_aux.shape == (2, 1000)


@pytest.mark.parametrize("name", ["DARTS_V2", "NASNet", "AmoebaNet"])
def test_tiny_cifar_param_count(name):
  # NASNet and AmoebaNet cover 5-node cells, 7x7 ops and concats of 3 and 5 states.
  genotype = get_genotype(name)
  assert_counts(networks.NetworkCIFAR(genotype, 4, 10, 3, True), (1, 8, 8, 1),
                cifar_params(genotype, 4, 10, 3, in_channels=1))


def random_variables(model, x_shape, seed=0):
  """Variables with the shapes of ``model.init``, filled from numpy without compiling
  the initialisers: params N(0, 0.3^2), BN means 0 and variances 1."""
  _, shapes = init_shapes(model, x_shape)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == "mean":
      return jnp.zeros(leaf.shape)
    if name == "var":
      return jnp.ones(leaf.shape)
    return jnp.asarray(rng.normal(0.0, 0.3, leaf.shape), jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def test_tiny_network_cifar_forward_train_and_eval():
  model = networks.NetworkCIFAR(get_genotype("DARTS_V2"), 4, 10, 3, True,
                                drop_path_prob=0.2)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 8, 8, 1)), jnp.float32)
  variables = random_variables(model, x.shape)

  @jax.jit
  def train_step(variables, x, rng, rate):
    # A traced rate overrides the attribute, as an epoch schedule would.
    return model.apply(variables, x, True, rate, rngs={"drop_path": rng},
                       mutable=["batch_stats"])

  (logits, logits_aux), updated = train_step(variables, x, jax.random.key(2), 0.1)
  assert logits.shape == logits_aux.shape == (2, 10)
  assert np.all(np.isfinite(logits)) and np.all(np.isfinite(logits_aux))
  moved = jax.tree_util.tree_map(lambda a, b: bool(np.any(a != b)),
                                 variables["batch_stats"], updated["batch_stats"])
  assert all(jax.tree_util.tree_leaves(moved))

  # Eval needs no drop_path rng (drop path is off) and has no auxiliary logits.
  logits, logits_aux = jax.jit(lambda v, x: model.apply(v, x, False))(variables, x)
  assert logits.shape == (2, 10) and logits_aux is None
  assert np.all(np.isfinite(logits))


def np_avg_pool_3x3(x):
  """Stride-1 3x3 average over the real pixels of each window (padding excluded)."""
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=np.nan)
  h, w = x.shape[1:3]
  windows = [padded[:, i:i + h, j:j + w] for i in range(3) for j in range(3)]
  return np.nanmean(np.stack(windows), axis=0)


def test_cell_drop_path_drops_non_identity_edges_per_sample():
  # Every node is avg_pool(s0) + skip(s1), and the cell also outputs s0 and s1, so each
  # node can be checked against its two possible training values.
  genotype = LooseGenotype(
      normal=[("avg_pool_3x3", 0), ("skip_connect", 1)] * 4,
      normal_concat=[0, 1, 2, 3, 4, 5], reduce=[], reduce_concat=[])
  cell = networks.Cell(genotype, 3, 5, 4, False, False)
  rng = np.random.default_rng(3)
  batch = 16
  s0 = jnp.asarray(rng.normal(size=(batch, 4, 4, 3)), jnp.float32)
  s1 = jnp.asarray(rng.normal(size=(batch, 4, 4, 5)), jnp.float32)
  variables = jax.eval_shape(lambda: cell.init(jax.random.key(0), s0, s1, False))
  variables = jax.tree_util.tree_map_with_path(
      lambda path, a: jnp.asarray(rng.normal(size=a.shape) if path[-1].key != "var"
                                  else np.ones(a.shape), jnp.float32), variables)

  def split(out):
    out = np.asarray(out, np.float64)
    return out[..., :4], out[..., 4:8], [out[..., 4 * n:4 * n + 4] for n in range(2, 6)]

  out, _ = cell.apply(variables, s0, s1, True, 0.5, rngs={"drop_path": jax.random.key(4)},
                      mutable=["batch_stats"])
  pre0, pre1, nodes = split(out)
  pooled = np_avg_pool_3x3(pre0)
  kept = dropped = 0
  for node in nodes:
    for b in range(batch):
      if np.allclose(node[b], pre1[b], atol=1e-5):
        dropped += 1
      else:
        np.testing.assert_allclose(node[b], pre1[b] + pooled[b] / 0.5, atol=1e-5)
        kept += 1
  assert kept and dropped

  # Evaluation ignores the rate and needs no rng.
  pre0, pre1, nodes = split(cell.apply(variables, s0, s1, False, 0.5))
  for node in nodes:
    np.testing.assert_allclose(node, pre1 + np_avg_pool_3x3(pre0), atol=1e-5)


@pytest.mark.parametrize("head_cls, size", [
    (networks.AuxiliaryHeadCIFAR, 8), (networks.AuxiliaryHeadImageNet, 7),
    (networks.AuxiliaryHeadCIFAR, 2)])
def test_auxiliary_heads_against_numpy(head_cls, size):
  c, num_classes = 6, 3
  x = np.random.default_rng(5).normal(size=(4, size, size, c))
  head = head_cls(c, num_classes)
  variables = random_variables(head, x.shape)
  y, _ = head.apply(variables, jnp.asarray(x, jnp.float32), True, mutable=["batch_stats"])
  p = {k: jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), v)
       for k, v in variables["params"].items()}
  stride = head_cls.pool_stride
  # ReLU, AvgPool2d(5, stride) without padding; a map smaller than 5 is pooled whole.
  window = min(5, size)
  n_out = (size - window) // stride + 1
  h = np.maximum(x, 0.0)
  pooled = np.stack([np.stack([h[:, i * stride:i * stride + window,
                                 j * stride:j * stride + window].mean(axis=(1, 2))
                               for j in range(n_out)], axis=1) for i in range(n_out)], axis=1)

  def bn(v, q):
    axes = tuple(range(v.ndim - 1))
    return (v - v.mean(axes)) / np.sqrt(v.var(axes) + EPS) * q["scale"] + q["bias"]

  h = np.maximum(bn(pooled @ p["conv1"]["kernel"][0, 0], p["bn1"]), 0.0)
  kernel = p["conv2"]["kernel"][:n_out, :n_out]  # Taps that meet the zero-padded map.
  h = np.einsum("nhwc,hwco->no", h, kernel)
  if head_cls is networks.AuxiliaryHeadCIFAR:
    h = bn(h, p["bn2"])
  h = np.maximum(h, 0.0)
  expected = h @ p["classifier"]["kernel"] + p["classifier"]["bias"]
  np.testing.assert_allclose(y, expected, rtol=2e-4, atol=2e-4)


def test_bad_genotypes_and_inputs_raise_value_error():
  v2 = get_genotype("DARTS_V2")
  x = (jnp.zeros((1, 8, 8, 12)), jnp.zeros((1, 8, 8, 12)))

  def abstract_init(module, *args):
    # Tracing is enough to reach the checks; nothing is compiled or computed.
    jax.eval_shape(lambda: module.init(jax.random.key(0), *args))

  def init_cell(genotype, c_prev=12):
    abstract_init(networks.Cell(genotype, 12, c_prev, 4, False, False), *x, False)

  def with_normal(normal, concat=(2, 3, 4, 5)):
    return LooseGenotype(normal, concat, v2.reduce, v2.reduce_concat)

  with pytest.raises(ValueError, match="two \\(op, input\\) pairs per node, got 7"):
    init_cell(with_normal(v2.normal[:7]))
  with pytest.raises(ValueError, match="Unknown operation 'conv_9x9'"):
    init_cell(with_normal((("conv_9x9", 0),) + v2.normal[1:]))
  with pytest.raises(ValueError, match="reads state 3, but node 1"):
    init_cell(with_normal(v2.normal[:2] + (("skip_connect", 3),) + v2.normal[3:]))
  with pytest.raises(ValueError, match="normal_concat"):
    init_cell(with_normal(v2.normal, (2, 6)))
  with pytest.raises(ValueError, match="expects 8 input channels, got 12"):
    init_cell(v2, c_prev=8)
  with pytest.raises(ValueError, match="too large"):
    abstract_init(networks.AuxiliaryHeadCIFAR(4, 10), jnp.zeros((2, 16, 16, 4)), True)
  with pytest.raises(ValueError, match="layers must be at least 1"):
    abstract_init(networks.NetworkCIFAR(v2, 4, 10, 0, False), jnp.zeros((1, 8, 8, 1)), False)
