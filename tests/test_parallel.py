"""Tests of the data-parallel helpers, and of the bilevel step and BatchNorm recalibration
on 8 (fake CPU) devices against the same on one device.

The 8-device checks run in a subprocess: the device count is fixed when JAX starts
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``), and this test process already
has one device.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from nanas_jax import parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("env,expected", [
    ({}, False), ({"SLURM_NTASKS": "1"}, False), ({"SLURM_NTASKS": "4"}, True),
    ({"TPU_WORKER_HOSTNAMES": "t0"}, False), ({"TPU_WORKER_HOSTNAMES": "t0,t1"}, True),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, True)])
def test_multi_process_environment(monkeypatch, env, expected):
  for name in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "JAX_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(name, raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  assert parallel.multi_process_environment() is expected


@pytest.mark.parametrize("field,value", [
    ("distributed", "yes"), ("num_processes", 0), ("process_id", 2)])
def test_bad_parallel_config_names_the_field(field, value):
  config = ml_collections.ConfigDict(
      {"distributed": "auto", "num_processes": 2, "process_id": 0})
  config[field] = value
  with pytest.raises(ValueError, match=f"config.parallel.{field}"):
    parallel.validate_parallel_config(config)


def test_single_process_stays_undistributed(monkeypatch):
  monkeypatch.delenv("SLURM_NTASKS", raising=False)
  monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
  monkeypatch.delenv("TPU_WORKER_HOSTNAMES", raising=False)
  assert parallel.initialize(ml_collections.ConfigDict({"distributed": "auto"})) is False
  assert parallel.initialize(ml_collections.ConfigDict({"distributed": "off"})) is False


def test_replicate_and_to_host_round_trip_including_prng_keys():
  mesh = parallel.data_mesh()
  tree = {"a": np.arange(6.0).reshape(2, 3), "k": jax.random.key(3), "s": jnp.int32(7)}
  out = parallel.replicate(tree, mesh)
  assert out["a"].sharding == parallel.replicated(mesh)
  back = parallel.to_host(jax.tree.map(
      lambda x: jax.random.key_data(x) if x.dtype == out["k"].dtype else x, out))
  np.testing.assert_array_equal(back["a"], tree["a"])
  np.testing.assert_array_equal(back["k"], jax.random.key_data(tree["k"]))
  assert int(back["s"]) == 7


def test_shard_batch_gives_the_global_batch():
  mesh = parallel.data_mesh()
  x = np.arange(24, dtype=np.float32).reshape(8, 3)
  out = parallel.shard_batch((x, x[:, 0]), mesh)
  assert out[0].sharding == parallel.batch_sharded(mesh)
  np.testing.assert_array_equal(np.asarray(out[0]), x)


def test_prefetch_keeps_items_ahead_and_in_order():
  put_log = []

  def put(i):
    put_log.append(i)
    return i * 10

  it = parallel.prefetch(iter(range(5)), put, size=2)
  assert next(it) == 0
  # The first item is consumed while two more are already put.
  assert put_log == [0, 1, 2]
  assert list(it) == [10, 20, 30, 40]


def test_batch_size_must_split_over_the_devices():
  mesh = parallel.data_mesh()
  parallel.check_batch_size(5, mesh)  # one device here
  fake = type("FakeMesh", (), {"devices": np.empty(8)})()
  with pytest.raises(ValueError, match="config.data.batch_size = 12 .* 8 devices"):
    parallel.check_batch_size(12, fake)


def test_fake_device_flags_keep_the_other_flags_and_a_chosen_scheduler(monkeypatch):
  count, serial = parallel.DEVICE_COUNT_FLAG, parallel.SERIAL_SCHEDULER_FLAG
  monkeypatch.setenv("XLA_FLAGS", f"--xla_dump_to=/tmp/x {count}=3")
  assert parallel.fake_cpu_devices_xla_flags(8).split() == [
      "--xla_dump_to=/tmp/x", f"{serial}=false", f"{count}=8"]
  assert parallel.fake_cpu_devices_xla_flags(2, f"{serial}=true").split() == [
      f"{serial}=true", f"{count}=2"]
  assert parallel.fake_cpu_devices_xla_flags(1, "") == f"{serial}=false {count}=1"


EIGHT_DEVICES = textwrap.dedent("""
    import json, os, sys
    import jax, jax.numpy as jnp, numpy as np
    from configs import quickstart
    from nanas_jax import parallel, spaces
    from nanas_jax.workdir import build_supernet
    from nanas_jax.search.bilevel import BilevelSearch

    algorithm, order, extra_steps = sys.argv[1:4]
    jax.config.update("jax_enable_x64", True)
    dtype = "float64"
    cfg = quickstart.get_config()
    cfg.model.channels, cfg.model.layers = 4, 3
    cfg.search.algorithm, cfg.search.order = algorithm, order
    cfg.search.neighbors.num, cfg.search.neighbors.batch = 2, "full"
    # A small constant architecture learning rate: rounding differences between the two
    # runs grow with every step, and the faster alpha moves the faster they grow.
    cfg.search.arch.lr, cfg.search.arch.schedule = 3e-3, "constant"
    cfg.search.warmup_epochs = 0
    model = build_supernet(cfg.model, 10)
    rng = np.random.default_rng(0)

    def batch():
      return (rng.normal(size=(16, 8, 8, 1)).astype(dtype),
              rng.integers(0, 10, 16).astype(np.int32))

    batches = [(batch(), batch()) for _ in range(3)]
    # One search for every run: its compiled pieces are reused where shapes and shardings
    # repeat.
    search = BilevelSearch(model, spaces.get_space("darts"), cfg.search, 2)
    step = search.jit_step()
    start = jax.tree.map(lambda x: x.astype(dtype) if x.dtype == jnp.float32 else x,
                         search.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1))))

    def run(mesh, batches, state=None):
      if state is None:
        state = start if mesh is None else parallel.replicate(start, mesh)
      for tb, vb in batches:
        if mesh is not None:
          tb, vb = parallel.shard_batch(tb, mesh), parallel.shard_batch(vb, mesh)
        state, metrics = step(state, tb, vb)
      return state, metrics

    one, m1 = run(None, batches)
    mesh = parallel.data_mesh()
    eight, m8 = run(mesh, batches)

    def diff(a, b):
      return max(float(np.max(np.abs(np.asarray(x) - parallel.to_host(y))))
                 for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    out = {"devices": mesh.devices.size,
           "alpha_dtype": str(eight.alpha.dtype),
           "alpha_sharding": str(eight.alpha.sharding.spec),
           "alpha_diff": diff(one.alpha, eight.alpha),
           "alpha_scale": float(np.abs(np.asarray(one.alpha)).max()),
           "params_diff": diff(one.params, eight.params),
           "stats_diff": diff(one.batch_stats, eight.batch_stats),
           "loss_diff": max(abs(float(m1[k]) - float(m8[k])) for k in m1)}
    more = [(batch(), batch()) for _ in range(int(extra_steps))]
    eight, _ = run(mesh, more, eight)
    shards = [np.asarray(s.data) for s in eight.alpha.addressable_shards]
    out["replicas"] = len(shards)
    out["replicas_identical"] = all(np.array_equal(shards[0], s) for s in shards)
    out["alpha_moved"] = float(np.abs(shards[0] - np.asarray(one.alpha)).max())
    # Over the extra steps too: in float64 the two runs stay together.
    one, _ = run(None, more, one)
    out["more_alpha_diff"] = diff(one.alpha, eight.alpha)
    parallel.assert_replicas_agree(eight.alpha, "alpha")
    # A global batch the 8 devices cannot split fails before any data or compile.
    from nanas_jax import experiment
    bad = quickstart.get_config()
    bad.data.batch_size = 12
    try:
      experiment.run(bad, os.path.join(sys.argv[4], "bad"))
    except ValueError as error:
      out["batch_error"] = str(error)
    out["bad_workdir_created"] = os.path.exists(os.path.join(sys.argv[4], "bad"))
    print("RESULT " + json.dumps(out))
    """)


def run_on_eight_devices(script: str, *args) -> dict:
  env = dict(os.environ, XLA_FLAGS=parallel.fake_cpu_devices_xla_flags(8))
  proc = subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT "):])


# In float64, so that what the 1- and 8-device steps compute can be compared over many
# steps: in float32 the two runs drift apart step by step (about 10x a step on this
# supernet: rounding differences of partial sums in another order, amplified by the
# search), in float64 they agree to 1e-12 (measured ~1e-16). The second-order
# (finite-difference) NA-DARTS step contains the first-order one's pieces (the weight step,
# the architecture gradient over the neighbors), and DARTS is NA-DARTS's
# one-identity-neighbor case of the same objective (test_search_objective.py).
def test_eight_device_step_equals_one_device_step(tmp_path):
  out = run_on_eight_devices(EIGHT_DEVICES, "na_darts", "second_fd", 3, tmp_path)
  assert out["devices"] == 8 and out["replicas"] == 8
  assert out["alpha_dtype"] == "float64"
  tol = 1e-12
  assert out["alpha_diff"] <= tol * max(1.0, out["alpha_scale"])
  assert out["params_diff"] <= tol
  assert out["stats_diff"] <= tol
  assert out["loss_diff"] <= tol
  assert out["alpha_sharding"] == "P()"  # replicated
  # After the extra steps alpha has moved, and every replica holds the same bits.
  assert out["alpha_moved"] > 1e-4
  assert out["replicas_identical"]
  assert out["more_alpha_diff"] <= tol
  assert "config.data.batch_size = 12 is not divisible by the 8 devices" in out["batch_error"]
  assert not out["bad_workdir_created"]


# The bilevel test's toy supernet that can skip its kernel's gradient: the step compiled
# as a loop with its batches sharded over 8 devices, against the shared step on one.
LOOP_ON_EIGHT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, "tests")
    from nanas_jax import parallel
    from test_search_bilevel import loop_against_shared

    mesh = parallel.data_mesh()
    diff, moved, loop = loop_against_shared(lambda state, batches: (
        parallel.replicate(state, mesh), tuple(parallel.shard_batch(b, mesh) for b in batches)))
    print("RESULT " + json.dumps({"devices": mesh.devices.size, "diff": diff, "moved": moved,
                                  "alpha_sharding": str(loop.alpha.sharding.spec)}))
    """)


