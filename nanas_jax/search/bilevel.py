"""The bilevel step of DARTS / NA-DARTS on a `SearchState`: the execution of the method.

Order of a step, as in the reference ``train_search.py``: first the architecture step on a
validation batch (moving alpha), then the weight step on a training batch with the new
architecture weights. During ``warmup_epochs`` (PC-DARTS, P-DARTS) the weight step runs
alone.

The architecture objective is `nanas_jax.search.objective`'s: ``AGG_k L_val(w,
T_k(softmax(alpha)))`` over K perturbations sampled afresh every step; DARTS is its
one-neighbor identity case. This module decides how it is executed: the K evaluations run
under ``jax.vmap`` over the K weight tensors (``evaluate='vmap'``) or as K calls of the one
compiled supernet gradient (``evaluate='loop'``); both give the same numbers (a test
checks it). Under vmap the K evaluations' activations are alive together, so
``neighbors.chunk`` of them are vmapped at a time and the chunks run one after the other
(``lax.map``): memory grows with the chunk, not with K (``'auto'`` takes one at a time on
a CPU and on a TPU unless a chunk is set, all at once on a GPU).
``neighbors.batch='split'`` (each neighbor on its own 1/K slice of the validation batch,
the cost of one DARTS architecture step) is allowed with the ``mean`` aggregate only: the
mean of the slice losses estimates the mean neighbor loss over the data, as ``'full'``
does, except that BatchNorm (training mode) normalises each neighbor over B/K examples, as
DARTS at batch B/K would; with ``max`` or ``softmax_tau`` the worst "neighbor" would
partly be the hardest slice.

Orders of the architecture gradient:
- ``first``: the gradient of the objective at the current weights.
- ``second_fd``: DARTS's unrolled approximation. Virtual step ``w' = w - xi (mu m + g + wd
  w)`` (the real SGD step without clipping, xi = current weight learning rate), then
  ``grad_alpha L(w', alpha) - xi * [grad_alpha L_train(w+) - grad_alpha L_train(w-)] / 2r``
  with ``w+- = w +- r v``, ``v = grad_w' L(w', alpha)``, ``r = 0.01 / ||v||``.
- ``second_exact``: ``jax.grad`` of ``L(w'(alpha), alpha)`` through the virtual step: the
  quantity the finite difference approximates (a test checks they agree).

Compilation. On a CPU, XLA's compile time grows with the graph, and a step that inlines the
supernet's forward and backward pass once per use (architecture step, weight step, each
finite-difference point, each neighbor) compiles for minutes. Every use above is the same
function, ``(params, weights, batch) -> (loss, d/dparams, d/dweights)``, so with
``compile='shared'`` the step calls that one jitted function (compiled once; the
architecture side's version without the parameter gradient, compiled once more, calls
it inside its own jit, which finds its trace in jit's cache instead of tracing it again)
and small jitted pieces around it;
vmapped neighbors batch those same traced functions. With the accelerators' kernels a
step's first call compiles its two supernet programs side by side: the one it needs last
on a side thread (`BilevelSearch.program_compiled_ahead`), the small programs around
them on side threads of their own (`BilevelSearch.programs_compiled_ahead`), and the
architecture side's programs that read the batch on the caller's.
The supernet's programs are the process's, not the search's: every search on an equal
supernet in the same compute dtype shares their traces and compiled code. On a GPU and a
CPU every top-level program compiles with XLA's options `xla_compiler_options` (a GPU: no
autotuning unless ``config.gpu_autotune``; a CPU: optimisation barriers kept as fusion
boundaries, `CPU_KEEP_BARRIERS`): compiler options are a top-level jit's only, so a
program the step calls eagerly runs as a jit of its own around it (`_TopLevel`), one
traced into another program as itself.
``compile='fused'`` traces the whole step into one ``jax.jit`` (XLA may fuse across
phases), around the same jitted supernet gradients, which XLA inlines. ``'auto'`` is
``'fused'`` for first-order DARTS without warm-up epochs on the CPU's kernels, else
``'shared'`` (`fused_compile`). ``compile='loop'`` (the first order on full batches, with
a supernet that can skip its kernels' gradients: `takes_kernel_grads`) makes the step one
program in which the neighbors' gradients and the weight step's are the iterations of one
loop over the full supernet gradient, so that one supernet gradient compiles
(`BilevelSearch._loop_step`). On an H200 with JAX 0.11.2, XLA's GPU
compiler aborted on the fused step (a ``triton_tiling_propagation.cc`` check failure);
the cause, found by compiling for an H200 on a CPU (`benchmarks/gpu_compile.py`), was
the stride-2 slices feeding matmuls in `nanas_jax.nn.functional.factorized_reduce_convs`,
and both modes now compile for it with jaxlib 0.10.2. Both modes compute the same step
(tested).

Precision. ``config.dtype = 'bfloat16'`` runs the supernet's convolutions and matmuls in
bfloat16 (`apply_supernet` casts the parameters, images and architecture weights on the
way in and the logits back to float32); the state stays float32. Every sum over the
batch's pixels runs in float32: convolutions and matmuls accumulate in float32 on their
own, the BatchNorms reduce their statistics and normalise in float32, and the MixedOps
weigh their operations in float32 (`nanas_jax.nn.functional.mixed_sum`) and the
classifier adds its bias in float32 (`nanas_jax.nn.ops.Classifier`), so the gradients of
the BatchNorms' affine parameters, of the architecture weights and of the classifier's
bias are float32 sums.

BatchNorm statistics are updated by the weight step only; the architecture step and the
virtual step run in training mode (batch statistics) and discard their updates.
"""

from __future__ import annotations

import concurrent.futures
import functools
import inspect
import math
from collections.abc import Iterable
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from nanas_jax import neighborhood
from nanas_jax.nn import functional as F
from nanas_jax.nn import recalibration
from nanas_jax.search import objective
from nanas_jax.search.state import (ARCH_SCHEDULES, SearchState, arch_optimizer, init_alpha,
                                    momentum_buffer, weight_lr_schedule, weight_optimizer)
from nanas_jax.spaces import SearchSpace

ORDERS = ("first", "second_fd", "second_exact")
ALGORITHMS = ("darts", "na_darts")
NEIGHBOR_EVALUATIONS = ("auto", "vmap", "loop")
COMPILE_MODES = ("auto", "shared", "fused", "loop")
COMPUTE_DTYPES = ("float32", "bfloat16")
# XLA's settings for a GPU program compiled without timing anything on the GPU
# (``config.search.gpu_autotune = False``): cuDNN's and cuBLAS's own heuristics pick each
# convolution's and matmul's algorithm, no fusion is compiled several ways to pick the
# fastest (JAX 0.11's fusion autotuner, which compiles every fusion on its own first, on
# one thread), and matmuls are cuBLAS's rather than Triton's (without timing, XLA has no
# default configuration for some of Triton's matmul fusions, and refuses to compile them).
# Measured (`benchmarks/README.md`): the one H200 run's DARTS step, under XLA's defaults,
# had not finished its first call after 243 s, most of it autotuning; compiled for an H200
# on a 2-core CPU with these, the step's programs took 64 s side by side, against 146 s
# under JAX 0.11.2's defaults (before any timing, which needs the GPU).
GPU_WITHOUT_AUTOTUNING = (("xla_gpu_autotune_level", 0),
                          ("xla_gpu_enable_triton_gemm", False),
                          ("xla_gpu_experimental_enable_fusion_autotuner", False))


# XLA's CPU compiler turns `lax.optimization_barrier` into nothing before it fuses (its
# pass ``cse_barrier_expander``), so a barrier never was a fusion boundary there; with the
# pass off it is, as on a GPU. The supernets place barriers where XLA:CPU fused a long
# elementwise chain into each of its readers, evaluating it again in each: NAS-Bench-201's
# nodes (`nb201_supernet.fusion_boundary`), DARTS's unrolled cells (`supernet.SearchCell`),
# the mixed sums' gradient (`functional.mixed_sum`). Measured on a 2-core CPU
# (`benchmarks/README.md`, "NAS-Bench-201 on a CPU, its nodes computed once", "DARTS's
# cells, their nodes computed once"): NAS-Bench-201's search step at its search setting
# 2.8-3.9x faster, its first step half as long; DARTS's first-order step 15-34 % faster at
# B=16, C=8, 5 cells, 32x32; the DARTS quick-start preset's step and first step level.
CPU_KEEP_BARRIERS = (("xla_disable_hlo_passes", "cse_barrier_expander"),)


