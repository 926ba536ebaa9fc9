"""Test support: the weights of a search supernet laid out as a discrete network's.

With one-hot architecture weights the search supernet computes the discrete network of
the genotype they encode, once the supernet's parameters of the kept edges are copied into
the discrete network (layout: the ``nanas_jax.nn.supernet`` docstring) and the discrete
network's affine BatchNorms are made affine-free (scale 1, bias 0). The one difference is
the reference's: the search MixedOp follows each pool by an affine-free BatchNorm, which
the discrete cell has not (`pool_batch_norm` inserts it in training mode).
"""

import jax
import jax.numpy as jnp

from nanas_jax.nn import nb201_supernet as ns
from nanas_jax.nn import ops
from nanas_jax.spaces import NB201Arch

EPS = 1e-5


def _bn(c):
  """Affine BN parameters of a discrete op that make it the supernet's affine-free BN."""
  return {"scale": jnp.ones((c,)), "bias": jnp.zeros((c,))}


def _conv1x1(kernel):
  return {"kernel": kernel[None, None]}  # [Cin, Cout] -> HWIO


def _depthwise(kernel):
  return {"kernel": kernel[:, :, None, :]}  # [k, k, C] -> (k, k, 1, C)


def _preprocess(p):
  if "conv" in p:  # ReLUConvBN 1x1
    return {"conv": _conv1x1(p["conv"]), "bn": _bn(p["conv"].shape[1])}
  c = p["fr_a"].shape[1] + p["fr_b"].shape[1]
  return {"conv_1": _conv1x1(p["fr_a"]), "conv_2": _conv1x1(p["fr_b"]), "bn": _bn(c)}


def edge_location(search_params, node, source):
  """(group, index) of the supernet edge from state ``source`` into node ``node``.

  Group ``inputs``: index ``2 * node + source`` for the cell inputs. Edges between
  intermediate nodes: group ``node{i}`` index ``source - 2`` (one group per node) or, with
  all of them in one group ``inner``, the node-major index of the pair (node, source - 2):
  (1,0), (2,0), (2,1), (3,0), (3,1), (3,2)."""
  if source < 2:
    return "inputs", 2 * node + source
  if "inner" in search_params:
    return "inner", node * (node - 1) // 2 + source - 2
  return f"node{node}", source - 2


def discrete_cell_params(search_params, pairs, reduction):
  """The discrete cell's parameters holding the supernet cell's weights of the kept edges."""
  out = {"preprocess0": _preprocess(search_params["preprocess0"]),
         "preprocess1": _preprocess(search_params["preprocess1"])}
  for position, (op, source) in enumerate(pairs):
    group, edge = edge_location(search_params, position // 2, source)
    p = jax.tree.map(lambda a, e=edge: a[e], search_params[group])
    c = p["pw1"].shape[-1]
    if op in ("sep_conv_3x3", "sep_conv_5x5"):
      k = 0 if op == "sep_conv_3x3" else 1
      out[f"ops_{position}"] = {
          "depthwise1": _depthwise(p[f"dw1_{k}"]), "pointwise1": _conv1x1(p["pw1"][k]),
          "bn1": _bn(c),
          "depthwise2": _depthwise(p[f"dw2_{k}"]), "pointwise2": _conv1x1(p["pw2"][k]),
          "bn2": _bn(c)}
    elif op in ("dil_conv_3x3", "dil_conv_5x5"):
      k = 2 if op == "dil_conv_3x3" else 3
      out[f"ops_{position}"] = {"depthwise": _depthwise(p[f"dw1_{k}"]),
                                "pointwise": _conv1x1(p["pw1"][k]), "bn": _bn(c)}
    elif op == "skip_connect" and reduction and source < 2:
      out[f"ops_{position}"] = {"conv_1": _conv1x1(p["fr_a"]),
                                "conv_2": _conv1x1(p["fr_b"]), "bn": _bn(c)}
  return out


def discrete_network_params(search_params, genotype, layers):
  """``networks.NetworkCIFAR(genotype, layers=layers, auxiliary=False)``'s parameters
  holding a ``supernet.SearchNetwork``'s weights of the genotype's edges."""
  reductions = (layers // 3, 2 * layers // 3)
  out = {"stem_conv": search_params["stem_conv"], "stem_bn": search_params["stem_bn"],
         "classifier": search_params["classifier"]}
  for i in range(layers):
    reduction = i in reductions
    pairs = genotype.reduce if reduction else genotype.normal
    out[f"cells_{i}"] = discrete_cell_params(search_params[f"cell{i}"], pairs, reduction)
  return out


def pool_batch_norm(next_fun, args, kwargs, context):
  """The reference search MixedOp appends BatchNorm2d(C, affine=False) to each pool
  (model_search.py: ``if 'pool' in primitive``), which the discrete cell has not: add it
  (batch statistics, train mode) to the discrete cell's pools (a method interceptor for
  ``flax.linen.intercept_methods``)."""
  y = next_fun(*args, **kwargs)
  if (isinstance(context.module, (ops.MaxPool3x3, ops.AvgPool3x3))
      and context.method_name == "__call__"):
    mean = y.mean(axis=(0, 1, 2))
    var = jnp.square(y - mean).mean(axis=(0, 1, 2))
    y = (y - mean) / jnp.sqrt(var + EPS)
  return y


def nb201_discrete_variables(search, arch, N):
  """A ``nb201_supernet.SearchNetworkNB201``'s variables ``search`` laid out as
  ``nb201_network.TinyNetwork(arch, N=N)``'s.

  Stem, ResNet blocks, lastact and classifier have the same names and shapes. Search cell
  ``cells_{i}``: edge ``k`` (string order = the space's edge order) is row ``g`` of group
  ``inputs`` (edges from node 0) or ``inner``; when its op is a conv it becomes
  ``layers_{k}`` with ``conv/kernel`` = ``conv1x1[g]`` (as ``[1, 1, C, C]``) or
  ``conv3x3[g]``, BN scale 1, bias 0 and running statistics ``bn_mean/var[g, 0 or 1]``.
  """
  edge_ops = [op for inputs in NB201Arch.parse(arch).nodes for op, _ in inputs]
  params, stats = {}, {}
  for name in search["params"]:
    index = int(name.split("_")[1]) if name.startswith("cells_") else None
    if index is None or index in (N, 2 * N + 1):
      params[name] = search["params"][name]
      if name in search["batch_stats"]:
        stats[name] = search["batch_stats"][name]
      continue
    cell_params, cell_stats = {}, {}
    for k, op in enumerate(edge_ops):
      if op not in ("nor_conv_1x1", "nor_conv_3x3"):
        continue
      group = "inputs" if k in ns.INPUT_EDGES else "inner"
      g = (ns.INPUT_EDGES if group == "inputs" else ns.INNER_EDGES).index(k)
      p, s = search["params"][name][group], search["batch_stats"][name][group]
      which = 0 if op == "nor_conv_1x1" else 1
      kernel = p["conv1x1"][g][None, None] if which == 0 else p["conv3x3"][g]
      c = kernel.shape[-1]
      cell_params[f"layers_{k}"] = {"conv": {"kernel": kernel},
                                    "bn": {"scale": jnp.ones(c), "bias": jnp.zeros(c)}}
      cell_stats[f"layers_{k}"] = {"bn": {"mean": s["bn_mean"][g, which],
                                          "var": s["bn_var"][g, which]}}
    if cell_params:
      params[name], stats[name] = cell_params, cell_stats
  return {"params": params, "batch_stats": stats}
