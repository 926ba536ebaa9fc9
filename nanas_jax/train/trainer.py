"""Training a genotype from scratch: the network, the configs and the pure steps.

The protocols are the reference's (quark0/darts ``cnn/train.py`` for CIFAR,
``cnn/train_imagenet.py`` for the ImageNet mobile setting); `default_train_config` and
`imagenet_train_config` hold their hyperparameters. Config layout::

  config.seed
  config.data   {name, batch_size, cutout}            read by the input pipeline
  config.model  {network: 'cifar' | 'imagenet', genotype (name or Genotype(...) text),
                 layers, channels, auxiliary, auxiliary_weight, drop_path_prob,
                 depthwise_impl: 'auto' | 'conv' | 'taps'}
  config.train  {epochs, label_smoothing,
                 optim: {lr, lr_min, momentum, weight_decay, grad_clip,
                         schedule: 'cosine' | 'exponential', gamma, decay_period}}

A training step, as in the reference:
- drop path rate ``drop_path_prob * epoch / epochs`` with the 0-based ``epoch = step //
  steps_per_epoch`` (the reference sets ``model.drop_path_prob`` so at the start of each
  epoch); it is a traced scalar, so the ramp never recompiles;
- loss ``CE(logits) + auxiliary_weight * CE(logits_aux)``, both with label smoothing
  (``CrossEntropyLabelSmooth``: targets ``(1 - eps) * onehot + eps / num_classes``; eps 0
  is the CIFAR protocol's plain cross-entropy);
- BatchNorm running statistics updated; clip, weight decay and SGD momentum (see
  `nanas_jax.train.state.train_optimizer`).

Evaluation is the reference's ``infer``: no drop path, no auxiliary head, plain
cross-entropy (``train_imagenet.py`` validates with ``nn.CrossEntropyLoss`` even when it
trains with label smoothing), top-1 and top-5.

Data parallelism: every function here is pure, has no axis names and no host callbacks,
so ``jax.jit`` over global arrays sharded on a mesh runs it as is. BatchNorm statistics and
the loss are then means over the global batch, and drop-path masks are drawn for the
global batch, so the result does not depend on the number of devices.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util

from nanas_jax.nn import networks, ops
from nanas_jax.spaces.genotypes import get_genotype
from nanas_jax.train.state import SCHEDULES, TrainState, lr_schedule, train_optimizer

NETWORKS = ("cifar", "imagenet")


def default_train_config() -> ml_collections.ConfigDict:
  """The DARTS CIFAR-10 evaluation protocol (``train.py --auxiliary --cutout``): 20 cells,
  C=36, batch 96, SGD lr 0.025 cosine to 0, momentum 0.9, weight decay 3e-4, 600 epochs,
  cutout 16, drop path 0.2 ramped linearly, auxiliary weight 0.4, gradient clip 5."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  config.data.name = "cifar10"
  config.data.batch_size = 96
  config.data.cutout = 16

  config.model = ml_collections.ConfigDict()
  config.model.network = "cifar"
  config.model.genotype = "DARTS_V2"
  config.model.layers = 20
  config.model.channels = 36
  config.model.auxiliary = True
  config.model.auxiliary_weight = 0.4
  config.model.drop_path_prob = 0.2
  # The cells' depthwise convolutions: 'auto' ('taps' on a CPU, 3.5-4x faster a training
  # step there; XLA's grouped 'conv' on accelerators), 'conv' or 'taps' (`nn.ops`).
  config.model.depthwise_impl = "auto"

  config.train = ml_collections.ConfigDict()
  config.train.epochs = 600
  config.train.label_smoothing = 0.0
  config.train.optim = ml_collections.ConfigDict()
  config.train.optim.lr = 0.025
  config.train.optim.lr_min = 0.0
  config.train.optim.momentum = 0.9
  config.train.optim.weight_decay = 3e-4
  config.train.optim.grad_clip = 5.0
  config.train.optim.schedule = "cosine"
  config.train.optim.gamma = 0.97
  config.train.optim.decay_period = 1
  return config


def imagenet_train_config() -> ml_collections.ConfigDict:
  """The DARTS ImageNet mobile setting (``train_imagenet.py``): 14 cells, C=48, batch 128,
  SGD lr 0.1 decayed by 0.97 every epoch, momentum 0.9, weight decay 3e-5, 250 epochs,
  label smoothing 0.1, auxiliary weight 0.4, gradient clip 5, no drop path, no cutout."""
  config = default_train_config()
  config.data.name = "imagenet2012"
  config.data.batch_size = 128
  config.data.cutout = 0
  config.model.network = "imagenet"
  config.model.layers = 14
  config.model.channels = 48
  config.model.drop_path_prob = 0.0
  config.train.epochs = 250
  config.train.label_smoothing = 0.1
  config.train.optim.lr = 0.1
  config.train.optim.weight_decay = 3e-5
  config.train.optim.schedule = "exponential"
  return config


