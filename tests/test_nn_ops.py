"""Tests of nanas_jax.nn.ops against PyTorch's size formulas, float64 numpy oracles and
Flax's Dense."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanas_jax.nn import ops

C = 4
EPS = 1e-5

# (kernel, padding, dilation) per axis of each op's strided layer in the reference
# cnn/operations.py; the output size is PyTorch's (H + 2p - d(k - 1) - 1) // s + 1.
REFERENCE_WINDOWS = {
    "avg_pool_3x3": (3, 1, 1),
    "max_pool_3x3": (3, 1, 1),
    "sep_conv_3x3": (3, 1, 1),
    "sep_conv_5x5": (5, 2, 1),
    "sep_conv_7x7": (7, 3, 1),
    "dil_conv_3x3": (3, 2, 2),
    "dil_conv_5x5": (5, 4, 2),
    "conv_7x1_1x7": (7, 3, 1),
    "skip_connect": (1, 0, 1),  # Identity at stride 1, two 1x1 stride-2 convs at stride 2.
}


def torch_out_size(size, kernel, padding, dilation, stride):
  return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def init_random(module, x, seed=0):
  """Variables with the shapes of ``module.init`` on ``x``, filled from numpy without
  compiling the initialisers: params N(0, 0.5^2) (so BatchNorm scales and biases are not
  the trivial 1 and 0), running means 0, running variances 1."""
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), x, True))
  rng = np.random.default_rng(seed)
  params = jax.tree_util.tree_map(
      lambda a: jnp.asarray(rng.normal(0.0, 0.5, a.shape), jnp.float32), shapes["params"])
  stats = jax.tree_util.tree_map_with_path(
      lambda path, a: jnp.full(a.shape, 0.0 if path[-1].key == "mean" else 1.0),
      shapes["batch_stats"])
  return {"params": params, "batch_stats": stats}


def np_conv(x, w, stride=(1, 1), padding=((0, 0), (0, 0)), dilation=1, groups=1):
  """Direct float64 convolution of NHWC ``x`` with an HWIO kernel: a sum over taps."""
  x = np.pad(np.asarray(x, np.float64), ((0, 0), padding[0], padding[1], (0, 0)))
  w = np.asarray(w, np.float64)
  kh, kw, cin_group, cout = w.shape
  ho = (x.shape[1] - dilation * (kh - 1) - 1) // stride[0] + 1
  wo = (x.shape[2] - dilation * (kw - 1) - 1) // stride[1] + 1
  cout_group = cout // groups
  out = np.zeros((x.shape[0], ho, wo, cout))
  for g in range(groups):
    xg = x[..., g * cin_group:(g + 1) * cin_group]
    outs = slice(g * cout_group, (g + 1) * cout_group)
    for i in range(kh):
      for j in range(kw):
        r, c = i * dilation, j * dilation
        patch = xg[:, r:r + stride[0] * (ho - 1) + 1:stride[0],
                   c:c + stride[1] * (wo - 1) + 1:stride[1], :]
        out[..., outs] += patch @ w[i, j, :, outs]
  return out


def np_bn_train(x, p):
  """BatchNorm with batch statistics (biased variance), then scale and bias."""
  mean = x.mean(axis=(0, 1, 2))
  var = x.var(axis=(0, 1, 2))
  return (x - mean) / np.sqrt(var + EPS) * np.asarray(p["scale"]) + np.asarray(p["bias"])


def relu(x):
  return np.maximum(x, 0.0)


def np_window_pool(x, stride, reduce):
  """3x3 pooling with padding 1 over the real pixels of each window only."""
  n, h, w, c = x.shape
  ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
  out = np.zeros((n, ho, wo, c))
  for i in range(ho):
    for j in range(wo):
      r0, c0 = i * stride - 1, j * stride - 1
      window = x[:, max(r0, 0):r0 + 3, max(c0, 0):c0 + 3, :]
      out[:, i, j, :] = reduce(window, axis=(1, 2))
  return out


@pytest.mark.parametrize("size", [7, 8])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("name", sorted(ops.OPS))
def test_output_shape_matches_pytorch_formula(name, stride, size):
  x = jax.ShapeDtypeStruct((2, size, size + 2, C), jnp.float32)
  module = ops.make_op(name, C, stride)
  if name == "skip_connect" and stride == 2 and size % 2:
    # The reference concatenates paths of sizes 4 and 3 here and fails; so do we.
    with pytest.raises(ValueError, match="even spatial"):
      jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros(x.shape), True))
    return
  y, _ = jax.eval_shape(lambda: module.init_with_output(
      jax.random.key(0), jnp.zeros(x.shape), True))
  if name == "none":
    expected = ((size - 1) // stride + 1, (size + 1) // stride + 1)  # x[::s, ::s]
  else:
    k, p, d = REFERENCE_WINDOWS[name]
    expected = tuple(torch_out_size(s, k, p, d, stride) for s in (size, size + 2))
  assert y.shape == (2,) + expected + (C,)


@pytest.mark.parametrize("stride", [1, 2])
def test_pools_against_numpy(stride):
  x = np.random.default_rng(1).normal(size=(2, 7, 6, 3))
  avg = ops.AvgPool3x3(stride).apply({}, jnp.asarray(x, jnp.float32), True)
  mx = ops.MaxPool3x3(stride).apply({}, jnp.asarray(x, jnp.float32), True)
  np.testing.assert_allclose(avg, np_window_pool(x, stride, np.mean), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(mx, np_window_pool(x, stride, np.max), rtol=1e-6, atol=1e-6)
  # Corner windows hold 4 real pixels: with count_include_pad=True it would be sum / 9.
  np.testing.assert_allclose(avg[:, 0, 0], x[:, :2, :2].mean(axis=(1, 2)), rtol=1e-5)


def test_zero_op():
  x = jnp.ones((2, 7, 8, C))
  np.testing.assert_array_equal(ops.Zero(1).apply({}, x, True), np.zeros((2, 7, 8, C)))
  np.testing.assert_array_equal(ops.Zero(2).apply({}, x, True), np.zeros((2, 4, 4, C)))


def test_identity_op():
  x = jnp.arange(2 * 3 * 3 * C, dtype=jnp.float32).reshape(2, 3, 3, C)
  np.testing.assert_array_equal(ops.make_op("skip_connect", C, 1).apply({}, x, False), x)


def test_factorized_reduce_against_numpy():
  x = np.random.default_rng(2).normal(size=(2, 8, 6, 3))
  module = ops.FactorizedReduce(3, 6)
  variables = init_random(module, jnp.asarray(x, jnp.float32))
  y, updated = module.apply(variables, jnp.asarray(x, jnp.float32), True,
                            mutable=["batch_stats"])
  p = variables["params"]
  # PyTorch: cat(conv_1(relu x), conv_2(relu x[:, :, 1:, 1:])), 1x1 stride-2 convs, i.e.
  # the even pixels through conv_1 and the odd ones through conv_2.
  a = relu(x)[:, 0::2, 0::2, :] @ np.asarray(p["conv_1"]["kernel"][0, 0], np.float64)
  b = relu(x)[:, 1::2, 1::2, :] @ np.asarray(p["conv_2"]["kernel"][0, 0], np.float64)
  cat = np.concatenate([a, b], axis=-1)
  np.testing.assert_allclose(y, np_bn_train(cat, p["bn"]), rtol=1e-4, atol=1e-4)
  # Running statistics move 10% of the way to the batch statistics (PyTorch momentum 0.1,
  # the running variance from the unbiased batch variance).
  stats = updated["batch_stats"]["bn"]
  np.testing.assert_allclose(stats["mean"], 0.1 * cat.mean(axis=(0, 1, 2)), rtol=1e-4,
                             atol=1e-6)
  np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * cat.reshape(-1, cat.shape[-1]).var(
      axis=0, ddof=1), rtol=1e-4)


def np_sep_conv(x, p, stride, pad):
  c = x.shape[-1]
  pads = ((pad, pad), (pad, pad))
  y = np_conv(relu(x), p["depthwise1"]["kernel"], (stride, stride), pads, groups=c)
  y = np_bn_train(np_conv(y, p["pointwise1"]["kernel"]), p["bn1"])
  y = np_conv(relu(y), p["depthwise2"]["kernel"], (1, 1), pads, groups=c)
  return np_bn_train(np_conv(y, p["pointwise2"]["kernel"]), p["bn2"])


def np_dil_conv(x, p, stride, pad, dilation):
  pads = ((pad, pad), (pad, pad))
  y = np_conv(relu(x), p["depthwise"]["kernel"], (stride, stride), pads, dilation,
              groups=x.shape[-1])
  return np_bn_train(np_conv(y, p["pointwise"]["kernel"]), p["bn"])


def np_conv_7x1_1x7(x, p, stride):
  y = np_conv(relu(x), p["conv_1x7"]["kernel"], (1, stride), ((0, 0), (3, 3)))
  y = np_conv(y, p["conv_7x1"]["kernel"], (stride, 1), ((3, 3), (0, 0)))
  return np_bn_train(y, p["bn"])


ORACLES = {
    "sep_conv_3x3": lambda x, p, s: np_sep_conv(x, p, s, 1),
    "sep_conv_5x5": lambda x, p, s: np_sep_conv(x, p, s, 2),
    "sep_conv_7x7": lambda x, p, s: np_sep_conv(x, p, s, 3),
    "dil_conv_3x3": lambda x, p, s: np_dil_conv(x, p, s, 2, 2),
    "dil_conv_5x5": lambda x, p, s: np_dil_conv(x, p, s, 4, 2),
    "conv_7x1_1x7": np_conv_7x1_1x7,
}


@pytest.mark.parametrize("name, stride, size", [
    ("sep_conv_3x3", 1, 8), ("sep_conv_5x5", 2, 7), ("dil_conv_3x3", 2, 8),
    ("dil_conv_5x5", 1, 7), ("conv_7x1_1x7", 2, 7)])
def test_conv_ops_against_float64_numpy(name, stride, size):
  x = np.random.default_rng(3).normal(size=(2, size, size, C))
  module = ops.make_op(name, C, stride)
  variables = init_random(module, jnp.asarray(x, jnp.float32))
  y, _ = module.apply(variables, jnp.asarray(x, jnp.float32), True, mutable=["batch_stats"])
  expected = ORACLES[name](x, variables["params"], stride)
  np.testing.assert_allclose(y, expected, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("name, stride, size", [
    ("sep_conv_3x3", 1, 8), ("sep_conv_3x3", 2, 7), ("sep_conv_5x5", 2, 8),
    ("sep_conv_7x7", 1, 6), ("dil_conv_3x3", 2, 7), ("dil_conv_5x5", 1, 8),
    ("dil_conv_5x5", 2, 4)])
def test_taps_depthwise_ops_equal_the_float64_oracle_and_the_grouped_conv(name, stride, size):
  """'taps' holds the grouped convolution's parameters (the same tree, the same
  initialisation) and computes the float64 oracle; its hand-written gradient equals the
  grouped convolution's, for the input and every parameter."""
  x = np.random.default_rng(5).normal(size=(3, size, size, C))
  xj = jnp.asarray(x, jnp.float32)
  grouped, taps = (ops.make_op(name, C, stride, depthwise_impl=impl) for impl in ("conv", "taps"))
  variables = init_random(grouped, xj)
  shapes = lambda v: jax.tree.map(lambda a: a.shape, v)
  assert shapes(jax.eval_shape(lambda: taps.init(jax.random.key(0), xj, True))) == shapes(
      variables)
  for a, b in zip(jax.tree.leaves(grouped.init(jax.random.key(1), xj, True)),
                  jax.tree.leaves(taps.init(jax.random.key(1), xj, True))):
    np.testing.assert_array_equal(a, b)
  y, _ = taps.apply(variables, xj, True, mutable=["batch_stats"])
  np.testing.assert_allclose(y, ORACLES[name](x, variables["params"], stride),
                             rtol=2e-4, atol=2e-4)

  def loss(module, params, inputs):
    out, _ = module.apply({**variables, "params": params}, inputs, True,
                          mutable=["batch_stats"])
    return jnp.sum(jnp.sin(out))

  expected = jax.grad(functools.partial(loss, grouped), argnums=(0, 1))(
      variables["params"], xj)
  got = jax.grad(functools.partial(loss, taps), argnums=(0, 1))(variables["params"], xj)
  for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)


