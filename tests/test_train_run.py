"""Tests of nanas_jax.train.run: a whole training run of a tiny DARTS_V2 network on the
digits, checked against a direct recomputation from its final checkpoint, against the
summary module's counts at the reference size, against an uninterrupted run after a
preemption (bitwise), and against itself on two devices; refusals before any data is read.

Sizes: 3 cells, C=4, 150 training and 150 test digits, batch 32 (4 steps an epoch), 2
epochs: each run compiles one train step and one eval step (about 15-30 s on 2 cores)."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import train_quickstart
from nanas_jax import loop, parallel, summary
from nanas_jax.data import loaders
from nanas_jax.spaces import get_genotype
from nanas_jax.train import run
from nanas_jax.train import trainer as trainer_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS, CHANNELS, EXAMPLES, BATCH, EPOCHS = 3, 4, 300, 32, 2
TEST_EXAMPLES = EXAMPLES // 2
STEPS_PER_EPOCH = (EXAMPLES - TEST_EXAMPLES) // BATCH


def tiny_config():
  config = train_quickstart.get_config()
  config.data.max_examples = EXAMPLES
  config.data.train_portion = 0.5
  config.data.batch_size = BATCH
  config.model.layers = LAYERS
  config.model.channels = CHANNELS
  config.train.epochs = EPOCHS
  config.train.eval_every_epochs = 1
  config.log_every_steps = 1
  return config


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run of DARTS_V2, read from a genotype file (what a search writes)."""
  tmp = tmp_path_factory.mktemp("reference")
  genotype_file = tmp / "found.txt"
  genotype_file.write_text(str(get_genotype("DARTS_V2")) + "\n")
  config = tiny_config()
  config.model.genotype = "PC_DARTS"  # The file must win.
  config.model.genotype_file = str(genotype_file)
  workdir = str(tmp / "run")
  summary_ = run.run_train(config, workdir)
  return dict(config=config, workdir=workdir, summary=summary_,
              genotype_file=str(genotype_file))


def final_state(config, workdir):
  """The state of the workdir's last checkpoint, and the streams and model of ``config``."""
  streams = loaders.load_train_streams(config.data, config.data.batch_size, config.seed)
  genotype, _ = run.resolve_genotype(config.model)
  model = trainer_lib.build_network(config.model, genotype, streams.num_classes,
                                    streams.image_shape)
  trainer = trainer_lib.Trainer(model, config, streams.train.steps_per_epoch)
  like = trainer.init(jax.random.key(0), jnp.zeros((1, *streams.image_shape)))
  checkpoints = loop.Checkpoints(os.path.join(workdir, loop.CHECKPOINT_DIR), keep=3)
  try:
    step = checkpoints.latest_step()
    state, _ = checkpoints.restore(step, like)
  finally:
    checkpoints.close()
  return state, step, streams, model


def test_results_equal_a_direct_recomputation_from_the_final_checkpoint(reference):
  config, workdir = reference["config"], reference["workdir"]
  results = json.loads(open(os.path.join(workdir, run.RESULTS_FILE)).read())
  state, step, streams, model = final_state(config, workdir)
  assert step == EPOCHS * STEPS_PER_EPOCH == results["epochs"] * results["steps_per_epoch"]
  # The whole test split in one batch (the run evaluates padded batches of 32).
  test = streams.test
  logits, _ = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                          jnp.asarray(test.normalise(test.images)), False)
  logits = np.asarray(logits, np.float64)
  labels = test.labels
  ranked = np.argsort(-logits, axis=1)
  top1 = int((ranked[:, 0] == labels).sum())
  top5 = int((ranked[:, :5] == labels[:, None]).any(axis=1).sum())
  z = logits - logits.max(1, keepdims=True)
  loss = float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(labels)), labels]))
  assert results["test_examples"] == TEST_EXAMPLES == len(labels)
  assert round(results["test_top1"] * TEST_EXAMPLES) == top1
  assert round(results["test_top5"] * TEST_EXAMPLES) == top5
  assert results["test_top5"] >= results["test_top1"]
  np.testing.assert_allclose(results["test_loss"], loss, rtol=1e-4)
  # One evaluation per epoch, each over the whole split; best is the highest of them.
  evaluations = results["evaluations"]
  assert [e["epoch"] for e in evaluations] == [1, 2]
  assert all(e["test_count"] == TEST_EXAMPLES for e in evaluations)
  assert evaluations[-1]["test_top1"] == results["test_top1"]
  best = max(evaluations, key=lambda e: e["test_top1"])
  assert (results["best_test_top1"], results["best_epoch"]) == (best["test_top1"],
                                                                best["epoch"])
  assert results["resumed_from_step"] is None
  assert results["devices"] == 1 and results["global_batch_size"] == BATCH


