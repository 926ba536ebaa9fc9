"""Compile time, step time and peak memory of the search step (a benchmark, not a test).

Each configuration runs in its own subprocess so that its peak resident memory is its own.

  python benchmarks/search_step.py --preset=quickstart
  python benchmarks/search_step.py --preset=reference --steps=2
  python benchmarks/search_step.py --algorithm=na_darts --order=first --channels=16 \
      --layers=8 --size=32 --in_channels=3 --batch=64

Reported per configuration: ``init_s`` (building the state), ``first_step_s`` (compile +
one step), ``step_s`` (median of the next steps), ``peak_rss_gb`` (the process's maximum
resident set size, which on a CPU includes XLA's compiler memory), ``peak_device_gb``
(accelerator memory, where reported), the number of supernet gradient evaluations per
step, how many neighbors one vmapped pass evaluates (``neighbor_chunk``; None when they
are evaluated one by one, or there is one), and the device. The children start with huge
pages where `nanas_jax.cli`'s programs would (`cli.huge_pages_environ`;
``NANAS_HUGE_PAGES=0`` measures without). A child prints ``init_s`` and ``first_step_s``
as soon as its first step is done, a line before its result (and with ``--profile``,
``step_s`` before it traces a step more), so that a caller that stops it at a time limit
still has them. ``--profile=DIR`` traces the first step with
`jax.profiler` (into DIR, for TensorBoard) and adds ``first_step_events``: the trace's
events that took the most time of their own (`profile_events`; ``profile_error`` instead
where the profiler could not run), and ``first_step_kinds``, those summed by kind (below:
on a GPU, the first run of each kind of instruction, cuDNN's convolutions among them,
whose execution plans cuDNN builds then); ``--profile_until=T`` cuts that trace at the
time T if the step still runs, and prints what it holds (`FirstStepTrace`). It then traces
one more step after the timed ones (into DIR/steady) and adds where a step's time goes
once compiled: ``step_events``, its events the same way, ``step_kinds``, those summed by
kind (`event_kind`: XLA's fusions, convolutions, library calls; on a GPU its kernels),
and ``traced_step_s``, that step's time under the profiler.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import threading
import time

PRESETS = {
    # Digits-sized inputs at the first quick start's supernet (5 cells, C=8, batch 64), kept
    # so that numbers compare across versions (configs/quickstart.py now has C=4, batch 32).
    "quickstart": dict(channels=8, layers=5, size=8, in_channels=1, batch=64),
    # The DARTS search setting: 8 cells, C=16, CIFAR-sized inputs, batch 64.
    "reference": dict(channels=16, layers=8, size=32, in_channels=3, batch=64),
}


def _peak_device_gb(device):
  """Peak accelerator memory in use, where the backend reports it (not on CPU)."""
  stats = device.memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else round(peak / 2**30, 2)


# An HLO instruction's name is its kind and a number XLA gave it ("fusion.12",
# "cudnn-conv-bw-filter.3"; a GPU kernel's "loop_add_fusion_7"), also when nested.
_INSTRUCTION_NUMBER = re.compile(r"(?:[._]\d+)+$")


def event_kind(name: str) -> str:
  """What a trace event is, without the number that tells one HLO instruction of a kind
  from the others: ``'multiply_add_fusion.23'`` -> ``'multiply_add_fusion'``."""
  return _INSTRUCTION_NUMBER.sub("", name)


# XLA's GPU runtime annotates each thunk "Thunk:#hlo_op=NAME#" (TraceMe's key=value
# encoding); a GPU kernel's event carries the annotations open at its launch, outermost
# first, in one statistic, where the host's thunk event has ``hlo_op`` on its own.
_HLO_OP = re.compile(r"hlo_op=([^#,]+)")


def _hlo_op(event) -> str | None:
  """The HLO instruction a trace event ran for, where the trace says (a GPU kernel's, its
  innermost annotation's)."""
  for name, value in event.stats:
    if name == "hlo_op":
      return value
    if isinstance(value, str) and "hlo_op=" in value:
      return _HLO_OP.findall(value)[-1]
  return None


# How many events a profile reports.
TOP_EVENTS = 25


def profile_events(log_dir: str, top: int = TOP_EVENTS, by_kind: bool = False) -> list[dict]:
  """The events of the newest `jax.profiler` trace under ``log_dir`` that took the most
  time of their own, longest first: ``{plane, name, calls, s, self_s}``, ``s`` their
  summed durations and ``self_s`` that less the events nested in them on the same thread
  (or stream). XLA's own (compiling, autotuning, running a program, the CUDA calls and
  kernels on a GPU) are what it shows where a first step's time goes. ``by_kind``: the
  events of each `event_kind` summed, ``name`` the kind (how a program's time splits
  between fusions, convolutions and library calls, which one at a time are too many), of
  the HLO instruction that launched the event where the trace names it (`_hlo_op`: a
  cuDNN kernel is then a ``cudnn-conv-bw-filter``), else of the event's own name."""
  return _ranked_events(_newest_trace(log_dir), top, by_kind)


def _newest_trace(log_dir: str):
  """The newest `jax.profiler` trace under ``log_dir``, read."""
  from jax.profiler import ProfileData  # pylint: disable=g-import-not-at-top

  path = max(glob.glob(os.path.join(log_dir, "**", "*.xplane.pb"), recursive=True),
             key=os.path.getmtime)
  return ProfileData.from_file(path)


def _ranked_events(trace, top: int, by_kind: bool) -> list[dict]:
  """`profile_events` of a trace already read."""
  totals = {}  # (plane, name) -> [calls, ns, self ns]
  for plane in trace.planes:
    for line in plane.lines:
      enclosing = []  # (end_ns, key) of the events open at this point, innermost last
      named = ((e.start_ns, e.duration_ns, event_kind(_hlo_op(e) or e.name) if by_kind
                else e.name) for e in line.events)
      for start, duration, name in sorted(named, key=lambda e: (e[0], -e[1])):
        while enclosing and enclosing[-1][0] <= start:
          enclosing.pop()
        key = (plane.name, name)
        entry = totals.setdefault(key, [0, 0, 0])
        entry[0] += 1
        entry[1] += duration
        entry[2] += duration
        if enclosing:
          end, parent = enclosing[-1]
          totals[parent][2] -= min(duration, end - start)
        enclosing.append((start + duration, key))
  rows = sorted(totals.items(), key=lambda item: -item[1][2])[:top]
  return [{"plane": plane, "name": name, "calls": calls, "s": round(ns / 1e9, 3),
           "self_s": round(self_ns / 1e9, 3)} for (plane, name), (calls, ns, self_ns) in rows]


# A profiler that cannot start or read its trace (no CUPTI in a sandbox, say) must not cost
# the measurement: the row then says why it has no profile.
def start_profile(log_dir: str) -> dict:
  """Starts a `jax.profiler` trace into ``log_dir``: ``{}``, or ``{'profile_error'}``."""
  import jax  # pylint: disable=g-import-not-at-top

  options = jax.profiler.ProfileOptions()
  options.python_tracer_level = 0  # Python's frames would slow the trace down
  try:
    jax.profiler.start_trace(log_dir, profiler_options=options)
  except Exception as error:  # pylint: disable=broad-except
    return {"profile_error": str(error)[:300]}
  return {}


def finish_profile(log_dir: str, field: str = "first_step_events",
                   kinds_field: str | None = None) -> dict:
  """Stops the trace `start_profile` started: ``{field: profile_events}`` (and with
  ``kinds_field``, under it, the events summed by kind), or ``{'profile_error'}``."""
  import jax  # pylint: disable=g-import-not-at-top

  try:
    jax.profiler.stop_trace()
    trace = _newest_trace(log_dir)  # read once, ranked once or twice
    events = {field: _ranked_events(trace, TOP_EVENTS, by_kind=False)}
    if kinds_field:
      events[kinds_field] = _ranked_events(trace, TOP_EVENTS, by_kind=True)
    return events
  except Exception as error:  # pylint: disable=broad-except
    return {"profile_error": str(error)[:300]}


class FirstStepTrace:
  """The first step's trace (`start_profile`, `finish_profile`), cut short at the wall-clock
  time ``until`` (seconds since the epoch; None: never) if the step is still running
  then: its events so far (those that had ended: a compile or a program's run still in
  progress is not among them, the steps inside it that had ended are) are printed at once
  as a JSON line, with ``first_step_trace_cut_s``, how far into the step the trace was
  cut. A caller that stops this process at a time limit (device_check) so still learns
  where a first step that outlasts the limit spent its time."""

  def __init__(self, log_dir: str, until: float | None):
    self.log_dir, self.until = log_dir, until
    self.fields = {}  # what the trace reports
    self._lock = threading.Lock()
    self._open = False
    self._started = None
    self._timer = None

  def start(self):
    """Starts the trace (`fields` says ``profile_error`` where it could not)."""
    self.fields = start_profile(self.log_dir)
    self._open = not self.fields
    self._started = time.perf_counter()
    if self._open and self.until is not None:
      # A daemon thread: JAX releases the GIL while it compiles and runs a program.
      self._timer = threading.Timer(max(0.0, self.until - time.time()), self._stop,
                                    kwargs={"cut": True})
      self._timer.daemon = True
      self._timer.start()

  def _stop(self, cut: bool):
    """Stops the trace if it is still open, into `fields`; ``cut``: the step is still
    running, so the fields are printed now (under the lock, whole lines)."""
    with self._lock:
      if not self._open:
        return
      self._open = False
      elapsed = round(time.perf_counter() - self._started, 2)
      self.fields.update(finish_profile(self.log_dir, "first_step_events",
                                        "first_step_kinds"))
      if cut:
        self.fields["first_step_trace_cut_s"] = elapsed
        print(json.dumps(self.fields), flush=True)

  def finish(self) -> dict:
    """Stops the trace when the step is done (unless it was cut): its fields."""
    if self._timer is not None:
      self._timer.cancel()
    self._stop(cut=False)
    return self.fields


def build_search(args, evaluate: str, platform: str | None = None):
  """The quick start's search config with this command line's choices, neighbors
  evaluated as ``evaluate``, and its `BilevelSearch` on the space ``args.space`` compiling
  for ``platform`` (default: JAX's default backend): ``(config, search)``. The supernet
  is DARTS's of ``args.layers`` cells, or NAS-Bench-201's of ``args.layers`` cells a
  stage."""
  from configs import quickstart
  from nanas_jax import spaces
  from nanas_jax.nn.nb201_supernet import SearchNetworkNB201
  from nanas_jax.nn.supernet import SearchNetwork
  from nanas_jax.search.bilevel import BilevelSearch

  config = quickstart.get_config().search
  # Every timed step is a whole search step (the quick start's warm-up steps are weight
  # steps alone).
  config.warmup_epochs = 0
  config.algorithm = args.algorithm
  config.order = args.order
  config.neighbors.num = args.neighbors
  config.compile = args.compile
  config.neighbors.evaluate = evaluate
  if args.chunk is not None:
    config.neighbors.chunk = args.chunk
  config.dtype = args.dtype
  config.gpu_autotune = args.gpu_autotune
  if args.space == "nb201":
    # The accelerators' convolutions where the step compiles for one from this host.
    model = SearchNetworkNB201(num_classes=10, channels=args.channels,
                               cells_per_stage=args.layers, inner_impl=args.inner_impl,
                               conv_impl="vmap" if platform in ("gpu", "tpu") else "auto")
  else:
    model = SearchNetwork(num_classes=10, channels=args.channels, layers=args.layers,
                          dw_impl=args.depthwise_impl, inner_impl=args.inner_impl)
  return config, BilevelSearch(model, spaces.get_space(args.space), config,
                               steps_per_epoch=100, platform=platform)


def search_compile_mode(search) -> str:
  """How ``search`` compiles its step: ``'loop'``, ``'fused'`` or ``'shared'``."""
  return "loop" if search.looped else "fused" if search.fused else "shared"


def measure(args) -> dict:
  """Runs one configuration in this process and returns its numbers."""
  import jax
  import numpy as np

  from nanas_jax.search.bilevel import neighbors_per_step

  config, search = build_search(args, args.evaluate)
  rng = np.random.default_rng(0)
  shape = (args.batch, args.size, args.size, args.in_channels)
  batch = lambda: (rng.normal(size=shape).astype(np.float32),
                   rng.integers(0, 10, args.batch).astype(np.int32))
  t = time.perf_counter()
  state = search.init(jax.random.key(0), batch()[0])
  jax.block_until_ready(state)
  init_s = time.perf_counter() - t
  step = search.jit_step()
  times, first = [], {"init_s": round(init_s, 2)}
  trace = FirstStepTrace(args.profile, args.profile_until) if args.profile else None
  for _ in range(args.steps + 1):
    train, val = batch(), batch()
    if trace and not times:
      trace.start()
    t = time.perf_counter()
    state, metrics = step(state, train, val)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t)
    if len(times) == 1:
      first["first_step_s"] = round(times[0], 2)
      if trace:
        first.update(trace.finish())
      # Progress, for a caller that stops this process at a time limit (device_check).
      print(json.dumps(first), flush=True)
  step_s = round(statistics.median(times[1:]), 3) if len(times) > 1 else None
  steady = {}
  if args.profile and "profile_error" not in first:
    # One more step, traced, after the timed ones: the profiler's cost stays out of them,
    # and a caller that stops this process while it traces has them already.
    print(json.dumps({"step_s": step_s}), flush=True)
    log_dir = os.path.join(args.profile, "steady")
    steady.update(start_profile(log_dir))
    if not steady:
      t = time.perf_counter()
      state, metrics = step(state, batch(), batch())
      jax.block_until_ready((state, metrics))
      steady["traced_step_s"] = round(time.perf_counter() - t, 3)
      steady.update(finish_profile(log_dir, "step_events", "step_kinds"))
  k = neighbors_per_step(config)
  vmapped = search.neighbors_vmapped(val[0])
  grads_per_step = {"first": k + 1, "second_fd": k + 4, "second_exact": None}[args.order]
  return {
      "space": args.space, "algorithm": args.algorithm, "order": args.order, "neighbors": k,
      "channels": args.channels, "layers": args.layers, "size": args.size,
      "batch": args.batch, "dtype": args.dtype, "depthwise_impl": args.depthwise_impl,
      "inner_impl": args.inner_impl, "compile": search_compile_mode(search),
      "gpu_autotune": args.gpu_autotune,
      "vmap_neighbors": vmapped,
      "neighbor_chunk": search.vmap_chunk() if vmapped and k > 1 else None,
      **first, **steady,
      "step_s": step_s,
      "supernet_gradients_per_step": grads_per_step,
      "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
      "peak_device_gb": _peak_device_gb(jax.devices()[0]),
      "device": str(jax.devices()[0].device_kind),
  }


