"""Tests of nanas_jax.nn.functional against float64 numpy loops written from the
definitions (PyTorch's 'same'-padded depthwise conv, pools, FactorizedReduce, BatchNorm).

Tiny sizes, and most calls eager: XLA compiles slowly on the test machines. Where a
test compares every depthwise implementation's gradient, each is compiled as one program,
which took half as long as running its operations eagerly."""

import collections
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanas_jax.nn import functional as F
from jaxprs import all_eqns, layout_constraints

# float32 results against float64 oracles.
ATOL = 1e-5
RTOL = 1e-5
# (kernel size, dilation) of the DARTS depthwise convs: sep3, sep5, dil3, dil5.
DW_CONFIGS = ((3, 1), (5, 1), (3, 2), (5, 2))


def _rand(rng, *shape):
  return rng.normal(size=shape).astype(np.float32)


# ---------------------------------------------------------------------------------------
# numpy oracles: direct loops over output positions and taps.

def np_out_size(size, k, stride, dilation, pad):
  """PyTorch's conv/pool output size."""
  return (size + 2 * pad - dilation * (k - 1) - 1) // stride + 1


def np_depthwise(x, kernel, stride, dilation):
  """Depthwise conv of ``x[*lead, B, H, W, C]`` with ``kernel[*lead, k, k, C]``, padding
  ``dilation * (k - 1) // 2`` (the DARTS ops), as a loop over outputs and taps."""
  x = np.asarray(x, np.float64)
  kernel = np.asarray(kernel, np.float64)
  k = kernel.shape[-2]
  pad = dilation * (k - 1) // 2
  h, w, c = x.shape[-3:]
  ho = np_out_size(h, k, stride, dilation, pad)
  wo = np_out_size(w, k, stride, dilation, pad)
  xp = np.pad(x, [(0, 0)] * (x.ndim - 3) + [(pad, pad), (pad, pad), (0, 0)])
  out = np.zeros(x.shape[:-3] + (ho, wo, c))
  for i, j, a, b in itertools.product(range(ho), range(wo), range(k), range(k)):
    tap = np.expand_dims(kernel[..., a, b, :], -2)  # [*lead, 1, C]: broadcast over B
    out[..., i, j, :] += xp[..., i * stride + a * dilation, j * stride + b * dilation, :] * tap
  return out


def np_depthwise_grads(x, kernel, cotangent, stride, dilation):
  """Gradients of ``sum(np_depthwise(x, kernel) * cotangent)`` w.r.t. ``x`` and ``kernel``
  (the output is linear in each, so these are the same loops, scattered)."""
  x = np.asarray(x, np.float64)
  kernel = np.asarray(kernel, np.float64)
  cotangent = np.asarray(cotangent, np.float64)
  k = kernel.shape[-2]
  pad = dilation * (k - 1) // 2
  ho, wo = cotangent.shape[-3:-1]
  xp = np.pad(x, [(0, 0)] * (x.ndim - 3) + [(pad, pad), (pad, pad), (0, 0)])
  gxp = np.zeros_like(xp)
  gk = np.zeros_like(kernel)
  batch_axis = x.ndim - 4
  for i, j, a, b in itertools.product(range(ho), range(wo), range(k), range(k)):
    r, s = i * stride + a * dilation, j * stride + b * dilation
    g = cotangent[..., i, j, :]  # [*lead, B, C]
    gxp[..., r, s, :] += g * np.expand_dims(kernel[..., a, b, :], -2)
    gk[..., a, b, :] += (xp[..., r, s, :] * g).sum(axis=batch_axis)
  h, w = x.shape[-3:-1]
  return gxp[..., pad:pad + h, pad:pad + w, :], gk


def np_pool(x, stride, kind):
  """3x3 pool with padding 1: max ignores the padding; avg divides by the real pixels."""
  x = np.asarray(x, np.float64)
  h, w = x.shape[-3:-1]
  ho, wo = np_out_size(h, 3, stride, 1, 1), np_out_size(w, 3, stride, 1, 1)
  out = np.zeros(x.shape[:-3] + (ho, wo, x.shape[-1]))
  for i, j in itertools.product(range(ho), range(wo)):
    r0, r1 = max(i * stride - 1, 0), min(i * stride + 2, h)
    c0, c1 = max(j * stride - 1, 0), min(j * stride + 2, w)
    window = x[..., r0:r1, c0:c1, :]
    if kind == "max":
      out[..., i, j, :] = window.max(axis=(-3, -2))
    else:
      out[..., i, j, :] = window.sum(axis=(-3, -2)) / ((r1 - r0) * (c1 - c0))
  return out


# ---------------------------------------------------------------------------------------
# Depthwise convolutions.

def test_resolve_depthwise_impl(monkeypatch):
  for impl in ("taps", "scan", "conv", "conv_each", "taps_fused"):
    assert F.resolve_depthwise_impl(impl, pixels=10**6) == impl
  cpu = jax.default_backend() == "cpu"
  # On a CPU, 'taps' from TAPS_MIN_PIXELS input pixels (batch x height x width) on.
  assert F.resolve_depthwise_impl("auto") == ("scan" if cpu else "conv")
  assert F.resolve_depthwise_impl("auto", F.TAPS_MIN_PIXELS - 1) == ("scan" if cpu else "conv")
  assert F.resolve_depthwise_impl("auto", F.TAPS_MIN_PIXELS) == ("taps" if cpu else "conv")
  # CIFAR-sized (a cell's inner nodes unrolled, NA-DARTS's neighbors in one program) from
  # larger batches on.
  assert F.TAPS_MIN_PIXELS < F.CIFAR_MIN_PIXELS
  assert [F.cifar_sized(p) for p in (None, F.CIFAR_MIN_PIXELS - 1, F.CIFAR_MIN_PIXELS)] == [
      False, False, True]
  for bad in ("Scan", "grouped", "dense", ""):
    with pytest.raises(ValueError, match="Unknown depthwise implementation"):
      F.resolve_depthwise_impl(bad)
  with pytest.raises(ValueError, match="Unknown depthwise implementation"):
    F.depthwise_convs(jnp.zeros((1, 1, 4, 4, 2)), [jnp.zeros((3, 3, 2))], [1], impl="fast")
  # On accelerators, whatever the batch: a convolution a dilation on a GPU, a kernel on a
  # TPU.
  for backend, impl in (("gpu", "conv"), ("tpu", "conv_each")):
    monkeypatch.setattr(jax, "default_backend", lambda backend=backend: backend)
    assert {F.resolve_depthwise_impl("auto", p) for p in (None, 1, 10**6)} == {impl}


