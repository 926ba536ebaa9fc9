"""Random search with weight sharing on the DARTS space, CIFAR-10: the baseline of
configs/na_rs_cifar10.py with the same 1700 evaluations (1700 candidates).

Launch (CIFAR-10 prepared by tfds first: `tfds build cifar10`):
  python -m nanas_jax.main --config=configs/rs_cifar10.py --workdir=/tmp/rs_cifar10

Cost: as configs/na_rs_cifar10.py (the same supernet training), not measured end to end.
"""

from configs import na_rs_cifar10


def get_config():
  config = na_rs_cifar10.get_config()
  config.search.algorithm = "rs"
  config.search.rs.num_candidates = 1700
  return config
