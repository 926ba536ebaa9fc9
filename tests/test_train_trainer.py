"""Tests of nanas_jax.train.trainer: the configs and their validation, the network choice,
the initialisation, and the train and eval steps of a tiny DARTS_V2 network against
float64 numpy (losses, label smoothing, the SGD update, BatchNorm statistics, top-k
counts), the drop-path ramp, learning, determinism, donation and resume.

The op-level drop path (per-sample masks, kept samples scaled by 1 / keep_prob) is tested
in tests/test_nn_networks.py; here the rate schedule and its wiring into the step are."""

import json
import math
import os
import subprocess
import sys
import textwrap

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nanas_jax import parallel, summary
from nanas_jax.nn import networks
from nanas_jax.spaces import get_genotype
from nanas_jax.train import trainer as trainer_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GENOTYPE = get_genotype("DARTS_V2")
NUM_CLASSES = 10
EPOCHS, STEPS_PER_EPOCH = 10, 2
DROP_PATH, AUX_WEIGHT, SMOOTHING = 0.3, 0.4, 0.1


def tiny_config(**model_overrides):
  config = trainer_lib.default_train_config()
  config.model.layers = 3
  config.model.channels = 4
  config.model.drop_path_prob = DROP_PATH
  config.model.update(model_overrides)
  config.train.epochs = EPOCHS
  config.train.label_smoothing = SMOOTHING
  return config


@pytest.fixture(scope="module")
def setup():
  """A 3-cell C=4 network on 8x8x3 images, its trainer, a fresh state, a fixed batch and
  the jitted step with the state donated (`run_steps` copies), shared so it compiles
  once."""
  config = tiny_config()
  model = trainer_lib.build_network(config.model, GENOTYPE, NUM_CLASSES, (8, 8, 3))
  trainer = trainer_lib.Trainer(model, config, STEPS_PER_EPOCH)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(8, 8, 8, 3)), jnp.float32)
  labels = jnp.asarray(rng.permutation(NUM_CLASSES)[:8], jnp.int32)
  state = trainer.init(jax.random.key(0), images)
  return dict(config=config, model=model, trainer=trainer, state=state, images=images,
              labels=labels, step=trainer.jit_train_step())


def run_steps(setup, state, n=1):
  """``n`` steps on the fixed batch from a copy of ``state`` (the step donates its input):
  the last state and the metrics of every step."""
  state = jax.tree.map(jnp.copy, state)
  metrics = []
  for _ in range(n):
    state, m = setup["step"](state, setup["images"], setup["labels"])
    metrics.append(m)
  return state, metrics


