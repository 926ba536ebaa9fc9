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


def test_a_missing_dataset_fails_before_anything_is_written(tmp_path):
  config = quickstart.get_config()
  config.data.name = "cifar10"
  config.data.data_dir = str(tmp_path / "no_data")
  with pytest.raises(FileNotFoundError, match="tfds build cifar10"):
    experiment.run(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_random_search_on_a_config_without_its_block_names_the_config_to_use(tmp_path):
  config = quickstart.get_config()
  config.search.algorithm = "rs"
  with pytest.raises(ValueError, match=r"needs the candidate scoring block "
                     r"config\.search\.rs.*--config=configs/rs_quickstart\.py"):
    experiment.run(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()