def xla_compiler_options(config: ml_collections.ConfigDict,
                         platform: str) -> tuple[tuple[str, Any], ...]:
  """The XLA options (pairs) every top-level program of a search's step compiles with on
  ``platform`` (``'cpu'``, ``'gpu'``, ``'tpu'``): `GPU_WITHOUT_AUTOTUNING` on a GPU unless
  ``config.gpu_autotune``, `CPU_KEEP_BARRIERS` on a CPU, else none (XLA's own settings,
  ``XLA_FLAGS`` included)."""
  if platform == "gpu" and not config.get("gpu_autotune", False):
    return GPU_WITHOUT_AUTOTUNING
  if platform == "cpu":
    return CPU_KEEP_BARRIERS
  return ()


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy with integer labels."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.mean(jnp.argmax(logits, axis=-1) == labels)


def compute_dtype(config: ml_collections.ConfigDict):
  """The dtype ``config.dtype`` asks the supernet to compute in: None for ``'float32'``
  (the parameters' own dtype: float32, or float64 where a test enables x64)."""
  dtype = config.get("dtype", "float32")
  return None if dtype == "float32" else jnp.dtype(dtype)


def apply_supernet(model, dtype, params, batch_stats, images, weights, train: bool,
                   kernel_grads=None):
  """``(float32 logits, batch_stats after the pass)`` of ``model`` computed in ``dtype``
  (`compute_dtype`): the parameters, images and architecture weights enter it cast, so
  every convolution and matmul runs in that dtype, while what the state keeps stays
  float32 (parameters, alpha and their gradients through the casts, optimizer states, and
  the BatchNorm statistics, which the BatchNorms reduce in float32). In evaluation mode
  the statistics come back unchanged. ``kernel_grads`` (a traced boolean, for a supernet
  that takes it: `takes_kernel_grads`): where False, its cells' convolution kernels get
  zero gradients, not computed."""
  if dtype is not None:
    params, images, weights = jax.tree.map(lambda x: x.astype(dtype),
                                           (params, images, weights))
  variables = {"params": params, "batch_stats": batch_stats}
  gate = {} if kernel_grads is None else {"kernel_grads": kernel_grads}
  if train:
    logits, updates = model.apply(variables, images, weights, train=True,
                                  mutable=["batch_stats"], **gate)
    # Models without BatchNorm have no statistics to update.
    batch_stats = updates.get("batch_stats", batch_stats)
  else:
    logits = model.apply(variables, images, weights, train=False)
  return (logits if dtype is None else logits.astype(jnp.float32)), batch_stats


def supernet_train_loss(model, dtype, params, batch_stats, weights, images, labels,
                        kernel_grads=None):
  """Training-mode loss of ``model`` in ``dtype`` (`apply_supernet`) at architecture
  weights ``weights``, with the logits and the BatchNorm statistics update:
  ``(loss, (logits, new batch_stats))``."""
  logits, new_stats = apply_supernet(model, dtype, params, batch_stats, images, weights,
                                     train=True, kernel_grads=kernel_grads)
  return cross_entropy(logits, labels), (logits, new_stats)


def supernet_value_and_grads(model, dtype, params, batch_stats, weights, images, labels,
                             kernel_grads=None):
  """``(loss, logits, new batch_stats, d loss/d params, d loss/d weights)``; with
  ``kernel_grads`` False, the cells' convolution kernels' entries of ``d loss/d params``
  are zeros, not computed (`apply_supernet`)."""
  loss_fn = functools.partial(supernet_train_loss, model, dtype)
  (loss, (logits, new_stats)), (grad_params, grad_weights) = jax.value_and_grad(
      loss_fn, argnums=(0, 2), has_aux=True)(params, batch_stats, weights, images, labels,
                                             kernel_grads)
  return loss, logits, new_stats, grad_params, grad_weights


def supernet_value_and_weights_grad(model, dtype, params, batch_stats, weights, images,
                                    labels):
  """``(loss, logits, d loss/d weights)``: what the architecture side needs (first order,
  the finite-difference points), without the parameter gradient it would throw away
  (about a third of a supernet gradient's work: no convolution kernel gradients)."""
  loss_fn = functools.partial(supernet_train_loss, model, dtype)
  (loss, (logits, _)), grad_weights = jax.value_and_grad(
      loss_fn, argnums=2, has_aux=True)(params, batch_stats, weights, images, labels)
  return loss, logits, grad_weights


def _batch_stats_update(model, dtype, params, batch_stats, alpha, images):
  """The running statistics one training-mode pass at ``softmax(alpha)`` leaves."""
  return apply_supernet(model, dtype, params, batch_stats, images, jax.nn.softmax(alpha, -1),
                        train=True)[1]


def _evaluation_sums(model, dtype, params, batch_stats, alpha, images, labels, mask):
  """``{'loss', 'correct', 'count'}`` summed over the rows where ``mask`` holds, at
  ``softmax(alpha)`` in evaluation mode."""
  logits, _ = apply_supernet(model, dtype, params, batch_stats, images,
                             jax.nn.softmax(alpha, -1), train=False)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  mask = mask.astype(losses.dtype)
  return {"loss": jnp.sum(losses * mask),
          "correct": jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
          "count": jnp.sum(mask)}


class _SupernetPrograms:
  """The jitted programs of one supernet in one compute dtype: its two gradients and its
  two evaluation passes, compiled once per input shape.

  They depend on nothing else, so every `BilevelSearch` of the process on an equal
  supernet (a Flax module compares by its fields) shares them through
  `_supernet_programs`: a study's second search, a resumed search, the tests' searches
  trace none of them again."""

  def __init__(self, model, dtype, options):
    def bind(fn):
      return jax.jit(functools.partial(fn, model, dtype))

    self.value_and_grads = bind(supernet_value_and_grads)
    self.value_and_weights_grad = bind(supernet_value_and_weights_grad)
    self.batch_stats_update = bind(_batch_stats_update)
    self.evaluation_sums = bind(_evaluation_sums)
    loss, logits, new_stats, grad_params, grad_weights = range(5)
    # ``(loss, logits, d loss/d weights)``: `value_and_weights_grad` where the step also
    # needs `value_and_grads` at the same shapes: one trace of the supernet's forward and
    # backward pass instead of two.
    self.weights_grad_from_full = _outputs_of(self.value_and_grads,
                                              (loss, logits, grad_weights),
                                              "supernet_value_and_weights_grad")
    # ``(loss, logits, new batch_stats, d loss/d params)``, the same way: without the
    # architecture weights' gradient, a reduction over every operation's output on every
    # edge.
    self.params_grad_from_full = _outputs_of(self.value_and_grads,
                                             (loss, logits, new_stats, grad_params),
                                             "supernet_value_and_params_grad")
    self.top_level = _TopLevel(options)
    self.jitted = frozenset({self.value_and_grads, self.value_and_weights_grad,
                             self.batch_stats_update, self.evaluation_sums,
                             self.weights_grad_from_full, self.params_grad_from_full})


@functools.lru_cache(maxsize=8)
def _supernet_programs(model, dtype, options) -> _SupernetPrograms:
  """The process's `_SupernetPrograms` for ``model`` in ``dtype``, their top-level
  programs compiled with XLA's ``options`` (a tuple of pairs, `xla_compiler_options`);
  the 8 most recent are kept (a search keeps its own alive as long as it lives)."""
  return _SupernetPrograms(model, dtype, options)


class _TopLevel:
  """``program -> program'``: a jitted ``program`` as a program of its own compiled with
  XLA's ``options`` (pairs; none: ``program`` itself). JAX takes compiler options on a
  top-level ``jax.jit`` only, and the step's programs are also called inside others (a
  fused step, the vmapped neighbors, the architecture side's gradients), so ``program'``
  is a jit around a call of ``program``, whose trace jit's cache gives it: one equation.
  Made once per program, so compiled once."""

  def __init__(self, options):
    self.options = dict(options) or None
    self._programs: dict[Callable, Callable] = {}

  def __call__(self, program: Callable) -> Callable:
    if self.options is None:
      return program
    if program not in self._programs:
      def top_level(*args):
        return program(*args)

      # Its name in profiles and XLA's dumps stays the program's.
      top_level.__name__ = top_level.__qualname__ = getattr(program, "__name__", "program")
      self._programs[program] = jax.jit(top_level, compiler_options=self.options)
    return self._programs[program]


