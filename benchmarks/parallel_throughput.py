"""Step throughput of the data-parallel bilevel search step on 1, 2, 4, 8 devices.

  python benchmarks/parallel_throughput.py --preset=quickstart --devices=1,2,4,8
  python benchmarks/parallel_throughput.py --preset=quickstart --layers=3 --channels=4 \
      --steps=3 --algorithm=na_darts --order=second_fd

The step is the one `nanas_jax.experiment.run_search` runs: the state replicated over a
one-axis ``'data'`` mesh (`nanas_jax.parallel`), the train and validation batches sharded
along it, the plain ``jax.jit`` step code partitioned by GSPMD. Every device count runs in
its own subprocess (the CPU device count is fixed when JAX starts, and each count's peak
memory should be its own) on the same *global* batch, the same initial state and the same
random data, so the device counts compute the same search up to the order of
floating-point sums.

Reported per device count, as JSON lines and then a markdown table:
``first_step_s`` (compilation plus one step), ``step_s`` (median of the ``--steps`` steps
after it), ``images_per_s`` (the global batch over ``step_s``: each step also reads a
validation batch of the same size, not counted), ``speedup`` (``step_s`` of the smallest
device count over this one's) and ``efficiency`` (speedup per added device: speedup times
the smallest count over this count, 1.0 is linear scaling), ``peak_rss_gb`` (the process's
maximum resident memory, on a CPU including XLA's compiler), ``peak_device_gb`` (the
largest per-device peak of the accelerator memory, where reported), the backend and device
kind, and ``alpha_diff``: the largest difference of the final alpha from the smallest
device count's (float32 rounding, 1e-8 to 1e-6; more means the sharded step computes something
else).

What the numbers mean on a CPU: the N devices are fake
(``XLA_FLAGS=--xla_force_host_platform_device_count=N``), N host "devices" that share the
same physical cores (2 on the machine this was developed on). They add no compute, so a
speedup near or below 1 is expected (a few percent above 1 where one device's program
left a core idle). On a CPU the benchmark measures the overhead of the sharded program
(partitioned compilation, per-device dispatch, the all-reduces) and checks that the
plumbing works end to end (replication, sharding, equal results). It says nothing about
scaling. Real scaling needs real devices: on a GPU or TPU machine the same
command uses the first N accelerators (``jax.devices()[:N]``, no XLA flag), and
``JAX_PLATFORMS=cpu`` forces the fake CPU devices there. On a CPU every count also runs
with ``--xla_cpu_enable_concurrency_optimized_scheduler=false`` (see
`nanas_jax.parallel.SERIAL_SCHEDULER_FLAG`), so its step times are those of XLA's
memory-minimising schedule, not of the default one `benchmarks/search_step.py` measures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

PRESETS = {
    # configs/quickstart.py: digits-sized inputs, 5 cells, C=8.
    "quickstart": dict(channels=8, layers=5, image="8x8x1"),
    # The DARTS search setting: 8 cells, C=16, CIFAR-sized inputs.
    "reference": dict(channels=16, layers=8, image="32x32x3"),
}
# What the child processes receive, besides --devices and --child.
CHILD_ARGS = ("algorithm", "order", "neighbors", "channels", "layers", "image", "batch",
              "steps", "seed")


def parse_image(text: str) -> tuple[int, int, int]:
  """``'32x32x3'`` -> ``(32, 32, 3)``: height, width, channels."""
  try:
    shape = tuple(int(v) for v in text.lower().split("x"))
  except ValueError:
    shape = ()
  if len(shape) != 3 or min(shape) < 1:
    raise argparse.ArgumentTypeError(f"--image = {text!r}: expected HxWxC, e.g. 32x32x3.")
  return shape


def parse_devices(text: str) -> list[int]:
  """``'1,2,4,8'`` -> ``[1, 2, 4, 8]``, sorted, no repeats."""
  try:
    counts = sorted({int(v) for v in text.split(",") if v.strip()})
  except ValueError:
    counts = []
  if not counts or counts[0] < 1:
    raise argparse.ArgumentTypeError(
        f"--devices = {text!r}: expected positive device counts, e.g. 1,2,4,8.")
  return counts


def parse_args(argv=None) -> argparse.Namespace:
  """The command line, with the preset applied under the explicit overrides."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", choices=sorted(PRESETS), default="quickstart")
  parser.add_argument("--devices", type=parse_devices, default=[1, 2, 4, 8],
                      help="comma-separated device counts, each in its own process")
  parser.add_argument("--algorithm", choices=["darts", "na_darts"], default="darts")
  parser.add_argument("--order", default="first",
                      choices=["first", "second_fd", "second_exact"])
  parser.add_argument("--neighbors", type=int, default=4, help="K, for na_darts")
  parser.add_argument("--channels", type=int, help="overrides the preset")
  parser.add_argument("--layers", type=int, help="overrides the preset")
  parser.add_argument("--image", help="HxWxC, overrides the preset")
  parser.add_argument("--batch", type=int, default=64,
                      help="global batch, the same for every device count")
  parser.add_argument("--steps", type=int, default=5, help="timed steps after the first")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--output", help="append the JSON lines to this file")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  for key, value in PRESETS[args.preset].items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  try:
    parse_image(args.image)
  except argparse.ArgumentTypeError as e:
    parser.error(str(e))
  if args.steps < 1:
    parser.error("--steps must be >= 1 (the median needs a timed step).")
  bad = [n for n in args.devices if args.batch % n]
  if bad:
    parser.error(f"--batch = {args.batch} is not divisible by the device count(s) {bad}: "
                 "the same global batch is split over every count.")
  return args


