"""Tests of the bilevel DARTS / NA-DARTS step against independent computations.

A small model that takes architecture weights as input (the supernet's contract) keeps
compile times short; the supernet itself is exercised end to end in test_experiment.py,
and here only where the compute dtype meets its convolutions and BatchNorms.
"""

import collections
import logging
import math
import threading
import time

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import optax
import pytest

from configs import quickstart
from nanas_jax import neighborhood, parallel, spaces
from nanas_jax.nn import functional as F
from nanas_jax.nn import nb201_supernet
from nanas_jax.nn.supernet import SearchNetwork
from nanas_jax.search import bilevel
from nanas_jax.search.bilevel import BilevelSearch
from jaxprs import all_eqns

SPACE = spaces.get_space("darts")


class ToyArchModel(nn.Module):
  """logits = tanh(sum_teo w[t,e,o] * x @ P[t,e,o]) @ V: smooth in params and weights, with
  a cross term between them, so second-order terms are non-zero. ``dw_impl`` computes
  nothing: 'conv' makes the search treat it as a supernet on accelerators."""
  hidden: int = 5
  classes: int = 3
  dw_impl: str = "auto"

  @nn.compact
  def __call__(self, x, weights, train):
    x = x.reshape(x.shape[0], -1)
    proj = self.param("proj", nn.initializers.normal(0.5), weights.shape + (x.shape[-1], self.hidden))
    h = jnp.tanh(jnp.einsum("teo,bd,teodh->bh", weights, x, proj))
    return nn.Dense(self.classes)(h)


class GatedToyArchModel(ToyArchModel):
  """`ToyArchModel` whose projection is a kernel that ``kernel_grads`` can skip (as the
  DARTS supernet's convolutions: `F.kernel_gated`), so that a step compiles as a loop."""

  @nn.compact
  def __call__(self, x, weights, train, kernel_grads=None):
    x = x.reshape(x.shape[0], -1)
    proj = self.param("proj", nn.initializers.normal(0.5),
                      weights.shape + (x.shape[-1], self.hidden))
    inputs = jnp.einsum("teo,bd->bteod", weights, x)
    h = jnp.tanh(F.kernel_gated(lambda a, p: jnp.einsum("bteod,teodh->bh", a, p), inputs,
                                proj, kernel_grads))
    return nn.Dense(self.classes)(h)


def make_config(algorithm="darts", order="first", **neighbors):
  config = quickstart.get_config().search
  config.algorithm = algorithm
  config.order = order
  config.neighbors.update(neighbors)
  return config


def make_batches(seed=0, n=8, d=4, classes=3, dtype=np.float32):
  rng = np.random.default_rng(seed)
  train = (rng.normal(size=(n, d)).astype(dtype), rng.integers(0, classes, n))
  val = (rng.normal(size=(n, d)).astype(dtype), rng.integers(0, classes, n))
  return train, val


def assert_states_close(a, b, atol=1e-7):
  """Two search states equal leaf by leaf (the random keys by their data)."""
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_allclose(x, y, rtol=2e-5, atol=atol)


def init_state(search, x, seed=0, alpha_scale=1.0):
  state = search.init(jax.random.key(seed), jnp.asarray(x))
  # Larger alpha than the 1e-3 default, so that perturbations change the weights visibly.
  alpha = alpha_scale * jax.random.normal(jax.random.key(seed + 1), SPACE.alpha_shape,
                                          state.alpha.dtype)
  return state.replace(alpha=alpha, arch_opt_state=search.arch_tx.init(alpha))


def loop_against_shared(place):
  """Two NA-DARTS steps (K=2) of `GatedToyArchModel` compiled as a loop, its state and
  batches placed by ``place(state, batches)`` (over devices or hosts), against the shared
  step's on one device: ``(the largest difference of their parameters, alpha and alpha's
  optimizer state; how far the shared step moved alpha; the loop's state)``. For the
  tests of the loop on several devices (`test_parallel.py`) and hosts
  (`test_multihost.py`)."""
  train, val = make_batches()
  states = {}
  for mode in ("shared", "loop"):
    config = make_config("na_darts", "first", num=2, kind="swap")
    config.compile, config.warmup_epochs = mode, 0
    search = BilevelSearch(GatedToyArchModel(), SPACE, config, 10)
    state, batches = init_state(search, train[0]), (train, val)
    if mode == "loop":
      state, batches = place(state, batches)
    step = search.jit_step()
    for _ in range(2):
      state, _ = step(state, *batches)
    states[mode] = state
  leaves = lambda s: jax.tree.leaves((s.params, s.alpha, s.arch_opt_state))
  diff = max(float(np.max(np.abs(np.asarray(a) - parallel.to_host(b))))
             for a, b in zip(leaves(states["shared"]), leaves(states["loop"])))
  moved = float(np.max(np.abs(np.asarray(states["shared"].alpha)
                              - np.asarray(init_state(search, train[0]).alpha))))
  return diff, moved, states["loop"]


def direct_objective(search, state, alpha, x, y, key, num, kind="swap"):
  """The NA objective written out: a Python loop over the sampled neighbors."""
  weights = neighborhood.sample_perturbed_weights(SPACE, key, alpha, num, kind, 1)
  losses = [bilevel.cross_entropy(search.model.apply({"params": state.params}, x, w,
                                                     train=True), y) for w in weights]
  return sum(losses) / len(losses)


# vmap over all 4 neighbors, over chunks of 2, over a chunk of 3 and the 1 left.
@pytest.mark.parametrize("evaluate,chunk", [("vmap", 0), ("vmap", 2), ("vmap", 3),
                                            ("loop", 0)])
