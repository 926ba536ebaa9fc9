"""Tests of nanas_jax.nn.supernet, the DARTS search supernet.

The key oracle: with one-hot architecture weights, a search cell computes the same
function as the discrete ``networks.Cell`` of the genotype it encodes, once the supernet's
parameters are copied into the discrete cell (layout: the supernet module docstring), and
their BatchNorm running statistics agree. The one difference from the discrete cell is the
reference's: the search MixedOp follows each pool by an affine-free BatchNorm, which the
oracle inserts into the discrete cell's pools (``supernet_weights.pool_batch_norm``).
Besides that: the parameter count against a closed form of the reference
``model_search.Network``, ``vmap`` over architecture weights, shape errors, and the
BatchNorm running statistics / evaluation mode.

XLA compiles slowly on the test machines: sizes are tiny, each side of a comparison is
one compiled program (`compiled`), and the full network is compiled once per mode (module
fixture)."""

import functools
import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanas_jax.nn import functional as F
from nanas_jax.nn import nb201_supernet, networks, supernet
from nanas_jax.spaces import Genotype, get_genotype, get_space
from jaxprs import all_eqns, layout_constraints
from supernet_weights import discrete_cell_params, edge_location, pool_batch_norm

EPS = 1e-5
NUM_OPS = len(get_space("darts").ops)


def compiled(apply, **kwargs):
  """``apply`` (a module's) with ``kwargs`` fixed, as one compiled program. Applied
  eagerly, a cell runs each of its operations as a program of its own, which had taken
  most of these tests' time."""
  return jax.jit(functools.partial(apply, **kwargs))


# ---------------------------------------------------------------------------------------
# Closed-form parameter count of the reference quark0/darts cnn/model_search.py Network
# (PyTorch: convs without bias; every BatchNorm in the search cells has affine=False, the
# stem BatchNorm is affine).

def mixed_op_params(c, stride):
  params = (2 * (9 * c + c * c)      # sep_conv_3x3: two (depthwise 3x3, pointwise) blocks
            + 2 * (25 * c + c * c)   # sep_conv_5x5
            + 9 * c + c * c          # dil_conv_3x3
            + 25 * c + c * c)        # dil_conv_5x5
  if stride == 2:
    params += c * c                  # skip_connect: FactorizedReduce, two C x C/2 convs
  return params                      # none, pools (+ affine-free BN): nothing


