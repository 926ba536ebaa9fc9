"""DARTS on CIFAR-100 with the reference search hyperparameters (as configs/darts_cifar10.py,
on CIFAR-100's training set: first half weights, second half alpha).

Launch (CIFAR-100 prepared once with `tfds build cifar100 --data_dir=DATA`):
  python -m nanas_jax.main --config=configs/darts_cifar100.py:first --workdir=WORKDIR \\
      --config.data.data_dir=DATA
Second order: `:second`.

Cost: as CIFAR-10 (same image size and split size): about 5 hours first order on one H200,
about 12 hours second order; impractical on a 2-core CPU.
"""

from configs import darts_cifar10


def get_config(order=None):
  return darts_cifar10.search_config("cifar100", "darts", order)
