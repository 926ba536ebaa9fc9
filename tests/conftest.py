"""Shared test fixtures, and one persistent compilation cache for the whole session.

Many tests compile the same small supernet steps, in this process and in the programs
they start (a resumed search compiles what the run before it compiled). The session's
processes (pytest-xdist workers inherit the environment set here, before they start, and
so do the programs the tests run) share one JAX compilation cache in a fresh temporary
directory, removed at the end: each distinct step compiles once per session, and no
test reads anything compiled before the session. A cache hit loads the very executable
the compile would have produced, so no result changes (`nanas_jax.cli.enable_compilation_cache`).
"""

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
# The session's owner (the xdist controller, or the only process) creates the directory;
# the workers find it in their environment.
_OWNED_CACHE = None
if _CACHE_ENV not in os.environ:
  _OWNED_CACHE = os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="nanas_jax_test_xla_")
  # A size limit makes JAX lock the directory: two processes never read a half-written
  # entry.
  os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))


# Two XLA:CPU settings for the tests only; the programs the tests start inherit them, and
# `parallel.fake_cpu_devices_xla_flags` keeps them for those with several devices. Most
# tests compile far longer than they run, and neither setting changes what a program
# computes (the same HLO; LLVM's optimisation level has no fast-math), only how fast it is
# compiled and runs:
# - its loop emitters compile the tests' small supernets (3 cells, C=4) about 28 % faster
#   than its default fusion emitters (the NA-DARTS second-order step 140 s against 100 s,
#   DARTS first order at batch 32 86 s against 63 s), with the same step time; at
#   quick-start sizes and above the two compile alike (jaxlib 0.11 has no loop emitters:
#   there the flag is left out, `_known_to_xla`);
# - LLVM at optimisation level 0 compiles about half as long as at the default level 3 and
#   runs a step 2-5x slower: the whole suite took 19:05 against 29:11 with level 3 the day
#   before (`pytest -n 2`, the same 2-core AMD EPYC type). The tests whose programs run
#   many steps ask for level 3 back (`optimized_env`).
_LLVM_LEVEL = "--xla_backend_optimization_level"
_TEST_FLAGS = {"--xla_cpu_use_fusion_emitters": "false", _LLVM_LEVEL: "0"}
# Set by the session's owner once it has chosen the flags; the workers inherit both.
_CHOSEN_ENV = "NANAS_JAX_TEST_XLA_FLAGS_CHOSEN"


def _known_to_xla(flags: dict) -> dict:
  """The ``flags`` that this jaxlib's XLA accepts. XLA ends a process whose ``XLA_FLAGS``
  names a flag it does not know, and its flags change between releases (jaxlib 0.11
  removed the loop emitters and ``--xla_cpu_use_fusion_emitters`` with them), so each is
  tried first in a child process of its own, side by side."""
  children = {name: subprocess.Popen(
      [sys.executable, "-c", "import jax; jax.devices()"],
      env=dict(os.environ, XLA_FLAGS=f"{name}={value}"),
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for name, value in flags.items()}
  return {name: flags[name] for name, child in children.items() if child.wait() == 0}


def _with_flags(flags: str, wanted: dict) -> str:
  """``flags`` plus each of ``wanted``'s flags that ``flags`` does not set already."""
  names = {flag.split("=", 1)[0] for flag in flags.split()}
  return " ".join([*flags.split(), *(f"{name}={value}" for name, value in wanted.items()
                                     if name not in names)])


if _CHOSEN_ENV not in os.environ:
  os.environ[_CHOSEN_ENV] = "1"
  os.environ["XLA_FLAGS"] = _with_flags(os.environ.get("XLA_FLAGS", ""),
                                        _known_to_xla(_TEST_FLAGS))


@pytest.fixture
def optimized_env():
  """This process's environment for a program that runs many steps: the tests' settings,
  but LLVM at its default optimisation level, where a step runs 2-5x faster (the resume
  test's search, 24 steps, took 50 s with a warm cache against 70 s at level 0)."""
  flags = [flag for flag in os.environ["XLA_FLAGS"].split()
           if flag.split("=", 1)[0] != _LLVM_LEVEL]
  return dict(os.environ, XLA_FLAGS=" ".join(flags))


def pytest_unconfigure(config):
  del config
  if _OWNED_CACHE:
    shutil.rmtree(_OWNED_CACHE, ignore_errors=True)


def _set_field(config, dotted: str, value) -> None:
  """``config.a.b.c = value`` for ``dotted = 'a.b.c'``, whatever the field's type: tests
  of the config checks set values of the wrong type on purpose."""
  *parents, leaf = dotted.split(".")
  node = config
  for name in parents:
    node = node[name]
  with node.ignore_type():
    node[leaf] = value


@pytest.fixture
def set_field():
  return _set_field
