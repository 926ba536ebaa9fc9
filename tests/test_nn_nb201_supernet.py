"""Tests of nanas_jax.nn.nb201_supernet, the NAS-Bench-201 search supernet.

The key oracle: with one-hot architecture weights the supernet computes the same function
as the discrete ``nb201_network.TinyNetwork`` of the architecture they encode, once the
supernet's parameters are copied into the discrete network (``discrete_variables``: the
layout of the module docstring; the search cells' BatchNorms are affine-free, so the
discrete cells' BN scale is 1 and bias 0), in train mode and -- with the running
statistics copied too -- in eval mode. Besides that: the parameter count against a closed
form of the reference ``TinyNetworkDarts``, ``vmap`` over architecture weights, the scan
and unrolled inner edges, the 3x3 conv implementations and their gradient, the gradient
compiled with its barriers kept, and shape errors.

XLA compiles slowly on the test machines: sizes are tiny and the network is compiled once
per mode (module fixture)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprs import all_eqns
from nanas_jax.nn import nb201_network as nb
from nanas_jax.nn import nb201_supernet as ns
from nanas_jax.search import bilevel
from nanas_jax.spaces import NB201Arch, get_space
from supernet_weights import nb201_discrete_variables

SPACE = get_space("nb201")
NUM_OPS = len(SPACE.ops)


# ---------------------------------------------------------------------------------------
# Closed-form parameter count of the reference AutoDL-Projects TinyNetworkDarts
# (search_model_darts.py; cells from search_cells.py with affine=False; PyTorch convs
# without bias).

def search_network_params(C, N, num_classes, in_channels=3):
  total = 9 * in_channels * C + 2 * C  # stem conv + affine BN
  for stage in range(3):
    c = C * 2 ** stage
    if stage:  # ResNetBasicblock(c / 2, c, 2): conv_a, conv_b (affine BN), pool + 1x1 conv
      total += (9 * (c // 2) * c + 2 * c) + (9 * c * c + 2 * c) + (c // 2) * c
    # 6 MixedOps: nor_conv_1x1 (c * c) and nor_conv_3x3 (9 c * c), affine-free BNs;
    # none, skip_connect, avg_pool_3x3 (C_in == C_out: no pre-projection) have none.
    total += N * 6 * (c * c + 9 * c * c)
  return total + 2 * 4 * C + 4 * C * num_classes + num_classes  # lastact BN, classifier


def abstract_params(model, image_shape=(1, 32, 32, 3)):
  return jax.eval_shape(
      lambda x, w: model.init(jax.random.key(0), x, w, train=True),
      jax.ShapeDtypeStruct(image_shape, jnp.float32),
      jax.ShapeDtypeStruct(ns.WEIGHTS_SHAPE, jnp.float32))["params"]


def count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def test_parameter_count_matches_reference():
  # The benchmark's all-nor_conv_3x3 TinyNetwork has 1,531,546 parameters (C=16, N=5,
  # CIFAR-10); the search network adds a 1x1 conv per edge and drops the edges' affine BN.
  cells = [16] * 5 + [32] * 5 + [64] * 5
  assert search_network_params(16, 5, 10) == (
      1_531_546 + sum(6 * (c * c - 2 * c) for c in cells)) == 1_686_106
  assert count(abstract_params(ns.SearchNetworkNB201(10))) == 1_686_106
  for C, N, classes in ((4, 1, 10), (8, 2, 100)):
    model = ns.SearchNetworkNB201(classes, channels=C, cells_per_stage=N)
    assert count(abstract_params(model, (1, 8, 8, 3))) == search_network_params(C, N, classes)


# ---------------------------------------------------------------------------------------
# The oracle: one-hot weights = the discrete TinyNetwork.

C, N, CLASSES = 4, 2, 10
ARCHS = (
    "|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|"
    "+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|",
    "|nor_conv_1x1~0|+|none~0|nor_conv_3x3~1|+|avg_pool_3x3~0|none~1|nor_conv_1x1~2|",
    "|none~0|+|nor_conv_1x1~0|skip_connect~1|+|nor_conv_3x3~0|nor_conv_1x1~1|none~2|",
    "|skip_connect~0|+|avg_pool_3x3~0|nor_conv_1x1~1|+|none~0|nor_conv_3x3~1|avg_pool_3x3~2|",
)


def one_hot(arch):
  return jax.nn.one_hot(SPACE.encode(NB201Arch.parse(arch)), NUM_OPS)


@pytest.fixture(scope="module")
def net():
  model = ns.SearchNetworkNB201(CLASSES, channels=C, cells_per_stage=N)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(4, 8, 8, 3)), jnp.float32)
  weights = jax.nn.softmax(jnp.asarray(rng.normal(size=(3,) + ns.WEIGHTS_SHAPE),
                                       jnp.float32), -1)
  variables = model.init(jax.random.key(0), images, weights[0], train=True)
  train = jax.jit(lambda v, x, w: model.apply(v, x, w, train=True, mutable=["batch_stats"]))
  evaluate = jax.jit(lambda v, x, w: model.apply(v, x, w, train=False))
  return dict(model=model, images=images, weights=weights, variables=variables,
              train=train, evaluate=evaluate)


def test_initialisation(net):
  params, stats = net["variables"]["params"], net["variables"]["batch_stats"]
  assert count(params) == search_network_params(C, N, CLASSES)
  assert set(params) == {f"cells_{i}" for i in range(3 * N + 2)} | {
      "stem_conv", "stem_bn", "lastact_bn", "classifier"}
  inputs = params["cells_0"]["inputs"]
  assert inputs["conv1x1"].shape == (3, C, C) and inputs["conv3x3"].shape == (3, 3, 3, C, C)
  assert stats["cells_0"]["inner"]["bn_var"].shape == (3, 2, C)
  # PyTorch's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)); edges draw their own.
  k3 = np.asarray(inputs["conv3x3"])
  assert 0.8 / np.sqrt(9 * C) < np.abs(k3).max() <= 1 / np.sqrt(9 * C)
  assert not np.allclose(k3[0], k3[1])
  assert np.abs(np.asarray(params["stem_conv"]["kernel"])).max() <= 1 / np.sqrt(27)
  for path, leaf in jax.tree_util.tree_leaves_with_path(stats):
    key = jax.tree_util.keystr(path)
    assert np.all(np.asarray(leaf) == (1.0 if key.endswith("var']") else 0.0)), key


@pytest.mark.parametrize("arch", ARCHS)
def test_one_hot_supernet_equals_tiny_network(net, arch):
  v, x = net["variables"], net["images"]
  discrete = nb.TinyNetwork(arch, C=C, N=N, num_classes=CLASSES)
  mapped = nb201_discrete_variables(v, arch, N)
  expected = jax.eval_shape(lambda: discrete.init(jax.random.key(0), x, True))
  assert jax.tree.structure(mapped) == jax.tree.structure(expected)
  assert jax.tree.map(jnp.shape, mapped) == jax.tree.map(jnp.shape, expected)

  # Train mode: batch statistics everywhere.
  logits, updated = net["train"](v, x, one_hot(arch))
  want, _ = discrete.apply(mapped, x, True, mutable=["batch_stats"])
  np.testing.assert_allclose(logits, want, atol=1e-4, rtol=1e-4)

  # Eval mode with the supernet's updated running statistics copied over.
  trained = {"params": v["params"], "batch_stats": updated["batch_stats"]}
  got = net["evaluate"](trained, x, one_hot(arch))
  want = discrete.apply(nb201_discrete_variables(trained, arch, N), x, False)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_vmap_over_weights_equals_loop(net):
  v, x, weights = net["variables"], net["images"], net["weights"]
  singles = [net["train"](v, x, w) for w in weights]
  batched = jax.jit(jax.vmap(net["train"], in_axes=(None, None, 0)))(v, x, weights)
  for k, single in enumerate(singles):
    jax.tree.map(lambda b, s: np.testing.assert_allclose(b[k], s, atol=1e-5, rtol=1e-5),
                 batched, single)
  assert np.abs(singles[0][0] - singles[1][0]).max() > 1e-4  # the weights matter


def test_inner_scan_equals_unroll(net):
  """Logits and running statistics agree: the scan's unused slot updates nothing."""
  v, x, w = net["variables"], net["images"], net["weights"][0]
  looped = ns.SearchNetworkNB201(CLASSES, channels=C, cells_per_stage=N, inner_impl="scan")
  got = jax.jit(lambda v, x, w: looped.apply(v, x, w, train=True,
                                             mutable=["batch_stats"]))(v, x, w)
  want = net["train"](v, x, w)  # 'auto': unrolled
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
               got, want)
  inner = got[1]["batch_stats"]["cells_0"]["inner"]
  assert np.all(np.asarray(inner["bn_mean"]) != 0.0)  # every edge's statistics moved


