"""The epoch loop shared by every run (bilevel search, weight-sharing training, training
from scratch): checkpoints and resume, interruptions, NaN stops, metric writers, progress.

A run gives `run_epochs` its state, a step function and a function that yields the
host-local batches of an epoch from a given batch on; the loop does the rest:

- **Checkpoints** (orbax): the whole state pytree plus JSON metadata (the step, the data
  position, the running epoch sums and whatever the run keeps between epochs, e.g. the best
  genotype so far) under ``workdir/checkpoints/<step>``, at every epoch end, every
  ``checkpoint.every_steps`` steps and whenever ``checkpoint.every_seconds`` have passed
  since the last one (so an interruption costs minutes, not an epoch); the last
  ``checkpoint.keep`` are kept. Orbax writes into a temporary directory and renames it,
  so a killed run leaves the previous checkpoint whole; every process takes part, so
  checkpoints of multi-host runs are consistent.
- **Resume**: a run started on a workdir with checkpoints continues from the latest one
  that restores. Batches are a pure function of ``(seed, epoch, position)``
  (`nanas_jax.data.streams`), so the resumed run sees the data the uninterrupted one would
  have; on a CPU the final state is bitwise the same (tested). A checkpoint that fails to
  restore (a truncated or missing data file, an emptied metadata file) is reported in one
  line, moved aside to ``checkpoints/damaged-<step>`` (never deleted) and the next older
  one is tried; when none restores the run stops with the choices. On several processes
  each reads alone and then they all decide together: a checkpoint that any process
  failed to read is moved aside by process 0 while the others wait (tested with damage on
  the storage they share, and with a read failure that only one process meets half-way
  through orbax's restore). A checkpoint whose arrays have other shapes than the run's
  state is not damaged but from another config: the run stops and says so, moving
  nothing.
- **Interruptions**: SIGTERM (what SLURM, Kubernetes and TPU maintenance send) and Ctrl-C
  (SIGINT) make the loop finish its step, save a checkpoint and raise `Preempted` (the
  programs exit with 128 + the signal: 143, 130). A second Ctrl-C stops the process at
  once without saving, even inside a long XLA call: a thread that reads the signal
  wake-up file descriptor acts on it, since a Python signal handler only runs between
  bytecodes of the main thread. On several processes JAX's preemption sync point makes
  every process stop after the same step on SIGTERM; Ctrl-C keeps Python's default there.
- **NaN / Inf**: a non-finite loss stops the run with `FloatingPointError` before anything
  is saved, so the last checkpoint is the last good state.
- **Out of memory**: XLA's out-of-memory error (a TPU program that does not fit the chip,
  found as the first step compiles; an allocation that fails as a GPU program runs) stops
  the run with a `MemoryError` that says where it happened, where the last checkpoint is,
  and what in the config would make the step fit (the run's ``memory_hint``), the XLA
  error chained to it.
- **Metrics**: every ``log_every_steps`` steps the step's metrics go to TensorBoard
  (`nanas_jax.events`, without TensorFlow) and ``metrics.jsonl``, and the console gets
  one line: step, epoch, the run's ``console_keys`` that are known (from the step, else
  the last epoch record, else what the run keeps), steps/s and the ETA, both without the
  time JAX spent compiling since the last line (`CompileClock`: the first architecture
  step after a warm-up compiles for as long as the first step), which the line names
  when it was a second or more. Epoch records go
  to the same two places. Rows of ``metrics.jsonl`` (and of the run's other ``step_logs``) past
  the step a run starts from were written by a session whose state was lost: they move to
  ``<name>.superseded.jsonl`` before the run writes them again, so no step appears twice.
  TensorBoard events past that step move the same way, to event files in
  ``superseded/`` (a run of that name in TensorBoard). Only process 0 writes files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from nanas_jax import cli
from nanas_jax import events
from nanas_jax import parallel
from nanas_jax.files import write_atomic

CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
DAMAGED_PREFIX = "damaged-"
# What the console line shows when the run names nothing else: the losses, the last
# validation / test accuracy, the alpha entropy; keys a run does not have are skipped.
DEFAULT_CONSOLE_KEYS = ("train_loss", "arch_loss", "loss", "val_accuracy", "test_top1",
                        "alpha_entropy")
_SIGNAL_NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C (SIGINT)"}


class Preempted(Exception):
  """The run stopped on SIGTERM or Ctrl-C after saving a checkpoint at ``step``."""

  def __init__(self, step: int, directory: str, signum: int = signal.SIGTERM):
    what = "interrupted" if signum == signal.SIGINT else "preempted"
    super().__init__(f"{what}: saved a checkpoint at step {step} in {directory}; run the "
                     "same command again to resume.")
    self.step = step
    self.signum = signum


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_checkpoint_config(config: ml_collections.ConfigDict) -> None:
  """Fails fast, naming the field, on bad ``config.checkpoint`` or ``log_every_steps``."""
  ckpt = config.get("checkpoint") or ml_collections.ConfigDict()
  every, keep = ckpt.get("every_steps", 0), ckpt.get("keep", 3)
  seconds = ckpt.get("every_seconds", 0)
  if not isinstance(every, int) or every < 0:
    raise ValueError(f"config.checkpoint.every_steps = {every!r} is invalid: expected an "
                     "integer >= 0 (0: only at epoch ends).")
  if not _is_number(seconds) or seconds < 0:
    raise ValueError(f"config.checkpoint.every_seconds = {seconds!r} is invalid: expected "
                     "a number of seconds >= 0 (0: no checkpoints by time).")
  if not isinstance(keep, int) or keep < 1:
    raise ValueError(f"config.checkpoint.keep = {keep!r} is invalid: expected an integer >= 1.")
  log_every = config.get("log_every_steps", 1)
  if not isinstance(log_every, int) or log_every < 1:
    raise ValueError(f"config.log_every_steps = {log_every!r} is invalid: expected an "
                     "integer >= 1.")


def check_workdir(workdir: str) -> None:
  """Refuses, before any work, a workdir results cannot be written to: a URL (results
  are written with local file operations, atomic renames: ``gs://...`` would silently
  become a local directory named ``gs:``), a file, or a path under a file or a
  directory this process may not write."""
  if "://" in workdir:
    raise ValueError(f"--workdir={cli.clip(workdir)} is a URL; mount the bucket (e.g. "
                     "gcsfuse) on every host and pass the mounted path.")
  path = os.path.abspath(workdir)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  if not os.path.isdir(path):
    raise NotADirectoryError(
        f"--workdir={cli.clip(workdir)}: {cli.clip(path)} is a file, not a directory; "
        "choose a directory (a new one is created).")
  if not os.access(path, os.W_OK | os.X_OK):
    raise PermissionError(f"--workdir={cli.clip(workdir)}: this user may not write into "
                          f"{cli.clip(path)}; choose a directory you own.")


def append_jsonl(path: str, record: dict[str, Any]) -> None:
  with open(path, "a") as f:
    f.write(json.dumps(record) + "\n")


def _row_step(row: Any, steps_per_epoch: int) -> int | None:
  """The step a log row belongs to: its ``step``, else its (1-based) ``epoch``'s last
  step; None for event rows and rows without either (kept as they are)."""
  if not isinstance(row, dict) or "event" in row:
    return None
  if _is_number(row.get("step")):
    return int(row["step"])
  if _is_number(row.get("epoch")):
    return int(row["epoch"]) * steps_per_epoch
  return None


def supersede_rows_after(path: str, step: int, steps_per_epoch: int) -> int:
  """Moves the rows of the JSON-lines file ``path`` that belong to steps after ``step``
  (and lines that do not parse: a kill can cut the last one) to
  ``<name>.superseded.jsonl``, so that a run restarting at ``step`` writes no step twice
  and nothing written is lost. Returns how many rows moved."""
  if not os.path.exists(path):
    return 0
  kept, moved = [], []
  with open(path) as f:
    for line in f:
      try:
        row_step = _row_step(json.loads(line), steps_per_epoch)
      except json.JSONDecodeError:
        row_step = None
        moved.append(line)
        continue
      (moved if row_step is not None and row_step > step else kept).append(line)
  if moved:
    with open(path[:-len(".jsonl")] + ".superseded.jsonl", "a") as f:
      f.writelines(line if line.endswith("\n") else line + "\n" for line in moved)
    write_atomic(path, "".join(kept))
  return len(moved)


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


def _shapes(tree: Any) -> list[tuple[tuple[int, ...], str]]:
  """The sorted (shape, dtype) of the leaves: what a checkpoint must hold to restore
  into a state (compared as a multiset: orbax's metadata tree and the state pytree name
  their nodes differently)."""
  return sorted((tuple(x.shape), str(np.dtype(x.dtype))) for x in jax.tree.leaves(tree))


def out_of_memory(error: BaseException) -> bool:
  """Whether ``error`` is XLA's out-of-memory error: ``RESOURCE_EXHAUSTED`` about memory
  (a TPU's compile: "Ran out of memory on HBM ..."; an allocation on a GPU or a CPU:
  "Out of memory ...")."""
  text = str(error)
  return (isinstance(error, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in text
          and "memory" in text.lower())


def memory_hint(options: Sequence[str], global_batch: int, devices: int) -> str:
  """What would make a run's step fit the devices' memory (`run_epochs`'s
  ``memory_hint``): the run's own ``options`` (config changes), then the one every run
  has, a smaller batch per device."""
  batch = (f"a smaller config.data.batch_size (now {global_batch}, {global_batch // devices} "
           f"per device over {devices} device{'s' if devices > 1 else ''}), or more devices, "
           "over which the batch is split")
  return "; ".join(options) + ("; or " if options else "") + batch


def _one_line(error: BaseException) -> str:
  """An exception as one short line (TensorStore appends kilobytes of JSON specs)."""
  text = (str(error).splitlines() or [""])[0].split(" [tensorstore_spec")[0]
  return cli.clip(f"{type(error).__name__}: {text}", 300)


def _drop_closed_loop_callbacks() -> None:
  """After a failed restore TensorStore still completes the reads orbax had started, and
  hands each completion to the asyncio loop orbax has closed meanwhile: Python reports
  every one as an unraisable ``RuntimeError('Event loop is closed')``, dozens of
  tracebacks for one damaged checkpoint (its metadata read, too, can fail so). From the
  first attempt to restore on, those (and only those) are dropped; every other
  unraisable exception still reaches the previous hook. Not from the first failure: the
  completions run on TensorStore's threads and can come before the failure reaches the
  caller (the damaged-checkpoint test saw one in 23 of 40 runs, 3 of 40 with the hook
  set before each restore but after the metadata read)."""
  previous = sys.unraisablehook
  if getattr(previous, "drops_closed_loop_callbacks", False):
    return

  def hook(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == "Event loop is closed"):
      previous(unraisable)

  hook.drops_closed_loop_callbacks = True
  sys.unraisablehook = hook


def _all_processes_agree(flag: bool) -> bool:
  """Whether ``flag`` holds on every process (one process: ``flag``)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.all(multihost_utils.process_allgather(np.int32(flag))))


