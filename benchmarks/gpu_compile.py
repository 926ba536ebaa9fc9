"""The search step compiled by XLA's GPU compiler, or with ``--tpu`` its TPU compiler, on a
machine without either (a benchmark, not a test): does XLA accept it, how long does it
compile, how much device memory does XLA's buffer assignment give each program.

  python benchmarks/gpu_compile.py --install   # XLA's CUDA and TPU compilers, .gpu-aot/ .tpu-aot/
  python benchmarks/gpu_compile.py --preset=reference --algorithm=na_darts --chunk=0
  python benchmarks/gpu_compile.py --tpu=v5e:2x2 --preset=reference --algorithm=darts

JAX compiles ahead of time for a GPU that is described, not attached
(`jax.experimental.topologies.get_topology_desc` with an XLA ``GpuTargetConfigProto``;
``--target``, by default `benchmarks/gpu_targets/h200.txtpb`). The compiler is the CUDA
PJRT plugin of the installed jaxlib's version (``jax-cuda12-plugin``, about 180 MB),
installed by ``--install`` into its own folder (``--plugin_dir``, default ``.gpu-aot/``)
rather than the environment: installed there, every JAX program of the environment would
try to start CUDA. Nothing runs on a GPU: no autotuning, and no step times. ``--output``
appends each row as a JSON line (`benchmarks/results/h200_compile.jsonl`); a row compiled
under ``XLA_FLAGS`` carries them (``xla_flags``).

With ``--tpu=TOPOLOGY`` (a TPU topology's name, ``v5e:2x2``: the chips of one host) the
step is compiled for one chip of that TPU, as each data-parallel replica runs it, by
libtpu, at the version the installed jax asks for as ``jax[tpu]`` (about 140 MB to
download, 700 MB installed), which ``--install`` puts into ``--tpu_dir`` (default
``.tpu-aot/``). XLA's TPU compiler estimates the cycles of each instruction it
schedules; a TPU row adds their sum over one step (``estimated_cycles``, each program's
too) and, for a chip whose clock `CLOCK_GHZ` knows, the time that is at that clock
(``estimated_ms``): XLA's cost model, not a measurement. The instructions it gave no
estimate, which the sum leaves out, are counted by opcode (``unestimated``). Its
``launches``, ``kernels`` and bytes are counted as for a GPU (a TPU runs the program's
instructions one after the other, without launches); ``traffic_ms`` and the library calls
are a GPU's and are left out.

Each configuration is compiled in its own subprocess, since XLA aborts the process on an
internal check failure; a row that failed carries ``error`` (the check's message).
Reported per configuration: ``compile_s`` (on this machine's CPU, summed over the step's
programs), ``side_by_side_s`` (with ``compile='shared'``, unless ``--no-side_by_side``:
the same programs compiled again from nothing, as the step's first call compiles them,
those that `BilevelSearch.programs_compiled_ahead` lists on side threads), ``programs``
(with ``compile='shared'``, every distinct jitted program of one step: ``name``,
``calls`` a step, ``compile_s``, ``gb``, its argument, output and temporary buffers less
those aliased, and its `program_counts`), ``largest_program_gb``
(the step's largest program: a lower bound of its peak GPU memory, which adds what the
host keeps alive between programs, a few MB), ``launches`` (the kernels and library calls
one step launches), ``kernels`` and ``library_calls`` (summed over the programs: what XLA
compiles, and what it autotunes on a GPU where the programs compile side by side),
``distinct_library_calls`` (the step's distinct library calls, `distinct_calls`: what it
autotunes where they compile one after the other), ``gb_moved`` (the GiB one step's
launches read and write, `program_counts`) and ``traffic_ms`` (the time to move them at
the target's memory bandwidth: what the step would take if every kernel ran at that
bandwidth from device memory and launched at no cost; the cache and the arithmetic can
make a kernel faster or slower than that). ``--profile=DIR`` traces the first compile of
every program with `jax.profiler` and reports ``compile_events``, its events that took the
most time of their own (`search_step.profile_events`: XLA's passes, its code generation,
``ptxas``), or ``profile_error``.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import datetime
import functools
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
# pylint: disable=g-import-not-at-top,wrong-import-position
import search_step
# pylint: enable=g-import-not-at-top,wrong-import-position
DEFAULT_PLUGIN_DIR = os.path.join(ROOT, ".gpu-aot")
DEFAULT_TPU_DIR = os.path.join(ROOT, ".tpu-aot")
# The TensorCore clock of a TPU chip (its ``device_kind``), in GHz: its published peak
# bfloat16 rate over its MXUs' (128 x 128 multiply-adds of 2 flops a cycle each). v5e:
# 197 TFLOP/s over 4 MXUs, 1.50 GHz.
CLOCK_GHZ = {"TPU v5 lite": 197e12 / (4 * 128 * 128 * 2) / 1e9}
DEFAULT_TARGET = os.path.join(HERE, "gpu_targets", "h200.txtpb")
PRESETS = {
    "reference": dict(channels=16, layers=8, size=32, batch=64),
    "tiny": dict(channels=4, layers=3, size=8, batch=16),
}


def plugin_requirements(jaxlib_version: str) -> list[str]:
  """The CUDA compiler's packages for ``jaxlib_version`` (they must match jaxlib exactly,
  whatever the version of jax itself)."""
  return [f"jax-cuda12-plugin=={jaxlib_version}", f"jax-cuda12-pjrt=={jaxlib_version}"]


def install(plugin_dir: str) -> None:
  """Installs the CUDA PJRT plugin of the installed jaxlib's version into ``plugin_dir``."""
  import jaxlib
  subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                  "--upgrade", "--target", plugin_dir, *plugin_requirements(jaxlib.__version__)],
                 check=True)