def search_network_params(c, layers, in_channels, num_classes, steps=4, multiplier=4,
                          stem_multiplier=3):
  c_curr = stem_multiplier * c
  total = 9 * in_channels * c_curr + 2 * c_curr  # stem conv + affine BN
  c_pp, c_p, c_curr = c_curr, c_curr, c
  for i in range(layers):
    reduction = i in (layers // 3, 2 * layers // 3)
    if reduction:
      c_curr *= 2
    # preprocess0: FactorizedReduce (two C_pp x C/2 convs) after a reduction, else a 1x1
    # ReLUConvBN; both C_pp * C. preprocess1: a 1x1 ReLUConvBN.
    total += c_pp * c_curr + c_p * c_curr
    for node in range(steps):
      for source in range(2 + node):
        total += mixed_op_params(c_curr, 2 if reduction and source < 2 else 1)
    c_pp, c_p = c_p, multiplier * c_curr
  return total + c_p * num_classes + num_classes


def count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def abstract_params(model, image_shape):
  """Parameter shapes of ``model`` (``init`` traced, nothing computed)."""
  return jax.eval_shape(
      lambda x, w: model.init(jax.random.key(0), x, w, train=True),
      jax.ShapeDtypeStruct(image_shape, jnp.float32),
      jax.ShapeDtypeStruct((2, 14, NUM_OPS), jnp.float32))["params"]


def test_parameter_count_matches_reference():
  # quark0/darts model_search.Network(C=8, num_classes=10, layers=5) on 1-channel inputs.
  assert search_network_params(8, 5, 1, 10) == 393_778
  model = supernet.SearchNetwork(num_classes=10, channels=8, layers=5)
  assert count(abstract_params(model, (2, 8, 8, 1))) == 393_778


@pytest.mark.parametrize("c, layers, in_channels, num_classes",
                         [(16, 8, 3, 10), (4, 3, 1, 10), (6, 4, 3, 7)])
def test_parameter_count_closed_form(c, layers, in_channels, num_classes):
  model = supernet.SearchNetwork(num_classes=num_classes, channels=c, layers=layers)
  params = abstract_params(model, (2, 8, 8, in_channels))
  assert count(params) == search_network_params(c, layers, in_channels, num_classes)


# ---------------------------------------------------------------------------------------
# The key oracle: one-hot supernet cell == discrete cell.

C, C_PP, C_P, BATCH = 4, 6, 5, 4

# Every op at stride 1 (normal) and at stride 2 (reduce, input edges), pairs in both
# source orders.
ALL_OPS = Genotype(
    normal=[("skip_connect", 0), ("sep_conv_3x3", 1), ("dil_conv_3x3", 2),
            ("sep_conv_5x5", 0), ("dil_conv_5x5", 1), ("max_pool_3x3", 3),
            ("avg_pool_3x3", 2), ("sep_conv_3x3", 4)],
    normal_concat=[2, 3, 4, 5],
    reduce=[("skip_connect", 0), ("sep_conv_3x3", 1), ("sep_conv_5x5", 0),
            ("dil_conv_3x3", 1), ("dil_conv_5x5", 0), ("max_pool_3x3", 1),
            ("skip_connect", 4), ("avg_pool_3x3", 1)],
    reduce_concat=[2, 3, 4, 5])


def _genotype(name):
  if name == "ALL_OPS":
    return ALL_OPS
  if name.startswith("random"):
    return get_space("darts").random(np.random.default_rng(int(name[len("random"):])))
  return get_genotype(name)


def _cell_inputs(reduction_prev, seed):
  rng = np.random.default_rng(seed)
  size0 = 16 if reduction_prev else 8  # s0 is at twice the resolution after a reduction
  s0 = jnp.asarray(rng.normal(size=(BATCH, size0, size0, C_PP)), jnp.float32)
  s1 = jnp.asarray(rng.normal(size=(BATCH, 8, 8, C_P)), jnp.float32)
  return s0, s1


def check_running_statistics(search_stats, discrete_stats, pairs, search_params,
                             reduction):
  """The supernet's running statistics of the kept ops equal the discrete cell's.

  Both start at (0, 1) and follow PyTorch's rule (momentum 0.1, unbiased variance)."""
  def check(search_mean, search_var, discrete_bn, what):
    np.testing.assert_allclose(search_mean, discrete_bn["mean"], atol=1e-5, rtol=1e-4,
                               err_msg=what)
    np.testing.assert_allclose(search_var, discrete_bn["var"], atol=1e-5, rtol=1e-4,
                               err_msg=what)

  for name in ("preprocess0", "preprocess1"):
    check(search_stats[name]["bn_mean"], search_stats[name]["bn_var"],
          discrete_stats[name]["bn"], name)
  for position, (op, source) in enumerate(pairs):
    group, edge = edge_location(search_params, position // 2, source)
    st = jax.tree.map(lambda a: a[edge], search_stats[group])
    ours = discrete_stats.get(f"ops_{position}")
    what = f"ops_{position} ({op}, {source})"
    if op in ("sep_conv_3x3", "sep_conv_5x5"):
      k = 0 if op == "sep_conv_3x3" else 1
      check(st["bn1_mean"][k], st["bn1_var"][k], ours["bn1"], what)
      check(st["bn2_mean"][k], st["bn2_var"][k], ours["bn2"], what)
    elif op in ("dil_conv_3x3", "dil_conv_5x5"):
      k = 2 if op == "dil_conv_3x3" else 3
      check(st["bn1_mean"][k], st["bn1_var"][k], ours["bn"], what)
    elif op == "skip_connect" and reduction and source < 2:
      check(st["fr_bn_mean"], st["fr_bn_var"], ours["bn"], what)


ORACLE_CASES = [
    # (genotype, reduction, reduction_prev, depthwise impl)
    ("DARTS_V2", False, False, "scan"),
    ("DARTS_V2", True, True, "scan"),
    ("DARTS_V2", False, True, "conv"),
    ("DARTS_V2", True, False, "conv"),
    ("ALL_OPS", False, False, "scan"),
    ("ALL_OPS", True, False, "scan"),
    ("ALL_OPS", True, True, "conv"),
    ("ALL_OPS", False, True, "conv"),
    ("random0", False, False, "scan"),
    ("random1", True, False, "scan"),
    ("random2", False, True, "scan"),
    ("random3", True, True, "scan"),
    # 'taps' depthwise convs (like 'conv' above) unroll the inner nodes (outputs and every
    # edge's running statistics checked the same way).
    ("ALL_OPS", False, False, "taps"),
    ("ALL_OPS", True, True, "taps"),
    ("random4", False, True, "taps"),
    ("random5", True, False, "taps"),
    # 'taps_fused', the accelerators' taps.
    ("ALL_OPS", True, False, "taps_fused"),
    ("random6", False, True, "taps_fused"),
    # 'conv_each', the TPU's: layouts pinned for a TPU, the average pools as windows.
    ("ALL_OPS", False, False, "conv_each"),
    ("ALL_OPS", True, True, "conv_each"),
]


@pytest.mark.parametrize("name, reduction, reduction_prev, impl", ORACLE_CASES)
def test_one_hot_search_cell_equals_discrete_cell(name, reduction, reduction_prev, impl):
  genotype = _genotype(name)
  space = get_space("darts")
  weights = jax.nn.one_hot(space.encode(genotype), NUM_OPS)[1 if reduction else 0]
  s0, s1 = _cell_inputs(reduction_prev, seed=len(name) + 2 * reduction + reduction_prev)

  cell = supernet.SearchCell(C, reduction, reduction_prev, dw_impl=impl)
  variables = cell.init(jax.random.key(3), s0, s1, weights, train=True)
  train = compiled(cell.apply, train=True, mutable=["batch_stats"])
  got, updates = train(variables, s0, s1, weights)

  pairs = genotype.reduce if reduction else genotype.normal
  params = discrete_cell_params(variables["params"], pairs, reduction)
  discrete = networks.Cell(genotype, C_PP, C_P, C, reduction, reduction_prev)
  expected = jax.eval_shape(
      lambda a, b: discrete.init(jax.random.key(0), a, b, True), s0, s1)["params"]
  # The copied tree is exactly the discrete cell's parameter tree (names and shapes).
  assert (jax.tree.map(lambda a: a.shape, params)
          == jax.tree.map(lambda a: a.shape, expected))
  with nn.intercept_methods(pool_batch_norm):
    want, discrete_updates = compiled(discrete.apply, train=True, mutable=["batch_stats"])(
        {"params": params}, s0, s1)

  assert got.shape == want.shape == (BATCH, 4 if reduction else 8, 4 if reduction else 8,
                                     4 * C)
  assert float(jnp.std(want)) > 0.1  # a non-degenerate output
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
  check_running_statistics(updates["batch_stats"], discrete_updates["batch_stats"], pairs,
                           variables["params"], reduction)

  if name == "ALL_OPS" and reduction and not reduction_prev:
    # The comparison discriminates: swapping sep3 <-> sep5 and dil3 <-> dil5 on every
    # edge gives another function.
    swapped = weights[:, np.array([0, 1, 2, 3, 5, 4, 7, 6])]
    other = train(variables, s0, s1, swapped)[0]
    assert float(jnp.max(jnp.abs(other - want))) > 1e-2


# ---------------------------------------------------------------------------------------
# The full network: vmap over architectures, shape errors, running statistics.

NET_C, NET_LAYERS, NET_CLASSES = 4, 3, 10


@pytest.fixture(scope="module")
def net():
  model = supernet.SearchNetwork(num_classes=NET_CLASSES, channels=NET_C,
                                 layers=NET_LAYERS)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(4, 8, 8, 1)), jnp.float32)
  arch = jax.nn.softmax(jnp.asarray(rng.normal(size=(3, 2, 14, NUM_OPS)), jnp.float32), -1)
  variables = model.init(jax.random.key(0), images, arch[0], train=True)
  # Train mode updates the stem's flax BatchNorm, so batch_stats must be mutable.
  train = compiled(model.apply, train=True, mutable=["batch_stats"])
  evaluate = compiled(model.apply, train=False)
  return dict(model=model, images=images, arch=arch, variables=variables, train=train,
              evaluate=evaluate, rng=rng)