def test_depthwise_impls_resolve_and_bad_ones_fail():
  assert ops.resolve_depthwise_impl("auto") == "taps"  # The suite runs on a CPU.
  assert ops.resolve_depthwise_impl("conv") == "conv"
  with pytest.raises(ValueError, match="Unknown depthwise implementation 'cudnn'"):
    ops.resolve_depthwise_impl("cudnn")
  with pytest.raises(ValueError, match="expected 'conv' or 'taps'"):
    ops.depthwise_conv(C, 3, "d", 1, 1, 1, "auto")
  with pytest.raises(ValueError, match=r"'taps' computes 'same' padding \(2 for a 5x5 kernel "
                     r"at dilation 1\), not 1"):
    ops.depthwise_conv(C, 5, "d", 1, 1, 1, "taps")


def test_relu_conv_bn_eval_uses_running_statistics():
  x = np.random.default_rng(4).normal(size=(2, 5, 5, 3))
  module = ops.ReLUConvBN(3, C, 3, 2, 1)
  variables = init_random(module, jnp.asarray(x, jnp.float32))
  stats = {"bn": {"mean": jnp.full((C,), 0.5), "var": jnp.full((C,), 4.0)}}
  y = module.apply({**variables, "batch_stats": stats}, jnp.asarray(x, jnp.float32), False)
  p = variables["params"]
  conv = np_conv(relu(x), p["conv"]["kernel"], (2, 2), ((1, 1), (1, 1)))
  expected = (conv - 0.5) / np.sqrt(4.0 + EPS) * np.asarray(p["bn"]["scale"]) + np.asarray(
      p["bn"]["bias"])
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