def test_na_objective_and_gradients_equal_a_python_loop(evaluate, chunk):
  config = make_config("na_darts", num=4, kind="swap", radius=1, evaluate=evaluate,
                       chunk=chunk)
  search = BilevelSearch(ToyArchModel(), SPACE, config, steps_per_epoch=10)
  (tx, _), (vx, vy) = make_batches()
  state = init_state(search, tx)
  key = jax.random.key(7)
  loss, (losses, _), grad_params, grad_alpha = search.arch_value_and_grads(
      state.params, state.batch_stats, state.alpha, vx, vy, key)
  assert losses.shape == (4,)
  np.testing.assert_allclose(
      loss, direct_objective(search, state, state.alpha, vx, vy, key, 4), rtol=1e-6)
  expected_alpha = jax.grad(lambda a: direct_objective(search, state, a, vx, vy, key, 4))(
      state.alpha)
  np.testing.assert_allclose(grad_alpha, expected_alpha, rtol=1e-5, atol=1e-7)
  expected_params = jax.grad(lambda p: direct_objective(
      search, state.replace(params=p), state.alpha, vx, vy, key, 4))(state.params)
  for a, b in zip(jax.tree.leaves(grad_params), jax.tree.leaves(expected_params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_chunked_neighbors_hold_one_chunk_of_activations():
  """With ``neighbors.chunk = 1`` the vmapped architecture side needs the temporary memory
  of one neighbor's gradient (the oracle: that gradient compiled alone), where all four
  at once need more (XLA's own account of the compiled programs' buffers)."""
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(256, 4)).astype(np.float32), rng.integers(0, 3, 256)

  def temp_bytes(chunk):
    config = make_config("na_darts", num=4, kind="swap", evaluate="vmap", chunk=chunk)
    search = BilevelSearch(ToyArchModel(hidden=512), SPACE, config, steps_per_epoch=10)
    state = init_state(search, x)
    weights = jnp.stack([jax.nn.softmax(state.alpha, -1)] * 4)
    args = (state.params, state.batch_stats, weights, x, y)
    vmapped = jax.jit(search._vmapped_neighbor_grads_without_params).lower(*args)
    single = search._programs.value_and_weights_grad.lower(*args[:2], weights[0], x, y)
    return [p.compile().memory_analysis().temp_size_in_bytes for p in (vmapped, single)]

  all_at_once, one = temp_bytes(0)
  chunked, same_one = temp_bytes(1)
  assert one == same_one
  assert chunked <= 1.1 * one < all_at_once / 1.4


BFLOAT16 = ("config.search.dtype='bfloat16' (activations in bfloat16; parameters, alpha and "
            "BatchNorm statistics stay float32)")


def one_pass(k, at_once):
  return (f"config.search.neighbors.chunk=1 (the neighborhood's {k} gradients one after "
          f"another rather than {at_once} at a time: the same search)")


# On this CPU, 'auto' evaluates the neighbors one at a time unless a chunk says otherwise.
@pytest.mark.parametrize("algorithm,neighbors,dtype,expected", [
    ("darts", {}, "float32", [BFLOAT16]),
    ("darts", {}, "bfloat16", []),
    ("na_darts", dict(evaluate="vmap", chunk=0), "float32", [one_pass(4, 4), BFLOAT16]),
    ("na_darts", dict(evaluate="vmap", chunk=2), "bfloat16", [one_pass(4, 2)]),
    ("na_darts", dict(evaluate="vmap", chunk=8), "float32", [one_pass(4, 4), BFLOAT16]),
    ("na_darts", dict(evaluate="vmap", chunk=0, include_center=True), "float32",
     [one_pass(5, 5), BFLOAT16]),
    ("na_darts", dict(evaluate="vmap", chunk=1), "float32", [BFLOAT16]),
    ("na_darts", dict(evaluate="loop", chunk=0), "float32", [BFLOAT16]),
    ("na_darts", dict(evaluate="auto", chunk=0), "float32", [BFLOAT16]),
    ("na_darts", dict(evaluate="auto", chunk=3), "float32", [one_pass(4, 3), BFLOAT16]),
])
def test_memory_options_are_the_changes_that_shrink_this_step(algorithm, neighbors, dtype,
                                                              expected):
  """The out-of-memory error's options: one neighbor a pass only where several share one
  (what the test above measures saves memory), bfloat16 only where the step is float32."""
  config = make_config(algorithm, num=4, kind="swap", **neighbors)
  config.dtype = dtype
  search = BilevelSearch(ToyArchModel(), SPACE, config, steps_per_epoch=10)
  assert search.memory_options() == expected


def test_auto_vmaps_one_neighbor_a_pass_with_the_tpus_kernels(monkeypatch):
  """On an accelerator (`bilevel._on_cpu` patched False) ``'auto'`` vmaps the neighbors:
  all four in one pass with a GPU's kernels, one a pass with the TPU's (a ``lax.map`` of
  length 4 around a one-neighbor vmap in the traced program), unless a chunk is set;
  ``'vmap'`` takes chunk 0 as all at once; one neighbor a pass leaves the out-of-memory
  error no chunk to offer."""
  monkeypatch.setattr(bilevel, "_on_cpu", lambda: False)
  (tx, _), (vx, vy) = make_batches()

  def search_for(evaluate, dw_impl, chunk=0):
    config = make_config("na_darts", num=4, kind="swap", evaluate=evaluate, chunk=chunk)
    return BilevelSearch(ToyArchModel(dw_impl=dw_impl), SPACE, config, steps_per_epoch=10)

  def map_lengths(search):
    state = init_state(search, tx)
    weights = jnp.stack([jax.nn.softmax(state.alpha, -1)] * 4)
    jaxpr = jax.make_jaxpr(search._vmapped_neighbor_grads_without_params)(
        state.params, state.batch_stats, weights, vx, vy)
    return [e.params["length"] for e in all_eqns(jaxpr.jaxpr) if e.primitive.name == "scan"]

  tpu, gpu = search_for("auto", "conv_each"), search_for("auto", "conv")
  assert tpu.neighbors_vmapped(vx) and gpu.neighbors_vmapped(vx)
  assert (tpu.vmap_chunk(), gpu.vmap_chunk()) == (1, 0)
  assert map_lengths(tpu) == [4] and map_lengths(gpu) == []
  assert search_for("auto", "conv_each", chunk=2).vmap_chunk() == 2
  assert search_for("vmap", "conv_each").vmap_chunk() == 0
  assert tpu.memory_options() == [BFLOAT16]
  assert gpu.memory_options() == [one_pass(4, 4), BFLOAT16]


def test_a_supernet_without_a_depthwise_implementation_is_judged_by_the_platform(monkeypatch):
  """NAS-Bench-201's supernet has no depthwise implementation: the search makes its
  accelerator choices (no fused step, the gradients compiled side by side, one neighbor a
  pass for a TPU) by the platform it compiles for, as it does for a DARTS supernet with
  that platform's kernels (the oracle); DARTS's supernet is still judged by its kernels."""
  monkeypatch.setattr(bilevel, "_on_cpu", lambda: False)  # as on the accelerator itself
  nb201 = nb201_supernet.SearchNetworkNB201(10, channels=4, cells_per_stage=1)
  darts = {"cpu": "taps", "gpu": "conv", "tpu": "conv_each"}

  def choices(model, platform):
    searches = []
    for algorithm in ("darts", "na_darts"):
      config = make_config(algorithm, num=4, kind="swap")
      config.warmup_epochs = 0
      searches.append(BilevelSearch(model, spaces.get_space("nb201"), config, 10,
                                    platform=platform))
    darts_search, na_search = searches
    return darts_search.fused, na_search._ahead_enabled, na_search.vmap_chunk()

  for platform in ("cpu", "gpu", "tpu"):
    assert bilevel.supernet_kernels(nb201, platform) == (platform != "cpu", platform == "tpu")
    assert choices(nb201, platform) == choices(ToyArchModel(dw_impl=darts[platform]), "cpu")
  assert bilevel.supernet_kernels(ToyArchModel(dw_impl="conv_each"), "gpu") == (True, True)
  assert choices(nb201, "cpu") == (True, False, 0)
  assert choices(nb201, "tpu") == (False, True, 1)


def test_na_split_batch_gives_each_neighbor_its_slice():
  config = make_config("na_darts", num=2, kind="swap", batch="split", aggregation="mean")
  search = BilevelSearch(ToyArchModel(), SPACE, config, steps_per_epoch=10)
  (tx, _), (vx, vy) = make_batches()
  state = init_state(search, tx)
  key = jax.random.key(3)
  loss, (losses, _), _, _ = search.arch_value_and_grads(state.params, state.batch_stats,
                                                       state.alpha, vx, vy, key)
  weights = neighborhood.sample_perturbed_weights(SPACE, key, state.alpha, 2, "swap", 1)
  expected = [bilevel.cross_entropy(
      search.model.apply({"params": state.params}, vx[4 * k:4 * k + 4], weights[k],
                         train=True), vy[4 * k:4 * k + 4]) for k in range(2)]
  np.testing.assert_allclose(losses, expected, rtol=1e-6)
  np.testing.assert_allclose(loss, np.mean(expected), rtol=1e-6)


@pytest.mark.parametrize("aggregation", ["max", "softmax_tau"])
def test_split_batches_need_the_mean_aggregate(aggregation):
  """A worst-case aggregate over slices would partly pick the hardest slice."""
  config = make_config("na_darts", num=2, kind="swap", batch="split", aggregation=aggregation)
  with pytest.raises(ValueError, match=r"neighbors.batch = 'split' is invalid: expected "
                                       r"'full' with neighbors.aggregation"):
    BilevelSearch(ToyArchModel(), SPACE, config, steps_per_epoch=10)


@pytest.mark.parametrize("algorithm,order", [("darts", "first"), ("na_darts", "first"),
                                             ("na_darts", "second_fd"),
                                             ("darts", "second_exact")])
def test_shared_and_fused_compilation_make_the_same_step(algorithm, order):
  (tx, ty), (vx, vy) = make_batches()
  kwargs = dict(num=2, kind="swap") if algorithm == "na_darts" else {}
  states = []
  for mode in ("shared", "fused"):
    config = make_config(algorithm, order, **kwargs)
    # Architecture steps from the first (the quick start's config warms up).
    config.compile, config.warmup_epochs = mode, 0
    search = BilevelSearch(ToyArchModel(), SPACE, config, 10)
    state = init_state(search, tx)
    step = search.jit_step()
    for _ in range(2):
      state, _ = step(state, (tx, ty), (vx, vy))
    states.append(state)
  # The finite differences divide the two programs' rounding by 2r (r = 0.01 / |v|).
  assert_states_close(*states, atol=1e-6 if order == "second_fd" else 1e-7)


@pytest.mark.parametrize("algorithm,neighbors", [
    ("darts", {}), ("na_darts", dict(num=3, kind="swap")),
    ("na_darts", dict(num=2, kind="swap", include_center=True, aggregation="max"))])
def test_loop_compilation_makes_the_shared_step(algorithm, neighbors):
  """``compile='loop'`` (the neighbors' and the weight step's gradients as iterations of
  one loop, the kernels' gradients skipped in the neighbors') against the shared step (the
  oracle, tested against a Python loop above): the same states and metrics over two
  steps, with the step donated as the fused one is."""
  (tx, ty), (vx, vy) = make_batches()
  results = []
  for mode in ("shared", "loop"):
    config = make_config(algorithm, **neighbors)
    config.compile, config.warmup_epochs = mode, 0
    search = BilevelSearch(GatedToyArchModel(), SPACE, config, 10)
    assert search.looped == (mode == "loop") and search.fused == (mode == "loop")
    state = init_state(search, tx)
    step = search.jit_step()
    for _ in range(2):
      before = state
      state, metrics = step(state, (tx, ty), (vx, vy))
      assert all(leaf.is_deleted() for leaf in jax.tree.leaves(before.params)) == (
          mode == "loop")
    results.append((state, metrics))
  assert_states_close(results[0][0], results[1][0])
  assert results[0][1].keys() == results[1][1].keys()
  for name in results[0][1]:
    np.testing.assert_allclose(results[0][1][name], results[1][1][name], rtol=2e-5,
                               atol=1e-7, err_msg=name)
  assert float(results[1][1]["arch_loss"]) > 0


@pytest.mark.parametrize("algorithm", ["darts", "na_darts"])
def test_a_step_compiles_as_a_loop_only_when_asked(algorithm):
  """``compile='loop'`` is taken as asked; ``'auto'`` keeps its choices of before (fused
  DARTS, shared NA-DARTS), even on a supernet that could run the loop."""
  kwargs = dict(num=2, kind="swap") if algorithm == "na_darts" else {}
  modes = {}
  for mode in ("auto", "shared", "fused", "loop"):
    config = make_config(algorithm, **kwargs)
    config.compile, config.warmup_epochs = mode, 0
    search = BilevelSearch(GatedToyArchModel(), SPACE, config, 10)
    modes[mode] = (search.looped, search.fused)
  assert modes == {"auto": (False, algorithm == "darts"), "shared": (False, False),
                   "fused": (False, True), "loop": (True, True)}


@pytest.mark.parametrize("dw_impl", ["auto", "conv"])
def test_loop_compilation_with_an_accelerators_kernels_warns_of_its_cost(dw_impl, caplog):
  """``compile='loop'`` is taken as asked with the accelerators' kernels too, with a
  warning that names what it costs there and the fix; with the CPU's, no warning."""
  config = make_config("na_darts", num=2, kind="swap")
  config.compile = "loop"
  with caplog.at_level(logging.WARNING):
    search = BilevelSearch(GatedToyArchModel(dw_impl=dw_impl), SPACE, config, 10)
  assert search.looped
  warned = [r.getMessage() for r in caplog.records if "compile = 'loop'" in r.getMessage()]
  if dw_impl == "auto":
    assert not warned
  else:
    assert len(warned) == 1
    assert "accelerator's kernels" in warned[0] and "use 'auto'" in warned[0]


@pytest.mark.parametrize("change,message", [
    (dict(model=ToyArchModel), "needs a supernet that can skip its kernels' gradients"),
    (dict(order="second_fd"), "compile = 'loop' is invalid: expected 'auto', 'shared' or "
                              "'fused' with order = 'second_fd'"),
    (dict(batch="split"), "compile = 'loop' is invalid: expected 'auto', 'shared' or "
                          "'fused' with neighbors.batch = 'split'")])
def test_loop_compilation_refuses_what_it_cannot_run(change, message):
  config = make_config("na_darts", change.get("order", "first"), num=2, kind="swap",
                       batch=change.get("batch", "full"))
  config.compile = "loop"
  with pytest.raises(ValueError, match=message):
    BilevelSearch(change.get("model", GatedToyArchModel)(), SPACE, config, 10)


@pytest.mark.parametrize("dw_impl,algorithm,order,warmup,fused", [
    ("auto", "darts", "first", 0, True), ("auto", "darts", "first", 1, False),
    ("auto", "darts", "second_fd", 0, False), ("auto", "darts", "second_exact", 0, False),
    ("auto", "na_darts", "first", 0, False), ("conv", "darts", "first", 0, False),
    ("taps_fused", "darts", "first", 0, False)])
def test_auto_fuses_first_order_darts_on_the_cpus_kernels_without_warm_up(
    dw_impl, algorithm, order, warmup, fused):
  """``compile='auto'`` makes one donated program of the step only for first-order DARTS
  with no warm-up on the CPU's kernels; ``'shared'`` and ``'fused'`` are taken as asked."""
  (tx, ty), (vx, vy) = make_batches()
  kwargs = dict(num=2, kind="swap") if algorithm == "na_darts" else {}
  searches = {}
  for mode in ("auto", "shared", "fused"):
    config = make_config(algorithm, order, **kwargs)
    config.compile, config.warmup_epochs = mode, warmup
    searches[mode] = BilevelSearch(ToyArchModel(dw_impl=dw_impl), SPACE, config, 10)
  assert {mode: s.fused for mode, s in searches.items()} == {
      "auto": fused, "shared": False, "fused": True}
  # 'auto''s fused step updates the state in place: its input is gone after the step.
  if fused:
    state = init_state(searches["auto"], tx)
    new, _ = searches["auto"].jit_step()(state, (tx, ty), (vx, vy))
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(state.params))
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(new.params))


