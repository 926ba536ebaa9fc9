"""Every measurement of the search step on this machine's accelerator, in one run (a
benchmark, not a test), beside the PyTorch reference on the same chip.

  python benchmarks/device_check.py --reference=PATH/TO/darts/cnn [--preset=reference]
  benchmarks/device_check.sh PATH/TO/darts/cnn                      # the same, on a GPU

Rows, each in its own subprocess (its own compile, its own peak memory):

- ours (`search_step.py`): DARTS first order, DARTS second order (finite differences),
  NA-DARTS first order with K=4 neighbors;
- the reference (`reference_step.py`, quark0/darts ``cnn/`` read from ``--reference``,
  nothing of it in this repository): first and second order;

and before them the first-run probe (`conv_first_run.py`, seconds).

Each row has a time limit (``--timeout``, 300 s by default), and the whole run a budget
(``--budget``, 8 minutes by default): a row gets at most what is left of it, and a row
whose turn comes with less than `MIN_ROW_S` left is not started, so that the report is
written within the budget even where compiles run long. The row limit is generous because
the budget already bounds the run: on a CPU host, JAX 0.11.2's GPU compiler (the H200
machine's) compiled our reference-size DARTS step 1.7x as long as 0.10.2's side by side,
2.5x one program after another (its fusion autotuner compiles every fusion on its own
first; `benchmarks/README.md`), so a first step there may pass 150 s, and a row stopped
at its limit reports no step at all. The rows run cheapest and most needed first: the
reference's two (seconds each, and the 3x goal reads its first order), DARTS first order,
NA-DARTS, then DARTS second order, which only the compile goal reads; the report lists
them in the order above.

``--profile=DIR`` traces our rows' first steps with `jax.profiler` (a folder of DIR each,
for TensorBoard), and they report ``first_step_events``, the trace's events that took the
most time of their own (`search_step.profile_events`): where a first step's time goes,
compiling, autotuning or running, and ``first_step_kinds``, the same summed by kind, on a
GPU the first run of each kind of instruction, where cuDNN builds its convolutions'
execution plans (``profile_error`` instead, where the profiler could not
run; the row is measured all the same; a first step still running `PROFILE_MARGIN_S`
before the row's limit has its trace cut there and reported, with
``first_step_trace_cut_s``, so that a row stopped at its limit still says where its first
step went); and, from one more step traced after the timed
ones, where a compiled step's time goes: ``step_events``, ``step_kinds`` (its events
summed by kind: on a GPU its kernels, cuDNN's and cuBLAS's among them) and
``traced_step_s``. ``--rows`` runs only the rows it names (`ROW_NAMES`;
the others are reported as not run), so that one call can run a few rows under each of
two compiler settings.

``--dtype=bfloat16`` runs our rows in bfloat16 (``config.search.dtype``; the reference
stays float32) and writes ``<device>-bfloat16.json`` beside the float32 file;
``--inner_impl=scan`` (or ``unroll``) runs our cells' inner nodes that way
(``config.model.inner_impl``; 'auto' unrolls them on accelerators) and writes
``<device>-scan.json``; ``--depthwise_impl=taps_fused`` runs our depthwise convolutions as
sums of taps that XLA fuses instead of cuDNN's grouped convolutions
(``config.model.depthwise_impl``) and writes ``<device>-taps_fused.json``;
``--gpu_autotune`` lets XLA time candidate kernels on the GPU as it compiles our steps
(``config.search.gpu_autotune``; by default cuDNN's and cuBLAS's heuristics choose,
`nanas_jax.search.bilevel.GPU_WITHOUT_AUTOTUNING`) and writes
``<device>-gpu_autotune.json``.

Presets: ``reference`` (the DARTS search: batch 64, C=16, 8 cells, 32x32x3) and ``small``
(batch 8, C=4, 5 cells, 16x16x3: the same script on a CPU in a few minutes). Writes
``benchmarks/results/<device>.json``: ``device``, ``jax``, ``torch``, ``date``, ``preset``,
``xla_flags`` (the ``XLA_FLAGS`` our rows ran under: set them in the environment to run
them so; a run with any writes ``<device>-xla_flags.json``; ``--name=NAME`` writes
``<device>-NAME.json`` instead of any of these names, so that runs under two settings of
the flags keep both), ``environment`` (JAX's account of the machine,
`jax.print_environment_info`: on a GPU with nvidia-smi's, the driver and CUDA versions),
``packages`` (the versions of JAX, its CUDA plugin, NVIDIA's libraries, flax, optax,
torch and numpy: `packages`), ``conv_first_run`` (`conv_first_run.py`'s cases: how long
a cuDNN convolution's first run takes beyond a run, per convolution instruction and per
configuration, the suspect of the first H200 run's 46 s; run first, its own process, at
the preset's sizes; ``error`` where it failed or was not among ``--rows``) and ``rows``
of ``{impl,
algorithm, order, neighbors, batch, channels, layers, size, dtype, first_step_s, step_s,
peak_gb}`` (a row that failed or ran out of time carries ``error`` instead of its
numbers; ours also carry ``neighbor_chunk``, the neighbors per vmapped pass, None where
they run one by one, and ``xla_compile``, XLA's compile timers of every program that
compiled for a second or more: `xla_compile_timers`, and ``log_warnings``, its log's
distinct warning and error lines, counted: `log_warnings`; one of ours stopped at its
limit keeps what it had measured by then, ``first_step_s`` where its first step had
finished, ``step_s`` where it was tracing a step after the timed ones, ``xla_compile``
and ``log_warnings``), and
``goals``: the accelerator goals of the search step read from the rows (`goals`; they are
stated at the reference preset).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
import reference_step
from nanas_jax import cli
# pylint: enable=g-import-not-at-top,wrong-import-position

HERE = os.path.dirname(os.path.abspath(__file__))
PRESETS = {
    "reference": dict(batch=64, channels=16, layers=8, size=32),
    "small": dict(batch=8, channels=4, layers=5, size=16),
}
OURS = (("darts", "first", 1), ("darts", "second_fd", 1), ("na_darts", "first", 4))
REFERENCE = ("first", "second")
# The order the rows run in, as indices into the report's rows (ours, then the reference's).
RUN_ORDER = (3, 4, 0, 2, 1)
# The rows' names for --rows, in the report's order.
ROW_NAMES = tuple(f"{algorithm}_{order}" for algorithm, order, _ in OURS) + tuple(
    f"reference_{order}" for order in REFERENCE)
# The first-run probe (`conv_first_run.py`), which `--rows` names too: it runs first,
# before any row, for at most this long or a quarter of the budget, on the preset's batch
# and image size and 8 edges of its channels (as the supernet groups its convolutions).
PROBE = "conv_first_run"
PROBE_TIMEOUT_S = 90.0
# What one of our rows keeps of its process's log (`_log_fields`).
LOG_FIELDS = ("xla_compile", "log_warnings")
# What `search_step.py --profile` adds to one of our rows.
PROFILE_FIELDS = ("first_step_events", "first_step_kinds", "first_step_trace_cut_s",
                  "step_events", "step_kinds", "traced_step_s", "profile_error")
# A profiled row's first-step trace is cut this long before the row's time limit if the
# step still runs (`search_step.FirstStepTrace`): time to stop the trace, read it and print
# its events (at most half the limit).
PROFILE_MARGIN_S = 30.0
# A row is not started with less of the budget left than this.
MIN_ROW_S = 10.0
FIELDS = ("impl", "algorithm", "order", "neighbors", "batch", "channels", "layers", "size",
          "dtype", "first_step_s", "step_s", "peak_gb")
# Steps of a 50-epoch NA-DARTS CIFAR-10 search (configs/na_darts_cifar10.py): 390 an epoch,
# the 25,000-image search half at batch 64 with the last partial batch dropped.
SEARCH_STEPS = 50 * (25_000 // 64)


def _json_lines(text: str) -> list[dict]:
  return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def _last_json(text: str) -> dict:
  lines = _json_lines(text)
  if not lines:
    raise ValueError("no result line")
  return lines[-1]


# XLA's own compile timers (its scoped logging timers, printed at verbosity 1 of the
# compiler's file): a GPU program's HLO passes, which on a GPU include autotuning its cuDNN
# convolutions and Triton GEMMs, and its backend (IR emission and the kernels' compiles);
# on a CPU the same two stages, so that the script runs unchanged there.
XLA_TIMERS_ENV = {"TF_CPP_MIN_LOG_LEVEL": "0",
                  "TF_CPP_VMODULE": "gpu_compiler=1,cpu_compiler=1"}
_XLA_TIMER = re.compile(
    r"(?:GpuCompiler::RunHloPasses for (?P<gpu_passes>\S+)"
    r"|GpuCompiler::RunBackend for (?P<gpu_backend>\S+)"
    r"|Running HLO passes on \[(?P<cpu_passes>[^\]]+)\] for CPU"
    r"|Compiling \[(?P<cpu_backend>[^\]]+)\] for CPU using JIT)"
    r" time: .*?\((?P<us>\d+) us\)")
# A line of absl/glog's log format: severity, date, time, thread, file:line.
_LOG_LINE = re.compile(r"^[IWEF]\d{4} [\d:.]+ +\d+ [\w.\-]+:\d+\] ")


def xla_compile_timers(stderr: str, min_s: float = 1.0) -> list[dict]:
  """The programs XLA compiled for at least ``min_s`` seconds, longest first, from a
  process's log with `XLA_TIMERS_ENV`: ``{program, hlo_passes_s, backend_s}`` (a program
  compiled twice, its times summed)."""
  times: dict[str, dict[str, float]] = {}
  for match in _XLA_TIMER.finditer(stderr):
    stage, program = next((k, v) for k, v in match.groupdict().items()
                          if v is not None and k != "us")
    key = "hlo_passes_s" if stage.endswith("passes") else "backend_s"
    entry = times.setdefault(program, {"hlo_passes_s": 0.0, "backend_s": 0.0})
    entry[key] += int(match.group("us")) / 1e6
  rows = [{"program": program, **{k: round(v, 3) for k, v in entry.items()}}
          for program, entry in times.items() if sum(entry.values()) >= min_s]
  return sorted(rows, key=lambda r: -(r["hlo_passes_s"] + r["backend_s"]))


def log_warnings(stderr: str, limit: int = 20) -> list[dict]:
  """The distinct warnings and errors of a process's log (its absl/glog lines of severity
  W, E or F), in the order first seen: ``{message, count}``, the message without the
  line's prefix, cut to 300 characters; the first ``limit`` of them. XLA and the CUDA
  libraries say there what slows a program without failing it (PTX left to the driver to
  compile, an algorithm that fell back), which the compile timers do not show."""
  counts: dict[str, int] = {}
  for line in stderr.splitlines():
    match = _LOG_LINE.match(line)
    if match and line[0] in "WEF":
      message = line[match.end():].strip()[:300]
      if message in counts or len(counts) < limit:
        counts[message] = counts.get(message, 0) + 1
  return [{"message": message, "count": count} for message, count in counts.items()]


def _log_fields(stderr: str) -> dict:
  """What a row keeps of its process's log: `LOG_FIELDS`, those it has."""
  fields = zip(LOG_FIELDS, (xla_compile_timers(stderr), log_warnings(stderr)))
  return {k: v for k, v in fields if v}


