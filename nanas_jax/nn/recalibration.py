"""BatchNorm recalibration: the running statistics of one architecture, estimated afresh.

The running BatchNorm statistics of a weight-sharing supernet average over whatever it was
trained with: the softmax mixture of every operation (DARTS), or a different random
architecture at every step (random search with weight sharing). For one particular
architecture (a one-hot genotype, a perturbed neighbor, or the current softmax weights
after alpha has moved) they are stale, and evaluation with them can score near chance.
The standard remedy of one-shot NAS (Guo et al., "Single Path One-Shot NAS", 2020; "precise
BatchNorm", Wu and Johnson 2021) is to re-estimate them for the architecture at hand: run
it in training mode on a few training batches and average the batch statistics.

Every BatchNorm of this package updates its running averages linearly,
``new = (1 - m) * old + m * batch`` (`functional.batch_norm`, ``m = BN_MOMENTUM``).
Started from zero statistics, one training-mode pass therefore returns ``m`` times that
batch's statistics (mean and unbiased variance) for every BatchNorm of the network at
once, whatever the network; the recalibrated statistics are the mean of those passes
divided by ``m``. Deeper layers see the earlier layers normalised by each batch's own
statistics, exactly as in training.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import jax
import optax

from nanas_jax.nn.functional import BN_MOMENTUM

def _divide(tree, divisor):
  return jax.tree.map(lambda t: t / divisor, tree)


@functools.lru_cache(maxsize=None)
def _tree_programs(compiler_options: tuple[tuple[str, Any], ...]):
  """``(zeros_like, add, divide)`` over trees, jitted with XLA's ``compiler_options``
  (pairs), once a process for each. They run as one program each: run eagerly, every leaf
  would be a dispatch of its own and every distinct leaf shape a program compiled on first
  use (1.9 s of the quick start's first recalibration, 2.25 s in all; 0.87 s as programs)."""
  options = dict(compiler_options) or None
  return tuple(jax.jit(fn, compiler_options=options)
               for fn in (optax.tree.zeros_like, optax.tree.add, _divide))


def average_batch_statistics(update: Callable[..., Any], batch_stats: Any,
                             batches: Iterable[tuple[Any, ...]],
                             compiler_options: tuple[tuple[str, Any], ...] = ()) -> Any:
  """BatchNorm statistics re-estimated as the mean over ``batches`` of the batch statistics.

  Args:
    update: ``(batch_stats, *batch) -> new batch_stats``: one training-mode pass of the
      network (typically jitted) that returns its updated running statistics. It may map
      over architectures (a leading axis on the returned leaves).
    batch_stats: the network's statistics tree (only its structure and shapes are used).
    batches: the calibration batches, each the trailing arguments of ``update``.
    compiler_options: XLA's options (pairs) for the sums' programs, as the caller's
      (`nanas_jax.search.bilevel.xla_compiler_options`).

  Returns:
    The statistics tree: per BatchNorm, the mean over the batches of the batch mean and of
    the unbiased batch variance.
  """
  zeros_like, add, divide = _tree_programs(tuple(compiler_options))
  zeros = zeros_like(batch_stats)
  total, count = None, 0
  for batch in batches:
    new = update(zeros, *batch)
    total = new if total is None else add(total, new)
    count += 1
  if total is None:
    raise ValueError("BatchNorm recalibration needs at least one batch.")
  return divide(total, count * BN_MOMENTUM)