def test_initialisation(net):
  params, stats = net["variables"]["params"], net["variables"]["batch_stats"]
  assert count(params) == search_network_params(NET_C, NET_LAYERS, 1, NET_CLASSES)
  # PyTorch's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
  kernel = np.asarray(params["stem_conv"]["kernel"])
  assert 0 < np.abs(kernel).max() <= 1 / 3
  pw1 = np.asarray(params["cell0"]["inputs"]["pw1"])
  assert 0 < np.abs(pw1).max() <= 1 / np.sqrt(NET_C)
  assert np.abs(pw1).max() > 0.8 / np.sqrt(NET_C)
  # Different edges and layers draw different numbers.
  assert not np.allclose(pw1[0], pw1[1])
  for path, leaf in jax.tree_util.tree_leaves_with_path(stats):
    key = jax.tree_util.keystr(path)
    assert np.all(np.asarray(leaf) == (1.0 if key.endswith("var']") else 0.0)), key


def test_vmap_over_architectures_equals_loop(net):
  v, x, arch = net["variables"], net["images"], net["arch"]
  singles = [net["train"](v, x, w) for w in arch]
  batched = jax.jit(jax.vmap(net["train"], in_axes=(None, None, 0)))(v, x, arch)
  for k, single in enumerate(singles):
    jax.tree.map(lambda b, s: np.testing.assert_allclose(b[k], s, atol=1e-5, rtol=1e-5),
                 batched, single)
  logits = np.stack([s[0] for s in singles])
  assert logits.shape == (len(arch), 4, NET_CLASSES)
  assert np.abs(logits[0] - logits[1]).max() > 1e-4  # the weights matter