def _field(config: ml_collections.ConfigDict, path: str) -> Any:
  """``config.<path>``, or a ValueError naming the missing field."""
  value = config
  for name in path.split("."):
    if not isinstance(value, ml_collections.ConfigDict) or name not in value:
      raise ValueError(f"config.{path} is missing: add it (default_train_config() or "
                       "imagenet_train_config() lists every field).")
    value = value[name]
  return value


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def validate_train_config(config: ml_collections.ConfigDict) -> None:
  """Fails fast, naming the field, on values training cannot run with."""

  def check(path: str, ok: Callable[[Any], bool], expected: str):
    value = _field(config, path)
    try:
      valid = bool(ok(value))
    except TypeError:  # A string where a number belongs, say.
      valid = False
    if not valid:
      raise ValueError(f"config.{path} = {value!r} is invalid: expected {expected}.")

  check("model.network", lambda v: v in NETWORKS, f"one of {NETWORKS}")
  genotype = _field(config, "model.genotype")
  try:
    get_genotype(genotype)
  except ValueError as error:
    raise ValueError(f"config.model.genotype = {genotype!r} is invalid: {error}") from error
  # Two reduction cells at layers // 3 and 2 * layers // 3 need three cells to be distinct
  # from the first one.
  check("model.layers", lambda v: _is_int(v) and v >= 3, "an integer >= 3")
  if config.model.network == "imagenet":
    # The ImageNet stem halves C, and the first cell's FactorizedReduce needs an even C.
    check("model.channels", lambda v: _is_int(v) and v >= 2 and v % 2 == 0,
          "an even integer >= 2 for the ImageNet network")
  else:
    check("model.channels", lambda v: _is_int(v) and v >= 1, "an integer >= 1")
  check("model.auxiliary", lambda v: isinstance(v, bool), "True or False")
  check("model.auxiliary_weight", lambda v: v >= 0, ">= 0")
  check("model.drop_path_prob", lambda v: 0 <= v < 1, "in [0, 1)")
  impl = config.model.get("depthwise_impl", "auto")
  if impl not in ops.DEPTHWISE_IMPLS:
    raise ValueError(f"config.model.depthwise_impl = {impl!r} is invalid: expected one of "
                     f"{ops.DEPTHWISE_IMPLS}.")
  check("train.epochs", lambda v: _is_int(v) and v >= 1, "an integer >= 1")
  check("train.label_smoothing", lambda v: 0 <= v < 1, "in [0, 1)")
  check("train.optim.lr", lambda v: v > 0, "> 0")
  check("train.optim.lr_min", lambda v: 0 <= v <= config.train.optim.lr,
        "in [0, train.optim.lr]")
  check("train.optim.momentum", lambda v: 0 <= v < 1, "in [0, 1)")
  check("train.optim.weight_decay", lambda v: v >= 0, ">= 0")
  check("train.optim.grad_clip", lambda v: v > 0, "> 0")
  check("train.optim.schedule", lambda v: v in SCHEDULES, f"one of {SCHEDULES}")
  check("train.optim.gamma", lambda v: 0 < v <= 1, "in (0, 1]")
  check("train.optim.decay_period", lambda v: _is_int(v) and v >= 1, "an integer >= 1")


def build_network(model_config: ml_collections.ConfigDict, genotype: Any, num_classes: int,
                  image_shape: tuple[int, int, int]):
  """The network of ``model_config.network`` for ``(H, W, C)`` images.

  ``image_shape`` is checked by tracing one abstract forward pass (nothing is computed), so
  an input the network cannot take (an auxiliary head that does not reduce to 1x1, a map
  that FactorizedReduce cannot halve) fails here with the config fields to change.
  """
  if model_config.network not in NETWORKS:
    raise ValueError(f"config.model.network = {model_config.network!r} is invalid: "
                     f"expected one of {NETWORKS}.")
  if len(image_shape) != 3:
    raise ValueError(f"image_shape must be (height, width, channels), got {image_shape}")
  for reduction in (False, True):
    networks.cell_spec(genotype, reduction)
  cls = networks.NetworkImageNet if model_config.network == "imagenet" else networks.NetworkCIFAR
  model = cls(genotype, model_config.channels, num_classes, model_config.layers,
              model_config.auxiliary, depthwise_impl=ops.resolve_depthwise_impl(
                  model_config.get("depthwise_impl", "auto")))
  sample = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32)
  try:
    jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), sample)
  except (ValueError, TypeError) as error:
    raise ValueError(
        f"config.model.network = {model_config.network!r} (layers={model_config.layers}, "
        f"auxiliary={model_config.auxiliary}) cannot take {tuple(image_shape)} images: "
        f"{error}. The 'cifar' network expects 32x32-like images and 'imagenet' 224x224; "
        "pick the other network, resize the images, or set config.model.auxiliary = False."
    ) from error
  return model


