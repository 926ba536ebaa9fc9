"""The DARTS search supernet, built so that XLA sees a small graph.

The architecture weights are an *input* of ``__call__`` (``weights[2, 14, 8]``: normal and
reduction cell, edge, operation), never a parameter: softmax weights give DARTS, perturbed
weights give NA-DARTS, one-hot weights give random search with weight sharing, and
``jax.vmap`` over the weights evaluates many architectures with the same parameters.

Compile-time design (DESIGN.md measured 2-5 minutes for a supernet with one sub-graph per
edge; on a CPU, XLA's compile time grows with the number of distinct kernels in the graph).
The 14 edges of a cell are evaluated in two *groups*, each one vectorised MixedOp body:
- ``inputs``: the 8 edges that read the cell inputs (s0, s1 for every node) are independent
  of each other, so they run as one body with a leading edge axis (stride 2 in reduction
  cells);
- ``inner``: the 6 edges between intermediate nodes run as one ``lax.scan`` over the nodes,
  each iteration evaluating a node's edges from a fixed-size buffer of earlier nodes
  (unused slots weighted 0: 9 edge slots computed for 6 edges), or unrolled: one body per
  node, exactly its edges (``inner_impl``). ``'auto'`` unrolls with the accelerators'
  depthwise kernels, and on a CPU from CIFAR-sized batches (`functional.cifar_sized`);
  it scans smaller searches on a CPU, where compile time weighs more (digits, C=8, 5
  cells, batch 64, with ``'taps'``: unrolled 0.39 s a step against 0.46-0.52 s, but a
  first step of 75 s against 43-45 s). Unrolling pays on a CPU at CIFAR sizes, where the
  step outweighs the compile (at B=64, C=16, 8 cells: 28.1 s a step instead of 30.3 s,
  first step 174 s instead of 137 s); on accelerators, with
  ``'conv'``, it is chosen for what XLA's GPU compiler shows (H200, reference size,
  `benchmarks/gpu_compile.py`; the step itself is unmeasured on a GPU): there the scan also
  writes every iteration's saved activations into stacked buffers, a small kernel each, and
  keeps those of the padded slots; unrolled, the DARTS step launches 7,124 kernels instead
  of 11,045, its largest program needs 6.1 GB instead of 9.2 GB and the inner edges do a
  third less work, for a compile about 1.3x as long on a 2-core CPU (three node bodies for
  XLA instead of one loop body).
Within a body, operations that share work are fused: the first-stage depthwise convs of the
sep/dil convs are one call (`functional.depthwise_convs`), their four
pointwise convs one batched matmul, the second stage of the two sep convs likewise, and the
two pools share one BatchNorm call.

Parameter layout (what a discrete cell's weights map to, used by the tests): every array
has a leading edge axis in group order. Group ``inputs``: edge ``2 * node + source`` for
sources 0 and 1; group ``inner``: edge ``i * (i - 1) // 2 + j`` is the edge from
intermediate node ``j`` to node ``i`` (``(1,0), (2,0), (2,1), (3,0), (3,1), (3,2)``).
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
from jax import lax

from nanas_jax.nn import functional as F
from nanas_jax.nn.ops import BatchNorm, Classifier
from nanas_jax.spaces.darts import PRIMITIVES

INNER_IMPLS = ("auto", "scan", "unroll")

# Where the operations that `mixed_edges` weighs (``none`` is exactly zero) sit along the
# last axis of the architecture weights, in its parts' order: the space's operation order
# (`spaces.darts.PRIMITIVES`, the reference's), not a copy of it.
_MIXED = np.array([PRIMITIVES.index(name) for name in (
    "max_pool_3x3", "avg_pool_3x3", "skip_connect", "dil_conv_3x3", "dil_conv_5x5",
    "sep_conv_3x3", "sep_conv_5x5")])
# (kernel size, dilation) of the first depthwise conv of sep3, sep5, dil3, dil5, and of the
# second depthwise conv of sep3, sep5.
_STAGE1 = ((3, 1), (5, 1), (3, 2), (5, 2))
_STAGE2 = ((3, 1), (5, 1))


def torch_uniform(fan_in: int):
  """PyTorch's default conv/linear initialiser: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

  The numbers are drawn on the host (numpy, seeded by the parameter's key): a threefry
  draw per parameter made initialising the supernet compile for 30-40 s on a 2-core CPU.
  Eagerly (``init`` as the search calls it) numpy draws them directly; under a trace
  (``jax.jit``, ``jax.eval_shape``) one callback does, the same numbers. A callback
  called eagerly compiles a small program per parameter shape: that took 4-6 s of a
  3-cell supernet's initialisation.
  """
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    def draw(words):
      rng = np.random.default_rng(np.asarray(words, np.uint32).ravel().tolist())
      return rng.uniform(-bound, bound, size=shape).astype(dtype)

    words = jax.random.key_data(key)
    if not isinstance(words, jax.core.Tracer):
      return jax.device_put(draw(words))  # `jnp.asarray` would compile a copy per shape
    return jax.pure_callback(draw, jax.ShapeDtypeStruct(shape, dtype), words)

  return init


def cell_edges(steps: int) -> list[tuple[int, int]]:
  """(node, source) of each edge in the reference order: node-major, sources 0..node+1."""
  return [(i, j) for i in range(steps) for j in range(2 + i)]


def batch_norm(x: jax.Array, lead: int, stats: tuple[jax.Array, jax.Array],
               train: bool, sources=None, one_pass: bool | None = None,
               shared_output: bool = False
               ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  """The supernet's BatchNorm (affine=False, as the reference's MixedOp ops) of
  ``x[*lead, B, H, W, C]``, statistics per (lead, C): `functional.batch_norm`."""
  return F.batch_norm(x, stats, lead, train, sources=sources, one_pass=one_pass,
                      shared_output=shared_output)


def mixed_edges(p: dict[str, jax.Array], stats: dict[str, tuple], xs: jax.Array,
                weights: jax.Array, stride: int, train: bool, dw_impl: str,
                sources: np.ndarray | None = None, kernel_grads=None):
  """A group of ``E`` DARTS MixedOps, one per edge, each with its own parameters ``p``.

  ``xs[E, B, H, W, C]``, ``weights[E, 8]`` -> the weighted sum of the 8 operations of every
  edge, ``[E, B, H', W', C]``, and the updated BatchNorm statistics ``{name: (mean,
  var)}``. ``none`` contributes exactly zero and is not computed.

  ``sources`` (int ``[E]``, for edges that share inputs): ``xs`` holds the distinct inputs
  ``[S, B, H, W, C]`` and edge ``e`` reads ``xs[sources[e]]``. The parameter-free pools
  and their BatchNorm statistics are then computed once per input, not once per edge (a
  cell's 8 input edges read 2 states). Where the edges read the inputs in turn (a cell's
  ``(s0, s1) * 4``), so, in training, are the normalised pools and the skip connection.

  ``kernel_grads``: None, or a traced boolean; where it is False the convolution kernels'
  gradients are not computed, and are zeros (`functional.kernel_gated`).
  """
  new_stats = {}
  # On a TPU the stride-1 edges' inputs and outputs, and so (by XLA's propagation) most
  # arrays between, lie with the axis that pads least on the lanes (`F.tpu_layout`). Not
  # the reduction cells' stride-2 edges: pinned, NA-DARTS's vmapped neighbors stopped XLA's
  # TPU compiler (libtpu 0.0.42.1) with a failed check on a stride-2 window
  # ("TransformWindow: Loop will not make progress").
  pin = (lambda x: F.tpu_layout(x, dw_impl)) if stride == 1 else (lambda x: x)
  xs = pin(xs)
  # BatchNorm statistics in one pass with the accelerators' kernels (`F.batch_norm_stats`).
  one_pass = F.accelerator_kernels(dw_impl)
  # Edges that read their inputs in turn share the normalised pools (in training, where
  # every edge reading an input normalises it with the same batch statistics) and the
  # skip: `F.mixed_sum` sums their gradients over the edges as adds, not as a broadcast's
  # transpose, a reduction that XLA:CPU gives to YNNPACK (the reference-size step up to 6 %
  # faster, 0.25 GB less memory: benchmarks/README.md).
  tiled = sources is not None and F.tiles(sources, len(xs))

  def bn(name, x, lead, shared=None):
    y, new_stats[name] = batch_norm(x, lead, stats[name], train, shared, one_pass,
                                    shared_output=tiled and shared is not None)
    return y

  pools = jnp.stack([F.max_pool_3x3(xs, stride),
                     F.avg_pool_3x3(xs, stride, windows=F.tpu_kernels(dw_impl))], axis=1)
  pools = bn("pool_bn", pools, 2, shared=sources)
  distinct = xs
  if sources is not None:
    xs = F.take_rows(xs, sources)
  if stride == 1:
    skip = distinct if tiled else xs
  else:
    skip = bn("fr_bn", F.factorized_reduce_convs(xs, p["fr_a"], p["fr_b"], kernel_grads), 1)

  stage1 = F.depthwise_convs(
      jax.nn.relu(xs)[:, None], [p[f"dw1_{i}"] for i in range(len(_STAGE1))],
      [d for _, d in _STAGE1], stride=stride, impl=dw_impl, kernel_grads=kernel_grads)
  stage1 = bn("bn1", F.pointwise_conv(stage1, p["pw1"], kernel_grads), 2)

  stage2 = F.depthwise_convs(
      jax.nn.relu(stage1[:, :2]), [p[f"dw2_{i}"] for i in range(len(_STAGE2))],
      [d for _, d in _STAGE2], impl=dw_impl, kernel_grads=kernel_grads)
  stage2 = bn("bn2", F.pointwise_conv(stage2, p["pw2"], kernel_grads), 2)
  out = F.mixed_sum(weights[:, _MIXED], (pools[:, 0], pools[:, 1], skip, stage1[:, 2],
                                         stage1[:, 3], stage2[:, 0], stage2[:, 1]))
  return pin(out), new_stats


class _EdgeGroup(nn.Module):
  """Parameters and BatchNorm statistics of ``num_edges`` MixedOps, stacked on axis 0."""
  num_edges: int
  channels: int
  stride: int = 1
  dw_impl: str = "auto"

  def bn_shapes(self) -> dict[str, tuple[int, ...]]:
    e, c = self.num_edges, self.channels
    shapes = {"pool_bn": (e, 2, c), "bn1": (e, len(_STAGE1), c),
              "bn2": (e, len(_STAGE2), c)}
    if self.stride > 1:
      shapes["fr_bn"] = (e, c)
    return shapes

  def declare_params(self) -> dict[str, jax.Array]:
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

  def declare_stats(self) -> dict[str, tuple]:
    """The running statistics variables, ``{name: (mean, var)}``."""
    return {name: (self.variable("batch_stats", f"{name}_mean", F.running_stats_init(0),
                                 shape),
                   self.variable("batch_stats", f"{name}_var", F.running_stats_init(1),
                                 shape))
            for name, shape in self.bn_shapes().items()}

  def stats_values(self, variables):
    return {name: (m.value, v.value) for name, (m, v) in variables.items()}

  def store_stats(self, variables, new_stats, train: bool) -> None:
    if train and self.is_mutable_collection("batch_stats") and not self.is_initializing():
      for name, (m, v) in variables.items():
        m.value, v.value = new_stats[name]


class MixedEdges(_EdgeGroup):
  """``E`` independent MixedOps (the edges that read the cell inputs).

  ``__call__(xs[S, B, H, W, C], weights[E, 8], train)`` -> ``[E, B, H', W', C]``: edge
  ``e`` reads input ``sources[e]`` of the ``S`` distinct inputs (default: one per edge).
  """
  sources: tuple[int, ...] | None = None

  @nn.compact
  def __call__(self, xs: jax.Array, weights: jax.Array, train: bool,
               kernel_grads=None) -> jax.Array:
    e, c, s = self.num_edges, self.channels, self.stride
    sources = None if self.sources is None else np.asarray(self.sources)
    inputs = e if sources is None else int(sources.max()) + 1
    if (sources is not None and len(sources) != e) or xs.shape[0] != inputs \
        or xs.shape[-1] != c:
      raise ValueError(f"MixedEdges expects inputs [{inputs}, B, H, W, {c}] for {e} edges, "
                       f"got {xs.shape}")
    p = self.declare_params()
    variables = self.declare_stats()
    if self.is_initializing():
      # Every shape is known from the attributes: initialisation creates the variables
      # without running (or compiling) the forward pass.
      size = (F.output_size(xs.shape[2], s), F.output_size(xs.shape[3], s))
      return jnp.zeros((e,) + xs.shape[1:2] + size + (c,), xs.dtype)
    out, new_stats = mixed_edges(p, self.stats_values(variables), xs, weights, s, train,
                                 self.dw_impl, sources, kernel_grads)
    self.store_stats(variables, new_stats, train)
    return out


def inner_slot_windows(num_nodes: int) -> tuple[np.ndarray, np.ndarray]:
  """For nodes ``1..num_nodes-1``: ``start[i - 1]``, the first of the ``num_nodes - 1``
  consecutive inner edges that node ``i``'s slots read (node-major order of the pairs
  ``j < i``, so node ``i``'s ``i`` edges start at ``i (i - 1) / 2``), and ``used[i - 1,
  j]``: whether slot ``j`` is one of them (the rest belong to later nodes)."""
  nodes = np.arange(1, num_nodes)
  start = (nodes * (nodes - 1) // 2).astype(np.int32)
  used = np.arange(num_nodes - 1)[None, :] < nodes[:, None]
  return start, used


def scan_inner_nodes(base: jax.Array, params, stats, weights: jax.Array, train: bool,
                     edge_fn):
  """Nodes of a cell whose node ``i`` is ``base[i]`` plus MixedOps from nodes ``j < i``.

  One ``lax.scan`` over nodes 1..n-1: each iteration evaluates a node's edges from a
  fixed-size buffer of the earlier nodes, with the parameters, statistics and weights of
  a window of ``n - 1`` consecutive edges starting at the node's first (slices, not
  gathers: a gather's gradient is a scatter, slow to compile and to run on a CPU) and the
  slots past the node's own edges weighted 0, so the graph holds one MixedOp body
  (``edge_fn(params, stats, xs, weights) -> (out, new stats)``) instead of one per node.
  Edges are the pairs ``(i, j < i)`` in node-major order along axis 0 of ``params``,
  ``stats`` leaves and ``weights``. Returns ``(nodes [n, ...], new stats)``; in training
  only the used slots update their edge's statistics.
  """
  n = base.shape[0]
  start_table, used_table = inner_slot_windows(n)
  buffer = jnp.zeros((n - 1,) + base.shape[1:], base.dtype).at[0].set(base[0])

  def node_step(carry, inputs):
    buffer, stats = carry
    i, start, used = inputs
    window = lambda a: lax.dynamic_slice_in_dim(a, start, n - 1)
    slot_params = jax.tree.map(window, params)
    slot_weights = window(weights) * used[:, None].astype(weights.dtype)
    slot_stats = jax.tree.map(window, stats)
    out, new_slot_stats = edge_fn(slot_params, slot_stats, buffer, slot_weights)
    node = base[i] + F.sum_axis(out, 0)
    if train:
      # The used slots' new statistics written back over the window.
      def write(old, old_slots, new_slots):
        mask = used.reshape(used.shape + (1,) * (new_slots.ndim - 1))
        return lax.dynamic_update_slice_in_dim(old, jnp.where(mask, new_slots, old_slots),
                                               start, 0)
      stats = jax.tree.map(write, stats, slot_stats, new_slot_stats)
    # Node i goes to slot i (the last node's write is never read).
    buffer = lax.dynamic_update_index_in_dim(buffer, node, jnp.minimum(i, n - 2), 0)
    return (buffer, stats), node

  (_, new_stats), nodes = lax.scan(
      node_step, (buffer, stats),
      (jnp.arange(1, n), jnp.asarray(start_table), jnp.asarray(used_table)))
  return jnp.concatenate([base[:1], nodes], axis=0), new_stats


def unroll_inner_nodes(base: jax.Array, params, stats, weights: jax.Array, edge_fn,
                       materialize: bool = False):
  """`scan_inner_nodes` unrolled, with the same arguments (but ``train``: every edge is
  used, so every edge's statistics are its body's): node ``i`` is ``base[i]`` plus one
  MixedOp body over exactly its ``i`` inner edges (from nodes ``0..i-1``), so no slot is
  wasted, at the price of one body per node in the graph; with ``materialize`` each node
  `F.materialized`. Returns ``(nodes [n, ...], new stats)``."""
  nodes, new_stats = [base[0]], []
  for i in range(1, base.shape[0]):
    edges = slice(i * (i - 1) // 2, i * (i + 1) // 2)  # node-major pairs (i, j < i)
    take = lambda a: a[edges]
    out, node_stats = edge_fn(jax.tree.map(take, params), jax.tree.map(take, stats),
                              jnp.stack(nodes), take(weights))
    node = base[i] + F.sum_axis(out, 0)
    nodes.append(F.materialized(node) if materialize else node)
    new_stats.append(node_stats)
  return jnp.stack(nodes), jax.tree.map(lambda *a: jnp.concatenate(a), *new_stats)


def resolve_inner_impl(inner_impl: str, dw_impl: str, pixels: int | None = None) -> str:
  """How a cell evaluates its inner nodes: ``inner_impl``, or for ``'auto'``
  `unroll_inner_nodes` with the accelerators' depthwise kernels (``dw_impl``, resolved)
  and with ``'taps'`` from a CIFAR-sized network input of ``pixels`` = batch x height x
  width (None: unknown), else a `scan_inner_nodes` loop."""
  if inner_impl not in INNER_IMPLS:
    raise ValueError(f"Unknown inner_impl {inner_impl!r}; use one of {INNER_IMPLS}.")
  if inner_impl != "auto":
    return inner_impl
  unroll = F.accelerator_kernels(dw_impl) or (dw_impl == "taps" and F.cifar_sized(pixels))
  return "unroll" if unroll else "scan"


class InnerEdges(_EdgeGroup):
  """The edges between intermediate nodes, evaluated as one loop over the nodes
  (``inner_impl='scan'``) or unrolled (``'unroll'``: `unroll_inner_nodes`); ``'auto'``:
  `resolve_inner_impl`.

  Edge ``k`` is the k-th pair ``(node i, source node j < i)`` in node-major order (for 4
  nodes: (1,0), (2,0), (2,1), (3,0), (3,1), (3,2)). Node ``i`` is ``base[i]`` (its input
  edges' sum) plus its inner edges. A ``lax.scan`` over nodes 1..steps-1 evaluates the
  MixedOps of one node from a fixed-size buffer of the earlier nodes, with the parameters of
  that node's edges sliced into the slots and the unused slots weighted 0: the graph
  holds one MixedOp body instead of one per node (compile time), at the cost of computing
  ``(steps - 1)^2`` edge slots for ``steps * (steps - 1) / 2`` edges.

  ``__call__(base[steps, B, H, W, C], weights[E, 8], train)`` -> nodes ``[steps, ...]``.
  ``materialize``: unrolled, each node `F.materialized`.
  """
  steps: int = 4
  inner_impl: str = "auto"
  materialize: bool = False

  @nn.compact
  def __call__(self, base: jax.Array, weights: jax.Array, train: bool,
               kernel_grads=None) -> jax.Array:
    n = self.steps
    if self.num_edges != n * (n - 1) // 2 or base.shape[0] != n:
      raise ValueError(f"InnerEdges: {n} nodes need {n * (n - 1) // 2} edges and base "
                       f"[{n}, B, H, W, C]; got {self.num_edges} and {base.shape}")
    p = self.declare_params()
    variables = self.declare_stats()
    if self.is_initializing():
      return base
    stats = self.stats_values(variables)

    def edge_fn(q, st, xs, w):
      return mixed_edges(q, st, xs, w, 1, train, self.dw_impl, kernel_grads=kernel_grads)

    inner_impl = resolve_inner_impl(self.inner_impl, F.resolve_depthwise_impl(self.dw_impl),
                                    math.prod(base.shape[1:4]))
    if inner_impl == "unroll":
      nodes, new_stats = unroll_inner_nodes(base, p, stats, weights, edge_fn,
                                            self.materialize)
    else:
      nodes, new_stats = scan_inner_nodes(base, p, stats, weights, train, edge_fn)
    self.store_stats(variables, new_stats, train)
    return nodes


class Preprocess(nn.Module):
  """ReLUConvBN 1x1 (or FactorizedReduce when the input is at twice the resolution).
  ``one_pass``: how its BatchNorm statistics are reduced (`F.batch_norm_stats`)."""
  channels: int
  reduce: bool
  one_pass: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, kernel_grads=None) -> jax.Array:
    c_in, c = x.shape[-1], self.channels
    mean = self.variable("batch_stats", "bn_mean", F.running_stats_init(0), (c,))
    var = self.variable("batch_stats", "bn_var", F.running_stats_init(1), (c,))
    if self.reduce:
      kernels = (self.param("fr_a", torch_uniform(c_in), (c_in, c // 2)),
                 self.param("fr_b", torch_uniform(c_in), (c_in, c - c // 2)))
    else:
      kernel = self.param("conv", torch_uniform(c_in), (c_in, c))
    if self.is_initializing():
      stride = 2 if self.reduce else 1
      size = (F.output_size(x.shape[1], stride), F.output_size(x.shape[2], stride))
      return jnp.zeros(x.shape[:1] + size + (c,), x.dtype)
    if self.reduce:
      y = F.factorized_reduce_convs(x, *kernels, kernel_grads)
    else:
      y = F.pointwise_conv(jax.nn.relu(x), kernel, kernel_grads)
    y, new = batch_norm(y, 0, (mean.value, var.value), train, one_pass=self.one_pass)
    if train and self.is_mutable_collection("batch_stats"):
      mean.value, var.value = new
    return y


class SearchCell(nn.Module):
  """One DARTS search cell: ``steps`` nodes, every edge a MixedOp over the 8 operations."""
  channels: int
  reduction: bool
  reduction_prev: bool
  steps: int = 4
  multiplier: int = 4
  dw_impl: str = "auto"
  inner_impl: str = "auto"

  @nn.compact
  def __call__(self, s0, s1, weights, train: bool, kernel_grads=None):
    """``weights[num_edges, 8]`` in the reference edge order (see ``cell_edges``);
    ``kernel_grads`` as `mixed_edges`', for every convolution of the cell."""
    edges = cell_edges(self.steps)
    if weights.shape != (len(edges), len(PRIMITIVES)):
      raise ValueError(f"cell weights must have shape {(len(edges), len(PRIMITIVES))}, "
                       f"got {weights.shape}")
    index = {edge: k for k, edge in enumerate(edges)}
    # 'auto' resolved once for the whole cell, from its input batch (a network passes its
    # own choices down, resolved).
    pixels = math.prod(s1.shape[:3])
    dw_impl = F.resolve_depthwise_impl(self.dw_impl, pixels)
    one_pass = F.accelerator_kernels(dw_impl)  # BatchNorm statistics in one pass
    s0 = Preprocess(self.channels, self.reduction_prev, one_pass, name="preprocess0")(
        s0, train, kernel_grads)
    s1 = Preprocess(self.channels, False, one_pass, name="preprocess1")(s1, train,
                                                                        kernel_grads)
    inner_impl = resolve_inner_impl(self.inner_impl, dw_impl, pixels)
    # With the CPU's kernels and the nodes unrolled (CIFAR-sized batches), the cell's
    # inputs, its nodes' input-edge sums and its nodes are each computed once
    # (`F.materialized`): at B=16, C=8, 5 cells, 32x32 the first-order step ran 15-34 %
    # faster (NA-DARTS K=4 17 %, the reference size 8 %), in 0.1-0.3 GB less memory
    # (`benchmarks/README.md`, "DARTS's cells, their nodes computed once"). In the loop
    # (smaller batches) it measured level, and is left as it was.
    materialize = inner_impl == "unroll" and not F.accelerator_kernels(dw_impl)
    if materialize:
      s0, s1 = F.materialized((s0, s1))

    input_edges = np.array([index[(i, j)] for i in range(self.steps) for j in (0, 1)])
    # Edge 2 * node + source reads s0 (source 0) or s1 (source 1).
    ys = MixedEdges(2 * self.steps, self.channels, 2 if self.reduction else 1,
                    dw_impl, sources=(0, 1) * self.steps, name="inputs")(
                        jnp.stack([s0, s1]), weights[input_edges], train, kernel_grads)
    base = F.sum_axis(ys.reshape((self.steps, 2) + ys.shape[1:]), 1)
    if materialize:
      base = F.materialized(base)
    inner_edges = np.array([index[(i, 2 + j)] for i in range(1, self.steps) for j in range(i)])
    nodes = InnerEdges(len(inner_edges), self.channels, 1, dw_impl, steps=self.steps,
                       inner_impl=inner_impl, materialize=materialize,
                       name="inner")(base, weights[inner_edges], train, kernel_grads)
    return jnp.concatenate(list(nodes[-self.multiplier:]), axis=-1)


class SearchNetwork(nn.Module):
  """The DARTS search network (reference ``model_search.Network``), weights as input.

  ``__call__(images[B, H, W, C_in], weights[2, num_edges, 8], train)`` -> logits. Index 0
  of ``weights`` is the normal cell, index 1 the reduction cell. Reduction cells sit at
  ``layers // 3`` and ``2 * layers // 3`` and double the channels. ``dw_impl``: the
  depthwise convolutions (`functional.DEPTHWISE_IMPLS`); ``inner_impl``: the cells' inner
  nodes in a loop or unrolled (`INNER_IMPLS`, `resolve_inner_impl`). ``kernel_grads``
  (None, or a traced boolean): where False, the cells' convolution kernels get no
  gradient (zeros, not computed: `functional.kernel_gated`); the stem's and the
  classifier's always do.
  """
  num_classes: int
  channels: int = 16
  layers: int = 8
  steps: int = 4
  multiplier: int = 4
  stem_multiplier: int = 3
  dw_impl: str = "auto"
  inner_impl: str = "auto"

  @nn.compact
  def __call__(self, images: jax.Array, weights: jax.Array, train: bool,
               kernel_grads=None) -> jax.Array:
    num_edges = len(cell_edges(self.steps))
    if weights.shape != (2, num_edges, len(PRIMITIVES)):
      raise ValueError(
          f"architecture weights must have shape (2, {num_edges}, {len(PRIMITIVES)}) "
          f"(normal/reduce, edge, op), got {weights.shape}")
    c_curr = self.stem_multiplier * self.channels
    # One depthwise implementation and one form of the inner nodes for every cell, chosen
    # from the input batch (later cells see fewer pixels).
    pixels = math.prod(images.shape[:3])
    dw_impl = F.resolve_depthwise_impl(self.dw_impl, pixels)
    inner_impl = resolve_inner_impl(self.inner_impl, dw_impl, pixels)
    x = nn.Conv(c_curr, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                kernel_init=torch_uniform(9 * images.shape[-1]),
                name="stem_conv")(images)
    x = BatchNorm(one_pass=F.accelerator_kernels(dw_impl), name="stem_bn")(x, train)
    s0 = s1 = x
    c_curr = self.channels
    reduction_prev = False
    for i in range(self.layers):
      reduction = i in reduction_layers(self.layers)
      if reduction:
        c_curr *= 2
      cell = SearchCell(c_curr, reduction, reduction_prev, self.steps, self.multiplier,
                        dw_impl, inner_impl, name=f"cell{i}")
      s0, s1 = s1, cell(s0, s1, weights[1 if reduction else 0], train, kernel_grads)
      reduction_prev = reduction
    features = jnp.mean(s1, axis=(1, 2))
    fan_in = features.shape[-1]
    return Classifier(self.num_classes, torch_uniform(fan_in), torch_uniform(fan_in),
                      name="classifier")(features)


def reduction_layers(layers: int) -> Sequence[int]:
  """Indices of the reduction cells in a network of ``layers`` cells (DARTS's rule)."""
  return (layers // 3, 2 * layers // 3)
