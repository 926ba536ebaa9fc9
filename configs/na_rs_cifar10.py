"""NA-RS with weight sharing on the DARTS space, CIFAR-10 (the paper-sized search).

The supernet (8 cells, C=16, batch 64) trains 50 epochs on the first half of CIFAR-10's
training set with one uniformly sampled architecture per step; then 100 candidates are each
scored by the mean validation loss of themselves and 16 sampled distance-1 neighbors on 10
batches of the second half, and plain RS runs with the same 1700 evaluations.

Launch (CIFAR-10 prepared by tfds first: `tfds build cifar10`):
  python -m nanas_jax.main --config=configs/na_rs_cifar10.py --workdir=/tmp/na_rs_cifar10

Cost: not measured end to end. On this project's 2-core CPU one supernet gradient at this
size takes about 46 s (so 50 epochs x 390 steps is impractical there); on one H200 a DARTS
step (two gradients) took 0.93 s, so training is about 2.5 hours there, plus the
candidate scoring.
"""

from configs import na_rs_quickstart


def get_config():
  config = na_rs_quickstart.get_config()
  config.data.name = "cifar10"
  config.model.channels = 16
  config.model.layers = 8
  config.search.epochs = 50
  config.checkpoint.every_seconds = 600.0
  rs = config.search.rs
  rs.num_candidates = 100
  rs.num_neighbors = 16
  rs.eval_batches = 10
  rs.chunk_size = 16
  return config