def _outputs_of(full: Callable, picks: tuple[int, ...], name: str) -> Callable:
  """A jitted function of ``full``'s arguments returning its outputs ``picks`` (positions in
  its output tuple). ``full`` is a jitted function called inside: its trace comes from
  jit's cache, one equation in this function's trace, where binding its 20,000 traced
  equations again took 1.3 s, and more under `vmap` (the reference-size gradient); then
  JAX's lowering drops what the other outputs alone need. ``name``: the program's, in
  profiles and XLA's dumps."""

  def outputs(*args):
    outs = full(*args)
    return tuple(outs[i] for i in picks)

  outputs.__name__ = outputs.__qualname__ = name
  return jax.jit(outputs)


def _placed_like(inputs) -> Callable[..., jax.ShapeDtypeStruct]:
  """``like(template, shape=None, dtype=None)``: a stand-in, for lowering, for an array a
  step on ``inputs`` (a pytree) computes, of ``template``'s shape and dtype unless given.
  It is placed as ``template`` where an input is committed to its devices: a program's
  outputs are then committed (jit's cache key tells committed arrays from the others), and
  on a data mesh replicated like the state or split like the batch, as ``template`` is."""
  committed = any(getattr(x, "committed", False) for x in jax.tree.leaves(inputs))

  def like(template, shape=None, dtype=None):
    return jax.ShapeDtypeStruct(template.shape if shape is None else shape,
                                template.dtype if dtype is None else dtype,
                                sharding=template.sharding if committed else None)

  return like


def _on_cpu() -> bool:
  return jax.default_backend() == "cpu"


def supernet_kernels(model, platform: str) -> tuple[bool, bool]:
  """Whether ``model``'s kernels are the accelerators', and whether they are the TPU's:
  where the search makes its choices for an accelerator. A DARTS supernet says so by its
  depthwise implementation (`F.accelerator_kernels`, `F.tpu_kernels`), so that its step
  compiled for an accelerator on a CPU host (`benchmarks/gpu_compile.py`) is the
  accelerator's; a supernet without one (NAS-Bench-201's) by the ``platform`` the step
  compiles for."""
  dw_impl = getattr(model, "dw_impl", None)
  if dw_impl is None:
    return platform != "cpu", platform == "tpu"
  return F.accelerator_kernels(dw_impl), F.tpu_kernels(dw_impl)


def fused_compile(mode: str, accelerator: bool, order: str, neighbors: int,
                  warmup_steps: int) -> bool:
  """Whether a step compiles as one program: ``compile='fused'``, or ``'auto'`` for
  first-order DARTS (one architecture, ``neighbors == 1``) with the CPU's kernels
  (``accelerator`` False) and no warm-up steps.

  There XLA:CPU compiles the fused step sooner and runs it as fast or faster
  (`benchmarks/search_step.py`, this project's 2-core CPU, runs alternated: the
  reference size's step 23.2 s against 27.4 s, first step 183 s against 196 s, peak
  10.8 GB against 11.7 GB; the quick-start preset's first step 37.6-38.4 s against
  44.1-44.8 s, its step equal, its peak 0.3 GB higher while it compiles): each run of a
  program takes its buffers from malloc as fresh memory, which the kernel zero-fills,
  and the shared step's two programs take more of it than the one.
  Elsewhere the shared step stays: a warm-up compiles a weight step of its own, so a
  fused search would compile the full gradient twice; NA-DARTS's neighbors and the
  second order's points would each be inlined into the program (the finite-difference
  order at B=16, C=8, 5 cells: first step 210 s against 106 s, peak 6.7 GB against 3.6
  GB, XLA's compile of the one program included, for a step 4 % faster); and on a GPU
  the fused step compiles on one thread for its IR (`benchmarks/README.md`)."""
  if mode != "auto":
    return mode == "fused"
  return not accelerator and order == "first" and neighbors == 1 and not warmup_steps


def takes_kernel_grads(model) -> bool:
  """Whether ``model`` takes ``kernel_grads`` (`apply_supernet`), as DARTS's supernet
  does: what a step compiled as a loop (``compile='loop'``) needs."""
  return "kernel_grads" in inspect.signature(type(model).__call__).parameters


def _traced(args) -> bool:
  """Whether a program called on ``args`` is being traced into another (a fused step, a
  vmapped or differentiated function) rather than run: whether its arguments are tracers.
  A step's calls are traced all together or not at all, so the arguments that are arrays
  themselves answer, one ``isinstance`` each; only a call with none looks at its trees'
  leaves (flattening a step's parameters, gradients and optimizer state: about 0.5 ms)."""
  arrays = [a for a in args if isinstance(a, (jax.Array, np.ndarray))]
  if arrays:
    return any(isinstance(a, jax.core.Tracer) for a in arrays)
  return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(args))


def _tree_axpy(a, x, y):
  """``a * x + y`` over pytrees."""
  return jax.tree.map(lambda u, v: a * u + v, x, y)