def _decoded(output: bytes | str | None) -> str:
  """What a child stopped at its limit had written: `subprocess.TimeoutExpired` holds it
  undecoded (bytes) even where the output was to be text, or None where there was none."""
  return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def _run(cmd: list[str], timeout: float,
         env: dict[str, str] | None = None) -> tuple[dict | None, str | None]:
  """The last JSON line a command prints, or why there is none (a failure: the last line
  of its error output that is not a log line). Where its log has XLA's compile timers
  (`XLA_TIMERS_ENV`), the result carries them as ``xla_compile``, and its log's warnings
  and errors as ``log_warnings`` (`log_warnings`). A command stopped at
  its time limit returns what it printed by then beside the error: its JSON lines merged
  (a row's progress, such as its first step's time), the timers of the programs that
  had compiled and the warnings so far, or None where it printed none of these."""
  try:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False,
                         env=env)
  except subprocess.TimeoutExpired as stopped:
    partial = {k: v for line in _json_lines(_decoded(stopped.stdout))
               for k, v in line.items()}
    partial = {**partial, **_log_fields(_decoded(stopped.stderr))}
    return partial or None, f"timed out after {timeout:.0f} s"
  if out.returncode:
    lines = [line for line in out.stderr.strip().splitlines()
             if line.strip() and not _LOG_LINE.match(line)]
    return None, (lines or ["failed"])[-1][:300]
  try:
    result = _last_json(out.stdout)
  except ValueError as error:
    return None, str(error)
  return {**result, **_log_fields(out.stderr)}, None


