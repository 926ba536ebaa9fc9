"""NA-DARTS on CIFAR-100: configs/na_darts_cifar10.py on CIFAR-100.

Launch (CIFAR-100 prepared once with `tfds build cifar100 --data_dir=DATA`):
  python -m nanas_jax.main --config=configs/na_darts_cifar100.py:first --workdir=WORKDIR \\
      --config.data.data_dir=DATA
Second order: `:second`.

Cost: about 2.5x DARTS (about 12 hours first order on one H200, estimated); impractical on
a 2-core CPU.
"""

from configs import darts_cifar10


def get_config(order=None):
  return darts_cifar10.search_config("cifar100", "na_darts", order)
