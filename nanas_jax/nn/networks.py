"""Discrete DARTS-space networks built from a genotype (Flax linen, NHWC).

A port of quark0/darts ``cnn/model.py``: the evaluation cell, the CIFAR and ImageNet
(mobile setting) networks and their auxiliary heads, with the reference's parameter shapes,
so a genotype's parameter count equals the published one (``count_params``) and PyTorch
weights can be copied in (layouts: see ``nanas_jax.nn.ops``).

A genotype is anything with the fields of the DARTS ``Genotype`` namedtuple: ``normal`` and
``reduce`` list ``(op_name, input_index)`` pairs, two per intermediate node, and
``normal_concat`` / ``reduce_concat`` the states concatenated into the cell output.

Drop path: the reference sets ``model.drop_path_prob`` every epoch. Here the module
attribute is the default and ``__call__(..., drop_path_prob=...)`` overrides it, so a
schedule can be a traced scalar of a jitted step without recompiling. Training with a
non-zero rate needs a ``'drop_path'`` rng stream.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
from flax import traverse_util

from nanas_jax.nn.ops import (FactorizedReduce, Identity, ReLUConvBN, BatchNorm,
                              check_channels, conv, drop_path, make_op, OPS)


def cell_spec(genotype: Any, reduction: bool) -> tuple[tuple[str, ...], tuple[int, ...],
                                                        tuple[int, ...]]:
  """Validated ``(op_names, input_indices, concat)`` of the normal or reduction cell.

  Raises ValueError naming the problem: an odd or empty edge list, an unknown op, an
  input that is not an earlier state, or a concat index out of range.
  """
  kind = "reduce" if reduction else "normal"
  edges = tuple(tuple(edge) for edge in getattr(genotype, kind))
  concat = tuple(int(c) for c in getattr(genotype, kind + "_concat"))
  if not edges or len(edges) % 2:
    raise ValueError(
        f"genotype.{kind} needs two (op, input) pairs per node, got {len(edges)} entries")
  names, indices = [], []
  for position, edge in enumerate(edges):
    if len(edge) != 2:
      raise ValueError(f"genotype.{kind}[{position}] is not an (op, input) pair: {edge!r}")
    name, index = edge[0], int(edge[1])
    if name not in OPS:
      raise ValueError(f"Unknown operation {name!r} in genotype.{kind}; known: {sorted(OPS)}")
    # Node n (0-based) may read the two cell inputs and the n nodes before it.
    if not 0 <= index < position // 2 + 2:
      raise ValueError(
          f"genotype.{kind}[{position}] reads state {index}, but node {position // 2} "
          f"can only read states 0..{position // 2 + 1}")
    names.append(name)
    indices.append(index)
  num_states = len(edges) // 2 + 2
  if not concat or any(not 0 <= c < num_states for c in concat):
    raise ValueError(
        f"genotype.{kind}_concat {concat} must name states in 0..{num_states - 1}")
  return tuple(names), tuple(indices), concat


def reduction_layers(layers: int) -> tuple[int, int]:
  """Cells that halve the resolution and double the channels (reference placement)."""
  if layers < 1:
    raise ValueError(f"layers must be at least 1, got {layers}")
  return layers // 3, 2 * layers // 3


class Cell(nn.Module):
  """The evaluation cell of the reference.

  Params: ``preprocess0`` (``FactorizedReduce`` when ``reduction_prev``, else a 1x1
  ``ReLUConvBN``), ``preprocess1`` (1x1 ``ReLUConvBN``), ``ops_{i}`` for the i-th genotype
  edge (parameter-free ops have no entry). The output has ``len(concat) * C`` channels.
  """
  genotype: Any
  C_prev_prev: int
  C_prev: int
  C: int
  reduction: bool
  reduction_prev: bool
  depthwise_impl: str = "conv"

  def setup(self):
    names, self.indices, self.concat = cell_spec(self.genotype, self.reduction)
    if self.reduction_prev:
      self.preprocess0 = FactorizedReduce(self.C_prev_prev, self.C)
    else:
      self.preprocess0 = ReLUConvBN(self.C_prev_prev, self.C, 1, 1, 0)
    self.preprocess1 = ReLUConvBN(self.C_prev, self.C, 1, 1, 0)
    self.ops = [make_op(name, self.C, 2 if self.reduction and index < 2 else 1,
                        depthwise_impl=self.depthwise_impl)
                for name, index in zip(names, self.indices)]

  def __call__(self, s0: jax.Array, s1: jax.Array, train: bool,
               drop_path_prob=0.0) -> jax.Array:
    s0 = self.preprocess0(s0, train)
    s1 = self.preprocess1(s1, train)
    # A Python zero skips drop path statically; a traced rate always draws masks.
    use_drop_path = train and not (
        isinstance(drop_path_prob, (int, float)) and drop_path_prob <= 0)
    states = [s0, s1]
    for node in range(len(self.ops) // 2):
      total = 0.0
      for edge in (2 * node, 2 * node + 1):
        op = self.ops[edge]
        h = op(states[self.indices[edge]], train)
        if use_drop_path and not isinstance(op, Identity):
          h = drop_path(h, drop_path_prob, self.make_rng("drop_path"))
        total = total + h
      states.append(total)
    return jnp.concatenate([states[i] for i in self.concat], axis=-1)


class _AuxiliaryHead(nn.Module):
  """ReLU, 5x5 average pool, 1x1 conv to 128, BN, ReLU, 2x2 conv to 768, [BN], ReLU,
  classifier. Params: ``conv1``, ``bn1``, ``conv2``, ``bn2`` (CIFAR only), ``classifier``.

  The reference assumes an input that this reduces to 1x1. For smaller inputs (the 8x8
  quick-start images give a 2x2 map here) the pooling window is clipped to the map and the
  2x2 conv zero-pads its input up to 2x2, so the parameter shapes stay the reference's; at
  the reference sizes both are no-ops. Inputs that leave more than 1x1 raise ValueError,
  as the reference's classifier would fail on them.
  """
  C: int
  num_classes: int
  pool_stride: ClassVar[int]
  bn_after_conv2: ClassVar[bool]

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    check_channels(x, self.C, type(self).__name__)
    window = (min(5, x.shape[1]), min(5, x.shape[2]))
    x = nn.avg_pool(nn.relu(x), window, (self.pool_stride,) * 2)
    x = nn.relu(BatchNorm(name="bn1")(conv(128, 1, "conv1")(x), train))
    pad = ((0, 0), (0, max(0, 2 - x.shape[1])), (0, max(0, 2 - x.shape[2])), (0, 0))
    x = conv(768, 2, "conv2")(jnp.pad(x, pad))
    if self.bn_after_conv2:
      x = BatchNorm(name="bn2")(x, train)
    x = nn.relu(x)
    if x.shape[1:3] != (1, 1):
      raise ValueError(
          f"{type(self).__name__} input is too large: its features are {x.shape[1:3]}, "
          "not 1x1 (the reference expects an 8x8 map for CIFAR, 7x7 for ImageNet)")
    return nn.Dense(self.num_classes, name="classifier")(x.reshape(x.shape[0], -1))


class AuxiliaryHeadCIFAR(_AuxiliaryHead):
  """Auxiliary classifier of the CIFAR network (8x8 input; pool stride 3)."""
  pool_stride: ClassVar[int] = 3
  bn_after_conv2: ClassVar[bool] = True


class AuxiliaryHeadImageNet(_AuxiliaryHead):
  """Auxiliary classifier of the ImageNet network (pool stride 2).

  As in the reference, there is no BatchNorm after the 2x2 conv: the paper's experiments
  ran without it (a typo in the authors' first implementation that they kept). The
  reference docstring says 14x14 input, but NetworkImageNet feeds it the 7x7 map after the
  second reduction, the size at which its classifier fits.
  """
  pool_stride: ClassVar[int] = 2
  bn_after_conv2: ClassVar[bool] = False


def _run_cells(module: nn.Module, s0: jax.Array, s1: jax.Array, train: bool,
               drop_path_prob, C_curr: int, reduction_prev: bool,
               aux_head_cls: type[_AuxiliaryHead]):
  """The cell stack shared by both networks; returns (last state, aux logits or None)."""
  genotype, layers = module.genotype, module.layers
  reductions = reduction_layers(layers)
  C_prev_prev, C_prev = s0.shape[-1], s1.shape[-1]
  logits_aux = None
  for i in range(layers):
    reduction = i in reductions
    if reduction:
      C_curr *= 2
    cell = Cell(genotype, C_prev_prev, C_prev, C_curr, reduction, reduction_prev,
                module.depthwise_impl, name=f"cells_{i}")
    s0, s1 = s1, cell(s0, s1, train, drop_path_prob)
    reduction_prev = reduction
    C_prev_prev, C_prev = C_prev, len(cell_spec(genotype, reduction)[2]) * C_curr
    # At initialisation the head is built in either mode, so the parameter tree does not
    # depend on the mode `init` was called in.
    if (i == reductions[1] and module.auxiliary
        and (train or module.is_initializing())):
      aux = aux_head_cls(C_prev, module.num_classes, name="auxiliary_head")(s1, train)
      logits_aux = aux if train else None
  return s1, logits_aux


class NetworkCIFAR(nn.Module):
  """The DARTS CIFAR network: ``(logits, logits_aux)``, ``logits_aux`` None unless
  ``auxiliary`` and ``train``.

  Params: ``stem_conv``, ``stem_bn``, ``cells_{i}`` (``Cell``), ``auxiliary_head``,
  ``classifier``. The stem accepts any number of input channels.
  """
  genotype: Any
  C: int
  num_classes: int
  layers: int
  auxiliary: bool
  drop_path_prob: float = 0.0
  # The cells' depthwise convolutions (`ops.DEPTHWISE_IMPLS`, resolved): 'conv' or 'taps'.
  depthwise_impl: str = "conv"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, drop_path_prob=None):
    rate = self.drop_path_prob if drop_path_prob is None else drop_path_prob
    stem = conv(3 * self.C, 3, "stem_conv", padding=1)(x)
    stem = BatchNorm(name="stem_bn")(stem, train)
    s1, logits_aux = _run_cells(self, stem, stem, train, rate, self.C, False,
                                AuxiliaryHeadCIFAR)
    logits = nn.Dense(self.num_classes, name="classifier")(jnp.mean(s1, axis=(1, 2)))
    return logits, logits_aux


class NetworkImageNet(nn.Module):
  """The DARTS ImageNet (mobile setting) network: ``(logits, logits_aux)``.

  Params: ``stem0_conv1``, ``stem0_bn1``, ``stem0_conv2``, ``stem0_bn2``, ``stem1_conv``,
  ``stem1_bn``, ``cells_{i}``, ``auxiliary_head``, ``classifier``. The reference's final
  7x7 average pool is a mean over the spatial axes (the same at 224x224 inputs).
  """
  genotype: Any
  C: int
  num_classes: int
  layers: int
  auxiliary: bool
  drop_path_prob: float = 0.0
  # The cells' depthwise convolutions (`ops.DEPTHWISE_IMPLS`, resolved): 'conv' or 'taps'.
  depthwise_impl: str = "conv"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, drop_path_prob=None):
    rate = self.drop_path_prob if drop_path_prob is None else drop_path_prob
    C = self.C
    s0 = conv(C // 2, 3, "stem0_conv1", stride=2, padding=1)(x)
    s0 = nn.relu(BatchNorm(name="stem0_bn1")(s0, train))
    s0 = conv(C, 3, "stem0_conv2", stride=2, padding=1)(s0)
    s0 = BatchNorm(name="stem0_bn2")(s0, train)
    s1 = conv(C, 3, "stem1_conv", stride=2, padding=1)(nn.relu(s0))
    s1 = BatchNorm(name="stem1_bn")(s1, train)
    s1, logits_aux = _run_cells(self, s0, s1, train, rate, C, True, AuxiliaryHeadImageNet)
    logits = nn.Dense(self.num_classes, name="classifier")(jnp.mean(s1, axis=(1, 2)))
    return logits, logits_aux


def count_params(params: Any, exclude_auxiliary: bool = True) -> int:
  """Number of scalars in a ``params`` tree (arrays or ``jax.ShapeDtypeStruct`` leaves).

  Pass ``variables['params']``: BatchNorm running statistics are buffers, not parameters,
  in the reference. As the reference ``utils.count_parameters_in_MB``, the auxiliary head
  (any path with a name containing 'auxiliary') is excluded by default.
  """
  flat = traverse_util.flatten_dict(params)
  return int(sum(
      int(np.prod(leaf.shape)) for path, leaf in flat.items()
      if not (exclude_auxiliary and any("auxiliary" in str(key) for key in path))))