class BilevelSearch:
  """Builds the state and the step of a DARTS / NA-DARTS search.

  ``model`` is a supernet whose ``__call__(images, weights, train)`` takes architecture
  weights of shape ``space.alpha_shape``. ``config`` is the ``search`` block of an
  experiment config (see ``configs/quickstart.py``). ``platform``: the backend the step
  compiles for, which sets XLA's options (`xla_compiler_options`) and, for a supernet
  without a depthwise implementation, the choices made for accelerators
  (`supernet_kernels`); by default JAX's default backend (`benchmarks/gpu_compile.py`
  compiles a GPU's step on a CPU).
  """

  def __init__(self, model, space: SearchSpace, config: ml_collections.ConfigDict,
               steps_per_epoch: int, platform: str | None = None):
    validate_search_config(config)
    self.model = model
    self.space = space
    self.config = config
    self.steps_per_epoch = steps_per_epoch
    self.weight_tx = weight_optimizer(config.weights, config.epochs, steps_per_epoch)
    self.arch_tx = arch_optimizer(
        config.arch, (config.epochs - config.get("warmup_epochs", 0)) * steps_per_epoch)
    self.lr_schedule = weight_lr_schedule(config.weights, config.epochs, steps_per_epoch)
    self.warmup_steps = config.get("warmup_epochs", 0) * steps_per_epoch
    self.neighborhood = objective.Neighborhood.from_config(config)
    evaluate = config.neighbors.get("evaluate", "auto")
    self.vmap_neighbors = evaluate == "vmap" or (evaluate == "auto" and not _on_cpu())
    self.neighbor_chunk = config.neighbors.get("chunk", 0)
    self.compute_dtype = compute_dtype(config)
    platform = platform or jax.default_backend()
    self.compiler_options = xla_compiler_options(config, platform)
    self._jit_cache: dict[Any, Callable] = {}
    self._top_level = _TopLevel(self.compiler_options)
    accelerator, tpu = supernet_kernels(model, platform)
    # 'auto' on the CPU's kernels: a `lax.map` of a DARTS supernet's neighbors from
    # CIFAR-sized batches (`neighbors_vmapped`). NAS-Bench-201's (no depthwise
    # implementation) keeps the loop: mapped, its NA-DARTS K=4 step at its search setting
    # took 20.6-23.4 s against 11.6-12.1 s (benchmarks/README.md, "NAS-Bench-201 on a CPU,
    # its nodes computed once"), since XLA:CPU runs the dense convolutions of a loop's body
    # on a slow path (jax-ml/jax#12868; "NAS-Bench-201's convolutions out of loops").
    self._map_large_batches = (evaluate == "auto" and not self.vmap_neighbors
                               and not accelerator
                               and getattr(model, "dw_impl", None) is not None)
    # 'auto' on the TPU's kernels: one neighbor a vmapped pass unless a chunk says otherwise.
    # XLA's TPU compiler, for one v5e chip, at the reference size: NA-DARTS K=4 estimated at
    # 940 ms a step in 8.88 GB that way, against 1,197 ms in 15.30 GB of the chip's 15.75
    # with the four in one pass (`benchmarks/gpu_compile.py --tpu`; benchmarks/README.md,
    # "A TPU layout for the search cells").
    self._one_neighbor_a_pass = evaluate == "auto" and tpu
    mode = config.get("compile", "auto")
    if mode == "loop" and not takes_kernel_grads(model):
      raise ValueError(
          f"config.search.compile = 'loop' needs a supernet that can skip its kernels' "
          f"gradients (DARTS's SearchNetwork); {type(model).__name__} cannot: use "
          "'shared', 'fused' or 'auto'.")
    if mode == "loop" and accelerator:
      # Asked for, so taken; but it is a CPU's compile mode (benchmarks/README.md, "The
      # step as one loop, compiled for an H200").
      logging.warning(
          "config.search.compile = 'loop' with an accelerator's kernels: by XLA's H200 "
          "program at the reference size, NA-DARTS K=4's step moves 1.14x the bytes of "
          "'shared''s, launches 3.1x its kernels and waits on the device 755 times a step "
          "(a conditional's predicate read back to the host for each kernel gradient "
          "gate), for an XLA compile 8-26 % shorter; use 'auto'.")
    # A step compiled as a loop (`_loop_step`) is one program too, donated and traced
    # whole (`jit_step`).
    self.looped = mode == "loop"
    self.fused = self.looped or fused_compile(mode, accelerator, config.order,
                                              self.neighborhood.size, self.warmup_steps)
    # With the accelerators' kernels a step's first call compiles two supernet programs
    # side by side (`_compile_ahead`): XLA's GPU compiler spends much of a program's
    # compile on one thread (the reference-size step's H200 programs, compiled on this
    # project's 2-core CPU by `benchmarks/gpu_compile.py`: DARTS 117.6 s side by side
    # against 146.5 s one after the other, NA-DARTS K=4 135.5 s against 184.9 s).
    # XLA:CPU already compiles on every core: there the first step took as long
    # (quick-start preset: 51-53 s against 51-59 s) and 1.1 GB more memory.
    self._ahead_enabled = accelerator and not self.fused
    # The programs compiling on side threads, and the inputs (shapes and placements) for
    # which they were started.
    self._ahead: dict[Callable, concurrent.futures.Future] = {}
    self._ahead_inputs: set[Any] = set()
    # `weights_grad` shares `value_and_grads`' trace, except where the neighbors' split
    # batches give the first-order architecture step shapes of its own: the full gradient
    # is never needed at those shapes, and tracing it costs more than the smaller one.
    self._weights_grad_from_full_trace = not (
        config.order == "first" and self.neighborhood.batch == "split"
        and self.neighborhood.size > 1)
    # On accelerators the weight step's gradient leaves the architecture weights' gradient
    # out (`weight_step_grads`), except where the step compiles the full gradient at the
    # weight step's shapes anyway (the finite-difference order's gradient at the unrolled
    # weights, on a full batch, unless the neighbors are vmapped): a third compiled
    # program would cost more than it saves. On a CPU it keeps it: without it XLA:CPU's
    # program made the DARTS step slower (B=16, C=8, 5 cells, 32x32: 1.82-1.95 s against
    # 1.41-1.45 s): without the architecture gradient's reductions, which read an inner
    # node's cotangent, XLA:CPU recomputes that cotangent in every operation's backward
    # pass (benchmarks/README.md, "The weight step without the architecture gradient").
    self._weight_step_full = not accelerator or (
        config.order == "second_fd" and not (
            self.neighborhood.size > 1
            and (self.vmap_neighbors or self.neighborhood.batch == "split")))
    try:
      self._programs = _supernet_programs(model, self.compute_dtype, self.compiler_options)
    except TypeError as e:  # An unhashable field: jit needs the supernet as a static key.
      raise TypeError(
          f"The supernet {type(model).__name__} must be hashable: its compiled gradients "
          f"are shared by equal supernets ({e}); give its fields hashable values "
          "(tuples, not lists or dicts).") from e

  def _jitted(self, fn: Callable) -> Callable:
    """``fn`` itself when the step is fused (the outer jit traces it), else its cached
    ``jax.jit``: the pieces around the shared gradient are compiled once each."""
    if self.fused:
      return fn
    if fn not in self._jit_cache:
      self._jit_cache[fn] = jax.jit(fn)
    return self._jit_cache[fn]

  # ----------------------------------------------------------------------------- state
  def init(self, rng: jax.Array, sample_images: jax.Array) -> SearchState:
    """A fresh state; ``sample_images`` only fixes the input shape (one image is enough)."""
    param_rng, alpha_rng, state_rng = jax.random.split(rng, 3)
    alpha = init_alpha(alpha_rng, self.space.alpha_shape, self.config.arch.init_scale)
    variables = self.model.init(param_rng, sample_images[:1], jax.nn.softmax(alpha, -1),
                                train=True)
    params = variables["params"]
    # One small program instead of a zeros program per parameter shape (eagerly).
    weight_opt_state, arch_opt_state = self._call(jax.jit(self._init_optimizers),
                                                  (params, alpha))
    return SearchState(
        step=jnp.zeros((), jnp.int32), params=params,
        batch_stats=variables.get("batch_stats", {}), alpha=alpha,
        weight_opt_state=weight_opt_state, arch_opt_state=arch_opt_state, rng=state_rng)

  def _init_optimizers(self, params, alpha):
    return self.weight_tx.init(params), self.arch_tx.init(alpha)

  # ------------------------------------------------------------------ the one gradient
  def train_loss(self, params, batch_stats, weights, images, labels):
    """`supernet_train_loss` of this search's supernet."""
    return supernet_train_loss(self.model, self.compute_dtype, params, batch_stats, weights,
                               images, labels)

  def value_and_grads(self, *args):
    """`supernet_value_and_grads` of this search's supernet."""
    return supernet_value_and_grads(self.model, self.compute_dtype, *args)

  def grads(self, *args):
    """`value_and_grads`, both gradients, compiled once per input shape: the
    finite-difference order's gradient at the unrolled weights, NA-DARTS's neighbors in
    that order, and `weight_step_grads`' source. In a fused step too the supernet's
    gradients are these jitted programs: the step's trace calls them, so the supernet is
    traced once for every gradient the step takes, and XLA inlines them into its one
    program. Measured against tracing each gradient into the step (this project's 2-core
    CPU, alone, runs alternated): the quick-start preset's fused DARTS step traced for
    3.8 s instead of 5.5 s, its first step 38.1 s instead of 39.4 s (means of 4); at
    B=16, C=8, 5 cells, 32x32, 92.8 s instead of 96.1 s (2 each), the step as fast; the
    fused finite-difference order there 210 s instead of 235 s, but its compile peaked at
    6.6 GB instead of 5.3 GB (the compiled program's own memory equal)."""
    return self._call(self._programs.value_and_grads, args)

  def weight_step_grads(self, *args):
    """``(loss, logits, new batch_stats, d loss/d params)``: the weight step's gradient
    (and the virtual step's). On accelerators, where the step does not compile the full
    one at these shapes anyway, XLA's program leaves the architecture weights' gradient
    out: a reduction over every operation's output on every edge, 245 of the 3,286
    kernels the reference-size DARTS weight step launches on an H200 (XLA's program)."""
    return self._call(self._weight_step_program(), args)[:4]

  def _weight_step_program(self) -> Callable:
    """The jitted program `weight_step_grads` calls."""
    if self._weight_step_full:
      return self._programs.value_and_grads
    return self._programs.params_grad_from_full

  def weights_grad(self, *args):
    """`supernet_value_and_weights_grad`, compiled once per input shape (in a fused step
    too, as `grads`).

    Where the step also needs `value_and_grads` at the same shapes (every order, except
    first-order neighbors on split batches), it is not traced again: its program calls
    `value_and_grads`, whose trace jit keeps (`_SupernetPrograms.weights_grad_from_full`)."""
    return self._call(self._weights_grad_program(), args)

  def _weights_grad_program(self) -> Callable:
    """The jitted program `weights_grad` calls."""
    if self._weights_grad_from_full_trace:
      return self._programs.weights_grad_from_full
    return self._programs.value_and_weights_grad

  # ----------------------------------------------------------- compiling side by side
  def program_compiled_ahead(self) -> Callable:
    """The jitted supernet program a step's first call compiles on a side thread
    (`_compile_ahead`) at the shapes of a training batch: the one the step needs last.
    That is the weight step's, or with the finite-difference order (whose virtual step
    calls the weight step's program first) the finite-difference points' gradient."""
    if self.config.order == "second_fd":
      return self._weights_grad_program()
    return self._weight_step_program()

  def programs_compiled_ahead(self) -> tuple[Callable, ...]:
    """Every jitted program a step's first call compiles on side threads, each on its
    own: `program_compiled_ahead`, and the small programs around the two supernet
    programs whose arguments are the state's or shaped like its arrays (the key split, the
    architecture update, the weight update, the metrics; with an architecture side that
    evaluates neighbors, their weights and the chain back to alpha). On the caller's
    thread they compiled one after the other with the architecture side's supernet
    program, which is left there."""
    programs = [self.program_compiled_ahead(), self._jitted(_split_key)]
    if self.config.order != "second_exact":  # Its architecture side is one program.
      programs += [self._jitted(self._architecture_weights),
                   self._jitted(self._chain_to_alpha)]
    return (*programs, self._jitted(self._apply_arch_update),
            self._jitted(self._apply_weight_update), self._jitted(self._metrics))

  def _compile_ahead(self, state: SearchState, train_batch, val_batch) -> None:
    """Starts compiling `programs_compiled_ahead` on side threads, while this thread goes
    on to the architecture side and compiles its supernet program (XLA compiles outside
    Python's lock). Their arguments are those the step will give them: the state's, the
    training batch and architecture weights shaped and placed as ``softmax(alpha)``, and
    for the step's own results (key, gradients, losses, logits) shapes placed as they
    will be (`_placed_like`). Where a compiled program is in jit's caches already,
    compiling finds it there."""
    supernet, *small = self.programs_compiled_ahead()
    # Traced here: tracing holds Python's lock.
    lowered = {supernet: self._top_level_program(supernet).lower(
        state.params, state.batch_stats, self._call(self._jitted(_softmax), (state.alpha,)),
        *train_batch)}
    like = _placed_like((state, train_batch, val_batch))
    k = self.neighborhood.size
    key = like(state.rng)
    grads = jax.tree.map(like, state.params)
    losses = like(state.step, (k,), jnp.float32)
    scalar = like(state.step, dtype=jnp.float32)
    logits = lowered[supernet].out_info[1]
    # Stacked per neighbor with the finite-difference order, None with the first.
    neighbor_grads = None if self.config.order == "first" else jax.tree.map(
        lambda p: like(p, (k, *p.shape)), state.params)
    arguments = {
        self._jitted(_split_key): (state.rng,),
        self._jitted(self._architecture_weights): (state.alpha, key),
        self._jitted(self._chain_to_alpha): (
            state.alpha, key, losses, neighbor_grads,
            like(state.alpha, (k, *state.alpha.shape))),
        self._jitted(self._apply_arch_update): (like(state.alpha), state.arch_opt_state,
                                                state.alpha),
        self._jitted(self._apply_weight_update): (grads, state.weight_opt_state,
                                                  state.params, state.step),
        self._jitted(self._metrics): (
            state.step, scalar, like(train_batch[1], logits.shape, logits.dtype),
            train_batch[1], scalar, losses, losses, like(state.alpha), scalar,
            like(state.alpha)),
    }
    lowered.update({program: self._top_level_program(program).lower(*arguments[program])
                    for program in small})
    executor = concurrent.futures.ThreadPoolExecutor(len(lowered), "nanas_compile_ahead")
    self._ahead = {program: executor.submit(low.compile) for program, low in lowered.items()}
    executor.shutdown(wait=False)  # The threads end with their compiles.

  def _call(self, program: Callable, args):
    """``program(*args)`` (`_top_level_program`), once its compile ahead
    (`_compile_ahead`), if any, is done: a call before would compile it a second time."""
    compiling = self._ahead.pop(program, None)
    if compiling is not None:
      compiling.result()
    return self._top_level_program(program, args)(*args)

  def _top_level_program(self, program: Callable, args=()) -> Callable:
    """The jitted ``program`` as it runs on ``args``: traced (inside a fused step or
    another program), ``program`` itself, part of the caller's program; else a program of
    its own compiled with the search's XLA options (`_TopLevel`; the supernet's are the
    process's, shared as the supernet's programs are)."""
    if not self.compiler_options or _traced(args):
      return program
    if program in self._programs.jitted:
      return self._programs.top_level(program)
    return self._top_level(program)

  # ------------------------------------------------------------ architecture objective
  def _loss_and_accuracy(self, batch_stats):
    """``(params, weights, images, labels) -> (loss, accuracy)`` in training mode, for
    `objective.objective`."""

    def loss_fn(params, weights, images, labels):
      loss, (logits, _) = self.train_loss(params, batch_stats, weights, images, labels)
      return loss, accuracy(logits, labels)

    return loss_fn

  def _vmapped_neighbor_grads(self, params, batch_stats, weights, images, labels,
                              param_grads: bool):
    """Execution strategy ``'vmap'``: the K neighbors' losses, accuracies, parameter
    gradients (stacked, or None) and weight gradients under one ``jax.vmap``."""
    batches = objective.neighbor_batches(self.neighborhood, images, labels)
    xs = jnp.stack([b[0] for b in batches])
    ys = jnp.stack([b[1] for b in batches])

    # The shared gradients, batched: vmap transforms their cached traces (the weight
    # step's, where the shapes are the same) rather than tracing the supernet again.
    def one(w, x, y):
      if param_grads:
        loss, logits, _, grad_params, grad_weights = self.grads(params, batch_stats, w, x, y)
      else:
        (loss, logits, grad_weights), grad_params = self.weights_grad(
            params, batch_stats, w, x, y), None
      return loss, accuracy(logits, y), grad_params, grad_weights

    chunk = self.vmap_chunk()
    if 0 < chunk < weights.shape[0]:
      # Chunks of neighbors under vmap, one chunk after another: only one chunk's
      # activations are alive at a time.
      return jax.lax.map(lambda a: one(*a), (weights, xs, ys), batch_size=chunk)
    return jax.vmap(one)(weights, xs, ys)

  def neighbors_vmapped(self, images) -> bool:
    """Whether the architecture side evaluates its neighbors (K > 1) in one program, under
    ``jax.vmap`` in chunks of `vmap_chunk` neighbors, for a batch shaped like
    ``images``; else it calls the shared compiled gradient K times. ``neighbors.evaluate``
    ``'vmap'`` or ``'loop'`` as asked; ``'auto'`` vmaps on accelerators, and with the CPU's
    kernels from CIFAR-sized batches (`nanas_jax.nn.functional.cifar_sized`), one
    neighbor at a time, for a DARTS supernet: there XLA:CPU runs the four neighbors'
    gradients of NA-DARTS K=4 16-17 % faster as one program than as four runs of one
    (each run takes its buffers as new memory, which the kernel zero-fills), and loses on
    smaller batches (`benchmarks/README.md`, "NA-DARTS's neighbors as one program on a
    CPU"); NAS-Bench-201's supernet ran its step 1.8x slower so, and keeps the loop. A
    step compiled as a loop (``compile='loop'``) takes them one an iteration."""
    if self.looped:
      return False
    if self.vmap_neighbors:
      return True
    return self._map_large_batches and jnp.ndim(images) == 4 and F.cifar_sized(
        math.prod(images.shape[:3]))

  def vmap_chunk(self) -> int:
    """How many neighbors one vmapped pass evaluates (0: all), where they are vmapped
    (`neighbors_vmapped`): ``neighbors.chunk``; where it is 0, one where ``'auto'`` maps
    them on a CPU or vmaps them with the TPU's kernels."""
    if self.vmap_neighbors and not self._one_neighbor_a_pass:
      return self.neighbor_chunk
    return self.neighbor_chunk or 1

  def memory_options(self) -> list[str]:
    """The config changes that shrink this search's step, for the out-of-memory error
    (`nanas_jax.loop.memory_hint`): the neighbors one at a time where several are
    vmapped at once (the same search; at the reference size compiled for a TPU v5e chip,
    NA-DARTS K=4 needs 15.30 GB of its 15.75 with its neighbors in one pass and 8.88 GB
    one at a time, as DARTS does), then bfloat16 compute."""
    options = []
    k = self.neighborhood.size
    at_once = min(self.vmap_chunk() or k, k)
    if at_once > 1 and not self.looped and (self.vmap_neighbors or self._map_large_batches):
      options.append(f"config.search.neighbors.chunk=1 (the neighborhood's {k} gradients one "
                     f"after another rather than {at_once} at a time: the same search)")
    return options + dtype_memory_options(self.config)

  def _architecture_weights(self, alpha, key):
    return objective.architecture_weights(self.space, self.neighborhood, alpha, key)

  def _chain_to_alpha(self, alpha, key, losses, grad_params, grad_weights):
    return objective.chain_to_alpha(self.space, self.neighborhood, alpha, key, losses,
                                    grad_params, grad_weights)

  def arch_value_and_grads(self, params, batch_stats, alpha, images, labels, key,
                           param_grads: bool = True):
    """The architecture objective (`objective.objective`) at ``params`` and its
    gradients: ``(loss, (neighbor losses, neighbor accuracies), d/d params, d/d alpha)``;
    ``d/d params`` is None unless ``param_grads`` (the finite-difference second order
    needs it, the first order does not). The K neighbors are evaluated by the execution
    strategy (one vmapped call, or a shared compiled gradient K times) and chained back by
    `objective.chain_to_alpha`."""
    weights = self._call(self._jitted(self._architecture_weights), (alpha, key))
    k = weights.shape[0]
    if k > 1 and self.neighbors_vmapped(images):
      vmapped = (self._vmapped_neighbor_grads_with_params if param_grads
                 else self._vmapped_neighbor_grads_without_params)
      losses, accs, grad_params, grad_weights = self._call(
          self._jitted(vmapped), (params, batch_stats, weights, images, labels))
    else:
      batches = objective.neighbor_batches(self.neighborhood, images, labels)
      grad = self.grads if param_grads else self.weights_grad
      # One program for the K neighbors' weights, not K slicing programs run eagerly.
      each = self._call(self._jitted(_unstack), (weights,))
      outs = [grad(params, batch_stats, w, x, y) for w, (x, y) in zip(each, batches)]
      losses, accs, grad_params, grad_weights = self._call(
          self._jitted(_stack_outputs), (outs, [y for _, y in batches]))
    loss, grad_params, grad_alpha = self._call(self._jitted(self._chain_to_alpha),
                                               (alpha, key, losses, grad_params, grad_weights))
    return loss, (losses, accs), grad_params, grad_alpha

  def _vmapped_neighbor_grads_with_params(self, *args):
    return self._vmapped_neighbor_grads(*args, param_grads=True)

  def _vmapped_neighbor_grads_without_params(self, *args):
    return self._vmapped_neighbor_grads(*args, param_grads=False)

  # ------------------------------------------------------------------- arch gradients
  def _virtual_step(self, state: SearchState, alpha, train_x, train_y, grads_fn):
    """DARTS's unrolled weights ``w - xi (mu m + g + wd w)`` at architecture ``alpha``.
    With the shared compilation ``grads_fn`` is the weight step's compiled gradient and only
    the update around it is compiled anew (inside one jit it was a second copy of the
    supernet gradient to compile, as long as the first)."""
    g = grads_fn(state.params, state.batch_stats, self._call(self._jitted(_softmax), (alpha,)),
                 train_x, train_y)[3]
    return self._call(self._jitted(self._unrolled_params), (state, g))

  def _unrolled_params(self, state: SearchState, grad_params):
    """``w - xi (mu m + g + wd w)`` for the parameter gradient ``g``."""
    wcfg = self.config.weights
    xi = self.lr_schedule(state.step)
    momentum = momentum_buffer(state.weight_opt_state)
    return jax.tree.map(lambda w, gw, m: w - xi * (wcfg.momentum * m + gw
                                                   + wcfg.weight_decay * w),
                        state.params, grad_params, momentum)

  def _second_order_exact(self, state: SearchState, train_batch, val_batch, key):
    """``jax.grad`` of the objective at the unrolled weights, through the virtual step."""

    def unrolled_objective(alpha):
      unrolled = self._virtual_step(state, alpha, *train_batch, self.value_and_grads)
      return objective.objective(self._loss_and_accuracy(state.batch_stats), self.space,
                                 self.neighborhood, unrolled, alpha, key, *val_batch)

    (loss, aux), grad = jax.value_and_grad(unrolled_objective, has_aux=True)(state.alpha)
    return grad, loss, aux

  def arch_gradient(self, state: SearchState, train_batch, val_batch, key):
    """The architecture gradient of the configured order: ``(grad, loss, (neighbor
    losses, neighbor accuracies))``."""
    order = self.config.order
    if order == "first":
      loss, aux, _, grad = self.arch_value_and_grads(state.params, state.batch_stats,
                                                     state.alpha, *val_batch, key,
                                                     param_grads=False)
      return grad, loss, aux
    if order == "second_exact":
      return self._call(self._jitted(self._second_order_exact),
                        (state, train_batch, val_batch, key))

    unrolled = self._virtual_step(state, state.alpha, *train_batch, self.weight_step_grads)
    loss, aux, grad_w, grad_alpha = self.arch_value_and_grads(
        unrolled, state.batch_stats, state.alpha, *val_batch, key)
    plus, minus, r = self._call(self._jitted(_finite_difference_points),
                                (state.params, grad_w))
    weights = self._call(self._jitted(_softmax), (state.alpha,))
    plus = self.weights_grad(plus, state.batch_stats, weights, *train_batch)[2]
    minus = self.weights_grad(minus, state.batch_stats, weights, *train_batch)[2]
    grad = self._call(self._jitted(self._finite_difference_hypergradient),
                      (state, grad_alpha, plus, minus, r))
    return grad, loss, aux

  def _finite_difference_hypergradient(self, state, grad_alpha, plus, minus, r):
    """``grad_alpha - xi * (grad_alpha L_train(w+) - grad_alpha L_train(w-)) / 2r``."""
    weights_vjp = jax.vjp(lambda a: jax.nn.softmax(a, -1), state.alpha)[1]
    (hessian_term,) = weights_vjp((plus - minus) / (2 * r))
    return grad_alpha - self.lr_schedule(state.step) * hessian_term

  # -------------------------------------------------------------------------- the step
  def _apply_arch_update(self, grad_alpha, arch_opt_state, alpha):
    """The Adam step on alpha; also returns the new architecture weights."""
    updates, arch_opt_state = self.arch_tx.update(grad_alpha, arch_opt_state, alpha)
    alpha = optax.apply_updates(alpha, updates)
    return alpha, arch_opt_state, jax.nn.softmax(alpha, -1)

  def _apply_weight_update(self, grads, weight_opt_state, params, step):
    """The weight optimizer's step, and the state's step count after it (counted here, not
    by an operation of its own run eagerly); also returns the gradient's global norm, the
    metrics' ``weight_grad_norm``. Computed here, beside the optimizer's gradient clipping, XLA
    computes the norm once for both (common subexpressions); in the metrics' program it
    was one reduction per parameter again: 174 of the 188 kernels that program launched
    a step in XLA's H200 program at the reference size (`benchmarks/gpu_compile.py`)."""
    updates, weight_opt_state = self.weight_tx.update(grads, weight_opt_state, params)
    return (optax.apply_updates(params, updates), weight_opt_state, optax.tree.norm(grads),
            step + 1)

  def step(self, state: SearchState, train_batch, val_batch):
    """One architecture step then one weight step: ``(new state, metrics)``. Pure."""
    if self.looped:
      return self._loop_step(state, train_batch, val_batch)
    if self._ahead_enabled and not isinstance(state.alpha, jax.core.Tracer):
      # The first call on new inputs compiles the two supernet programs side by side.
      inputs = tuple((x.shape, x.dtype, getattr(x, "sharding", None))
                     for x in (state.alpha, *train_batch))
      if inputs not in self._ahead_inputs:
        self._ahead_inputs.add(inputs)
        self._compile_ahead(state, train_batch, val_batch)
    rng, key = self._call(self._jitted(_split_key), (state.rng,))
    grad_alpha, arch_loss, (neighbor_losses, neighbor_accs) = self.arch_gradient(
        state, train_batch, val_batch, key)
    alpha, arch_opt_state, weights = self._call(self._jitted(self._apply_arch_update),
                                                (grad_alpha, state.arch_opt_state, state.alpha))
    train_loss, logits, batch_stats, grads = self.weight_step_grads(
        state.params, state.batch_stats, weights, *train_batch)
    return self._weight_update_and_metrics(
        state, rng, train_batch, (alpha, arch_opt_state, grad_alpha, arch_loss),
        (neighbor_losses, neighbor_accs), (train_loss, logits, batch_stats, grads))

  def _loop_step(self, state: SearchState, train_batch, val_batch):
    """`step` as one loop (``compile='loop'``, first order on full batches): iteration
    ``i < K`` takes neighbor ``i``'s gradient on the validation batch, iteration ``K`` the
    architecture update from the K neighbors (`objective.chain_to_alpha`), then the weight
    step's gradient on the training batch at the new ``softmax(alpha)``. Every iteration
    runs the one full supernet gradient; the neighbors' skip the kernels' gradients at
    run time (``kernel_grads``). The same step as `step`'s, up to float rounding (tested).

    So XLA compiles one supernet gradient where the shared step compiles two (the
    architecture side's own and the weight step's): a shorter first step for a slower
    step, which suits short searches. Not `'auto'`'s choice: measured on a CPU
    (`benchmarks/README.md`, "NA-DARTS's step as one loop"), NA-DARTS K=4's first step
    was 16-21 % shorter at the quick-start preset and 37 % at B=16, C=8, 5 cells, 32x32,
    but XLA fuses the full gradient's body otherwise than the architecture side's own
    program, and the step was 6-11 % slower: the compile saved is paid back within
    100-180 steps, and searches run hundreds. A CPU's mode: with the accelerators'
    kernels it warns (`__init__`), since by XLA's H200 program each gate is a
    conditional whose predicate the host reads back before the branch runs, and every
    iteration runs the full gradient's kernels (benchmarks/README.md, "The step as one
    loop, compiled for an H200")."""
    rng, key = _split_key(state.rng)
    neighbor_weights = self._architecture_weights(state.alpha, key)
    k = neighbor_weights.shape[0]
    images = jnp.stack([val_batch[0], train_batch[0]])
    labels = jnp.stack([val_batch[1], train_batch[1]])
    grads = functools.partial(self._programs.value_and_grads, state.params, state.batch_stats)

    def arch_update(losses, grad_weights):
      arch_loss, _, grad_alpha = self._chain_to_alpha(state.alpha, key, losses, None,
                                                      grad_weights)
      alpha, arch_opt_state, weights = self._apply_arch_update(
          grad_alpha, state.arch_opt_state, state.alpha)
      return (alpha, arch_opt_state, grad_alpha, arch_loss), weights

    def body(carry, i):
      losses, grad_weights, arch = carry
      weight_step = i == k
      # At the last iteration, with every neighbor's gradient in: the architecture update,
      # and the weight step at its new weights; before it, neighbor i's weights.
      neighbor = neighbor_weights[jnp.minimum(i, k - 1)]
      arch, weights = jax.lax.cond(weight_step, arch_update, lambda *_: (arch, neighbor),
                                   losses, grad_weights)
      side = weight_step.astype(jnp.int32)
      loss, logits, new_stats, grad_params, grad_w = grads(weights, images[side],
                                                           labels[side], weight_step)
      # A neighbor's results at its index; the weight step's, index K, past the end.
      put = lambda a, x: a.at[i].set(x, mode="drop")
      carry = put(losses, loss), put(grad_weights, grad_w), arch
      return carry, (loss, accuracy(logits, labels[side]), logits, new_stats, grad_params)

    # Stacked outputs rather than carried ones: their shapes come from the body's trace.
    arch = (state.alpha, state.arch_opt_state, jnp.zeros_like(state.alpha), jnp.zeros(()))
    init = jnp.zeros(k), jnp.zeros_like(neighbor_weights), arch
    (_, _, arch), (losses, accs, logits, new_stats, grad_params) = jax.lax.scan(
        body, init, jnp.arange(k + 1))
    last = lambda tree: jax.tree.map(lambda a: a[k], tree)
    return self._weight_update_and_metrics(
        state, rng, train_batch, arch, (losses[:k], accs[:k]),
        (losses[k], last(logits), last(new_stats), last(grad_params)))

  def _weight_update_and_metrics(self, state, rng, train_batch, arch, neighbors, weight_side):
    """The end of a step: the weight update from the weight step's gradient
    (``weight_side``: its loss, logits, new statistics and parameter gradient), then the
    new state and the metrics; ``arch``: alpha, its optimizer state, its gradient and the
    objective's value after the architecture step; ``neighbors``: their losses and
    accuracies."""
    alpha, arch_opt_state, grad_alpha, arch_loss = arch
    neighbor_losses, neighbor_accs = neighbors
    train_loss, logits, batch_stats, grads = weight_side
    params, weight_opt_state, grad_norm, step = self._call(
        self._jitted(self._apply_weight_update),
        (grads, state.weight_opt_state, state.params, state.step))
    metrics = self._call(self._jitted(self._metrics), (
        state.step, train_loss, logits, train_batch[1], arch_loss, neighbor_losses,
        neighbor_accs, grad_alpha, grad_norm, alpha))
    new_state = state.replace(step=step, params=params, batch_stats=batch_stats,
                              alpha=alpha, weight_opt_state=weight_opt_state,
                              arch_opt_state=arch_opt_state, rng=rng)
    return new_state, metrics

  def _metrics(self, step, train_loss, logits, train_y, arch_loss, neighbor_losses,
               neighbor_accs, grad_alpha, grad_norm, alpha):
    return {
        **self._weight_metrics(step, train_loss, logits, train_y, grad_norm, alpha),
        "arch_loss": arch_loss,
        "neighbor_loss_mean": neighbor_losses.mean(),
        "neighbor_loss_std": neighbor_losses.std(),
        "neighbor_loss_max": neighbor_losses.max(),
        "neighbor_accuracy": neighbor_accs.mean(),
        "alpha_grad_norm": optax.tree.norm(grad_alpha),
    }

  def _weight_metrics(self, step, train_loss, logits, train_y, grad_norm, alpha):
    return {
        "train_loss": train_loss,
        "train_accuracy": accuracy(logits, train_y),
        "learning_rate": self.lr_schedule(step),
        "weight_grad_norm": grad_norm,
        "alpha_entropy": alpha_entropy(alpha),
    }

  def warmup_step(self, state: SearchState, train_batch, val_batch):
    """A warm-up step (``config.warmup_epochs``, as PC-DARTS and P-DARTS do): the weight
    step alone at ``softmax(alpha)``; alpha, its optimizer and the key stay as they are.
    The validation batch is not used."""
    del val_batch
    weights = self._call(self._jitted(_softmax), (state.alpha,))
    train_loss, logits, batch_stats, grads = self.weight_step_grads(
        state.params, state.batch_stats, weights, *train_batch)
    params, weight_opt_state, grad_norm, step = self._call(
        self._jitted(self._apply_weight_update),
        (grads, state.weight_opt_state, state.params, state.step))
    metrics = self._call(self._jitted(self._weight_metrics), (
        state.step, train_loss, logits, train_batch[1], grad_norm, state.alpha))
    return state.replace(step=step, params=params, batch_stats=batch_stats,
                         weight_opt_state=weight_opt_state), metrics

  def jit_step(self) -> Callable[..., tuple[SearchState, dict[str, jax.Array]]]:
    """The step to call in a loop, on states in step order: `step`, or `warmup_step`
    during the warm-up epochs. Each is one ``jax.jit`` with the state donated when fused,
    else the step itself (its pieces are jitted and share compiled gradients)."""
    search, warmup = self.step, self.warmup_step
    if self.fused:
      options = dict(self.compiler_options) or None
      search = jax.jit(search, donate_argnums=0, compiler_options=options)
      warmup = jax.jit(warmup, donate_argnums=0, compiler_options=options)
    if not self.warmup_steps:
      return search

    # The step count is read from the state until the warm-up is over, and from then on
    # never again: reading a device value every step would make the host wait for it.
    warming = [True]

    def step(state: SearchState, train_batch, val_batch):
      if warming[0] and int(jax.device_get(state.step)) < self.warmup_steps:
        return warmup(state, train_batch, val_batch)
      warming[0] = False
      return search(state, train_batch, val_batch)

    return step

  def recalibrated_batch_stats(self, state: SearchState, images: Iterable[Any]) -> Any:
    """The BatchNorm statistics of the supernet at ``softmax(state.alpha)`` re-estimated on
    the batches of training ``images`` (`recalibration.average_batch_statistics`: a
    training-mode pass a batch), every program compiled with the search's options."""
    update = self._programs.batch_stats_update
    return recalibration.average_batch_statistics(
        lambda zeros, x: self._call(update, (state.params, zeros, state.alpha, x)),
        state.batch_stats, ((x,) for x in images), self.compiler_options)

  def eval_fn(self) -> Callable[..., dict[str, jax.Array]]:
    """Jitted ``(state, images, labels, mask) -> {'loss', 'correct', 'count'}``: sums over
    the rows where ``mask`` holds, of the supernet at ``softmax(alpha)`` in evaluation mode
    (running BatchNorm statistics). Sums, not per-example values, so a sharded batch
    reduces on the devices and every process reads the same three numbers."""
    sums = self._programs.evaluation_sums
    return lambda state, images, labels, mask: self._call(sums, (
        state.params, state.batch_stats, state.alpha, images, labels, mask))