def test_accelerator_kernels_are_the_conv_and_taps_fused_depthwise_convs():
  assert jax.default_backend() == "cpu"
  assert [F.accelerator_kernels(impl) for impl in (
      "auto", "scan", "taps", "conv", "conv_each", "taps_fused")] == [
          False, False, False, True, True, True]
  with pytest.raises(ValueError, match="Unknown depthwise implementation 'dense'"):
    F.accelerator_kernels("dense")


# XLA's TPU estimate of one search cell's gradient (DARTS, v5e chip, float32, ms) with
# each axis pinned minor, at the 7 shapes measured (batch, width, channels);
# benchmarks/README.md, "A TPU layout for the search cells".
MEASURED_CELL_MS = {
    (64, 32, 16): {"batch": 46.880, "width": 82.456, "channels": 150.265},
    (64, 16, 32): {"batch": 20.133, "width": 68.442, "channels": 38.196},
    (64, 8, 64): {"batch": 9.951, "width": 63.142, "channels": 9.694},
    (16, 32, 8): {"batch": 18.101, "width": 10.304, "channels": 33.493},
    (16, 16, 16): {"batch": 9.809, "width": 10.060, "channels": 9.712},
    (16, 8, 32): {"batch": 3.823, "width": 7.215, "channels": 2.401},
    (64, 8, 8): {"batch": 1.766, "width": 7.001},
}


@pytest.mark.parametrize("shape", sorted(MEASURED_CELL_MS))
def test_tpu_lane_axis_is_the_fastest_measured_within_3_percent(shape):
  times = MEASURED_CELL_MS[shape]
  assert times[F.tpu_lane_axis(*shape)] <= 1.03 * min(times.values())


def test_tpu_lane_axis_pads_least_ties_to_the_channels_then_the_batch():
  # Padding to 128 lanes: 200 rows pad to 256 (1.28x), 96 channels to 128 (1.33x).
  assert F.tpu_lane_axis(200, 32, 96) == "batch"
  assert F.tpu_lane_axis(64, 32, 96) == "channels"
  assert F.tpu_lane_axis(8, 32, 16) == "width"
  assert F.tpu_lane_axis(256, 128, 128) == "channels"
  assert F.tpu_lane_axis(256, 128, 24) == "batch"


def test_tpu_layout_pins_the_tpus_implementation_only(monkeypatch):
  x = jax.random.normal(jax.random.key(0), (3, 64, 32, 32, 16))
  y = jnp.zeros((128, 8, 8, 64))
  for impl in ("auto", "scan", "taps", "conv", "taps_fused"):  # 'auto' on this CPU
    assert F.tpu_layout(x, impl) is x
  pins = lambda a: layout_constraints(
      jax.make_jaxpr(lambda a: F.tpu_layout(a, "conv_each"))(a).jaxpr)
  # One device: 64 rows a device pad 2x, the width 4x, the channels 8x: the batch minor,
  # the channels on the sublanes, the lead axis major. Without a lead axis, the same (128
  # rows against 64 channels).
  assert pins(x) == [(0, 2, 3, 4, 1)]
  assert pins(y) == [(1, 2, 3, 0)]
  # The batch split over 4 devices: 16 rows a device pad 8x, so the width goes minor;
  # where the channels pad least (64 of them against 32 rows), XLA's own layout is left
  # alone.
  monkeypatch.setattr(jax, "device_count", lambda: 4)
  assert pins(x) == [(0, 1, 2, 4, 3)]
  assert pins(y) == []


def test_tpu_layout_keeps_values_and_gradients():
  """Pinned, an array and its cotangent keep their values, under jit, grad and vmap."""
  x = jax.random.normal(jax.random.key(0), (2, 3, 8, 8, 4))
  f = lambda x: jnp.sin(F.tpu_layout(jnp.cos(x), "conv_each"))
  np.testing.assert_array_equal(jax.jit(f)(x), jnp.sin(jnp.cos(x)))
  np.testing.assert_allclose(jax.jit(jax.grad(lambda x: f(x).sum()))(x),
                             -jnp.cos(jnp.cos(x)) * jnp.sin(x), rtol=1e-6)
  np.testing.assert_array_equal(jax.jit(jax.vmap(f))(x), jnp.sin(jnp.cos(x)))
  np.testing.assert_array_equal(f(x), jnp.sin(jnp.cos(x)))  # eager


def test_output_size_matches_pytorch_rule():
  for size, stride in itertools.product(range(1, 12), (1, 2)):
    for k, d in DW_CONFIGS:
      assert F.output_size(size, stride) == np_out_size(size, k, stride, d,
                                                        d * (k - 1) // 2)


IMPLS = ("scan", "conv", "conv_each", "taps", "taps_fused")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(8, 8), (7, 5)])
def test_one_depthwise_conv_matches_numpy(impl, stride, size):
  """`depthwise_convs` with a single kernel, per edge of a leading axis and without one."""
  rng = np.random.default_rng([stride, *size, IMPLS.index(impl)])
  h, w = size
  e, b, c = 2, 3, 4
  for k, d in DW_CONFIGS:
    # A leading edge axis with one kernel per edge; the kernel axis after it.
    x = _rand(rng, e, b, h, w, c)
    kernel = _rand(rng, e, k, k, c)
    got = F.depthwise_convs(jnp.asarray(x)[:, None], [jnp.asarray(kernel)], [d],
                            stride=stride, impl=impl)[:, 0]
    np.testing.assert_allclose(got, np_depthwise(x, kernel, stride, d), atol=ATOL,
                               rtol=RTOL, err_msg=f"k={k} d={d}")
  # No leading axis.
  x, kernel = _rand(rng, b, h, w, c), _rand(rng, 5, 5, c)
  got = F.depthwise_convs(jnp.asarray(x)[None], [jnp.asarray(kernel)], [2], stride=stride,
                          impl=impl)[0]
  np.testing.assert_allclose(got, np_depthwise(x, kernel, stride, 2), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(8, 8), (7, 5)])
def test_depthwise_convs_matches_numpy(impl, stride, size):
  rng = np.random.default_rng([stride, *size, IMPLS.index(impl), 1])
  h, w = size
  e, b, c = 2, 3, 4
  n = len(DW_CONFIGS)
  kernels = [_rand(rng, e, k, k, c) for k, _ in DW_CONFIGS]
  dilations = [d for _, d in DW_CONFIGS]
  # Shared input (G = 1) and one input per kernel (G = n).
  for g in (1, n):
    x = _rand(rng, e, g, b, h, w, c)
    got = F.depthwise_convs(jnp.asarray(x), [jnp.asarray(k) for k in kernels], dilations,
                            stride=stride, impl=impl)
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    assert got.shape == (e, n, b, ho, wo, c)
    for i, (kernel, d) in enumerate(zip(kernels, dilations)):
      want = np_depthwise(x[:, i if g == n else 0], kernel, stride, d)
      np.testing.assert_allclose(got[:, i], want, atol=ATOL, rtol=RTOL,
                                 err_msg=f"G={g} kernel {i}")