def test_auto_maps_the_neighbors_in_one_program_from_cifar_sized_batches_on_a_cpu():
  """``neighbors.evaluate='auto'`` on the CPU's kernels calls the shared gradient once per
  neighbor below `F.CIFAR_MIN_PIXELS` and maps the neighbors one at a time in one program
  from there, with the step the loop makes (the oracle); ``'loop'``, ``'vmap'`` and a
  chunk are taken as asked, and the accelerators' kernels on a CPU host keep the loop."""
  rng = np.random.default_rng(0)
  shape = (8, 32, 32, 1)  # 8 x 32 x 32 = CIFAR_MIN_PIXELS
  assert np.prod(shape[:3]) == F.CIFAR_MIN_PIXELS
  (tx, ty), (vx, vy) = [(rng.normal(size=shape).astype(np.float32),
                         rng.integers(0, 3, shape[0])) for _ in range(2)]
  small = np.zeros((8, 16, 16, 1), np.float32)

  def search_for(evaluate, chunk=0, dw_impl="auto"):
    config = make_config("na_darts", "first", num=2, kind="swap", evaluate=evaluate,
                         chunk=chunk)
    config.warmup_epochs = 0
    return BilevelSearch(ToyArchModel(dw_impl=dw_impl), SPACE, config, 10)

  auto = search_for("auto")
  assert [auto.neighbors_vmapped(x) for x in (vx, small, vx[:, :, :, 0])] == [
      True, False, False]
  assert auto.vmap_chunk() == 1 and search_for("auto", 2).vmap_chunk() == 2
  assert not search_for("loop").neighbors_vmapped(vx)
  assert search_for("vmap").neighbors_vmapped(small)
  assert search_for("vmap").vmap_chunk() == 0
  assert not search_for("auto", dw_impl="conv").neighbors_vmapped(vx)
  states = []
  for search in (auto, search_for("loop")):
    state = init_state(search, tx)
    programs = [e.params["name"] for e in jax.make_jaxpr(search.step)(
        state, (tx, ty), (vx, vy)).eqns if e.primitive.name in ("jit", "pjit")]
    assert ("_vmapped_neighbor_grads_without_params" in programs) == (search is auto)
    for _ in range(2):
      state, _ = search.jit_step()(state, (tx, ty), (vx, vy))
    states.append(state)
  assert_states_close(*states)