def init_variables(model, key: jax.Array, sample: jax.ShapeDtypeStruct) -> dict:
  """``model``'s variables with PyTorch's default initialisation, as the reference trains.

  Conv and Dense kernels and Dense biases are ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``
  (``kaiming_uniform_(a=sqrt(5))``), BatchNorm scales 1 and biases 0, running means 0 and
  variances 1. The shapes come from ``jax.eval_shape`` and the numbers from one uniform
  draw. Measured on a 2-core CPU for the 20-cell C=36 network: ``jax.jit(model.init)``
  compiles the forward pass and a threefry draw per parameter, 85 s (22 s at 3 cells,
  C=4); this function run eagerly takes 5 s (2.5 s of it tracing the shapes), and under
  ``jax.jit`` 20 s (XLA compiles one kernel per leaf). It is traceable, so
  ``jax.eval_shape`` of it works. A leaf it does not know raises ValueError, so a new kind
  of parameter cannot be silently mis-initialised.
  """
  shapes = jax.eval_shape(functools.partial(model.init, train=False), key, sample)
  flat = traverse_util.flatten_dict(shapes)

  def fan_in(path):
    return math.prod(flat[path[:-1] + ("kernel",)].shape[:-1])

  uniform, constant = {}, {}
  for path, leaf in flat.items():
    collection, name = path[0], path[-1]
    has_kernel = path[:-1] + ("kernel",) in flat
    if collection == "params" and (name == "kernel" or (name == "bias" and has_kernel)):
      uniform[path] = 1.0 / math.sqrt(fan_in(path))
    elif (collection, name) in (("params", "scale"), ("batch_stats", "var")):
      constant[path] = 1.0
    elif (collection, name) in (("params", "bias"), ("batch_stats", "mean")):
      constant[path] = 0.0
    else:
      raise ValueError(f"init_variables does not know how to initialise "
                       f"{'/'.join(path)} {leaf.shape}; add a rule for it.")
  sizes = [math.prod(flat[path].shape) for path in uniform]
  noise = jax.random.uniform(key, (sum(sizes),), jnp.float32, -1.0, 1.0)
  out, start = {}, 0
  for (path, bound), size in zip(uniform.items(), sizes):
    leaf = flat[path]
    # A start index passed as an array, so that run eagerly each slice size compiles once.
    piece = jax.lax.dynamic_slice_in_dim(noise, jnp.int32(start), size)
    out[path] = (bound * piece).astype(leaf.dtype).reshape(leaf.shape)
    start += size
  for path, value in constant.items():
    out[path] = jnp.full(flat[path].shape, value, flat[path].dtype)
  return traverse_util.unflatten_dict(out)


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float) -> jax.Array:
  """Per-example cross-entropy against ``(1 - eps) * onehot + eps / num_classes``."""
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype),
                                label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """Per example, whether the label is among the ``k`` largest logits (all of them when
  there are fewer than ``k`` classes)."""
  _, top = jax.lax.top_k(logits, min(k, logits.shape[-1]))
  return jnp.any(top == labels[:, None], axis=-1)


def _global_norm(tree: Any) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(tree)))


