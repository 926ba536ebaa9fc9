"""The DARTS search supernet, built so that XLA sees a small graph.

The architecture weights are an *input* of ``__call__`` (``weights[2, 14, 8]``: normal and
reduction cell, edge, operation), never a parameter: softmax weights give DARTS, perturbed
weights give NA-DARTS, one-hot weights give random search with weight sharing, and
``jax.vmap`` over the weights evaluates many architectures with the same parameters.

Compile-time design (DESIGN.md measured 2-5 minutes for a supernet with one sub-graph per
edge). The 14 edges of a cell are evaluated in *groups*, each group one vectorised body:
- the 8 edges that read the cell inputs (s0, s1 for every node) are independent of each
  other, so they run as one body with a leading edge axis (stride 2 in reduction cells);
- the edges between intermediate nodes run as one body per node (1, 2 and 3 edges).
Within a body, the operations that share work are fused: the four first-stage pointwise
convs of sep/dil convs are one batched matmul, as are the two second-stage ones of the sep
convs; the two pools share one BatchNorm call. A cell is then 4 bodies instead of 14
MixedOps of 7 sub-graphs each, at no extra arithmetic.

Parameter layout (what a discrete cell's weights map to, used by the tests): every array
has a leading edge axis in group order. Group ``inputs``: edge ``2 * node + source`` for
sources 0 and 1; group ``node{i}``: edge ``j`` is the edge from intermediate node ``j``.
``dw1_{k}`` are the first depthwise kernels of sep_conv_3x3, sep_conv_5x5, dil_conv_3x3,
dil_conv_5x5 (k = 0..3), ``pw1[E, 4, C, C]`` their pointwise kernels in the same order;
``dw2_{k}`` / ``pw2[E, 2, C, C]`` the second stage of sep_conv_3x3 and sep_conv_5x5;
``fr_a`` / ``fr_b`` the FactorizedReduce of skip_connect in reduction groups. The parameter
count equals the reference ``model_search.Network``'s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nanas_jax.nn import functional as F

# Operation order of the DARTS space (quark0/darts genotypes.PRIMITIVES).
DARTS_OPS = ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3",
             "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")
# (kernel size, dilation) of the first depthwise conv of sep3, sep5, dil3, dil5, and of the
# second depthwise conv of sep3, sep5.
_STAGE1 = ((3, 1), (5, 1), (3, 2), (5, 2))
_STAGE2 = ((3, 1), (5, 1))
# BatchNorm defaults of PyTorch, which the reference uses: momentum 0.1, eps 1e-5.
BN_MOMENTUM = 0.9
BN_EPS = 1e-5


def torch_uniform(fan_in: int):
  """PyTorch's default conv/linear initialiser: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

  The numbers are drawn on the host (numpy, seeded by the parameter's key) through one
  callback: a threefry draw per parameter made initialising the supernet compile for
  30-40 s on a 2-core CPU, the callback for about one.
  """
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    def draw(words):
      rng = np.random.default_rng(np.asarray(words, np.uint32).ravel().tolist())
      return rng.uniform(-bound, bound, size=shape).astype(dtype)

    return jax.pure_callback(draw, jax.ShapeDtypeStruct(shape, dtype),
                             jax.random.key_data(key))

  return init


def cell_edges(steps: int) -> list[tuple[int, int]]:
  """(node, source) of each edge in the reference order: node-major, sources 0..node+1."""
  return [(i, j) for i in range(steps) for j in range(2 + i)]


class _Layer(nn.Module):
  """Shared helpers: an affine-free BatchNorm with running statistics."""

  def batch_norm(self, name: str, x: jax.Array, lead: int, train: bool) -> jax.Array:
    """BatchNorm (affine=False) of ``x[*lead, B, H, W, C]``, statistics per (lead, C).

    Running averages follow PyTorch (unbiased variance, momentum 0.1); training uses the
    batch statistics, evaluation the running ones.
    """
    mean_var, var_var = self.running_stats(name, x.shape[:lead] + x.shape[-1:])
    if train:
      mean, var = F.batch_norm_stats(x, lead)
      if self.is_mutable_collection("batch_stats"):
        n = x.shape[lead] * x.shape[lead + 1] * x.shape[lead + 2]
        unbiased = var * (n / max(n - 1, 1))
        mean_var.value = BN_MOMENTUM * mean_var.value + (1 - BN_MOMENTUM) * mean
        var_var.value = BN_MOMENTUM * var_var.value + (1 - BN_MOMENTUM) * unbiased
    else:
      mean, var = mean_var.value, var_var.value
    return F.batch_norm_apply(x, mean, var, lead, BN_EPS)

  def running_stats(self, name: str, shape: tuple[int, ...]):
    """The running mean and variance variables of BatchNorm ``name``."""
    return (self.variable("batch_stats", f"{name}_mean", jnp.zeros, shape),
            self.variable("batch_stats", f"{name}_var", jnp.ones, shape))


class MixedEdges(_Layer):
  """A group of ``E`` DARTS MixedOps, one per edge, each with its own parameters.

  ``__call__(xs[E, B, H, W, C], weights[E, 8])`` returns the weighted sum of the 8
  operations of every edge, ``[E, B, H', W', C]``. ``none`` contributes exactly zero and is
  not computed.
  """
  num_edges: int
  channels: int
  stride: int
  dw_impl: str = "auto"

  @nn.compact
  def __call__(self, xs: jax.Array, weights: jax.Array, train: bool) -> jax.Array:
    e, c, s = self.num_edges, self.channels, self.stride
    if xs.shape[0] != e or xs.shape[-1] != c:
      raise ValueError(f"MixedEdges expects inputs [{e}, B, H, W, {c}], got {xs.shape}")
    p = self.declare_params()
    if self.is_initializing():
      # Every shape is known from the attributes: initialisation creates the variables
      # without running (or compiling) the forward pass.
      self.running_stats("pool_bn", (e, 2, c))
      self.running_stats("bn1", (e, len(_STAGE1), c))
      self.running_stats("bn2", (e, len(_STAGE2), c))
      if s > 1:
        self.running_stats("fr_bn", (e, c))
      size = (F.output_size(xs.shape[2], s), F.output_size(xs.shape[3], s))
      return jnp.zeros(xs.shape[:2] + size + (c,), xs.dtype)
    w = weights.reshape(weights.shape + (1, 1, 1, 1))  # broadcast over B, H, W, C

    pools = jnp.stack([F.max_pool_3x3(xs, s), F.avg_pool_3x3(xs, s)], axis=1)
    pools = self.batch_norm("pool_bn", pools, 2, train)
    out = w[:, 1] * pools[:, 0] + w[:, 2] * pools[:, 1]

    if s == 1:
      out = out + w[:, 3] * xs
    else:
      fr = F.factorized_reduce_convs(xs, p["fr_a"], p["fr_b"])
      out = out + w[:, 3] * self.batch_norm("fr_bn", fr, 1, train)

    stage1 = F.depthwise_convs(
        jax.nn.relu(xs)[:, None], [p[f"dw1_{i}"] for i in range(len(_STAGE1))],
        [d for _, d in _STAGE1], stride=s, impl=self.dw_impl)
    stage1 = self.batch_norm("bn1", F.pointwise_conv(stage1, p["pw1"]), 2, train)
    out = out + w[:, 6] * stage1[:, 2] + w[:, 7] * stage1[:, 3]

    stage2 = F.depthwise_convs(
        jax.nn.relu(stage1[:, :2]), [p[f"dw2_{i}"] for i in range(len(_STAGE2))],
        [d for _, d in _STAGE2], impl=self.dw_impl)
    stage2 = self.batch_norm("bn2", F.pointwise_conv(stage2, p["pw2"]), 2, train)
    return out + w[:, 4] * stage2[:, 0] + w[:, 5] * stage2[:, 1]

  def declare_params(self) -> dict[str, jax.Array]:
    """Creates (or fetches) every parameter of the group."""
    e, c = self.num_edges, self.channels
    p = {}
    for i, (k, _) in enumerate(_STAGE1):
      p[f"dw1_{i}"] = self.param(f"dw1_{i}", torch_uniform(k * k), (e, k, k, c))
    p["pw1"] = self.param("pw1", torch_uniform(c), (e, len(_STAGE1), c, c))
    for i, (k, _) in enumerate(_STAGE2):
      p[f"dw2_{i}"] = self.param(f"dw2_{i}", torch_uniform(k * k), (e, k, k, c))
    p["pw2"] = self.param("pw2", torch_uniform(c), (e, len(_STAGE2), c, c))
    if self.stride > 1:
      p["fr_a"] = self.param("fr_a", torch_uniform(c), (e, c, c // 2))
      p["fr_b"] = self.param("fr_b", torch_uniform(c), (e, c, c - c // 2))
    return p


class Preprocess(_Layer):
  """ReLUConvBN 1x1 (or FactorizedReduce when the input is at twice the resolution)."""
  channels: int
  reduce: bool

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    c_in, c = x.shape[-1], self.channels
    if self.reduce:
      kernels = (self.param("fr_a", torch_uniform(c_in), (c_in, c // 2)),
                 self.param("fr_b", torch_uniform(c_in), (c_in, c - c // 2)))
    else:
      kernel = self.param("conv", torch_uniform(c_in), (c_in, c))
    if self.is_initializing():
      self.running_stats("bn", (c,))
      stride = 2 if self.reduce else 1
      size = (F.output_size(x.shape[1], stride), F.output_size(x.shape[2], stride))
      return jnp.zeros(x.shape[:1] + size + (c,), x.dtype)
    if self.reduce:
      y = F.factorized_reduce_convs(x, *kernels)
    else:
      y = F.pointwise_conv(jax.nn.relu(x), kernel)
    return self.batch_norm("bn", y, 0, train)


class SearchCell(nn.Module):
  """One DARTS search cell: ``steps`` nodes, every edge a MixedOp over the 8 operations."""
  channels: int
  reduction: bool
  reduction_prev: bool
  steps: int = 4
  multiplier: int = 4
  dw_impl: str = "auto"

  @nn.compact
  def __call__(self, s0, s1, weights, train: bool):
    """``weights[num_edges, 8]`` in the reference edge order (see ``cell_edges``)."""
    edges = cell_edges(self.steps)
    if weights.shape != (len(edges), len(DARTS_OPS)):
      raise ValueError(f"cell weights must have shape {(len(edges), len(DARTS_OPS))}, "
                       f"got {weights.shape}")
    index = {edge: k for k, edge in enumerate(edges)}
    s0 = Preprocess(self.channels, self.reduction_prev, name="preprocess0")(s0, train)
    s1 = Preprocess(self.channels, False, name="preprocess1")(s1, train)

    input_edges = [index[(i, j)] for i in range(self.steps) for j in (0, 1)]
    xs = jnp.broadcast_to(jnp.stack([s0, s1]), (self.steps,) + (2,) + s0.shape)
    ys = MixedEdges(2 * self.steps, self.channels, 2 if self.reduction else 1,
                    self.dw_impl, name="inputs")(
                        xs.reshape((2 * self.steps,) + s0.shape), weights[np.array(input_edges)],
                        train)
    nodes = []
    for i in range(self.steps):
      node = ys[2 * i] + ys[2 * i + 1]
      if i:
        inner = [index[(i, 2 + j)] for j in range(i)]
        node = node + MixedEdges(i, self.channels, 1, self.dw_impl, name=f"node{i}")(
            jnp.stack(nodes), weights[np.array(inner)], train).sum(axis=0)
      nodes.append(node)
    return jnp.concatenate(nodes[-self.multiplier:], axis=-1)


class SearchNetwork(nn.Module):
  """The DARTS search network (reference ``model_search.Network``), weights as input.

  ``__call__(images[B, H, W, C_in], weights[2, num_edges, 8], train)`` -> logits. Index 0
  of ``weights`` is the normal cell, index 1 the reduction cell. Reduction cells sit at
  ``layers // 3`` and ``2 * layers // 3`` and double the channels.
  """
  num_classes: int
  channels: int = 16
  layers: int = 8
  steps: int = 4
  multiplier: int = 4
  stem_multiplier: int = 3
  dw_impl: str = "auto"

  @nn.compact
  def __call__(self, images: jax.Array, weights: jax.Array, train: bool) -> jax.Array:
    num_edges = len(cell_edges(self.steps))
    if weights.shape != (2, num_edges, len(DARTS_OPS)):
      raise ValueError(
          f"architecture weights must have shape (2, {num_edges}, {len(DARTS_OPS)}) "
          f"(normal/reduce, edge, op), got {weights.shape}")
    c_curr = self.stem_multiplier * self.channels
    x = nn.Conv(c_curr, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                kernel_init=torch_uniform(9 * images.shape[-1]),
                name="stem_conv")(images)
    x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPS,
                     name="stem_bn")(x)
    s0 = s1 = x
    c_curr = self.channels
    reduction_prev = False
    for i in range(self.layers):
      reduction = i in reduction_layers(self.layers)
      if reduction:
        c_curr *= 2
      cell = SearchCell(c_curr, reduction, reduction_prev, self.steps, self.multiplier,
                        self.dw_impl, name=f"cell{i}")
      s0, s1 = s1, cell(s0, s1, weights[1 if reduction else 0], train)
      reduction_prev = reduction
    features = jnp.mean(s1, axis=(1, 2))
    fan_in = features.shape[-1]
    return nn.Dense(self.num_classes, kernel_init=torch_uniform(fan_in),
                    bias_init=torch_uniform(fan_in), name="classifier")(features)


def reduction_layers(layers: int) -> Sequence[int]:
  """Indices of the reduction cells in a network of ``layers`` cells (DARTS's rule)."""
  return (layers // 3, 2 * layers // 3)
