"""Tests of the training and pipeline configs: each holds its protocol's numbers (the DARTS
papers'), validates, names its launch command, and the quick starts' data split is what
their docstrings say."""

import pytest

from configs import (pipeline_quickstart, quickstart, train_cifar10, train_cifar100,
                     train_imagenet, train_quickstart)
from nanas_jax import pipeline
from nanas_jax.data import loaders
from nanas_jax.spaces import get_genotype
from nanas_jax.train import run

TRAIN_CONFIGS = (train_cifar10, train_cifar100, train_imagenet, train_quickstart)


@pytest.mark.parametrize("module", TRAIN_CONFIGS, ids=lambda m: m.__name__)
def test_train_configs_validate_and_document_their_launch(module):
  config = module.get_config()
  run.validate_run_config(config)
  assert config.task == "train"
  assert config.model.genotype == "DARTS_V2" and config.model.genotype_file is None
  # The loop's blocks are the search's, so both kinds of run read them alike.
  search = quickstart.get_config()
  assert config.checkpoint.keep == search.checkpoint.keep
  assert config.parallel.to_dict() == search.parallel.to_dict()
  path = module.__name__.replace(".", "/") + ".py"
  assert f"--config={path}" in module.__doc__
  assert "Cost:" in module.__doc__ and "TO BE MEASURED" not in module.__doc__


@pytest.mark.parametrize("module", (train_cifar10, train_cifar100, train_imagenet),
                         ids=lambda m: m.__name__)
def test_the_argument_picks_a_published_genotype(module):
  config = module.get_config("PC_DARTS")
  run.validate_run_config(config)
  assert run.resolve_genotype(config.model)[0] == get_genotype("PC_DARTS")
  assert "--config.model.genotype_file=" in module.__doc__


def test_cifar_configs_are_the_darts_protocol():
  for module, name in ((train_cifar10, "cifar10"), (train_cifar100, "cifar100")):
    c = module.get_config()
    assert (c.data.name, c.data.batch_size, c.data.cutout) == (name, 96, 16)
    assert (c.model.network, c.model.layers, c.model.channels, c.model.auxiliary,
            c.model.auxiliary_weight, c.model.drop_path_prob) == ("cifar", 20, 36, True, 0.4,
                                                                  0.2)
    o = c.train.optim
    assert (c.train.epochs, c.train.label_smoothing, o.lr, o.lr_min, o.momentum,
            o.weight_decay, o.grad_clip, o.schedule) == (600, 0.0, 0.025, 0.0, 0.9, 3e-4,
                                                         5.0, "cosine")


def test_imagenet_config_is_the_mobile_setting():
  c = train_imagenet.get_config()
  assert (c.data.name, c.data.batch_size, c.data.cutout, c.data.image_size) == (
      "imagenet2012", 128, 0, 224)
  assert (c.model.network, c.model.layers, c.model.channels, c.model.auxiliary_weight,
          c.model.drop_path_prob) == ("imagenet", 14, 48, 0.4, 0.0)
  o = c.train.optim
  assert (c.train.epochs, c.train.label_smoothing, o.lr, o.weight_decay, o.schedule,
          o.gamma, o.decay_period) == (250, 0.1, 0.1, 3e-5, "exponential", 0.97, 1)
  assert c.data.manual_dir is None and c.checkpoint.every_steps == 1000


def test_train_quickstart_trains_on_1000_digits_and_tests_on_797():
  c = train_quickstart.get_config()
  streams = loaders.load_train_streams(c.data, c.data.batch_size, c.seed)
  assert (streams.train.num_examples, streams.test.num_examples) == (1000, 797)
  assert streams.image_shape == (8, 8, 1) and c.data.cutout == 0


def test_pipeline_quickstart_validates_and_searches_on_its_training_digits():
  config = pipeline_quickstart.get_config()
  pipeline.validate_pipeline_config(config)
  assert config.search.data.max_examples == 1000
  assert config.train.to_dict() == train_quickstart.get_config().to_dict()
  path = "configs/pipeline_quickstart.py"
  assert f"--config={path}" in pipeline_quickstart.__doc__