def libtpu_requirement() -> str:
  """The libtpu that the installed jax asks for as ``jax[tpu]`` (``libtpu==X``)."""
  from importlib import metadata
  for requirement in metadata.requires("jax") or []:
    name, _, marker = requirement.partition(";")
    if name.strip().startswith("libtpu") and "tpu" in marker:
      return name.strip().replace(" ", "")
  raise RuntimeError("the installed jax names no libtpu for jax[tpu]")


def install_tpu(tpu_dir: str) -> None:
  """Installs XLA's TPU compiler (libtpu) for the installed jax into ``tpu_dir``."""
  subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                  "--upgrade", "--target", tpu_dir, libtpu_requirement()], check=True)


def tpu_chip(topology: str):
  """A compile-only device: one chip of the TPU topology named ``topology``."""
  from jax.experimental import topologies
  return topologies.get_topology_desc(platform="tpu", topology_name=topology).devices[0]


def gpu_device(target: str):
  """A compile-only device of the GPU that ``target`` (a GpuTargetConfigProto text file)
  describes."""
  from jax.experimental import topologies
  with open(target) as f:
    config = f.read()
  return topologies.get_topology_desc("aot", "cuda", target_config=config,
                                      topology="1x1x1").devices[0]


def memory_bandwidth(target: str) -> float:
  """The device memory bandwidth, in bytes a second, that ``target`` (a
  GpuTargetConfigProto text file) gives."""
  with open(target) as f:
    found = re.search(r"^\s*memory_bandwidth:\s*(\d+)", f.read(), re.MULTILINE)
  if found is None:
    raise ValueError(f"{target} gives no gpu_device_info.memory_bandwidth")
  return float(found.group(1))


def abstract_on(sharding, tree):
  """``tree``'s arrays as shapes and dtypes placed by ``sharding`` (what ``lower`` takes
  for a device that is not here)."""
  import jax
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                      tree)


def placer(target: str):
  """``tree -> tree`` of shapes and dtypes on the GPU that ``target`` describes (`gpu_device`,
  `abstract_on`)."""
  from jax.sharding import SingleDeviceSharding
  return functools.partial(abstract_on, SingleDeviceSharding(gpu_device(target)))


def compiler_environ(plugin_dir: str) -> dict[str, str]:
  """This process's environment for a child that compiles for a GPU or a TPU: JAX on the
  CPU, the compiler in ``plugin_dir`` and this repository importable. libtpu takes a
  lock that keeps a second process from loading it, unless told otherwise: children of
  two benchmarks (or two tests) at once each load it."""
  path = [plugin_dir, ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(path),
              ALLOW_MULTIPLE_LIBTPU_LOAD="1")