def test_kernel_grads_false_zeroes_the_cells_kernel_gradients_and_nothing_else(net):
  """``kernel_grads`` against the network's own gradient (the oracle): with True every
  gradient is the same; with False the cells' convolution kernels' are zeros, and the
  stem's, the classifier's and the architecture weights' are the same."""
  model, x, v = net["model"], net["images"], net["variables"]
  labels = jnp.arange(x.shape[0]) % NET_CLASSES

  def loss(params, weights, kernel_grads=None):
    logits, _ = model.apply({"params": params, "batch_stats": v["batch_stats"]}, x, weights,
                            train=True, mutable=["batch_stats"], kernel_grads=kernel_grads)
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(x.shape[0]), labels])

  grads = jax.jit(jax.grad(loss, argnums=(0, 1)))
  want = grads(v["params"], net["arch"][0])  # kernel_grads None: the network's own program
  kernels = ("dw1_", "dw2_", "pw1", "pw2", "fr_a", "fr_b", "conv")
  skipped = []
  for flag in (True, False):
    got = grads(v["params"], net["arch"][0], jnp.asarray(flag))
    np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-6)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got[0]),
                            jax.tree.leaves(want[0])):
      name = jax.tree_util.keystr(path)
      cell_kernel = name.startswith("['cell") and any(f"['{k}" in name for k in kernels)
      assert np.any(np.asarray(w) != 0), name
      if not flag and cell_kernel:
        skipped.append(name)
      np.testing.assert_allclose(g, 0 * w if not flag and cell_kernel else w, rtol=1e-4,
                                 atol=1e-6, err_msg=name)
  # Every cell's preprocessing, input edges and inner edges.
  assert {p.split("]")[0] for p in skipped} == {f"['cell{i}'" for i in range(NET_LAYERS)}
  assert sum("preprocess" in p for p in skipped) == 2 * NET_LAYERS + 1


def test_invalid_weight_shapes(net):
  model, x, v = net["model"], net["images"], net["variables"]
  for bad in (jnp.zeros((14, NUM_OPS)), jnp.zeros((2, 14, 7)), jnp.zeros((1, 14, NUM_OPS)),
              jnp.zeros((2, 15, NUM_OPS))):
    with pytest.raises(ValueError, match=r"\(2, 14, 8\)"):
      model.init(jax.random.key(0), x, bad, train=True)
    with pytest.raises(ValueError, match=r"\(2, 14, 8\)"):
      model.apply(v, x, bad, train=False)
  cell = supernet.SearchCell(C, False, False)
  s0, s1 = _cell_inputs(False, 0)
  with pytest.raises(ValueError, match=r"\(14, 8\)"):
    cell.init(jax.random.key(0), s0, s1, jnp.zeros((2, 14, NUM_OPS)), train=True)
  edges = supernet.MixedEdges(2, C, 1)
  with pytest.raises(ValueError, match="MixedEdges expects inputs"):
    edges.init(jax.random.key(0), jnp.zeros((3, 2, 4, 4, C)), jnp.zeros((3, NUM_OPS)),
               train=True)


def _np_stem(images, kernel):
  """3x3 conv, padding 1, HWIO kernel, float64."""
  x = np.pad(np.asarray(images, np.float64), [(0, 0), (1, 1), (1, 1), (0, 0)])
  kernel = np.asarray(kernel, np.float64)
  h, w = images.shape[1:3]
  out = 0.0
  for a, b in itertools.product(range(3), range(3)):
    out = out + np.einsum("bhwi,io->bhwo", x[:, a:a + h, b:b + w], kernel[a, b])
  return out


