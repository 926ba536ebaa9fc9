"""Tests of the search run's guards and helpers (the run itself: test_main.py)."""


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
def test_bad_config_fails_before_any_work(tmp_path, set_field, field, value, message):
  config = quickstart.get_config()
  config.search.neighbors.batch = "split"
  set_field(config, field, value)
  with pytest.raises(ValueError, match=message):
    experiment.run_search(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()