def np_log_softmax(logits):
  z = np.asarray(logits, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_smoothed_ce(logits, labels, eps):
  """Per-example loss of the reference's CrossEntropyLabelSmooth."""
  n = logits.shape[-1]
  targets = (1 - eps) * np.eye(n)[np.asarray(labels)] + eps / n
  return -(targets * np_log_softmax(logits)).sum(-1)


def assert_trees_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


# ------------------------------------------------------------------------------ configs

def test_default_config_is_the_darts_cifar_protocol():
  config = trainer_lib.default_train_config()
  trainer_lib.validate_train_config(config)
  m, t, o = config.model, config.train, config.train.optim
  assert (m.network, m.layers, m.channels, m.auxiliary, m.auxiliary_weight,
          m.drop_path_prob) == ("cifar", 20, 36, True, 0.4, 0.2)
  assert (config.data.batch_size, config.data.cutout) == (96, 16)
  assert (t.epochs, t.label_smoothing) == (600, 0.0)
  assert (o.lr, o.lr_min, o.momentum, o.weight_decay, o.grad_clip, o.schedule) == (
      0.025, 0.0, 0.9, 3e-4, 5.0, "cosine")


def test_imagenet_config_is_the_darts_mobile_setting():
  config = trainer_lib.imagenet_train_config()
  trainer_lib.validate_train_config(config)
  m, t, o = config.model, config.train, config.train.optim
  assert (m.network, m.layers, m.channels, m.auxiliary, m.auxiliary_weight,
          m.drop_path_prob) == ("imagenet", 14, 48, True, 0.4, 0.0)
  assert (config.data.batch_size, config.data.cutout) == (128, 0)
  assert (t.epochs, t.label_smoothing) == (250, 0.1)
  assert (o.lr, o.momentum, o.weight_decay, o.grad_clip, o.schedule, o.gamma,
          o.decay_period) == (0.1, 0.9, 3e-5, 5.0, "exponential", 0.97, 1)


@pytest.mark.parametrize("path, value, message", [
    ("model.network", "resnet", r"config\.model\.network = 'resnet' is invalid"),
    ("model.genotype", "NOPE", r"config\.model\.genotype = 'NOPE' is invalid"),
    ("model.layers", 2, r"config\.model\.layers = 2 .* integer >= 3"),
    ("model.channels", 0, r"config\.model\.channels = 0"),
    ("model.auxiliary", 1, r"config\.model\.auxiliary = 1 .* True or False"),
    ("model.auxiliary_weight", -0.1, r"config\.model\.auxiliary_weight = -0\.1"),
    ("model.drop_path_prob", 1.0, r"config\.model\.drop_path_prob = 1\.0 .* \[0, 1\)"),
    ("train.epochs", 0, r"config\.train\.epochs = 0"),
    ("train.epochs", 2.5, r"config\.train\.epochs = 2\.5 .* integer"),
    ("train.label_smoothing", 1.0, r"config\.train\.label_smoothing = 1\.0"),
    ("train.optim.lr", 0.0, r"config\.train\.optim\.lr = 0\.0 .* > 0"),
    ("train.optim.lr", "0.1", r"config\.train\.optim\.lr = '0\.1' is invalid"),
    ("train.optim.lr_min", 1.0, r"config\.train\.optim\.lr_min = 1\.0"),
    ("train.optim.momentum", 1.0, r"config\.train\.optim\.momentum = 1\.0"),
    ("train.optim.weight_decay", -1e-4, r"config\.train\.optim\.weight_decay"),
    ("train.optim.grad_clip", 0.0, r"config\.train\.optim\.grad_clip = 0\.0"),
    ("train.optim.schedule", "linear", r"config\.train\.optim\.schedule = 'linear'"),
    ("train.optim.gamma", 1.5, r"config\.train\.optim\.gamma = 1\.5 .* \(0, 1\]"),
    ("train.optim.decay_period", 0, r"config\.train\.optim\.decay_period = 0"),
])
def test_validate_names_the_field_and_the_expected_values(path, value, message):
  config = trainer_lib.default_train_config()
  *parents, name = path.split(".")
  block = config
  for parent in parents:
    block = block[parent]
  with block.ignore_type():
    block[name] = value
  with pytest.raises(ValueError, match=message):
    trainer_lib.validate_train_config(config)


def test_validate_names_missing_fields_and_imagenet_channel_parity():
  config = trainer_lib.default_train_config()
  del config.train.optim["lr"]
  with pytest.raises(ValueError, match=r"config\.train\.optim\.lr is missing"):
    trainer_lib.validate_train_config(config)
  config = trainer_lib.imagenet_train_config()
  config.model.channels = 47
  with pytest.raises(ValueError, match=r"config\.model\.channels = 47 .* even"):
    trainer_lib.validate_train_config(config)
  with pytest.raises(ValueError, match="steps_per_epoch = 0"):
    trainer_lib.Trainer(None, trainer_lib.default_train_config(), 0)


# ------------------------------------------------------------------------------ network

def test_the_cpus_taps_network_equals_the_grouped_conv_network_and_counts_the_same():
  """'auto' builds the 'taps' depthwise convolutions on this CPU: the same parameter tree,
  logits within float32 rounding of the grouped convolutions' network (NASNet: every
  depthwise op at strides 1 and 2), and the same multiply-adds (`summary`)."""
  config = tiny_config()
  genotype = get_genotype("NASNet")
  taps = trainer_lib.build_network(config.model, genotype, NUM_CLASSES, (8, 8, 3))
  config.model.depthwise_impl = "conv"
  grouped = trainer_lib.build_network(config.model, genotype, NUM_CLASSES, (8, 8, 3))
  assert (taps.depthwise_impl, grouped.depthwise_impl) == ("taps", "conv")
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 8, 3)), jnp.float32)
  variables = grouped.init(jax.random.key(0), x, False)
  leaves = lambda v: [(p, a.shape) for p, a in jax.tree_util.tree_leaves_with_path(v)]
  assert leaves(taps.init(jax.random.key(0), x, False)) == leaves(variables)
  np.testing.assert_allclose(taps.apply(variables, x, False)[0],
                             grouped.apply(variables, x, False)[0], rtol=1e-5, atol=1e-5)
  assert summary.count_mult_adds(taps, variables, (8, 8, 3)) == summary.count_mult_adds(
      grouped, variables, (8, 8, 3))
  config.model.depthwise_impl = "cudnn"
  with pytest.raises(ValueError, match=r"config\.model\.depthwise_impl = 'cudnn' is invalid"):
    trainer_lib.validate_train_config(config)