def _program_gb(compiled) -> float:
  m = compiled.memory_analysis()
  total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
           - m.alias_size_in_bytes)
  return round(total / 2**30, 3)


# Opcodes of a GPU program's control computations (its entry, loop bodies and conditions)
# that launch nothing: buffer plumbing and control flow, whose bodies are walked instead.
_NO_LAUNCH = frozenset({"parameter", "get-tuple-element", "tuple", "bitcast", "constant",
                        "while", "call", "conditional", "after-all", "opt-barrier",
                        "add-dependency"})
# ``%name = SHAPE opcode(operands), attributes``: one instruction of HLO text.
_INSTRUCTION = re.compile(r"\s*(?:ROOT )?(%[\w.\-]+) = (.+?) ([a-z][a-z0-9\-]*)\((.*)$")
_COMPUTATION = re.compile(r"(ENTRY )?%([\w.\-]+) .*\{$")
# An array in an HLO shape, ``f32[64,32]{1,0}``: its element type and dimensions.
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16)\[([\d,]*)\]")


def _without_names(text: str) -> str:
  """An HLO text with its names and metadata left out: what two equal kernels share."""
  text = re.sub(r", metadata=\{[^}]*\}", "", text)
  return re.sub(r"%[\w.\-]+", "%", text)


def _bytes(shape: str, scratch: bool = True, elements: bool = False) -> int:
  """Bytes of the arrays in an HLO ``shape`` (a tuple's elements summed); without a library
  call's ``scratch`` if False (its workspace: u8 for cuDNN, s8 for cuBLASLt, 32 MiB a
  GEMM); their elements if ``elements``."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    if dtype in ("u8", "s8") and not scratch:
      continue
    bits = 8 if dtype == "pred" or elements else int(dtype.lstrip("bfsu"))
    total += math.prod(int(d) for d in dims.split(",") if d) * bits // 8
  return total


def _split_operands(rest: str) -> tuple[str, str]:
  """An instruction's text after ``opcode(``: its operands, and its attributes."""
  depth = 0
  for i, char in enumerate(rest):
    if char in "({":
      depth += 1
    elif char in ")}":
      if not depth:
        return rest[:i], rest[i + 1:]
      depth -= 1
  return rest, ""


# Opcodes through which a fused computation's slice reads as small a part of an operand:
# each output element reads the element(s) of its operands at one index.
_ELEMENTWISE = frozenset({
    "abs", "add", "and", "bitcast", "clamp", "compare", "convert", "copy", "cosine",
    "divide", "exponential", "log", "logistic", "maximum", "minimum", "multiply", "negate",
    "not", "or", "power", "reshape", "rsqrt", "select", "sign", "sine", "sqrt", "subtract",
    "tanh", "transpose"})


def _fusion_reads(instructions) -> int:
  """Bytes a fused computation reads: each parameter whole, or, where the fusion reads it
  only through slices (after element-wise operations, transposes or bitcasts too), the
  part of it those slices take, at most the whole."""
  users, shapes = {}, {}
  for ins in instructions:
    shapes[ins["name"]] = ins["shape"]
    for operand in ins["operands"]:
      users.setdefault(operand, []).append(ins)

  @functools.cache
  def part(name: str) -> float:
    """The fraction of ``name``'s elements the fusion reads."""
    size = _bytes(shapes[name], elements=True) or 1
    read = 0.0
    for user in users.get(name, []):
      if user["opcode"] in ("slice", "dynamic-slice") and user["operands"][0] == name:
        read += _bytes(user["shape"], elements=True) / size
      elif user["opcode"] in _ELEMENTWISE and _bytes(user["shape"], elements=True) == size:
        read += part(user["name"])
      else:
        return 1.0
    return min(read, 1.0) if name in users else 1.0

  return round(sum(_bytes(ins["shape"]) * part(ins["name"]) for ins in instructions
                   if ins["opcode"] == "parameter"))