def test_affine_false_has_no_bn_params():
  variables = jax.eval_shape(lambda: ops.make_op("sep_conv_3x3", C, 1, affine=False).init(
      jax.random.key(0), jnp.zeros((1, 4, 4, C)), True))
  assert "bn1" not in variables["params"] and "bn2" not in variables["params"]
  assert set(variables["batch_stats"]) == {"bn1", "bn2"}


def test_drop_path_keeps_or_zeroes_whole_samples_unbiased():
  rate, n = 0.3, 20000
  x = jnp.full((n, 2, 2, 1), 3.0)
  y = np.asarray(jax.jit(ops.drop_path)(x, rate, jax.random.key(5)))
  per_sample = y.reshape(n, -1)
  assert np.all(per_sample == per_sample[:, :1])  # One draw per sample.
  kept = per_sample[:, 0] != 0
  np.testing.assert_allclose(per_sample[kept, 0], 3.0 / 0.7, rtol=1e-6)
  keep_std = np.sqrt(0.7 * 0.3 / n)
  assert abs(kept.mean() - 0.7) < 5 * keep_std
  # Unbiased: the mean equals the input up to five standard errors.
  assert abs(y.mean() - 3.0) < 5 * (3.0 / 0.7) * keep_std


def test_bad_input_raises_value_error():
  with pytest.raises(ValueError, match="Unknown operation 'conv_9x9'"):
    ops.make_op("conv_9x9", C, 1)
  with pytest.raises(ValueError, match="stride"):
    ops.make_op("sep_conv_3x3", C, 3)
  with pytest.raises(ValueError, match="expects 4 input channels, got 3"):
    jax.eval_shape(lambda: ops.make_op("sep_conv_3x3", C, 1).init(
        jax.random.key(0), jnp.zeros((1, 4, 4, 3)), True))
  with pytest.raises(ValueError, match="even C_out"):
    jax.eval_shape(lambda: ops.FactorizedReduce(C, 5).init(
        jax.random.key(0), jnp.zeros((1, 4, 4, C)), True))


