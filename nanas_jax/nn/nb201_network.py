"""The NAS-Bench-201 network for one cell architecture (Flax linen, NHWC).

A port of D-X-Y/AutoDL-Projects ``models/cell_infers/tiny_network.py`` (``TinyNetwork``),
``cells.py`` (``InferCell``) and the ``ResNetBasicblock`` and cell ops of
``models/cell_operations.py``, with the reference's parameter shapes, so counts equal the
benchmark's (1,531,546 for the all-``nor_conv_3x3`` cell at C=16, N=5, CIFAR-10) and
PyTorch weights can be copied in (layouts: see ``nanas_jax.nn.ops``).

Every cell op keeps the channels and the resolution (``C_in == C_out``, stride 1 inside
the cells; the two reductions are ResNet basic blocks), which is what the reference's
generic ops reduce to in this network: pooling without a 1x1 pre-projection and
``skip_connect`` as identity.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from nanas_jax.nn.ops import (AvgPool3x3, Identity, ReLUConvBN, Zero, BatchNorm,
                              check_channels, conv)
from nanas_jax.spaces.nb201 import NB201_OPS, NB201Arch


def as_nb201_arch(arch: NB201Arch | str) -> NB201Arch:
  """An ``NB201Arch`` from itself or from the benchmark's ``|op~source|+|...|`` string."""
  return arch if isinstance(arch, NB201Arch) else NB201Arch.parse(arch)


def nb201_op(name: str, C: int) -> nn.Module:
  """The cell op ``name`` at ``C`` channels, stride 1 (ValueError for unknown ops)."""
  if name == "none":
    return Zero(1)
  if name == "skip_connect":
    return Identity()
  if name == "nor_conv_1x1":
    return ReLUConvBN(C, C, 1, 1, 0)
  if name == "nor_conv_3x3":
    return ReLUConvBN(C, C, 3, 1, 1)
  if name == "avg_pool_3x3":
    return AvgPool3x3(1)
  raise ValueError(f"Unknown NAS-Bench-201 operation {name!r}; known: {NB201_OPS}")


class InferCell(nn.Module):
  """A NAS-Bench-201 cell: node j sums one op of every earlier node; the output is the
  last node. Params: ``layers_{i}`` for the i-th edge in the string's order (as the
  reference's ``layers`` list; parameter-free ops have no entry)."""
  arch: NB201Arch | str
  C: int

  def setup(self):
    nodes = as_nb201_arch(self.arch).nodes
    self.sources = tuple(tuple(source for _, source in inputs) for inputs in nodes)
    self.layers = [nb201_op(op, self.C) for inputs in nodes for op, _ in inputs]

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    check_channels(x, self.C, type(self).__name__)
    states = [x]
    edge = 0
    for sources in self.sources:
      total = 0.0
      for source in sources:
        total = total + self.layers[edge](states[source], train)
        edge += 1
      states.append(total)
    return states[-1]


class ResNetBasicblock(nn.Module):
  """Two 3x3 ``ReLUConvBN`` plus a shortcut. Params: ``conv_a``, ``conv_b`` and, when the
  shape changes, ``downsample``: at stride 2 a 2x2 average pool then a bias-free 1x1 conv
  (no ReLU, no BN), at stride 1 a 1x1 ``ReLUConvBN``."""
  C_in: int
  C_out: int
  stride: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    check_channels(x, self.C_in, type(self).__name__)
    if self.stride not in (1, 2):
      raise ValueError(f"ResNetBasicblock stride must be 1 or 2, got {self.stride}")
    if self.stride == 2 and (x.shape[1] % 2 or x.shape[2] % 2):
      # The 2x2 pool floors odd sizes while the strided 3x3 conv rounds up; the
      # reference fails at the sum.
      raise ValueError(
          f"ResNetBasicblock at stride 2 needs even spatial sizes, got "
          f"{x.shape[1]}x{x.shape[2]}")
    out = ReLUConvBN(self.C_in, self.C_out, 3, self.stride, 1, name="conv_a")(x, train)
    out = ReLUConvBN(self.C_out, self.C_out, 3, 1, 1, name="conv_b")(out, train)
    if self.stride == 2:
      residual = conv(self.C_out, 1, "downsample")(nn.avg_pool(x, (2, 2), (2, 2)))
    elif self.C_in != self.C_out:
      residual = ReLUConvBN(self.C_in, self.C_out, 1, 1, 0, name="downsample")(x, train)
    else:
      residual = x
    return residual + out


class TinyNetwork(nn.Module):
  """The NAS-Bench-201 macro network; returns the logits (the reference also returns the
  pooled features).

  Stem 3x3 conv to ``C`` + BN, then three stages of ``N`` cells at C, 2C, 4C channels
  separated by stride-2 ``ResNetBasicblock`` s, BN + ReLU, global average pool, classifier.
  Params: ``stem_conv``, ``stem_bn``, ``cells_{i}`` (``3 * N + 2`` of them: ``InferCell``
  or, at i = N and 2N + 1, ``ResNetBasicblock``), ``lastact_bn``, ``classifier``.
  """
  arch: NB201Arch | str
  C: int = 16
  N: int = 5
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    arch = as_nb201_arch(self.arch)
    x = conv(self.C, 3, "stem_conv", padding=1)(x)
    x = BatchNorm(name="stem_bn")(x, train)
    C_prev, index = self.C, 0
    for stage in range(3):
      C_curr = self.C * 2 ** stage
      if stage:
        x = ResNetBasicblock(C_prev, C_curr, 2, name=f"cells_{index}")(x, train)
        index += 1
      for _ in range(self.N):
        x = InferCell(arch, C_curr, name=f"cells_{index}")(x, train)
        index += 1
      C_prev = C_curr
    x = nn.relu(BatchNorm(name="lastact_bn")(x, train))
    return nn.Dense(self.num_classes, name="classifier")(jnp.mean(x, axis=(1, 2)))
