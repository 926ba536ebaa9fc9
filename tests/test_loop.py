"""Tests of the shared epoch loop: resume, interruptions, damaged checkpoints, NaN stops,
metrics, the console line and evaluation.

A toy run (linear regression by SGD on a fixed synthetic stream) drives the real loop and
writes real orbax checkpoints, so every test is fast; the supernet runs through the same
loop in test_resume.py.
"""

import glob
import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from tensorboard_events import tensorboard_values

from nanas_jax import cli, events, loop, parallel

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


def config(every_steps=0, keep=3, every_seconds=0):
  c = ml_collections.ConfigDict()
  c.log_every_steps = 1
  c.checkpoint = ml_collections.ConfigDict({"every_steps": every_steps, "keep": keep,
                                            "every_seconds": every_seconds})
  return c


def run(workdir, step_fn=toy_step, epochs=EPOCHS, console_keys=loop.DEFAULT_CONSOLE_KEYS,
        memory_hint="", **kwargs):
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
      finite_keys=("loss",), hint="Lower the learning rate.", memory_hint=memory_hint,
      console_keys=console_keys)
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


# A program whose output (4 TiB) XLA cannot allocate: XLA's own out-of-memory error.
too_big = jax.jit(lambda x: jnp.broadcast_to(x, (2**40,)))


@pytest.mark.parametrize("fail_at,last", [(6, 4), (1, None)])
def test_out_of_memory_stops_with_the_fix_and_the_last_checkpoint_intact(tmp_path, fail_at,
                                                                        last):
  def step(state, batch):
    if int(state["step"]) + 1 == fail_at:
      too_big(1.0)
    return toy_step(state, batch)

  directory = re.escape(str(tmp_path / loop.CHECKPOINT_DIR))
  kept = (rf"The last checkpoint \(step {last}\) is intact in {directory}" if last
          else "No checkpoint had been written yet")
  with pytest.raises(MemoryError, match=(
      rf"out of device memory in step {fail_at}: JaxRuntimeError: RESOURCE_EXHAUSTED: Out "
      rf"of memory allocating 4398046511104 bytes\. Stopped without saving\. {kept}\. To "
      r"fit, try halving the batch\.$")) as raised:
    run(tmp_path, step_fn=step, every_steps=2, memory_hint="halving the batch")
  assert isinstance(raised.value.__cause__, jax.errors.JaxRuntimeError)
  checkpoints = loop.Checkpoints(str(tmp_path / loop.CHECKPOINT_DIR), keep=3)
  assert checkpoints.latest_step() == last
  if last:
    state, meta = checkpoints.restore(last, make_state())
    assert int(state["step"]) == last == meta["step"]
  checkpoints.close()


def test_other_xla_errors_pass_through_unchanged(tmp_path):
  error = jax.errors.JaxRuntimeError("INTERNAL: the compiler failed")

  def step(state, batch):
    raise error

  with pytest.raises(jax.errors.JaxRuntimeError) as raised:
    run(tmp_path, step_fn=step)
  assert raised.value is error


def test_out_of_memory_is_recognised_in_each_platforms_words():
  # The TPU's words as XLA's TPU compiler wrote them (benchmarks/gpu_compile.py --tpu,
  # the reference-size NA-DARTS step with its neighbors in one pass); the GPU's as XLA's
  # GPU allocator words them (xla/stream_executor, `Out of memory while trying to allocate`).
  path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results",
                      "tpu_v5e_compile.jsonl")
  with open(path) as f:
    tpu = [json.loads(line)["error"] for line in f if "RESOURCE_EXHAUSTED" in line]
  assert tpu
  for text in tpu:
    message = text.removeprefix("jax.errors.JaxRuntimeError: ")
    assert loop.out_of_memory(jax.errors.JaxRuntimeError(message)), message
  assert loop.out_of_memory(jax.errors.JaxRuntimeError(
      "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 45097156608 bytes."))
  for other in (jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: too many open files"),
                jax.errors.JaxRuntimeError("INTERNAL: Out of memory? no"),
                MemoryError("RESOURCE_EXHAUSTED: memory")):
    assert not loop.out_of_memory(other)


def test_the_memory_hint_ends_with_the_batch_every_run_can_shrink():
  assert loop.memory_hint((), 64, 1) == (
      "a smaller config.data.batch_size (now 64, 64 per device over 1 device), or more "
      "devices, over which the batch is split")
  assert loop.memory_hint(("A", "B"), 256, 8) == (
      "A; B; or a smaller config.data.batch_size (now 256, 32 per device over 8 devices), "
      "or more devices, over which the batch is split")


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


