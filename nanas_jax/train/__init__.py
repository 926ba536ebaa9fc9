"""Training a genotype from scratch (the DARTS CIFAR and ImageNet mobile protocols): one
state pytree and pure, jittable steps. The run around them (data, the shared loop, the
files of a workdir) is `nanas_jax.train.run`, imported on its own: it drives the side
effects this package's pure pieces stay free of."""

from nanas_jax.train.state import TrainState, lr_schedule, train_optimizer
from nanas_jax.train.trainer import (Trainer, build_network, default_train_config,
                                     imagenet_train_config, validate_train_config)

__all__ = [
    "TrainState", "Trainer", "build_network", "default_train_config",
    "imagenet_train_config", "lr_schedule", "train_optimizer", "validate_train_config",
]