def ours_fields(algorithm: str, order: str, neighbors: int, size: dict, dtype: str,
                depthwise_impl: str, inner_impl: str, gpu_autotune: bool = False) -> dict:
  """What names one of our rows."""
  return {"impl": "nanas_jax", "algorithm": algorithm, "order": order, **size,
          "neighbors": neighbors, "dtype": dtype, "depthwise_impl": depthwise_impl,
          "inner_impl": inner_impl, "gpu_autotune": gpu_autotune}


def reference_fields(order: str, size: dict) -> dict:
  """What names one of the reference's rows."""
  return {"impl": "pytorch_reference", "algorithm": "darts",
          "order": "first" if order == "first" else "second_fd", "neighbors": 1, **size,
          "dtype": "float32"}


def ours(algorithm: str, order: str, neighbors: int, size: dict, steps: int,
         timeout: float, dtype: str = "float32", depthwise_impl: str = "auto",
         inner_impl: str = "auto", gpu_autotune: bool = False,
         profile: str | None = None) -> dict:
  cmd = [sys.executable, os.path.join(HERE, "search_step.py"), "--child",
         f"--algorithm={algorithm}", f"--order={order}", f"--neighbors={neighbors}",
         f"--batch={size['batch']}", f"--channels={size['channels']}",
         f"--layers={size['layers']}", f"--size={size['size']}", "--in_channels=3",
         f"--steps={steps}", f"--dtype={dtype}", f"--depthwise_impl={depthwise_impl}",
         f"--inner_impl={inner_impl}"] + (["--gpu_autotune"] if gpu_autotune else [])
  if profile:
    until = time.time() + max(timeout - PROFILE_MARGIN_S, timeout / 2)
    cmd += [f"--profile={os.path.join(profile, f'{algorithm}_{order}')}",
            f"--profile_until={until:.1f}"]
  # Started as `nanas_jax.cli`'s programs start (with huge pages where they help), XLA's
  # compile timers logged.
  env = cli.huge_pages_environ(os.environ) or dict(os.environ)
  result, error = _run(cmd, timeout, {**env, **XLA_TIMERS_ENV})
  row = ours_fields(algorithm, order, neighbors, size, dtype, depthwise_impl, inner_impl,
                    gpu_autotune)
  if error:
    # A row stopped at its limit keeps how far it got: its first step, where that had
    # finished, its step time, where it was tracing one step more, and the compile timers
    # of its programs that had compiled.
    return {**row, **{k: v for k, v in (result or {}).items()
                      if k in ("first_step_s", "step_s") + LOG_FIELDS + PROFILE_FIELDS},
            "error": error}
  events = {k: result[k] for k in PROFILE_FIELDS if k in result}
  return {**row, "first_step_s": result["first_step_s"], "step_s": result["step_s"],
          "peak_gb": result["peak_device_gb"] or result["peak_rss_gb"],
          "neighbor_chunk": result["neighbor_chunk"], "device": result["device"],
          **{k: result.get(k, []) for k in LOG_FIELDS}, **events}


