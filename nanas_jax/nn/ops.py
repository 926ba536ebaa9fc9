"""Primitive operations of the DARTS search space as Flax linen modules (NHWC).

A faithful port of quark0/darts ``cnn/operations.py`` for the discrete networks: every op
is a module called as ``op(x, train)``, ``OPS[name](C, stride, affine, depthwise_impl)``
builds one, and the parameter shapes equal the PyTorch ones (up to layout), so published
parameter counts and PyTorch weights carry over.

Depthwise convolutions (`DEPTHWISE_IMPLS`): ``'conv'``, XLA's grouped convolution (cuDNN's
on a GPU), or ``'taps'``, `functional.depthwise_conv_taps` (the search supernet's CPU
form: a sum of the kernel's taps with a gradient of its own), which XLA:CPU runs 3.5-4x
faster in a training step (the DARTS_V2 train quick start's network, and C=16, 8 cells,
B=32 at 32x32). Both hold the same ``(k, k, 1, C)`` kernel; ``'auto'`` picks ``'taps'``
on a CPU (`resolve_depthwise_impl`).

Conventions shared by all modules here:
- Convolutions have no bias and explicit PyTorch-style padding, so strided ops give
  PyTorch's output size ``(H + 2p - d(k-1) - 1) // s + 1`` (for the 3x3/5x5/7x7 ops at
  stride 2 that is ``ceil(H / 2)``).
- BatchNorm is PyTorch's (`BatchNorm`: running-average momentum 0.1, epsilon 1e-5, the
  running variance from the unbiased batch variance): batch statistics when ``train`` is
  true, running statistics otherwise.
- Parameter layout for copying PyTorch weights: a conv kernel is ``HWIO``
  (``torch_w.permute(2, 3, 1, 0)``; a depthwise kernel is ``(k, k, 1, C)``), a Dense kernel
  is ``torch_w.T``, BatchNorm ``weight``/``bias`` are ``scale``/``bias`` and the running
  statistics live in the ``batch_stats`` collection as ``mean``/``var``.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from nanas_jax.nn import functional as F

class BatchNorm(nn.Module):
  """PyTorch's BatchNorm2d (`functional.batch_norm`: momentum 0.1, epsilon 1e-5, unbiased
  running variance) on NHWC inputs: batch statistics when ``train``, running statistics
  otherwise. Params ``scale``, ``bias`` (with ``affine``); statistics ``mean``, ``var`` in
  the ``batch_stats`` collection (the names of Flax's BatchNorm). ``one_pass``: how the
  batch statistics are reduced (`functional.batch_norm_stats`; None: by the backend)."""
  affine: bool = True
  one_pass: bool | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    c = x.shape[-1]
    mean = self.variable("batch_stats", "mean", F.running_stats_init(0), (c,), jnp.float32)
    var = self.variable("batch_stats", "var", F.running_stats_init(1), (c,), jnp.float32)
    scale = bias = None
    if self.affine:
      scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
      bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    y, new = F.batch_norm(x, (mean.value, var.value), 0, train, scale, bias,
                          one_pass=self.one_pass)
    if train and self.is_mutable_collection("batch_stats") and not self.is_initializing():
      mean.value, var.value = new
    return y


class Classifier(nn.Module):
  """``nn.Dense`` (params ``kernel[C, features]``, ``bias``) whose output, bias add
  included, is float32 at least: the matmul runs in the input's dtype, its result is cast
  up, then the bias is added. The bias's gradient, a sum over the batch, is then a float32
  sum; with Flax's ``Dense`` in bfloat16 (the search's ``config.dtype``) it was a
  bfloat16 one. In float32 this is ``Dense``'s computation."""
  features: int
  kernel_init: Callable
  bias_init: Callable

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
    bias = self.param("bias", self.bias_init, (self.features,))
    acc = jnp.promote_types(x.dtype, jnp.float32)
    return (x @ kernel).astype(acc) + bias.astype(acc)


def conv(features: int, kernel: int | tuple[int, int], name: str, stride=1,
         padding: int | tuple[int, int] = 0, dilation: int = 1,
         groups: int = 1) -> nn.Conv:
  """A bias-free convolution with PyTorch's (symmetric, explicit) padding."""
  kernel = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
  stride = (stride, stride) if isinstance(stride, int) else tuple(stride)
  pad_h, pad_w = (padding, padding) if isinstance(padding, int) else padding
  return nn.Conv(features, kernel, strides=stride,
                 padding=((pad_h, pad_h), (pad_w, pad_w)),
                 kernel_dilation=(dilation, dilation), feature_group_count=groups,
                 use_bias=False, name=name)


DEPTHWISE_IMPLS = ("auto", "conv", "taps")