def test_inner_impl_auto_unrolls_at_every_size():
  """``'auto'`` unrolls, and the network built with it traces no loop at CIFAR or digits
  sizes, so no convolution runs inside a loop's body (XLA:CPU's slow path there); a loop
  a search cell where ``'scan'`` is asked for."""
  assert [ns.resolve_inner_impl(inner) for inner in ("auto", "unroll", "scan")] == [
      "unroll", "unroll", "scan"]
  with pytest.raises(ValueError, match="Unknown inner_impl 'loop'"):
    ns.resolve_inner_impl("loop")

  weights = jnp.zeros(ns.WEIGHTS_SHAPE)

  def loops(size, inner_impl="auto"):
    model = ns.SearchNetworkNB201(CLASSES, channels=4, cells_per_stage=1,
                                  inner_impl=inner_impl)
    images = jnp.zeros((8, size, size, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), images, weights, True))
    jaxpr = jax.make_jaxpr(lambda v: model.apply(v, images, weights, train=True,
                                                 mutable=["batch_stats"]))(variables)
    return sum(e.primitive.name == "scan" for e in all_eqns(jaxpr.jaxpr))

  assert (loops(32), loops(8), loops(8, "scan")) == (0, 0, 3)


@pytest.mark.parametrize("impl", ["vmap", "im2col"])
def test_conv3x3_implementations_agree(impl):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(3, 2, 5, 6, 4)), jnp.float32)
  kernels = jnp.asarray(rng.normal(size=(3, 3, 3, 4, 5)), jnp.float32)
  want = ns.edge_conv3x3(x, kernels, "unroll")
  xp = np.pad(np.asarray(x, np.float64), [(0, 0), (0, 0), (1, 1), (1, 1), (0, 0)])
  direct = sum(np.einsum("ebhwi,eio->ebhwo", xp[:, :, a:a + 5, b:b + 6],
                         np.asarray(kernels, np.float64)[:, a, b])
               for a in range(3) for b in range(3))
  np.testing.assert_allclose(want, direct, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(ns.edge_conv3x3(x, kernels, impl), want, atol=1e-4, rtol=1e-4)
  with pytest.raises(ValueError, match="Unknown conv_impl"):
    ns.edge_conv3x3(x, kernels, "grouped")


def test_unrolled_convolutions_gradient_is_the_dense_convolutions():
  """``'unroll'``'s convolutions differentiate through `_same_conv_materialized`, whose
  gradient (through a barrier) is the float64 direct sum's gradient."""
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 3, 5, 6, 4)), jnp.float32)
  kernels = jnp.asarray(rng.normal(size=(2, 3, 3, 4, 5)), jnp.float32)
  g = rng.normal(size=(2, 3, 5, 6, 5))
  got = jax.grad(lambda x, k: jnp.sum(ns.edge_conv3x3(x, k, "unroll") * g),
                 argnums=(0, 1))(x, kernels)
  xp = np.pad(np.asarray(x, np.float64), [(0, 0), (0, 0), (1, 1), (1, 1), (0, 0)])
  k64 = np.asarray(kernels, np.float64)
  # d/dk[a, b] = sum over pixels of the shifted input times g; d/dx is the adjoint of the
  # shifts, accumulated in the padded frame and cropped.
  want_k = np.stack([np.stack([np.einsum("ebhwi,ebhwo->eio", xp[:, :, a:a + 5, b:b + 6], g)
                               for b in range(3)], 1) for a in range(3)], 1)
  want_xp = np.zeros_like(xp)
  for a in range(3):
    for b in range(3):
      want_xp[:, :, a:a + 5, b:b + 6] += np.einsum("ebhwo,eio->ebhwi", g, k64[:, a, b])
  np.testing.assert_allclose(got[1], want_k, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(got[0], want_xp[:, :, 1:-1, 1:-1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("conv_impl,barriers", [("unroll", 9), ("vmap", 0)])
def test_nodes_are_fusion_boundaries_with_the_cpus_convolutions_only(conv_impl, barriers):
  """With the CPU's convolutions each search cell's input and its inner nodes 2 and 3
  pass an optimisation barrier in the forward pass (3 cells x 3); the accelerators'
  programs have none."""
  model = ns.SearchNetworkNB201(CLASSES, channels=4, cells_per_stage=1,
                                conv_impl=conv_impl, inner_impl="unroll")
  images, weights = jnp.zeros((2, 8, 8, 3)), jnp.zeros(ns.WEIGHTS_SHAPE)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), images, weights, True))
  jaxpr = jax.make_jaxpr(lambda v: model.apply(v, images, weights, train=True,
                                               mutable=["batch_stats"]))(variables)
  assert sum(e.primitive.name == "optimization_barrier"
             for e in all_eqns(jaxpr.jaxpr)) == barriers