def test_build_network_picks_the_network_and_checks_the_image_size():
  config = tiny_config()
  model = trainer_lib.build_network(config.model, GENOTYPE, NUM_CLASSES, (8, 8, 3))
  assert isinstance(model, networks.NetworkCIFAR)
  assert (model.C, model.layers, model.auxiliary, model.num_classes) == (4, 3, True, 10)
  # At 64x64 the CIFAR auxiliary head would see a 3x3 map (the network's own check).
  with pytest.raises(ValueError, match=r"config\.model\.network = 'cifar' .* too large"):
    trainer_lib.build_network(config.model, GENOTYPE, NUM_CLASSES, (64, 64, 3))
  config.model.auxiliary = False
  trainer_lib.build_network(config.model, GENOTYPE, NUM_CLASSES, (64, 64, 3))
  with pytest.raises(ValueError, match="FactorizedReduce needs even spatial sizes"):
    trainer_lib.build_network(config.model, GENOTYPE, NUM_CLASSES, (9, 9, 3))
  config.model.network = "imagenet"
  model = trainer_lib.build_network(config.model, GENOTYPE, 1000, (32, 32, 3))
  assert isinstance(model, networks.NetworkImageNet)


def test_imagenet_trainer_traces_without_drop_path_and_with_label_smoothing():
  config = trainer_lib.imagenet_train_config()
  config.model.layers, config.model.channels = 3, 4
  model = trainer_lib.build_network(config.model, GENOTYPE, NUM_CLASSES, (32, 32, 3))
  trainer = trainer_lib.Trainer(model, config, 5)
  images = jax.ShapeDtypeStruct((4, 32, 32, 3), jnp.float32)
  labels = jax.ShapeDtypeStruct((4,), jnp.int32)
  state = jax.eval_shape(trainer.init, jax.random.key(0), images)
  new_state, metrics = jax.eval_shape(trainer.train_step, state, images, labels)
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  assert all(m.shape == () for m in metrics.values())


# --------------------------------------------------------------------------------- init

def test_init_is_pytorch_default_initialisation_with_the_model_shapes(setup):
  model, state, images = setup["model"], setup["state"], setup["images"]
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), images[:1], False))
  assert jax.tree.map(lambda a: (a.shape, a.dtype), shapes["params"]) == jax.tree.map(
      lambda a: (a.shape, a.dtype), state.params)
  assert jax.tree.structure(shapes["batch_stats"]) == jax.tree.structure(state.batch_stats)
  flat = flax.traverse_util.flatten_dict(state.params)
  for path, value in flat.items():
    value = np.asarray(value)
    if path[-1] == "scale":
      np.testing.assert_array_equal(value, 1.0)
    elif path[-1] == "bias" and path[:-1] + ("scale",) in flat:
      np.testing.assert_array_equal(value, 0.0)
    else:  # Conv / Dense kernels and Dense biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
      bound = 1 / math.sqrt(math.prod(flat[path[:-1] + ("kernel",)].shape[:-1]))
      assert np.abs(value).max() <= bound
  for path, value in flax.traverse_util.flatten_dict(state.batch_stats).items():
    np.testing.assert_array_equal(value, 0.0 if path[-1] == "mean" else 1.0)
  # The largest kernel (2x2x128x768) pins the distribution: U(-b, b) has std b / sqrt(3).
  kernel = np.asarray(state.params["auxiliary_head"]["conv2"]["kernel"], np.float64)
  bound = 1 / math.sqrt(2 * 2 * 128)
  assert abs(kernel.std() - bound / math.sqrt(3)) < 0.01 * bound
  assert abs(kernel.mean()) < 0.01 * bound
  assert int(state.step) == 0 and state.rng.dtype == jnp.uint32
  jax.tree.map(lambda t: np.testing.assert_array_equal(t, 0.0),
               optax.tree_utils.tree_get(state.opt_state, "trace"))
  assert networks.count_params(state.params) == networks.count_params(shapes["params"])