def test_conv_depthwise_convs_pad_inside_one_convolution_a_dilation():
  """``'conv'`` makes each run of kernels with one dilation one convolution (the 3x3
  kernel zero-padded to 5x5 beside the 5x5 one) and hands it the padding: forward and
  backward, nothing pads or slices an input's spatial axes (a shared padded input sliced
  per kernel cost XLA's GPU program a third of its distinct convolutions). ``'conv_each'``
  makes each kernel a convolution, and pads nothing at all."""
  kernels = [jnp.zeros((2, k, k, 4)) for k, _ in DW_CONFIGS]
  dilations = [d for _, d in DW_CONFIGS]
  runs = len(set(dilations))
  assert runs == 2 and len(kernels) == 4
  for impl, calls in (("conv", runs), ("conv_each", len(kernels))):
    for inputs in (1, len(kernels)):
      x = jnp.zeros((2, inputs, 3, 8, 8, 4))

      def loss(x, kernels, impl=impl):
        return F.depthwise_convs(x, kernels, dilations, stride=2, impl=impl).sum()

      eqns = list(all_eqns(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, kernels).jaxpr))
      # Forward, input gradient and kernel gradient: 3 convolutions a call.
      assert sum(e.primitive.name == "conv_general_dilated" for e in eqns) == 3 * calls
      resized = [e for e in eqns if e.primitive.name in ("pad", "slice")
                 and e.invars[0].aval.shape[-3:-1] != e.outvars[0].aval.shape[-3:-1]]
      # With 'conv', only the 3x3 kernels, centred in 5x5 and their gradients cut back out.
      assert sorted((e.invars[0].aval.shape, e.outvars[0].aval.shape) for e in resized) == (
          [((2, 3, 3, 4), (2, 5, 5, 4))] * 2 + [((2, 5, 5, 4), (2, 3, 3, 4))] * 2
          if impl == "conv" else [])


def test_taps_fused_calls_no_convolution_and_loops_over_nothing():
  """``'taps_fused'``, forward and backward, holds no convolution (nothing for cuDNN on a
  GPU) and no loop (its kernel gradient is one reduction a kernel, where ``'taps'`` loops
  over chunks of the batch)."""
  kernels = [jnp.zeros((2, k, k, 4)) for k, _ in DW_CONFIGS]
  dilations = [d for _, d in DW_CONFIGS]
  x = jnp.zeros((2, 1, 8, 8, 8, 4))

  def primitives(impl):
    def loss(x, kernels):
      return F.depthwise_convs(x, kernels, dilations, stride=2, impl=impl).sum()
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, kernels)
    return collections.Counter(eqn.primitive.name for eqn in all_eqns(jaxpr.jaxpr))

  fused, chunked = primitives("taps_fused"), primitives("taps")
  assert fused["conv_general_dilated"] == 0 and fused["scan"] == fused["while"] == 0
  # One sum a kernel gradient, and the loss's.
  assert fused["reduce_sum"] == len(kernels) + 1
  # The control: 'taps' loops over the batch, a loop a kernel, with one reduction of its
  # k * k taps' products in each (a variadic reduce: one pass over the chunk).
  assert chunked["scan"] == len(kernels)
  assert chunked["reduce"] == len(kernels) and fused["reduce"] == 0


def test_depthwise_convs_rejects_wrong_input_count():
  kernels = [jnp.zeros((2, 3, 3, 4))] * 3
  with pytest.raises(ValueError, match="3 kernels need 1 or 3 inputs"):
    F.depthwise_convs(jnp.zeros((2, 2, 1, 4, 4, 4)), kernels, [1, 1, 1])


