"""Tests of the search run's guards and helpers (the run itself: test_main.py)."""

import os

import jax
import jax.numpy as jnp
import pytest

from configs import na_rs_quickstart, quickstart, rs_quickstart
from nanas_jax import experiment
from nanas_jax.search.bilevel import BilevelSearch
from nanas_jax.search.weight_sharing import WeightSharingTrainer


@pytest.mark.parametrize("field,value,message", [
    ("model.space", "nasnet", "nasnet"),
    ("model.layers", 2, "config.model.layers"),
    ("model.channels", 0, "config.model.channels"),
    ("data.batch_size", 30, "divisible"),
    ("search.neighbors.num", 0, "config.search.neighbors.num"),
    # Caught before the warm-up epochs, not at the first architecture step after them.
    ("search.neighbors.radius", 17, r"^config\.search\.neighbors\.radius = 17 is invalid: a "
     "darts architecture's neighbors are at most 16 edges away"),
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


# A program whose output (4 TiB) XLA cannot allocate: XLA's own out-of-memory error.
too_big = jax.jit(lambda x: jnp.broadcast_to(x, (2**40,)))


def test_a_step_out_of_memory_names_the_config_changes_that_shrink_it(tmp_path, monkeypatch):
  """XLA's own out-of-memory error (an output of 4 TiB) in the first search step becomes a
  MemoryError that names this config's options: NA-DARTS's vmapped neighbors one at a
  time, bfloat16, the batch."""
  monkeypatch.setattr(BilevelSearch, "jit_step",
                      lambda self: lambda state, *batches: too_big(1.0))
  config = quickstart.get_config()
  config.search.neighbors.evaluate = "vmap"
  batch = config.data.batch_size
  with pytest.raises(MemoryError) as raised:
    experiment.run_search(config, str(tmp_path / "w"))
  assert str(raised.value).endswith(
      "No checkpoint had been written yet. To fit, try config.search.neighbors.chunk=1 (the "
      f"neighborhood's {config.search.neighbors.num} gradients one after another rather "
      f"than {config.search.neighbors.num} at a time: the same search); "
      "config.search.dtype='bfloat16' (activations in bfloat16; parameters, alpha and "
      "BatchNorm statistics stay float32); or a smaller config.data.batch_size (now "
      f"{batch}, {batch} per device over 1 device), or more devices, over which the batch "
      "is split.")
  assert str(raised.value).startswith("out of device memory in step 1: JaxRuntimeError: "
                                      "RESOURCE_EXHAUSTED")
  assert not (tmp_path / "w" / "checkpoints").exists() or not os.listdir(
      tmp_path / "w" / "checkpoints")


def test_weight_sharing_out_of_memory_names_its_options(tmp_path, monkeypatch):
  """Random search's supernet training: bfloat16 and the batch (no neighbors to chunk)."""
  monkeypatch.setattr(WeightSharingTrainer, "step", lambda self, *args, **kwargs: too_big(1.0))
  config = rs_quickstart.get_config()
  with pytest.raises(MemoryError, match=(
      r"^out of device memory in step 1: .* To fit, try config\.search\.dtype='bfloat16' "
      r"\(activations in bfloat16; parameters, alpha and BatchNorm statistics stay "
      r"float32\); or a smaller config\.data\.batch_size \(now "
      rf"{config.data.batch_size}, ")):
    experiment.run(config, str(tmp_path / "w"))


def test_the_epoch_line_shows_the_neighbor_spread_for_na_darts_only():
  means = {"mean_train_loss": 0.2954, "mean_arch_loss": 0.36514, "mean_neighbor_loss_std": 0.0}
  assert experiment.architecture_summary("darts", means) == "arch loss 0.3651"
  means["mean_neighbor_loss_std"] = 0.01749
  assert experiment.architecture_summary("na_darts", means) == (
      "arch loss 0.3651  neighbor spread 0.0175")
  assert experiment.architecture_summary("na_darts", {"mean_train_loss": 1.6}) == (
      "weight-only warm-up")


@pytest.mark.parametrize("radius,num_neighbors,message", [
    (17, 8, r"^config\.search\.rs\.radius = 17 is invalid: a darts architecture's neighbors "
     r"are at most 16 edges away"),
    # 16 x 6 = 96 neighbors at distance 1 (the closed form; test_neighborhood.py).
    (1, 97, r"^config\.search\.rs\.num_neighbors = 97 is invalid: a darts architecture has "
     r"96 neighbors within radius 1; lower it, or raise config\.search\.rs\.radius\.$"),
    # 96 + C(16, 2) 6^2 + C(16, 3) 6^3 = 125,376.
    (3, None, r"^config\.search\.rs\.num_neighbors = None enumerates each candidate's "
     r"125,376 neighbors within radius 3, more than the 5,000 NA-RS enumerates"),
])
def test_na_rs_neighborhoods_are_checked_before_the_supernet_trains(tmp_path, radius,
                                                                    num_neighbors, message):
  config = na_rs_quickstart.get_config()
  config.search.rs.radius = radius
  config.search.rs.num_neighbors = num_neighbors
  with pytest.raises(ValueError, match=message):
    experiment.run(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_na_rs_accepts_the_whole_neighborhood_where_it_is_small_enough():
  """4,416 neighbors within radius 2 (under the 5,000 NA-RS enumerates); NAS-Bench-201's
  1,544 within radius 3 (24 + 15 x 16 + 20 x 64)."""
  config = na_rs_quickstart.get_config()
  config.search.rs.radius, config.search.rs.num_neighbors = 2, None
  experiment.validate_config(config)
  config.model.space, config.model.layers, config.search.rs.radius = "nb201", 1, 3
  experiment.validate_config(config)


def test_more_random_search_candidates_than_nb201_has_fail_before_the_supernet_trains(tmp_path):
  """15,625 = 5^6 cells (NAS-Bench-201's published count)."""
  config = rs_quickstart.get_config()
  config.model.space, config.model.layers, config.search.rs.num_candidates = "nb201", 1, 15626
  with pytest.raises(ValueError, match=r"^config\.search\.rs\.num_candidates = 15626 is "
                     r"invalid: the nb201 space has 15,625 architectures; use at most 15,625\.$"):
    experiment.run(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()
  config.search.rs.num_candidates = 15625
  experiment.validate_config(config)