def _count_up_bound(condition: list[dict]) -> int | None:
  """``N`` for a loop condition ``i < N`` (its root a less-than compare of a tuple element
  with a constant), or None: the trip count of a loop that counts ``i`` up from 0 by 1, as
  JAX lowers its scans and fori_loops. XLA's GPU compiler writes a loop's trip count on
  it (``known_trip_count``); its TPU compiler leaves it to be read from the condition."""
  named = {ins["name"]: ins for ins in condition}
  root = next((ins for ins in condition if ins["line"].lstrip().startswith("ROOT ")), None)
  if (root is None or root["opcode"] != "compare" or "direction=LT" not in root["attributes"]
      or len(root["operands"]) != 2):
    return None
  index, bound = (named.get(name) for name in root["operands"])
  if index is None or bound is None or index["opcode"] != "get-tuple-element":
    return None
  value = re.match(r"(\d+)\)", bound["rest"]) if bound["opcode"] == "constant" else None
  return int(value.group(1)) if value else None


def program_counts(hlo: str) -> tuple[dict[str, int | float], frozenset[str]]:
  """``(counts, library calls)``: what one run of an optimised GPU program
  (``compiled.as_text()``) launches, and what XLA compiles for it. ``launches``: kernels
  and library calls, each loop body counted its known trip count times (and a
  conditional's largest branch); ``kernels``: the distinct kernels XLA emits (fusions,
  copies: XLA compiles equal bodies on equal shapes once); ``library_calls``: the
  distinct cuDNN and cuBLAS calls, each autotuned on a GPU; ``gb_moved``: the GiB that
  the launches read and write in device memory, counted as XLA's shapes say (a fusion
  reads each of its inputs once, or the part its slices take of one, `_fusion_reads`,
  and writes its outputs; a library call reads its operands and writes its results, less
  its scratch), as if no kernel found its input in the cache; ``conditionals``: the
  conditionals it runs, counted as the launches are (XLA's GPU runtime copies each one's
  predicate to the host and waits for the stream there before it launches a branch:
  `ConditionalThunk`; a step compiled as a loop gates every convolution's kernel
  gradient with one); where there are any, ``smallest_branches``: the launches, bytes
  and estimated cycles again with each conditional's smallest branch (the counts above
  take its largest: the branch a run takes is known at run time only). A loop whose trip
  count neither XLA nor `_count_up_bound` knows is an error: its launches cannot be
  counted.
  The library calls come back too, each as its instruction's text without names and
  with its operands' shapes, so that those of several programs can be told apart
  (`distinct_calls`). A program compiled for a TPU adds ``estimated_cycles``: the sum of
  XLA's estimates of its instructions' cycles, counted as the launches are; and
  ``unestimated``: how many of its instructions XLA gave no estimate, by opcode, counted
  the same way (their cycles are not in the sum: some carry no work, such as a
  reshape that only renames, or the halves of an asynchronous copy that the compiler
  overlaps with others; some do, such as a ``reduce-window``)."""
  computations, entry, body = {}, None, None
  for line in hlo.splitlines():
    head = _COMPUTATION.match(line)
    if head:
      body = computations[head.group(2)] = []
      entry = head.group(2) if head.group(1) else entry
    elif line == "}":
      body = None
    elif body is not None:
      match = _INSTRUCTION.match(line)
      if match:
        name, shape, opcode, rest = match.groups()
        operands, attributes = _split_operands(rest)
        body.append({"name": name, "shape": shape, "opcode": opcode, "line": line,
                     "operands": re.findall(r"%[\w.\-]+", operands), "rest": rest,
                     "attributes": attributes})
  if entry is None:
    raise ValueError("no ENTRY computation: not the text of an HLO module")
  shapes = {ins["name"]: ins["shape"] for body in computations.values() for ins in body}
  kernels, library_calls = set(), set()

  def plus(sums, more, times=1):
    """``sums`` and ``times`` x ``more``: the counts, and the instructions without an
    estimate by opcode."""
    *numbers, unestimated = sums
    *more_numbers, more_unestimated = more
    unestimated = collections.Counter(unestimated)
    for opcode, count in more_unestimated.items():
      unestimated[opcode] += times * count
    return (*(s + times * m for s, m in zip(numbers, more_numbers)), unestimated)

  def launches(name: str, pick=max) -> tuple[int, int, int, int, collections.Counter]:
    """Launches, bytes moved, XLA's estimated cycles, conditionals run and the
    instructions without an estimate (by opcode) of one run of computation ``name``,
    each conditional's branch the one ``pick`` (max or min) takes of their counts."""
    total = (0, 0, 0, 0, collections.Counter())
    for ins in computations[name]:
      opcode, attributes = ins["opcode"], ins["attributes"]
      callee = lambda key: re.search(key + r"=%([\w.\-]+)", attributes).group(1)
      if opcode == "while":
        known = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', attributes)
        trips = int(known.group(1)) if known else _count_up_bound(
            computations[callee("condition")])
        if trips is None:
          raise ValueError(f"a loop without a known trip count: {ins['line'].strip()[:200]}")
        for part in ("body", "condition"):
          total = plus(total, launches(callee(part), pick), trips)
      elif opcode == "call":
        total = plus(total, launches(callee("to_apply"), pick))
      elif opcode == "conditional":
        branches = re.search(r"branch_computations=\{([^}]*)\}", attributes)
        names = (re.findall(r"%([\w.\-]+)", branches.group(1)) if branches else
                 [callee("true_computation"), callee("false_computation")])
        total = plus(total, (0, 0, 0, 1, collections.Counter()))
        total = plus(total, pick(launches(branch, pick) for branch in names))
      elif opcode not in _NO_LAUNCH:
        fused = re.search(r"calls=%([\w.\-]+)", attributes)
        if opcode == "custom-call":
          # What XLA autotunes a call for: its operands' shapes too (a GEMM's output
          # does not say how long a dimension it contracts).
          library_calls.add(_without_names(" ".join(
              [ins["shape"], *(shapes[o] for o in ins["operands"]), ins["rest"]])))
          moved = _bytes(ins["shape"], scratch=False)
        else:
          kernels.add(_without_names("\n".join(
              [ins["shape"], opcode] + ([i["line"] for i in computations[fused.group(1)]]
                                        if fused else [ins["rest"]]))))
          moved = _bytes(ins["shape"])
        moved += (_fusion_reads(computations[fused.group(1)]) if fused and opcode == "fusion"
                  else sum(_bytes(shapes[o]) for o in ins["operands"]))
        cycles = re.search(r'"estimated_cycles":"(\d+)"', attributes)
        total = plus(total, (1, moved, int(cycles.group(1)) if cycles else 0, 0,
                             collections.Counter() if cycles else {opcode: 1}))
    return total

  total, moved, cycles, conditionals, unestimated = launches(entry)
  # XLA's TPU compiler estimates most instructions' cycles; its GPU compiler none.
  estimated = ({"estimated_cycles": cycles, "unestimated": dict(sorted(unestimated.items()))}
               if cycles else {})
  counts = {"launches": total, "kernels": len(kernels), "library_calls": len(library_calls),
            "gb_moved": round(moved / 2**30, 3), "conditionals": conditionals, **estimated}
  if conditionals:
    # Which branch a run takes is known at run time only: the counts above take each
    # conditional's largest branch, these its smallest (the bounds of a run's counts).
    low, low_moved, low_cycles, _, _ = launches(entry, min)
    counts["smallest_branches"] = {"launches": low, "gb_moved": round(low_moved / 2**30, 3),
                                   **({"estimated_cycles": low_cycles} if cycles else {})}
  return counts, frozenset(library_calls)