def _process_zero_says(flag: bool) -> bool:
  """Process 0's ``flag`` on every process: decisions taken from a clock must agree."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def _item_handlers() -> dict[str, Any]:
  """The handlers of a checkpoint's two items, for the manager that writes it and for the
  reader of `Checkpoints.restore`: one layout."""
  return {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}


class Checkpoints:
  """Orbax checkpoints of ``{'state': pytree, 'meta': JSON}`` in ``directory``."""

  def __init__(self, directory: str, keep: int):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        item_handlers=_item_handlers())
    self._reader = None  # built on the first restore (see `restore`)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_keys_to_data(state)), meta=ocp.args.JsonSave(meta)))

  def restore(self, step: int, like: Any) -> tuple[Any, dict[str, Any]]:
    """The state saved at ``step``, with the structure, shardings and key types of
    ``like``, and its metadata.

    Each process reads alone: the manager's restore ends in a barrier of all processes,
    which a process whose read failed never reaches, so the others would wait there
    while it waits in `restore_latest`'s vote. A reader whose only process is this one
    has no barrier; the vote is the one place where the processes meet."""
    if self._reader is None:
      me = jax.process_index()
      self._reader = ocp.Checkpointer(
          ocp.CompositeCheckpointHandler(**_item_handlers()),
          multiprocessing_options=ocp.options.MultiprocessingOptions(
              primary_host=me, active_processes={me}))
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _keys_to_data(like))
    restored = self._reader.restore(
        os.path.join(self.directory, str(step)), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return _data_to_keys(restored["state"], like), dict(restored["meta"])

  def _check_shapes(self, step: int, like: Any) -> None:
    """Raises `cli.UserError` when the checkpoint's arrays have other shapes than
    ``like``'s: a changed config, not damage. A metadata file that cannot be read is left
    to the restore, which then fails and moves the checkpoint aside as damaged."""
    try:
      saved = self.manager.item_metadata(step)["state"].tree
    except Exception:  # pylint: disable=broad-except
      return
    if _shapes(saved) != _shapes(_keys_to_data(like)):
      raise cli.UserError(
          f"the checkpoint at step {step} in {self.directory} holds arrays of other shapes "
          "than this run's state: the config changed since this workdir started (its "
          "first config is config.json there). Rerun with that config, or choose a new "
          "--workdir.")

  def _move_aside(self, step: int) -> str:
    """Renames checkpoint ``step`` to the first free ``damaged-<step>[-n]`` (process 0;
    every process waits for it) and returns the new path."""
    target = os.path.join(self.directory, f"{DAMAGED_PREFIX}{step}")
    n = 0
    while os.path.exists(target if not n else f"{target}-{n}"):
      n += 1
    target = target if not n else f"{target}-{n}"
    if parallel.is_main_process():
      os.rename(os.path.join(self.directory, str(step)), target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"checkpoint {step} moved aside")
    self.manager.reload()
    return target

  def restore_latest(self, like: Any) -> tuple[Any, dict[str, Any], int] | None:
    """``(state, meta, step)`` of the latest checkpoint that restores, None when there is
    none. Damaged ones are moved aside (see the module docstring)."""
    steps = sorted(self.manager.all_steps(), reverse=True)
    damaged = []
    _drop_closed_loop_callbacks()
    for step in steps:
      self._check_shapes(step, like)
      error = None
      try:
        state, meta = self.restore(step, like)
      except Exception as e:  # pylint: disable=broad-except
        # Damage shows as TensorStore ValueErrors, JSON errors, missing files...
        error = e
      if _all_processes_agree(error is None):
        return state, meta, step
      target = self._move_aside(step)
      damaged.append(target)
      logging.warning("The checkpoint at step %d (%s/%d) does not restore (%s); moved it "
                      "aside to %s and trying the previous one.", step, self.directory,
                      step, _one_line(error) if error else "on another process", target)
    if damaged:
      raise cli.UserError(
          f"none of the {len(steps)} checkpoints in {self.directory} restores; they are "
          f"kept aside as {', '.join(os.path.basename(d) for d in damaged)} (the errors "
          "are above). Either rerun the same command to start this workdir over from step "
          "0 (the damaged checkpoints stay aside), or choose a new --workdir.")
    return None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
    if self._reader is not None:
      self._reader.close()


# ------------------------------------------------------------------------ interruptions
class PreemptionWatch:
  """Notices SIGTERM and Ctrl-C (see the module docstring). One process: Python signal
  handlers set a flag, read between steps, and a thread reading the signal wake-up file
  descriptor announces the first Ctrl-C and ends the process on the second. Many
  processes: JAX's preemption sync point (the coordination service catches SIGTERM), so
  every process stops after the same step."""

  def __init__(self):
    self._flag = threading.Event()
    self.signum = signal.SIGTERM
    self._previous: dict[int, Any] = {}
    self._previous_wakeup = -1
    self._pipe: tuple[int, int] | None = None
    self._reader: threading.Thread | None = None

  def __enter__(self) -> PreemptionWatch:
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._on_signal)
      self._pipe = os.pipe()
      os.set_blocking(self._pipe[1], False)
      self._previous_wakeup = signal.set_wakeup_fd(self._pipe[1], warn_on_full_buffer=False)
      self._reader = threading.Thread(target=self._read_signals, args=(self._pipe[0],),
                                      name="PreemptionWatch", daemon=True)
      self._reader.start()
    return self

  def __exit__(self, *exc) -> None:
    if self._pipe is None:
      return
    signal.set_wakeup_fd(self._previous_wakeup)
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    os.close(self._pipe[1])  # The reader sees the end of the pipe and returns.
    self._reader.join()
    os.close(self._pipe[0])

  def _on_signal(self, signum: int, _) -> None:
    # Runs in the main thread between bytecodes; the reader thread may see the signal
    # later, so the flag is set here too (a step that signals itself stops right after).
    self.signum = signum
    self._flag.set()

  def _read_signals(self, fd: int) -> None:
    announced = set()
    while data := os.read(fd, 64):
      for signum in data:
        if signum not in _SIGNAL_NAMES:
          continue
        if signum == signal.SIGINT and signum in announced:
          os.write(2, b"\nSecond Ctrl-C: stopped at once, without saving; the last "
                      b"checkpoint is intact, and rerunning the same command resumes "
                      b"from it.\n")
          os._exit(128 + signal.SIGINT)  # pylint: disable=protected-access
        if signum not in announced:
          announced.add(signum)
          logging.warning("%s: saving a checkpoint after this step, then stopping%s.",
                          _SIGNAL_NAMES[signum],
                          " (Ctrl-C again stops at once, without saving)"
                          if signum == signal.SIGINT else "")
        self.signum = signum
        self._flag.set()

  def requested(self, step: int) -> bool:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return multihost_utils.reached_preemption_sync_point(step)
    return self._flag.is_set()


# ----------------------------------------------------------------------------- console
def format_duration(seconds: float) -> str:
  """``42 s``, ``3 min 05 s``, ``2 h 07 min``."""
  seconds = max(0, round(seconds))
  if seconds < 60:
    return f"{seconds} s"
  if seconds < 3600:
    return f"{seconds // 60} min {seconds % 60:02d} s"
  return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def console_line(*, step: int, total: int, steps_per_epoch: int, values: dict[str, float],
                 keys: Sequence[str], steps_per_second: float | None,
                 compiling_seconds: float = 0.0) -> str:
  """One progress line: step, epoch, the ``keys`` found in ``values`` (in that order),
  steps/s and the ETA, and the compile time left out of them when it was a second or
  more."""
  parts = [f"step {step}/{total}",
           f"epoch {(step - 1) // steps_per_epoch + 1}/{-(-total // steps_per_epoch)}"]
  parts += [f"{key} {values[key]:.4g}" for key in keys if key in values]
  if steps_per_second:
    parts.append(f"{steps_per_second:.3g} steps/s, ETA "
                 f"{format_duration((total - step) / steps_per_second)}")
  if compiling_seconds >= 1:
    parts.append(f"({format_duration(compiling_seconds)} compiling left out)")
  return "  ".join(parts)


# The names under which JAX reports each stage of a compile with its wall-clock span
# (`jax.monitoring`): tracing, lowering, and XLA's compile or the persistent cache's load.
COMPILE_EVENTS = frozenset({
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
})


class CompileClock:
  """Wall time that JAX spends compiling while the clock is entered, from the spans JAX
  reports (`COMPILE_EVENTS`). The loop leaves that time out of steps/s and the ETA: a
  run's later phase compiles its step at its first call (the first architecture step
  after weight-only warm-up epochs), and a rate that counted it would promise a run of
  minutes for tens of minutes."""

  def __init__(self):
    self._spans: list[tuple[float, float]] = []
    self._lock = threading.Lock()  # spans may come from threads compiling side by side

  def _record(self, event: str, start: float, end: float, **_) -> None:
    if event in COMPILE_EVENTS:
      with self._lock:
        self._spans.append((start, end))

  def __enter__(self) -> CompileClock:
    jax.monitoring.register_event_time_span_listener(self._record)
    return self

  def __exit__(self, *exc) -> None:
    jax.monitoring.unregister_event_time_span_listener(self._record)

  def take(self) -> float:
    """Seconds covered by the spans reported since the last call, spans that overlap
    (nested stages, programs compiled side by side) counted once; forgets them."""
    with self._lock:
      spans, self._spans = sorted(self._spans), []
    covered, reach = 0.0, -np.inf
    for start, end in spans:
      if end > reach:
        covered += end - max(start, reach)
        reach = end
    return covered


class Progress:
  """Progress of work outside the epoch loop (flatness, candidate scoring) as log lines:
  ``what: done/total unit, rate/s, ETA``, at most every ``every_seconds`` and at the end.
  Use it as a context manager and call it with ``(done, total)`` after each piece of
  work; the rate counts from its creation, without the time JAX spent compiling meanwhile
  (`CompileClock`: the first piece compiles its programs), which the line names."""

  def __init__(self, what: str, unit: str, every_seconds: float = 10.0):
    self.what, self.unit, self.every_seconds = what, unit, every_seconds
    self._start = time.monotonic()
    self._last: float | None = None
    self._clock = CompileClock()
    self._compiled = 0.0

  def __enter__(self) -> Progress:
    self._clock.__enter__()
    return self

  def __exit__(self, *exc) -> None:
    self._clock.__exit__(*exc)

  def __call__(self, done: int, total: int) -> None:
    now = time.monotonic()
    # Taken at every call, so that the spans do not pile up between lines.
    self._compiled += self._clock.take()
    if done < total and self._last is not None and now - self._last < self.every_seconds:
      return
    self._last = now
    elapsed = now - self._start
    line = f"{self.what}: {done}/{total} {self.unit}"
    compiled = format_duration(self._compiled) if self._compiled >= 1 else None
    if done >= total:
      line += f", done in {format_duration(elapsed)}"
      line += f" ({compiled} of it compiling)" if compiled else ""
    elif done and elapsed > self._compiled:
      rate = done / (elapsed - self._compiled)
      line += f", {rate:.3g} {self.unit}/s, ETA {format_duration((total - done) / rate)}"
      line += f" ({compiled} compiling left out)" if compiled else ""
    logging.info(line)


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
               finite_keys: tuple[str, ...], hint: str, memory_hint: str = "",
               console_keys: Sequence[str] = DEFAULT_CONSOLE_KEYS,
               step_logs: Sequence[str] = ()) -> LoopResult:
  """Runs ``epochs`` epochs of ``steps_per_epoch`` steps, resuming from the workdir.

  Args:
    workdir: the run directory (checkpoints, metrics, TensorBoard files).
    config: the experiment config (``checkpoint.every_steps``, ``checkpoint.every_seconds``,
      ``checkpoint.keep``, ``log_every_steps``).
    mesh: the device mesh; ``state`` must already be replicated on it.
    state: the initial state (ignored when a checkpoint exists, except for its structure).
    step_fn: ``(state, *global batches) -> (state, metrics)``.
    batches_fn: ``(epoch, first batch) -> iterator of tuples of host-local batches``.
    end_of_epoch: ``(state, epoch, mean metrics, extra) -> record``: validation, genotype
      and pictures after each epoch; it may update ``extra`` (a JSON-able dict saved with
      every checkpoint and handed back on resume). The record goes to the writers.
    finite_keys: metrics that must stay finite.
    hint: what to change when they do not (ends the error message).
    memory_hint: what to change when a step does not fit the devices' memory (ends the
      `MemoryError`'s message).
    console_keys: the numbers of the console line, in order, where known: a step's
      metric, else the last epoch record's, else ``extra``'s (so keys a step adds later
      show up once present).
    step_logs: other JSON-lines files of the workdir with one row per step or epoch
      (``step`` or ``epoch`` fields), superseded past the start step like
      ``metrics.jsonl``.
  """
  validate_checkpoint_config(config)
  main = parallel.is_main_process()
  ckpt_cfg = config.get("checkpoint") or ml_collections.ConfigDict()
  every = ckpt_cfg.get("every_steps", 0)
  every_seconds = ckpt_cfg.get("every_seconds", 0)
  log_every = config.get("log_every_steps", 1)
  checkpoints = Checkpoints(os.path.join(workdir, CHECKPOINT_DIR), ckpt_cfg.get("keep", 3))
  metrics_path = os.path.join(workdir, METRICS_FILE)
  total = epochs * steps_per_epoch

  extra: dict[str, Any] = {}
  totals: dict[str, float] = {}
  step, resumed_from = 0, None
  restored = checkpoints.restore_latest(state)
  if restored is not None:
    state, meta, resumed_from = restored
    step, totals, extra = meta["step"], meta["epoch_totals"], meta["extra"]
    logging.info("Resumed from the checkpoint at step %d (%s).", step, checkpoints.directory)
  if main:
    for name in (METRICS_FILE, *step_logs):
      moved = supersede_rows_after(os.path.join(workdir, name), step, steps_per_epoch)
      if moved:
        logging.info("%d row%s of %s past step %d (written by a session whose state was "
                     "lost) moved to %s.", moved, "s" if moved > 1 else "", name, step,
                     name[:-len(".jsonl")] + ".superseded.jsonl")
    moved = events.supersede_after(workdir, step)
    if moved:
      logging.info("%d TensorBoard event%s past step %d (written by a session whose state "
                   "was lost) moved to %s.", moved, "s" if moved > 1 else "", step,
                   os.path.join(workdir, events.SUPERSEDED_DIR))
    if resumed_from is not None:
      append_jsonl(metrics_path, {"event": "resumed", "step": step})
  # TensorBoard only (the console gets `console_line`, not every metric), in a new file
  # after the old ones were trimmed.
  writer = events.ScalarWriter(workdir) if main else None

  saved = {"step": resumed_from, "time": time.monotonic()}

  def save(state):
    if saved["step"] == step:
      return
    # The events up to the checkpoint on disk before it: a run killed later resumes from
    # it with TensorBoard complete to there, as metrics.jsonl (written line by line) is.
    if writer is not None:
      writer.flush()
    checkpoints.save(step, state, {"step": step, "epoch": step // steps_per_epoch,
                                   "batch": step % steps_per_epoch, "epoch_totals": totals,
                                   "extra": extra})
    saved.update(step=step, time=time.monotonic())

  def write(values: dict[str, float], record: dict[str, Any]) -> None:
    if main:
      writer.write_scalars(step, values)
      append_jsonl(metrics_path, record)

  first_step_seconds = None
  last_line = None  # (step, time) of the last console line, the first step excluded
  epoch_record: dict[str, Any] = {}
  pending: list[tuple[int, dict[str, jax.Array]]] = []  # steps whose metrics are unread
  doing = "the first step"  # what an out-of-memory error happened in

  def drain() -> None:
    """Reads the pending steps' metrics in one transfer: checks them (a non-finite loss
    stops the run before anything is saved), adds them to the epoch's sums, and writes the
    logged steps."""
    nonlocal last_line, doing
    if pending:
      # A step program's error can reach the host here, where its outputs are read.
      doing = f"steps {pending[0][0]}-{pending[-1][0]}"
    fetched = parallel.to_host([m for _, m in pending])
    for (at, _), raw in zip(pending, fetched):
      metrics = {k: float(v) for k, v in raw.items()}
      bad = {k: metrics[k] for k in finite_keys
             if k in metrics and not np.isfinite(metrics[k])}
      if bad:
        last = checkpoints.latest_step()
        raise FloatingPointError(
            f"non-finite loss at step {at} ({bad}); stopped without saving. The last "
            f"good checkpoint (step {last}) is intact in {checkpoints.directory}. {hint}")
      for key, value in metrics.items():
        totals[key] = totals.get(key, 0.0) + value
      if at % log_every == 0:
        now = time.monotonic()
        compiling = compile_clock.take()
        running = now - last_line[1] - compiling
        rate = (at - last_line[0]) / running if at > last_line[0] and running > 0 else None
        last_line = (at, now)
        write({**metrics, **({"steps_per_sec": rate} if rate else {})},
              {"step": at, **metrics})
        if main:
          known = {**numeric(extra), **numeric(epoch_record), **metrics}
          logging.info(console_line(step=at, total=total, steps_per_epoch=steps_per_epoch,
                                    values=known, keys=console_keys,
                                    steps_per_second=rate, compiling_seconds=compiling))
    pending.clear()
  try:
    with PreemptionWatch() as preemption, CompileClock() as compile_clock:
      while step < total:
        epoch, start = divmod(step, steps_per_epoch)
        batches = parallel.prefetch(
            batches_fn(epoch, start), lambda b: parallel.shard_batch(b, mesh))
        for global_batches in batches:
          t = time.monotonic()
          doing = f"step {step + 1}"
          state, metrics = step_fn(state, *global_batches)
          step += 1
          if first_step_seconds is None:
            jax.block_until_ready(metrics)
            first_step_seconds = time.monotonic() - t
            last_line = (step, time.monotonic())
            compile_clock.take()
            logging.info("First step (compile + run, mostly compilation): %.1f s",
                         first_step_seconds)
          # The metrics stay on the devices until they are needed (a console line, a
          # checkpoint, the epoch's end): reading them every step would make the host
          # wait for each step before dispatching the next.
          pending.append((step, metrics))
          if step % log_every == 0:
            drain()
          if step % steps_per_epoch == 0:
            break
          due = bool(every and step % every == 0) or (
              bool(every_seconds) and _process_zero_says(
                  time.monotonic() - saved["time"] >= every_seconds))
          stop = preemption.requested(step)
          if due or stop:
            drain()
            save(state)
          if stop:
            checkpoints.wait()
            raise Preempted(step, checkpoints.directory, preemption.signum)
        drain()
        if step % steps_per_epoch:
          raise RuntimeError(
              f"the data of epoch {epoch} yielded {step % steps_per_epoch} of its "
              f"{steps_per_epoch} batches; its stream must yield steps_per_epoch batches.")
        means = {f"mean_{k}": v / steps_per_epoch for k, v in totals.items()}
        doing = f"the end of epoch {epoch + 1} (validation)"
        epoch_record = end_of_epoch(state, epoch, means, extra)
        write(numeric(epoch_record), epoch_record)
        # Steps/s counts training steps: validation (and its first compile) is left out.
        last_line = (step, time.monotonic())
        compile_clock.take()
        totals = {}
        save(state)
        if preemption.requested(step) and step < total:
          checkpoints.wait()
          raise Preempted(step, checkpoints.directory, preemption.signum)
  except jax.errors.JaxRuntimeError as error:
    if not out_of_memory(error):
      raise
    last = checkpoints.latest_step()
    kept = (f"The last checkpoint (step {last}) is intact in {checkpoints.directory}"
            if last is not None else "No checkpoint had been written yet")
    raise MemoryError(
        f"out of device memory in {doing}: {_one_line(error).rstrip('.')}. Stopped "
        f"without saving. {kept}. To fit, try {memory_hint or 'a smaller batch'}.") from error
  finally:
    checkpoints.wait()
    checkpoints.close()
    if writer is not None:
      writer.close()
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