def first_run_probe(size: dict, timeout: float) -> dict:
  """`conv_first_run.py` at ``size``'s batch and image size, on 8 edges of its channels:
  its result (each case's compile time among it), with its log's warnings, or
  ``error``."""
  cmd = [sys.executable, os.path.join(HERE, "conv_first_run.py"), f"--batch={size['batch']}",
         f"--size={size['size']}", f"--channels={8 * size['channels']}"]
  result, error = _run(cmd, timeout)
  return {**(result or {}), "error": error} if error else result


def reference(path: str, order: str, size: dict, steps: int, timeout: float) -> dict:
  cmd = [sys.executable, os.path.join(HERE, "reference_step.py"), f"--reference={path}",
         f"--order={order}", f"--batch={size['batch']}", f"--channels={size['channels']}",
         f"--layers={size['layers']}", f"--size={size['size']}", f"--steps={steps}"]
  result, error = _run(cmd, timeout)
  if error:
    return {**reference_fields(order, size), "error": error}
  return {k: result[k] for k in FIELDS} | {"torch": result["torch"]}


# The installed distributions a report lists: the ones its programs run on.
_PACKAGES = re.compile(r"jax.*|nvidia-.*|flax|optax|torch|numpy")


def packages() -> dict[str, str]:
  """The versions of the installed distributions the rows ran on (JAX and its CUDA
  plugin, NVIDIA's libraries: cuDNN, cuBLAS, the CUDA runtime, ...; flax, optax, torch,
  numpy), by name."""
  found = {}
  for dist in importlib.metadata.distributions():
    name = (dist.metadata["Name"] or "").lower().replace("_", "-")
    if _PACKAGES.fullmatch(name):
      found[name] = dist.version
  return dict(sorted(found.items()))


