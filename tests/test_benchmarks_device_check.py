"""Tests of benchmarks/device_check.py and benchmarks/reference_step.py: the command lines
refuse a wrong reference path before anything runs, a row's subprocess result or failure
becomes the documented row, the report file has the documented fields, the goals are read
from the rows as worked out by hand, and the PyTorch 0.3 argument orders are translated to
today's (the timings themselves are run by hand)."""

import importlib.util
import json
import os
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from nanas_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


check = _load("device_check")
ref = _load("reference_step")


def _fake_reference(path):
  path.mkdir()
  for name in ref.REFERENCE_FILES:
    (path / name).write_text("")
  return str(path)


# What the stand-in answers for the first-run probe.
PROBE_RESULT = {"device": "cpu", "cases": [{"case": "depthwise", "convolutions": 1,
                                            "first_run_s": 0.5, "later_run_s": 0.1,
                                            "overhead_s": 0.4}]}


def _recording_run(calls, reference_second_order_times_out=False):
  """A stand-in for ``device_check._run`` that records ``(script, command, timeout, env)``
  and answers as the two scripts would."""

  def fake_run(cmd, timeout, env=None):
    script = os.path.basename(cmd[1])
    calls.append((script, cmd, timeout, env))
    if script == "conv_first_run.py":
      return dict(PROBE_RESULT), None
    if script == "search_step.py":
      chunk = 2 if "--algorithm=na_darts" in cmd else None
      return {"first_step_s": 20.0, "step_s": 0.5, "peak_device_gb": None,
              "peak_rss_gb": 3.25, "neighbor_chunk": chunk, "device": "cpu"}, None
    if reference_second_order_times_out and "--order=second" in cmd:
      return None, f"timed out after {timeout:.0f} s"
    return {**check.PRESETS["small"], "impl": "pytorch_reference", "algorithm": "darts",
            "order": "first", "neighbors": 1, "dtype": "float32", "first_step_s": 3.0,
            "step_s": 1.5, "peak_gb": 0.5, "torch": "2.99", "threads": 2}, None

  return fake_run


@pytest.mark.parametrize("module", [check, ref])
def test_a_directory_that_is_not_the_reference_is_refused_with_the_fix(module, tmp_path,
                                                                       capsys):
  (tmp_path / "model_search.py").write_text("")
  with pytest.raises(SystemExit) as exit_info:
    module.main([f"--reference={tmp_path}"])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert "lacks architect.py, operations.py, genotypes.py" in err
  assert "github.com/quark0/darts" in err


