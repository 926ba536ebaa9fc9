"""Every experiment config loads, documents its launch command and cost, and (for
searches) passes the checks that run before any data is read or anything compiled."""

import glob
import importlib
import os

import pytest

from nanas_jax import experiment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
                 if not p.endswith("__init__.py"))
ORDERED = ["darts_cifar10", "na_darts_cifar10", "darts_cifar100", "na_darts_cifar100"]


@pytest.mark.parametrize("name", CONFIGS)
def test_config_documents_launch_and_cost(name):
  module = importlib.import_module(f"configs.{name}")
  doc = module.__doc__ or ""
  assert f"--config=configs/{name}.py" in doc, "the docstring holds the launch command"
  assert "Cost" in doc or "cost" in doc
  module.get_config()


@pytest.mark.parametrize("name", [n for n in CONFIGS
                                  if importlib.import_module(f"configs.{n}").get_config()
                                  .get("task", "search") == "search"])
def test_search_configs_pass_validation(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  if config.search.get("rs") and config.search.rs.evaluator == "table":
    config.search.rs.table_path = "table.json"
  experiment.validate_config(config)


@pytest.mark.parametrize("name", ORDERED)
@pytest.mark.parametrize("arg,order", [(None, "first"), ("first", "first"),
                                       ("second", "second_fd"),
                                       ("second_exact", "second_exact")])
def test_cifar_search_configs_pick_the_order(name, arg, order):
  config = importlib.import_module(f"configs.{name}").get_config(arg)
  assert config.search.order == order
  assert config.search.algorithm == ("na_darts" if name.startswith("na_") else "darts")
  assert config.data.name == name.split("_")[-1]
  # The reference search: 8 cells, C=16, batch 64, 50 epochs, alpha lr 3e-4 constant from
  # the first step, every training example.
  assert (config.model.layers, config.model.channels, config.data.batch_size,
          config.search.epochs, config.search.arch.lr) == (8, 16, 64, 50, 3e-4)
  assert (config.search.warmup_epochs, config.search.arch.schedule,
          config.search.arch.weight_decay, config.data.max_examples) == (0, "constant", 1e-3,
                                                                         None)


def test_unknown_order_names_the_choices():
  from configs import darts_cifar10  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="second_exact"):
    darts_cifar10.get_config("third")


@pytest.mark.parametrize("field,value,message", [
    ("search.neighbors.num", -1, "config.search.neighbors.num"),
    ("model.space", "unknown", "unknown"),
    ("search.neighbors.aggregation", "median", "config.search.neighbors.aggregation"),
    ("parallel.distributed", "maybe", "config.parallel.distributed"),
    ("checkpoint.keep", 0, "config.checkpoint.keep"),
    ("model.depthwise_impl", "cudnn", r"config.model.depthwise_impl = 'cudnn'"),
    ("model.inner_impl", "loop", r"config.model.inner_impl = 'loop' is invalid: use one"),
])
def test_bad_values_fail_before_any_work_naming_the_field(set_field, field, value, message):
  config = importlib.import_module("configs.na_darts_cifar10").get_config()
  set_field(config, field, value)
  with pytest.raises(ValueError, match=message):
    experiment.validate_config(config)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_run_checkpoints_by_time(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  runs = [config[k] for k in ("search", "train") if k in config and "checkpoint" in config[k]]
  for run in runs or [config]:
    # Paper-sized runs: a checkpoint every 10 minutes; quick starts: every minute.
    expected = 600 if "cifar" in name or "imagenet" in name else 60
    assert run.checkpoint.every_seconds == expected