def goals(rows: list[dict]) -> list[dict]:
  """The search step's accelerator goals, read from the rows: each ``{goal, value,
  at_most | at_least, met}``, ``value`` and ``met`` None where a row it needs failed. The
  projection of a whole search counts its steps at the measured NA-DARTS step, not its
  compile, evaluation or checkpoints."""

  def row(impl, algorithm, order):
    found = [r for r in rows if (r["impl"], r["algorithm"], r["order"]) == (
        impl, algorithm, order) and "error" not in r]
    return found[0] if found else None

  def ratio(a, b, key):
    return a[key] / b[key] if a and b and a.get(key) and b.get(key) else None

  darts = row("nanas_jax", "darts", "first")
  na_darts = row("nanas_jax", "na_darts", "first")
  reference_first = row("pytorch_reference", "darts", "first")
  ours = [r for r in rows if r["impl"] == "nanas_jax"]
  first_steps = ([r["first_step_s"] for r in ours] if all("error" not in r for r in ours)
                 else [])
  table = [
      ("DARTS first-order step (s)", darts and darts["step_s"], "at_most", 0.08),
      ("PyTorch reference's first-order step / ours", ratio(reference_first, darts,
                                                            "step_s"), "at_least", 3.0),
      ("NA-DARTS K=4 step / DARTS's", ratio(na_darts, darts, "step_s"), "at_most", 2.0),
      ("NA-DARTS K=4 peak memory / DARTS's", ratio(na_darts, darts, "peak_gb"),
       "at_most", 2.0),
      ("slowest first step (compile) of ours (s)", max(first_steps, default=None),
       "at_most", 60.0),
      (f"50-epoch NA-DARTS CIFAR-10 search, {SEARCH_STEPS:,} steps (hours)",
       na_darts and SEARCH_STEPS * na_darts["step_s"] / 3600, "at_most", 1.0),
  ]
  return [{"goal": goal, "value": None if value is None else round(value, 4), bound: limit,
           "met": None if value is None else (value <= limit if bound == "at_most"
                                              else value >= limit)}
          for goal, value, bound, limit in table]


