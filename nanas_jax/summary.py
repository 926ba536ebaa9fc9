"""Parameters and multiply-adds of a genotype's network: a library function and a CLI.

    python -m nanas_jax.summary --genotype=DARTS_V2 --network=imagenet [--json]
    python -m nanas_jax.summary --genotype="Genotype(normal=[...], ...)" --network=cifar10 \\
        --layers=8 --channels=16

``summarize(genotype, network)`` builds the DARTS evaluation network (CIFAR: 20 cells,
C=36, 32x32x3 input; ImageNet mobile setting: 14 cells, C=48, 224x224x3 input) with its
auxiliary head, from shapes alone (``jax.eval_shape`` / ``jax.make_jaxpr``: nothing is
compiled or allocated; a full-size network takes one to a few seconds on a CPU, the time
of tracing it twice, once to initialise and once to count).

Parameters are counted as the DARTS papers count them: the auxiliary head is built but
left out (``params``; ``params_with_auxiliary`` has it), BatchNorm running statistics are
not parameters.

Multiply-adds are counted per image in evaluation mode, where the auxiliary head does not
run, under two conventions:

- ``mult_adds`` (the default, the MobileNet / NASNet convention): one multiply-accumulate
  per weight use of every convolution, ``k_h * k_w * (C_in / groups) * C_out * H_out *
  W_out``, and dense layer, ``in * out``; BatchNorm, ReLU, pooling and additions are free
  (biases too: these networks have none in their convolutions).
- ``mult_adds_ptflops``: ``mult_adds`` plus what the 2019 flops-counter.pytorch (ptflops)
  counter added (later versions changed some rules): 2 per BatchNorm input element (1
  without scale and bias), 1 per ReLU output element, 1 per pooling input element (the
  3x3 pooling ops and the global average pool).

Which published figures these reproduce (per image, at 224x224):

- PC-DARTS (Xu et al. 2020, ImageNet table): PC-DARTS (CIFAR10) 586M, PC-DARTS (ImageNet)
  597M; P-DARTS (Chen et al. 2019): 557M. All three equal ``mult_adds_ptflops`` rounded to
  the millions (586.36M, 597.21M, 557.38M); ``mult_adds`` is about 15M lower
  (571.1M, 581.6M, 542.8M), so these figures were evidently counted the ptflops way.
- DARTS (Liu et al. 2019, Table 3): 574M for DARTS (second order). Neither convention
  gives it: ``mult_adds`` = 529.9M, ``mult_adds_ptflops`` = 544.59M. The DARTS authors
  never published their counter; quark0/darts issue #46 reports the same gap (523M with
  a conv + fc counter, 544.59M with ptflops, equal to ours). The parameter counts (4.7M
  DARTS, 5.3M PC-DARTS, 4.9M P-DARTS) all agree.

Limits, checked before anything is built (a huge genotype would trace without end): a
genotype's text is at most ``MAX_GENOTYPE_CHARS`` characters and its cells at most
``MAX_NODES`` nodes (the published genotypes have 4 or 5); ``layers`` is at least
``MIN_LAYERS`` (the auxiliary head needs two reduction cells before it); a NAS-Bench-201
string is refused with what it is (its networks are not the DARTS evaluation networks
counted here). The command line exits with status 2 and one message on bad input
(`nanas_jax.cli`).

Counting is done on the traced network: flax's ``intercept_methods`` sees every
``nn.Conv``, ``nn.Dense``, ``ops.BatchNorm`` and pooling-op call with its input and output
shapes; ReLUs (``jax.nn.relu``) and the global average pool (a ``jnp.mean`` over the
spatial axes) are plain functions, found in the traced jaxpr instead.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from absl import app
from absl import flags
import flax.linen as nn
import jax
from jax.extend import core as jax_core
import jax.numpy as jnp

from nanas_jax import cli
from nanas_jax.nn import networks
from nanas_jax.nn import ops
from nanas_jax.spaces import darts
from nanas_jax.spaces import genotypes


@dataclasses.dataclass(frozen=True)
class NetworkSetting:
  """The reference evaluation setting of a dataset: network, size and input."""
  network_class: type[nn.Module]
  layers: int
  channels: int
  num_classes: int
  input_shape: tuple[int, int, int]  # H, W, C of one image.


NETWORKS = {
    'cifar10': NetworkSetting(networks.NetworkCIFAR, 20, 36, 10, (32, 32, 3)),
    'cifar100': NetworkSetting(networks.NetworkCIFAR, 20, 36, 100, (32, 32, 3)),
    'imagenet': NetworkSetting(networks.NetworkImageNet, 14, 48, 1000, (224, 224, 3)),
}

# The kinds of work counted; only the first two enter ``mult_adds``.
COUNTED_KINDS = ('conv', 'dense', 'batch_norm', 'relu', 'pool')
# Bounds on what is built (see the module docstring): an 8-node genotype's text is about
# 1,000 characters.
MAX_GENOTYPE_CHARS = 10_000
MAX_NODES = 8
MIN_LAYERS = 2


def _setting(network: str) -> NetworkSetting:
  if network not in NETWORKS:
    raise ValueError(
        f'unknown network {network!r}; choose one of {sorted(NETWORKS)}.')
  return NETWORKS[network]


def _positive(name: str, value: int | None, default: int) -> int:
  if value is None:
    return default
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f'{name} must be a positive integer or None (default {default}), '
                     f'got {value!r}.')
  return value


def _checked_genotype(genotype: darts.Genotype | str) -> darts.Genotype:
  """``genotype`` as a Genotype within the limits (see the module docstring)."""
  if isinstance(genotype, str):
    if len(genotype) > MAX_GENOTYPE_CHARS:
      raise ValueError(f'the genotype text has {len(genotype):,} characters, more than the '
                       f'{MAX_GENOTYPE_CHARS:,} of any DARTS genotype of at most {MAX_NODES} '
                       f'nodes: {cli.clip(genotype, 80)!r}. Pass a name (DARTS_V2, ...) or '
                       'one Genotype(...).')
    if '|' in genotype and '~' in genotype and '(' not in genotype:
      raise ValueError(f'{cli.clip(genotype, 80)!r} is a NAS-Bench-201 cell; summary counts '
                       'the DARTS evaluation networks (cifar10, cifar100, imagenet) of DARTS '
                       'genotypes: pass a name (DARTS_V2, ...) or Genotype(...) text.')
  genotype = genotypes.get_genotype(genotype)
  nodes = max(genotype.num_nodes('normal'), genotype.num_nodes('reduce'))
  if nodes > MAX_NODES:
    raise ValueError(f'the genotype has cells of {nodes} nodes; summary builds at most '
                     f'{MAX_NODES} (published genotypes have 4 or 5).')
  return genotype


def build_network(genotype: darts.Genotype | str, network: str, layers: int | None = None,
                  channels: int | None = None) -> tuple[nn.Module, tuple[int, int, int]]:
  """The evaluation network of ``genotype`` (a Genotype, a published name or its text)
  for ``network`` ('cifar10', 'cifar100', 'imagenet'), with its auxiliary head, and the
  input shape (H, W, C) of one image. ``layers`` / ``channels`` override the setting."""
  setting = _setting(network)
  layers = _positive('layers', layers, setting.layers)
  if layers < MIN_LAYERS:
    raise ValueError(f'layers = {layers} is too few: the {network} network needs at least '
                     f'{MIN_LAYERS} cells (--layers={MIN_LAYERS} or more), for its auxiliary '
                     'head.')
  channels = _positive('channels', channels, setting.channels)
  model = setting.network_class(_checked_genotype(genotype), C=channels,
                                num_classes=setting.num_classes, layers=layers,
                                auxiliary=True)
  return model, setting.input_shape


def _numel(shape) -> int:
  return math.prod(int(d) for d in shape)


def _module_costs(module: nn.Module, x: Any, y: Any) -> tuple[str, int] | None:
  """(kind, count) of one flax module call ``y = module(x, ...)``, None for modules that
  are not counted themselves (their submodules are)."""
  if isinstance(module, nn.Conv):
    kernel = _numel(module.kernel_size) * x.shape[-1] // module.feature_group_count
    return 'conv', kernel * _numel(y.shape)
  if isinstance(module, ops.TapsDepthwiseConv):  # The depthwise nn.Conv it replaces.
    return 'conv', module.kernel_size**2 * _numel(y.shape)
  if isinstance(module, nn.Dense):
    return 'dense', x.shape[-1] * _numel(y.shape)
  if isinstance(module, ops.BatchNorm):
    return 'batch_norm', _numel(x.shape) * (2 if module.affine else 1)
  if isinstance(module, (ops.MaxPool3x3, ops.AvgPool3x3)):
    return 'pool', _numel(x.shape)
  return None


def _subjaxprs(eqn):
  """The jaxprs nested in an equation's parameters (jit bodies, custom_jvp calls...)."""
  for value in eqn.params.values():
    for item in value if isinstance(value, (list, tuple)) else (value,):
      if isinstance(item, jax_core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax_core.Jaxpr):
        yield item