def test_the_gradient_with_barriers_kept_is_the_gradient_without():
  """Compiled as a CPU search compiles it (`bilevel.CPU_KEEP_BARRIERS`: the nodes and the
  convolutions' gradient inputs materialised), the supernet's gradient equals the one
  XLA:CPU computes with the barriers dropped."""
  model = ns.SearchNetworkNB201(CLASSES, channels=4, cells_per_stage=1,
                                conv_impl="unroll", inner_impl="unroll")
  rng = np.random.default_rng(3)
  images = jnp.asarray(rng.normal(size=(4, 8, 8, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, CLASSES, 4))
  weights = jax.nn.softmax(jnp.asarray(rng.normal(size=ns.WEIGHTS_SHAPE), jnp.float32), -1)
  variables = model.init(jax.random.key(0), images, weights, train=True)

  def loss(params, weights):
    logits, _ = model.apply({**variables, "params": params}, images, weights, train=True,
                            mutable=["batch_stats"])
    return bilevel.cross_entropy(logits, labels)

  grad = jax.grad(loss, argnums=(0, 1))
  kept = jax.jit(grad, compiler_options=dict(bilevel.CPU_KEEP_BARRIERS))
  dropped = jax.jit(grad)
  assert "opt-barrier" in kept.lower(variables["params"], weights).compile().as_text()
  got, want = kept(variables["params"], weights), dropped(variables["params"], weights)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), got, want)
  assert float(jnp.abs(got[1]).max()) > 1e-4  # the architecture's gradient is not zero


def test_invalid_weight_shapes(net):
  model, x, v = net["model"], net["images"], net["variables"]
  for bad in (jnp.zeros((6, NUM_OPS)), jnp.zeros((1, 6, 8)), jnp.zeros((2, 6, NUM_OPS)),
              jnp.zeros((1, 14, NUM_OPS))):
    with pytest.raises(ValueError, match=r"\(1, 6, 5\)"):
      model.init(jax.random.key(0), x, bad, train=True)
    with pytest.raises(ValueError, match=r"\(1, 6, 5\)"):
      model.apply(v, x, bad, train=False)
  cell = ns.SearchCellNB201(C)
  with pytest.raises(ValueError, match=r"\(6, 5\)"):
    cell.init(jax.random.key(0), x[..., :C], jnp.zeros((1, 6, NUM_OPS)), train=True)
  with pytest.raises(ValueError, match="expects"):
    cell.init(jax.random.key(0), x, jnp.zeros((6, NUM_OPS)), train=True)