def test_costs_equal_the_summary_of_the_reference_setting_rescaled(reference):
  """summarize() counts the CIFAR-10 setting (32x32x3); the digits network differs only in
  its stem's input channels (1, not 3) and in every map being 4x4 times smaller."""
  results = json.loads(open(os.path.join(reference["workdir"], run.RESULTS_FILE)).read())
  cifar = summary.summarize("DARTS_V2", "cifar10", LAYERS, CHANNELS)
  stem_out = 3 * CHANNELS
  assert results["params"] == cifar["params"] - 3 * 3 * (3 - 1) * stem_out
  assert (results["params_with_auxiliary"]
          == cifar["params_with_auxiliary"] - 3 * 3 * (3 - 1) * stem_out)
  convs = cifar["mult_adds_by_kind"]["conv"]
  stem_cifar, stem_digits = 9 * 3 * stem_out * 32 * 32, 9 * 1 * stem_out * 8 * 8
  assert (convs - stem_cifar) % 16 == 0
  expected = ((convs - stem_cifar) // 16 + stem_digits
              + cifar["mult_adds_by_kind"]["dense"])
  assert results["mult_adds"] == expected


def test_the_genotype_file_is_what_trains_and_the_workdir_records_it(reference):
  workdir, results = reference["workdir"], reference["summary"]
  darts_v2 = str(get_genotype("DARTS_V2"))
  assert results["genotype"] == darts_v2
  assert reference["genotype_file"] in results["genotype_source"]
  assert open(os.path.join(workdir, run.GENOTYPE_FILE)).read() == darts_v2 + "\n"
  assert os.path.getsize(os.path.join(workdir, "genotype.png")) > 1000
  assert json.loads(open(os.path.join(workdir, "config.json")).read())["model"][
      "genotype_file"] == reference["genotype_file"]
  records = [json.loads(line) for line in open(os.path.join(workdir, loop.METRICS_FILE))]
  epochs = [r for r in records if "epoch" in r]
  assert [r["epoch"] for r in epochs] == [1, 2]
  assert epochs[-1]["test_top1"] == results["test_top1"]
  assert sum("loss" in r and "step" in r and "epoch" not in r
             for r in records) == EPOCHS * STEPS_PER_EPOCH


def test_a_preempted_run_resumes_to_the_uninterrupted_weights(reference, tmp_path,
                                                              monkeypatch):
  config = tiny_config()  # DARTS_V2 by name: the same network as the reference's file.
  workdir = str(tmp_path / "preempted")
  load = loaders.load_train_streams

  def load_and_preempt(*args, **kwargs):
    """Streams whose epoch 0 sends this process SIGTERM when its second batch is read."""
    streams = load(*args, **kwargs)
    batches = streams.train.batches

    def preempting(epoch, start=0):
      for i, batch in enumerate(batches(epoch, start)):
        if epoch == 0 and start + i == 1:
          os.kill(os.getpid(), signal.SIGTERM)
        yield batch

    streams.train.batches = preempting
    return streams

  monkeypatch.setattr(run.loaders, "load_train_streams", load_and_preempt)
  with pytest.raises(loop.Preempted) as preempted:
    run.run_train(config, workdir)
  stopped = preempted.value.step
  assert 0 < stopped < STEPS_PER_EPOCH  # Mid-epoch: resume must restart inside it.
  assert not os.path.exists(os.path.join(workdir, run.RESULTS_FILE))
  monkeypatch.setattr(run.loaders, "load_train_streams", load)
  resumed = run.run_train(config, workdir)
  assert resumed["resumed_from_step"] == stopped

  state, _, _, _ = final_state(config, workdir)
  expected, _, _, _ = final_state(reference["config"], reference["workdir"])
  for got, want in zip(jax.tree.leaves((state.params, state.batch_stats, state.opt_state)),
                       jax.tree.leaves((expected.params, expected.batch_stats,
                                        expected.opt_state))):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  for key in ("test_loss", "test_top1", "test_top5", "evaluations"):
    assert resumed[key] == reference["summary"][key], key


def test_a_finished_workdir_is_refused_and_left_untouched(reference, monkeypatch):
  monkeypatch.setattr(run.loaders, "load_train_streams", _no_data)
  path = os.path.join(reference["workdir"], run.RESULTS_FILE)
  before = open(path).read()
  with pytest.raises(FileExistsError, match="already holds a finished training"):
    run.run_train(reference["config"], reference["workdir"])
  assert open(path).read() == before