def test_auto_calls_nas_bench_201s_gradient_once_a_neighbor_on_a_cpu():
  """NAS-Bench-201's supernet (dense convolutions, no depthwise implementation) keeps
  ``'auto'``'s loop at every batch size on a CPU, where a DARTS supernet's neighbors
  are mapped in one program from CIFAR-sized batches; ``'vmap'`` is still taken."""
  cifar = np.zeros((8, 32, 32, 3), np.float32)

  def search_for(evaluate, model):
    config = make_config("na_darts", "first", num=2, kind="swap", evaluate=evaluate)
    return BilevelSearch(model, spaces.get_space("nb201"), config, 10, platform="cpu")

  nb201 = nb201_supernet.SearchNetworkNB201(3, channels=4, cells_per_stage=1)
  assert not search_for("auto", nb201).neighbors_vmapped(cifar)
  assert search_for("vmap", nb201).neighbors_vmapped(cifar)
  # The toy DARTS-like model (a depthwise implementation) maps its neighbors there.
  assert search_for("auto", ToyArchModel()).neighbors_vmapped(cifar[..., :1])


# How many times a step traces the model's loss, shared or fused (one program around the
# same jitted gradients): once where the architecture side's gradients have the weight
# step's shapes (their parameter-gradient-free version is evaluated from the weight step's
# trace, vmapped neighbors included), once per gradient where the neighbors' split batches
# give them shapes of their own; a later search on an equal supernet, never.
@pytest.mark.parametrize("algorithm,order,batch,evaluate,traces,mode", [
    ("darts", "first", "full", "loop", 1, "shared"),
    ("darts", "first", "full", "loop", 1, "fused"),
    ("darts", "second_fd", "full", "loop", 1, "shared"),
    ("na_darts", "first", "full", "loop", 1, "shared"),
    ("na_darts", "first", "split", "loop", 2, "shared"),
    ("na_darts", "first", "split", "loop", 2, "fused"),
    ("na_darts", "second_fd", "split", "loop", 2, "shared"),
    ("na_darts", "first", "full", "vmap", 1, "shared"),
    ("na_darts", "second_fd", "full", "vmap", 1, "shared"),
    ("na_darts", "second_fd", "full", "vmap", 1, "fused"),
    ("na_darts", "first", "split", "vmap", 2, "shared")])
def test_the_architecture_side_reuses_the_weight_step_trace(monkeypatch, algorithm, order,
                                                           batch, evaluate, traces, mode):
  (tx, ty), (vx, vy) = make_batches()
  kwargs = dict(num=2, kind="swap", batch=batch, evaluate=evaluate)
  config = make_config(algorithm, order, **kwargs if algorithm == "na_darts" else {})
  config.warmup_epochs = 0  # architecture steps from the first
  config.compile = mode
  bilevel._supernet_programs.cache_clear()  # no trace left by an earlier test
  train_loss, calls = bilevel.supernet_train_loss, []
  monkeypatch.setattr(bilevel, "supernet_train_loss",
                      lambda *a: calls.append(a[5].shape) or train_loss(*a))
  search = BilevelSearch(ToyArchModel(), SPACE, config, 10)
  state = init_state(search, tx)
  start = jax.tree.map(jnp.copy, state)  # a fused step consumes (donates) its input
  step = search.jit_step()
  for _ in range(2):
    state, _ = step(state, (tx, ty), (vx, vy))
  assert len(calls) == traces, calls
  # A second search on an equal supernet (a new module) traces no gradient again, and
  # computes the same bits.
  again = start
  for _ in range(2):
    again, _ = BilevelSearch(ToyArchModel(), SPACE, config, 10).jit_step()(
        again, (tx, ty), (vx, vy))
  assert len(calls) == traces, calls
  chex.assert_trees_all_equal(again, state)
  # What the architecture side gets equals the parameter-gradient-free gradient traced on
  # its own, at the weight step's shapes and at the split batches' (traced directly).
  weights = jax.nn.softmax(state.alpha, -1)
  for x, y in ((vx, vy), (vx[:4], vy[:4])):
    args = (state.params, state.batch_stats, weights, x, y)
    chex.assert_trees_all_close(search.weights_grad(*args),
                                search._programs.value_and_weights_grad(*args),
                                rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dw_impl,algorithm,order,evaluate,params_only", [
    ("auto", "darts", "first", "loop", False), ("conv", "darts", "first", "loop", True),
    ("conv", "darts", "second_fd", "loop", False), ("conv", "darts", "second_exact", "loop", True),
    ("conv", "na_darts", "first", "vmap", True), ("conv", "na_darts", "second_fd", "vmap", True),
    ("conv", "na_darts", "second_fd", "loop", False),
    ("taps_fused", "darts", "first", "loop", True)])
def test_on_accelerators_the_weight_step_leaves_the_architecture_gradient_out(
    dw_impl, algorithm, order, evaluate, params_only):
  """With the accelerators' kernels the weight step's program returns no architecture
  gradient, unless the step compiles the full gradient at its shapes anyway; the shared
  step still equals the fused one (one program, where XLA drops what is unused), and the
  gradient equals the full one's."""
  (tx, ty), (vx, vy) = make_batches()
  kwargs = dict(num=2, kind="swap", evaluate=evaluate) if algorithm == "na_darts" else {}
  states, programs = [], None
  for mode in ("shared", "fused"):
    config = make_config(algorithm, order, **kwargs)
    config.compile, config.warmup_epochs = mode, 0
    search = BilevelSearch(ToyArchModel(dw_impl=dw_impl), SPACE, config, 10)
    state = init_state(search, tx)
    if mode == "shared":
      programs = [e.params["name"] for e in jax.make_jaxpr(search.step)(
          state, (tx, ty), (vx, vy)).eqns if e.primitive.name in ("jit", "pjit")]
      args = (state.params, state.batch_stats, jax.nn.softmax(state.alpha, -1), tx, ty)
      chex.assert_trees_all_close(search.weight_step_grads(*args), search.grads(*args)[:4],
                                  rtol=1e-6, atol=1e-7)
    step = search.jit_step()
    for _ in range(2):
      state, _ = step(state, (tx, ty), (vx, vy))
    states.append(state)
  assert ("supernet_value_and_params_grad" in programs) == params_only, programs
  # The finite difference divides two gradients' rounding by its small step.
  atol = 2e-6 if order == "second_fd" else 1e-7
  assert_states_close(*states, atol=atol)