def parse_with_preset(parser: argparse.ArgumentParser, presets: dict, argv=None):
  """``parser``'s arguments plus ``--child`` (run one configuration in this process) and
  ``--output``, parsed with the ``--preset``'s sizes where the command line does not set
  them."""
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--output", help="append the JSON results to this file")
  preset = parser.parse_args(argv).preset
  if preset:
    parser.set_defaults(**presets[preset])
  return parser.parse_args(argv)


def main(argv=None):
  from nanas_jax import cli
  from nanas_jax.nn.functional import DEPTHWISE_IMPLS
  from nanas_jax.nn.supernet import INNER_IMPLS
  from nanas_jax.search.bilevel import COMPUTE_DTYPES

  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", choices=sorted(PRESETS))
  parser.add_argument("--space", default="darts", choices=["darts", "nb201"],
                      help="the search space: DARTS's cells (--layers of them) or "
                      "NAS-Bench-201's (--layers a stage; --depthwise_impl does not apply)")
  parser.add_argument("--algorithm", choices=["darts", "na_darts", "both"], default="both")
  parser.add_argument("--order", default="first",
                      choices=["first", "second_fd", "second_exact"])
  parser.add_argument("--neighbors", type=int, default=4)
  parser.add_argument("--compile", default="auto",
                      choices=["auto", "shared", "fused", "loop"])
  parser.add_argument("--evaluate", default="auto", choices=["auto", "vmap", "loop"])
  parser.add_argument("--chunk", type=int, help="neighbors per vmapped pass "
                      "(config.search.neighbors.chunk; 0: all at once)")
  parser.add_argument("--dtype", default="float32", choices=COMPUTE_DTYPES,
                      help="the supernet's compute dtype (config.search.dtype)")
  parser.add_argument("--depthwise_impl", default="auto", choices=DEPTHWISE_IMPLS)
  parser.add_argument("--gpu_autotune", action="store_true", help="on a GPU, let XLA "
                      "time candidate kernels as it compiles (config.search.gpu_autotune)")
  parser.add_argument("--inner_impl", default="auto", choices=INNER_IMPLS,
                      help="a cell's inner nodes in a loop or unrolled (config.model.inner_impl)")
  parser.add_argument("--channels", type=int, default=8)
  parser.add_argument("--layers", type=int, default=5)
  parser.add_argument("--size", type=int, default=8)
  parser.add_argument("--in_channels", type=int, default=1)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--steps", type=int, default=3, help="timed steps after the first")
  parser.add_argument("--profile", help="trace the first step, and one step after the "
                      "timed ones, with jax.profiler into this directory (for TensorBoard) "
                      "and report their longest events")
  parser.add_argument("--profile_until", type=float, help="with --profile: cut the first "
                      "step's trace at this time (seconds since the epoch) if the step is "
                      "still running, and print its events so far (for a caller that stops "
                      "this process at a time limit)")
  args = parse_with_preset(parser, PRESETS, argv)
  if args.child:
    print(json.dumps(measure(args)))
    return
  algorithms = ["darts", "na_darts"] if args.algorithm == "both" else [args.algorithm]
  for algorithm in algorithms:
    child = [sys.executable, __file__, "--child", f"--algorithm={algorithm}"] + [
        f"--{k}={getattr(args, k)}" for k in (
            "space", "order", "neighbors", "compile", "evaluate", "dtype", "depthwise_impl",
            "inner_impl", "channels", "layers", "size", "in_channels", "batch", "steps")] + (
                [] if args.chunk is None else [f"--chunk={args.chunk}"]) + (
                    [f"--profile={args.profile}"] if args.profile else []) + (
                        ["--gpu_autotune"] if args.gpu_autotune else []) + (
                        [] if args.profile_until is None
                        else [f"--profile_until={args.profile_until}"])
    # The child starts as `nanas_jax.cli` programs run: with huge pages where they help.
    out = subprocess.run(child, capture_output=True, text=True, check=False,
                         env=cli.huge_pages_environ(os.environ))
    if out.returncode:
      sys.exit(f"{algorithm} failed:\n{out.stderr[-3000:]}")
    line = out.stdout.strip().splitlines()[-1]
    print(line, flush=True)
    if args.output:
      with open(args.output, "a") as f:
        f.write(line + "\n")


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  main()