def test_classifier_is_flax_dense_in_float32_and_sums_its_bias_gradient_in_float32():
  """`ops.Classifier` against Flax's ``Dense`` (the oracle) in float32: the same
  parameters, output and gradients, bit for bit. With bfloat16 inputs and parameters (the
  search's ``config.dtype``), its output is float32 and its bias's gradient, a sum over
  the batch, is the float64 sum of the output's cotangent within one bfloat16 rounding;
  ``Dense``'s, a bfloat16 sum, misses that tolerance (checked, so the check can fail)."""
  rng = np.random.default_rng(3)
  x = rng.normal(size=(256, 32)).astype(np.float32)
  cot = rng.normal(size=(256, 10)).astype(np.float32)
  init = jax.nn.initializers.normal(0.5)
  ours = ops.Classifier(10, init, init)
  dense = nn.Dense(10, kernel_init=init, bias_init=init)

  def value_and_grads(module, variables, x):
    loss = lambda v, x: jnp.sum(module.apply(v, x).astype(jnp.float32) * cot)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(variables, x)

  variables = ours.init(jax.random.key(0), x)
  assert jax.tree.map(np.shape, variables) == jax.tree.map(
      np.shape, dense.init(jax.random.key(0), x))
  for a, b in zip(jax.tree.leaves(value_and_grads(ours, variables, x)),
                  jax.tree.leaves(value_and_grads(dense, variables, x))):
    np.testing.assert_array_equal(a, b)
  to_bf16 = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), tree)
  want = cot.astype(np.float64).sum(0)
  for module, close in ((ours, True), (dense, False)):
    assert module.apply(to_bf16(variables), to_bf16(x)).dtype == (
        jnp.float32 if close else jnp.bfloat16)
    _, (grads, _) = value_and_grads(module, to_bf16(variables), to_bf16(x))
    got = np.asarray(grads["params"]["bias"].astype(jnp.float32), np.float64)
    assert np.allclose(got, want, rtol=2**-8, atol=0) == close
