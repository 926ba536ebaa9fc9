"""Tests of benchmarks/parallel_throughput.py's command line, child environment and
scaling arithmetic (the benchmark itself is run by hand: it compiles once per count)."""

import importlib.util
import os

import pytest

from nanas_jax import parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SPEC = importlib.util.spec_from_file_location(
    "parallel_throughput", os.path.join(ROOT, "benchmarks", "parallel_throughput.py"))
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)


def test_preset_fills_what_the_command_line_leaves_out():
  args = bench.parse_args(["--preset=reference", "--layers=3", "--devices=8,1,2,2"])
  assert (args.channels, args.layers, args.image) == (16, 3, "32x32x3")
  assert args.devices == [1, 2, 8]
  assert args.algorithm == "darts" and args.batch == 64


@pytest.mark.parametrize("argv", [
    ["--batch=12", "--devices=1,8"], ["--image=32x32"], ["--devices=0,2"], ["--steps=0"]])
def test_bad_command_lines_are_refused(argv):
  with pytest.raises(SystemExit):
    bench.parse_args(argv)


def test_child_env_sets_fake_cpu_devices_only_on_cpu(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", f"--xla_dump_to=/tmp/x {parallel.DEVICE_COUNT_FLAG}=3")
  flags = bench.child_env(4, "cpu")["XLA_FLAGS"].split()
  assert flags == ["--xla_dump_to=/tmp/x", f"{parallel.SERIAL_SCHEDULER_FLAG}=false",
                   f"{parallel.DEVICE_COUNT_FLAG}=4"]
  assert bench.child_env(4, "gpu")["XLA_FLAGS"] == os.environ["XLA_FLAGS"]


def test_child_env_asks_for_huge_pages_as_our_programs_do(monkeypatch):
  from nanas_jax import cli  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
  expected = (cli.huge_pages_environ(os.environ) or {}).get("GLIBC_TUNABLES")
  assert bench.child_env(2, "cpu").get("GLIBC_TUNABLES") == expected
  monkeypatch.setenv(cli.HUGE_PAGES_ENV, "0")
  assert "GLIBC_TUNABLES" not in bench.child_env(2, "cpu")


def test_child_env_keeps_a_scheduler_the_user_chose(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", f"{parallel.SERIAL_SCHEDULER_FLAG}=true")
  flags = bench.child_env(2, "cpu")["XLA_FLAGS"].split()
  assert flags == [f"{parallel.SERIAL_SCHEDULER_FLAG}=true", f"{parallel.DEVICE_COUNT_FLAG}=2"]


def test_speedup_efficiency_and_alpha_diff_against_the_base():
  base = {"devices": 1, "step_s": 2.0, "alpha": [[0.5, 1.0], [0.0, 0.0]]}
  result = {"devices": 4, "step_s": 1.0, "alpha": [[0.5, 1.25], [0.0, -0.5]]}
  out = bench.add_scaling(result, base)
  assert "alpha" not in out
  assert (out["speedup"], out["efficiency"], out["alpha_diff"]) == (2.0, 0.5, 0.5)
  table = bench.markdown_table([{
      **out, "backend": "cpu", "device_kind": "cpu", "per_device_batch": 16,
      "first_step_s": 20.0, "images_per_s": 64.0, "peak_rss_gb": 1.5,
      "peak_device_gb": None}])
  assert "| 4 | cpu (cpu) | 16 | 20.0 s | 1.000 s | 64.0 | 2.00x | 0.50 | 1.5 GB RSS |" in table
