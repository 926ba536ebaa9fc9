"""Quick start of training from scratch: DARTS_V2 on scikit-learn's embedded digits.

Launch:
  python -m nanas_jax.main --config=configs/train_quickstart.py --workdir=/tmp/nanas_train

Cost: 1 min 21 s alone on a 2-core CPU (2026-12-07, an AMD EPYC Zen 4, the compilation
cache cold; first step, mostly compilation, 26.2 s; 20 epochs x 15 steps; 2 min 26 s with
XLA's grouped depthwise convolutions, `--config.model.depthwise_impl=conv`, first step
17.4 s). Measured: 0.9925 test top-1 (chance is 0.1), 1.000 top-5, 245,242 parameters.

The DARTS CIFAR protocol (`configs/train_cifar10.py`: SGD lr 0.025 cosine to 0, momentum
0.9, weight decay 3e-4, drop path 0.2 ramped linearly, auxiliary head weight 0.4, gradient
clip 5), sized for 8x8x1 digits on a laptop: 8 cells, C=16, batch 64, 20 epochs. No
cutout (a 16-pixel square would hide a whole 8x8 digit) and no crop or flip (a mirrored
digit is another symbol), as the search quick start trains.

Data: the 1797 digits shuffled with `config.seed`; the first 1000 train (train_portion
0.5566 of them) and the other 797 are the test split. `configs/pipeline_quickstart.py`
searches on the same first 1000 only, so this test split is held out from its search too
and the two quick starts' accuracies compare on the same test digits.
"""

from configs import train_cifar10
from nanas_jax.train import trainer


def get_config(arg=None):
  config = train_cifar10.run_config(trainer.default_train_config(), arg)
  config.log_every_steps = 5
  config.checkpoint.every_seconds = 60.0
  config.data.name = "digits"
  config.data.train_portion = 0.5566
  config.data.batch_size = 64
  config.data.cutout = 0
  config.model.layers = 8
  config.model.channels = 16
  config.train.epochs = 20
  config.train.eval_every_epochs = 5
  return config