def test_init_accepts_raw_key_data_and_shapes_only(setup):
  trainer, state = setup["trainer"], setup["state"]
  sample = jax.ShapeDtypeStruct((5, 8, 8, 3), jnp.float32)
  again = trainer.init(jax.random.key_data(jax.random.key(0)), sample)
  assert_trees_equal(again, state)
  abstract = jax.eval_shape(trainer.init, jax.random.key(0), sample)
  assert jax.tree.map(lambda a: a.shape, abstract) == jax.tree.map(jnp.shape, state)


def test_init_refuses_parameters_it_does_not_know():
  class WithAlpha(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      return x * self.param("alpha", nn.initializers.ones, (3,))

  with pytest.raises(ValueError, match="params/alpha"):
    trainer_lib.init_variables(WithAlpha(), jax.random.key(0),
                               jax.ShapeDtypeStruct((1, 3), jnp.float32))


# ------------------------------------------------------------------------ loss pieces

@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_label_smoothing_cross_entropy_against_numpy(eps):
  rng = np.random.default_rng(1)
  logits = rng.normal(scale=3.0, size=(6, 7))
  labels = rng.integers(0, 7, size=6)
  got = trainer_lib.cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(labels), eps)
  np.testing.assert_allclose(got, np_smoothed_ce(logits, labels, eps), rtol=1e-5)


def test_topk_correct_against_numpy_argsort():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(64, 10))
  labels = rng.integers(0, 10, size=64)
  order = np.argsort(-logits, axis=-1)
  for k in (1, 5):
    expected = (order[:, :k] == labels[:, None]).any(-1)
    got = trainer_lib.topk_correct(jnp.asarray(logits, jnp.float32), jnp.asarray(labels), k)
    np.testing.assert_array_equal(got, expected)
    assert 0 < expected.sum() < 64
  assert bool(trainer_lib.topk_correct(jnp.ones((2, 3)), jnp.array([0, 2]), 5).all())


# --------------------------------------------------------------------------- the step

def test_train_step_against_numpy_loss_and_torch_sgd(setup):
  trainer, model = setup["trainer"], setup["model"]
  images, labels = setup["images"], setup["labels"]
  state, _ = run_steps(setup, setup["state"], 3)  # Step 3: epoch 1, momentum in use.
  new_state, (metrics,) = run_steps(setup, state)

  @jax.jit
  def reference(params, rate):
    """Logits with the step's drop-path rate and key, and the gradient of a separately
    written loss (log_softmax against smoothed one-hot targets)."""
    def loss(params):
      (logits, logits_aux), _ = model.apply(
          {"params": params, "batch_stats": state.batch_stats}, images, True,
          drop_path_prob=rate, rngs={"drop_path": trainer.step_key(state)},
          mutable=["batch_stats"])
      targets = (1 - SMOOTHING) * jax.nn.one_hot(labels, NUM_CLASSES) + SMOOTHING / NUM_CLASSES
      ce = lambda z: -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(z), -1))
      return ce(logits) + AUX_WEIGHT * ce(logits_aux), (logits, logits_aux)
    return jax.grad(loss, has_aux=True)(params)

  rate = DROP_PATH * 1 / EPOCHS
  grads, (logits, logits_aux) = reference(state.params, rate)
  main = np_smoothed_ce(logits, labels, SMOOTHING).mean()
  aux = np_smoothed_ce(logits_aux, labels, SMOOTHING).mean()
  np.testing.assert_allclose(metrics["main_loss"], main, rtol=1e-5)
  np.testing.assert_allclose(metrics["aux_loss"], aux, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss"], main + 0.4 * aux, rtol=1e-5)
  np.testing.assert_allclose(metrics["top1"],
                             np.mean(np.argmax(logits, -1) == np.asarray(labels)))
  np.testing.assert_allclose(metrics["drop_path_prob"], rate, rtol=1e-6)
  # The rate reaches the network: without drop path the same key gives another loss.
  _, (logits0, _) = reference(state.params, 0.0)
  assert abs(np_smoothed_ce(logits0, labels, SMOOTHING).mean() - main) > 1e-3

  # PyTorch: clip the raw gradient to norm 5, add weight decay, momentum, lr of epoch 1.
  optim = setup["config"].train.optim
  g = jax.tree.map(lambda a: np.asarray(a, np.float64), grads)
  norm = np.sqrt(sum((a**2).sum() for a in jax.tree.leaves(g)))
  np.testing.assert_allclose(metrics["grad_norm"], norm, rtol=1e-4)
  clip = min(1.0, optim.grad_clip / (norm + 1e-6))
  lr = optim.lr * (1 + np.cos(np.pi * 1 / EPOCHS)) / 2
  np.testing.assert_allclose(metrics["lr"], lr, rtol=1e-6)
  old_buf = optax.tree_utils.tree_get(state.opt_state, "trace")

  def torch_sgd(w, grad, buf):
    w = np.asarray(w, np.float64)
    buf = optim.momentum * np.asarray(buf, np.float64) + clip * grad + optim.weight_decay * w
    return w - lr * buf

  expected = jax.tree.map(torch_sgd, state.params, g, old_buf)
  jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6),
               new_state.params, expected)
  assert int(new_state.step) == 4


