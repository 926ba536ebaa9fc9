"""Training a genotype from scratch (the DARTS CIFAR and ImageNet mobile protocols): one
state pytree and pure, jittable steps; the loop around them lives in the experiment."""

from nanas_jax.train.state import TrainState, lr_schedule, train_optimizer
from nanas_jax.train.trainer import (Trainer, build_network, default_train_config,
                                     imagenet_train_config, validate_train_config)

__all__ = [
    "TrainState", "Trainer", "build_network", "default_train_config",
    "imagenet_train_config", "lr_schedule", "train_optimizer", "validate_train_config",
]