def alpha_entropy(alpha: jax.Array) -> jax.Array:
  """Mean entropy (nats) of the per-edge operation distributions ``softmax(alpha)``:
  ``log(#ops)`` at the uniform start, 0 when every edge has committed to one operation."""
  log_p = jax.nn.log_softmax(alpha.astype(jnp.float32), -1)
  return -jnp.mean(jnp.sum(jnp.exp(log_p) * log_p, -1))


def _softmax(alpha):
  return jax.nn.softmax(alpha, -1)


def _split_key(key):
  """The state's next key and this step's, as two arrays (not one array of two keys,
  which unpacking would slice eagerly)."""
  rng, sub = jax.random.split(key)
  return rng, sub


def _unstack(stacked):
  return tuple(stacked)


def _stack_outputs(outs, labels):
  """Per-neighbor outputs of `BilevelSearch.grads` (or of `BilevelSearch.weights_grad`)
  as stacked arrays: losses, accuracies, parameter gradients (a tree with a leading
  neighbor axis, or None) and weight gradients."""
  losses = jnp.stack([o[0] for o in outs])
  accs = jnp.stack([accuracy(o[1], y) for o, y in zip(outs, labels)])
  grad_params = None
  if len(outs[0]) == 5:
    grad_params = jax.tree.map(lambda *g: jnp.stack(g), *[o[3] for o in outs])
  return losses, accs, grad_params, jnp.stack([o[-1] for o in outs])