def _function_costs(jaxpr, counts: dict[str, int]) -> None:
  """Adds the ReLUs and spatial means of ``jaxpr`` (recursively) to ``counts``."""
  for eqn in jaxpr.eqns:
    # jax.nn.relu is a jitted function named 'relu'; its body is not looked into.
    if eqn.params.get('name') == 'relu':
      counts['relu'] += _numel(eqn.outvars[0].aval.shape)
      continue
    # The global average pool: a sum over the two spatial axes of an NHWC map.
    if (eqn.primitive.name == 'reduce_sum' and eqn.invars[0].aval.ndim == 4
        and tuple(eqn.params['axes']) == (1, 2)):
      counts['pool'] += _numel(eqn.invars[0].aval.shape)
      continue
    for sub in _subjaxprs(eqn):
      _function_costs(sub, counts)


def count_mult_adds(model: nn.Module, variables: Any,
                    input_shape: tuple[int, ...]) -> dict[str, int]:
  """Per-kind counts (``COUNTED_KINDS``) of one evaluation-mode forward pass of a single
  image of shape ``input_shape`` (H, W, C); ``variables`` may hold shapes only."""
  counts = dict.fromkeys(COUNTED_KINDS, 0)

  def record(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    if context.method_name == '__call__':
      cost = _module_costs(context.module, args[0] if args else None, y)
      if cost:
        counts[cost[0]] += cost[1]
    return y

  def forward(variables, x):
    with nn.intercept_methods(record):
      return model.apply(variables, x, train=False)

  x = jax.ShapeDtypeStruct((1,) + tuple(input_shape), jnp.float32)
  closed = jax.make_jaxpr(forward)(variables, x)
  _function_costs(closed.jaxpr, counts)
  return counts


def summarize(genotype: darts.Genotype | str, network: str, layers: int | None = None,
              channels: int | None = None) -> dict[str, Any]:
  """Parameters and per-image multiply-adds of ``genotype``'s network (see the module
  docstring for the counting conventions). JSON-serialisable."""
  model, input_shape = build_network(genotype, network, layers, channels)
  x = jax.ShapeDtypeStruct((1,) + input_shape, jnp.float32)
  # Initialising in evaluation mode still builds the auxiliary head.
  variables = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False), x)
  counts = count_mult_adds(model, variables, input_shape)
  return {
      'genotype': str(model.genotype),
      'network': network,
      'layers': model.layers,
      'channels': model.C,
      'num_classes': model.num_classes,
      'input_shape': list(input_shape),
      'params': networks.count_params(variables['params']),
      'params_with_auxiliary': networks.count_params(
          variables['params'], exclude_auxiliary=False),
      'mult_adds': counts['conv'] + counts['dense'],
      'mult_adds_ptflops': sum(counts.values()),
      'mult_adds_by_kind': counts,
  }


