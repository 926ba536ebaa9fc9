"""The NAS-Bench-201 search supernet, built so that XLA sees a small graph.

The counterpart of ``supernet.SearchNetwork`` for the NB201 space: a port of D-X-Y's
AutoDL-Projects ``models/cell_searchs/search_model_darts.py`` (``TinyNetworkDarts``) and
the search cell of ``search_cells.py``, with the architecture weights an *input* of
``__call__`` (``weights[1, 6, 5]``: cell type, edge, operation, as
``get_space('nb201').alpha_shape``), never a parameter.

The reference search cell at ``C`` channels: node ``i`` (1..3) is the sum over ``j < i`` of
a MixedOp of node ``j``, each MixedOp the weighted sum of its 5 ops with
``none`` = zero, ``skip_connect`` = identity, ``nor_conv_1x1`` / ``nor_conv_3x3`` =
ReLU, bias-free conv, BatchNorm *without* affine parameters (``affine=False,
track_running_stats=True``), ``avg_pool_3x3`` = a plain 3x3 average pool
(``count_include_pad=False``; no BatchNorm, no pre-projection since ``C_in == C_out``).
The network: stem 3x3 conv + affine BN, three stages of ``N`` cells at C, 2C, 4C separated
by stride-2 ResNet basic blocks (affine BN), lastact BN + ReLU, global average pool, linear.

Compile-time design (see ``supernet``'s docstring: on a CPU, XLA's compile time grows with
the number of distinct sub-graphs). The 6 edges of a cell run as two vectorised groups:
- ``inputs``: the 3 edges that read the cell input (node 0) -- (1,0), (2,0), (3,0) -- are
  independent, one body with a leading edge axis;
- ``inner``: the 3 edges between intermediate nodes -- (2,1), (3,1), (3,2) -- as one
  ``lax.scan`` over the target nodes 2 and 3, each iteration evaluating 2 edge slots read
  from a fixed 2-slot buffer (node 1, node 2) with the unused slot (node 2 -> node 2)
  weighted 0: 4 slots computed for 3 edges (``inner_impl='scan'``), or two unrolled bodies
  of 1 and 2 edges (``inner_impl='unroll'``). ``'auto'`` (`resolve_inner_impl`) unrolls
  on every backend and at every size: XLA:CPU runs a convolution inside a loop's body on
  a slow path of its own, and the unrolled nodes also compute 3 edges, not 4 slots.
Within a body the two convolutions share one BatchNorm call. The 3x3 convolutions of a
group (one kernel per edge) are, by ``conv_impl``:
- ``'unroll'``: one dense ``conv_general_dilated`` per edge (Python loop over the edge
  axis; fastest on a CPU, the graph holds one conv per edge of the group);
- ``'vmap'``: ``jax.vmap`` of a dense conv over the edge axis -- JAX lowers a conv with a
  batched kernel to a *grouped* conv (``feature_group_count = E``), which XLA's CPU
  backend runs 10-20x slower (forward + backward); fine on accelerators;
- ``'im2col'``: 9 shifted windows concatenated on channels and one batched matmul
  (``einsum``) with the ``[E, 9C, C]`` kernels: a single dot, 2-4x slower than
  ``'unroll'`` on a CPU;
``'auto'`` picks ``'unroll'`` on CPU and ``'vmap'`` elsewhere (`resolve_conv_impl`).

Parameter layout (what the discrete ``nb201_network.TinyNetwork`` maps to, used by the
tests). Top level as ``TinyNetwork``: ``stem_conv/kernel`` (HWIO), ``stem_bn/{scale,bias}``,
``cells_{i}`` for ``i < 3N + 2`` (search cells, and at ``i = N, 2N + 1`` the ResNet blocks
``conv_a``, ``conv_b`` = ``{conv/kernel, bn/{scale,bias}}`` and ``downsample/kernel``
``[1, 1, C_in, C_out]``), ``lastact_bn/{scale,bias}``, ``classifier/{kernel,bias}``.
BatchNorm running statistics live in ``batch_stats`` as ``mean`` / ``var`` (affine BNs)
and follow PyTorch's rule (momentum 0.1, unbiased variance; ``supernet.batch_norm``).
A search cell holds two edge groups, ``inputs`` and ``inner``, each with
``conv1x1[3, C, C]`` (``[E, C_in, C_out]``), ``conv3x3[3, 3, 3, C, C]`` (``[E, H, W,
C_in, C_out]``) and the statistics ``bn_mean`` / ``bn_var`` ``[3, 2, C]`` (index 1: 0 for
the 1x1 conv's BN, 1 for the 3x3's). Edge order inside a group: ``inputs`` = edges (1,0),
(2,0), (3,0) = weights rows 0, 1, 3; ``inner`` = (2,1), (3,1), (3,2) = rows 2, 4, 5 (the
space's edge order, which is the reference's ``edge2index`` of sorted ``'i<-j'`` keys).
The parameter count equals the reference ``TinyNetworkDarts``'s.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from nanas_jax.nn import functional as F
from nanas_jax.nn.ops import BatchNorm, Classifier
from nanas_jax.nn.supernet import (batch_norm, scan_inner_nodes,
                                    torch_uniform)
from nanas_jax.spaces.nb201 import NB201_OPS, NUM_NODES

NUM_OPS = len(NB201_OPS)
EDGES = tuple((i, j) for i in range(1, NUM_NODES) for j in range(i))  # the space's order
WEIGHTS_SHAPE = (1, len(EDGES), NUM_OPS)
INPUT_EDGES = tuple(k for k, (_, j) in enumerate(EDGES) if j == 0)  # (0, 1, 3)
INNER_EDGES = tuple(k for k, (_, j) in enumerate(EDGES) if j > 0)  # (2, 4, 5)
CONV_IMPLS = ("auto", "unroll", "vmap", "im2col")
INNER_IMPLS = ("auto", "scan", "unroll")
# The operations `nb201_mixed_edges` weighs (``none`` is exactly zero), in its parts' order.
_MIXED = np.array([NB201_OPS.index(name) for name in (
    "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")])


def _dense_conv(x: jax.Array, kernel: jax.Array, stride: int = 1,
                padding: int = 1) -> jax.Array:
  """Bias-free NHWC conv with an HWIO kernel and PyTorch's symmetric padding."""
  return lax.conv_general_dilated(x, kernel, (stride, stride),
                                  ((padding, padding), (padding, padding)),
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


@jax.custom_vjp
def _same_conv_materialized(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`_dense_conv` (3x3, stride 1, 'same') whose gradient reads its input and the output's
  gradient through an optimisation barrier: materialised arrays, where XLA:CPU keeps
  barriers (`bilevel.CPU_KEEP_BARRIERS`). Its kernel's gradient is a convolution over the
  batch that XLA:CPU feeds with transposed copies of both; without the barrier it fused
  into each copy the elementwise chain that computes that array (BatchNorms, mixed sums,
  node sums), evaluated again in the transposed order."""
  return _dense_conv(x, kernel)


def _same_conv_materialized_fwd(x, kernel):
  return _dense_conv(x, kernel), (x, kernel)


def _same_conv_materialized_bwd(residuals, g):
  x, kernel = residuals
  x, g = lax.optimization_barrier((x, g))
  return jax.vjp(_dense_conv, x, kernel)[1](g)


_same_conv_materialized.defvjp(_same_conv_materialized_fwd, _same_conv_materialized_bwd)


def fusion_boundary(x: jax.Array, conv_impl: str) -> jax.Array:
  """``x`` `F.materialized` where the convolutions are the CPU's (``conv_impl`` not
  resolving to ``'vmap'``), else ``x``. Here a cell's output is its node 3, so through
  ``skip_connect`` a whole stage's nodes form one elementwise chain: one supernet
  gradient at the search setting (64 images of 32x32, C = 16, 5 cells a stage) took 8.3
  s, against 2.2-2.7 s with the nodes and the convolutions' gradient inputs materialised
  (`benchmarks/README.md`, "NAS-Bench-201 on a CPU, its nodes computed once"). The
  accelerators' programs are left as they were measured."""
  if resolve_conv_impl(conv_impl) == "vmap":
    return x
  return F.materialized(x)


def resolve_conv_impl(impl: str) -> str:
  """The concrete 3x3 convolution implementation for ``impl`` on the default backend
  (module docstring): ``'auto'`` is ``'unroll'`` on a CPU, ``'vmap'`` elsewhere."""
  if impl not in CONV_IMPLS:
    raise ValueError(f"Unknown conv_impl {impl!r}; use one of {CONV_IMPLS}")
  if impl != "auto":
    return impl
  return "unroll" if jax.default_backend() == "cpu" else "vmap"


def resolve_inner_impl(inner_impl: str) -> str:
  """How a cell evaluates its inner nodes: ``inner_impl``, or for ``'auto'`` unrolled,
  on every backend and at every batch size.

  Unrolled, a cell computes its 3 inner edges rather than the loop's 4 slots, and XLA
  schedules both nodes' edges together. DARTS's first-order search step at
  NAS-Bench-201's setting (64 images of 32x32, C = 16, 5 cells a stage): on this
  project's 2-core CPU 10.8-11.2 s against 30.1-31.0 s looped, its first step shorter;
  compiled for an H200, 19.9 GB moved by 2,915 kernel launches against 41.1 GB by 5,097;
  for a TPU v5e chip, 59.5 ms by XLA's estimate against 109.6 ms, in half the memory.
  On the digits too: XLA:CPU does not hand a convolution inside a loop's body to its
  convolution library, as it does one outside (jax-ml/jax#12868), and the looped step
  spent 0.88 s of its 1.21 s in those convolutions at 64 images of 8x8, C = 16, 5 cells
  a stage, against 0.35 s a step unrolled (C = 8: 0.21-0.23 s against 0.31-0.32 s; the
  README's NAS-Bench-201 quick start: 10-13 ms against 15-16 ms), each with a shorter
  first step (`benchmarks/README.md`, "NAS-Bench-201's convolutions out of loops").
  ``'scan'`` stays for a caller that asks for it."""
  if inner_impl not in INNER_IMPLS:
    raise ValueError(f"Unknown inner_impl {inner_impl!r}; use one of {INNER_IMPLS}")
  return "unroll" if inner_impl == "auto" else inner_impl


def edge_conv3x3(x: jax.Array, kernels: jax.Array, impl: str = "auto") -> jax.Array:
  """3x3 'same' convs of ``x[E, B, H, W, C_in]``, edge ``e`` with ``kernels[e]``
  (``[E, 3, 3, C_in, C_out]``) -> ``[E, B, H, W, C_out]`` (implementations: module
  docstring)."""
  impl = resolve_conv_impl(impl)
  if impl == "unroll":
    return jnp.stack([_same_conv_materialized(x[e], kernels[e]) for e in range(x.shape[0])])
  if impl == "vmap":
    return jax.vmap(_dense_conv)(x, kernels)
  h, w = x.shape[-3:-1]
  xp = F.pad_spatial(x, 1)
  patches = jnp.concatenate([xp[..., a:a + h, b:b + w, :] for a in range(3)
                             for b in range(3)], axis=-1)
  flat = kernels.reshape(kernels.shape[:1] + (-1,) + kernels.shape[-1:])
  return jnp.einsum("ebhwi,eio->ebhwo", patches, flat)


def nb201_mixed_edges(p: dict[str, jax.Array], stats: tuple[jax.Array, jax.Array],
                      xs: jax.Array, weights: jax.Array, train: bool,
                      conv_impl: str = "auto"):
  """A group of ``E`` NB201 MixedOps, one per edge, each with its own parameters ``p``
  (``conv1x1[E, C, C]``, ``conv3x3[E, 3, 3, C, C]``) and statistics ``(mean, var)``
  ``[E, 2, C]``.

  ``xs[E, B, H, W, C]``, ``weights[E, 5]`` -> the weighted sum of the 5 ops of every edge,
  ``[E, B, H, W, C]``, and the updated statistics. ``none`` contributes exactly zero and is
  not computed.
  """
  relu = jax.nn.relu(xs)
  convs = jnp.stack([F.pointwise_conv(relu, p["conv1x1"]),
                     edge_conv3x3(relu, p["conv3x3"], conv_impl)], axis=1)
  convs, new_stats = batch_norm(convs, 2, stats, train)
  out = F.mixed_sum(weights[:, _MIXED],
                    (xs, convs[:, 0], convs[:, 1], F.avg_pool_3x3(xs, 1)))
  return out, new_stats


class _NB201EdgeGroup(nn.Module):
  """Parameters and BatchNorm statistics of ``num_edges`` MixedOps, stacked on axis 0."""
  num_edges: int
  channels: int
  conv_impl: str = "auto"

  def declare(self):
    e, c = self.num_edges, self.channels
    p = {"conv1x1": self.param("conv1x1", torch_uniform(c), (e, c, c)),
         "conv3x3": self.param("conv3x3", torch_uniform(9 * c), (e, 3, 3, c, c))}
    mean = self.variable("batch_stats", "bn_mean", F.running_stats_init(0), (e, 2, c))
    var = self.variable("batch_stats", "bn_var", F.running_stats_init(1), (e, 2, c))
    return p, mean, var

  def check(self, xs: jax.Array, weights: jax.Array, lead: int) -> None:
    e, c = self.num_edges, self.channels
    if xs.shape[0] != lead or xs.shape[-1] != c or weights.shape != (e, NUM_OPS):
      raise ValueError(
          f"{type(self).__name__} expects inputs [{lead}, B, H, W, {c}] and weights "
          f"({e}, {NUM_OPS}), got {xs.shape} and {weights.shape}")

  def store(self, mean, var, new_stats, train: bool) -> None:
    if train and self.is_mutable_collection("batch_stats") and not self.is_initializing():
      mean.value, var.value = new_stats


class InputEdges(_NB201EdgeGroup):
  """``E`` independent MixedOps (the edges that read the cell input).

  ``__call__(xs[E, B, H, W, C], weights[E, 5], train)`` -> ``[E, B, H, W, C]``.
  """

  @nn.compact
  def __call__(self, xs: jax.Array, weights: jax.Array, train: bool) -> jax.Array:
    self.check(xs, weights, self.num_edges)
    p, mean, var = self.declare()
    if self.is_initializing():
      return jnp.zeros_like(xs)  # Shapes are known: no forward pass at initialisation.
    out, new_stats = nb201_mixed_edges(p, (mean.value, var.value), xs, weights, train,
                                       self.conv_impl)
    self.store(mean, var, new_stats, train)
    return out


class InnerEdges(_NB201EdgeGroup):
  """The edges between intermediate nodes of a cell with ``num_nodes`` nodes (node 0 the
  input), node-major: for 4 nodes (2,1), (3,1), (3,2).

  ``__call__(base[num_nodes - 1, B, H, W, C], weights[E, 5], train)`` -> nodes 1.. ``[num_nodes
  - 1, ...]``, where ``base[i - 1]`` is node ``i``'s input-edge sum. ``inner_impl='scan'``:
  one ``lax.scan`` over the targets 2.. with a fixed buffer of ``num_nodes - 2`` earlier
  nodes (1..), the parameters of the target's edges gathered into the slots and unused
  slots weighted 0 (their statistics are not updated); ``'unroll'``: one body per target;
  ``'auto'``: `resolve_inner_impl`.
  """
  num_nodes: int = NUM_NODES
  inner_impl: str = "auto"

  @nn.compact
  def __call__(self, base: jax.Array, weights: jax.Array, train: bool) -> jax.Array:
    n = self.num_nodes
    if self.num_edges != (n - 1) * (n - 2) // 2:
      raise ValueError(f"InnerEdges: {n} nodes have {(n - 1) * (n - 2) // 2} inner edges, "
                       f"got num_edges={self.num_edges}")
    inner_impl = resolve_inner_impl(self.inner_impl)
    self.check(base, weights, n - 1)
    p, mean, var = self.declare()
    if self.is_initializing():
      return base
    if inner_impl == "unroll":
      nodes, new_stats = self._unrolled(p, (mean.value, var.value), base, weights, train)
    else:
      nodes, new_stats = self._scanned(p, (mean.value, var.value), base, weights, train)
    self.store(mean, var, new_stats, train)
    return nodes

  def _unrolled(self, p, stats, base, weights, train):
    nodes, new_mean, new_var, first = [base[0]], stats[0], stats[1], 0
    for i in range(2, self.num_nodes):
      edges = slice(first, first + i - 1)  # node i's edges: a run of the edge axis
      take = lambda a: a[edges]
      out, (m, v) = nb201_mixed_edges(
          jax.tree.map(take, p), (take(stats[0]), take(stats[1])),
          jnp.stack(nodes), take(weights), train, self.conv_impl)
      new_mean = lax.dynamic_update_slice_in_dim(new_mean, m, first, 0)
      new_var = lax.dynamic_update_slice_in_dim(new_var, v, first, 0)
      first += i - 1
      nodes.append(fusion_boundary(base[i - 1] + F.sum_axis(out, 0), self.conv_impl))
    return jnp.stack(nodes), (new_mean, new_var)

  def _scanned(self, p, stats, base, weights, train):
    return scan_inner_nodes(
        base, p, stats, weights, train,
        lambda q, st, xs, w: nb201_mixed_edges(q, st, xs, w, train, self.conv_impl))


class SearchCellNB201(nn.Module):
  """The NB201 search cell (reference ``search_cells`` SearchCell at stride 1, C_in ==
  C_out): ``__call__(x[B, H, W, C], weights[6, 5], train)`` -> node 3."""
  channels: int
  conv_impl: str = "auto"
  inner_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, weights: jax.Array, train: bool) -> jax.Array:
    if weights.shape != WEIGHTS_SHAPE[1:]:
      raise ValueError(f"cell weights must have shape {WEIGHTS_SHAPE[1:]}, "
                       f"got {weights.shape}")
    if x.ndim != 4 or x.shape[-1] != self.channels:
      raise ValueError(f"SearchCellNB201 expects [B, H, W, {self.channels}], got {x.shape}")
    k = len(INPUT_EDGES)
    x = fusion_boundary(x, self.conv_impl)
    ys = InputEdges(k, self.channels, self.conv_impl, name="inputs")(
        jnp.broadcast_to(x, (k,) + x.shape), weights[np.array(INPUT_EDGES)], train)
    nodes = InnerEdges(len(INNER_EDGES), self.channels, self.conv_impl,
                       inner_impl=self.inner_impl, name="inner")(
                           ys, weights[np.array(INNER_EDGES)], train)
    return nodes[-1]