@pytest.mark.parametrize("stride", [1, 2])
def test_depthwise_convs_gradients(stride):
  """Gradients of a random linear functional: 'taps' == 'scan' == 'conv' == 'conv_each' ==
  'taps_fused'
  == the numpy adjoint ('taps' has a hand-written gradient; the batch of 3 makes its
  kernel gradient loop over 3 chunks; 'taps_fused' sums it over the batch at once)."""
  rng = np.random.default_rng(7 + stride)
  e, b, h, w, c = 2, 3, 7, 6, 3
  n = len(DW_CONFIGS)
  kernels = [jnp.asarray(_rand(rng, e, k, k, c)) for k, _ in DW_CONFIGS]
  dilations = [d for _, d in DW_CONFIGS]
  ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
  cot = _rand(rng, e, n, b, ho, wo, c)
  for g in (1, n):
    x = jnp.asarray(_rand(rng, e, g, b, h, w, c))

    def loss(x, kernels, impl):
      y = F.depthwise_convs(x, kernels, dilations, stride=stride, impl=impl)
      return jnp.sum(y * cot)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    grads = {impl: grad(x, kernels, impl) for impl in IMPLS}
    gx_scan, gk_scan = grads["scan"]
    for other in ("taps", "conv", "conv_each", "taps_fused"):
      gx_other, gk_other = grads[other]
      np.testing.assert_allclose(gx_scan, gx_other, atol=1e-4, rtol=1e-5, err_msg=other)
      for i in range(n):
        np.testing.assert_allclose(gk_scan[i], gk_other[i], atol=1e-4, rtol=1e-5,
                                   err_msg=other)
    # The numpy adjoint: the input gradient sums over kernels when the input is shared.
    gx_want = np.zeros((e, g, b, h, w, c))
    for i, (kernel, d) in enumerate(zip(kernels, dilations)):
      gx_i, gk_i = np_depthwise_grads(np.asarray(x)[:, i if g == n else 0], kernel,
                                      cot[:, i], stride, d)
      gx_want[:, i if g == n else 0] += gx_i
      np.testing.assert_allclose(gk_scan[i], gk_i, atol=1e-4, rtol=1e-4,
                                 err_msg=f"G={g} kernel {i}")
    np.testing.assert_allclose(gx_scan, gx_want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", ["taps", "scan", "taps_fused"])
@pytest.mark.parametrize("stride", [1, 2])
def test_hand_written_gradients_in_float64(stride, impl):
  """The hand-written gradients of 'taps', 'scan' and 'taps_fused' at float64 precision
  against the
  numpy adjoint, two leading axes, a batch of 8 (the 'taps' kernel gradient sums two
  chunks of 4), every DARTS kernel with the input shared."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(11 + stride)
    lead, b, h, w, c = (2, 3), 8, 6, 7, 2
    kernels = [jnp.asarray(rng.normal(size=lead + (k, k, c))) for k, _ in DW_CONFIGS]
    dilations = [d for _, d in DW_CONFIGS]
    x = jnp.asarray(rng.normal(size=lead + (1, b, h, w, c)))
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    cot = rng.normal(size=lead + (len(kernels), b, ho, wo, c))
    gx, gk = jax.grad(lambda x, ks: jnp.sum(F.depthwise_convs(
        x, ks, dilations, stride=stride, impl=impl) * cot), argnums=(0, 1))(x, kernels)
    gx_want = np.zeros(x.shape)
    for i, (kernel, d) in enumerate(zip(kernels, dilations)):
      gx_i, gk_i = np_depthwise_grads(np.asarray(x)[:, :, 0], kernel, cot[:, :, i], stride,
                                      d)
      gx_want[:, :, 0] += gx_i
      np.testing.assert_allclose(gk[i], gk_i, rtol=1e-10, atol=1e-10, err_msg=f"kernel {i}")
    np.testing.assert_allclose(gx, gx_want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("impl", ["taps", "scan", "taps_fused"])
def test_kernel_gradient_in_bfloat16_sums_in_float32(impl):
  """bfloat16 inputs (``config.search.dtype``): the kernel gradient over 1024 examples
  stays within bfloat16 rounding of the float64 adjoint of the same values. For 'taps'
  the sum of its 256 chunks is the risk: in bfloat16 it would drift by several percent."""
  rng = np.random.default_rng(31)
  b, h, w, c = 1024, 4, 4, 2
  bf16 = lambda a: jnp.asarray(a, jnp.bfloat16)
  x, kernel = bf16(_rand(rng, 1, b, h, w, c)), bf16(_rand(rng, 3, 3, c))
  cot = bf16(_rand(rng, 1, b, h, w, c))
  grad = jax.grad(lambda k: jnp.sum(F.depthwise_convs(
      x, [k], [1], impl=impl).astype(jnp.float32) * cot))(kernel)
  assert grad.dtype == jnp.bfloat16
  as64 = lambda a: np.asarray(a.astype(jnp.float32), np.float64)
  _, want = np_depthwise_grads(as64(x)[0], as64(kernel), as64(cot)[0], 1, 1)
  np.testing.assert_allclose(as64(grad), want, rtol=0, atol=0.01 * np.abs(want).max())


# ---------------------------------------------------------------------------------------
# Pools, FactorizedReduce, pointwise conv, BatchNorm.

@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(8, 8), (7, 5)])
def test_pools_match_numpy(stride, size):
  rng = np.random.default_rng(stride * 100 + size[1])
  x = _rand(rng, 2, 3, *size, 4)  # a leading edge axis
  np.testing.assert_allclose(F.max_pool_3x3(jnp.asarray(x), stride),
                             np_pool(x, stride, "max"), atol=ATOL, rtol=RTOL)
  for windows in (False, True):
    np.testing.assert_allclose(F.avg_pool_3x3(jnp.asarray(x), stride, windows),
                               np_pool(x, stride, "avg"), atol=ATOL, rtol=RTOL)
  # Padding never wins the max, even when every real pixel is negative.
  neg = -np.abs(x) - 1.0
  np.testing.assert_allclose(F.max_pool_3x3(jnp.asarray(neg[0]), stride),
                             np_pool(neg[0], stride, "max"), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(6, 6), (7, 5)])
def test_avg_pool_as_windows_has_reduce_windows_gradient_in_float64(stride, size):
  """The TPU's average pool (the sum of its 9 windows, no ``reduce_window`` traced) and
  its gradient are the ``reduce_window`` pool's, to float64 rounding."""
  with jax.enable_x64():
    x = jax.random.normal(jax.random.key(stride), (2, 3, *size, 4), jnp.float64)
    g = jax.random.normal(jax.random.key(7), F.avg_pool_3x3(x, stride).shape, jnp.float64)
    outs, grads = zip(*[jax.vjp(lambda x, w=w: F.avg_pool_3x3(x, stride, w), x)
                        for w in (False, True)])
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(grads[1](g)[0], grads[0](g)[0], rtol=1e-13, atol=1e-13)
    traced = {e.primitive.name for e in all_eqns(
        jax.make_jaxpr(jax.vjp(lambda x: F.avg_pool_3x3(x, stride, True), x)[1])(g).jaxpr)}
    assert not any(name.startswith("reduce_window") for name in traced)


def np_max_pool_grad(x, g, stride):
  """Gradient of 3x3 max pooling (padding 1): each output's cotangent to the first
  (row-major) maximum of its window, as PyTorch's max_pool2d backward sends it."""
  h, w = x.shape[-3:-1]
  grad = np.zeros(x.shape)
  for idx in np.ndindex(*x.shape[:-3]):
    for i, j, ch in np.ndindex(*g.shape[-3:]):
      cells = [(i * stride + r - 1, j * stride + c - 1) for r in range(3) for c in range(3)]
      cells = [(p, q) for p, q in cells if 0 <= p < h and 0 <= q < w]
      p, q = max(cells, key=lambda pq: (x[idx + pq + (ch,)], -cells.index(pq)))
      grad[idx + (p, q, ch)] += g[idx + (i, j, ch)]
  return grad


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(6, 6), (7, 5)])
def test_max_pool_gradient_goes_to_the_first_maximum(stride, size):
  rng = np.random.default_rng(stride * 10 + size[1])
  # Rounded: most windows hold tied maxima, where only the first may get the gradient.
  x = np.round(rng.normal(size=(2, 3) + size + (4,)) * 2).astype(np.float32)
  ho, wo = (size[0] - 1) // stride + 1, (size[1] - 1) // stride + 1
  g = _rand(rng, 2, 3, ho, wo, 4)
  grad_fn = lambda x, g: jax.vjp(lambda x: F.max_pool_3x3(x, stride), x)[1](g)[0]
  grad = grad_fn(jnp.asarray(x), jnp.asarray(g))
  np.testing.assert_allclose(grad, np_max_pool_grad(x, g, stride), atol=ATOL, rtol=RTOL)
  # Elementwise windows both ways: no reduce_window, whose gradient XLA:CPU runs slowly.
  program = jax.jit(grad_fn).lower(jnp.asarray(x), jnp.asarray(g)).as_text()
  assert "reduce_window" not in program and "select_and_scatter" not in program
  # The first maximum found by one strict comparison a window after the first, with no
  # chain of boolean operations (which cost a TPU 2.6x the pooling by XLA's estimate).
  eqns = list(all_eqns(jax.make_jaxpr(grad_fn)(jnp.asarray(x), jnp.asarray(g)).jaxpr))
  counts = collections.Counter(e.primitive.name for e in eqns)
  assert counts["gt"] == 8
  assert not {"and", "or", "not"} & set(counts)