def distinct_calls(programs_calls) -> int:
  """The distinct library calls of several programs (`program_counts`' second value of
  each). XLA keeps its autotuning results for the rest of the process, so programs
  compiled one after the other autotune a call they share once; compiled side by side,
  each may autotune it."""
  return len(frozenset().union(*programs_calls))


def step_programs(step, args) -> list[tuple[str, object, int]]:
  """The distinct jitted programs one call of the unjitted ``step(*args)`` runs, as
  ``(name, closed jaxpr, calls)``: the top-level jit calls of its trace (the eager glue
  between them, a scalar add or two, is left out), each listed once, with how often the
  step calls it."""
  import jax
  closed = jax.make_jaxpr(step)(*args)
  programs = {}
  for eqn in closed.jaxpr.eqns:
    if eqn.primitive.name not in ("jit", "pjit"):
      continue
    key = (eqn.params["name"], tuple(str(v.aval) for v in eqn.invars),
           tuple(str(v.aval) for v in eqn.outvars))
    name, jaxpr, calls = programs.get(key, (eqn.params["name"], eqn.params["jaxpr"], 0))
    programs[key] = (name, jaxpr, calls + 1)
  return list(programs.values())


def side_by_side_s(lowerings: list[Callable], ahead: list[int]) -> float:
  """Seconds to lower and compile a step's programs (``lowerings``: a function that lowers
  each) as the step's first call does (`BilevelSearch._compile_ahead`): programs ``ahead``
  (indices) each on a side thread, started first, the others one after the other on this
  thread."""
  start = time.perf_counter()
  side = concurrent.futures.ThreadPoolExecutor(len(ahead))
  compiling = [side.submit(lowerings[i]().compile) for i in ahead]
  for i, lower in enumerate(lowerings):
    if i not in ahead:
      lower().compile()
  for future in compiling:
    future.result()
  side.shutdown()
  return round(time.perf_counter() - start, 1)