# ----------------------------------------------------------------------------- child
def measure(args) -> dict:
  """Runs the search step on the first ``args.devices[0]`` devices of this process."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from configs import quickstart
  from nanas_jax import parallel, spaces
  from nanas_jax.experiment import build_supernet
  from nanas_jax.search.bilevel import BilevelSearch, neighbors_per_step

  count = args.devices[0]
  if jax.device_count() < count:
    raise SystemExit(f"{count} devices asked for, {jax.device_count()} "
                     f"{jax.default_backend()} device(s) present.")
  mesh = parallel.data_mesh(jax.devices()[:count])
  parallel.check_batch_size(args.batch, mesh, field="--batch")
  config = quickstart.get_config()
  config.model.channels, config.model.layers = args.channels, args.layers
  config.search.algorithm, config.search.order = args.algorithm, args.order
  config.search.neighbors.num = args.neighbors
  model = build_supernet(config.model, num_classes=10)
  search = BilevelSearch(model, spaces.get_space("darts"), config.search, steps_per_epoch=100)

  # The same random batches for every device count, put on the devices before the clock
  # starts: the step is timed, not the host-to-device copies (the search prefetches them).
  rng = np.random.default_rng(args.seed)
  shape = (args.batch, *parse_image(args.image))

  def batch():
    return parallel.shard_batch((rng.normal(size=shape).astype(np.float32),
                                 rng.integers(0, 10, args.batch).astype(np.int32)), mesh)

  batches = [(batch(), batch()) for _ in range(args.steps + 1)]
  t = time.perf_counter()
  state = search.init(jax.random.key(args.seed), jnp.zeros((1, *shape[1:])))
  state = parallel.replicate(state, mesh)
  jax.block_until_ready(state)
  init_s = time.perf_counter() - t
  step = search.jit_step()
  times = []
  for train, val in batches:
    t = time.perf_counter()
    state, metrics = step(state, train, val)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t)
  parallel.assert_replicas_agree(state.alpha, "alpha")
  devices = list(mesh.devices.flat)
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in devices]
  step_s = statistics.median(times[1:])
  return {
      "devices": count, "backend": jax.default_backend(),
      "device_kind": devices[0].device_kind,
      "algorithm": args.algorithm, "order": args.order,
      "neighbors": neighbors_per_step(config.search), "channels": args.channels,
      "layers": args.layers, "image": args.image, "batch": args.batch,
      "per_device_batch": args.batch // count, "steps": args.steps,
      "init_s": round(init_s, 2), "first_step_s": round(times[0], 2),
      "step_s": round(step_s, 4), "images_per_s": round(args.batch / step_s, 1),
      "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
      "peak_device_gb": (None if None in peaks else round(max(peaks) / 2**30, 2)),
      "final_train_loss": float(metrics["train_loss"]),
      "alpha": parallel.to_host(state.alpha).tolist(),
  }


# ---------------------------------------------------------------------------- parent
def probe_backend() -> tuple[str, int]:
  """``(backend, device count)`` as a fresh process sees them, without the parent
  touching a device (on a GPU that would claim the memory the children need)."""
  code = "import jax; print(jax.default_backend(), jax.device_count())"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True)
  backend, count = out.stdout.split()[-2:]
  return backend, int(count)


def child_env(count: int, backend: str) -> dict[str, str]:
  """The environment of the child for ``count`` devices: on a CPU, ``count`` fake host
  devices (replacing any device-count flag already in ``XLA_FLAGS``) and the serial
  collective schedule unless ``XLA_FLAGS`` chooses one, for every count alike so that
  all run the same schedule; elsewhere unchanged, the child takes the first ``count``
  real devices. Huge pages where `nanas_jax.cli`'s programs would have them."""
  from nanas_jax import cli, parallel

  env = cli.huge_pages_environ(os.environ) or dict(os.environ)
  if backend == "cpu":
    env["XLA_FLAGS"] = parallel.fake_cpu_devices_xla_flags(count, env.get("XLA_FLAGS", ""))
  return env


