"""Test helper: walk a jaxpr with the programs it calls (scans, custom gradients, nested
jits), to check what a traced program computes in which dtype."""

from typing import Iterator

from jax.extend import core as jax_core


def all_eqns(jaxpr) -> Iterator[jax_core.JaxprEqn]:
  """Every equation of ``jaxpr`` and, depth first, of the jaxprs in its equations'
  parameters."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, jax_core.ClosedJaxpr):
          yield from all_eqns(sub.jaxpr)
        elif isinstance(sub, jax_core.Jaxpr):
          yield from all_eqns(sub)


def layout_constraints(jaxpr) -> list[tuple[int, ...]]:
  """The major-to-minor orders of ``jaxpr``'s layout constraints (``with_layout_constraint``),
  in trace order."""
  return [e.params["layout"].major_to_minor for e in all_eqns(jaxpr)
          if e.primitive.name == "layout_constraint"]
