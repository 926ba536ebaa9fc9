"""NA-DARTS on CIFAR-10: the DARTS reference search (configs/darts_cifar10.py) with the
architecture objective averaged over K=4 swap neighbors at radius 1, sampled afresh every
step (the neighborhood settings of configs/quickstart.py).

Launch (CIFAR-10 prepared once with `tfds build cifar10 --data_dir=DATA`):
  python -m nanas_jax.main --config=configs/na_darts_cifar10.py:first --workdir=WORKDIR \\
      --config.data.data_dir=DATA
Second order: `:second`. More neighbors: --config.search.neighbors.num=8.

Cost: each step evaluates K neighbor gradients instead of one for alpha: about 5 supernet
gradients per first-order step against DARTS's 2, so about 2.5x DARTS's time (estimated
from the measured H200 DARTS step: about 12 hours for 50 epochs on one H200; second order
about 3.5x DARTS). Impractical on a 2-core CPU.
"""

from configs import darts_cifar10


def get_config(order=None):
  return darts_cifar10.search_config("cifar10", "na_darts", order)
