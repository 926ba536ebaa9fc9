"""Data parallelism over every device of every host: one mesh, global arrays, ``jax.jit``.

The design: a one-axis device mesh (``'data'``) over all devices of all processes. The
search and training state is *replicated* on it and every batch is *sharded* along its
leading axis. The step functions stay plain ``jax.jit`` code written for one device; XLA's
SPMD partitioner (GSPMD) splits them over the mesh and inserts the all-reduces. So:

- the loss is the mean over the *global* batch, and its gradients (weights and alpha) are
  averaged across devices by construction;
- BatchNorm batch statistics are computed over the global batch (synchronised BatchNorm),
  so the running statistics are the same on every replica;
- every replica holds the same alpha, and an N-device step computes the 1-device step on
  the same global batch, up to the order of floating-point reductions.

This composes with many hosts unchanged: after `initialize` the mesh spans every process's
devices, each process feeds its own rows of the global batch (`shard_batch`), and the same
compiled step runs everywhere. `pmap` would need per-device batch axes and explicit
``pmean`` calls in every step function; with jit the step code has no parallel code in it.
"""

from __future__ import annotations

import collections
import itertools
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"

DISTRIBUTED_MODES = ("auto", "on", "off")


DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
# XLA's CPU scheduler that maximises concurrency lets independent all-reduces of one step
# start in a different order on different fake devices; with 2 devices on 2 cores the step
# then deadlocked (an XLA rendezvous timeout, the process aborted) in 4 of 6 runs with JAX
# 0.10.2 ("Termination timeout for all reduce"). The memory-minimising scheduler
# serialises them (0 of 3). GPUs and TPUs are unaffected.
SERIAL_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"


def fake_cpu_devices_xla_flags(count: int, flags: str | None = None) -> str:
  """``XLA_FLAGS`` that give a CPU process ``count`` host devices (tests, benchmarks); they
  must be in the environment before JAX starts its CPU backend.

  ``flags`` (by default this process's ``XLA_FLAGS``) are kept, less any device count of
  their own, so that a child process gets the caller's other flags too. The serial
  collective scheduler is added unless ``flags`` choose a scheduler (see
  ``SERIAL_SCHEDULER_FLAG``).
  """
  if flags is None:
    flags = os.environ.get("XLA_FLAGS", "")
  kept = [f for f in flags.split() if not f.startswith(DEVICE_COUNT_FLAG)]
  if not any(f.startswith(SERIAL_SCHEDULER_FLAG) for f in kept):
    kept.append(f"{SERIAL_SCHEDULER_FLAG}=false")
  return " ".join(kept + [f"{DEVICE_COUNT_FLAG}={count}"])


def multi_process_environment() -> bool:
  """Whether the environment says this job spans several processes.

  SLURM with more than one task, a TPU pod slice with several workers, or an explicit
  coordinator address (``JAX_COORDINATOR_ADDRESS``, read by `jax.distributed.initialize`).
  """
  env = os.environ
  if int(env.get("SLURM_NTASKS", "1") or 1) > 1:
    return True
  if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
    return True
  return bool(env.get("JAX_COORDINATOR_ADDRESS"))


def validate_parallel_config(config: ml_collections.ConfigDict | None) -> None:
  """Fails fast, naming the field, on a bad ``config.parallel`` block."""
  if config is None:
    return
  mode = config.get("distributed", "auto")
  if mode not in DISTRIBUTED_MODES:
    raise ValueError(f"config.parallel.distributed = {mode!r} is invalid: expected one of "
                     f"{DISTRIBUTED_MODES}.")
  num, pid = config.get("num_processes"), config.get("process_id")
  if num is not None and (not isinstance(num, int) or num < 1):
    raise ValueError(f"config.parallel.num_processes = {num!r} is invalid: expected an "
                     "integer >= 1 (or None to let jax.distributed.initialize detect it).")
  if pid is not None and (not isinstance(pid, int) or pid < 0
                          or (num is not None and pid >= num)):
    raise ValueError(f"config.parallel.process_id = {pid!r} is invalid: expected an integer "
                     "in [0, num_processes).")