def _finite_difference_points(params, direction):
  """``w +- r v`` with DARTS's ``r = 0.01 / ||v||``."""
  r = 0.01 / optax.tree.norm(direction)
  return _tree_axpy(r, direction, params), _tree_axpy(-r, direction, params), r


def validate_search_config(config: ml_collections.ConfigDict) -> None:
  """Fails fast, naming the field, on values the step cannot run with."""

  def check(ok: bool, field: str, value: Any, expected: str):
    if not ok:
      raise ValueError(f"config.search.{field} = {value!r} is invalid: expected {expected}.")

  check(config.algorithm in ALGORITHMS, "algorithm", config.algorithm, f"one of {ALGORITHMS}")
  check(config.order in ORDERS, "order", config.order, f"one of {ORDERS}")
  check(config.get("compile", "auto") in COMPILE_MODES, "compile", config.get("compile"),
        f"one of {COMPILE_MODES}")
  check(config.get("compile", "auto") != "loop" or config.order == "first", "compile",
        "loop", f"'auto', 'shared' or 'fused' with order = {config.order!r}: a step compiled "
        "as a loop computes the first order")
  check_compute_dtype(config)
  check_gpu_autotune(config)
  check(isinstance(config.epochs, int) and config.epochs >= 1, "epochs", config.epochs,
        "an integer >= 1")
  warmup = config.get("warmup_epochs", 0)
  check(isinstance(warmup, int) and 0 <= warmup < config.epochs, "warmup_epochs", warmup,
        f"an integer in [0, epochs = {config.epochs}): weight-only epochs before the "
        "architecture steps start")
  recalibrate = config.get("recalibrate_batches", 0)
  check(isinstance(recalibrate, int) and recalibrate >= 0, "recalibrate_batches",
        recalibrate, "an integer >= 0 (0: validate with the running BatchNorm statistics)")
  nb = config.neighbors
  if config.algorithm == "na_darts":
    check(isinstance(nb.num, int) and nb.num >= 1, "neighbors.num", nb.num, "an integer >= 1")
    check(nb.kind in neighborhood.PERTURBATIONS, "neighbors.kind", nb.kind,
          f"one of {neighborhood.PERTURBATIONS}")
    check(isinstance(nb.radius, int) and nb.radius >= 1, "neighbors.radius", nb.radius,
          "an integer >= 1")
    check(nb.aggregation in neighborhood.AGGREGATIONS, "neighbors.aggregation",
          nb.aggregation, f"one of {neighborhood.AGGREGATIONS}")
    check(nb.tau > 0, "neighbors.tau", nb.tau, "> 0")
    check(nb.batch in objective.NEIGHBOR_BATCHES, "neighbors.batch", nb.batch,
          f"one of {objective.NEIGHBOR_BATCHES}")
    # With 'split', neighbor k's loss is measured on its own slice: their mean estimates
    # the mean neighbor loss over the data, but their max would partly pick the hardest
    # slice rather than the worst neighbor.
    check(nb.batch == "full" or nb.aggregation == "mean", "neighbors.batch", nb.batch,
          f"'full' with neighbors.aggregation = {nb.aggregation!r}: 'split' gives each "
          "neighbor its own slice of the validation batch, so only the 'mean' aggregate "
          "still measures the neighbors rather than the slices")
    check(nb.get("evaluate", "auto") in NEIGHBOR_EVALUATIONS, "neighbors.evaluate",
          nb.get("evaluate"), f"one of {NEIGHBOR_EVALUATIONS}")
    check(config.get("compile", "auto") != "loop" or nb.batch == "full", "compile", "loop",
          "'auto', 'shared' or 'fused' with neighbors.batch = 'split': a step compiled as a "
          "loop runs every gradient on batches of one shape")
    chunk = nb.get("chunk", 0)
    check(isinstance(chunk, int) and not isinstance(chunk, bool) and chunk >= 0,
          "neighbors.chunk", chunk, "an integer >= 0: how many neighbors one batched pass "
          "evaluates with neighbors.evaluate = 'vmap' (0: all of them at once; with "
          "'auto', one at a time on a CPU or a TPU)")
  w, a = config.weights, config.arch
  check(w.lr > 0, "weights.lr", w.lr, "> 0")
  check(0 <= w.lr_min <= w.lr, "weights.lr_min", w.lr_min, "in [0, weights.lr]")
  check(0 <= w.momentum < 1, "weights.momentum", w.momentum, "in [0, 1)")
  check(w.weight_decay >= 0, "weights.weight_decay", w.weight_decay, ">= 0")
  check(w.grad_clip > 0, "weights.grad_clip", w.grad_clip, "> 0")
  check(a.lr > 0, "arch.lr", a.lr, "> 0")
  check(0 <= a.b1 < 1 and 0 <= a.b2 < 1, "arch.b1/b2", (a.b1, a.b2), "in [0, 1)")
  check(a.weight_decay >= 0, "arch.weight_decay", a.weight_decay, ">= 0")
  check(a.get("schedule", "constant") in ARCH_SCHEDULES, "arch.schedule",
        a.get("schedule"), f"one of {ARCH_SCHEDULES}")