def record_compiles(fn):
  """``fn()``'s XLA compiles, as ``(program, thread name)`` in the order they ended."""
  compiles = []

  def listener(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append((kwargs["fun_name"], threading.current_thread().name))

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    fn()
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  return compiles


# The small programs a step's first call compiles ahead, and how often the test's batches
# (two shapes) compile them: the metrics take logits of the batch's shape. (The key split
# too, but its program is the process's: an earlier test may have compiled it.)
AHEAD_SMALL_PROGRAMS = {"jit(_architecture_weights)": 1, "jit(_chain_to_alpha)": 1,
                        "jit(_apply_arch_update)": 1, "jit(_apply_weight_update)": 1,
                        "jit(_metrics)": 2}


@pytest.mark.parametrize("algorithm,order,evaluate,ahead", [
    ("darts", "first", "loop", "supernet_value_and_params_grad"),
    ("darts", "second_fd", "loop", "supernet_value_and_weights_grad"),
    ("na_darts", "first", "vmap", "supernet_value_and_params_grad")])
def test_with_accelerator_kernels_the_first_step_compiles_a_program_on_a_side_thread(
    algorithm, order, evaluate, ahead, monkeypatch):
  """The step's first call on new inputs compiles the supernet program it needs last and
  the small programs around the supernet programs on side threads, which the step then
  finds compiled: every program is compiled as often as without the side threads, and the
  steps compute the same bits. On the CPU's kernels nothing is compiled ahead."""
  compile_lowered = jax.stages.Lowered.compile

  def late_on_a_side_thread(lowered, *args, **kwargs):
    # The side thread starts late: the step must wait for it rather than compile the
    # program itself (the toy's programs compile in milliseconds).
    if threading.current_thread() is not threading.main_thread():
      time.sleep(0.5)
    return compile_lowered(lowered, *args, **kwargs)

  monkeypatch.setattr(jax.stages.Lowered, "compile", late_on_a_side_thread)
  (tx, ty), (vx, vy) = make_batches()
  kwargs = dict(num=2, kind="swap", evaluate=evaluate) if algorithm == "na_darts" else {}
  config = make_config(algorithm, order, **kwargs)
  config.warmup_epochs = 0
  runs, counts = {}, {}
  for mode in ("ahead", "inline", "cpu"):
    # New supernet programs for each run. (Not `jax.clear_caches()`: it would make every
    # later test of this process trace and load its programs again.)
    bilevel._supernet_programs.cache_clear()
    search = BilevelSearch(ToyArchModel(dw_impl="auto" if mode == "cpu" else "conv"), SPACE,
                           config, 10)
    assert search._ahead_enabled == (mode != "cpu")
    search._ahead_enabled = mode == "ahead"
    state = init_state(search, tx)
    step = search.jit_step()
    batches = [((tx, ty), (vx, vy))] * 2 + [((tx[:4], ty[:4]), (vx[:4], vy[:4]))]

    def run(state=state):
      for train, val in batches:
        state, _ = step(state, train, val)
      runs[mode] = jax.block_until_ready(state)

    compiles = record_compiles(run)
    counts[mode] = collections.Counter(  # Programs of this search, traced anew.
        name for name, _ in compiles
        if name.startswith("jit(supernet_") or name in AHEAD_SMALL_PROGRAMS)
    # For each new batch shape the supernet program and the metrics (whose logits have
    # the batch's shape) compile ahead; the weight update once; none on the CPU's kernels.
    side = collections.Counter(name for name, thread in compiles
                               if thread != "MainThread" and name != "jit(_split_key)")
    assert side == ({f"jit({ahead})": 2, **AHEAD_SMALL_PROGRAMS} if mode == "ahead" else {}), (
        compiles)
  assert counts["ahead"] == counts["inline"] and counts["ahead"][f"jit({ahead})"] == 2
  chex.assert_trees_all_equal(jax.random.key_data(runs["ahead"].rng),
                              jax.random.key_data(runs["inline"].rng))
  chex.assert_trees_all_equal(runs["ahead"].replace(rng=None), runs["inline"].replace(rng=None))


def test_a_gradient_of_fewer_outputs_binds_the_full_trace_and_lowers_without_the_rest():
  """The programs that return part of the full gradient's outputs bind its cached trace as
  one equation, and JAX's lowering keeps only what their outputs need: the architecture
  side's has as many matmuls as the parameter-gradient-free gradient traced on its own,
  the weight step's fewer than the full gradient."""
  search = BilevelSearch(ToyArchModel(), SPACE, make_config(), 10)
  programs = search._programs
  (tx, ty), _ = make_batches()
  state = init_state(search, tx)
  args = (state.params, state.batch_stats, jax.nn.softmax(state.alpha, -1), tx, ty)
  for program in (programs.weights_grad_from_full, programs.params_grad_from_full):
    (outer,) = jax.make_jaxpr(program)(*args).eqns
    assert [(e.primitive.name, e.params["name"]) for e in outer.params["jaxpr"].eqns] == [
        ("jit", "supernet_value_and_grads")]

  def matmuls(program):
    return program.lower(*args).as_text().count("stablehlo.dot_general")

  full = matmuls(programs.value_and_grads)
  assert matmuls(programs.weights_grad_from_full) == matmuls(
      programs.value_and_weights_grad) < full
  assert matmuls(programs.params_grad_from_full) < full


def test_an_unhashable_supernet_is_named_before_the_search():
  with pytest.raises(TypeError, match=r"(?s)ToyArchModel must be hashable.*tuples, not lists"):
    BilevelSearch(ToyArchModel(hidden=[5]), SPACE, make_config(), 10)


def _matmul_operand_dtypes(jaxpr) -> set[str]:
  """The operand dtypes of every convolution and matmul in ``jaxpr`` and its sub-jaxprs
  (scans, custom gradients, nested jits)."""
  return {str(v.aval.dtype) for eqn in all_eqns(jaxpr)
          if eqn.primitive.name in ("conv_general_dilated", "dot_general") for v in eqn.invars}


def test_bfloat16_compute_follows_the_float32_supernet_gradient():
  """``config.dtype = 'bfloat16'`` on the DARTS supernet: every convolution and matmul of
  the gradient runs in bfloat16 (float32 ones in float32 mode: the check sees them), while
  the loss, both gradients and the BatchNorm statistics come back float32 and within
  bfloat16 rounding of the float32 computation (the oracle)."""
  model = SearchNetwork(num_classes=10, channels=4, layers=1)
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(8, 8, 8, 1)).astype(np.float32))
  y = jnp.asarray(rng.integers(0, 10, 8))
  results = {}
  for dtype in ("float32", "bfloat16"):
    config = make_config()
    config.dtype = dtype
    search = BilevelSearch(model, SPACE, config, 10)
    state = search.init(jax.random.key(0), x)
    args = (state.params, state.batch_stats, jax.nn.softmax(state.alpha, -1), x, y)
    jaxpr = jax.make_jaxpr(search.value_and_grads)(*args).jaxpr
    assert _matmul_operand_dtypes(jaxpr) == {np.dtype(dtype).name}
    results[dtype] = search.grads(*args)
  (loss32, _, stats32, gp32, gw32), (loss16, _, stats16, gp16, gw16) = results.values()
  assert {a.dtype.name for a in jax.tree.leaves((loss16, stats16, gp16, gw16))} == {"float32"}
  np.testing.assert_allclose(loss16, loss32, rtol=2e-2)
  for a, b in ((gp16, gp32), (gw16, gw32)):
    a, b = (np.concatenate([np.ravel(v) for v in jax.tree.leaves(t)]) for t in (a, b))
    cosine = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    assert cosine > 0.98 and abs(np.linalg.norm(a) / np.linalg.norm(b) - 1) < 0.05
  for a, b in zip(jax.tree.leaves(stats16), jax.tree.leaves(stats32)):
    np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("network", ["darts", "nb201"])
