"""Tests of benchmarks/search_step.py: one tiny configuration gives the fields that
benchmarks/device_check.py reads, with its step counts, in a Python that has none of the
packages the GPU machine lacks (the timings themselves are run by hand, never asserted)."""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SPEC = importlib.util.spec_from_file_location(
    "search_step", os.path.join(ROOT, "benchmarks", "search_step.py"))
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)


# What the GPU machine lacks (the device README): device_check.py and its rows must run
# without them. ml_collections, which the configs need, travels there as a wheel.
_NOT_ON_THE_GPU_MACHINE = ("tensorflow", "tensorflow_datasets", "clu")

# Imports of those packages fail in the child, as they would there, before anything runs.
_CHILD = textwrap.dedent("""
    import importlib.abc, sys

    class NotOnTheGpuMachine(importlib.abc.MetaPathFinder):
      def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {missing!r}:
          raise ImportError(name + " is not on the GPU machine")

    sys.meta_path.insert(0, NotOnTheGpuMachine())
    sys.path[:0] = [{root!r}, {benchmarks!r}]
    """)


def _child_code(body: str) -> str:
  """``body`` run after the guard, with the repository and benchmarks/ importable."""
  return _CHILD.format(missing=set(_NOT_ON_THE_GPU_MACHINE), root=ROOT,
                       benchmarks=os.path.join(ROOT, "benchmarks")) + body


# One configuration: each compiles a supernet step (the second order's took 70 s here).
@pytest.mark.parametrize("algorithm,order,gradients", [("na_darts", "first", 3)])
def test_a_tiny_configuration_reports_every_field_without_tensorflow(algorithm, order,
                                                                     gradients, tmp_path):
  argv = ["--child", f"--algorithm={algorithm}", f"--order={order}", "--neighbors=2",
          "--channels=2", "--layers=3", "--size=8", "--batch=4", "--steps=1",
          "--evaluate=vmap", "--chunk=1", f"--profile={tmp_path}"]
  code = _child_code(f"import device_check, search_step\nsearch_step.main({argv!r})\n")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  progress, timed, row = map(json.loads, result.stdout.strip().splitlines())
  # The first step's line comes first, then the timed steps' before the step traced after
  # them, with the result's numbers, for a caller that stops the child at a time limit.
  assert progress == {k: row[k] for k in ("init_s", "first_step_s", "first_step_events",
                                          "first_step_kinds")}
  assert timed == {"step_s": row["step_s"]}
  # The profile of the first step: XLA compiled the supernet in it, and no event's own
  # time exceeds its whole.
  events = row["first_step_events"]
  assert any("Compile" in e["name"] for e in events)
  assert all(0 <= e["self_s"] <= e["s"] and e["calls"] >= 1 for e in events)
  # The same summed by kind: each kind's own time at least that of any one of its events
  # (the kinds of events past the first TOP_EVENTS may be left out).
  kinds = {e["name"]: e for e in row["first_step_kinds"]}
  assert kinds and all(0 <= e["self_s"] <= e["s"] for e in kinds.values())
  for event in events:
    kind = kinds.get(bench.event_kind(event["name"]))
    assert kind is None or kind["self_s"] >= event["self_s"] - 1e-3
  assert list(tmp_path.glob("**/*.xplane.pb"))
  # One more step traced, compiled already: XLA compiles nothing in it, and its programs'
  # instructions, summed by kind, are among its events.
  assert list((tmp_path / "steady").glob("**/*.xplane.pb"))
  steady = row["step_events"] + row["step_kinds"]
  assert steady and not any("ompile" in e["name"] for e in steady)
  assert all(0 <= e["self_s"] <= e["s"] and e["calls"] >= 1 for e in steady)
  kinds = {e["name"] for e in row["step_kinds"]}
  assert any(bench.event_kind(e["name"]) in kinds and e["name"] not in kinds
             for e in row["step_events"])
  assert row["traced_step_s"] > 0
  assert (row["algorithm"], row["order"], row["batch"], row["layers"]) == (
      algorithm, order, 4, 3)
  assert row["neighbors"] == (2 if algorithm == "na_darts" else 1)
  assert row["supernet_gradients_per_step"] == gradients
  assert row["vmap_neighbors"] and row["neighbor_chunk"] == 1
  assert row["first_step_s"] > 0 and row["step_s"] > 0 and row["peak_rss_gb"] > 0
  assert row["device"] and "peak_device_gb" in row and row["dtype"] == "float32"
  assert row["gpu_autotune"] is False