def add_scaling(result: dict, base: dict | None) -> dict:
  """Adds speedup, efficiency and alpha_diff against ``base`` (the smallest device
  count's result) to ``result``, and drops its alpha."""
  alpha = result.pop("alpha")
  if base is None:
    result.update(speedup=None, efficiency=None, alpha_diff=None)
    return result
  speedup = base["step_s"] / result["step_s"]
  result["speedup"] = round(speedup, 3)
  result["efficiency"] = round(speedup * base["devices"] / result["devices"], 3)
  result["alpha_diff"] = float(max(abs(a - b) for a, b in zip(_flat(alpha),
                                                              _flat(base["alpha"]))))
  return result


def _flat(nested):
  if isinstance(nested, list):
    for item in nested:
      yield from _flat(item)
  else:
    yield nested


def _cell(value, fmt="{}") -> str:
  return "-" if value is None else fmt.format(value)


def markdown_table(results: list[dict]) -> str:
  """The results as a markdown table, one row per device count."""
  rows = [
      "| devices | backend (device) | per-device batch | compile + first step | step "
      "(median) | images/s | speedup | efficiency | peak memory | alpha diff |",
      "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for r in results:
    memory = (f"{r['peak_device_gb']} GB per device" if r["peak_device_gb"] is not None
              else f"{r['peak_rss_gb']} GB RSS")
    rows.append(
        f"| {r['devices']} | {r['backend']} ({r['device_kind']}) | {r['per_device_batch']} "
        f"| {r['first_step_s']:.1f} s | {r['step_s']:.3f} s | {r['images_per_s']:.1f} "
        f"| {_cell(r['speedup'], '{:.2f}x')} | {_cell(r['efficiency'], '{:.2f}')} "
        f"| {memory} | {_cell(r['alpha_diff'], '{:.1e}')} |")
  return "\n".join(rows)


def main(argv=None):
  args = parse_args(argv)
  if args.child:
    print(json.dumps(measure(args)))
    return
  backend, available = probe_backend()
  if backend != "cpu" and args.devices[-1] > available:
    sys.exit(f"--devices asks for {args.devices[-1]} devices; this machine has {available} "
             f"{backend} device(s).")
  results, base, failed = [], None, []
  for count in args.devices:
    child = [sys.executable, os.path.abspath(__file__), "--child", f"--devices={count}"] + [
        f"--{k}={getattr(args, k)}" for k in CHILD_ARGS]
    out = subprocess.run(child, capture_output=True, text=True, check=False,
                         env=child_env(count, backend))
    if out.returncode:
      failed.append(count)
      print(json.dumps({"devices": count, "error": out.stderr[-3000:]}), flush=True)
      continue
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if base is None:
      base = dict(result)
    result = add_scaling(result, base)
    results.append(result)
    line = json.dumps(result)
    print(line, flush=True)
    if args.output:
      with open(args.output, "a") as f:
        f.write(line + "\n")
  print()
  print(markdown_table(results))
  if failed:
    sys.exit(f"device count(s) {failed} failed; see their error lines above.")


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  main()