def measure(args) -> dict:
  """Compiles one configuration's step for the target GPU (or ``args.tpu``'s chip) in this
  process."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.extend.core import jaxpr_as_fun

  from nanas_jax.search.bilevel import neighbors_per_step

  if args.tpu:
    from jax.sharding import SingleDeviceSharding
    chip = tpu_chip(args.tpu)
    on_device = functools.partial(abstract_on, SingleDeviceSharding(chip))
  else:
    on_device = placer(args.target)
  # Neighbors vmapped, and XLA's options, as on the accelerator (this process's default
  # backend is the CPU).
  config, search = search_step.build_search(args, "vmap", platform="tpu" if args.tpu else "gpu")
  options = dict(search.compiler_options) or None
  state = search.init(jax.random.key(0), np.zeros((1, args.size, args.size, 3), np.float32))
  state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
  batch = (jax.ShapeDtypeStruct((args.batch, args.size, args.size, 3), jnp.float32),
           jax.ShapeDtypeStruct((args.batch,), jnp.int32))
  k = neighbors_per_step(config)
  row = {"jax": jax.__version__, "space": args.space, "algorithm": args.algorithm,
         "order": args.order, "neighbors": k,
         "neighbor_chunk": search.neighbor_chunk if k > 1 else None,
         "channels": args.channels, "layers": args.layers, "size": args.size,
         "batch": args.batch, "dtype": args.dtype, "compile": args.compile,
         "depthwise_impl": args.depthwise_impl, "inner_impl": args.inner_impl,
         **({"chip": chip.device_kind} if args.tpu else {"gpu_autotune": args.gpu_autotune})}
  programs, calls_of = [], []

  def add(name, compile_program, calls=1):
    t = time.perf_counter()
    compiled = compile_program()
    counts, library_calls = program_counts(compiled.as_text())
    if args.tpu:  # A TPU program's custom calls are not cuDNN's or cuBLAS's to autotune.
      del counts["library_calls"]
    programs.append({"name": name, "compile_s": round(time.perf_counter() - t, 1),
                     "gb": _program_gb(compiled), "calls": calls, **counts})
    calls_of.append(library_calls)

  if args.profile:
    row.update(search_step.start_profile(args.profile))

  if search.fused:
    add("step", lambda: jax.jit(search.step, donate_argnums=0, compiler_options=options).lower(
        on_device(state), on_device(batch), on_device(batch)).compile())
  else:
    listed = step_programs(search.step, (state, batch, batch))
    lowerings = [lambda c=closed: jax.jit(jaxpr_as_fun(c), compiler_options=options).lower(
        *on_device(c.in_avals)) for _, closed, _ in listed]
    for (name, _, calls), lower in zip(listed, lowerings):
      add(name, lambda lower=lower: lower().compile(), calls)
  if args.profile and "profile_error" not in row:
    row.update(search_step.finish_profile(args.profile, "compile_events"))
  if not search.fused and args.side_by_side:
    # The step needs the programs it compiles ahead last: the last listed of each name.
    names = [name for name, _, _ in listed][::-1]
    ahead = [len(names) - 1 - names.index(program.__name__)
             for program in search.programs_compiled_ahead()]
    jax.clear_caches()  # Compiled again, from nothing.
    row["side_by_side_s"] = side_by_side_s(lowerings, ahead)

  def total(key, counts=lambda p: p):
    """``key`` summed over one step's runs of the programs, from each one's ``counts``."""
    return sum(p["calls"] * counts(p).get(key, 0) for p in programs)

  traffic_ms = lambda gib: round(gib * 2**30 / memory_bandwidth(args.target) * 1e3, 2)
  clock_ms = lambda cycles: round(cycles / CLOCK_GHZ[chip.device_kind] / 1e6, 2)
  moved = total("gb_moved")
  row.update({"compile_s": round(sum(p["compile_s"] for p in programs), 1),
              "largest_program_gb": max(p["gb"] for p in programs),
              "launches": total("launches"), "conditionals": total("conditionals"),
              "gb_moved": round(moved, 3)})
  if args.tpu:
    cycles = total("estimated_cycles")
    row["estimated_cycles"] = cycles
    unestimated = collections.Counter()
    for p in programs:
      for opcode, count in p.get("unestimated", {}).items():
        unestimated[opcode] += p["calls"] * count
    row["unestimated"] = dict(sorted(unestimated.items()))
    if chip.device_kind in CLOCK_GHZ:
      row["estimated_ms"] = clock_ms(cycles)
  else:
    row.update({"traffic_ms": traffic_ms(moved),
                "library_calls": total("library_calls"),
                "distinct_library_calls": distinct_calls(calls_of)})
  if any("smallest_branches" in p for p in programs):
    # The same sums with each conditional's smallest branch (`program_counts`).
    low = lambda key: total(key, lambda p: p.get("smallest_branches", p))
    bounds = {"launches": low("launches"), "gb_moved": round(low("gb_moved"), 3)}
    if not args.tpu:
      bounds["traffic_ms"] = traffic_ms(low("gb_moved"))
    elif chip.device_kind in CLOCK_GHZ:
      bounds["estimated_ms"] = clock_ms(low("estimated_cycles"))
    row["smallest_branches"] = bounds
  return {**row, "kernels": sum(p["kernels"] for p in programs), "programs": programs}


def failure(stderr: str) -> str:
  """What a child that died says of why: XLA's check failure where there is one."""
  lines = [line for line in stderr.splitlines() if line.strip()]
  checks = [line.split("] ", 1)[-1] for line in lines if "Check failed" in line]
  return (checks or lines or ["no output"])[-1][-500:]