class Conv(nn.Module):
  """A bias-free conv, ``kernel[k, k, C_in, C_out]`` (HWIO), PyTorch's default init;
  initialisation returns zeros of the output shape without computing."""
  features: int
  kernel_size: int
  stride: int = 1
  padding: int = 0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, c_in = self.kernel_size, x.shape[-1]
    kernel = self.param("kernel", torch_uniform(k * k * c_in), (k, k, c_in, self.features))
    if self.is_initializing():
      size = [(s + 2 * self.padding - k) // self.stride + 1 for s in x.shape[1:3]]
      return jnp.zeros((x.shape[0], *size, self.features), x.dtype)
    return _dense_conv(x, kernel, self.stride, self.padding)


class ReLUConvBN(nn.Module):
  """ReLU, conv, affine BatchNorm (PyTorch statistics). Params: ``conv``, ``bn``."""
  features: int
  kernel_size: int
  stride: int
  padding: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = Conv(self.features, self.kernel_size, self.stride, self.padding,
             name="conv")(jax.nn.relu(x))
    return BatchNorm(name="bn")(x, train)


class ResNetReduction(nn.Module):
  """The reference ``ResNetBasicblock(C_in, C_out, stride=2)``: ``conv_a`` (3x3, stride
  2), ``conv_b`` (3x3) as ReLUConvBN, plus the shortcut ``downsample``: a 2x2 average pool
  then a bias-free 1x1 conv (no ReLU, no BN)."""
  features: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if x.shape[1] % 2 or x.shape[2] % 2:
      raise ValueError(f"ResNetReduction needs even spatial sizes, got {x.shape[1:3]}")
    out = ReLUConvBN(self.features, 3, 2, 1, name="conv_a")(x, train)
    out = ReLUConvBN(self.features, 3, 1, 1, name="conv_b")(out, train)
    residual = Conv(self.features, 1, name="downsample")(nn.avg_pool(x, (2, 2), (2, 2)))
    return residual + out


class SearchNetworkNB201(nn.Module):
  """The NB201 search network (reference ``TinyNetworkDarts``), weights as input.

  ``__call__(images[B, H, W, C_in], weights[1, 6, 5], train)`` -> logits ``[B,
  num_classes]``. ``weights`` are used as given (pass a softmax for DARTS, one-hot rows
  for a discrete architecture); edge and op order are ``get_space('nb201')``'s. Every
  stage has ``cells_per_stage`` search cells, at ``channels``, 2x and 4x; ``H`` and
  ``W`` must be divisible by 4. ``inner_impl``: the cells' inner nodes in a loop or
  unrolled, given to every cell (`resolve_inner_impl`).
  """
  num_classes: int
  channels: int = 16
  cells_per_stage: int = 5
  conv_impl: str = "auto"
  inner_impl: str = "auto"

  @nn.compact
  def __call__(self, images: jax.Array, weights: jax.Array, train: bool) -> jax.Array:
    if weights.shape != WEIGHTS_SHAPE:
      raise ValueError(f"architecture weights must have shape {WEIGHTS_SHAPE} (cell type, "
                       f"edge, op), got {weights.shape}")
    x = Conv(self.channels, 3, padding=1, name="stem_conv")(images)
    x = BatchNorm(name="stem_bn")(x, train)
    index = 0
    for stage in range(3):
      c = self.channels * 2 ** stage
      if stage:
        x = ResNetReduction(c, name=f"cells_{index}")(x, train)
        index += 1
      for _ in range(self.cells_per_stage):
        x = SearchCellNB201(c, self.conv_impl, self.inner_impl, name=f"cells_{index}")(
            x, weights[0], train)
        index += 1
    x = jax.nn.relu(BatchNorm(name="lastact_bn")(x, train))
    features = jnp.mean(x, axis=(1, 2))
    fan_in = features.shape[-1]
    return Classifier(self.num_classes, torch_uniform(fan_in), torch_uniform(fan_in),
                      name="classifier")(features)