def test_running_statistics_and_eval_mode(net):
  v, x, w = net["variables"], net["images"], net["arch"][0]
  params = v["params"]
  logits, updated = net["train"](v, x, w)
  stats = updated["batch_stats"]

  # Stem BatchNorm (flax): running mean = 0.9 * 0 + 0.1 * batch mean.
  stem = _np_stem(x, params["stem_conv"]["kernel"])
  mean = stem.mean(axis=(0, 1, 2))
  np.testing.assert_allclose(stats["stem_bn"]["mean"], 0.1 * mean, atol=1e-5, rtol=1e-4)

  # cell0.preprocess1 (affine-free, PyTorch statistics): ReLU, 1x1 conv of the stem's
  # train-mode output; running var 0.9 * 1 + 0.1 * unbiased batch variance.
  z = ((stem - mean) / np.sqrt(stem.var(axis=(0, 1, 2)) + EPS)
       * np.asarray(params["stem_bn"]["scale"]) + np.asarray(params["stem_bn"]["bias"]))
  for name in ("preprocess0", "preprocess1"):
    y = np.maximum(z, 0) @ np.asarray(params["cell0"][name]["conv"], np.float64)
    got = stats["cell0"][name]
    np.testing.assert_allclose(got["bn_mean"], 0.1 * y.mean(axis=(0, 1, 2)), atol=1e-5,
                               rtol=1e-4)
    np.testing.assert_allclose(got["bn_var"], 0.9 + 0.1 * y.reshape(-1, NET_C).var(
        axis=0, ddof=1), atol=1e-5, rtol=1e-4)

  # Evaluation uses the running statistics: a sample's logits do not depend on the rest of
  # the batch (they do in train mode), and they change with the statistics.
  trained = {"params": params, "batch_stats": stats}
  other = x.at[1:].set(jnp.asarray(net["rng"].normal(size=(3, 8, 8, 1)), jnp.float32))
  eval_a = net["evaluate"](trained, x, w)
  eval_b = net["evaluate"](trained, other, w)
  np.testing.assert_allclose(eval_a[0], eval_b[0], atol=1e-5, rtol=1e-5)
  assert np.abs(eval_a[1:] - eval_b[1:]).max() > 1e-4
  train_b, _ = net["train"](v, other, w)
  assert np.abs(logits[0] - train_b[0]).max() > 1e-4
  eval_init = net["evaluate"](v, x, w)
  assert np.abs(eval_init - eval_a).max() > 1e-4


@pytest.mark.parametrize("reduce", [False, True])
def test_preprocess_eval_uses_running_statistics(reduce):
  rng = np.random.default_rng(5 + reduce)
  x = rng.normal(size=(2, 4, 6, C_PP)).astype(np.float32)
  mean = rng.normal(size=(C,)).astype(np.float32)
  var = rng.uniform(0.5, 2.0, size=(C,)).astype(np.float32)
  module = supernet.Preprocess(C, reduce)
  params = module.init(jax.random.key(0), jnp.asarray(x), train=True)["params"]
  out = module.apply({"params": params,
                      "batch_stats": {"bn_mean": jnp.asarray(mean),
                                      "bn_var": jnp.asarray(var)}},
                     jnp.asarray(x), train=False)
  r = np.maximum(x.astype(np.float64), 0)
  if reduce:
    y = np.concatenate([r[:, ::2, ::2] @ np.asarray(params["fr_a"], np.float64),
                        r[:, 1::2, 1::2] @ np.asarray(params["fr_b"], np.float64)], -1)
  else:
    y = r @ np.asarray(params["conv"], np.float64)
  np.testing.assert_allclose(out, (y - mean) / np.sqrt(var + EPS), atol=1e-5, rtol=1e-5)


