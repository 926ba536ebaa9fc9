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


# XLA:CPU's loop emitters compile the tests' small supernets (3 cells, C=4) about 28 %
# faster than its default fusion emitters (the NA-DARTS second-order step 140 s against
# 100 s, DARTS first order at batch 32 86 s against 63 s), with the same step time; at
# quick-start sizes and above the two compile alike, so this is the tests' setting, not
# the library's. The programs the tests start inherit it, and
# `parallel.fake_cpu_devices_xla_flags` keeps it for those with several devices.
_FAST_COMPILE_FLAG = "--xla_cpu_use_fusion_emitters"
_XLA_FLAGS = os.environ.get("XLA_FLAGS", "")
if _FAST_COMPILE_FLAG not in _XLA_FLAGS:
  os.environ["XLA_FLAGS"] = f"{_XLA_FLAGS} {_FAST_COMPILE_FLAG}=false".strip()


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
