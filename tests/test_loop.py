"""Tests of the shared epoch loop: resume, preemption, NaN stops, metrics and evaluation.

A toy run (linear regression by SGD on a fixed synthetic stream) drives the real loop, so
every test is fast; the supernet runs through the same loop in test_resume.py.
"""

import glob
import json
import os
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from nanas_jax import loop, parallel

STEPS, EPOCHS, BATCH = 4, 3, 8


class ToyStream:
  """Deterministic batches of ``y = x . w_true`` keyed on (epoch, position)."""
  steps_per_epoch = STEPS

  def batches(self, epoch, start=0):
    for i in range(start, STEPS):
      rng = np.random.default_rng([epoch, i])
      x = rng.normal(size=(BATCH, 3)).astype(np.float32)
      yield (x, x @ np.array([1.0, -2.0, 0.5], np.float32))

  def eval_batches(self):
    x = np.arange(15, dtype=np.float32).reshape(5, 3)
    yield x[:4], x[:4].sum(1), np.ones(4, bool)
    yield np.concatenate([x[4:], x[:3]]), np.concatenate([x[4:], x[:3]]).sum(1), \
        np.array([True, False, False, False])


def make_state():
  return {"w": jnp.zeros(3), "step": jnp.zeros((), jnp.int32), "rng": jax.random.key(0)}


@jax.jit
def toy_step(state, batch, nan_at=-1):
  x, y = batch
  loss, grad = jax.value_and_grad(lambda w: jnp.mean((x @ w - y) ** 2))(state["w"])
  rng, key = jax.random.split(state["rng"])
  # The rng moves every step, so a resume that lost it would not be bitwise equal.
  w = state["w"] - 0.2 * grad + 1e-3 * jax.random.normal(key, (3,))
  loss = jnp.where(state["step"] + 1 == nan_at, jnp.nan, loss)
  return {"w": w, "step": state["step"] + 1, "rng": rng}, {"loss": loss}


def config(every_steps=0, keep=3):
  c = ml_collections.ConfigDict()
  c.log_every_steps = 1
  c.checkpoint = ml_collections.ConfigDict({"every_steps": every_steps, "keep": keep})
  return c


def run(workdir, step_fn=toy_step, epochs=EPOCHS, **kwargs):
  mesh = parallel.data_mesh()
  epochs_seen = []

  def end_of_epoch(state, epoch, means, extra):
    epochs_seen.append(epoch)
    extra["epochs"] = extra.get("epochs", 0) + 1
    return {"epoch": epoch + 1, **means}

  result = loop.run_epochs(
      workdir=str(workdir), config=config(**kwargs), mesh=mesh,
      state=parallel.replicate(make_state(), mesh), step_fn=step_fn,
      batches_fn=lambda e, s: ((b,) for b in ToyStream().batches(e, s)),
      steps_per_epoch=STEPS, epochs=epochs, end_of_epoch=end_of_epoch,
      finite_keys=("loss",), hint="Lower the learning rate.")
  return result, epochs_seen


def records(workdir):
  with open(os.path.join(workdir, loop.METRICS_FILE)) as f:
    return [json.loads(line) for line in f]


def test_uninterrupted_run_writes_metrics_tensorboard_and_checkpoints(tmp_path):
  result, epochs = run(tmp_path)
  assert epochs == [0, 1, 2] and result.resumed_from is None
  assert int(result.state["step"]) == STEPS * EPOCHS
  recs = records(tmp_path)
  step_losses = [r["loss"] for r in recs if "loss" in r]
  assert len(step_losses) == STEPS * EPOCHS
  epoch_recs = [r for r in recs if "epoch" in r]
  # Each epoch record holds the mean of exactly that epoch's step losses.
  for r in epoch_recs:
    e = r["epoch"] - 1
    assert r["mean_loss"] == pytest.approx(np.mean(step_losses[e * STEPS:(e + 1) * STEPS]))
  assert glob.glob(str(tmp_path / "events.out.tfevents*"))
  assert sorted(os.listdir(tmp_path / loop.CHECKPOINT_DIR)) == ["12", "4", "8"]
  # The loss falls: the toy problem is learnable.
  assert step_losses[-1] < 0.2 * step_losses[0]


