"""Tests of the explanations of unknown config fields named on the command line."""

import os

import ml_collections
import pytest

from nanas_jax import config_check

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, "configs", "quickstart.py")


@pytest.fixture(scope="module")
def quickstart():
  return config_check.load_config(QUICKSTART)


def test_a_field_that_exists_needs_no_explanation(quickstart):
  for path in ("search.arch.lr", "data.name", "seed"):
    assert config_check.unknown_field(quickstart, path) is None


def test_an_unknown_field_lists_its_blocks_fields(quickstart):
  assert config_check.unknown_field(quickstart, "search.bogus") == (
      "--config.search.bogus: config.search has no field 'bogus'.\n"
      "Fields of config.search: algorithm, arch, compile, dtype, epochs, gpu_autotune, "
      "neighbors, order, recalibrate_batches, warmup_epochs, weights.")


def test_a_misspelt_field_gets_the_closest_one(quickstart):
  message = config_check.unknown_field(quickstart, "search.neighbors.nmu")
  assert message.splitlines()[0] == ("--config.search.neighbors.nmu: config.search.neighbors "
                                     "has no field 'nmu'. Did you mean "
                                     "config.search.neighbors.num?")


@pytest.mark.parametrize("path,right", [
    ("data.dataset", "data.name"),
    ("model.init_channels", "model.channels"),
    ("search.arch_learning_rate", "search.arch.lr"),
    ("model.cells", "model.layers"),
    ("half_precision", "search.dtype"),
])
def test_names_of_other_tools_point_to_the_right_field(quickstart, path, right):
  first = config_check.unknown_field(quickstart, path).splitlines()[0]
  assert first.endswith(f"That setting is config.{right} here (--config.{right}=...).")


def test_known_names_are_found_inside_a_pipelines_blocks():
  pipeline = config_check.load_config(os.path.join(REPO, "configs",
                                                   "pipeline_quickstart.py"))
  assert "config.search.data.name here" in config_check.unknown_field(
      pipeline, "search.data.dataset")
  assert "config.train.train.epochs here" in config_check.unknown_field(
      pipeline, "train.epochs")


def test_a_value_is_not_a_block(quickstart):
  assert config_check.unknown_field(quickstart, "seed.x") == (
      "--config.seed.x: config.seed is a value (int), not a block of fields; set it as "
      "--config.seed=VALUE.")


def test_long_field_names_are_clipped(quickstart):
  message = config_check.unknown_field(quickstart, "search." + "b" * 10_000)
  assert len(message) < 400


def test_explain_finds_the_first_unknown_override():
  argv = ["main", f"--config={QUICKSTART}", "--workdir=/tmp/w", "--config.seed=1",
          "--config.data.dataset=cifar10", "--config.search.bogus=2"]
  assert "config.data has no field 'dataset'" in config_check.explain_override_error(argv)
  assert config_check.explain_override_error(argv[:4]) is None
  # Without a loadable config file the original error stands.
  assert config_check.explain_override_error(["main", "--config.x=1"]) is None
  assert config_check.explain_override_error(
      ["main", "--config=/nonexistent.py", "--config.x=1"]) is None


def test_load_config_passes_the_argument():
  config = config_check.load_config(os.path.join(REPO, "configs", "darts_cifar10.py") +
                                    ":second")
  assert isinstance(config, ml_collections.ConfigDict)
  assert config.search.order == "second_fd"