def test_mixed_edges_eval_uses_per_edge_pool_statistics():
  """Eval mode indexes the running statistics per (edge, op, channel)."""
  rng = np.random.default_rng(11)
  x = jnp.asarray(rng.normal(size=(2, 2, 6, 6, C)), jnp.float32)
  # Edge 0: max pool; edge 1: half avg pool, half skip (the identity at stride 1).
  weights = jnp.zeros((2, NUM_OPS)).at[0, 1].set(1.0).at[1, 2].set(0.5).at[1, 3].set(0.5)
  module = supernet.MixedEdges(2, C, 1, "scan")
  variables = module.init(jax.random.key(0), x, weights, train=True)
  stats = dict(variables["batch_stats"])
  pool_mean = rng.normal(size=(2, 2, C)).astype(np.float32)
  pool_var = rng.uniform(0.5, 2.0, size=(2, 2, C)).astype(np.float32)
  stats["pool_bn_mean"], stats["pool_bn_var"] = jnp.asarray(pool_mean), jnp.asarray(pool_var)
  out = module.apply({"params": variables["params"], "batch_stats": stats}, x, weights,
                     train=False)
  maxp = jax.lax.reduce_window(x[0], -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 1, 1, 1),
                               ((0, 0), (1, 1), (1, 1), (0, 0)))
  avgp = nn.avg_pool(x[1], (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)
  want0 = (maxp - pool_mean[0, 0]) / np.sqrt(pool_var[0, 0] + EPS)
  want1 = 0.5 * (avgp - pool_mean[1, 1]) / np.sqrt(pool_var[1, 1] + EPS) + 0.5 * x[1]
  np.testing.assert_allclose(out[0], want0, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(out[1], want1, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stride, sources", [
    (1, (0, 1, 0, 1, 1)), (2, (0, 1, 0, 1, 1)),   # gathered
    (1, (0, 1) * 3), (2, (0, 1) * 3)])            # in turn, as a cell's: shared
def test_edges_sharing_inputs_equal_edges_with_their_own_copies(stride, sources):
  """`MixedEdges(sources=...)` pools each distinct input once; it computes what the same
  edges compute on per-edge copies of their inputs: outputs, gradients and every edge's
  running statistics, in training and in evaluation (with per-edge statistics that
  differ), up to float32 rounding (the batch statistics' sums run in another order).
  Sources read in turn, as a cell's input edges read (s0, s1), share the pools' and the
  skip's outputs in training, and their gradients are summed as adds (`F.mixed_sum`)."""
  rng = np.random.default_rng(12)
  edges = len(sources)
  distinct = jnp.asarray(rng.normal(size=(2, 3, 8, 8, C)), jnp.float32)
  weights = jax.nn.softmax(jnp.asarray(rng.normal(size=(edges, NUM_OPS)), jnp.float32), -1)
  shared = supernet.MixedEdges(edges, C, stride, "scan", sources=sources)
  copies = supernet.MixedEdges(edges, C, stride, "scan")
  variables = shared.init(jax.random.key(1), distinct, weights, train=True)
  assert jax.tree.map(jnp.shape, variables) == jax.tree.map(
      jnp.shape, copies.init(jax.random.key(1), distinct[np.array(sources)], weights,
                             train=True))
  got, got_stats = compiled(shared.apply, train=True, mutable=["batch_stats"])(
      variables, distinct, weights)
  want, want_stats = compiled(copies.apply, train=True, mutable=["batch_stats"])(
      variables, distinct[np.array(sources)], weights)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
               got_stats, want_stats)
  cot = jnp.asarray(rng.normal(size=want.shape), jnp.float32)

  def grads(module, read):
    def loss(params, xs, w):
      return jnp.sum(cot * module.apply({"params": params, "batch_stats":
                                         variables["batch_stats"]}, read(xs), w,
                                        train=True, mutable=["batch_stats"])[0])
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(variables["params"], distinct, weights)

  # The copies' input gradient is the gather's: each input's edges' gradients added.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4),
               grads(shared, lambda xs: xs), grads(copies, lambda xs: xs[np.array(sources)]))
  stats = jax.tree.map(
      lambda s: s + jnp.asarray(rng.uniform(0.1, 0.5, size=s.shape), s.dtype),
      variables["batch_stats"])
  evaluated = [compiled(m.apply, train=False)(
      {"params": variables["params"], "batch_stats": stats}, x, weights)
      for m, x in ((shared, distinct), (copies, distinct[np.array(sources)]))]
  np.testing.assert_allclose(evaluated[0], evaluated[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("group", ["darts", "nb201"])
def test_mixed_edges_in_bfloat16_sum_the_weights_gradient_in_float32(group):
  """bfloat16 operations (``config.search.dtype``): a group of MixedOps returns bfloat16,
  and its gradient with respect to the architecture weights is summed in float32 (no
  reduction of the gradient's program is bfloat16; before, the weights' gradients were
  bfloat16 reductions over B, H, W and C) and equals, within the rounding of its
  bfloat16 result, the float64 sum of the cotangent times each operation's output (the
  group at one-hot weights, which returns that operation's bfloat16 output exactly)."""
  rng = np.random.default_rng(13)
  edges, ops = 3, {"darts": NUM_OPS, "nb201": len(nb201_supernet.NB201_OPS)}[group]
  module = {"darts": supernet.MixedEdges(edges, C, 1, "conv"),
            "nb201": nb201_supernet.InputEdges(edges, C)}[group]
  bf16 = lambda a: jnp.asarray(a, jnp.bfloat16)
  xs = bf16(rng.normal(size=(edges, 16, 8, 8, C)))
  cot = bf16(rng.normal(size=(edges, 16, 8, 8, C)))
  variables = module.init(jax.random.key(2), xs.astype(jnp.float32),
                          jnp.zeros((edges, ops)), train=True)
  params = jax.tree.map(bf16, variables["params"])

  def mixed(weights):
    return module.apply({"params": params, "batch_stats": variables["batch_stats"]}, xs,
                        weights, train=True, mutable=["batch_stats"])[0]

  def loss(weights):
    return jnp.sum(mixed(weights).astype(jnp.float32) * cot.astype(jnp.float32))

  weights = bf16(jax.nn.softmax(rng.normal(size=(edges, ops)), -1))
  assert mixed(weights).dtype == jnp.bfloat16
  program = jax.make_jaxpr(jax.grad(loss))(weights).jaxpr
  assert {v.aval.dtype.name for eqn in all_eqns(program) if eqn.primitive.name == "reduce_sum"
          for v in eqn.outvars} == {"float32"}
  grad = jax.jit(jax.grad(loss))(weights)
  as64 = lambda a: np.asarray(a.astype(jnp.float32), np.float64)
  outputs = [as64(mixed(bf16(jax.nn.one_hot(jnp.full(edges, o), ops)))) for o in range(ops)]
  want = np.stack([np.sum(out * as64(cot), axis=(1, 2, 3, 4)) for out in outputs], 1)
  assert grad.dtype == jnp.bfloat16 and np.abs(want).max() > 1
  np.testing.assert_allclose(as64(grad), want, rtol=2**-8, atol=1e-3 * np.abs(want).max())


@pytest.mark.parametrize("impl, inner", [("taps", "auto"), ("taps", "unroll"), ("conv", "auto"),
                                         ("conv", "scan"), ("taps_fused", "auto"),
                                         ("conv_each", "auto")])
def test_inner_nodes_scanned_or_unrolled_compute_what_the_scan_cell_computes(impl, inner):
  """A cell with 'taps', 'conv', 'taps_fused' or 'conv_each' depthwise convs and its inner
  nodes unrolled (no loop in its program; with 'taps', its nodes materialised) or in a
  loop (asked for, or 'auto' with 'taps' at this size) against the same cell with 'scan'
  (inner nodes in a `lax.scan` with padded slots): at soft architecture weights, outputs
  and every edge's running statistics in training, and outputs in evaluation with
  statistics that differ per edge, up to float32 rounding."""
  rng = np.random.default_rng(21)
  weights = jax.nn.softmax(jnp.asarray(rng.normal(size=(14, NUM_OPS)), jnp.float32), -1)
  s0, s1 = _cell_inputs(True, seed=5)
  cells = {"scan": supernet.SearchCell(C, False, True, dw_impl="scan"),
           impl: supernet.SearchCell(C, False, True, dw_impl=impl, inner_impl=inner)}
  variables = cells["scan"].init(jax.random.key(4), s0, s1, weights, train=True)
  program = str(jax.make_jaxpr(lambda v: cells[impl].apply(
      v, s0, s1, weights, train=True, mutable=["batch_stats"]))(variables))
  looped = supernet.resolve_inner_impl(inner, impl, math.prod(s1.shape[:3])) == "scan"
  assert looped == (inner == "scan" or impl == "taps" and inner == "auto")
  assert (" scan[" in program) == looped
  # Unrolled with the CPU's kernels, the cell's inputs, its input-edge sums and its 3
  # inner nodes are materialised (`F.materialized`): 5 barriers.
  materialized = not looped and not F.accelerator_kernels(impl)
  assert program.count("optimization_barrier") == (5 if materialized else 0)
  # The accelerators' cell reduces its BatchNorm statistics in one pass; the TPU's pins its
  # edges' layouts (`F.tpu_layout`) and sums its average pools as windows.
  assert ("_batch_norm_stats_bwd" in program) == F.accelerator_kernels(impl)
  assert ("layout_constraint" in program) == F.tpu_kernels(impl)
  assert ("reduce_window_sum" in program) != F.tpu_kernels(impl)
  trained = {i: compiled(cell.apply, train=True, mutable=["batch_stats"])(variables, s0, s1,
                                                                         weights)
             for i, cell in cells.items()}
  np.testing.assert_allclose(trained[impl][0], trained["scan"][0], atol=1e-4, rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4),
               trained[impl][1], trained["scan"][1])
  stats = jax.tree.map(
      lambda s: s + jnp.asarray(rng.uniform(0.1, 0.5, size=s.shape), s.dtype),
      variables["batch_stats"])
  evaluated = {i: compiled(cell.apply, train=False)(
      {"params": variables["params"], "batch_stats": stats}, s0, s1, weights)
      for i, cell in cells.items()}
  np.testing.assert_allclose(evaluated[impl], evaluated["scan"], atol=1e-4, rtol=1e-4)
  assert float(jnp.std(evaluated["scan"])) > 0.1


def test_inner_impl_auto_unrolls_with_accelerator_kernels_and_cifar_sized_taps():
  cifar, digits = F.CIFAR_MIN_PIXELS, F.CIFAR_MIN_PIXELS - 1
  assert [supernet.resolve_inner_impl("auto", dw, cifar)
          for dw in ("scan", "taps", "conv", "taps_fused")] == [
              "scan", "unroll", "unroll", "unroll"]
  assert [supernet.resolve_inner_impl("auto", dw, pixels)
          for dw in ("scan", "taps", "conv", "taps_fused") for pixels in (digits, None)] == [
              "scan", "scan", "scan", "scan", "unroll", "unroll", "unroll", "unroll"]
  for inner in ("scan", "unroll"):
    assert {supernet.resolve_inner_impl(inner, dw, pixels)
            for dw in ("scan", "taps", "conv") for pixels in (digits, cifar)} == {inner}
  model = supernet.SearchNetwork(num_classes=10, channels=4, layers=3, inner_impl="loop")
  with pytest.raises(ValueError, match="Unknown inner_impl 'loop'"):
    model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((2, 14, NUM_OPS)),
               train=False)


