"""DARTS on CIFAR-10 with the reference search hyperparameters (quark0/darts train_search.py).

8 cells, C=16, batch 64, 50 epochs; weights: SGD lr 0.025 cosine to 0.001, momentum 0.9,
weight decay 3e-4, gradient clip 5; alpha: Adam lr 3e-4, betas (0.5, 0.999), weight decay
1e-3; the first half of the training set trains the weights, the second half alpha (crop +
flip augmentation on both, as the reference). The argument picks the order of the
architecture gradient: ``first`` (default) or ``second`` (DARTS's finite-difference
unrolled step; ``second_exact`` differentiates through the virtual step exactly).

Launch (CIFAR-10 prepared once with `tfds build cifar10 --data_dir=DATA`):
  python -m nanas_jax.main --config=configs/darts_cifar10.py:first --workdir=WORKDIR \\
      --config.data.data_dir=DATA
It resumes from WORKDIR's checkpoints when rerun, and runs data parallel on every local
device (the global batch of 64 must divide by the device count).

Cost: one H200 (JAX 0.11.2) took 0.93 s per first-order step at this size, so 50 epochs x
390 steps are about 5 hours; second order evaluates about 2.5x as many supernet gradients
per step (about 12 hours). On this project's 2-core CPU a first-order step takes 21-38 s
(50 epochs: 5-9 days), so CPU runs are impractical; use configs/quickstart.py there.
On a GPU or TPU, --config.search.dtype=bfloat16 computes in bfloat16 (float32 state). On
a GPU the step compiles without timing candidate kernels; --config.search.gpu_autotune=true
lets XLA time them (a longer first step, for a possibly faster step: unmeasured).
"""

import ml_collections

from configs import quickstart

ORDERS = {"first": "first", "second": "second_fd", "second_exact": "second_exact"}


def search_config(dataset: str, algorithm: str, order: str | None) -> ml_collections.ConfigDict:
  """The reference-sized bilevel search of ``algorithm`` on ``dataset``."""
  order = order or "first"
  if order not in ORDERS:
    raise ValueError(f"config argument {order!r} is invalid: expected one of {tuple(ORDERS)} "
                     "(e.g. --config=configs/darts_cifar10.py:second).")
  config = quickstart.get_config()
  config.log_every_steps = 50
  config.checkpoint.every_steps = 200
  config.checkpoint.every_seconds = 600.0
  config.data.name = dataset
  config.data.batch_size = 64
  config.model.channels = 16
  config.model.layers = 8
  config.search.algorithm = algorithm
  config.search.order = ORDERS[order]
  config.search.epochs = 50
  # DARTS's schedule: no warm-up, a constant architecture learning rate, and validation
  # with the running BatchNorm statistics (the quick start's short-budget settings off).
  config.data.max_examples = None
  config.search.warmup_epochs = 0
  config.search.recalibrate_batches = 0
  config.search.arch.lr = 3e-4
  config.search.arch.weight_decay = 1e-3
  config.search.arch.schedule = "constant"
  return config


def get_config(order=None):
  return search_config("cifar10", "darts", order)