@pytest.mark.parametrize("field,value", [("every_steps", -1), ("keep", 0),
                                         ("every_seconds", -5)])
def test_bad_checkpoint_config_names_the_field(field, value):
  c = config()
  c.checkpoint[field] = value
  with pytest.raises(ValueError, match=f"config.checkpoint.{field}"):
    loop.validate_checkpoint_config(c)


def test_url_workdirs_are_refused_with_the_fix():
  with pytest.raises(ValueError, match="mount the bucket"):
    loop.check_workdir("gs://bucket/run")
  loop.check_workdir("/mnt/gcs/run")


# ------------------------------------------------------------------------ interruptions
def test_ctrl_c_saves_at_the_interrupted_step_and_the_rerun_finishes_identically(tmp_path):
  def step(state, batch):
    if int(state["step"]) == 5:
      os.kill(os.getpid(), signal.SIGINT)
    return toy_step(state, batch)

  previous = signal.getsignal(signal.SIGINT)
  with pytest.raises(loop.Preempted, match="interrupted: saved a checkpoint at step 6") as e:
    run(tmp_path / "a", step_fn=step)
  assert e.value.signum == signal.SIGINT
  # Python's own Ctrl-C handling is back after the loop.
  assert signal.getsignal(signal.SIGINT) == previous
  assert sorted(os.listdir(tmp_path / "a" / loop.CHECKPOINT_DIR)) == ["4", "6"]
  resumed, _ = run(tmp_path / "a")
  full, _ = run(tmp_path / "b")
  assert resumed.resumed_from == 6
  np.testing.assert_array_equal(np.asarray(full.state["w"]), np.asarray(resumed.state["w"]))


def test_a_second_ctrl_c_stops_at_once_without_saving(tmp_path):
  # The step blocks far longer than the test waits: only the signal thread can end it.
  script = textwrap.dedent(f"""
      import sys, time
      sys.path.insert(0, {os.path.dirname(__file__)!r})
      import test_loop

      def step(state, batch):
        if int(state["step"]) == 2:
          print("blocked", flush=True)
          time.sleep(600)
        return test_loop.toy_step(state, batch)

      test_loop.run({str(tmp_path)!r}, step_fn=step)
      """)
  proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  assert proc.stdout.readline() == "blocked\n", proc.stderr.read()[-3000:]
  proc.send_signal(signal.SIGINT)
  time.sleep(1)
  assert proc.poll() is None, "the first Ctrl-C waits for the step to end"
  t = time.monotonic()
  proc.send_signal(signal.SIGINT)
  assert proc.wait(timeout=30) == 130
  assert time.monotonic() - t < 10
  stderr = proc.stderr.read()
  assert "Ctrl-C again stops at once" in stderr
  assert "Second Ctrl-C: stopped at once, without saving" in stderr
  assert not os.path.exists(tmp_path / loop.CHECKPOINT_DIR / "2")
  assert not os.path.exists(tmp_path / loop.CHECKPOINT_DIR / "3")


def test_checkpoints_by_time(tmp_path, monkeypatch):
  class Clock:
    """The loop's clock; every step takes 10 s of it."""
    now = 0.0

    def monotonic(self):
      return self.now

  clock = Clock()
  monkeypatch.setattr(loop, "time", clock)

  def step(state, batch):
    clock.now += 10
    return toy_step(state, batch)

  run(tmp_path, step_fn=step, every_seconds=25, keep=10)
  # 25 s after the last checkpoint (epoch ends at 4, 8, 12 save anyway): steps 3, 7, 11.
  assert sorted(map(int, os.listdir(tmp_path / loop.CHECKPOINT_DIR))) == [
      3, 4, 7, 8, 11, 12]


# ------------------------------------------------------------------ damaged checkpoints
def damage(directory, kind):
  """Damages the orbax checkpoint ``directory`` as the issue's user did."""
  data_files = glob.glob(os.path.join(directory, "state", "**", "d", "*"), recursive=True)
  assert data_files
  if kind == "truncated data file":
    for path in data_files:
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
  elif kind == "deleted data file":
    for path in data_files:
      os.remove(path)
  else:
    open(os.path.join(directory, "meta", "metadata"), "w").close()


@pytest.mark.parametrize("kind", ["truncated data file", "deleted data file",
                                  "emptied meta/metadata"])
