"""Tests of benchmarks/search_step.py: one tiny configuration measured in this process
gives the fields that benchmarks/device_check.py reads, with its step counts (the timings
themselves are run by hand, never asserted)."""

import importlib.util
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SPEC = importlib.util.spec_from_file_location(
    "search_step", os.path.join(ROOT, "benchmarks", "search_step.py"))
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)


# One configuration: each compiles a supernet step (the second order's took 70 s here).
@pytest.mark.parametrize("algorithm,order,gradients", [("na_darts", "first", 3)])
def test_a_tiny_configuration_reports_every_field(algorithm, order, gradients, capsys,
                                                  monkeypatch):
  monkeypatch.setattr(sys, "path", [ROOT] + sys.path)
  bench.main(["--child", f"--algorithm={algorithm}", f"--order={order}", "--neighbors=2",
              "--channels=2", "--layers=3", "--size=8", "--batch=4", "--steps=1"])
  row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert (row["algorithm"], row["order"], row["batch"], row["layers"]) == (
      algorithm, order, 4, 3)
  assert row["neighbors"] == (2 if algorithm == "na_darts" else 1)
  assert row["supernet_gradients_per_step"] == gradients
  assert row["first_step_s"] > 0 and row["step_s"] > 0 and row["peak_rss_gb"] > 0
  assert row["device"] and "peak_device_gb" in row and row["dtype"] == "float32"


def test_a_preset_fills_the_sizes_the_command_line_leaves_out(monkeypatch):
  parsed = {}
  monkeypatch.setattr(bench, "measure", lambda args: parsed.update(vars(args)) or {})
  bench.main(["--child", "--preset=reference", "--algorithm=darts", "--channels=4"])
  assert (parsed["channels"], parsed["layers"], parsed["size"], parsed["batch"]) == (
      4, 8, 32, 64)