def initialize(config: ml_collections.ConfigDict | None) -> bool:
  """Calls `jax.distributed.initialize` when ``config.parallel`` or the environment asks.

  ``distributed``: ``'on'`` always, ``'off'`` never, ``'auto'`` when
  `multi_process_environment`. ``coordinator_address``, ``num_processes`` and
  ``process_id`` are passed on when set; left None, JAX detects them (TPU pods, SLURM).
  Must run before anything touches a device. Returns whether the job is distributed.
  """
  validate_parallel_config(config)
  config = config or ml_collections.ConfigDict()
  if jax.distributed.is_initialized():
    return True
  mode = config.get("distributed", "auto")
  if mode == "off" or (mode == "auto" and not multi_process_environment()):
    return False
  # CPU processes need a collectives backend to all-reduce across hosts (tests, CPU
  # clusters); the setting does not affect GPU or TPU devices.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {name: config.get(name) for name in
            ("coordinator_address", "num_processes", "process_id")
            if config.get(name) is not None}
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed initialised: process %d of %d, %d local / %d global devices.",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


def is_main_process() -> bool:
  """Process 0 writes metrics, pictures and result files; every process checkpoints."""
  return jax.process_index() == 0


def data_mesh(devices: Iterable[jax.Device] | None = None) -> Mesh:
  """A one-axis mesh over ``devices`` (default: every device of every process)."""
  devices = np.asarray(list(devices) if devices is not None else jax.devices())
  # Auto axis types: the step functions are plain single-device code that GSPMD
  # partitions; explicit axes would ask every op to state its sharding.
  return Mesh(devices, (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(global_batch: int, mesh: Mesh, field: str = "config.data.batch_size"):
  """The global batch must split evenly over the devices (and so over the processes)."""
  devices = mesh.devices.size
  if global_batch % devices:
    raise ValueError(
        f"{field} = {global_batch} is not divisible by the {devices} devices of the mesh "
        f"({jax.process_count()} process(es)); use a multiple of {devices}.")


def replicate(tree: Any, mesh: Mesh) -> Any:
  """``tree`` as global arrays replicated on every device of ``mesh``.

  Every process must pass the same values (the state is initialised from the same seed
  everywhere). Typed PRNG keys travel as their key data.
  """
  sharding = replicated(mesh)

  def put(x):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      impl = jax.random.key_impl(x)
      return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=impl)
    value = np.asarray(x)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

  return jax.tree.map(put, tree)


def shard_batch(local_batch: Any, mesh: Mesh) -> Any:
  """Host-local batch rows (this process's block of the global batch) as global arrays
  sharded along the batch axis over ``mesh``."""
  sharding = batch_sharded(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x),
                      local_batch)


def prefetch(iterator: Iterator[Any], put: Callable[[Any], Any], size: int = 2) -> Iterator[Any]:
  """Yields ``put(item)`` for every item, keeping ``size`` items put ahead: the transfers
  are asynchronous, so the next batches move to the devices while a step runs."""
  queue = collections.deque(put(item) for item in itertools.islice(iterator, size))
  for item in iterator:
    queue.append(put(item))
    yield queue.popleft()
  while queue:
    yield queue.popleft()


def to_host(tree: Any) -> Any:
  """Replicated global arrays as numpy on this process (no cross-host traffic); typed
  PRNG keys stay keys, on this process's first device."""

  def get(x):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(get(jax.random.key_data(x)),
                                      impl=jax.random.key_impl(x))
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(x.addressable_data(0))
    return np.asarray(x)

  return jax.tree.map(get, tree)


def assert_replicas_agree(tree: Any, what: str) -> None:
  """Raises when a replicated value differs between devices or processes: the symptom of
  an un-reduced gradient (each replica ending with its own genotype)."""
  for x in jax.tree.leaves(tree):
    shards = [np.asarray(s.data) for s in x.addressable_shards]
    if any(not np.array_equal(shards[0], s) for s in shards[1:]):
      raise AssertionError(f"{what} differs between the devices of process "
                           f"{jax.process_index()}.")
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.assert_equal(to_host(tree), f"{what} differs between processes.")