def np_conv3x3(x, kernel):
  """Stride-1, padding-1 cross-correlation (Flax Conv) of NHWC ``x`` with an HWIO kernel."""
  h, w = x.shape[1:3]
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return sum(padded[:, i:i + h, j:j + w] @ kernel[i, j] for i in range(3) for j in range(3))


def test_train_step_updates_batchnorm_running_statistics(setup):
  state = setup["state"]
  new_state, _ = run_steps(setup, state)
  stem = np_conv3x3(np.asarray(setup["images"], np.float64),
                    np.asarray(state.params["stem_conv"]["kernel"], np.float64))
  # PyTorch's rule from mean 0 / var 1: momentum 0.1, the unbiased batch variance.
  stats = new_state.batch_stats["stem_bn"]
  np.testing.assert_allclose(stats["mean"], 0.1 * stem.mean((0, 1, 2)), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * stem.reshape(-1, stem.shape[-1]).var(
      axis=0, ddof=1), rtol=1e-4)


def test_drop_path_ramps_linearly_per_epoch_and_lr_follows_the_schedule(setup):
  trainer = setup["trainer"]
  _, metrics = run_steps(setup, setup["state"], 6)
  for step, m in enumerate(metrics):
    epoch = step // STEPS_PER_EPOCH
    np.testing.assert_allclose(m["drop_path_prob"], DROP_PATH * epoch / EPOCHS, rtol=1e-6)
    np.testing.assert_allclose(m["lr"], 0.025 * (1 + np.cos(np.pi * epoch / EPOCHS)) / 2,
                               rtol=1e-6)
  # The last step of the run uses epoch epochs - 1, as the reference's last epoch.
  np.testing.assert_allclose(trainer.drop_path_prob(jnp.int32(EPOCHS * STEPS_PER_EPOCH - 1)),
                             DROP_PATH * (EPOCHS - 1) / EPOCHS, rtol=1e-6)


def test_training_lowers_the_loss_on_a_fixed_batch(setup):
  trainer = setup["trainer"]
  images, labels = setup["images"], setup["labels"]
  mask = jnp.ones(labels.shape, bool)
  eval_step = jax.jit(trainer.eval_step)
  before = eval_step(setup["state"], images, labels, mask)
  state, metrics = run_steps(setup, setup["state"], 20)
  after = eval_step(state, images, labels, mask)
  first = float(metrics[0]["main_loss"])
  last = np.mean([float(m["main_loss"]) for m in metrics[-5:]])
  # Measured: 4.79 -> 1.02 in training; in eval mode 19.1 -> 13.3 (the running statistics
  # lag the weights) and 1 -> 3 of 8 correct.
  assert last < 0.4 * first
  assert float(after["loss_sum"]) < 0.8 * float(before["loss_sum"])
  assert float(after["top1_correct"]) > float(before["top1_correct"])


# --------------------------------------------------------------------------------- eval