def test_bfloat16_supernet_gradient_sums_nothing_over_the_batch_in_bfloat16(network):
  """The whole supernet's gradient (parameters and architecture weights) in bfloat16, as
  `bilevel.apply_supernet` runs it: every reduction whose operands are bfloat16 sums
  fewer terms than the batch has images (those left add a node's few edges or an input's
  few readers); the sums over the batch (BatchNorm's, the MixedOps' weights', the
  classifier bias's) are float32. Before, the classifier's bias gradient was a bfloat16
  sum over the batch."""
  batch = 16
  model = {"darts": SearchNetwork(num_classes=10, channels=4, layers=3),
           "nb201": nb201_supernet.SearchNetworkNB201(10, channels=4, cells_per_stage=1)}[
               network]
  space = spaces.get_space(network)
  images = jnp.zeros((batch, 8, 8, 3))
  weights = jnp.full(space.alpha_shape, 1 / len(space.ops))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), images, weights,
                                                train=True))

  def loss(params, weights, batch_stats):
    logits, _ = bilevel.apply_supernet(model, jnp.bfloat16, params, batch_stats, images,
                                       weights, True)
    assert logits.dtype == jnp.float32
    return jnp.sum(logits)

  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(
      variables["params"], weights, variables["batch_stats"])
  terms = collections.defaultdict(int)  # the most terms one reduction sums, per dtype
  for eqn in all_eqns(jaxpr.jaxpr):
    if eqn.primitive.name == "reduce_sum":
      aval = eqn.invars[0].aval
      count = math.prod(aval.shape[axis] for axis in eqn.params["axes"])
      terms[aval.dtype.name] = max(terms[aval.dtype.name], count)
  assert terms["float32"] >= batch * 8 * 8 and terms["bfloat16"] < batch


def test_bfloat16_step_keeps_the_state_float32():
  (tx, ty), (vx, vy) = make_batches()
  config = make_config("na_darts", "second_fd", num=2, kind="swap")
  config.dtype = "bfloat16"
  config.warmup_epochs = 0
  search = BilevelSearch(ToyArchModel(), SPACE, config, 10)
  state = init_state(search, tx)
  new, metrics = search.jit_step()(state, (tx, ty), (vx, vy))
  for before, after in zip(jax.tree.leaves(state), jax.tree.leaves(new)):
    assert after.dtype == before.dtype
  assert not np.array_equal(new.alpha, state.alpha)
  assert np.isfinite(metrics["arch_loss"])


@pytest.mark.parametrize("order", ["first", "second_fd"])
def test_na_darts_with_one_identity_neighbor_is_the_darts_step(order):
  (tx, ty), (vx, vy) = make_batches()
  darts = BilevelSearch(ToyArchModel(), SPACE, make_config("darts", order), 10)
  na = BilevelSearch(ToyArchModel(), SPACE,
                     make_config("na_darts", order, num=1, kind="identity"), 10)
  state = init_state(darts, tx)
  a, ma = darts.step(state, (tx, ty), (vx, vy))
  b, mb = na.step(state, (tx, ty), (vx, vy))
  # Equal up to float32 rounding: vmap over one neighbor reorders some reductions.
  for x, y in zip(jax.tree.leaves((a.params, a.alpha)), jax.tree.leaves((b.params, b.alpha))):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(ma["arch_loss"], mb["arch_loss"], rtol=1e-7)


def float64_norm(tree) -> float:
  """The global norm of ``tree``'s leaves, summed in float64 by numpy."""
  return math.sqrt(sum(float((np.asarray(x, np.float64) ** 2).sum())
                       for x in jax.tree.leaves(tree)))