def main(argv=None):
  from nanas_jax.nn.functional import ACCELERATOR_IMPLS, tpu_kernels
  from nanas_jax.nn.supernet import INNER_IMPLS

  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--install", action="store_true",
                      help="install XLA's CUDA compiler into --plugin_dir and its TPU "
                      "compiler into --tpu_dir, and stop")
  parser.add_argument("--plugin_dir", default=DEFAULT_PLUGIN_DIR)
  parser.add_argument("--target", default=DEFAULT_TARGET,
                      help="the GPU, as an XLA GpuTargetConfigProto text file")
  parser.add_argument("--tpu", help="compile for one chip of this TPU topology instead "
                      "(its name, as v5e:2x2) with XLA's TPU compiler, from --tpu_dir")
  parser.add_argument("--tpu_dir", default=DEFAULT_TPU_DIR)
  parser.add_argument("--preset", choices=sorted(PRESETS))
  parser.add_argument("--space", default="darts", choices=["darts", "nb201"],
                      help="the search space: DARTS's cells (--layers of them) or "
                      "NAS-Bench-201's (--layers a stage; --depthwise_impl does not apply)")
  parser.add_argument("--algorithm", choices=["darts", "na_darts", "both"], default="both")
  parser.add_argument("--order", default="first", choices=["first", "second_fd"])
  parser.add_argument("--neighbors", type=int, default=4)
  parser.add_argument("--chunk", type=int, help="neighbors per vmapped pass "
                      "(config.search.neighbors.chunk; 0: all at once); by default what "
                      "neighbors.evaluate='auto' takes on the target: one a pass with the "
                      "TPU's depthwise convolutions, all at once otherwise")
  parser.add_argument("--compile", default="shared", choices=["shared", "fused", "loop"])
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--depthwise_impl", choices=ACCELERATOR_IMPLS,
                      help="the depthwise convolutions (config.model.depthwise_impl): "
                      "grouped convolutions (by default what 'auto' picks on the target: "
                      "conv on a GPU, conv_each on a TPU), or sums of taps that XLA fuses")
  parser.add_argument("--inner_impl", default="auto", choices=INNER_IMPLS,
                      help="a cell's inner nodes in a loop or unrolled (config.model.inner_impl)")
  parser.add_argument("--gpu_autotune", action="store_true", help="compile with XLA's own "
                      "settings, as config.search.gpu_autotune does (without a GPU to time "
                      "candidates on, XLA takes defaults)")
  parser.add_argument("--profile", help="trace the compile of every program (once each, "
                      "one after the other) with jax.profiler into this directory, and "
                      "report its longest events (compile_events)")
  parser.add_argument("--side_by_side", action=argparse.BooleanOptionalAction, default=True,
                      help="compile the shared step's programs again as its first call "
                      "does, side by side (side_by_side_s)")
  for name, value in PRESETS["tiny"].items():
    parser.add_argument(f"--{name}", type=int, default=value)
  args = search_step.parse_with_preset(parser, PRESETS, argv)
  args.depthwise_impl = args.depthwise_impl or ("conv_each" if args.tpu else "conv")
  # The children vmap the neighbors, as 'auto' does on an accelerator (their own backend is
  # the CPU), with the chunk 'auto' would take there (`BilevelSearch.vmap_chunk`).
  if args.chunk is None:
    args.chunk = int(tpu_kernels(args.depthwise_impl))
  if args.install:
    install(args.plugin_dir)
    install_tpu(args.tpu_dir)
    return
  if args.child:
    print(json.dumps(measure(args)), flush=True)
    return
  if args.tpu:
    if not os.path.isdir(os.path.join(args.tpu_dir, "libtpu")):
      sys.exit(f"XLA's TPU compiler is not in {args.tpu_dir}; install it first: python "
               f"{os.path.relpath(__file__)} --install --tpu_dir={args.tpu_dir}")
    env, target = compiler_environ(args.tpu_dir), f"tpu {args.tpu}"
  else:
    if not os.path.isdir(os.path.join(args.plugin_dir, "jax_plugins")):
      sys.exit(f"XLA's CUDA compiler is not in {args.plugin_dir}; install it first: "
               f"python {os.path.relpath(__file__)} --install --plugin_dir={args.plugin_dir}")
    if not os.path.isfile(args.target):
      sys.exit(f"No GPU target file {args.target}; give --target=PATH to an XLA "
               "GpuTargetConfigProto text file (see benchmarks/gpu_targets/).")
    env, target = compiler_environ(args.plugin_dir), os.path.basename(args.target)
  algorithms = ["darts", "na_darts"] if args.algorithm == "both" else [args.algorithm]
  for algorithm in algorithms:
    child = [sys.executable, __file__, "--child", f"--algorithm={algorithm}"] + [
        f"--{k}={getattr(args, k)}" for k in (
            "target", "space", "order", "neighbors", "compile", "dtype", "depthwise_impl",
            "inner_impl", *PRESETS["tiny"])] + (
                [] if args.chunk is None else [f"--chunk={args.chunk}"]) + (
                    [f"--profile={args.profile}"] if args.profile else []) + (
                        ["--gpu_autotune"] if args.gpu_autotune else []) + (
                            [f"--tpu={args.tpu}"] if args.tpu else []) + (
                                [] if args.side_by_side else ["--no-side_by_side"])
    out = subprocess.run(child, capture_output=True, text=True, check=False, env=env)
    if out.returncode:
      row = {"space": args.space, "algorithm": algorithm, "order": args.order,
             "compile": args.compile,
             "chunk": args.chunk, "dtype": args.dtype, "depthwise_impl": args.depthwise_impl,
             **{k: getattr(args, k) for k in PRESETS["tiny"]}, "error": failure(out.stderr)}
    else:
      row = json.loads(out.stdout.strip().splitlines()[-1])
    # A row compiled under XLA_FLAGS (the children inherit them) says so.
    flags = {"xla_flags": env["XLA_FLAGS"]} if env.get("XLA_FLAGS") else {}
    line = json.dumps({"target": target, "date": datetime.date.today().isoformat(),
                       **flags, **row})
    print(line, flush=True)
    if args.output:
      with open(args.output, "a") as f:
        f.write(line + "\n")


if __name__ == "__main__":
  sys.path.insert(0, ROOT)
  main()