def np_factorized_reduce(x, ka, kb):
  """relu, stride-2 1x1 conv of x and of x[1:, 1:], concatenated (PyTorch reference)."""
  x = np.maximum(np.asarray(x, np.float64), 0.0)
  ka, kb = np.asarray(ka, np.float64), np.asarray(kb, np.float64)
  h, w = x.shape[-3:-1]
  ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
  out = np.zeros(x.shape[:-3] + (ho, wo, ka.shape[-1] + kb.shape[-1]))
  for i, j in itertools.product(range(ho), range(wo)):
    for o in range(ka.shape[-1]):
      out[..., i, j, o] = (x[..., 2 * i, 2 * j, :] * np.expand_dims(ka[..., o], -2)).sum(-1)
    for o in range(kb.shape[-1]):
      out[..., i, j, ka.shape[-1] + o] = (
          x[..., 2 * i + 1, 2 * j + 1, :] * np.expand_dims(kb[..., o], -2)).sum(-1)
  return out


def test_factorized_reduce_convs_matches_numpy():
  rng = np.random.default_rng(3)
  e, b, h, w, ci, co = 2, 3, 8, 6, 5, 6
  x = _rand(rng, e, b, h, w, ci)
  ka, kb = _rand(rng, e, ci, co // 2), _rand(rng, e, ci, co - co // 2)
  got = F.factorized_reduce_convs(jnp.asarray(x), jnp.asarray(ka), jnp.asarray(kb))
  assert got.shape == (e, b, h // 2, w // 2, co)
  np.testing.assert_allclose(got, np_factorized_reduce(x, ka, kb), atol=ATOL, rtol=RTOL)
  # No leading axis.
  got = F.factorized_reduce_convs(jnp.asarray(x[0]), jnp.asarray(ka[0]), jnp.asarray(kb[0]))
  np.testing.assert_allclose(got, np_factorized_reduce(x[0], ka[0], kb[0]), atol=ATOL,
                             rtol=RTOL)


@pytest.mark.parametrize("size", [(7, 8), (8, 7), (5, 5)])
def test_factorized_reduce_convs_rejects_odd_sizes(size):
  x = jnp.ones((2, *size, 4))
  with pytest.raises(ValueError, match="even spatial size"):
    F.factorized_reduce_convs(x, jnp.ones((4, 2)), jnp.ones((4, 2)))


@pytest.mark.parametrize("rows, indices, gathers", [
    (3, [0, 1, 2, 0, 1, 2], False),   # all rows in turn, repeated: a broadcast
    (2, [0, 1], False),
    (5, [0, 1, 0, 1], True),          # anything else: a gather
    (5, [2, 3, 4], True),
    (5, [4, 0], True),
])
def test_take_rows_equals_numpy_indexing_and_gathers_only_when_it_must(rows, indices,
                                                                      gathers):
  x = np.random.default_rng(3).normal(size=(rows, 2, 3)).astype(np.float32)
  np.testing.assert_array_equal(F.take_rows(jnp.asarray(x), np.array(indices)),
                                x[np.array(indices)])
  # Its gradient is numpy's scatter-add of the cotangent.
  cot = np.random.default_rng(4).normal(size=(len(indices),) + x.shape[1:])
  grad = jax.grad(lambda a: jnp.sum(F.take_rows(a, np.array(indices)) * cot))(x)
  want = np.zeros_like(x, np.float64)
  np.add.at(want, np.array(indices), cot)
  np.testing.assert_allclose(grad, want, rtol=1e-6, atol=1e-6)
  jaxpr = str(jax.make_jaxpr(lambda a: F.take_rows(a, np.array(indices)))(x))
  assert ("gather" in jaxpr) == gathers, jaxpr
  with pytest.raises(ValueError, match="non-empty 1-D"):
    F.take_rows(jnp.asarray(x), np.array([], int))


@pytest.mark.parametrize("shape, axis", [((3, 2, 4, 5), 0), ((4, 2, 3, 1, 2), 1),
                                         ((1, 6), 0), ((2, 3, 4), 2)])
def test_sum_axis_is_numpy_sum_with_adds_not_a_reduce(shape, axis):
  """`sum_axis` against numpy's float64 sum, its gradient against the broadcast
  cotangent, and no reduce in its program (XLA:CPU would give a reduce to YNNPACK)."""
  rng = np.random.default_rng(len(shape) * 10 + axis)
  x = rng.normal(size=shape)
  with jax.enable_x64(True):
    np.testing.assert_allclose(F.sum_axis(jnp.asarray(x), axis), x.sum(axis), rtol=1e-14)
    cot = rng.normal(size=x.sum(axis).shape)
    grad = jax.grad(lambda a: jnp.sum(F.sum_axis(a, axis) * cot))(jnp.asarray(x))
    np.testing.assert_array_equal(grad, np.broadcast_to(np.expand_dims(cot, axis), shape))
  jaxpr = str(jax.make_jaxpr(lambda a: F.sum_axis(a, axis))(x.astype(np.float32)))
  assert "reduce_sum" not in jaxpr, jaxpr


@pytest.mark.parametrize("lead", [0, 1, 2])
def test_pointwise_conv_matches_einsum(lead):
  rng = np.random.default_rng(lead)
  lead_shape = (2, 3)[:lead]
  x = _rand(rng, *lead_shape, 2, 4, 3, 5)
  kernel = _rand(rng, *lead_shape, 5, 6)
  got = F.pointwise_conv(jnp.asarray(x), jnp.asarray(kernel))
  want = np.einsum("...bhwi,...io->...bhwo", x.astype(np.float64),
                   kernel.astype(np.float64))
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL)


def _gated_cases(rng):
  """``(name, fn(x, kernels), x, kernels)``: the supernet's convolutions, on one leading
  (edge) axis."""
  x = jnp.asarray(_rand(rng, 2, 4, 8, 8, 3))
  depthwise = lambda a, ks: F.depthwise_convs(a[:, None], ks, [1, 2], impl="taps")
  return [
      ("pointwise", F.pointwise_conv, x, jnp.asarray(_rand(rng, 2, 3, 5))),
      ("depthwise", depthwise, x,
       [jnp.asarray(_rand(rng, 2, 3, 3, 3)), jnp.asarray(_rand(rng, 2, 5, 5, 3))]),
      ("factorized", lambda a, ks: F.factorized_reduce_convs(a, *ks), x,
       (jnp.asarray(_rand(rng, 2, 3, 2)), jnp.asarray(_rand(rng, 2, 3, 3)))),
  ]


@pytest.mark.parametrize("case", [0, 1, 2])
def test_kernel_gated_skips_only_the_kernels_gradient_where_told(case):
  """`F.kernel_gated` against the convolution's own gradient (the oracle): the same
  output and input gradient either way; the kernels' gradient where the traced flag
  holds, zeros where not."""
  name, fn, x, kernels = _gated_cases(np.random.default_rng(20 + case))[case]
  cot = jnp.asarray(np.random.default_rng(30 + case).normal(size=fn(x, kernels).shape),
                    jnp.float32)

  def loss(a, ks, flag=None):
    return jnp.sum(F.kernel_gated(fn, a, ks, flag) * cot)

  want_x, want_k = jax.grad(loss, argnums=(0, 1))(x, kernels)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1)))
  for flag in (True, False):
    got_x, got_k = grads(x, kernels, jnp.asarray(flag))
    np.testing.assert_allclose(got_x, want_x, rtol=1e-5, atol=1e-5, err_msg=name)
    for got, want in zip(jax.tree.leaves(got_k), jax.tree.leaves(want_k)):
      assert np.any(want != 0)
      np.testing.assert_allclose(got, want if flag else np.zeros_like(want), rtol=1e-5,
                                 atol=1e-5, err_msg=name)
  np.testing.assert_array_equal(F.kernel_gated(fn, x, kernels, jnp.asarray(False)),
                                fn(x, kernels))