def test_a_damaged_checkpoint_is_moved_aside_and_the_previous_one_resumes(
    tmp_path, caplog, kind):
  run(tmp_path / "a", epochs=1, every_steps=1)
  checkpoints = tmp_path / "a" / loop.CHECKPOINT_DIR
  assert sorted(os.listdir(checkpoints)) == ["2", "3", "4"]
  damage(str(checkpoints / "4"), kind)
  files_before = sorted(os.path.relpath(p, checkpoints / "4")
                        for p in glob.glob(str(checkpoints / "4" / "**"), recursive=True))
  with caplog.at_level(logging.WARNING):
    resumed, _ = run(tmp_path / "a")
  assert resumed.resumed_from == 3
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1 and "step 4" in warnings[0] and "damaged-4" in warnings[0]
  assert len(warnings[0].splitlines()) == 1 and len(warnings[0]) < 1000
  # Kept aside whole, never deleted; the rerun wrote a new checkpoint 4 meanwhile.
  assert sorted(os.path.relpath(p, checkpoints / "damaged-4") for p in glob.glob(
      str(checkpoints / "damaged-4" / "**"), recursive=True)) == files_before
  full, _ = run(tmp_path / "b")
  np.testing.assert_array_equal(np.asarray(full.state["w"]), np.asarray(resumed.state["w"]))


def test_when_no_checkpoint_restores_the_error_gives_the_choices(tmp_path):
  run(tmp_path, epochs=1, every_steps=2)
  for step in ("2", "4"):
    damage(str(tmp_path / loop.CHECKPOINT_DIR / step), "deleted data file")
  with pytest.raises(cli.UserError, match=r"none of the 2 checkpoints.*rerun the same "
                     r"command to start this workdir over.*new --workdir"):
    run(tmp_path)
  assert sorted(os.listdir(tmp_path / loop.CHECKPOINT_DIR)) == ["damaged-2", "damaged-4"]


def test_a_checkpoint_of_another_shape_is_a_config_change_not_damage(tmp_path):
  run(tmp_path, epochs=1)
  mesh = parallel.data_mesh()
  bigger = {**make_state(), "w": jnp.zeros(4)}
  with pytest.raises(cli.UserError, match="step 4.*other shapes.*config changed"):
    loop.run_epochs(
        workdir=str(tmp_path), config=config(), mesh=mesh,
        state=parallel.replicate(bigger, mesh), step_fn=toy_step,
        batches_fn=lambda e, s: ((b,) for b in ToyStream().batches(e, s)),
        steps_per_epoch=STEPS, epochs=2, end_of_epoch=lambda *a: {},
        finite_keys=("loss",), hint="")
  assert os.listdir(tmp_path / loop.CHECKPOINT_DIR) == ["4"]


# ---------------------------------------------------------------------------- metrics
def test_rows_of_a_lost_session_are_superseded_not_duplicated(tmp_path):
  def step(state, batch):
    return toy_step(state, batch, nan_at=7)

  # Steps 5 and 6 are logged, then the run stops at step 7 with its last checkpoint at 4;
  # a kill could also cut a line in half.
  with pytest.raises(FloatingPointError):
    run(tmp_path, step_fn=step)
  with open(tmp_path / loop.METRICS_FILE, "a") as f:
    f.write('{"step": 7, "lo')
  resumed, _ = run(tmp_path)
  assert resumed.resumed_from == 4
  steps = [r["step"] for r in records(tmp_path) if "loss" in r]
  assert steps == list(range(1, STEPS * EPOCHS + 1))
  assert [r["epoch"] for r in records(tmp_path) if "epoch" in r] == [1, 2, 3]
  superseded = (tmp_path / "metrics.superseded.jsonl").read_text().splitlines()
  assert [json.loads(line)["step"] for line in superseded[:2]] == [5, 6]
  assert superseded[2] == '{"step": 7, "lo'
  # The rows kept are the first session's own, unchanged.
  full, _ = run(tmp_path / "full")
  assert [r["loss"] for r in records(tmp_path) if "loss" in r] == pytest.approx(
      [r["loss"] for r in records(tmp_path / "full") if "loss" in r], rel=1e-6)
  # TensorBoard, read as TensorBoard reads it: each step once, in order, with the values
  # of metrics.jsonl; the lost session's steps 5 and 6 in the run "superseded".
  drawn = tensorboard_values(tmp_path, "loss")
  assert [s for s, _ in drawn] == list(range(1, STEPS * EPOCHS + 1))
  assert [v for _, v in drawn] == pytest.approx(
      [r["loss"] for r in records(tmp_path) if "loss" in r], rel=1e-6)
  assert [s for s, _ in tensorboard_values(tmp_path / events.SUPERSEDED_DIR, "loss")
          ] == [5, 6]
  assert [s for s, _ in tensorboard_values(tmp_path, "mean_loss")] == [4, 8, 12]