def test_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path):
  full, _ = run(tmp_path / "full")
  run(tmp_path / "part", epochs=1)
  resumed, epochs = run(tmp_path / "part", every_steps=1)
  assert resumed.resumed_from == STEPS and epochs == [1, 2]
  assert resumed.extra == {"epochs": EPOCHS}
  np.testing.assert_array_equal(np.asarray(full.state["w"]), np.asarray(resumed.state["w"]))
  np.testing.assert_array_equal(jax.random.key_data(full.state["rng"]),
                                jax.random.key_data(resumed.state["rng"]))


def test_keep_bounds_the_checkpoints(tmp_path):
  run(tmp_path, every_steps=1, keep=2)
  assert sorted(os.listdir(tmp_path / loop.CHECKPOINT_DIR)) == ["11", "12"]


def test_nan_stops_without_saving_and_the_last_checkpoint_is_good(tmp_path):
  def step(state, batch):
    return toy_step(state, batch, nan_at=7)

  with pytest.raises(FloatingPointError, match=r"step 7.*last good checkpoint \(step 6\)"):
    run(tmp_path, step_fn=step, every_steps=2)
  checkpoints = loop.Checkpoints(str(tmp_path / loop.CHECKPOINT_DIR), keep=3)
  assert checkpoints.latest_step() == 6
  state, meta = checkpoints.restore(6, make_state())
  assert int(state["step"]) == 6 and meta["step"] == 6
  assert np.all(np.isfinite(np.asarray(state["w"])))
  checkpoints.close()


def test_sigterm_saves_a_checkpoint_and_the_rerun_finishes_identically(tmp_path):
  def step(state, batch):
    if int(state["step"]) == 5:
      os.kill(os.getpid(), signal.SIGTERM)
    return toy_step(state, batch)

  previous = signal.getsignal(signal.SIGTERM)
  with pytest.raises(loop.Preempted, match="step 6"):
    run(tmp_path / "a", step_fn=step)
  # The handler is removed again after the loop.
  assert signal.getsignal(signal.SIGTERM) == previous
  assert "6" in os.listdir(tmp_path / "a" / loop.CHECKPOINT_DIR)
  resumed, _ = run(tmp_path / "a")
  full, _ = run(tmp_path / "b")
  assert resumed.resumed_from == 6
  np.testing.assert_array_equal(np.asarray(full.state["w"]), np.asarray(resumed.state["w"]))


def test_a_short_stream_is_an_error_not_a_hang(tmp_path):
  mesh = parallel.data_mesh()
  with pytest.raises(RuntimeError, match="yielded 3 of its 4 batches"):
    loop.run_epochs(
        workdir=str(tmp_path), config=config(), mesh=mesh,
        state=parallel.replicate(make_state(), mesh), step_fn=toy_step,
        batches_fn=lambda e, s: ((b,) for b in list(ToyStream().batches(e, s))[:3 - s]),
        steps_per_epoch=STEPS, epochs=1, end_of_epoch=lambda *a: {},
        finite_keys=("loss",), hint="")


def test_evaluate_sums_exactly_the_unmasked_rows():
  mesh = parallel.data_mesh()

  @jax.jit
  def sums(state, x, y, mask):
    m = mask.astype(jnp.float32)
    return {"err": jnp.sum(jnp.abs(x.sum(1) - y) * m), "sum": jnp.sum(y * m),
            "count": jnp.sum(m)}

  totals = loop.evaluate(sums, None, ToyStream(), mesh)
  assert totals == {"err": 0.0, "sum": float(np.arange(15).sum()), "count": 5.0}


@pytest.mark.parametrize("field,value", [("every_steps", -1), ("keep", 0)])
def test_bad_checkpoint_config_names_the_field(field, value):
  c = config()
  c.checkpoint[field] = value
  with pytest.raises(ValueError, match=f"config.checkpoint.{field}"):
    loop.validate_checkpoint_config(c)


def test_url_workdirs_are_refused_with_the_fix():
  with pytest.raises(ValueError, match="mount the bucket"):
    loop.check_workdir("gs://bucket/run")
  loop.check_workdir("/mnt/gcs/run")