def resolve_depthwise_impl(impl: str) -> str:
  """The concrete depthwise implementation for ``impl`` on the default backend: ``'auto'``
  is ``'taps'`` on a CPU, where XLA's grouped convolution is memory-bound, and
  ``'conv'`` on accelerators."""
  if impl not in DEPTHWISE_IMPLS:
    raise ValueError(f"Unknown depthwise implementation {impl!r}; use one of "
                     f"{DEPTHWISE_IMPLS}.")
  if impl != "auto":
    return impl
  return "taps" if jax.default_backend() == "cpu" else "conv"


class TapsDepthwiseConv(nn.Module):
  """A depthwise 'same' convolution as `functional.depthwise_conv_taps`, with the
  parameter ``kernel`` of the ``nn.Conv`` it replaces (``(k, k, 1, C)``, the same
  initialiser), so the two are interchangeable in a parameter tree."""
  features: int
  kernel_size: int
  stride: int
  dilation: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    kernel = self.param("kernel", nn.linear.default_kernel_init, (k, k, 1, self.features))
    return F.depthwise_conv_taps(x, kernel[:, :, 0, :], self.dilation, self.stride)


def depthwise_conv(C: int, kernel: int, name: str, stride: int, padding: int, dilation: int,
                   impl: str) -> nn.Module:
  """A bias-free depthwise convolution of ``C`` channels by ``impl`` (``'conv'`` or
  ``'taps'``); ``'taps'`` computes the 'same' padding the DARTS ops use."""
  if impl == "conv":
    return conv(C, kernel, name, stride, padding, dilation, groups=C)
  if impl != "taps":
    raise ValueError(f"depthwise_impl = {impl!r} is invalid here: expected 'conv' or 'taps' "
                     "(resolve 'auto' with resolve_depthwise_impl).")
  if padding != dilation * (kernel - 1) // 2:
    raise ValueError(f"'taps' computes 'same' padding ({dilation * (kernel - 1) // 2} for a "
                     f"{kernel}x{kernel} kernel at dilation {dilation}), not {padding}.")
  return TapsDepthwiseConv(C, kernel, stride, dilation, name=name)


def check_channels(x: jax.Array, expected: int, what: str) -> None:
  """Raises ValueError when the channel axis of NHWC ``x`` is not ``expected``.

  Flax infers input channels at initialisation, so without this check a wrong input
  would silently create differently shaped parameters instead of failing.
  """
  if x.ndim != 4:
    raise ValueError(f"{what} expects an NHWC array, got shape {x.shape}")
  if x.shape[-1] != expected:
    raise ValueError(
        f"{what} expects {expected} input channels, got {x.shape[-1]} (shape {x.shape})")


def drop_path(x: jax.Array, rate, rng: jax.Array) -> jax.Array:
  """Drops whole samples of ``x`` with probability ``rate``, scaling the kept ones.

  As the reference ``utils.drop_path``: one Bernoulli(1 - rate) draw per sample (leading
  axis), kept samples are divided by the keep probability so the expectation is unchanged.
  ``rate`` may be a traced scalar (a schedule inside a jitted step).
  """
  keep_prob = 1.0 - jnp.asarray(rate, x.dtype)
  mask = jax.random.bernoulli(rng, keep_prob, (x.shape[0],) + (1,) * (x.ndim - 1))
  return x / keep_prob * mask.astype(x.dtype)


class ReLUConvBN(nn.Module):
  """ReLU, convolution, BatchNorm. Params: ``conv``, ``bn``."""
  C_in: int
  C_out: int
  kernel_size: int
  stride: int
  padding: int
  affine: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    check_channels(x, self.C_in, type(self).__name__)
    x = conv(self.C_out, self.kernel_size, "conv", self.stride, self.padding)(nn.relu(x))
    return BatchNorm(self.affine, name="bn")(x, train)


class DilConv(nn.Module):
  """ReLU, dilated depthwise conv, 1x1 conv, BatchNorm. Params: ``depthwise``,
  ``pointwise``, ``bn``."""
  C_in: int
  C_out: int
  kernel_size: int
  stride: int
  padding: int
  dilation: int
  affine: bool = True
  depthwise_impl: str = "conv"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    check_channels(x, self.C_in, type(self).__name__)
    x = depthwise_conv(self.C_in, self.kernel_size, "depthwise", self.stride, self.padding,
                       self.dilation, self.depthwise_impl)(nn.relu(x))
    x = conv(self.C_out, 1, "pointwise")(x)
    return BatchNorm(self.affine, name="bn")(x, train)


class SepConv(nn.Module):
  """Two stacked (ReLU, depthwise conv, 1x1 conv, BatchNorm) blocks; only the first is
  strided. Params: ``depthwise1``, ``pointwise1``, ``bn1``, ``depthwise2``,
  ``pointwise2``, ``bn2``."""
  C_in: int
  C_out: int
  kernel_size: int
  stride: int
  padding: int
  affine: bool = True
  depthwise_impl: str = "conv"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    check_channels(x, self.C_in, type(self).__name__)
    k, p, impl = self.kernel_size, self.padding, self.depthwise_impl
    x = depthwise_conv(self.C_in, k, "depthwise1", self.stride, p, 1, impl)(nn.relu(x))
    x = conv(self.C_in, 1, "pointwise1")(x)
    x = BatchNorm(self.affine, name="bn1")(x, train)
    x = depthwise_conv(self.C_in, k, "depthwise2", 1, p, 1, impl)(nn.relu(x))
    x = conv(self.C_out, 1, "pointwise2")(x)
    return BatchNorm(self.affine, name="bn2")(x, train)