def test_the_loop_step_on_eight_devices_equals_the_shared_step_on_one():
  out = run_on_eight_devices(LOOP_ON_EIGHT)
  assert out["devices"] == 8 and out["alpha_sharding"] == "P()"
  assert out["moved"] > 1e-3
  assert out["diff"] < 1e-5


# The bilevel test's toy supernet, with the accelerators' kernels, its batches sharded.
COMPILE_AHEAD = textwrap.dedent("""
    import collections, json, sys
    sys.path.insert(0, "tests")
    import jax
    from nanas_jax import parallel
    from nanas_jax.search import bilevel
    from test_search_bilevel import (SPACE, ToyArchModel, init_state, make_batches,
                                     make_config, record_compiles)

    mesh = parallel.data_mesh()
    (tx, ty), (vx, vy) = make_batches()
    train, val = parallel.shard_batch((tx, ty), mesh), parallel.shard_batch((vx, vy), mesh)
    out = {"devices": mesh.devices.size}
    for ahead in (True, False):
      jax.clear_caches()
      bilevel._supernet_programs.cache_clear()
      config = make_config("na_darts", "first", num=2, kind="swap", evaluate="vmap")
      config.warmup_epochs = 0
      search = bilevel.BilevelSearch(ToyArchModel(dw_impl="conv"), SPACE, config, 10,
                                     platform=PLATFORM)
      search._ahead_enabled = ahead
      step = search.jit_step()

      def run(state=parallel.replicate(init_state(search, tx), mesh)):
        for _ in range(2):
          state, _ = step(state, train, val)
        jax.block_until_ready(state)

      compiles = record_compiles(run)
      out[str(ahead)] = {"side": [name for name, thread in compiles if thread != "MainThread"],
                         "counts": collections.Counter(name for name, _ in compiles)}
    print("RESULT " + json.dumps(out))
    """)


