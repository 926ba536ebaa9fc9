"""Train a genotype from scratch on ImageNet in the DARTS mobile setting.

The protocol of DARTS (quark0/darts ``cnn/train_imagenet.py --auxiliary``): 14 cells, C=48,
batch 128, SGD lr 0.1 decayed by 0.97 every epoch, momentum 0.9, weight decay 3e-5, 250
epochs, label smoothing 0.1, auxiliary weight 0.4, gradient clip 5, no drop path;
RandomResizedCrop 224, flip and ColorJitter(0.4, 0.4, 0.4, 0.2) for training, resize 256 +
centre crop 224 for evaluation (`nanas_jax.data.imagenet`). Top-1 and top-5 on the
validation split every 5 epochs and after the last; a checkpoint every 1000 steps besides
every epoch end (an epoch is 10,009 steps).

Prepare ImageNet once from the manual download (ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar in MANUAL_DIR; see `nanas_jax.data.imagenet.prepare`), then:
  python -m nanas_jax.main --config=configs/train_imagenet.py --workdir=/tmp/train_in_darts_v2 \
      --config.data.data_dir=DATA_DIR --config.data.manual_dir=MANUAL_DIR
A searched genotype: add --config.model.genotype_file=/tmp/nanas_search/genotype.txt; a
published one by name: --config=configs/train_imagenet.py:PC_DARTS.

Batch and devices: `config.data.batch_size` is the global batch over every device of every
process. The reference trains 128 on one GPU at lr 0.1. To keep 128 per device on N devices
set --config.data.batch_size=$((128 * N)) and scale the learning rate linearly (Goyal et
al. 2017), e.g. on 8 devices --config.data.batch_size=1024 --config.train.optim.lr=0.8.
(PC-DARTS trained batch 1024 at lr 0.5 with 5 warm-up epochs; warm-up is not implemented
here, so prefer a smaller lr at large batches.) Multi-host (TPU pod slices, SLURM): the same
command on every host; `config.parallel` starts jax.distributed (see
`configs/quickstart.py`), every host reads its own part of the data.

Cost: not measured end to end here. DARTS reports about 12 GPU days (250 epochs on one
GPU class of 2018). Expected result (DARTS paper, DARTS_V2): 26.7 % top-1 / 8.7 % top-5
error, 4.7M parameters (4,718,752 counted here), 574M multiply-adds as published (530M by
the convolution + dense convention, 545M by ptflops: see `nanas_jax.summary`).
"""

import ml_collections

from configs import train_cifar10
from nanas_jax.train import trainer


def get_config(arg=None):
  config = train_cifar10.run_config(trainer.imagenet_train_config(), arg)
  config.log_every_steps = 100
  config.checkpoint.every_steps = 1000
  config.data.manual_dir = ml_collections.FieldReference(None, field_type=str)
  config.data.image_size = 224
  config.train.eval_every_epochs = 5
  return config