def test_the_console_line_shows_the_chosen_keys_once_known(tmp_path, caplog):
  def step(state, batch):
    state, metrics = toy_step(state, batch)
    # A metric the step adds later (the way a run may add alpha_entropy) appears then.
    if int(state["step"]) >= 6:
      metrics = {**metrics, "alpha_entropy": jnp.float32(1.5)}
    return state, metrics

  with caplog.at_level(logging.INFO):
    run(tmp_path, step_fn=step, console_keys=("loss", "alpha_entropy", "mean_loss"))
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
  assert len(lines) == STEPS * EPOCHS
  losses = [r["loss"] for r in records(tmp_path) if "loss" in r]
  assert lines[0] == f"step 1/12  epoch 1/3  loss {losses[0]:.4g}"
  assert lines[4].startswith(f"step 5/12  epoch 2/3  loss {losses[4]:.4g}  mean_loss ")
  assert lines[5].startswith(f"step 6/12  epoch 2/3  loss {losses[5]:.4g}  alpha_entropy 1.5"
                             "  mean_loss ")
  assert all(re.search(r"steps/s, ETA \d+ s$", line) for line in lines[1:-1])
  assert lines[-1].endswith("ETA 0 s")
  # The first epoch record's mean, shown from the next step on.
  epoch1 = [r for r in records(tmp_path) if r.get("epoch") == 1][0]
  assert f"mean_loss {epoch1['mean_loss']:.4g}" in lines[4]


def test_console_line_and_durations():
  assert loop.format_duration(42.4) == "42 s"
  assert loop.format_duration(185) == "3 min 05 s"
  assert loop.format_duration(7620) == "2 h 07 min"
  line = loop.console_line(step=30, total=84, steps_per_epoch=14,
                           values={"train_loss": 2.08123, "val_accuracy": 0.5, "x": 1.0},
                           keys=("train_loss", "arch_loss", "val_accuracy"),
                           steps_per_second=2.0)
  assert line == ("step 30/84  epoch 3/6  train_loss 2.081  val_accuracy 0.5  2 steps/s, "
                  "ETA 27 s")


def test_the_compile_clock_counts_overlapping_spans_once_and_only_compile_events():
  report = jax.monitoring.record_event_time_span
  with loop.CompileClock() as clock:
    report("/jax/core/compile/backend_compile_duration", 10.0, 20.0)
    report("/jax/core/compile/jaxpr_trace_duration", 15.0, 25.0)  # overlaps the first
    report("/jax/core/compile/jaxpr_to_mlir_module_duration", 16.0, 18.0)  # inside both
    report("/jax/some/other/event", 26.0, 90.0)
    report("/jax/core/compile/backend_compile_duration", 30.0, 31.5)
    assert clock.take() == 10.0 + 5.0 + 1.5  # [10, 25] and [30, 31.5]
    assert clock.take() == 0.0  # forgotten once taken
  report("/jax/core/compile/backend_compile_duration", 0.0, 5.0)  # after the clock closed
  assert clock.take() == 0.0


def test_the_compile_clock_hears_a_real_compile_within_its_wall_time():
  # The event names are JAX's: a version that renamed them would leave this at 0.
  with loop.CompileClock() as clock:
    start = time.time()
    jax.jit(lambda x: jnp.sin(x) * 3.0 + x[::-1])(np.arange(7.0)).block_until_ready()
    elapsed = time.time() - start
  assert 0 < clock.take() <= elapsed


def test_steps_per_second_leave_out_a_later_compile_and_the_line_names_it(tmp_path, caplog):
  def step(state, batch):
    if int(state["step"]) == 5:  # the sixth step "compiles" for 1.5 s, as JAX reports it
      start = time.time()
      time.sleep(1.5)
      jax.monitoring.record_event_time_span(
          "/jax/core/compile/backend_compile_duration", start, time.time())
    return toy_step(state, batch)

  with caplog.at_level(logging.INFO):
    run(tmp_path, step_fn=step, epochs=2)
  lines = {int(m.group(1)): r.getMessage() for r in caplog.records
           if (m := re.match(r"step (\d+)/", r.getMessage()))}
  assert lines[6].endswith("(2 s compiling left out)")
  assert not any("compiling" in line for at, line in lines.items() if at != 6)
  rate = float(re.search(r"([\d.e+]+) steps/s", lines[6]).group(1))
  assert rate > 5  # the toy step takes milliseconds; 1.5 s counted would give < 0.7
  # TensorBoard's steps/s is the line's (which shows 3 significant digits).
  assert dict(tensorboard_values(tmp_path, "steps_per_sec"))[6] == pytest.approx(
      rate, rel=6e-3)


