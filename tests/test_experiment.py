"""Tests of the search run's guards and helpers (the run itself: test_main.py)."""

import os

import pytest

from configs import quickstart
from nanas_jax import experiment


@pytest.mark.parametrize("field,value,message", [
    ("model.space", "nasnet", "nasnet"),
    ("model.layers", 2, "config.model.layers"),
    ("model.channels", 0, "config.model.channels"),
    ("data.batch_size", 30, "divisible"),
    ("search.neighbors.num", 0, "config.search.neighbors.num"),
])
def test_bad_config_fails_before_any_work(tmp_path, field, value, message):
  config = quickstart.get_config()
  config.search.neighbors.batch = "split"
  *path, leaf = field.split(".")
  node = config
  for part in path:
    node = node[part]
  node[leaf] = value
  with pytest.raises(ValueError, match=message):
    experiment.run_search(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_write_atomic_replaces_whole_file(tmp_path):
  path = tmp_path / "f.txt"
  experiment.write_atomic(str(path), "one")
  experiment.write_atomic(str(path), "two")
  assert path.read_text() == "two"
  assert os.listdir(tmp_path) == ["f.txt"]