def format_summary(summary: dict[str, Any]) -> str:
  """A few human-readable lines for ``summarize``'s result."""
  h, w, c = summary['input_shape']
  return '\n'.join([
      f"genotype   {summary['genotype']}",
      f"network    {summary['network']}: {summary['layers']} cells, "
      f"C={summary['channels']}, {summary['num_classes']} classes, input {h}x{w}x{c}",
      f"params     {summary['params']:,} ({summary['params'] / 1e6:.2f}M; "
      f"{summary['params_with_auxiliary']:,} with the auxiliary head)",
      f"mult-adds  {summary['mult_adds']:,} ({summary['mult_adds'] / 1e6:.1f}M: "
      'convolutions and dense layers)',
      f"           {summary['mult_adds_ptflops']:,} "
      f"({summary['mult_adds_ptflops'] / 1e6:.2f}M: + BatchNorm, ReLU, pooling, as the "
      'ptflops counter of the PC-DARTS / P-DARTS figures)',
  ])


# ---------------------------------------------------------------------------------- CLI
def define_flags(flag_values: flags.FlagValues) -> flags.FlagValues:
  """Defines the command-line flags on ``flag_values`` and returns it.

  Only the program defines them (on ``flags.FLAGS``), so importing this module for
  ``summarize`` adds no flags to another program; tests pass a fresh ``FlagValues``.
  """
  flags.DEFINE_string(
      'genotype', None,
      'A published genotype name (DARTS_V2, PC_DARTS, ...) or Genotype(...) text.',
      flag_values=flag_values)
  flags.DEFINE_enum('network', 'cifar10', sorted(NETWORKS), 'Which evaluation network.',
                    flag_values=flag_values)
  flags.DEFINE_integer('layers', None,
                       f'Number of cells, at least {MIN_LAYERS} (default: 20 CIFAR, 14 '
                       'ImageNet).', lower_bound=1, flag_values=flag_values)
  flags.DEFINE_integer('channels', None,
                       'Initial channels C (default: 36 CIFAR, 48 ImageNet).',
                       lower_bound=1, flag_values=flag_values)
  flags.DEFINE_bool('json', False, 'Print one JSON object instead of text.',
                    flag_values=flag_values)
  return flag_values


def run(flag_values: flags.FlagValues) -> str:
  """The program's output for parsed ``flag_values``; ``app.UsageError`` on bad input."""
  if not flag_values.genotype:
    raise app.UsageError(
        '--genotype is required: a published name (e.g. DARTS_V2) or Genotype(...) text.')
  try:
    summary = summarize(flag_values.genotype, flag_values.network, flag_values.layers,
                        flag_values.channels)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  return json.dumps(summary) if flag_values.json else format_summary(summary)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {cli.clip(" ".join(argv[1:]))}: every '
                         'setting is a flag (--helpshort lists them).')
  print(run(flags.FLAGS))


if __name__ == '__main__':
  define_flags(flags.FLAGS)
  cli.run(main)