@pytest.mark.parametrize("lead, one_pass", list(itertools.product([0, 1, 2], [False, True])))
def test_batch_norm_matches_numpy(lead, one_pass):
  rng = np.random.default_rng(10 + lead)
  lead_shape = (2, 3)[:lead]
  x = _rand(rng, *lead_shape, 4, 3, 5, 6) * 3.0 + 1.5
  mean, var = F.batch_norm_stats(jnp.asarray(x), lead, one_pass)
  x64 = x.astype(np.float64)
  axes = tuple(range(lead, lead + 3))
  want_mean = x64.mean(axis=axes)
  want_var = x64.var(axis=axes)  # biased, as PyTorch normalises with
  assert mean.shape == lead_shape + (6,) and var.shape == lead_shape + (6,)
  np.testing.assert_allclose(mean, want_mean, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(var, want_var, atol=1e-5, rtol=1e-5)

  expand = lambda a: np.expand_dims(a, axes)
  eps = 1e-3
  y = F.batch_norm_apply(jnp.asarray(x), mean, var, lead, eps)
  want = (x64 - expand(want_mean)) / np.sqrt(expand(want_var) + eps)
  np.testing.assert_allclose(y, want, atol=1e-5, rtol=1e-5)

  scale = _rand(rng, *lead_shape, 6)
  bias = _rand(rng, *lead_shape, 6)
  y = F.batch_norm_apply(jnp.asarray(x), mean, var, lead, scale=jnp.asarray(scale),
                         bias=jnp.asarray(bias))
  want = ((x64 - expand(want_mean)) / np.sqrt(expand(want_var) + 1e-5) * expand(scale)
          + expand(bias))
  np.testing.assert_allclose(y, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("train", [True, False])
def test_batch_norm_of_shared_inputs_returns_each_input_once_in_training(train):
  """``sources`` read in turn with ``shared_output``: in training every edge reading an
  input is normalised with that input's batch statistics, so ``y`` holds each input once
  and equals the gathered output's rows; in evaluation each edge's running statistics
  differ and ``y`` is per edge. The running statistics are per edge either way."""
  rng = np.random.default_rng(31)
  x = jnp.asarray(_rand(rng, 2, 4, 3, 3, 5) * 2.0 + 0.5)
  sources = np.array([0, 1] * 3)
  stats = (jnp.asarray(_rand(rng, 6, 5)), jnp.asarray(rng.uniform(0.5, 2, (6, 5)),
                                                        jnp.float32))
  y, new = F.batch_norm(x, stats, 1, train, sources=sources, shared_output=True)
  want, want_new = F.batch_norm(x, stats, 1, train, sources=sources)
  assert want.shape == (6, 4, 3, 3, 5)
  assert y.shape == ((2,) if train else (6,)) + want.shape[1:]
  np.testing.assert_allclose(y[sources] if train else y, want, rtol=1e-6, atol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, new, want_new)


@pytest.mark.parametrize("one_pass", [False, True])
def test_batch_norm_running_statistics_carry_no_gradient(one_pass):
  """The running averages are state, not a function to differentiate: the batch
  statistics reach them through a stop of the gradient (so that linearising a loop that
  carries them, like the inner nodes' scan, finds no tangent to carry), while the
  normalised output keeps its gradient through the same statistics."""
  rng = np.random.default_rng(4)
  x = jnp.asarray(_rand(rng, 4, 3, 5, 6) * 2.0 + 1.0)
  stats = (jnp.zeros(6), jnp.ones(6))
  train = lambda x: F.batch_norm(x, stats, 0, True, one_pass=one_pass)
  running = jax.grad(lambda x: sum(jnp.sum(s) for s in train(x)[1]))(x)
  assert not np.any(np.asarray(running))
  cot = jnp.asarray(_rand(rng, 4, 3, 5, 6))
  output = jax.grad(lambda x: jnp.sum(train(x)[0] * cot))(x)
  assert np.abs(np.asarray(output)).max() > 1e-2


def test_one_pass_batch_norm_stats_of_a_far_mean_keep_float32_precision():
  """Channels whose mean is 1e4 standard deviations from zero: the one-pass statistics
  (shifted by a value of the channel) against float64 numpy of the same float32 values.
  The data is checked to be such that unshifted one-pass sums lose the variance."""
  rng = np.random.default_rng(23)
  x = (_rand(rng, 3, 16, 8, 8, 4) + np.array([1e4, -1e4, 3e3, 0.0], np.float32))
  mean, var = F.batch_norm_stats(jnp.asarray(x), 1, one_pass=True)
  x64 = x.astype(np.float64)
  np.testing.assert_allclose(mean, x64.mean(axis=(1, 2, 3)), rtol=1e-6, atol=1e-5)
  np.testing.assert_allclose(var, x64.var(axis=(1, 2, 3)), rtol=1e-4)
  xj = jnp.asarray(x)
  unshifted = (jnp.mean(jnp.square(xj), axis=(1, 2, 3))
               - jnp.square(jnp.mean(xj, axis=(1, 2, 3))))
  assert np.max(np.abs(unshifted[:, 0] - x64[..., 0].var(axis=(1, 2, 3)))) > 0.1


def test_one_pass_batch_norm_stats_of_a_constant_channel_is_exactly_zero_variance():
  x = np.full((2, 8, 4, 4, 3), 0.7, np.float32)
  x[..., 1] = np.float32(1e4 / 3)
  mean, var = F.batch_norm_stats(jnp.asarray(x), 1, one_pass=True)
  np.testing.assert_array_equal(var, np.zeros((2, 3), np.float32))
  np.testing.assert_allclose(mean, x[:, 0, 0, 0], rtol=1e-7)


@pytest.mark.parametrize("lead", [0, 1, 2])
def test_one_pass_batch_norm_stats_gradient_is_the_two_pass_formulas_in_float64(lead):
  """The hand-written gradient of the one-pass statistics against JAX's gradient of the
  textbook two-pass mean and variance, both in float64, for random cotangents, and so is
  its own gradient (a Hessian-vector product)."""
  rng = np.random.default_rng(30 + lead)
  shape = (2, 3)[:lead] + (4, 3, 5, 6)
  axes = tuple(range(lead, lead + 3))
  x = rng.normal(size=shape) * 2.0 + 0.5
  cotangents = (rng.normal(size=shape[:lead] + (6,)), rng.normal(size=shape[:lead] + (6,)))

  def two_pass(x):
    mean = jnp.mean(x, axis=axes)
    return mean, jnp.mean(jnp.square(x - jnp.expand_dims(mean, axes)), axis=axes)

  with jax.enable_x64(True):
    got, vjp = jax.vjp(lambda a: F.batch_norm_stats(a, lead, True), jnp.asarray(x))
    want, want_vjp = jax.vjp(two_pass, jnp.asarray(x))
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(vjp(cotangents)[0], want_vjp(cotangents)[0],
                               rtol=1e-12, atol=1e-14)
    # Reverse over reverse (`second_exact` differentiates through a weight step).
    direction = jnp.asarray(rng.normal(size=shape))
    hvp = lambda f: jax.grad(lambda a: jnp.vdot(jax.grad(
        lambda b: sum(jnp.vdot(o, c) for o, c in zip(f(b), cotangents)))(a), direction))
    np.testing.assert_allclose(hvp(lambda b: F.batch_norm_stats(b, lead, True))(x),
                               hvp(two_pass)(x), rtol=1e-10, atol=1e-12)
  x16 = jnp.asarray(x, jnp.bfloat16)
  _, vjp16 = jax.vjp(lambda a: F.batch_norm_stats(a, lead, True), x16)
  assert vjp16(tuple(jnp.asarray(c, jnp.float32) for c in cotangents))[0].dtype == jnp.bfloat16


def test_batch_norm_stats_reduce_in_two_passes_on_a_cpu_by_default():
  x = jnp.asarray(_rand(np.random.default_rng(24), 4, 3, 5, 6) + 2.0)
  program = str(jax.make_jaxpr(lambda a: F.batch_norm_stats(a, 0))(x))
  assert jax.default_backend() == "cpu" and "custom_vjp_call" not in program
  assert "custom_vjp_call" in str(jax.make_jaxpr(lambda a: F.batch_norm_stats(a, 0, True))(x))
  for got, want in zip(F.batch_norm_stats(x, 0), F.batch_norm_stats(x, 0, False)):
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("one_pass", [False, True])
def test_batch_norm_of_bfloat16_reduces_in_float32(one_pass):
  """bfloat16 activations (``config.search.dtype``): the statistics are those of the
  bfloat16 values reduced in float32 (a bfloat16 mean is off by up to 2^-9 relative), the
  running statistics stay float32 and the output is bfloat16."""
  rng = np.random.default_rng(21)
  x = jnp.asarray(_rand(rng, 32, 8, 8, 3) * 3.0 + 1.5, jnp.bfloat16)
  y, (running_mean, running_var) = F.batch_norm(x, (jnp.zeros(3), jnp.ones(3)), 0, True,
                                                 one_pass=one_pass)
  x64 = np.asarray(x.astype(jnp.float32), np.float64)
  mean, var, n = x64.mean(axis=(0, 1, 2)), x64.var(axis=(0, 1, 2)), 32 * 8 * 8
  assert y.dtype == jnp.bfloat16
  assert running_mean.dtype == running_var.dtype == jnp.float32
  np.testing.assert_allclose(running_mean, 0.1 * mean, rtol=1e-5)
  np.testing.assert_allclose(running_var, 0.9 + 0.1 * var * n / (n - 1), rtol=1e-5)
  want = (x64 - mean) / np.sqrt(var + F.BN_EPS)
  np.testing.assert_allclose(np.asarray(y.astype(jnp.float32)), want, rtol=0, atol=0.02)


@pytest.mark.parametrize("one_pass", [False, True])
def test_batch_norm_gradient_of_bfloat16_sums_in_float32(one_pass):
  """bfloat16 activations, affine, in training mode: the input gradient (through the
  batch statistics) is within bfloat16 rounding of the float64 adjoint of the same values.
  Its sums over B, H and W (the gradients of the statistics, the scale and the bias) run
  in float32: in bfloat16 the scale's and bias's gradients were off by 4-27 % here."""
  rng = np.random.default_rng(22)
  x = jnp.asarray(_rand(rng, 32, 8, 8, 3) * 3.0 + 1.5, jnp.bfloat16)
  cot = jnp.asarray(_rand(rng, 32, 8, 8, 3), jnp.bfloat16)
  scale, bias = jnp.asarray([0.5, 1.0, 2.0]), jnp.asarray([0.1, -0.2, 0.3])
  as64 = lambda a: np.asarray(jnp.asarray(a, jnp.float32), np.float64)

  def loss(a, s, b):
    y = F.batch_norm(a, (jnp.zeros(3), jnp.ones(3)), 0, True, s, b, one_pass=one_pass)[0]
    assert y.dtype == jnp.bfloat16
    return jnp.sum(y.astype(jnp.float32) * cot.astype(jnp.float32))

  gx, gs, gb = jax.grad(loss, argnums=(0, 1, 2))(x, scale, bias)
  x64, g64, n = as64(x), as64(cot), 32 * 8 * 8
  inv = 1 / np.sqrt(x64.var(axis=(0, 1, 2)) + F.BN_EPS)
  xhat = (x64 - x64.mean(axis=(0, 1, 2))) * inv
  g_sum, gx_sum = g64.sum(axis=(0, 1, 2)), (g64 * xhat).sum(axis=(0, 1, 2))
  want = as64(scale) * inv / n * (n * g64 - g_sum - xhat * gx_sum)
  assert gx.dtype == jnp.bfloat16
  np.testing.assert_allclose(as64(gx), want, rtol=0, atol=0.01 * np.abs(want).max())
  np.testing.assert_allclose(gs, gx_sum, rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(gb, g_sum, rtol=1e-4, atol=1e-3)


def test_running_stats_init_compiles_nothing_and_equals_jnp_full():
  """The initialiser equals ``jnp.full`` (value, dtype, a device array, traceable) without
  compiling a program: an eagerly initialised supernet calls it for every statistic."""
  compiles = []
  listener = lambda event, duration, **kw: compiles.append(event)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    mean = F.running_stats_init(0)((3, 5, 7))
    var = F.running_stats_init(1)((2, 11), jnp.bfloat16)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert not [e for e in compiles if e.endswith("backend_compile_duration")]
  for got, want in ((mean, jnp.zeros((3, 5, 7))), (var, jnp.ones((2, 11), jnp.bfloat16))):
    assert isinstance(got, jax.Array) and got.dtype == want.dtype
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  traced = jax.jit(lambda: F.running_stats_init(1)((4,)))()
  np.testing.assert_array_equal(np.asarray(traced), np.ones(4, np.float32))
  # The default dtype is jnp.full's: JAX's default float, float64 under x64.
  assert F.running_stats_init(0)((2,)).dtype == jnp.zeros(2).dtype == jnp.float32
  with jax.enable_x64(True):
    assert F.running_stats_init(0)((2,)).dtype == jnp.zeros(2).dtype == jnp.float64


def test_mixed_sum_and_its_written_out_gradient_in_float64():
  """`F.mixed_sum` against the float64 numpy formula: the weighted sum, the weights'
  gradient (per edge and operation, the sum of the output's gradient times the
  operation's output) and each operation's gradient (its weight times the output's
  gradient), at float64 precision. The weights' sums read the output's gradient through
  an optimisation barrier, the fusion boundary that keeps XLA's GPU compiler from
  emitting the node's gradient inside them; the operations' gradients do not."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(17)
    edges, n = 3, 4
    weights = rng.normal(size=(edges, n))
    parts = tuple(rng.normal(size=(edges, 2, 3, 3, 2)) for _ in range(n))
    cot = rng.normal(size=(edges, 2, 3, 3, 2))
    loss = lambda w, ps: jnp.sum(F.mixed_sum(w, ps) * cot)
    out = F.mixed_sum(jnp.asarray(weights), tuple(map(jnp.asarray, parts)))
    gw, gparts = jax.grad(loss, argnums=(0, 1))(jnp.asarray(weights),
                                               tuple(map(jnp.asarray, parts)))
    want = sum(weights[:, k, None, None, None, None] * parts[k] for k in range(n))
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12)
    gw_want = np.stack([np.sum(cot * part, axis=(1, 2, 3, 4)) for part in parts], axis=1)
    np.testing.assert_allclose(gw, gw_want, rtol=1e-12, atol=1e-12)
    for k in range(n):
      np.testing.assert_allclose(gparts[k], weights[:, k, None, None, None, None] * cot,
                                 rtol=1e-12, atol=1e-12)
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(weights),
                                                          tuple(map(jnp.asarray, parts)))
    barriers = [eqn for eqn in all_eqns(jaxpr.jaxpr)
                if eqn.primitive.name == "optimization_barrier"]
    assert len(barriers) == 1 and len(barriers[0].invars) == 1


def test_mixed_sum_of_parts_shared_by_edges_in_float64():
  """Parts shared by the edges that read them in turn (``[S, ...]`` for ``E = 3 S``
  edges, edge ``e`` reading row ``e % S``) beside per-edge parts, against the float64 numpy
  formula on the gathered parts: the sum, the weights' gradient, and each shared part's
  gradient, the sum over its edges of their weight times the output's gradient, computed
  as adds: no reduction over the edges in the gradient's program, only the weights' sums
  over B, H, W and C. Rows that do not divide the edges are refused."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(19)
    edges, rows = 6, 2
    weights = rng.normal(size=(edges, 3))
    parts = (rng.normal(size=(rows, 2, 3, 3, 2)), rng.normal(size=(edges, 2, 3, 3, 2)),
             rng.normal(size=(rows, 2, 3, 3, 2)))
    reads = np.arange(edges) % rows
    full = [part if len(part) == edges else part[reads] for part in parts]
    cot = rng.normal(size=(edges, 2, 3, 3, 2))
    loss = lambda w, ps: jnp.sum(F.mixed_sum(w, ps) * cot)
    args = (jnp.asarray(weights), tuple(map(jnp.asarray, parts)))
    want = sum(weights[:, k, None, None, None, None] * full[k] for k in range(3))
    np.testing.assert_allclose(F.mixed_sum(*args), want, rtol=1e-12, atol=1e-12)
    gw, gparts = jax.grad(loss, argnums=(0, 1))(*args)
    gw_want = np.stack([np.sum(cot * part, axis=(1, 2, 3, 4)) for part in full], axis=1)
    np.testing.assert_allclose(gw, gw_want, rtol=1e-12, atol=1e-12)
    for k, part in enumerate(parts):
      gk_want = np.zeros_like(part)
      np.add.at(gk_want, reads if len(part) < edges else np.arange(edges),
                weights[:, k, None, None, None, None] * cot)
      assert gparts[k].shape == part.shape
      np.testing.assert_allclose(gparts[k], gk_want, rtol=1e-12, atol=1e-12)
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(*args)
    # A broadcast's transpose would sum [E / S, S, ...] over axis 0.
    sums = [tuple(eqn.params["axes"]) for eqn in all_eqns(jaxpr.jaxpr)
            if eqn.primitive.name == "reduce_sum"]
    assert sums.count((1, 2, 3, 4)) == 3 and (0,) not in sums, sums
  with pytest.raises(ValueError, match="6 edges need parts of 6 rows or of a divisor"):
    F.mixed_sum(jnp.zeros((6, 2)), (jnp.zeros((4, 1, 2, 2, 1)), jnp.zeros((6, 1, 2, 2, 1))))