class Trainer:
  """Builds the state and the pure steps of training ``model`` from scratch.

  ``model`` is called as ``model(images, train, drop_path_prob=...) -> (logits,
  logits_aux)`` (`build_network`); ``config`` is the whole experiment config (its
  ``model`` and ``train`` blocks are read).
  """

  def __init__(self, model, config: ml_collections.ConfigDict, steps_per_epoch: int):
    validate_train_config(config)
    if not _is_int(steps_per_epoch) or steps_per_epoch < 1:
      raise ValueError(f"steps_per_epoch = {steps_per_epoch!r} is invalid: expected an "
                       "integer >= 1 (the number of batches in an epoch).")
    self.model = model
    self.config = config
    self.steps_per_epoch = steps_per_epoch
    self.epochs = config.train.epochs
    self.auxiliary_weight = float(config.model.auxiliary_weight)
    self.max_drop_path_prob = float(config.model.drop_path_prob)
    self.label_smoothing = float(config.train.label_smoothing)
    self.tx = train_optimizer(config.train.optim, self.epochs, steps_per_epoch)
    self.lr_schedule = lr_schedule(config.train.optim, self.epochs, steps_per_epoch)

  def init(self, rng: jax.Array, sample_images) -> TrainState:
    """A fresh state; only the shape and dtype of ``sample_images`` (an array or a
    ``jax.ShapeDtypeStruct``) are used. ``rng`` is a typed key or raw key data.

    Runs eagerly (see `init_variables` for why not under ``jax.jit``); traceable, so
    ``jax.eval_shape(trainer.init, ...)`` gives the state's shapes for sharding."""
    sample = jax.ShapeDtypeStruct((1,) + tuple(sample_images.shape[1:]), sample_images.dtype)
    if not jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
      rng = jax.random.wrap_key_data(rng)
    param_key, state_key = jax.random.split(rng)
    variables = init_variables(self.model, param_key, sample)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}),
                      # One program, not a zeros program per parameter shape.
                      opt_state=jax.jit(self.tx.init)(params),
                      rng=jax.random.key_data(state_key))

  def drop_path_prob(self, step: jax.Array) -> jax.Array:
    """The linear ramp ``drop_path_prob * epoch / epochs`` at ``step``."""
    epoch = step // self.steps_per_epoch
    return jnp.asarray(self.max_drop_path_prob * epoch / self.epochs, jnp.float32)

  def step_key(self, state: TrainState) -> jax.Array:
    """The drop-path key of ``state.step``: folding the step into a fixed key makes a
    resumed run draw the masks the uninterrupted one would have drawn."""
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

  def losses(self, params, batch_stats, images, labels, drop_path_prob, key):
    """``(loss, (main loss, aux loss, logits, new batch_stats))`` in training mode."""
    (logits, logits_aux), updates = self.model.apply(
        {"params": params, "batch_stats": batch_stats}, images, True,
        drop_path_prob=drop_path_prob, rngs={"drop_path": key}, mutable=["batch_stats"])
    main = cross_entropy(logits, labels, self.label_smoothing).mean()
    if logits_aux is None:
      aux = jnp.zeros((), main.dtype)
    else:
      aux = cross_entropy(logits_aux, labels, self.label_smoothing).mean()
    new_stats = updates.get("batch_stats", batch_stats)
    return main + self.auxiliary_weight * aux, (main, aux, logits, new_stats)

  def train_step(self, state: TrainState, images: jax.Array,
                 labels: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SGD step on a batch: the new state and batch-mean metrics."""
    rate = self.drop_path_prob(state.step)
    # A Python zero lets the network skip drop path statically (no masks are drawn).
    model_rate = rate if self.max_drop_path_prob > 0 else 0.0
    (loss, (main, aux, logits, new_stats)), grads = jax.value_and_grad(
        self.losses, has_aux=True)(state.params, state.batch_stats, images, labels,
                                   model_rate, self.step_key(state))
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(step=state.step + 1,
                              params=optax.apply_updates(state.params, updates),
                              batch_stats=new_stats, opt_state=opt_state)
    metrics = {
        "loss": loss, "main_loss": main, "aux_loss": aux,
        "top1": jnp.mean(topk_correct(logits, labels, 1).astype(jnp.float32)),
        "lr": self.lr_schedule(state.step),
        # Before clipping, as PyTorch's clip_grad_norm_ reports it.
        "grad_norm": _global_norm(grads),
        "drop_path_prob": rate,
    }
    return new_state, metrics

  def eval_step(self, state: TrainState, images: jax.Array, labels: jax.Array,
                mask: jax.Array) -> dict[str, jax.Array]:
    """Sums over the rows where ``mask`` is true (padding rows of a last partial batch are
    false): ``loss_sum`` (plain cross-entropy), ``top1_correct``, ``top5_correct``,
    ``count``. Divide the totals over all batches by the total ``count``."""
    logits, _ = self.model.apply({"params": state.params, "batch_stats": state.batch_stats},
                                 images, False)
    mask = mask.astype(bool)

    def total(values):
      # where, not a product: a padding row's NaN must not leak into the sum.
      return jnp.sum(jnp.where(mask, values.astype(jnp.float32), 0.0))

    return {"loss_sum": total(cross_entropy(logits, labels, 0.0)),
            "top1_correct": total(topk_correct(logits, labels, 1)),
            "top5_correct": total(topk_correct(logits, labels, 5)),
            "count": total(jnp.ones_like(labels))}

  def jit_train_step(self) -> Callable:
    """``train_step`` under ``jax.jit`` with the state donated (updated in place)."""
    return jax.jit(self.train_step, donate_argnums=0)