def test_nas_bench_201s_reference_is_autodl_projects_with_darts_v2_for_second_order(
    tmp_path, capsys):
  """``--space=nb201`` asks for AutoDL-Projects's root (quark0/darts's cnn/ is refused,
  naming what it lacks and where to get it), and for the second order its DARTS-V2.py too,
  before torch is imported."""
  darts = _fake_reference(tmp_path / "cnn")
  autodl = tmp_path / "AutoDL-Projects"
  for name in ref.NB201_REFERENCE_FILES:
    (autodl / name).parent.mkdir(parents=True, exist_ok=True)
    (autodl / name).write_text("")
  for argv, messages in (
      ([f"--reference={darts}"], ("lacks xautodl/models/cell_searchs/search_model_darts.py",
                                  "github.com/D-X-Y/AutoDL-Projects")),
      ([f"--reference={autodl}", "--order=second"],
       ("lacks exps/NAS-Bench-201-algos/DARTS-V2.py", "github.com/D-X-Y/AutoDL-Projects"))):
    with pytest.raises(SystemExit) as exit_info:
      ref.main(["--space=nb201", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert all(message in err for message in messages), err
  assert ref.check_reference(str(autodl), "nb201") == str(autodl)
  with pytest.raises(ValueError, match="not quark0/darts's cnn/ directory"):
    ref.check_reference(str(autodl))
  (autodl / ref.NB201_SECOND_ORDER_FILE).parent.mkdir(parents=True)
  (autodl / ref.NB201_SECOND_ORDER_FILE).write_text("")
  assert ref.check_reference(str(autodl), "nb201", "second") == str(autodl)


def test_the_reference_scripts_functions_are_compiled_without_running_the_script(tmp_path):
  """DARTS-V2.py's step functions are taken from its source with the globals given: its
  imports (torchvision, the datasets) and the rest of its body never run."""
  script = tmp_path / "DARTS-V2.py"
  script.write_text(
      "import torchvision_that_is_not_installed\n"
      "raise SystemExit('the script body ran')\n"
      "def _concat(xs):\n  return scale * sum(xs)\n"
      "def backward_step_unrolled(xs):\n  return _concat(xs) + 1\n"
      "def main():\n  raise SystemExit('main ran')\n"
      "if __name__ == '__main__':\n  main()\n")
  functions = ref.reference_functions(str(script), ("_concat", "backward_step_unrolled"),
                                      {"scale": 10})
  assert functions.backward_step_unrolled([1, 2]) == 31
  assert sorted(vars(functions)) == ["_concat", "backward_step_unrolled"]
  with pytest.raises(ValueError, match="defines no top-level _hessian_vector_product, "
                     "which the step calls"):
    ref.reference_functions(str(script), ref.NB201_SECOND_ORDER_FUNCTIONS, {})


def test_run_reads_the_last_json_line_and_reports_failures():
  ok = [sys.executable, "-c", "print('log'); print('{\"a\": 1}'); print('{\"a\": 2}')"]
  assert check._run(ok, timeout=60) == ({"a": 2}, None)
  failed = [sys.executable, "-c", "import sys; sys.exit('out of memory')"]
  assert check._run(failed, timeout=60) == (None, "out of memory")
  silent = [sys.executable, "-c", "print('no numbers')"]
  assert check._run(silent, timeout=60) == (None, "no result line")
  slow = [sys.executable, "-c", "import time; time.sleep(30)"]
  assert check._run(slow, timeout=1) == (None, "timed out after 1 s")


def test_a_command_stopped_at_its_limit_returns_what_it_had_printed():
  """Its JSON lines merged and its XLA timers (the log below), beside the error; nothing
  where it printed neither (above)."""
  child = (f"import sys, time; sys.stderr.write({_LOG!r}); sys.stderr.flush(); "
           "print('{\"init_s\": 1.5, \"first_step_s\": 9.0}', flush=True); "
           "print('{\"first_step_s\": 8.0}', flush=True); time.sleep(60)")
  partial, error = check._run([sys.executable, "-c", child], timeout=3)
  assert error == "timed out after 3 s"
  assert partial == {"init_s": 1.5, "first_step_s": 8.0,
                     "xla_compile": check.xla_compile_timers(_LOG)}


def test_one_of_our_rows_stopped_at_its_limit_keeps_its_first_step_and_timers(monkeypatch):
  timers = [{"program": "jit_grad", "hlo_passes_s": 160.0, "backend_s": 13.0}]
  warnings = [{"message": "Falling back to the CUDA driver", "count": 1}]
  # Its first step's trace, cut before the limit while the step still ran.
  cut = {"first_step_events": [{"plane": "/host:CPU", "name": "Thunk", "calls": 379,
                                "s": 46.0, "self_s": 46.0}], "first_step_trace_cut_s": 215.0}
  stopped = {"init_s": 3.0, "first_step_s": 250.0, "xla_compile": timers,
             "log_warnings": warnings, **cut}
  monkeypatch.setattr(check, "_run", lambda cmd, timeout, env=None: (
      stopped, f"timed out after {timeout:.0f} s"))
  row = check.ours("darts", "first", 1, check.PRESETS["small"], 5, timeout=300)
  assert row["error"] == "timed out after 300 s"
  assert row["first_step_s"] == 250.0 and row["xla_compile"] == timers
  assert row["log_warnings"] == warnings
  assert {k: row[k] for k in cut} == cut
  assert "step_s" not in row and "init_s" not in row
  # Stopped while it traced a step more after the timed ones: their time is kept.
  monkeypatch.setattr(check, "_run", lambda cmd, timeout, env=None: (
      {**stopped, "step_s": 0.5}, f"timed out after {timeout:.0f} s"))
  row = check.ours("darts", "first", 1, check.PRESETS["small"], 5, timeout=300)
  assert (row["first_step_s"], row["step_s"]) == (250.0, 0.5) and "error" in row
  monkeypatch.setattr(check, "_run", lambda cmd, timeout, env=None: (None, "failed"))
  row = check.ours("darts", "first", 1, check.PRESETS["small"], 5, timeout=300)
  assert row["error"] == "failed" and "first_step_s" not in row


def test_profile_traces_each_of_our_rows_into_a_folder_of_its_own(tmp_path, monkeypatch):
  """--profile: our rows run with a trace folder each and report its events; the
  reference's rows are not traced."""
  calls = []
  record = _recording_run(calls)
  events = [{"plane": "/host:CPU", "name": "compile", "calls": 1, "s": 9.0, "self_s": 9.0}]
  steady = {"step_events": events[:1], "step_kinds": events[:1], "traced_step_s": 0.5}

  def with_events(cmd, timeout, env=None):
    result, error = record(cmd, timeout, env)
    return ({**result, "first_step_events": events, "first_step_kinds": events, **steady}
            if "search_step.py" in cmd[1] else result), error

  monkeypatch.setattr(check, "_run", with_events)
  out = tmp_path / "results"
  start = time.time()
  check.main([f"--reference={_fake_reference(tmp_path / 'cnn')}", "--preset=small",
              f"--profile={tmp_path / 'traces'}", f"--output_dir={out}", "--timeout=200"])
  profiles = [[a for a in c[1] if a.startswith("--profile=")] for c in calls]
  assert profiles == [[], [], []] + [[f"--profile={tmp_path / 'traces' / name}"]
                                 for name in ("darts_first", "na_darts_first",
                                              "darts_second_fd")]
  # Each first step's trace is cut, if it still runs, PROFILE_MARGIN_S before the row's
  # limit (200 s from its start); half the limit where that is less.
  cuts = [float(a.split("=")[1]) for c in calls[3:] for a in c[1]
          if a.startswith("--profile_until=")]
  assert len(cuts) == 3
  assert all(start + 170 - 1 <= cut <= time.time() + 170 + 1 for cut in cuts)
  row = check.ours("darts", "first", 1, check.PRESETS["small"], 5, timeout=40,
                   profile=str(tmp_path / "short"))
  (cut,) = [float(a.split("=")[1]) for a in calls[-1][1] if a.startswith("--profile_until=")]
  assert abs(cut - (time.time() + 20)) < 2 and "first_step_events" in row
  (path,) = out.iterdir()
  rows = json.loads(path.read_text())["rows"]
  assert [r.get("first_step_events") for r in rows] == [events] * 3 + [None] * 2
  assert [r.get("first_step_kinds") for r in rows] == [events] * 3 + [None] * 2
  assert [{k: r[k] for k in steady if k in r} for r in rows] == [steady] * 3 + [{}] * 2


# XLA's timer lines as its compilers print them (the GPU's from jaxlib 0.10.2's CUDA
# compiler, compiling for an H200 here; the CPU's likewise), and lines that must not count.
_LOG = """\
I1203 16:38:45.167206   15295 gpu_compiler.cc:2152] GpuCompiler::RunHloPasses for \
jit_grad time: 16.6 s (16593620 us) (cumulative: 16.6 s, max: 16.6 s, #called: 1)
I1203 16:38:48.037683   15325 nvptx_compiler.cc:520] NVPTXCompiler::CompileTargetBinary - \
CompileToPtx for jit_grad time: 14.1 ms (14068 us) (cumulative: 14.1 ms, max: 14.1 ms, \
#called: 1)
I1203 16:39:28.100000   15295 gpu_compiler.cc:2300] GpuCompiler::RunBackend - IR emission \
for jit_grad time: 42.4 s (42400000 us) (cumulative: 42.4 s, max: 42.4 s, #called: 1)
I1203 16:39:32.300000   15295 gpu_compiler.cc:2310] GpuCompiler::RunBackend for jit_grad \
time: 46.6 s (46600000 us) (cumulative: 46.6 s, max: 46.6 s, #called: 1)
I1203 16:40:00.000000   15295 gpu_compiler.cc:2152] GpuCompiler::RunHloPasses for \
jit_update time: 0.5 s (500000 us) (cumulative: 17.1 s, max: 16.6 s, #called: 2)
I1203 16:40:01.000000   15295 gpu_compiler.cc:2310] GpuCompiler::RunBackend for \
jit_update time: 0.7 s (700000 us) (cumulative: 47.3 s, max: 46.6 s, #called: 2)
I1203 16:40:02.000000   15295 gpu_compiler.cc:2152] GpuCompiler::RunHloPasses for \
jit_small time: 0.2 s (200000 us) (cumulative: 17.3 s, max: 16.6 s, #called: 3)
I1203 16:44:14.707238   18338 cpu_compiler.cc:1269] Running HLO passes on [jit_host] for \
CPU time: 1.35 s (1350000 us) (cumulative: 1.35 s, max: 1.35 s, #called: 1)
I1203 16:44:14.714463   18338 cpu_compiler.cc:2094] Compiling [jit_host] for CPU using \
JIT time: 7.17 s (7170000 us) (cumulative: 7.17 s, max: 7.17 s, #called: 1)
I1203 16:45:00.000000   18338 cpu_compiler.cc:1269] Running HLO passes on [jit_host] for \
CPU time: 0.65 s (650000 us) (cumulative: 2.0 s, max: 1.35 s, #called: 2)
""".replace("\\\n", "")


def test_xla_compile_timers_are_read_per_program_longest_first():
  """Against the log above, summed by hand: HLO passes and the whole backend (not its IR
  emission part, nor a kernel's PTX), a program compiled twice summed, the programs under
  ``min_s`` left out."""
  assert check.xla_compile_timers(_LOG) == [
      {"program": "jit_grad", "hlo_passes_s": 16.594, "backend_s": 46.6},
      {"program": "jit_host", "hlo_passes_s": 2.0, "backend_s": 7.17},
      {"program": "jit_update", "hlo_passes_s": 0.5, "backend_s": 0.7}]
  assert [r["program"] for r in check.xla_compile_timers(_LOG, min_s=0)][-1] == "jit_small"
  assert check.xla_compile_timers("no timers here") == []


# Warnings and errors in absl/glog's format (one of them in the format of lines logged
# before absl's logging starts), among lines that must not count: an info line, a line in
# no log format that starts with W.
_WARNINGS = """\
I1204 19:02:10.000001   15295 gpu_compiler.cc:2152] Compiling jit_grad
W1204 19:02:11.000001   15295 nvptx_compiler.cc:800] Falling back to the CUDA driver for \
PTX compilation; ptxas does not support CC 9.0
W1204 19:02:12.000001   15296 nvptx_compiler.cc:800] Falling back to the CUDA driver for \
PTX compilation; ptxas does not support CC 9.0
E0000 00:00:1796422025.267631   20788 cuda_dnn.cc:100] Could not create cudnn handle
Warning: no log format
W1204 19:02:14.000001   15295 autotuner.cc:90] %s
""".replace("\\\n", "") % ("x" * 400)


def test_log_warnings_are_the_distinct_warning_and_error_lines_counted():
  ptx = ("Falling back to the CUDA driver for PTX compilation; ptxas does not support CC "
         "9.0")
  assert check.log_warnings(_WARNINGS) == [
      {"message": ptx, "count": 2}, {"message": "Could not create cudnn handle", "count": 1},
      {"message": "x" * 300, "count": 1}]
  # The first ``limit`` messages, each still counted in full.
  assert check.log_warnings(_WARNINGS, limit=1) == [{"message": ptx, "count": 2}]
  assert check.log_warnings(_LOG) == []


def test_run_returns_xla_timers_and_a_failure_not_a_log_line():
  """`_run` on children that print the log above: a result carries its timers; a failure
  is the last line that is not a log line."""
  log = f"import sys; sys.stderr.write({_LOG!r}); "
  ok = [sys.executable, "-c", log + "print('{\"a\": 1}')"]
  result, error = check._run(ok, timeout=60)
  assert error is None and result["a"] == 1
  assert result["xla_compile"] == check.xla_compile_timers(_LOG)
  assert "log_warnings" not in result
  warned = [sys.executable, "-c", f"import sys; sys.stderr.write({_WARNINGS!r}); "
            "print('{\"a\": 1}')"]
  result, error = check._run(warned, timeout=60)
  assert error is None and result["log_warnings"] == check.log_warnings(_WARNINGS)
  failed = [sys.executable, "-c", "import sys; sys.stderr.write('Out of memory\\n'); "
            + log + "sys.exit(1)"]
  assert check._run(failed, timeout=60) == (None, "Out of memory")


def test_this_xla_prints_the_timers_that_are_read():
  """A real compile on this machine's XLA with `XLA_TIMERS_ENV`: its program is found, and
  XLA's two stages take no longer than the compile as timed around them."""
  child = ("import json, time, jax, jax.numpy as jnp\n"
           "f = jax.jit(lambda x: jnp.cumsum(jnp.sin(x) @ x.T, 0))\n"
           "lowered = f.lower(jnp.ones((64, 64)))\n"
           "t = time.perf_counter(); lowered.compile()\n"
           "print(json.dumps({'compile_s': time.perf_counter() - t}))\n")
  out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                       check=True, env={**os.environ, **check.XLA_TIMERS_ENV})
  compile_s = json.loads(out.stdout.strip().splitlines()[-1])["compile_s"]
  (timer,) = [t for t in check.xla_compile_timers(out.stderr, min_s=0)
              if t["program"] == "jit__lambda"]
  assert 0 < timer["hlo_passes_s"] + timer["backend_s"] <= compile_s + 0.1


def test_the_report_has_every_row_in_the_documented_fields(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(check, "_run", _recording_run(calls, True))
  monkeypatch.delenv("XLA_FLAGS", raising=False)  # as on the GPU machine
  out = tmp_path / "results"
  check.main([f"--reference={_fake_reference(tmp_path / 'cnn')}", "--preset=small",
              "--timeout=9", f"--output_dir={out}"])
  # The first-run probe runs first, at the preset's sizes on 8 edges' channels, with at
  # most a quarter of the budget; then the reference's rows, then ours (DARTS, NA-DARTS,
  # second order); the report keeps ours first.
  assert [c[0] for c in calls] == (["conv_first_run.py"] + ["reference_step.py"] * 2
                                   + ["search_step.py"] * 3)
  small = check.PRESETS["small"]
  assert calls[0][1][2:] == [f"--batch={small['batch']}", f"--size={small['size']}",
                             f"--channels={8 * small['channels']}"]
  assert calls[0][2] == min(check.PROBE_TIMEOUT_S, 480 / 4) and calls[0][3] is None
  assert [c[1][3:5] for c in calls[3:]] == [
      ["--algorithm=darts", "--order=first"], ["--algorithm=na_darts", "--order=first"],
      ["--algorithm=darts", "--order=second_fd"]]
  assert {c[2] for c in calls[1:]} == {9.0}
  envs = {c[0]: c[3] for c in calls}
  # Our rows start as our programs do (huge pages where they help), with XLA's compile
  # timers logged; the reference as is.
  expected = cli.huge_pages_environ(os.environ) or os.environ
  assert envs["reference_step.py"] is None
  assert envs["search_step.py"].get("GLIBC_TUNABLES") == expected.get("GLIBC_TUNABLES")
  assert check.XLA_TIMERS_ENV.items() <= envs["search_step.py"].items()
  (path,) = out.iterdir()
  report = json.loads(path.read_text())
  assert path.name == f"{report['device']}.json".replace(" ", "_")
  assert report["preset"] == "small" and report["torch"] == "2.99"
  assert set(report) == {"device", "jax", "torch", "date", "preset", "xla_flags",
                         "environment", "packages", "conv_first_run", "rows", "goals"}
  assert report["conv_first_run"] == PROBE_RESULT
  import jax  # pylint: disable=import-outside-toplevel
  assert report["environment"][0] == f"jax:    {jax.__version__}"
  assert report["packages"]["jax"] == jax.__version__
  assert report["packages"]["numpy"] == np.__version__
  assert report["xla_flags"] == ""
  assert report["goals"] == check.goals(report["rows"])
  rows = report["rows"]
  assert [(r["impl"], r["algorithm"], r["order"], r["neighbors"]) for r in rows] == [
      ("nanas_jax", "darts", "first", 1), ("nanas_jax", "darts", "second_fd", 1),
      ("nanas_jax", "na_darts", "first", 4), ("pytorch_reference", "darts", "first", 1),
      ("pytorch_reference", "darts", "second_fd", 1)]
  assert all(r["batch"] == small["batch"] and r["size"] == small["size"] for r in rows[:3])
  assert rows[0]["peak_gb"] == 3.25 and rows[0]["step_s"] == 0.5
  assert [r["xla_compile"] for r in rows[:3]] == [[], [], []]  # none in the stand-in
  assert [r["neighbor_chunk"] for r in rows[:3]] == [None, None, 2]
  assert "threads" not in rows[3] and rows[3]["step_s"] == 1.5
  assert rows[4]["error"] == "timed out after 9 s" and "step_s" not in rows[4]
  assert {r["dtype"] for r in rows} == {"float32"}


def test_the_rows_share_the_budget_and_the_report_is_written_within_it(tmp_path,
                                                                       monkeypatch):
  """Every row here runs to its time limit on a clock of the test's own: the first-run
  probe gets at most a quarter of --budget, each row the smaller of --timeout and what is
  left, and a row whose turn comes with less than MIN_ROW_S left is not started but
  reported."""
  now = [1000.0]
  calls = []
  record = _recording_run(calls)

  def run_to_the_limit(cmd, timeout, env=None):
    now[0] += timeout
    return record(cmd, timeout, env)

  monkeypatch.setattr(check, "_run", run_to_the_limit)
  monkeypatch.setattr(check, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
  out = tmp_path / "results"
  check.main([f"--reference={_fake_reference(tmp_path / 'cnn')}", "--preset=small",
              "--timeout=150", "--budget=480", f"--output_dir={out}"])
  # 480 s: the probe 90 s, the reference's two rows 150 s each, DARTS the 90 s left,
  # NA-DARTS and the second order none.
  assert [c[2] for c in calls] == [90.0, 150.0, 150.0, 90.0]
  assert now[0] - 1000.0 == 480.0
  (path,) = out.iterdir()
  rows = json.loads(path.read_text())["rows"]
  assert [(r["algorithm"], r["order"]) for r in rows[1:3]] == [
      ("darts", "second_fd"), ("na_darts", "first")]
  assert {rows[1]["error"], rows[2]["error"]} == {"not run: the 480 s budget was spent"}
  assert "step_s" not in rows[1] and rows[1]["batch"] == check.PRESETS["small"]["batch"]
  assert all("error" not in r for i, r in enumerate(rows) if i not in (1, 2))
  assert sorted(check.RUN_ORDER) == list(range(len(check.OURS) + len(check.REFERENCE)))


@pytest.mark.parametrize("flag, message", [
    ("--budget=5", "--budget=5 leaves no row time to run: give at least 10 seconds"),
    ("--rows=darts_first,darts_second",
     "--rows=darts_first,darts_second: no row is named darts_second; choose among "
     "conv_first_run, darts_first, darts_second_fd, na_darts_first, reference_first, "
     "reference_second"),
    ("--name=../up", "--name='../up' cannot name the report's file: use letters, digits")])
def test_arguments_no_run_can_use_are_refused_before_anything_runs(tmp_path, monkeypatch,
                                                                  capsys, flag, message):
  """A budget too short for any row; a row name that does not exist; a report name that
  is not a file's."""
  calls = []
  monkeypatch.setattr(check, "_run", _recording_run(calls))
  with pytest.raises(SystemExit) as exit_info:
    check.main([f"--reference={_fake_reference(tmp_path / 'cnn')}", flag])
  assert exit_info.value.code == 2 and not calls
  assert message in capsys.readouterr().err


def test_rows_runs_only_the_rows_named_and_reports_the_others_as_not_run(tmp_path,
                                                                         monkeypatch):
  """--rows: the rows named run in the usual order, the others are in the report unrun,
  and the goals that need them are unmeasured."""
  calls = []
  monkeypatch.setattr(check, "_run", _recording_run(calls))
  out = tmp_path / "results"
  check.main([f"--reference={_fake_reference(tmp_path / 'cnn')}", "--preset=small",
              "--rows=na_darts_first,reference_first,darts_first", f"--output_dir={out}"])
  assert [(c[0], c[1][3]) for c in calls] == [
      ("reference_step.py", "--order=first"), ("search_step.py", "--algorithm=darts"),
      ("search_step.py", "--algorithm=na_darts")]
  (path,) = out.iterdir()
  report = json.loads(path.read_text())
  assert [r.get("error") for r in report["rows"]] == [
      None, "not run: not among --rows", None, None, "not run: not among --rows"]
  assert report["conv_first_run"] == {"error": "not run: not among --rows"}
  assert check.ROW_NAMES == ("darts_first", "darts_second_fd", "na_darts_first",
                             "reference_first", "reference_second")
  measured = {g["goal"] for g in report["goals"] if g["value"] is not None}
  assert "slowest first step (compile) of ours (s)" not in measured
  assert "PyTorch reference's first-order step / ours" in measured


@pytest.mark.parametrize("flags, suffix", [
    (["--dtype=bfloat16"], "-bfloat16"), (["--inner_impl=scan"], "-scan"),
    (["--dtype=bfloat16", "--inner_impl=unroll"], "-bfloat16-unroll"),
    (["--depthwise_impl=taps_fused"], "-taps_fused"), (["--gpu_autotune"], "-gpu_autotune")])
def test_non_default_rows_run_ours_so_and_write_their_own_file(tmp_path, monkeypatch, flags,
                                                               suffix):
  """bfloat16, another inner-node or depthwise implementation, XLA timing kernels on the
  GPU: our rows run with the flag, the reference's without (float32), and the report goes
  to a file of its own."""
  calls = []
  monkeypatch.setattr(check, "_run", _recording_run(calls))
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  out = tmp_path / "results"
  check.main([f"--reference={_fake_reference(tmp_path / 'cnn')}", "--preset=small",
              *flags, f"--output_dir={out}"])
  for script, cmd, _, _ in calls:
    assert all((flag in cmd) == (script == "search_step.py") for flag in flags)
  (path,) = out.iterdir()
  report = json.loads(path.read_text())
  assert path.name == f"{report['device']}{suffix}.json".replace(" ", "_")
  dtype = "bfloat16" if "--dtype=bfloat16" in flags else "float32"
  assert [r["dtype"] for r in report["rows"]] == [dtype] * 3 + ["float32"] * 2
  inner = next((f.split("=")[1] for f in flags if f.startswith("--inner_impl")), "auto")
  assert [r.get("inner_impl") for r in report["rows"]] == [inner] * 3 + [None] * 2
  depthwise = next((f.split("=")[1] for f in flags if f.startswith("--depthwise_impl")),
                   "auto")
  assert [r.get("depthwise_impl") for r in report["rows"]] == [depthwise] * 3 + [None] * 2
  assert [r.get("gpu_autotune") for r in report["rows"]] == (
      ["--gpu_autotune" in flags] * 3 + [None] * 2)


def test_a_run_under_xla_flags_records_them_and_writes_a_file_of_its_own(tmp_path,
                                                                          monkeypatch):
  """Our rows inherit XLA_FLAGS (a compiler setting tried on the GPU, say); the report
  names them and does not overwrite the default run's."""
  flags = "--xla_gpu_experimental_enable_fusion_autotuner=false"
  calls = []
  monkeypatch.setattr(check, "_run", _recording_run(calls))
  out = tmp_path / "results"
  argv = [f"--reference={_fake_reference(tmp_path / 'cnn')}", "--preset=small",
          f"--output_dir={out}"]
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  check.main(argv)
  (default,) = out.iterdir()
  written = default.read_text()
  monkeypatch.setenv("XLA_FLAGS", flags)
  check.main(argv)
  assert {c[3]["XLA_FLAGS"] for c in calls[6:] if c[0] == "search_step.py"} == {flags}
  (path,) = set(out.iterdir()) - {default}
  report = json.loads(path.read_text())
  assert path.name == f"{report['device']}-xla_flags.json".replace(" ", "_")
  assert report["xla_flags"] == flags and default.read_text() == written
  # Under other flags, named: a third file, the two others kept.
  flagged = path.read_text()
  monkeypatch.setenv("XLA_FLAGS", flags + " --xla_gpu_autotune_level=0")
  check.main(argv + ["--name=autotune_off"])
  (named,) = set(out.iterdir()) - {default, path}
  assert named.name == f"{report['device']}-autotune_off.json".replace(" ", "_")
  assert json.loads(named.read_text())["xla_flags"].endswith("--xla_gpu_autotune_level=0")
  assert default.read_text() == written and path.read_text() == flagged


def test_old_argument_orders_become_todays_and_cuda_is_a_no_op_without_a_gpu():

  class Tensor:
    """Records how today's signature was called."""

    def add_(self, other, alpha=1.0):
      return ("add_", other, alpha)

    def sub(self, other, alpha=1.0):
      return ("sub", other, alpha)

    add = sub_ = add_

  class Module:
    pass

  torch = types.SimpleNamespace(Tensor=Tensor, nn=types.SimpleNamespace(Module=Module),
                                cuda=types.SimpleNamespace(is_available=lambda: False))
  ref._torch_compat(torch)
  x, other, module = Tensor(), Tensor(), Module()
  # PyTorch 0.3: x.add_(value, other) means x + value * other.
  assert x.add_(-0.5, other) == ("add_", other, -0.5)
  assert x.sub(2, other) == ("sub", other, 2.0)
  # Today's calls pass through unchanged.
  assert x.add_(other, alpha=3) == ("add_", other, 3)
  assert x.sub_(other) == ("add_", other, 1.0)
  assert x.add(0.5) == ("add_", 0.5, 1.0)
  assert x.cuda() is x and module.cuda() is module


def _row(impl, algorithm, order, **numbers):
  return {"impl": impl, "algorithm": algorithm, "order": order, **numbers}


def test_goals_are_read_from_the_rows():
  """Each goal against its value worked out by hand; a failed row leaves the goals that
  need it unmeasured (None), not met or missed."""
  rows = [_row("nanas_jax", "darts", "first", first_step_s=50.0, step_s=0.05, peak_gb=2.0),
          _row("nanas_jax", "darts", "second_fd", first_step_s=70.0, step_s=0.2, peak_gb=2.5),
          _row("nanas_jax", "na_darts", "first", first_step_s=55.0, step_s=0.09, peak_gb=3.0),
          _row("pytorch_reference", "darts", "first", first_step_s=3.0, step_s=0.2,
               peak_gb=1.0),
          _row("pytorch_reference", "darts", "second_fd", error="timed out after 150 s")]
  got = {g["goal"]: g for g in check.goals(rows)}
  hours = "50-epoch NA-DARTS CIFAR-10 search, 19,500 steps (hours)"
  assert [(name, g["value"], g["met"]) for name, g in got.items()] == [
      ("DARTS first-order step (s)", 0.05, True),
      ("PyTorch reference's first-order step / ours", 4.0, True),
      ("NA-DARTS K=4 step / DARTS's", 1.8, True),
      ("NA-DARTS K=4 peak memory / DARTS's", 1.5, True),
      ("slowest first step (compile) of ours (s)", 70.0, False),
      (hours, 0.4875, True)]
  assert got[hours]["at_most"] == 1.0
  assert got["PyTorch reference's first-order step / ours"]["at_least"] == 3.0
  rows[2] = _row("nanas_jax", "na_darts", "first", error="out of memory")
  unmeasured = [g["goal"] for g in check.goals(rows) if g["value"] is None]
  assert unmeasured == ["NA-DARTS K=4 step / DARTS's", "NA-DARTS K=4 peak memory / DARTS's",
                        "slowest first step (compile) of ours (s)", hours]
  assert all(g["met"] is None for g in check.goals(rows) if g["value"] is None)


def test_the_projected_search_has_the_cifar10_configs_steps():
  """`SEARCH_STEPS` against configs/na_darts_cifar10.py: its epochs, and its batches of the
  weights' part of CIFAR-10's 50,000 training images (the last partial batch dropped)."""
  from configs import na_darts_cifar10  # pylint: disable=g-import-not-at-top
  from nanas_jax.data import base  # pylint: disable=g-import-not-at-top
  config = na_darts_cifar10.get_config()
  per_epoch = base.steps_per_epoch(base.split_point(50_000, config.data.train_portion),
                                   config.data.batch_size)
  assert check.SEARCH_STEPS == config.search.epochs * per_epoch == 19_500
