"""Shared test fixtures."""

import pytest


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