def test_first_order_step_matches_a_hand_written_step():
  (tx, ty), (vx, vy) = make_batches()
  config = make_config("darts", "first")
  search = BilevelSearch(ToyArchModel(), SPACE, config, 10)
  state = init_state(search, tx)
  new, metrics = search.step(state, (tx, ty), (vx, vy))

  def loss(params, alpha, x, y):
    logits = search.model.apply({"params": params}, x, jax.nn.softmax(alpha, -1), train=True)
    return bilevel.cross_entropy(logits, y)

  a = config.arch
  g = jax.grad(loss, argnums=1)(state.params, state.alpha, vx, vy) + a.weight_decay * state.alpha
  # Adam's first step moves every coordinate by lr * g / (|g| + eps) (bias-corrected).
  m, v = (1 - a.b1) * g / (1 - a.b1), (1 - a.b2) * g**2 / (1 - a.b2)
  alpha = state.alpha - a.lr * m / (jnp.sqrt(v) + 1e-8)
  # Adam moves every coordinate by about lr: float32 rounding scales with it.
  np.testing.assert_allclose(new.alpha, alpha, rtol=1e-5, atol=1e-5 * a.lr)

  w = config.weights
  grads = jax.grad(loss)(state.params, alpha, tx, ty)
  norm = optax.tree.norm(grads)
  # The metric is the norm before clipping (what PyTorch's clip_grad_norm_ returns).
  np.testing.assert_allclose(metrics["weight_grad_norm"], float64_norm(grads), rtol=1e-6)
  scale = jnp.minimum(1.0, w.grad_clip / norm)
  expected = jax.tree.map(lambda p, g: p - w.lr * (scale * g + w.weight_decay * p),
                          state.params, grads)
  for x, y in zip(jax.tree.leaves(new.params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("algorithm", ["darts", "na_darts"])
def test_second_order_exact_and_finite_difference_agree_in_float64(algorithm):
  with jax.enable_x64(True):
    (tx, ty), (vx, vy) = make_batches(dtype=np.float64)
    kwargs = dict(num=3, kind="swap") if algorithm == "na_darts" else {}
    exact = BilevelSearch(ToyArchModel(), SPACE, make_config(algorithm, "second_exact", **kwargs), 10)
    fd = BilevelSearch(ToyArchModel(), SPACE, make_config(algorithm, "second_fd", **kwargs), 10)
    first = BilevelSearch(ToyArchModel(), SPACE, make_config(algorithm, "first", **kwargs), 10)
    state = init_state(exact, tx)
    state = state.replace(params=jax.tree.map(lambda p: p.astype(jnp.float64), state.params),
                          alpha=state.alpha.astype(jnp.float64))
    # A first real step fills the momentum buffer that the virtual step uses.
    state, _ = first.step(state, (tx, ty), (vx, vy))
    key = jax.random.key(5)
    g_exact = exact.arch_gradient(state, (tx, ty), (vx, vy), key)[0]
    g_fd = fd.arch_gradient(state, (tx, ty), (vx, vy), key)[0]
    g_first = first.arch_gradient(state, (tx, ty), (vx, vy), key)[0]
    assert g_exact.dtype == jnp.float64
    second_order_term = g_exact - g_first
    assert float(jnp.linalg.norm(second_order_term)) > 1e-3 * float(jnp.linalg.norm(g_exact))
    np.testing.assert_allclose(g_fd, g_exact, rtol=1e-4,
                               atol=1e-4 * float(jnp.abs(g_exact).max()))


@pytest.mark.parametrize("real_steps", [0, 3])
def test_second_order_exact_equals_numerical_derivative_of_unrolled_loss(real_steps):
  """DARTS's unrolled loss written out by hand. After real steps the virtual step must use
  the momentum buffer and the current learning rate; the buffer is read off the parameter
  trajectory (PyTorch SGD: ``w_{t+1} = w_t - lr_t * m_{t+1}``), not from the optimizer."""
  with jax.enable_x64(True):
    (tx, ty), (vx, vy) = make_batches(dtype=np.float64)
    # One step per epoch: the per-epoch cosine learning rate changes every step.
    search = BilevelSearch(ToyArchModel(), SPACE, make_config("darts", "second_exact"), 1)
    state = init_state(search, tx)
    state = state.replace(params=jax.tree.map(lambda p: p.astype(jnp.float64), state.params),
                          alpha=state.alpha.astype(jnp.float64))
    first = BilevelSearch(ToyArchModel(), SPACE, make_config("darts", "first"), 1)
    momentum = jax.tree.map(jnp.zeros_like, state.params)
    for _ in range(real_steps):
      previous, lr = state.params, search.lr_schedule(state.step)
      state, _ = first.step(state, (tx, ty), (vx, vy))
      momentum = jax.tree.map(lambda a, b, lr=lr: (a - b) / lr, previous, state.params)
    if real_steps:
      assert float(optax.tree.norm(momentum)) > 1e-2
    grad = search.arch_gradient(state, (tx, ty), (vx, vy), jax.random.key(0))[0]
    xi = search.lr_schedule(state.step)
    assert xi < search.config.weights.lr or not real_steps
    mu, wd = search.config.weights.momentum, search.config.weights.weight_decay

    def unrolled_val_loss(alpha):
      def train(p):
        return search.train_loss(p, {}, jax.nn.softmax(alpha, -1), tx, ty)[0]
      g = jax.grad(train)(state.params)
      params = jax.tree.map(lambda w, gw, m: w - xi * (mu * m + gw + wd * w), state.params,
                            g, momentum)
      return search.train_loss(params, {}, jax.nn.softmax(alpha, -1), vx, vy)[0]

    h = 1e-6
    for idx in [(0, 0, 1), (1, 5, 4), (0, 13, 7)]:
      e = jnp.zeros_like(state.alpha).at[idx].set(h)
      numeric = (unrolled_val_loss(state.alpha + e) - unrolled_val_loss(state.alpha - e)) / (2 * h)
      np.testing.assert_allclose(grad[idx], numeric, rtol=1e-5, atol=1e-10)


def test_warmup_epochs_train_the_weights_only():
  """PC-DARTS / P-DARTS warm-up: the first ``warmup_epochs`` epochs take DARTS's weight
  step alone (clipped SGD at softmax(alpha)); alpha and its optimizer start afterwards."""
  (tx, ty), (vx, vy) = make_batches()
  config = make_config("darts", "first")
  config.warmup_epochs = 1
  search = BilevelSearch(ToyArchModel(), SPACE, config, steps_per_epoch=2)
  step = search.jit_step()
  state = init_state(search, tx)
  w = config.weights

  def loss(params, x, y):
    logits = search.model.apply({"params": params}, x, jax.nn.softmax(state.alpha, -1),
                                train=True)
    return bilevel.cross_entropy(logits, y)

  grads = jax.grad(loss)(state.params, tx, ty)
  scale = jnp.minimum(1.0, w.grad_clip / optax.tree.norm(grads))
  expected = jax.tree.map(lambda p, g: p - w.lr * (scale * g + w.weight_decay * p),
                          state.params, grads)
  first, metrics = step(state, (tx, ty), (vx, vy))
  for x, y in zip(jax.tree.leaves(first.params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
  assert "arch_loss" not in metrics and metrics["train_loss"] == pytest.approx(
      float(loss(state.params, tx, ty)), rel=1e-6)
  np.testing.assert_allclose(metrics["weight_grad_norm"], float64_norm(grads), rtol=1e-6)
  second, _ = step(first, (tx, ty), (vx, vy))
  for s in (first, second):
    np.testing.assert_array_equal(s.alpha, state.alpha)
    chex_equal = jax.tree.map(np.testing.assert_array_equal, s.arch_opt_state,
                              state.arch_opt_state)
    del chex_equal
  third, metrics = step(second, (tx, ty), (vx, vy))
  assert int(third.step) == 3 and "arch_loss" in metrics
  assert float(jnp.abs(third.alpha - state.alpha).max()) > 0


def test_alpha_entropy_against_numpy():
  alpha = np.random.default_rng(0).normal(0, 2, SPACE.alpha_shape)
  p = np.exp(alpha) / np.exp(alpha).sum(-1, keepdims=True)
  np.testing.assert_allclose(bilevel.alpha_entropy(jnp.asarray(alpha, jnp.float32)),
                             -(p * np.log(p)).sum(-1).mean(), rtol=1e-5)
  np.testing.assert_allclose(bilevel.alpha_entropy(jnp.zeros(SPACE.alpha_shape)), np.log(8),
                             rtol=1e-6)


class OracleOpModel(nn.Module):
  """Every edge offers 8 fixed linear features of the input; op 4's (on every edge) is the
  one the labels are made from. The readout (the only trained weight) cannot undo the
  others' interference in its 3 dimensions, only the architecture weights can, so the
  architecture gradient keeps a signal."""

  @nn.compact
  def __call__(self, x, weights, train):
    bank = jax.random.normal(jax.random.key(42), (8, x.shape[-1], 3))
    bank = bank.at[4].set(ORACLE)
    feats = jnp.einsum("bd,odc->boc", x, bank)
    # Later edges count more, so that the edges a node keeps are decided too.
    edges = jnp.linspace(0.5, 1.5, weights.shape[1])
    mixed = jnp.einsum("teo,e,boc->bc", weights, edges, feats) / weights.shape[1]
    return nn.Dense(3)(mixed)


ORACLE = jnp.asarray(np.random.default_rng(3).normal(size=(16, 3)), jnp.float32)


def _committing_run(lr, warmup_epochs, epochs=8, steps=10):
  config = make_config("darts", "first")
  config.epochs, config.warmup_epochs, config.arch.lr = epochs, warmup_epochs, lr
  search = BilevelSearch(OracleOpModel(), SPACE, config, steps_per_epoch=steps)
  step = search.jit_step()
  rng = np.random.default_rng(0)
  state = search.init(jax.random.key(0), jnp.zeros((1, 16)))
  entropies, genotypes = [], []
  for _ in range(epochs):
    for _ in range(steps):
      x = rng.normal(size=(2, 32, 16)).astype(np.float32)
      y = np.argmax(x @ np.asarray(ORACLE), -1)
      state, _ = step(state, (x[0], y[0]), (x[1], y[1]))
    entropies.append(float(bilevel.alpha_entropy(state.alpha)))
    genotypes.append(str(SPACE.derive(np.asarray(jax.nn.softmax(state.alpha, -1)))))
  return entropies, genotypes


def test_the_schedule_commits_alpha_and_the_genotype_stays():
  """On a problem with one right operation, DARTS's quick-start schedule (warm-up, then a
  raised architecture learning rate) makes the entropy fall below 85 % of uniform and the
  derived genotype stop changing; DARTS's paper lr over the same few steps leaves alpha
  near uniform."""
  entropies, genotypes = _committing_run(lr=0.05, warmup_epochs=2)
  assert entropies[1] == pytest.approx(np.log(8), abs=1e-3)  # warm-up: alpha untouched
  assert entropies[-1] < 0.85 * np.log(8)
  assert np.all(np.diff(entropies[2:]) < 0)
  assert len(set(genotypes[-3:])) == 1 and "sep_conv_3x3" in genotypes[-1]
  paper, _ = _committing_run(lr=3e-4, warmup_epochs=0)
  assert paper[-1] > 0.99 * np.log(8)


def test_learning_rate_schedule_is_cosine_per_epoch():
  config = make_config()
  config.epochs = 4
  search = BilevelSearch(ToyArchModel(), SPACE, config, steps_per_epoch=3)
  w = config.weights
  for step in range(12):
    epoch = step // 3
    expected = w.lr_min + (w.lr - w.lr_min) * (1 + np.cos(np.pi * epoch / 4)) / 2
    np.testing.assert_allclose(search.lr_schedule(step), expected, rtol=1e-6)


@pytest.mark.parametrize("field,value,message", [
    ("algorithm", "enas", "config.search.algorithm"),
    ("order", "third", "config.search.order"),
    ("neighbors.num", -1, "config.search.neighbors.num"),
    ("neighbors.kind", "flip", "config.search.neighbors.kind"),
    ("neighbors.aggregation", "median", "config.search.neighbors.aggregation"),
    ("neighbors.batch", "half", "config.search.neighbors.batch"),
    ("neighbors.chunk", -1, "config.search.neighbors.chunk"),
    ("weights.lr", 0.0, "config.search.weights.lr"),
    ("warmup_epochs", 99, "config.search.warmup_epochs"),
    ("recalibrate_batches", -1, "config.search.recalibrate_batches"),
    ("epochs", 0, "config.search.epochs"),
    ("dtype", "float16", "config.search.dtype"),
])
def test_bad_config_values_name_the_field(field, value, message):
  config = make_config("na_darts")
  node = config
  *path, leaf = field.split(".")
  for part in path:
    node = node[part]
  node[leaf] = value
  with pytest.raises(ValueError, match=message.replace(".", r"\.")):
    bilevel.validate_search_config(config)


def test_init_builds_the_optimizer_states_optax_builds_eagerly():
  """`BilevelSearch.init` builds both optimizer states in one compiled program: they
  equal optax's eager ``init`` of the same parameters and alpha, leaf for leaf (values,
  dtypes, tree)."""
  search = BilevelSearch(ToyArchModel(), SPACE, make_config(), steps_per_epoch=10)
  (tx, _), _ = make_batches()
  state = search.init(jax.random.key(0), jnp.asarray(tx))
  for got, want in ((state.weight_opt_state, search.weight_tx.init(state.params)),
                    (state.arch_opt_state, search.arch_tx.init(state.alpha))):
    chex.assert_trees_all_equal(got, want)
    chex.assert_trees_all_equal_dtypes(got, want)
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(got))


def test_a_cpu_search_keeps_optimisation_barriers_as_fusion_boundaries():
  """XLA:CPU drops a barrier before fusing, and keeps it under `CPU_KEEP_BARRIERS`: the
  compiled program then holds it, and computes the same."""
  def f(x):
    y = lax.optimization_barrier(jnp.exp(x) * 2.0)
    return jnp.sin(y) + y

  x = jnp.linspace(-1.0, 1.0, 64)
  options = dict(bilevel.CPU_KEEP_BARRIERS)
  kept = jax.jit(f, compiler_options=options).lower(x).compile()
  dropped = jax.jit(f).lower(x).compile()
  assert "opt-barrier" in kept.as_text() and "opt-barrier" not in dropped.as_text()
  np.testing.assert_allclose(kept(x), dropped(x), rtol=1e-6)


def test_gpu_autotune_takes_a_bool_only():
  config = make_config()
  del config["gpu_autotune"]
  config.gpu_autotune = "off"
  with pytest.raises(ValueError, match=r"config\.search\.gpu_autotune = 'off' is invalid"):
    bilevel.validate_search_config(config)


@pytest.mark.parametrize("platform,autotune,expected", [
    ("gpu", False, bilevel.GPU_WITHOUT_AUTOTUNING), ("gpu", True, ()),
    ("cpu", False, bilevel.CPU_KEEP_BARRIERS), ("cpu", True, bilevel.CPU_KEEP_BARRIERS),
    ("tpu", False, ())])
def test_xla_options_by_platform(platform, autotune, expected):
  config = make_config()
  config.gpu_autotune = autotune
  assert bilevel.xla_compiler_options(config, platform) == expected
  assert BilevelSearch(ToyArchModel(), SPACE, config, 10,
                       platform=platform).compiler_options == expected


def assert_dumped_with_options(dump, compiled: collections.Counter) -> None:
  """XLA dumped into ``dump`` the programs ``compiled`` counts (names without ``jit(``),
  each with `bilevel.GPU_WITHOUT_AUTOTUNING` among its debug options."""
  dumped = [(f.name.split(".")[1].removeprefix("jit_"), f.read_text())
            for f in dump.glob("*.debug_options")]
  assert collections.Counter(name for name, _ in dumped) == compiled
  for name, text in dumped:
    for option, value in bilevel.GPU_WITHOUT_AUTOTUNING[:3]:
      assert f"{option}: {str(value).lower()}" in text, (name, option)


def dumping_options(monkeypatch, dump) -> None:
  """`bilevel.GPU_WITHOUT_AUTOTUNING` with ``xla_dump_to``: XLA writes every program
  compiled with them, and the debug options it compiled with, into ``dump``."""
  monkeypatch.setattr(bilevel, "GPU_WITHOUT_AUTOTUNING",
                      (*bilevel.GPU_WITHOUT_AUTOTUNING, ("xla_dump_to", str(dump))))


# Every kind of step: shared (with the accelerators' kernels: programs compiled ahead on
# side threads; with a warm-up epoch), the finite-difference order with vmapped neighbors,
# the exact second order, the neighbors in a loop, and fused.
@pytest.mark.parametrize("algorithm,order,evaluate,dw_impl,mode", [
    ("darts", "first", "loop", "conv", "shared"),
    ("na_darts", "second_fd", "vmap", "conv", "shared"),
    ("darts", "second_exact", "loop", "conv", "shared"),
    ("na_darts", "first", "loop", "auto", "shared"),
    ("darts", "first", "loop", "auto", "fused")])
def test_on_a_gpu_every_program_of_a_search_compiles_with_autotuning_off(
    tmp_path, monkeypatch, algorithm, order, evaluate, dw_impl, mode):
  """A search for a GPU (``platform='gpu'``, here compiled for the CPU, which takes the
  GPU's options and ignores them) compiles every program its step, its validation and
  its BatchNorm recalibration run with `bilevel.GPU_WITHOUT_AUTOTUNING`. The oracle is
  XLA's own record: with ``xla_dump_to`` added to the options, XLA writes each program
  compiled with them, and the debug options it compiled with, to a directory; the
  programs compiled are counted by JAX's compile events. The states equal the CPU
  search's bit for bit."""
  dump = tmp_path / "xla"
  dumping_options(monkeypatch, dump)
  kwargs = dict(num=2, kind="swap", evaluate=evaluate) if algorithm == "na_darts" else {}
  (tx, ty), (vx, vy) = make_batches()
  states, compiled = {}, {}
  for platform in ("gpu", "cpu"):
    config = make_config(algorithm, order, **kwargs)
    config.compile = mode
    config.warmup_epochs = 0 if mode == "fused" else 1
    bilevel._supernet_programs.cache_clear()  # Every supernet program compiled here.
    search = BilevelSearch(ToyArchModel(dw_impl=dw_impl), SPACE, config, 1,
                           platform=platform)
    # `init`'s own program (the optimizer states); its parameters are drawn eagerly.
    init = collections.Counter(name for name, _ in record_compiles(
        lambda search=search: states.update(init=init_state(search, tx))))
    assert init["jit(_init_optimizers)"] == 1
    state = states.pop("init")

    def run(state=state, search=search, platform=platform):
      step = search.jit_step()
      for _ in range(3):
        state, _ = step(state, (tx, ty), (vx, vy))
      search.eval_fn()(state, vx, vy, np.ones(len(vy), bool))
      search.recalibrated_batch_stats(state, [tx, vx])
      states[platform] = jax.block_until_ready(state)

    compiled[platform] = collections.Counter(
        name.removeprefix("jit(").removesuffix(")") for name, _ in record_compiles(run))
  assert_dumped_with_options(dump, compiled["gpu"] + collections.Counter(["_init_optimizers"]))
  # Each program compiled once (the batches keep their shapes), under its own name: the
  # CPU search's programs, less those compiled before by the process (the key split's).
  assert set(compiled["gpu"].values()) == {1} and len(compiled["gpu"]) >= 3
  assert set(compiled["cpu"]) <= set(compiled["gpu"])
  chex.assert_trees_all_equal(jax.random.key_data(states["gpu"].rng),
                              jax.random.key_data(states["cpu"].rng))
  chex.assert_trees_all_equal(states["gpu"].replace(rng=None), states["cpu"].replace(rng=None))