def test_eval_step_sums_over_the_mask_against_numpy(setup):
  trainer, model = setup["trainer"], setup["model"]
  state, _ = run_steps(setup, setup["state"], 2)  # Running statistics away from 0 / 1.
  rng = np.random.default_rng(3)
  images = rng.normal(size=(12, 8, 8, 3))
  labels = rng.integers(0, NUM_CLASSES, size=12)
  mask = rng.permutation(np.arange(12) < 9)
  images[~mask] = np.nan  # Padding rows must not leak into the sums.
  images, labels_j = jnp.asarray(images, jnp.float32), jnp.asarray(labels, jnp.int32)
  sums = jax.jit(trainer.eval_step)(state, images, labels_j, jnp.asarray(mask))
  logits, logits_aux = jax.jit(lambda v, x: model.apply(v, x, False))(
      {"params": state.params, "batch_stats": state.batch_stats}, images)
  assert logits_aux is None
  logits, labels = np.asarray(logits, np.float64)[mask], labels[mask]
  # Plain cross-entropy, although this config trains with label smoothing 0.1.
  np.testing.assert_allclose(sums["loss_sum"], np_smoothed_ce(logits, labels, 0.0).sum(),
                             rtol=1e-5)
  order = np.argsort(-logits, axis=-1)
  for k in (1, 5):
    assert float(sums[f"top{k}_correct"]) == (order[:, :k] == labels[:, None]).any(-1).sum()
  assert float(sums["count"]) == 9

  # Evaluation has no drop path and no auxiliary loss: other rates and weights change nothing.
  other = trainer_lib.Trainer(model, tiny_config(drop_path_prob=0.0, auxiliary_weight=0.0),
                              STEPS_PER_EPOCH)
  assert_trees_equal(jax.jit(other.eval_step)(state, images, labels_j, jnp.asarray(mask)),
                     sums)


# ------------------------------------------------- determinism, donation, resume

def test_step_is_deterministic_donates_its_state_and_resume_reproduces(setup):
  trainer, step = setup["trainer"], setup["step"]
  images, labels = setup["images"], setup["labels"]
  state, _ = run_steps(setup, setup["state"], 2)  # Epoch 1: drop path draws masks.
  copy = jax.tree.map(jnp.copy, state)
  once = step(copy, images, labels)
  assert all(leaf.is_deleted() for leaf in jax.tree.leaves(copy))
  assert_trees_equal(step(jax.tree.map(jnp.copy, state), images, labels), once)

  # A restored checkpoint continues exactly: same masks (step-folded key), lr and momentum.
  template = jax.eval_shape(trainer.init, jax.random.key(0), images)
  restored = flax.serialization.from_bytes(template, flax.serialization.to_bytes(state))
  assert_trees_equal(step(restored, images, labels), once)
  assert not np.array_equal(jax.random.key_data(trainer.step_key(state)),
                            jax.random.key_data(trainer.step_key(once[0])))


# ----------------------------------------------------------------------- data parallel

TWO_DEVICES = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from nanas_jax.spaces import get_genotype
    from nanas_jax.train import trainer as trainer_lib

    config = trainer_lib.default_train_config()
    config.model.layers, config.model.channels = 3, 4
    config.model.drop_path_prob, config.train.epochs = 0.3, 4
    model = trainer_lib.build_network(config.model, get_genotype("DARTS_V2"), 10, (8, 8, 3))
    trainer = trainer_lib.Trainer(model, config, 1)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(8, 8, 8, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, 8), jnp.int32)
    step = jax.jit(trainer.train_step)
    state, _ = step(trainer.init(jax.random.key(0), images), images, labels)  # Epoch 1.
    single, single_metrics = step(state, images, labels)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    shard = lambda tree, spec: jax.device_put(tree, NamedSharding(mesh, spec))
    sharded, sharded_metrics = step(shard(state, P()), shard(images, P("data")),
                                    shard(labels, P("data")))
    diff = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                        single, sharded)
    print(json.dumps({"devices": len(sharded_metrics["loss"].sharding.device_set),
                      "max_state_diff": max(jax.tree.leaves(diff)),
                      "single": {k: float(v) for k, v in single_metrics.items()},
                      "sharded": {k: float(v) for k, v in sharded_metrics.items()}}))
""")


def test_step_on_a_batch_sharded_over_two_devices_equals_one_device():
  # A subprocess: the device count is fixed when JAX starts, and this one has one device.
  env = dict(os.environ, XLA_FLAGS=parallel.fake_cpu_devices_xla_flags(2))
  result = subprocess.run([sys.executable, "-c", TWO_DEVICES], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert out["devices"] == 2
  # BatchNorm statistics and the loss over the global batch, the same drop-path masks.
  assert out["single"]["drop_path_prob"] > 0
  for name, value in out["single"].items():
    assert out["sharded"][name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
  assert out["max_state_diff"] < 1e-5
