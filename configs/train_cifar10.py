"""Train a genotype from scratch on CIFAR-10 with the DARTS evaluation protocol.

The protocol of DARTS (Liu et al. 2019, quark0/darts ``cnn/train.py --auxiliary
--cutout``): 20 cells, C=36, batch 96, SGD lr 0.025 cosine to 0, momentum 0.9, weight
decay 3e-4, 600 epochs, cutout 16, drop path 0.2 ramped linearly, auxiliary head weight
0.4, gradient clip 5. The test split is evaluated every 10 epochs and after the last.

Launch (CIFAR-10 prepared by tfds first: `tfds build cifar10`), a published genotype by
name (the config argument; default DARTS_V2):
  python -m nanas_jax.main --config=configs/train_cifar10.py --workdir=/tmp/train_c10_darts_v2
  python -m nanas_jax.main --config=configs/train_cifar10.py:PC_DARTS --workdir=/tmp/train_c10_pc

A searched genotype (a search workdir's genotype.txt):
  python -m nanas_jax.main --config=configs/train_cifar10.py \
      --config.model.genotype_file=/tmp/nanas_search/genotype.txt --workdir=/tmp/train_c10_found

Rerunning the same command resumes from the workdir's checkpoints. Several devices: the
batch is global (`config.data.batch_size`, split over every device of every process).

Cost: not measured end to end here. DARTS reports 1.5 GPU days (one 1080Ti) for 600
epochs; 600 epochs x 520 steps of batch 96. On this project's 2-core CPU it is impractical.
Expected result (DARTS paper, DARTS_V2): 2.76 +- 0.09 % test error, 3.3M parameters
(3,349,342 counted here, auxiliary head excluded).
"""

import ml_collections

from configs import quickstart
from nanas_jax.train import trainer


def run_config(protocol: ml_collections.ConfigDict,
               genotype: str | None) -> ml_collections.ConfigDict:
  """``protocol`` (`trainer.default_train_config` or `trainer.imagenet_train_config`) as a
  training run: the task, logging, evaluation and data fields, a genotype file slot, and
  the checkpoint and parallel blocks of the search quick start."""
  config = protocol
  config.task = "train"
  config.log_every_steps = 50
  search = quickstart.get_config()
  config.checkpoint = search.checkpoint
  config.checkpoint.every_seconds = 600.0
  config.parallel = search.parallel

  config.data.train_portion = 0.5  # Only the digits read it (their train / test cut).
  config.data.data_dir = ml_collections.FieldReference(None, field_type=str)
  config.data.max_examples = ml_collections.FieldReference(None, field_type=int)
  # None: crop and flip for every dataset but the digits.
  config.data.augment = ml_collections.FieldReference(None, field_type=bool)

  config.model.genotype = genotype or "DARTS_V2"
  # A file holding Genotype(...) text, e.g. a search's genotype.txt; when set it replaces
  # config.model.genotype.
  config.model.genotype_file = ml_collections.FieldReference(None, field_type=str)

  config.train.eval_every_epochs = 10
  return config


def get_config(arg=None):
  return run_config(trainer.default_train_config(), arg)