# A search for a GPU (its programs run as jits of their own, with XLA's options for a GPU,
# which the CPU ignores) and one for the CPU.
@pytest.mark.parametrize("platform", ["cpu", "gpu"])
def test_the_program_compiled_ahead_is_found_compiled_on_eight_devices(platform):
  """With a replicated state and sharded batches, the step's first call finds the programs
  its side threads compiled (jit's cache key includes the inputs' placements, and those of
  the step's own results are stand-ins): it compiles nothing twice."""
  out = run_on_eight_devices(COMPILE_AHEAD.replace("PLATFORM", repr(platform)))
  assert out["devices"] == 8
  assert sorted(out["True"]["side"]) == [
      "jit(_apply_arch_update)", "jit(_apply_weight_update)", "jit(_architecture_weights)",
      "jit(_chain_to_alpha)", "jit(_metrics)", "jit(_split_key)",
      "jit(supernet_value_and_params_grad)"]
  assert out["False"]["side"] == []
  ahead, inline = out["True"]["counts"], out["False"]["counts"]
  assert max(ahead.values()) == 1
  assert {**inline, "jit(_softmax)": 1} == ahead


# BatchNorm recalibration as the search's end of epoch runs it: a replicated network, the
# calibration batches sharded over the devices.
RECALIBRATION = textwrap.dedent("""
    import json
    import flax.linen as nn
    import jax, numpy as np
    from nanas_jax import parallel
    from nanas_jax.nn import ops
    from nanas_jax.nn.recalibration import average_batch_statistics

    class ConvBatchNorm(nn.Module):
      @nn.compact
      def __call__(self, x):
        return ops.BatchNorm(name="bn")(nn.Conv(3, (3, 3), name="conv")(x), True)

    model = ConvBatchNorm()
    rng = np.random.default_rng(0)
    # Each device's rows drawn around a mean of their own: statistics reduced per device
    # and averaged would differ from the global batch's.
    images = [(rng.normal(size=(16, 4, 4, 2)) + np.repeat(np.arange(8.0), 2)[:, None, None,
               None]).astype(np.float32) for _ in range(3)]
    variables = model.init(jax.random.key(0), images[0])

    @jax.jit
    def update(variables, stats, x):
      return model.apply({"params": variables["params"], "batch_stats": stats}, x,
                         mutable=["batch_stats"])[1]["batch_stats"]

    def recalibrate(variables, batches):
      return average_batch_statistics(lambda zeros, x: update(variables, zeros, x),
                                      variables["batch_stats"], batches)

    one = recalibrate(variables, [(x,) for x in images])
    mesh = parallel.data_mesh()
    eight = recalibrate(parallel.replicate(variables, mesh),
                        [parallel.shard_batch((x,), mesh) for x in images])
    per_device = recalibrate(variables, [(x[i:i + 2],) for x in images for i in range(0, 16, 2)])
    pairs = list(zip(jax.tree.leaves(one), jax.tree.leaves(eight)))
    print("RESULT " + json.dumps({
        "devices": mesh.devices.size,
        "diff": max(float(np.abs(np.asarray(a) - parallel.to_host(b)).max()) for a, b in pairs),
        "per_device_diff": max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                               for a, b in zip(jax.tree.leaves(one),
                                               jax.tree.leaves(per_device))),
        "specs": sorted({str(b.sharding.spec) for _, b in pairs})}))
    """)


def test_recalibration_on_eight_devices_equals_one_device():
  """The statistics of batches sharded over 8 devices are the whole batches' (not the
  mean of each device's rows'), and come back replicated, as the evaluation after them
  needs."""
  out = run_on_eight_devices(RECALIBRATION)
  assert out["devices"] == 8
  assert out["diff"] <= 1e-5
  assert out["per_device_diff"] > 1.0
  assert out["specs"] == ["P()"]
