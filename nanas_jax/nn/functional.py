"""Pure array functions behind the search supernet (NHWC, any number of leading axes).

The search supernet evaluates many edges at once (a leading edge axis on every array), so
its building blocks are written as plain functions of arrays rather than linen modules:
`jax.vmap` and leading batch axes then compose without lifted transforms, and XLA sees one
small body per group of edges instead of one sub-graph per edge.

Depthwise convolutions have several implementations with the same results (up to float
rounding):
- ``'conv'``: ``lax.conv_general_dilated`` with ``feature_group_count``, one call for each
  run of kernels with one dilation (for GPUs; XLA's CPU backend runs grouped
  convolutions through a slow generic path: a DARTS supernet step measured 6x slower);
- ``'scan'``: a loop over the kernel taps, each a strided window of the input times the
  tap's per-channel weights, one loop per kernel, with a hand-written gradient that is
  one such loop too (`_tap_loop`). The graph holds one tap per kernel however large the
  kernels are (the shortest compile on a CPU), but every tap reads and writes the whole
  accumulator: memory-bound;
- ``'taps'``: per kernel, the sum of its taps unrolled (one fused loop that reads the
  input from cache), with a hand-written gradient of the same kind
  (`depthwise_conv_taps`). Measured on a 2-core CPU, 8 edges' first-stage convs (C=16,
  batch 64, 32x32, forward and backward): 0.4 s against 1.4 s for ``'scan'`` and 0.7 s
  for the C x C diagonal kernels of XLA:CPU's dense convolution (the ``'dense'``
  implementation of an earlier version, slower than ``'taps'`` at every size measured,
  and gone); the graph holds every tap, so it compiles slower than ``'scan'``;
- ``'taps_fused'``: ``'taps'`` with its kernel gradient one reduction over the whole
  batch instead of a loop over chunks that stay in a CPU's cache: for accelerators,
  where it leaves the depthwise convolutions no cuDNN call, so none to autotune and no
  execution plan to build at a program's first run. Compiled for an H200
  by JAX 0.11.2 (reference-size DARTS step, on a 2-core CPU host), it launches 4,084
  kernels a step against 5,328 for ``'conv'``, with 74 distinct library calls to
  autotune against 192, but compiles 2.7x as long (145.0 s against 53.5 s): which is
  faster on a GPU only a GPU can say (`benchmarks/README.md`);
- ``'conv_each'``: ``'conv'`` with a convolution a kernel, faster on a TPU by XLA's
  estimate (`_depthwise_convs_grouped`).
``'auto'`` picks ``'conv'`` on a GPU, ``'conv_each'`` on a TPU; on a CPU ``'taps'`` when
the step's arithmetic pays for the longer compile (a batch of at least `TAPS_MIN_PIXELS`
input pixels, batch x height x width: the digits quick starts and CIFAR-sized searches),
else ``'scan'`` (the tests' small batches, where compile time dominates).

With the TPU's implementation, `tpu_layout` pins a search cell's activations to the layout
that pads least on a TPU's 128-lane vector registers.
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import layout

DEPTHWISE_IMPLS = ("auto", "taps", "scan", "conv", "conv_each", "taps_fused")
# The implementations built for accelerators (`accelerator_kernels`).
ACCELERATOR_IMPLS = ("conv", "conv_each", "taps_fused")


# Batch x height x width of a network's input from which ``'auto'`` picks ``'taps'`` on a
# CPU: digits batches of 32 (8x8) or more. Measured (benchmarks/README.md, "'taps' at
# digits sizes"), DARTS first order, inner nodes in a loop: the README's quick start
# (C=4, batch 32: 2048 pixels) 0.161 s a step against 0.261 s for 'scan', first step
# 39.6 s against 32.0 s, and its whole NA-DARTS search 188 s against 239 s; at half that
# batch (the tests' size, C=4, 3 cells, batch 16) 0.052 s against 0.107 s, but 5.2 s more
# compile, which the tests' few steps never pay back.
TAPS_MIN_PIXELS = 2048
# Batch x height x width from which a CPU search counts as CIFAR-sized (`cifar_sized`):
# 32x32 batches of 8 or more.
CIFAR_MIN_PIXELS = 8192


def resolve_depthwise_impl(impl: str, pixels: int | None = None) -> str:
  """The concrete depthwise implementation for ``impl`` on the default backend, for a
  network whose input batch has ``pixels`` = batch x height x width (None: unknown)."""
  if impl not in DEPTHWISE_IMPLS:
    raise ValueError(
        f"Unknown depthwise implementation {impl!r}; use one of {DEPTHWISE_IMPLS}.")
  if impl != "auto":
    return impl
  if jax.default_backend() == "tpu":
    return "conv_each"
  if jax.default_backend() != "cpu":
    return "conv"
  return "taps" if pixels is not None and pixels >= TAPS_MIN_PIXELS else "scan"


def cifar_sized(pixels: int | None) -> bool:
  """Whether a network input batch of ``pixels`` = batch x height x width (None: unknown)
  is CIFAR-sized, at least `CIFAR_MIN_PIXELS`: where the CPU's ``'auto'`` choices (a
  cell's inner nodes unrolled, NA-DARTS's neighbors in one program) switch to the form
  that compiles longer and runs faster."""
  return pixels is not None and pixels >= CIFAR_MIN_PIXELS


def accelerator_kernels(impl: str) -> bool:
  """Whether the depthwise implementation ``impl`` is built for accelerators
  (`ACCELERATOR_IMPLS`: ``'conv'`` and ``'conv_each'``, what ``'auto'`` picks on a GPU
  and on a TPU, and ``'taps_fused'``). The supernet and the search choose what suits an
  accelerator by it rather than by the backend, so that a step compiled for a GPU or a
  TPU on a CPU host (`benchmarks/gpu_compile.py`, which asks for one of these) is the
  step the accelerator runs."""
  return resolve_depthwise_impl(impl) in ACCELERATOR_IMPLS


def tpu_kernels(impl: str) -> bool:
  """Whether the depthwise implementation ``impl`` is the TPU's (``'conv_each'``, what
  ``'auto'`` picks on a TPU): where the supernet lays its cells out for a TPU
  (`tpu_layout`) and sums its average pools as windows (`avg_pool_3x3`)."""
  return resolve_depthwise_impl(impl) == "conv_each"


# XLA's TPU layouts tile an array's two minor axes by (8, 128): the minor axis fills the
# 128 lanes of a vector register, padded up to a multiple of 128 (`tpu_lane_axis`).
TPU_LANES = 128
# The axes of ``x[*lead, B, H, W, C]`` that may go on a TPU's lanes, in order of preference
# where they pad alike: the channels first (XLA's own choice for most of a cell).
TPU_LANE_AXES = ("channels", "batch", "width")


def tpu_lane_axis(batch: int, width: int, channels: int) -> str:
  """The axis of an NHWC activation, with ``batch`` rows on each TPU chip, that pads least
  when it is the minor one, on the 128 lanes: ``'channels'``, ``'batch'`` or ``'width'``
  (ties in `TPU_LANE_AXES`'s order).

  Left to itself, XLA's TPU compiler lays most of a search cell out with the channels
  minor: at C = 16 every vector register holds 16 lanes of 128, and the element-wise
  work, most of the step, is 8x what it needs. By its own estimate of one cell's gradient
  (DARTS, v5e), the axis picked here was the fastest of the three, or within 3 % of it,
  at each of the 7 cell shapes measured: at the reference size's first cells (64 images,
  32x32, C = 16) batch-minor 46.9 ms against 120.4 ms as XLA lays it out (width-minor
  82.5, channels-minor 150.3); at 16 images, 32x32, C = 8 width-minor 10.3 ms against
  26.0 (`benchmarks/README.md`, "A TPU layout for the search cells")."""
  padding = {"batch": batch, "width": width, "channels": channels}
  padding = {axis: -(-n // TPU_LANES) * TPU_LANES / n for axis, n in padding.items()}
  return min(TPU_LANE_AXES, key=lambda axis: padding[axis])


def tpu_layout(x: jax.Array, impl: str) -> jax.Array:
  """``x[*lead, B, H, W, C]`` with its layout pinned for XLA's TPU compiler where
  ``impl``, a depthwise implementation, resolves to the TPU's (``'conv_each'``) and the
  batch or the width pads less than the channels on the lanes; else ``x`` itself. The
  same values: only how they lie in memory changes.

  The lead axes stay major; the minor axis, on the lanes, is `tpu_lane_axis`'s for the
  batch on each device (``B`` over the devices of the data mesh, which holds every
  device), and the channels go on the 8 sublanes. A gradient's cotangent takes the same
  layout (``with_layout_constraint`` is linear). Where the channels pad least, XLA's own
  layout, mostly channels-minor already, is left alone: pinned channels-minor, the cells
  measured gained at most 6 %."""
  if not tpu_kernels(impl):
    return x
  lead = tuple(range(x.ndim - 4))
  b, h, w, c = (len(lead) + i for i in range(4))
  batch, devices = x.shape[b], jax.device_count()
  per_device = batch // devices if batch % devices == 0 else batch
  lanes = tpu_lane_axis(per_device, x.shape[w], x.shape[c])
  if lanes == "channels":
    return x
  minor = (h, w, c, b) if lanes == "batch" else (b, h, c, w)
  return layout.with_layout_constraint(x, layout.Layout(lead + minor))


def output_size(size: int, stride: int) -> int:
  """Spatial size after a 'same'-padded window op with ``stride`` (PyTorch's ceil rule)."""
  return (size - 1) // stride + 1


def pad_spatial(x: jax.Array, pad: int, value: float = 0.0) -> jax.Array:
  """Pads the two spatial axes (-3, -2) of an NHWC array by ``pad`` on each side with
  ``value`` (zeros by default)."""
  widths = [(0, 0)] * (x.ndim - 3) + [(pad, pad), (pad, pad), (0, 0)]
  return jnp.pad(x, widths, constant_values=value)


def depthwise_convs(x: jax.Array, kernels, dilations, *, stride: int = 1,
                    impl: str = "auto", kernel_grads=None) -> jax.Array:
  """Several depthwise 'same' convolutions at once: ``[*lead, n, B, H', W', C]``.

  ``x[*lead, G, B, H, W, C]`` holds one input per kernel (``G = n``) or one shared by all
  (``G = 1``); ``kernels[g]`` is ``[*lead, k_g, k_g, C]`` with dilation ``dilations[g]``.
  With ``'scan'`` every tap of a kernel is one iteration of that kernel's loop, so the
  compiled graph holds one tap per kernel however large the kernels are.
  ``kernel_grads``: `kernel_gated`'s, for all of the kernels.
  """
  lead = kernels[0].ndim - 3
  n = len(kernels)
  if x.shape[lead] not in (1, n):
    raise ValueError(f"depthwise_convs: {n} kernels need 1 or {n} inputs on axis {lead}, "
                     f"got {x.shape[lead]}")
  return kernel_gated(functools.partial(_depthwise_convs, dilations=dilations, stride=stride,
                                        impl=resolve_depthwise_impl(impl), lead=lead),
                      x, kernels, kernel_grads)


def _depthwise_convs(x, kernels, dilations, stride, impl, lead):
  """`depthwise_convs` with ``impl`` resolved."""
  if impl in ("taps", "taps_fused"):
    shared = x.shape[lead] == 1
    chunk = TAPS_BATCH_CHUNK if impl == "taps" else 0
    return jnp.stack([
        depthwise_conv_taps(lax.index_in_dim(x, 0 if shared else g, lead, keepdims=False),
                            kernel, d, stride, chunk)
        for g, (kernel, d) in enumerate(zip(kernels, dilations))], axis=lead)
  if impl in ("conv", "conv_each"):
    return _depthwise_convs_grouped(x, kernels, dilations, stride, lead,
                                    by_dilation=impl == "conv")
  needs = [d * (k.shape[-2] - 1) // 2 for k, d in zip(kernels, dilations)]
  pad = max(needs)
  h_out = output_size(x.shape[-3], stride)
  w_out = output_size(x.shape[-2], stride)
  return _depthwise_convs_scan(pad_spatial(x, pad), kernels, dilations, needs, pad, stride,
                               h_out, w_out, lead)


def _depthwise_convs_scan(xp, kernels, dilations, needs, pad, stride, h_out, w_out, lead):
  """``'scan'`` implementation: per kernel, one loop over its taps (`_tap_loop`).
  Unrolled, the 102 taps of a DARTS MixedOp made compile time grow with the kernel sizes
  (2-3x slower here) and ran no faster; one loop over the taps of all kernels, with the
  kernel's accumulator picked by a dynamic index, ran 1.3-1.9x slower than a loop per
  kernel (measured on 8 edges' first-stage convs, C = 4..8) and compiled about as
  fast."""
  shared = xp.shape[lead] == 1
  outs = []
  for g, (kernel, d, need) in enumerate(zip(kernels, dilations, needs)):
    xg = lax.index_in_dim(xp, 0 if shared else g, lead, keepdims=False)
    k = kernel.shape[-2]
    taps = jnp.moveaxis(kernel.reshape(kernel.shape[:lead] + (k * k,) + kernel.shape[-1:]),
                        lead, 0)
    rows = np.repeat(np.arange(k), k) * d + pad - need
    cols = np.tile(np.arange(k), k) * d + pad - need
    outs.append(_tap_loop(xg, taps, (tuple(rows.tolist()), tuple(cols.tolist()), stride,
                                     h_out, w_out)))
  return jnp.stack(outs, axis=lead)


def _tap_patch(x, row, col, geometry):
  """The strided window ``[..., h_out, w_out, C]`` of the padded ``x[..., Hp, Wp, C]`` that
  the tap at (traced) ``row, col`` reads, and the ``(start, size)`` of the unstrided
  window it was taken from."""
  _, _, stride, h_out, w_out = geometry
  start = [0] * x.ndim
  start[-3], start[-2] = row, col
  size = list(x.shape)
  size[-3], size[-2] = (h_out - 1) * stride + 1, (w_out - 1) * stride + 1
  patch = lax.dynamic_slice(x, start, size)
  if stride > 1:
    patch = patch[..., ::stride, ::stride, :]
  return patch, start, size


def _per_channel(weights):
  """Tap weights ``[*lead, C]`` broadcast over the batch and spatial axes."""
  return weights.reshape(weights.shape[:-1] + (1, 1, 1) + weights.shape[-1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _tap_loop(xg, taps, geometry):
  """``sum_t window_t(xg) * taps[t]`` for the padded input ``xg[*lead, B, Hp, Wp, C]`` and
  ``taps[k * k, *lead, C]``, as a loop over the taps; ``geometry = (rows, cols, stride,
  h_out, w_out)`` with each tap's window origin in ``rows``, ``cols``.

  With a hand-written gradient, one loop over the taps as well, which keeps only ``xg``
  and ``taps`` for the backward pass (saving each tap's window would hold k*k copies of
  the input: 43 GB at the DARTS search size). JAX's own gradient of the loop, with the
  windows rematerialised, adds every tap's input gradient as a zero-padded full-size
  array and traces the loop several times over (its linearisation): this one writes
  each tap's window in place. Measured at digits sizes (benchmarks/README.md): tracing
  and lowering a supernet gradient about 20 % faster, the step 14-16 % (means of two
  runs), the first step level (NA-DARTS) to 9 % faster (DARTS)."""
  rows, cols, _, h_out, w_out = geometry

  def add_tap(acc, tap):
    row, col, weights = tap
    patch, _, _ = _tap_patch(xg, row, col, geometry)
    return acc + patch * _per_channel(weights), None

  acc, _ = lax.scan(add_tap, jnp.zeros(xg.shape[:-3] + (h_out, w_out, xg.shape[-1]),
                                       xg.dtype),
                    (jnp.asarray(rows), jnp.asarray(cols), taps))
  return acc


def _tap_loop_fwd(xg, taps, geometry):
  return _tap_loop(xg, taps, geometry), (xg, taps)


def _tap_loop_bwd(geometry, residuals, g):
  xg, taps = residuals
  rows, cols, stride, _, _ = geometry
  lead = taps.ndim - 2
  axes = tuple(range(lead, lead + 3))
  # Output (i, j) read the padded input at (row + stride i, col + stride j): the
  # cotangent spread out by the stride covers the tap's window.
  spread = [(0, 0, 0)] * (g.ndim - 3) + [(0, 0, stride - 1)] * 2 + [(0, 0, 0)]

  def tap_grads(grad_x, tap):
    row, col, weights = tap
    patch, start, size = _tap_patch(xg, row, col, geometry)
    # Summed in float32 at least, whatever a backend's bfloat16 reduction keeps (XLA:CPU's
    # is as accurate either way, measured).
    grad_tap = jnp.sum(patch * g, axis=axes, dtype=jnp.promote_types(g.dtype, jnp.float32))
    into = g * _per_channel(weights)
    if stride > 1:
      into = lax.pad(into, jnp.zeros((), into.dtype), spread)
    grad_x = lax.dynamic_update_slice(grad_x, lax.dynamic_slice(grad_x, start, size) + into,
                                      start)
    return grad_x, grad_tap.astype(taps.dtype)

  grad_x, grad_taps = lax.scan(tap_grads, jnp.zeros_like(xg),
                               (jnp.asarray(rows), jnp.asarray(cols), taps))
  return grad_x, grad_taps


_tap_loop.defvjp(_tap_loop_fwd, _tap_loop_bwd)


def _tap_windows(xp, k: int, geometry):
  """The ``k * k`` strided windows of ``xp[..., Hp, Wp, C]`` that a depthwise convolution
  with a ``k x k`` kernel multiplies by its taps (row-major tap order), each
  ``[..., h_out, w_out, C]``. ``geometry = (offset, dilation, stride, h_out, w_out)``:
  tap ``(r, c)`` reads rows ``offset + r * dilation + stride * i``."""
  offset, d, s, h_out, w_out = geometry
  for r in range(k):
    rows = lax.slice_in_dim(xp, offset + r * d, offset + r * d + (h_out - 1) * s + 1, s,
                            axis=xp.ndim - 3)
    for c in range(k):
      yield lax.slice_in_dim(rows, offset + c * d, offset + c * d + (w_out - 1) * s + 1, s,
                             axis=xp.ndim - 2)


def _sum_of_taps(xp, kernel, geometry):
  """``sum over taps of window * tap weights``: unrolled, so XLA fuses it (with the
  padding that made ``xp``) into one loop that reads each input element from cache once
  per tap instead of from memory."""
  k = kernel.shape[-2]
  windows = _tap_windows(xp, k, geometry)
  acc = None
  for (r, c), window in zip(np.ndindex(k, k), windows):
    w = _per_channel(kernel[..., r, c, :])
    acc = window * w if acc is None else acc + window * w
  return acc


# Examples per chunk of `depthwise_conv_taps`'s kernel gradient, for one leading index
# (edge) at a time: 4 images of 32x32x16 floats (260 KB, padded for a 5x5 kernel at
# dilation 2) stay in a core's L2 cache. Chunks of 4 examples of all 8 edges of a cell's
# input group at once (2 MB) did not: the first-stage kernel gradients of those edges
# (C=16, batch 64, 32x32) took 233 ms against 139 ms per edge (2-core CPU).
TAPS_BATCH_CHUNK = 4


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def depthwise_conv_taps(x: jax.Array, kernel: jax.Array, dilation: int, stride: int,
                        batch_chunk: int = TAPS_BATCH_CHUNK) -> jax.Array:
  """``'taps'``: one depthwise 'same' convolution of ``x[*lead, B, H, W, C]`` with
  ``kernel[*lead, k, k, C]``, as an unrolled sum of its taps over the zero-padded input,
  with a hand-written gradient (JAX's own transposes every tap into a padded full-size
  copy: forward and backward 2.4x slower for 8 edges' first-stage convs, C=16, 32x32).
  The input gradient is the same kind of sum (the cotangent, dilated by the stride and
  padded, times the flipped kernel); the kernel gradient reduces each tap's window times
  the cotangent in a loop over chunks of ``batch_chunk`` examples (or fewer: a divisor of
  B) of one leading index each, all taps of a chunk in one reduction, so that a chunk's
  windows are read from cache (whole windows, each read from memory once per tap:
  forward and backward 2x slower), or, with ``batch_chunk=0`` (``'taps_fused'``), in one
  reduction of the stacked windows over the whole batch, with no loop (for accelerators,
  where a loop launches its body at every iteration). Only the unpadded input is kept
  for the backward pass."""
  xp, geometry = _padded_with_geometry(x, kernel.shape[-2], dilation, stride)
  return _sum_of_taps(xp, kernel, geometry)


def _padded_with_geometry(x, k: int, dilation: int, stride: int, value: float = 0.0):
  """``x`` padded with ``value`` (zeros by default) for a ``k x k`` kernel, and the
  geometry of `_tap_windows`."""
  geometry = (0, dilation, stride, output_size(x.shape[-3], stride),
              output_size(x.shape[-2], stride))
  return pad_spatial(x, dilation * (k - 1) // 2, value), geometry


def _depthwise_conv_taps_fwd(x, kernel, dilation, stride, batch_chunk):
  return depthwise_conv_taps(x, kernel, dilation, stride, batch_chunk), (x, kernel)


def _depthwise_conv_taps_bwd(dilation, stride, batch_chunk, residuals, g):
  x, kernel = residuals
  d, s = dilation, stride
  lead = kernel.ndim - 3
  k = kernel.shape[-2]
  need, span = d * (k - 1) // 2, d * (k - 1)
  h, w = x.shape[-3:-1]
  h_out, w_out = g.shape[-3:-1]
  # Input gradient: the padded input's row p fed output i through tap r when p = r d + s i,
  # so d x[p - need] = sum_r g[(p - r d) / s] k[r]: g dilated by s, placed at span in a zero
  # array, read from row need on through the flipped kernel.
  pads = [(0, 0, 0)] * (g.ndim - 3) + [
      (span, h + 2 * need - (h_out - 1) * s - 1, s - 1),
      (span, w + 2 * need - (w_out - 1) * s - 1, s - 1), (0, 0, 0)]
  g_placed = lax.pad(g, jnp.zeros((), g.dtype), pads)
  grad_x = _sum_of_taps(g_placed, kernel[..., ::-1, ::-1, :], (need, d, 1, h, w))
  # Kernel gradient, in float32 at least (a bfloat16 sum over the batch would drop the
  # low digits of every tap): at once, or chunk by chunk of (leading index, examples), the
  # chunks' taps summed over a leading index's chunks.
  acc_dtype = jnp.promote_types(kernel.dtype, jnp.float32)
  if not batch_chunk:
    xp, geometry = _padded_with_geometry(x, k, d, s)
    windows = jnp.stack(list(_tap_windows(xp, k, geometry)), axis=lead)
    taps = jnp.sum(windows * jnp.expand_dims(g, lead), axis=(lead + 1, lead + 2, lead + 3),
                   dtype=acc_dtype)
    return grad_x, taps.reshape(kernel.shape).astype(kernel.dtype)
  batch = x.shape[lead]
  size = math.gcd(batch, batch_chunk)
  chunks = lambda a: a.reshape((-1, size) + a.shape[lead + 1:])

  def chunk_taps(chunk):
    xc, gc = chunk
    xp, geometry = _padded_with_geometry(xc, k, d, s)
    products = [(window * gc).astype(acc_dtype) for window in _tap_windows(xp, k, geometry)]
    # One reduction with an operand a tap: XLA:CPU emits it as one loop that reads the
    # chunk once for all taps. A sum a tap is a YNNPACK call each (k * k calls a chunk:
    # 8 edges' kernel gradients 2.7-3.3x slower at C=16, batch 64, 32x32). Over
    # the pixels, each example's sums added after: sums of H x W terms, not of the
    # chunk's (measured there: faster, and half the float32 error).
    sums = lax.reduce(products, [np.zeros((), acc_dtype)] * len(products), _add_each,
                      (1, 2))
    return jnp.sum(jnp.stack(sums), axis=1)

  taps = lax.map(chunk_taps, (chunks(x), chunks(g)))  # [lead... x B / size, k * k, C]
  grad_kernel = taps.reshape(kernel.shape[:lead] + (batch // size, k * k, kernel.shape[-1]))
  grad_kernel = jnp.sum(grad_kernel, axis=lead)
  return grad_x, grad_kernel.reshape(kernel.shape).astype(kernel.dtype)


depthwise_conv_taps.defvjp(_depthwise_conv_taps_fwd, _depthwise_conv_taps_bwd)


def _add_each(xs, ys):
  """The combiner of a variadic sum: each operand's running sums added separately."""
  return tuple(a + b for a, b in zip(xs, ys))


def _depthwise_convs_grouped(x, kernels, dilations, stride, lead, by_dilation):
  """``'conv'`` implementation (``by_dilation``): each run of consecutive kernels with one
  dilation is one grouped convolution, its smaller kernels zero-padded to its largest (a
  DARTS MixedOp's first-stage 3x3 and 5x5 kernels, then its dilated ones: 2 convolutions,
  not 4; its second stage: 1, not 2). A shared input is read once, each channel a group
  of the run's kernels (a depth multiplier); inputs of their own are groups side by side.
  On a GPU that halves the cuDNN calls to launch, to plan at their first run and to
  autotune, and the shared input's reads, for arithmetic that is small beside the memory
  traffic (benchmarks/README.md, "Depthwise convolutions a dilation a call").

  ``'conv_each'`` (not ``by_dilation``): one convolution a kernel, for TPUs. Compiled for
  a TPU v5e chip on a CPU (B=16, C=8, 5 cells, DARTS), the grouped form made the step
  27 % longer by XLA's TPU compiler's own estimate, and its compile 23-54 % longer
  (benchmarks/README.md, "The step compiled for a TPU")."""
  shared = x.shape[lead] == 1
  runs = ([len(list(run)) for _, run in itertools.groupby(dilations)] if by_dilation
          else [1] * len(kernels))
  outs, start = [], 0
  for size in runs:
    stop, d = start + size, dilations[start]
    k = max(kernel.shape[-2] for kernel in kernels[start:stop])
    # The smaller kernels zero-padded around their centre: the same 'same' convolution.
    stacked = jnp.stack([pad_spatial(kernel, (k - kernel.shape[-2]) // 2)
                         for kernel in kernels[start:stop]], axis=lead)
    need = d * (k - 1) // 2
    if shared:
      y = _depthwise_conv_grouped(lax.index_in_dim(x, 0, lead, keepdims=False), stacked,
                                  need, stride, d)
    else:
      y = _depthwise_conv_grouped(lax.slice_in_dim(x, start, stop, axis=lead),
                                  jnp.expand_dims(stacked, lead + 1), need, stride, d)
      y = jnp.squeeze(y, lead + 1)
    outs.append(y)
    start = stop
  return jnp.concatenate(outs, axis=lead)


def _depthwise_conv_grouped(x, kernel, pad, stride, dilation):
  """One grouped convolution: ``x[*lead, B, H, W, C]`` with ``kernel[*lead, m, k, k, C]``
  -> ``[*lead, m, B, H', W', C]``, every (leading index, channel) pair of ``x`` a group of
  ``m`` kernels. The convolution pads by ``pad`` itself. (An input padded once for the
  widest kernel and sliced per kernel gave every kernel two slices, two pads in its
  gradient and inputs of its own shape: XLA's H200 program of the reference-size DARTS
  step needed 6.12 GB instead of 4.69 GB and autotuned 275 distinct library calls instead
  of 179.)"""
  lead = x.ndim - 4
  lead_shape = x.shape[:lead]
  n = math.prod(lead_shape)
  m, k, c = kernel.shape[lead], kernel.shape[-2], kernel.shape[-1]
  # [*lead, B, H, W, C] -> [B, H, W, lead*C]: every (leading index, channel) pair a group.
  perm = tuple(range(lead, lead + 3)) + tuple(range(lead)) + (lead + 3,)
  xg = jnp.transpose(x, perm).reshape(x.shape[lead:lead + 3] + (n * c,))
  # Output channel g * m + j: the group's j-th kernel.
  kg = jnp.transpose(kernel.reshape((n, m, k, k, c)), (2, 3, 0, 4, 1)).reshape(
      k, k, 1, n * c * m)
  y = lax.conv_general_dilated(
      xg, kg, window_strides=(stride, stride), padding=((pad, pad), (pad, pad)),
      rhs_dilation=(dilation, dilation), dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=n * c)
  y = y.reshape(y.shape[:3] + lead_shape + (c, m))
  inv = tuple(range(3, 3 + lead)) + (4 + lead, 0, 1, 2, 3 + lead)
  return jnp.transpose(y, inv)


def take_rows(x: jax.Array, indices) -> jax.Array:
  """``x[indices]`` for host (numpy) ``indices`` along axis 0, as a broadcast where every
  row is taken in turn, repeated (a cell's input edges read ``(s0, s1) * 4``): a gather's
  gradient is a scatter, and on a CPU both compile to loops, slower to compile and to run.
  Other patterns are gathered."""
  idx = np.asarray(indices)
  if idx.ndim != 1 or not idx.size:
    raise ValueError(f"take_rows: indices must be a non-empty 1-D list, got {indices!r}")
  m = x.shape[0]
  if tiles(idx, m):
    return jnp.broadcast_to(x, (idx.size // m,) + x.shape).reshape((idx.size,) + x.shape[1:])
  return x[idx]


def tiles(indices, rows: int) -> bool:
  """Whether ``indices`` are ``0..rows-1`` repeated in turn (``(0, 1) * 4``)."""
  idx = np.asarray(indices)
  return idx.size % rows == 0 and np.array_equal(idx, np.tile(np.arange(rows),
                                                              idx.size // rows))


@jax.custom_vjp
def mixed_sum(weights: jax.Array, parts: tuple[jax.Array, ...]) -> jax.Array:
  """A group of MixedOps' weighted sums: ``sum_k weights[:, k] * parts[k]`` for
  ``weights[E, n]`` and ``n`` operation outputs ``parts[k][E, B, H, W, C]`` of one dtype,
  added in float32 at least and returned in the parts' dtype.

  A part may instead be shared by edges, ``[S, B, H, W, C]`` with ``E`` a multiple of
  ``S``: edge ``e`` then reads ``parts[k][e % S]`` (a cell's input edges read ``(s0, s1) *
  4``), and its gradient is the sum over the edges that read each row, as adds (a
  broadcast's gradient is a reduction, which XLA:CPU hands to YNNPACK, slow over a short
  major axis: `sum_axis`).

  In float32 at least, so that the gradient with respect to the weights, for each edge and
  operation a sum over B, H, W and C of the operation's output times the output's
  gradient, is a float32 sum. In bfloat16 autodiff's transpose of the weights' broadcast
  summed in bfloat16 on XLA's CPU and GPU backends alike: the architecture gradient of 3
  edges on 16 8x8 images, C=4, was off by up to 86 % on this CPU.

  The gradient is written out (`_mixed_sum_bwd`) so that those sums read the output's
  gradient through an optimisation barrier, a fusion boundary. Without it XLA's GPU
  compiler fused a group's weight sums, siblings that read that gradient, with the loop
  that adds up the gradient of the node they came from (hundreds of operations: the pools'
  gradients, pads, the other edges' terms), and emitted that loop inside the sums'
  unrolled tiles. In bfloat16 at the reference size (B=64, C=16, 8 cells, 32x32) three
  such kernels took 8 MB of LLVM IR each and one took 24 s to compile; the architecture
  side's H200 program compiled in 86 s instead of 31 s with the barrier (float32: 33 s
  instead of 30 s), on a 2-core CPU, for 1-2 % more bytes moved
  (`benchmarks/gpu_compile.py`)."""
  acc, w, expand = _mixed_sum_layout(weights, parts)
  terms = [w[:, k] * expand(part).astype(acc) for k, part in enumerate(parts)]
  return functools.reduce(jnp.add, terms).astype(parts[0].dtype)


def _mixed_sum_layout(weights, parts):
  """The sums' dtype, the weights as ``[E, n, 1, 1, 1, 1]``, and a function that gives a
  part one row per edge (a shared part broadcast: fused into its readers)."""
  edges = weights.shape[0]
  if any(edges % len(part) for part in parts):
    raise ValueError(f"mixed_sum: {edges} edges need parts of {edges} rows or of a divisor "
                     f"of it, read in turn; got {[part.shape for part in parts]}")
  acc = jnp.promote_types(parts[0].dtype, jnp.float32)
  w = weights.astype(acc).reshape(weights.shape + (1, 1, 1, 1))
  expand = lambda a: a if len(a) == edges else take_rows(a, np.arange(edges) % len(a))
  return acc, w, expand


def _mixed_sum_fwd(weights, parts):
  return mixed_sum(weights, parts), (weights, parts)


def _mixed_sum_bwd(residuals, g):
  weights, parts = residuals
  acc, w, expand = _mixed_sum_layout(weights, parts)
  edges = weights.shape[0]
  g_acc = g.astype(acc)

  def part_grad(k, part):
    grad = w[:, k] * g_acc
    if len(part) < edges:
      # The edges that read each row, summed as adds of [E / S, S, ...]'s slices.
      grad = sum_axis(grad.reshape((-1, len(part)) + grad.shape[1:]), 0)
    return grad.astype(part.dtype)

  parts_grad = tuple(part_grad(k, part) for k, part in enumerate(parts))
  g_sums = lax.optimization_barrier(g).astype(acc)
  weights_grad = jnp.stack([jnp.sum(g_sums * expand(part).astype(acc), axis=(1, 2, 3, 4))
                            for part in parts], axis=1)
  return weights_grad.astype(weights.dtype), parts_grad


mixed_sum.defvjp(_mixed_sum_fwd, _mixed_sum_bwd)


def materialized(x):
  """``x`` (an array or a tree of them) through an optimisation barrier: computed once and
  stored, where XLA keeps barriers as fusion boundaries (on a GPU; on a CPU under the
  search's options, `bilevel.CPU_KEEP_BARRIERS`; elsewhere on a CPU XLA drops them before
  it fuses). A search cell's node is an elementwise function of its edges' outputs and of
  earlier nodes (``skip_connect``, the pools' inputs), so a cell's nodes form one
  elementwise chain, which XLA:CPU fused into each of its readers, evaluating it again in
  each; the supernets materialise their nodes with the CPU's kernels
  (`nb201_supernet.fusion_boundary`, `supernet.SearchCell`)."""
  return lax.optimization_barrier(x)


def sum_axis(x: jax.Array, axis: int) -> jax.Array:
  """``x.sum(axis)`` for a short ``axis`` (a node's edges), as adds of its slices.

  XLA:CPU hands reduce ops to YNNPACK, which sums over a major axis slowly: summing
  ``[3, 64, 32, 32, 16]`` over axis 0 took 18 ms against 0.5 ms as adds (2-core CPU). A
  search cell's node sums are such sums: with adds, the gradient of a cell at C=16, batch
  64, 32x32 took 3.1 s against 3.6 s. The adds fuse into one loop on every backend, and
  so do their gradients' copies."""
  parts = [lax.index_in_dim(x, i, axis, keepdims=False) for i in range(x.shape[axis])]
  return functools.reduce(jnp.add, parts)


def kernel_gated(fn, x, kernels, kernel_grads=None):
  """``fn(x, kernels)``, for ``fn`` a convolution (or several) of ``x`` with ``kernels``
  (an array or a tree of them), whose gradient with respect to ``kernels`` is computed
  only where ``kernel_grads`` (a traced boolean scalar) holds, and is zeros elsewhere; the
  gradient with respect to ``x`` always is. ``kernel_grads=None``: ``fn(x, kernels)``.

  For a step that runs one supernet gradient for both sides of the bilevel step in a
  loop (`nanas_jax.search.bilevel`, ``compile='loop'``): the architecture side's
  iterations skip the kernels' gradients, which it throws away, at run time, inside the
  one compiled body."""
  if kernel_grads is None:
    return fn(x, kernels)
  return _kernel_gated(fn, x, kernels, kernel_grads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _kernel_gated(fn, x, kernels, kernel_grads):
  del kernel_grads
  return fn(x, kernels)


def _kernel_gated_fwd(fn, x, kernels, kernel_grads):
  out, pullback = jax.vjp(fn, x, kernels)
  return out, (pullback, kernels, kernel_grads)


def _kernel_gated_bwd(fn, residuals, g):
  del fn
  pullback, kernels, kernel_grads = residuals
  # The pullback's two gradients, each where it is needed: what a side does not return,
  # XLA removes (a hand-written gradient's other half included), so the kernels' gradient
  # is computed in the branch that runs only where ``kernel_grads`` holds.
  grad_x = pullback(g)[0]
  grad_kernels = lax.cond(kernel_grads, lambda: pullback(g)[1],
                          lambda: jax.tree.map(jnp.zeros_like, kernels))
  return grad_x, grad_kernels, None


_kernel_gated.defvjp(_kernel_gated_fwd, _kernel_gated_bwd)


def pointwise_conv(x: jax.Array, kernel: jax.Array, kernel_grads=None) -> jax.Array:
  """1x1 convolution ``x[*lead, B, H, W, Cin] @ kernel[*lead, Cin, Cout]`` per leading index;
  ``kernel_grads``: `kernel_gated`'s."""
  return kernel_gated(_pointwise_conv, x, kernel, kernel_grads)


def _pointwise_conv(x, kernel):
  lead = kernel.ndim - 2
  letters = "acdefgj"[:lead]
  return jnp.einsum(f"{letters}bhwi,{letters}io->{letters}bhwo", x, kernel)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def max_pool_3x3(x: jax.Array, stride: int) -> jax.Array:
  """3x3 max pooling, padding 1 (padded cells never win, as in PyTorch): the maximum of
  the 9 strided windows, unrolled like ``'taps'``, with a hand-written gradient that
  sends each output's cotangent to the first (row-major) maximum of its window, as
  PyTorch's backward does. XLA's own pooling (a ``reduce_window``, whose gradient is a
  ``select_and_scatter``) took 195 ms forward and backward for two states of a search cell
  (batch 64, 32x32, C=16) against 35 ms for this (2-core CPU): XLA:CPU runs both as
  generic loops, where the windows here fuse into one elementwise loop each way."""
  return functools.reduce(jnp.maximum, _max_pool_windows(x, stride))


def _max_pool_windows(x, stride: int) -> list[jax.Array]:
  """The 9 strided windows of ``x`` padded by 1 with -inf, in row-major order."""
  xp, geometry = _padded_with_geometry(x, 3, 1, stride, -jnp.inf)
  return list(_tap_windows(xp, 3, geometry))


def _max_pool_3x3_fwd(x, stride):
  return max_pool_3x3(x, stride), x


def _max_pool_3x3_bwd(stride, x, g):
  # Which window holds the maximum is recomputed from the windows rather than kept as a
  # residual the size of every pooled output: keeping the maximum measured within noise
  # of recomputing it (a cell's two inputs, forward and backward: 28-32 ms against 28-35
  # ms).
  windows, windows_vjp = jax.vjp(lambda x: _max_pool_windows(x, stride), x)
  first = _first_maximum(windows)
  zero = jnp.zeros((), g.dtype)
  return windows_vjp([jnp.where(first == t, g, zero) for t in range(len(windows))])


def _first_maximum(windows: list[jax.Array]) -> jax.Array:
  """For each output, the index of the first window (row-major) that holds its maximum: a
  running maximum that only a strictly greater window takes over. One comparison, a
  maximum and a select a window, where marking the windows equal to the maximum and not
  yet taken (a comparison and three boolean operations a window, chained) cost a TPU
  v5e 2.6x the pooling's forward and backward, and 15 % of the reference-size DARTS
  step, by XLA's estimate; a CPU's step is the same either way, bit for bit
  (`benchmarks/README.md`, "Max pooling's gradient by the first maximum's index")."""
  best, first = windows[0], jnp.zeros(windows[0].shape, jnp.int8)
  for t, window in enumerate(windows[1:], 1):
    greater = window > best
    best = jnp.maximum(best, window)
    first = jnp.where(greater, jnp.int8(t), first)
  return first


max_pool_3x3.defvjp(_max_pool_3x3_fwd, _max_pool_3x3_bwd)


def avg_pool_3x3(x: jax.Array, stride: int, windows: bool = False) -> jax.Array:
  """3x3 average pooling, padding 1, ``count_include_pad=False`` (the DARTS op).

  A ``reduce_window`` sum, or with ``windows`` the sum of the 9 strided windows (as
  `max_pool_3x3`'s), for a TPU: element-wise work, whose cost XLA's TPU compiler
  estimates, where it gives a ``reduce_window`` no estimate (the search step's estimate
  left the average pools out)."""
  h, w = x.shape[-3:-1]
  if windows:
    xp, geometry = _padded_with_geometry(x, 3, 1, stride)
    total = functools.reduce(jnp.add, _tap_windows(xp, 3, geometry))
    # Each output's count of real (unpadded) pixels: its rows' count times its columns'.
    counts = [np.minimum(np.arange(0, n, stride) + 1, n - 1) -
              np.maximum(np.arange(0, n, stride) - 1, 0) + 1 for n in (h, w)]
    inverse = 1.0 / (counts[0][:, None] * counts[1][None, :])
    return total * jnp.asarray(inverse[:, :, None], total.dtype)
  window = (1,) * (x.ndim - 3) + (3, 3, 1)
  strides = (1,) * (x.ndim - 3) + (stride, stride, 1)
  pads = [(0, 0)] * (x.ndim - 3) + [(1, 1), (1, 1), (0, 0)]
  total = lax.reduce_window(x, 0.0, lax.add, window, strides, pads)
  ones = jnp.ones((1,) * (x.ndim - 3) + (h, w, 1), x.dtype)
  count = lax.reduce_window(ones, 0.0, lax.add, window, strides, pads)
  return total / count


def factorized_reduce_convs(x: jax.Array, kernel_a: jax.Array, kernel_b: jax.Array,
                            kernel_grads=None) -> jax.Array:
  """DARTS FactorizedReduce without its BatchNorm: relu, two offset stride-2 1x1 convs.

  The second conv reads the odd rows and columns (PyTorch: a stride-2 conv of
  ``x[:, :, 1:, 1:]``). For an odd size the two paths differ in size and PyTorch fails at
  the concat; this raises a clear error instead.

  The even and odd pixels are picked from a 2x2-blocked view (``[..., H/2, 2, W/2, 2,
  C]``), not by stride-2 slices: on the supernet, XLA's GPU compiler (jaxlib 0.10.2,
  Hopper) aborted in its Triton GEMM fusion on those slices feeding the 1x1 convs' matmuls
  (a ``triton_tiling_propagation.cc`` check failure; `benchmarks/gpu_compile.py` found it,
  and tests/test_benchmarks_gpu_compile.py compiles the supernet for an H200).
  ``kernel_grads``: `kernel_gated`'s, for both convolutions.
  """
  *_, h, w, _ = x.shape
  if h % 2 or w % 2:
    raise ValueError(
        f"FactorizedReduce needs an even spatial size, got {(h, w)}; "
        "choose an input size divisible by 4 (two reductions).")
  x = jax.nn.relu(x)
  blocks = x.reshape(x.shape[:-3] + (h // 2, 2, w // 2, 2, x.shape[-1]))
  a = pointwise_conv(blocks[..., 0, :, 0, :], kernel_a, kernel_grads)
  b = pointwise_conv(blocks[..., 1, :, 1, :], kernel_b, kernel_grads)
  return jnp.concatenate([a, b], axis=-1)


# BatchNorm as PyTorch's BatchNorm2d does it, for every network of the package (the search
# supernets and the discrete networks): the running averages take ``BN_MOMENTUM`` of each
# batch (PyTorch's ``momentum=0.1``; Flax would call it 0.9), epsilon 1e-5, and the running
# variance averages the *unbiased* batch variance. One convention, PyTorch's, so that
# weights and statistics carry over to and from the reference implementations unchanged,
# and a discrete network computes what the supernet computes for the same architecture.
BN_MOMENTUM = 0.1
BN_EPS = 1e-5


def running_stats_init(value: float):
  """Initialiser ``(shape, dtype=None) -> array`` of BatchNorm running statistics filled
  with ``value`` (0 for means, 1 for variances), as ``jnp.full`` makes it (None: JAX's
  default float, float64 under ``jax_enable_x64``) but built on the host: ``jnp.zeros``
  and ``jnp.ones`` compile a small program per shape when a network is initialised
  eagerly, some 30 of them for the quick start's supernet (1.5 s on a 2-core CPU, in
  every run)."""

  def init(shape, dtype=None):
    dtype = jax.dtypes.canonicalize_dtype(np.float64 if dtype is None else dtype)
    return jax.device_put(np.full(shape, value, dtype))

  return init


def batch_norm_stats(x: jax.Array, feature_lead: int, one_pass: bool | None = None
                     ) -> tuple[jax.Array, jax.Array]:
  """Mean and biased variance of ``x[*lead, B, H, W, C]`` over (B, H, W) per lead and C,
  reduced in float32 at least (bfloat16 sums of thousands of values would lose the
  statistics' low digits).

  Two passes over ``x`` (the mean, then the mean square about it) or, with ``one_pass``,
  one (`batch_norm_stats_one_pass`). None: one pass on accelerators, two on a CPU, where
  one pass made a DARTS search step slower (B=16, C=8, 5 cells, 32x32: 1.95 s against
  1.60 s, first step 129 s against 113 s; 2-core CPU).
  """
  if one_pass is None:
    one_pass = jax.default_backend() != "cpu"
  if one_pass:
    return batch_norm_stats_one_pass(x, feature_lead)
  axes = tuple(range(feature_lead, feature_lead + 3))
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  mean = jnp.mean(x, axis=axes)
  var = jnp.mean(jnp.square(x - jnp.expand_dims(mean, axes)), axis=axes)
  return mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def batch_norm_stats_one_pass(x: jax.Array, feature_lead: int
                              ) -> tuple[jax.Array, jax.Array]:
  """`batch_norm_stats` in one pass over ``x``: the sums of ``d`` and ``d**2``, with
  ``d = x - x[first pixel]`` per (lead, C), as Flax's ``use_fast_variance`` but shifted:
  the shift is a value of the channel, so the cancellation in ``mean(d**2) - mean(d)**2``
  is bounded by how far the mean lies from that value in standard deviations, not by the
  mean's magnitude (a channel of mean 1e4 and deviation 1 keeps its variance to float32
  rounding). On a GPU the two sums fuse into one reduction: XLA's program of the
  reference-size DARTS step for an H200 launches 6,410 kernels against 7,124 with two
  passes. The gradient is written out so that it keeps ``x`` alone: JAX's own would keep
  ``d`` beside the ``x - mean`` the normalisation keeps (0.3 GB more at that size).
  """
  return _batch_norm_stats_fwd(x, feature_lead)[0]


def _batch_norm_stats_fwd(x, feature_lead):
  axes = tuple(range(feature_lead, feature_lead + 3))
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  shift = xf[(slice(None),) * feature_lead + (0, 0, 0)]
  d = xf - jnp.expand_dims(shift, axes)
  mean_d = jnp.mean(d, axis=axes)
  # Rounding can leave a constant channel's variance a hair below zero.
  var = jnp.maximum(jnp.mean(jnp.square(d), axis=axes) - jnp.square(mean_d), 0.0)
  mean = shift + mean_d
  return (mean, var), (x, mean)


def _batch_norm_stats_bwd(feature_lead, residuals, grads):
  """d mean / dx = 1/n and d var / dx = 2 (x - mean) / n, per (lead, C)."""
  x, mean = residuals
  g_mean, g_var = grads
  axes = tuple(range(feature_lead, feature_lead + 3))
  n = math.prod(x.shape[feature_lead:feature_lead + 3])
  put = lambda a: jnp.expand_dims(a, axes)
  gx = (put(g_mean) + 2.0 * put(g_var) * (x.astype(mean.dtype) - put(mean))) / n
  return (gx.astype(x.dtype),)


batch_norm_stats_one_pass.defvjp(_batch_norm_stats_fwd, _batch_norm_stats_bwd)


def batch_norm_apply(x, mean, var, feature_lead: int, eps: float = BN_EPS,
                     scale=None, bias=None):
  """Normalises ``x[*lead, B, H, W, C]`` with per-(lead, C) ``mean``/``var``: computed in
  float32 at least and returned in ``x``'s dtype.

  In float32 because the gradients with respect to the statistics, ``scale`` and ``bias``
  sum over B, H and W: with a bfloat16 ``x`` and those cast to it, the sums were bfloat16
  reductions, which accumulate in bfloat16 on XLA's CPU and GPU backends alike (the scale's
  and bias's gradients were off by 10-550 % at batch 64, 32x32, on this CPU)."""
  axes = tuple(range(feature_lead, feature_lead + 3))
  acc = jnp.promote_types(x.dtype, jnp.float32)
  inv = lax.rsqrt(var + eps)
  if scale is not None:
    inv = inv * scale
  put = lambda a: jnp.expand_dims(a.astype(acc), axes)
  y = (x.astype(acc) - put(mean)) * put(inv)
  if bias is not None:
    y = y + put(bias)
  return y.astype(x.dtype)


def batch_norm(x: jax.Array, stats: tuple[jax.Array, jax.Array], feature_lead: int,
               train: bool, scale=None, bias=None, sources=None, one_pass: bool | None = None,
               shared_output: bool = False
               ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  """BatchNorm of ``x[*lead, B, H, W, C]`` with statistics per (lead, C): ``(y, stats)``.

  Training normalises with the batch statistics and returns the updated running averages
  ``(1 - m) * running + m * batch`` (``m = BN_MOMENTUM``, unbiased variance); evaluation
  normalises with the running ones and returns them unchanged. ``scale`` / ``bias``: the
  affine parameters, if any.

  ``sources`` (int ``[E]``): edges that read shared inputs. ``x`` then holds each distinct
  input once on axis 0, edge ``e`` normalises ``x[sources[e]]`` with its own running
  statistics, and the batch statistics are computed once per distinct input (edges
  reading the same input have the same ones). In training those edges' outputs are equal
  too, and with ``shared_output`` ``y`` holds each once (``[S, ...]``, as ``x``; in
  evaluation the running statistics differ by edge, and ``y`` is per edge). ``one_pass``:
  how the batch statistics are reduced (`batch_norm_stats`).
  """
  gather = (lambda a: a) if sources is None else (lambda a: take_rows(a, sources))
  if not train:
    mean, var = stats
    return batch_norm_apply(gather(x), mean, var, feature_lead, BN_EPS, scale, bias), stats
  mean, var = batch_norm_stats(x, feature_lead, one_pass)
  if shared_output:
    y = batch_norm_apply(x, mean, var, feature_lead, BN_EPS, scale, bias)
  else:
    y = batch_norm_apply(gather(x), gather(mean), gather(var), feature_lead, BN_EPS, scale,
                         bias)
  mean, var = gather(mean), gather(var)
  n = x.shape[feature_lead] * x.shape[feature_lead + 1] * x.shape[feature_lead + 2]
  running_mean, running_var = stats
  # The running averages are state, not part of the loss: with the batch statistics'
  # gradient stopped here, linearising the step traces no tangent for them, and a loop that
  # carries them (the inner nodes' scan) is linearised once, not twice until its carries'
  # tangents settle (tracing the quick-start preset's step: 3.6 s instead of 4.4 s).
  mean, var = lax.stop_gradient(mean), lax.stop_gradient(var)
  unbiased = var * (n / max(n - 1, 1))
  return y, ((1 - BN_MOMENTUM) * running_mean + BN_MOMENTUM * mean,
             (1 - BN_MOMENTUM) * running_var + BN_MOMENTUM * unbiased)