def test_the_child_refuses_what_the_gpu_machine_lacks():
  """The guard above is real: the same child fails on an import of each package."""
  for name in _NOT_ON_THE_GPU_MACHINE:
    code = _child_code(f"import {name}\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=False)
    assert result.returncode != 0
    assert f"{name} is not on the GPU machine" in result.stderr


def test_a_preset_fills_the_sizes_the_command_line_leaves_out(monkeypatch):
  parsed = {}
  monkeypatch.setattr(bench, "measure", lambda args: parsed.update(vars(args)) or {})
  bench.main(["--child", "--preset=reference", "--algorithm=darts", "--channels=4"])
  assert (parsed["channels"], parsed["layers"], parsed["size"], parsed["batch"]) == (
      4, 8, 32, 64)


def test_the_nb201_space_builds_its_supernet_and_reaches_the_children(monkeypatch):
  """``--space=nb201``: NAS-Bench-201's supernet, ``--layers`` cells a stage, on its
  space; the parent passes the space to each child."""
  from nanas_jax.nn.nb201_supernet import SearchNetworkNB201
  parsed = {}
  monkeypatch.setattr(bench, "measure", lambda args: parsed.update(vars(args)) or {})
  bench.main(["--child", "--space=nb201", "--algorithm=darts", "--layers=2", "--channels=4"])
  _, search = bench.build_search(argparse.Namespace(**parsed), "auto")
  assert isinstance(search.model, SearchNetworkNB201) and search.space.name == "nb201"
  assert (search.model.cells_per_stage, search.model.channels) == (2, 4)
  # Compiled for an accelerator from this host (gpu_compile.py), its convolutions are the
  # accelerators'; on the host's own backend, what 'auto' picks there.
  assert search.model.conv_impl == "auto"
  _, search = bench.build_search(argparse.Namespace(**parsed), "vmap", platform="tpu")
  assert search.model.conv_impl == "vmap"
  children = []
  monkeypatch.setattr(bench.subprocess, "run", lambda command, **kwargs: children.append(
      command) or types.SimpleNamespace(returncode=0, stdout='{"space": "nb201"}\n'))
  bench.main(["--space=nb201", "--algorithm=both"])
  assert [c[c.index("--child") + 1:][:2] for c in children] == [
      ["--algorithm=darts", "--space=nb201"], ["--algorithm=na_darts", "--space=nb201"]]


def _trace(path, lines):
  """A `jax.profiler` trace file of one plane: ``lines`` of ``(name, [(event, start_ns,
  duration_ns[, {statistic: text}])])``."""
  from jax.profiler import ProfileData  # pylint: disable=g-import-not-at-top
  names = sorted({event[0] for _, events in lines for event in events})
  ids = {name: i + 1 for i, name in enumerate(names)}
  stat_names = sorted({stat for _, events in lines for *_, stats in events
                       if isinstance(stats, dict) for stat in stats})
  stat_ids = {name: i + 1 for i, name in enumerate(stat_names)}
  text = 'planes { id: 1 name: "/host:CPU"\n'
  for n, (line, events) in enumerate(lines):
    text += f'lines {{ id: {n + 1} name: "{line}" timestamp_ns: 0\n'
    for e, start, duration, *stats in events:
      text += (f"events {{ metadata_id: {ids[e]} offset_ps: {start * 1000} "
               f"duration_ps: {duration * 1000} ")
      text += "".join(f'stats {{ metadata_id: {stat_ids[k]} str_value: "{v}" }} '
                      for k, v in (stats[0] if stats else {}).items()) + "}\n"
    text += "}\n"
  text += "".join(f'event_metadata {{ key: {i} value {{ id: {i} name: "{name}" }} }}\n'
                  for name, i in ids.items())
  text += "".join(f'stat_metadata {{ key: {i} value {{ id: {i} name: "{name}" }} }}\n'
                  for name, i in stat_ids.items()) + "}\n"
  path.parent.mkdir(parents=True)
  path.write_bytes(ProfileData.text_proto_to_serialized_xspace(text))


def test_profile_events_are_each_events_own_time_worked_out_by_hand(tmp_path):
  """A compile of 10 s holding autotuning of 3 s and 2 s (one of them holding a kernel of
  1 s), then a run of 4.5 s; on a second thread a compile of 6 s: its own times by hand."""
  _trace(tmp_path / "plugins" / "profile" / "run" / "host.xplane.pb", [
      ("main", [("compile", 0, 10_000_000_000), ("autotune", 1_000_000_000, 3_000_000_000),
                ("kernel", 2_000_000_000, 1_000_000_000),
                ("autotune", 5_000_000_000, 2_000_000_000),
                ("run", 10_000_000_000, 4_500_000_000)]),
      ("compiler", [("compile", 1_000_000_000, 6_000_000_000)])])
  events = bench.profile_events(str(tmp_path))
  assert [(e["name"], e["calls"], e["s"], e["self_s"]) for e in events] == [
      ("compile", 2, 16.0, 11.0), ("run", 1, 4.5, 4.5), ("autotune", 2, 5.0, 4.0),
      ("kernel", 1, 1.0, 1.0)]
  assert {e["plane"] for e in events} == {"/host:CPU"}
  assert [e["name"] for e in bench.profile_events(str(tmp_path), top=2)] == [
      "compile", "run"]


def test_events_by_kind_sum_each_kinds_instructions_worked_out_by_hand(tmp_path):
  """Three fusions and two GPU kernels of one kind each, a convolution, a cuDNN kernel
  whose annotations say it ran for another convolution, a host thunk that names its
  instruction, and a program run holding them (times in ms): each kind's calls, durations
  and own times summed by hand."""
  ms = 1_000_000
  _trace(tmp_path / "plugins" / "profile" / "run" / "host.xplane.pb", [
      ("main", [("run", 0, 100 * ms), ("multiply_add_fusion.3", 0, 10 * ms),
                ("multiply_add_fusion.17", 20 * ms, 30 * ms),
                ("cudnn-conv-bw-filter.2", 50 * ms, 40 * ms),
                ("loop_add_fusion_4", 90 * ms, 5 * ms)]),
      ("stream", [("multiply_add_fusion.3", 0, 20 * ms),
                  ("loop_add_fusion_12", 30 * ms, 7 * ms),
                  ("sm90_xmma_wgrad_kernel", 40 * ms, 9 * ms, {
                      "kernel_annotation": "XlaModule:#hlo_module=jit_g,program_id=2#::"
                                           "Thunk:#hlo_op=cudnn-conv-bw-filter.7#"}),
                  ("Thunk", 50 * ms, 1 * ms, {"hlo_op": "fusion.2"})])])
  kinds = bench.profile_events(str(tmp_path), by_kind=True)
  assert [(e["name"], e["calls"], round(e["s"] * 1e3), round(e["self_s"] * 1e3))
          for e in kinds] == [
              ("multiply_add_fusion", 3, 60, 60), ("cudnn-conv-bw-filter", 2, 49, 49),
              ("run", 1, 100, 15), ("loop_add_fusion", 2, 12, 12), ("fusion", 1, 1, 1)]
  # One at a time, the kernel keeps its own name.
  assert ("sm90_xmma_wgrad_kernel", 1) in [
      (e["name"], e["calls"]) for e in bench.profile_events(str(tmp_path))]
  assert [bench.event_kind(n) for n in ("fusion", "fusion.1.2", "sm90_xmma_align4",
                                        "PjitFunction(f)")] == [
      "fusion", "fusion", "sm90_xmma_align4", "PjitFunction(f)"]


def test_a_profile_that_cannot_start_or_finish_is_reported_not_raised(tmp_path):
  """JAX's own refusals: a second trace while one runs, and stopping none."""
  assert bench.start_profile(str(tmp_path / "a")) == {}
  try:
    refused = bench.start_profile(str(tmp_path / "b"))
  finally:
    finished = bench.finish_profile(str(tmp_path / "a"))
  assert set(refused) == {"profile_error"} and refused["profile_error"]
  assert set(finished) == {"first_step_events"}
  assert set(bench.finish_profile(str(tmp_path / "a"))) == {"profile_error"}


def test_a_first_step_trace_is_cut_at_its_time_and_printed_at_once(tmp_path, capsys):
  """A 'first step' (a compile, then 2.5 s of waiting) outlasts the trace's end, 0.8 s
  after its start: the trace is cut then, from the timer's thread, its events so far
  (the compile, done by then) printed as one JSON line while the step still runs; the
  step's end stops nothing more. A trace whose time does not come first ends with the
  step, uncut."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  trace = bench.FirstStepTrace(str(tmp_path / "cut"), until=time.time() + 0.8)
  trace.start()
  jax.jit(lambda x: jnp.sin(x) * 2).lower(jnp.ones(8)).compile()
  time.sleep(2.5)
  printed = capsys.readouterr().out
  fields = trace.finish()
  assert json.loads(printed) == fields
  # Counted from the trace's start, which comes a little after ``until`` was set.
  assert 0.5 <= fields["first_step_trace_cut_s"] < 2.0
  assert any("ompile" in e["name"] for e in fields["first_step_events"])
  assert {e["name"] for e in fields["first_step_kinds"]} >= {
      bench.event_kind(e["name"]) for e in fields["first_step_events"]}
  assert capsys.readouterr().out == ""
  whole = bench.FirstStepTrace(str(tmp_path / "whole"), until=time.time() + 60)
  whole.start()
  jax.jit(lambda x: jnp.cos(x) * 3).lower(jnp.ones(8)).compile()
  fields = whole.finish()
  assert "first_step_trace_cut_s" not in fields and fields["first_step_events"]
  time.sleep(0.1)
  assert capsys.readouterr().out == ""