def test_progress_lines_give_the_rate_and_the_eta(monkeypatch, caplog):
  now = [100.0]
  monkeypatch.setattr(loop, "time", type("Clock", (), {"monotonic": lambda self: now[0]})())
  progress = loop.Progress("scoring", "candidates", every_seconds=10)
  with caplog.at_level(logging.INFO):
    for done in range(1, 11):
      now[0] += 4
      progress(done, 10)
  # The first call, then one at least 10 s after the last, then the end.
  assert [r.getMessage() for r in caplog.records] == [
      "scoring: 1/10 candidates, 0.25 candidates/s, ETA 36 s",
      "scoring: 4/10 candidates, 0.25 candidates/s, ETA 24 s",
      "scoring: 7/10 candidates, 0.25 candidates/s, ETA 12 s",
      "scoring: 10/10 candidates, done in 40 s"]


def test_progress_lines_leave_out_what_jax_compiled_and_name_it(monkeypatch, caplog):
  now = [100.0]
  monkeypatch.setattr(loop, "time", type("Clock", (), {"monotonic": lambda self: now[0]})())
  with caplog.at_level(logging.INFO):
    with loop.Progress("scoring", "candidates", every_seconds=10) as progress:
      for done in range(1, 11):
        now[0] += 4
        if done == 1:  # the first piece compiled for 2 of its 4 s, as JAX reports it
          jax.monitoring.record_event_time_span(
              "/jax/core/compile/backend_compile_duration", 7.0, 9.0)
        progress(done, 10)
    jax.monitoring.record_event_time_span(  # after the block: not heard
        "/jax/core/compile/backend_compile_duration", 0.0, 50.0)
    progress(10, 10)
  # 1 done in 4 - 2 s, 4 in 16 - 2, 7 in 28 - 2.
  assert [r.getMessage() for r in caplog.records] == [
      "scoring: 1/10 candidates, 0.5 candidates/s, ETA 18 s (2 s compiling left out)",
      "scoring: 4/10 candidates, 0.286 candidates/s, ETA 21 s (2 s compiling left out)",
      "scoring: 7/10 candidates, 0.269 candidates/s, ETA 11 s (2 s compiling left out)",
      "scoring: 10/10 candidates, done in 40 s (2 s of it compiling)",
      "scoring: 10/10 candidates, done in 40 s (2 s of it compiling)"]


def test_only_the_closed_loop_callbacks_of_a_failed_restore_are_dropped(monkeypatch):
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(str(u.exc_value)))
  loop._drop_closed_loop_callbacks()  # pylint: disable=protected-access
  loop._drop_closed_loop_callbacks()  # pylint: disable=protected-access
  unraisable = type("Unraisable", (), {})
  for error in (RuntimeError("Event loop is closed"), RuntimeError("other"), ValueError("x")):
    event = unraisable()
    event.exc_value = error
    sys.unraisablehook(event)
  assert seen == ["other", "x"]


def test_the_callbacks_are_dropped_before_restore_latest_reads_anything(tmp_path,
                                                                         monkeypatch):
  """A failed read's late completions (the metadata read's too) can come before the
  failure returns, so the hook is in place before the first read."""
  monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
  checkpoints = loop.Checkpoints(str(tmp_path), keep=2)
  state = make_state()
  checkpoints.save(1, state, {"step": 1})
  checkpoints.wait()
  hooked = []
  check_shapes = loop.Checkpoints._check_shapes  # pylint: disable=protected-access

  def recording(self, step, like):
    hooked.append(getattr(sys.unraisablehook, "drops_closed_loop_callbacks", False))
    return check_shapes(self, step, like)

  monkeypatch.setattr(loop.Checkpoints, "_check_shapes", recording)
  assert checkpoints.restore_latest(state)[2] == 1
  checkpoints.close()
  assert hooked == [True]


def test_workdirs_that_cannot_hold_results_are_refused_with_the_fix(tmp_path):
  (tmp_path / "file").write_text("")
  with pytest.raises(NotADirectoryError, match="is a file, not a directory"):
    loop.check_workdir(str(tmp_path / "file"))
  with pytest.raises(NotADirectoryError, match="is a file, not a directory"):
    loop.check_workdir(str(tmp_path / "file" / "run"))
  if os.geteuid() != 0:  # root may write anywhere
    (tmp_path / "locked").mkdir(mode=0o500)
    with pytest.raises(PermissionError, match="may not write"):
      loop.check_workdir(str(tmp_path / "locked" / "run"))
  loop.check_workdir(str(tmp_path / "new" / "run"))
  assert not (tmp_path / "new").exists()