def check_compute_dtype(config: ml_collections.ConfigDict) -> None:
  """Fails fast, naming the field, on a ``config.dtype`` the supernet cannot compute in."""
  dtype = config.get("dtype", "float32")
  if dtype not in COMPUTE_DTYPES:
    raise ValueError(f"config.search.dtype = {dtype!r} is invalid: expected one of "
                     f"{COMPUTE_DTYPES}: the dtype the supernet computes in (parameters, "
                     "alpha and BatchNorm statistics stay float32).")


def dtype_memory_options(config: ml_collections.ConfigDict) -> list[str]:
  """bfloat16 compute, where a search computes in float32 (`memory_options`)."""
  if config.get("dtype", "float32") != "float32":
    return []
  return ["config.search.dtype='bfloat16' (activations in bfloat16; parameters, alpha and "
          "BatchNorm statistics stay float32)"]


def check_gpu_autotune(config: ml_collections.ConfigDict) -> None:
  """Fails fast, naming the field, on a ``config.gpu_autotune`` that is not a bool."""
  autotune = config.get("gpu_autotune", False)
  if not isinstance(autotune, bool):
    raise ValueError(f"config.search.gpu_autotune = {autotune!r} is invalid: expected True "
                     "(XLA times candidate kernels on the GPU as it compiles) or False "
                     "(cuDNN's and cuBLAS's heuristics choose: a shorter first step).")


def neighbors_per_step(config: ml_collections.ConfigDict) -> int:
  """How many architectures the architecture step evaluates (for batch checks)."""
  return objective.Neighborhood.from_config(config).size
