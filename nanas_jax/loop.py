"""The epoch loop shared by every run (bilevel search, weight-sharing training, training
from scratch): checkpoints and resume, preemption, NaN stops, metric writers, progress.

A run gives `run_epochs` its state, a step function and a function that yields the
host-local batches of an epoch from a given batch on; the loop does the rest:

- **Checkpoints** (orbax): the whole state pytree plus JSON metadata (the step, the data
  position, the running epoch sums and whatever the run keeps between epochs, e.g. the best
  genotype so far) under ``workdir/checkpoints/<step>``, every ``checkpoint.every_steps``
  steps and at every epoch end, the last ``checkpoint.keep`` kept. Orbax writes into a
  temporary directory and renames it, so a killed run leaves the previous checkpoint whole;
  every process takes part, so checkpoints of multi-host runs are consistent.
- **Resume**: a run started on a workdir with checkpoints continues from the latest one.
  Batches are a pure function of ``(seed, epoch, position)`` (`nanas_jax.data.streams`), so
  the resumed run sees the data the uninterrupted one would have; on a CPU the final state
  is bitwise the same (tested).
- **Preemption**: SIGTERM (what SLURM, Kubernetes and TPU maintenance send) makes the loop
  finish its step, save a checkpoint and raise `Preempted`; on several processes JAX's
  preemption sync point makes all of them stop at the same step.
- **NaN / Inf**: a non-finite loss stops the run with `FloatingPointError` before anything
  is saved, so the last checkpoint is the last good state.
- **Metrics**: clu writers (TensorBoard event files in the workdir plus the log), and
  ``metrics.jsonl``; `periodic_actions.ReportProgress` logs steps/s and the ETA. Only
  process 0 writes files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from clu import metric_writers, periodic_actions

from nanas_jax import parallel

CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"


class Preempted(Exception):
  """The run stopped on a preemption signal after saving a checkpoint at ``step``."""

  def __init__(self, step: int, directory: str):
    super().__init__(f"preempted: saved a checkpoint at step {step} in {directory}; run the "
                     "same command again to resume.")
    self.step = step


def validate_checkpoint_config(config: ml_collections.ConfigDict) -> None:
  """Fails fast, naming the field, on bad ``config.checkpoint`` or ``log_every_steps``."""
  ckpt = config.get("checkpoint") or ml_collections.ConfigDict()
  every, keep = ckpt.get("every_steps", 0), ckpt.get("keep", 3)
  if not isinstance(every, int) or every < 0:
    raise ValueError(f"config.checkpoint.every_steps = {every!r} is invalid: expected an "
                     "integer >= 0 (0: only at epoch ends).")
  if not isinstance(keep, int) or keep < 1:
    raise ValueError(f"config.checkpoint.keep = {keep!r} is invalid: expected an integer >= 1.")
  log_every = config.get("log_every_steps", 1)
  if not isinstance(log_every, int) or log_every < 1:
    raise ValueError(f"config.log_every_steps = {log_every!r} is invalid: expected an "
                     "integer >= 1.")


def check_workdir(workdir: str) -> None:
  """Results are written with local file operations (atomic renames): a URL workdir
  (``gs://...``) would silently become a local directory named ``gs:``."""
  if "://" in workdir:
    raise ValueError(f"--workdir={workdir} is a URL; mount the bucket (e.g. gcsfuse) on every "
                     "host and pass the mounted path.")


def append_jsonl(path: str, record: dict[str, Any]) -> None:
  with open(path, "a") as f:
    f.write(json.dumps(record) + "\n")


# ------------------------------------------------------------------------- checkpoints
def _keys_to_data(tree: Any) -> Any:
  """Typed PRNG keys as their raw key data (what a checkpoint stores)."""
  return jax.tree.map(
      lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _data_to_keys(tree: Any, like: Any) -> Any:
  """Inverse of `_keys_to_data`, with the key implementations of ``like``."""
  return jax.tree.map(
      lambda x, ref: jax.random.wrap_key_data(x, impl=jax.random.key_impl(ref))
      if _is_key(ref) else x, tree, like)


def _is_key(x: Any) -> bool:
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


class Checkpoints:
  """Orbax checkpoints of ``{'state': pytree, 'meta': JSON}`` in ``directory``."""

  def __init__(self, directory: str, keep: int):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_keys_to_data(state)), meta=ocp.args.JsonSave(meta)))

  def restore(self, step: int, like: Any) -> tuple[Any, dict[str, Any]]:
    """The state saved at ``step``, with the structure, shardings and key types of
    ``like``, and its metadata."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _keys_to_data(like))
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return _data_to_keys(restored["state"], like), dict(restored["meta"])

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


# -------------------------------------------------------------------------- preemption
class PreemptionWatch:
  """Notices SIGTERM. One process: a signal handler sets a flag, read between steps. Many
  processes: JAX's preemption sync point (the coordination service catches the signal),
  so every process stops after the same step."""

  def __init__(self):
    self._flag = threading.Event()
    self._previous = None

  def __enter__(self) -> PreemptionWatch:
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda *_: self._flag.set())
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def requested(self, step: int) -> bool:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return multihost_utils.reached_preemption_sync_point(step)
    return self._flag.is_set()


# -------------------------------------------------------------------------------- loop
@dataclasses.dataclass
class LoopResult:
  state: Any
  extra: dict[str, Any]  # what `end_of_epoch` kept (restored on resume)
  resumed_from: int | None  # the checkpoint step the run resumed from
  first_step_seconds: float | None  # compile + one step, in this process's lifetime


def numeric(record: dict[str, Any]) -> dict[str, float]:
  """The scalar numbers of ``record`` (what the metric writers take)."""
  return {k: float(v) for k, v in record.items()
          if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)}


def run_epochs(*, workdir: str, config: ml_collections.ConfigDict, mesh, state: Any,
               step_fn: Callable[..., tuple[Any, dict[str, Any]]],
               batches_fn: Callable[[int, int], Iterator[tuple[Any, ...]]],
               steps_per_epoch: int, epochs: int,
               end_of_epoch: Callable[[Any, int, dict[str, float], dict[str, Any]],
                                      dict[str, Any]],
               finite_keys: tuple[str, ...], hint: str) -> LoopResult:
  """Runs ``epochs`` epochs of ``steps_per_epoch`` steps, resuming from the workdir.

  Args:
    workdir: the run directory (checkpoints, metrics, TensorBoard files).
    config: the experiment config (``checkpoint.every_steps``, ``checkpoint.keep``,
      ``log_every_steps``).
    mesh: the device mesh; ``state`` must already be replicated on it.
    state: the initial state (ignored when a checkpoint exists, except for its structure).
    step_fn: ``(state, *global batches) -> (state, metrics)``.
    batches_fn: ``(epoch, first batch) -> iterator of tuples of host-local batches``.
    end_of_epoch: ``(state, epoch, mean metrics, extra) -> record``: validation, genotype
      and pictures after each epoch; it may update ``extra`` (a JSON-able dict saved with
      every checkpoint and handed back on resume). The record goes to the writers.
    finite_keys: metrics that must stay finite.
    hint: what to change when they do not (ends the error message).
  """
  validate_checkpoint_config(config)
  main = parallel.is_main_process()
  ckpt_cfg = config.get("checkpoint") or ml_collections.ConfigDict()
  every = ckpt_cfg.get("every_steps", 0)
  log_every = config.get("log_every_steps", 1)
  checkpoints = Checkpoints(os.path.join(workdir, CHECKPOINT_DIR), ckpt_cfg.get("keep", 3))
  metrics_path = os.path.join(workdir, METRICS_FILE)
  writer = metric_writers.create_default_writer(workdir, just_logging=not main)
  total = epochs * steps_per_epoch
  progress = periodic_actions.ReportProgress(num_train_steps=total, writer=writer,
                                             every_steps=log_every, every_secs=None)

  extra: dict[str, Any] = {}
  totals: dict[str, float] = {}
  step, resumed_from = 0, checkpoints.latest_step()
  if resumed_from is not None:
    state, meta = checkpoints.restore(resumed_from, state)
    step, totals, extra = meta["step"], meta["epoch_totals"], meta["extra"]
    logging.info("Resumed from the checkpoint at step %d (%s).", step, checkpoints.directory)
    if main:
      append_jsonl(metrics_path, {"event": "resumed", "step": step})

  def save(state):
    checkpoints.save(step, state, {"step": step, "epoch": step // steps_per_epoch,
                                   "batch": step % steps_per_epoch, "epoch_totals": totals,
                                   "extra": extra})

  first_step_seconds = None
  try:
    with PreemptionWatch() as preemption:
      while step < total:
        epoch, start = divmod(step, steps_per_epoch)
        batches = parallel.prefetch(
            batches_fn(epoch, start), lambda b: parallel.shard_batch(b, mesh))
        for global_batches in batches:
          t = time.time()
          state, metrics = step_fn(state, *global_batches)
          metrics = {k: float(v) for k, v in parallel.to_host(metrics).items()}
          if first_step_seconds is None:
            first_step_seconds = time.time() - t
            logging.info("First step (compile + run): %.1f s", first_step_seconds)
          step += 1
          bad = {k: metrics[k] for k in finite_keys
                 if k in metrics and not np.isfinite(metrics[k])}
          if bad:
            last = checkpoints.latest_step()
            raise FloatingPointError(
                f"non-finite loss at step {step} ({bad}); stopped without saving. The last "
                f"good checkpoint (step {last}) is intact in {checkpoints.directory}. {hint}")
          for key, value in metrics.items():
            totals[key] = totals.get(key, 0.0) + value
          if step % log_every == 0:
            writer.write_scalars(step, metrics)
            if main:
              append_jsonl(metrics_path, {"step": step, **metrics})
          progress(step)
          if step % steps_per_epoch == 0:
            break
          if every and step % every == 0:
            save(state)
          if preemption.requested(step):
            save(state)
            checkpoints.wait()
            raise Preempted(step, checkpoints.directory)
        if step % steps_per_epoch:
          raise RuntimeError(
              f"the data of epoch {epoch} yielded {step % steps_per_epoch} of its "
              f"{steps_per_epoch} batches; its stream must yield steps_per_epoch batches.")
        means = {f"mean_{k}": v / steps_per_epoch for k, v in totals.items()}
        record = end_of_epoch(state, epoch, means, extra)
        writer.write_scalars(step, numeric(record))
        if main:
          append_jsonl(metrics_path, record)
        totals = {}
        save(state)
        if preemption.requested(step) and step < total:
          checkpoints.wait()
          raise Preempted(step, checkpoints.directory)
  finally:
    checkpoints.wait()
    checkpoints.close()
    writer.flush()
  return LoopResult(state=state, extra=extra, resumed_from=resumed_from,
                    first_step_seconds=first_step_seconds)


def evaluate(sums_fn: Callable[..., dict[str, jax.Array]], state: Any, stream, mesh
             ) -> dict[str, float]:
  """Sums of ``sums_fn(state, images, labels, mask)`` over ``stream.eval_batches()``
  (every example once, padding masked out), as host floats."""
  totals: dict[str, float] = {}
  for batch in parallel.prefetch(stream.eval_batches(),
                                 lambda b: parallel.shard_batch(b, mesh)):
    for key, value in parallel.to_host(sums_fn(state, *batch)).items():
      totals[key] = totals.get(key, 0.0) + float(value)
  return totals