def test_the_network_picks_one_depthwise_implementation_from_its_input_batch():
  """'auto' on a CPU, for every cell, though later cells see fewer pixels: 'taps' from
  `TAPS_MIN_PIXELS` input pixels on, with the inner nodes in a loop, and unrolled from
  `CIFAR_MIN_PIXELS` on; 'scan' and the loop below."""
  model = supernet.SearchNetwork(num_classes=10, channels=4, layers=3)
  arch = jnp.full((2, 14, NUM_OPS), 1.0 / NUM_OPS)
  seen = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, supernet.SearchCell) and context.method_name == "__call__":
      seen.append((context.module.dw_impl, context.module.inner_impl))
    return next_fun(*args, **kwargs)

  cases = ((F.CIFAR_MIN_PIXELS // 64, ("taps", "unroll")),
           (F.TAPS_MIN_PIXELS // 64, ("taps", "scan")),
           (F.TAPS_MIN_PIXELS // 64 - 1, ("scan", "scan")))
  for batch, want in cases:
    images = jnp.zeros((batch, 8, 8, 1))
    variables = model.init(jax.random.key(0), images[:1], arch, train=True)
    seen.clear()
    with nn.intercept_methods(record):
      jax.eval_shape(lambda v, x: model.apply(v, x, arch, train=False), variables, images)
    want = want if jax.default_backend() == "cpu" else ("conv", "unroll")
    assert seen == [want] * 3, (batch, seen)


@pytest.mark.parametrize("stride", [1, 2])
def test_tpu_layout_pins_the_stride_1_edges_only(stride):
  """With the TPU's depthwise convolutions, a group of edges pins its input and output
  layouts (`F.tpu_layout`: here the batch minor, 128 rows against 8 columns and 4
  channels) at stride 1, and pins nothing at stride 2, where XLA's TPU compiler failed a
  check compiling NA-DARTS's vmapped neighbors with the reduction cells' edges pinned."""
  edges = supernet.MixedEdges(4, 4, stride, "conv_each", sources=(0, 1) * 2)
  xs = jnp.zeros((2, 128, 8, 8, 4))
  weights = jnp.full((4, NUM_OPS), 1 / NUM_OPS)
  variables = edges.init(jax.random.key(0), xs, weights, True)
  jaxpr = jax.make_jaxpr(lambda v: edges.apply(v, xs, weights, True,
                                               mutable=["batch_stats"]))(variables)
  assert layout_constraints(jaxpr.jaxpr) == ([(0, 2, 3, 4, 1)] * 2 if stride == 1 else [])