def main(argv=None):
  # pylint: disable=g-import-not-at-top
  from nanas_jax.nn.functional import DEPTHWISE_IMPLS
  from nanas_jax.nn.supernet import INNER_IMPLS
  from nanas_jax.search.bilevel import COMPUTE_DTYPES
  # pylint: enable=g-import-not-at-top

  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--reference", required=True, help="quark0/darts's cnn/ directory")
  parser.add_argument("--preset", choices=sorted(PRESETS), default="reference")
  parser.add_argument("--steps", type=int, default=5, help="timed steps after the first")
  parser.add_argument("--timeout", type=float, default=300.0, help="seconds per row")
  parser.add_argument("--budget", type=float, default=480.0,
                      help="seconds for the whole run (rows not started once it is spent)")
  parser.add_argument("--dtype", default="float32", choices=COMPUTE_DTYPES,
                      help="our rows' compute dtype (the reference's is float32)")
  parser.add_argument("--depthwise_impl", default="auto", choices=DEPTHWISE_IMPLS,
                      help="our depthwise convolutions (config.model.depthwise_impl; "
                      "'auto' is cuDNN's grouped convolutions on a GPU, 'taps_fused' "
                      "sums of taps that XLA fuses)")
  parser.add_argument("--inner_impl", default="auto", choices=INNER_IMPLS,
                      help="our cells' inner nodes in a loop or unrolled "
                      "(config.model.inner_impl)")
  parser.add_argument("--gpu_autotune", action="store_true", help="let XLA time "
                      "candidate kernels on the GPU as it compiles our steps "
                      "(config.search.gpu_autotune; by default cuDNN's and cuBLAS's "
                      "heuristics choose)")
  parser.add_argument("--profile", help="trace each of our rows' first step and one "
                      "step after the timed ones with jax.profiler into a folder of this "
                      "directory, and report their longest events (first_step_events, "
                      "step_events, step_kinds)")
  parser.add_argument("--rows", default=",".join((PROBE,) + ROW_NAMES),
                      help="the rows to run, comma-separated, of " + ", ".join(ROW_NAMES)
                      + " (the others are reported as not run), and " + PROBE + " (the "
                      "first-run probe)")
  parser.add_argument("--output_dir", default=os.path.join(HERE, "results"))
  parser.add_argument("--name", help="the report's file, <device>-NAME.json (by default "
                      "named by the run's settings: dtype, depthwise_impl, inner_impl, "
                      "gpu_autotune, XLA_FLAGS)")
  args = parser.parse_args(argv)
  if args.name is not None and not re.fullmatch(r"[A-Za-z0-9._-]+", args.name):
    parser.error(f"--name={args.name!r} cannot name the report's file: use letters, "
                 "digits, '.', '_' and '-'")
  selected = set(args.rows.split(","))
  if not selected <= {PROBE, *ROW_NAMES}:
    parser.error(f"--rows={args.rows}: no row is named "
                 f"{', '.join(sorted(selected - {PROBE, *ROW_NAMES}))}; choose among "
                 f"{', '.join((PROBE,) + ROW_NAMES)}")
  try:
    args.reference = reference_step.check_reference(args.reference)
  except ValueError as error:
    parser.error(str(error))
  if args.budget < MIN_ROW_S:
    parser.error(f"--budget={args.budget:g} leaves no row time to run: give at least "
                 f"{MIN_ROW_S:g} seconds (the default, 480, is the GPU run's 8 minutes)")
  size = PRESETS[args.preset]
  # Each row: what names it, and how to run it within a time limit.
  jobs = [(ours_fields(algorithm, order, k, size, args.dtype, args.depthwise_impl,
                       args.inner_impl, args.gpu_autotune),
           functools.partial(ours, algorithm, order, k, size, args.steps,
                             dtype=args.dtype, depthwise_impl=args.depthwise_impl,
                             inner_impl=args.inner_impl, gpu_autotune=args.gpu_autotune,
                             profile=args.profile))
          for algorithm, order, k in OURS]
  jobs += [(reference_fields(order, size),
            functools.partial(reference, args.reference, order, size, args.steps))
           for order in REFERENCE]
  deadline = time.monotonic() + args.budget
  probe = {"error": "not run: not among --rows"}
  if PROBE in selected:
    probe = first_run_probe(size, timeout=min(PROBE_TIMEOUT_S, args.budget / 4))
  print(json.dumps({PROBE: probe}), flush=True)
  rows = [None] * len(jobs)
  for index in RUN_ORDER:
    fields, run_row = jobs[index]
    left = deadline - time.monotonic()
    if ROW_NAMES[index] not in selected:
      rows[index] = {**fields, "error": "not run: not among --rows"}
    elif left < MIN_ROW_S:
      rows[index] = {**fields, "error": f"not run: the {args.budget:g} s budget was spent"}
    else:
      rows[index] = run_row(timeout=min(args.timeout, left))
    print(json.dumps(rows[index]), flush=True)
  import jax  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0].device_kind
  torch_version = next((r["torch"] for r in rows if "torch" in r), None)
  xla_flags = os.environ.get("XLA_FLAGS", "")
  report = {"device": device, "jax": jax.__version__, "torch": torch_version,
            "date": datetime.date.today().isoformat(), "preset": args.preset,
            "xla_flags": xla_flags,
            # The machine: JAX's account of it (nvidia-smi's on a GPU: driver, CUDA).
            "environment": jax.print_environment_info(return_string=True).splitlines(),
            "packages": packages(), PROBE: probe,
            "rows": [{k: r[k] for k in FIELDS + ("neighbor_chunk", "depthwise_impl",
                                                  "inner_impl", "gpu_autotune") + LOG_FIELDS
                      + PROFILE_FIELDS + ("error",) if k in r} for r in rows]}
  report["goals"] = goals(report["rows"])
  for goal in report["goals"]:
    print(json.dumps(goal), flush=True)
  os.makedirs(args.output_dir, exist_ok=True)
  name = re.sub(r"[^A-Za-z0-9._-]+", "_", device).strip("_") or "device"
  suffix = f"-{args.name}" if args.name else "".join(f"-{value}" for value, default in (
      (args.dtype, "float32"), (args.depthwise_impl, "auto"), (args.inner_impl, "auto"),
      ("gpu_autotune" if args.gpu_autotune else "", ""),
      ("xla_flags" if xla_flags else "", "")) if value != default)
  path = os.path.join(args.output_dir, f"{name}{suffix}.json")
  with open(path, "w") as f:
    f.write(json.dumps(report, indent=2) + "\n")
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