def test_a_step_out_of_memory_names_the_batch_to_shrink(tmp_path, monkeypatch):
  """XLA's own out-of-memory error (an output of 4 TiB) in the first training step becomes a
  MemoryError whose fix is the one a training run has: the batch per device."""
  too_big = jax.jit(lambda x: jnp.broadcast_to(x, (2**40,)))
  monkeypatch.setattr(trainer_lib.Trainer, "jit_train_step",
                      lambda self: lambda state, *batches: too_big(1.0))
  with pytest.raises(MemoryError, match=(
      r"^out of device memory in step 1: JaxRuntimeError: RESOURCE_EXHAUSTED: .* To fit, "
      rf"try a smaller config\.data\.batch_size \(now {BATCH}, {BATCH} per device over 1 "
      r"device\), or more devices, over which the batch is split\.$")):
    run.run_train(tiny_config(), str(tmp_path / "w"))


def test_a_workdir_of_another_genotype_is_refused(tmp_path, monkeypatch):
  monkeypatch.setattr(run.loaders, "load_train_streams", _no_data)
  (tmp_path / run.GENOTYPE_FILE).write_text(str(get_genotype("PC_DARTS")) + "\n")
  with pytest.raises(ValueError, match="holds a training of another genotype"):
    run.run_train(tiny_config(), str(tmp_path))


def _no_data(*args, **kwargs):
  raise AssertionError("the run read data before refusing")


@pytest.mark.parametrize("path, value, message", [
    ("train.eval_every_epochs", -1, r"config\.train\.eval_every_epochs = -1 is invalid"),
    ("model.genotype_file", "/nonexistent/genotype.txt",
     r"config\.model\.genotype_file = '/nonexistent/genotype\.txt' is invalid: expected an "
     "existing file"),
    ("model.genotype", "NOT_A_GENOTYPE", r"config\.model\.genotype = 'NOT_A_GENOTYPE'"),
    ("model.layers", 2, r"config\.model\.layers = 2 is invalid"),
    ("data.batch_size", 0, r"config\.data\.batch_size = 0 is invalid"),
    ("data.name", "mnist", r"config\.data\.name = 'mnist'"),
    ("checkpoint.keep", 0, r"config\.checkpoint\.keep = 0 is invalid"),
    ("parallel.distributed", "maybe", r"config\.parallel\.distributed = 'maybe' is invalid"),
    ("train.optim.lr", 0.0, r"config\.train\.optim\.lr = 0\.0 is invalid"),
    ("seed", -1, r"config\.seed = -1 is invalid"),
])
def test_a_bad_config_fails_before_anything_is_read_or_written(tmp_path, monkeypatch, set_field,
                                                              path, value, message):
  monkeypatch.setattr(run.loaders, "load_train_streams", _no_data)
  config = tiny_config()
  set_field(config, path, value)
  workdir = tmp_path / "never"
  with pytest.raises(ValueError, match=message):
    run.run_train(config, str(workdir))
  assert not workdir.exists()


def test_a_missing_dataset_fails_before_anything_is_written(tmp_path):
  config = tiny_config()
  config.data.name = "cifar10"
  config.data.data_dir = str(tmp_path / "no_data")
  with pytest.raises(FileNotFoundError, match="tfds build cifar10"):
    run.run_train(config, str(tmp_path / "never"))
  # No config.json, genotype.txt or picture of a run that never started.
  assert not (tmp_path / "never").exists()


def test_a_genotype_file_of_bad_text_names_the_field(tmp_path):
  bad = tmp_path / "genotype.txt"
  bad.write_text("Genotype(normal=[('conv_9x9', 0)])")
  config = tiny_config()
  config.model.genotype_file = str(bad)
  with pytest.raises(ValueError, match=r"config\.model\.genotype_file = .* is invalid"):
    run.validate_run_config(config)


def test_two_devices_train_like_one(reference, tmp_path):
  """The same run on two (fake CPU) devices: the global batch is split over them, and
  the result equals the one-device run up to the order of floating-point sums."""
  script = textwrap.dedent(f"""
      import json, sys
      sys.path.insert(0, {ROOT!r})
      sys.path.insert(0, {os.path.join(ROOT, 'tests')!r})
      import jax
      assert jax.device_count() == 2
      from test_train_run import tiny_config
      from nanas_jax.train import run
      print(json.dumps(run.run_train(tiny_config(), {str(tmp_path / 'two')!r})))
  """)
  env = dict(os.environ, XLA_FLAGS=parallel.fake_cpu_devices_xla_flags(2),
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  two = json.loads(out.stdout.strip().splitlines()[-1])
  one = reference["summary"]
  assert two["devices"] == 2
  np.testing.assert_allclose(two["test_loss"], one["test_loss"], rtol=1e-3)
  # At most one test prediction may flip on the reordered sums.
  assert abs(two["test_top1"] - one["test_top1"]) * TEST_EXAMPLES <= 1 + 1e-9
