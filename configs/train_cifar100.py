"""Train a genotype from scratch on CIFAR-100 with the DARTS evaluation protocol.

The CIFAR-10 protocol of `configs/train_cifar10.py` (20 cells, C=36, batch 96, SGD lr 0.025
cosine to 0, 600 epochs, cutout 16, drop path 0.2, auxiliary weight 0.4) with 100 classes,
as the papers that report CIFAR-100 (P-DARTS, PC-DARTS) train it.

Launch (`tfds build cifar100` first); the config argument is a published genotype name:
  python -m nanas_jax.main --config=configs/train_cifar100.py --workdir=/tmp/train_c100_darts_v2
A searched genotype:
  python -m nanas_jax.main --config=configs/train_cifar100.py \
      --config.model.genotype_file=/tmp/nanas_search/genotype.txt --workdir=/tmp/train_c100_found

Cost: as CIFAR-10 (the network differs only in its classifier: 3,401,272 parameters for
DARTS_V2 instead of 3,349,342). Not measured end to end here. Expected result: about 17.5
% test error for DARTS_V2 (reported by P-DARTS; DARTS itself did not report CIFAR-100).
"""

from configs import train_cifar10
from nanas_jax.train import trainer


def get_config(arg=None):
  config = train_cifar10.run_config(trainer.default_train_config(), arg)
  config.data.name = "cifar100"
  return config
