"""Tests of tests/conftest.py's choice of XLA flags: only flags that this jaxlib's XLA
accepts reach ``XLA_FLAGS``, since XLA ends a process at its first computation when
``XLA_FLAGS`` names one it does not know (jaxlib 0.11 removed one of the suite's two)."""

import os
import subprocess
import sys

import conftest

KNOWN = "--xla_backend_optimization_level"
UNKNOWN = "--xla_nanas_jax_no_such_flag"


def _computes_with(flags: str) -> bool:
  """Whether a child process with ``XLA_FLAGS=flags`` computes something (XLA's own
  verdict on the flags, the oracle here)."""
  child = subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; jnp.ones(2).sum()"],
                         env=dict(os.environ, XLA_FLAGS=flags), capture_output=True,
                         text=True, check=False)
  return child.returncode == 0


def test_an_unknown_flag_is_dropped_and_a_known_one_kept():
  assert _computes_with(f"{KNOWN}=0")
  assert not _computes_with(f"{UNKNOWN}=1")
  assert conftest._known_to_xla({UNKNOWN: "1", KNOWN: "0"}) == {KNOWN: "0"}


def test_the_session_flags_are_all_accepted_and_keep_the_optimisation_level():
  flags = os.environ["XLA_FLAGS"]
  assert KNOWN in {flag.split("=", 1)[0] for flag in flags.split()}
  assert _computes_with(flags)