class Identity(nn.Module):
  """Returns its input (``skip_connect`` at stride 1)."""

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    del train
    return x


class Zero(nn.Module):
  """The ``none`` op: zeros shaped like the (strided) input."""
  stride: int = 1

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    del train
    # Multiplying (rather than building zeros) keeps the reference's NaN propagation.
    return x[:, ::self.stride, ::self.stride, :] * 0.0


class FactorizedReduce(nn.Module):
  """Halves the spatial size with two offset stride-2 1x1 convs, concatenated on
  channels. Params: ``conv_1``, ``conv_2`` (``C_out // 2`` outputs each), ``bn``.

  ``conv_2`` reads ``x[:, 1:, 1:]`` as in the reference, so for odd sizes the two paths
  differ in size; PyTorch fails at the concatenation and this raises ValueError.
  """
  C_in: int
  C_out: int
  affine: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    check_channels(x, self.C_in, type(self).__name__)
    if self.C_out % 2:
      raise ValueError(f"FactorizedReduce needs an even C_out, got {self.C_out}")
    if x.shape[1] % 2 or x.shape[2] % 2:
      raise ValueError(
          f"FactorizedReduce needs even spatial sizes, got {x.shape[1]}x{x.shape[2]}")
    x = nn.relu(x)
    a = conv(self.C_out // 2, 1, "conv_1", stride=2)(x)
    b = conv(self.C_out // 2, 1, "conv_2", stride=2)(x[:, 1:, 1:, :])
    return BatchNorm(self.affine, name="bn")(jnp.concatenate([a, b], axis=-1), train)


class MaxPool3x3(nn.Module):
  """3x3 max pooling with padding 1 (the padding never wins, as in PyTorch)."""
  stride: int = 1

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    del train
    return F.max_pool_3x3(x, self.stride)


class AvgPool3x3(nn.Module):
  """3x3 average pooling with padding 1 that averages over real pixels only
  (PyTorch ``count_include_pad=False``)."""
  stride: int = 1

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    del train
    return F.avg_pool_3x3(x, self.stride)


class Conv7x1_1x7(nn.Module):
  """ReLU, 1x7 conv, 7x1 conv, BatchNorm; the stride is split between the two convs.
  Params: ``conv_1x7``, ``conv_7x1``, ``bn``."""
  C: int
  stride: int
  affine: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    check_channels(x, self.C, type(self).__name__)
    x = conv(self.C, (1, 7), "conv_1x7", (1, self.stride), (0, 3))(nn.relu(x))
    x = conv(self.C, (7, 1), "conv_7x1", (self.stride, 1), (3, 0))(x)
    return BatchNorm(self.affine, name="bn")(x, train)


OPS: dict[str, Callable[[int, int, bool, str], nn.Module]] = {
    "none": lambda C, stride, affine, dw: Zero(stride),
    "avg_pool_3x3": lambda C, stride, affine, dw: AvgPool3x3(stride),
    "max_pool_3x3": lambda C, stride, affine, dw: MaxPool3x3(stride),
    "skip_connect": lambda C, stride, affine, dw: (
        Identity() if stride == 1 else FactorizedReduce(C, C, affine)),
    "sep_conv_3x3": lambda C, stride, affine, dw: SepConv(C, C, 3, stride, 1, affine, dw),
    "sep_conv_5x5": lambda C, stride, affine, dw: SepConv(C, C, 5, stride, 2, affine, dw),
    "sep_conv_7x7": lambda C, stride, affine, dw: SepConv(C, C, 7, stride, 3, affine, dw),
    "dil_conv_3x3": lambda C, stride, affine, dw: DilConv(C, C, 3, stride, 2, 2, affine, dw),
    "dil_conv_5x5": lambda C, stride, affine, dw: DilConv(C, C, 5, stride, 4, 2, affine, dw),
    "conv_7x1_1x7": lambda C, stride, affine, dw: Conv7x1_1x7(C, stride, affine),
}


def make_op(name: str, C: int, stride: int, affine: bool = True,
            depthwise_impl: str = "conv") -> nn.Module:
  """``OPS[name](C, stride, affine, depthwise_impl)`` with a ValueError naming an unknown
  op or stride."""
  if name not in OPS:
    raise ValueError(f"Unknown operation {name!r}; known: {sorted(OPS)}")
  if stride not in (1, 2):
    raise ValueError(f"Operation stride must be 1 or 2, got {stride}")
  return OPS[name](C, stride, affine, depthwise_impl)
