"""Tests of benchmarks/conv_first_run.py: each case is the convolution program it says
(checked in its jaxpr and in its compiled program), the times are reported as documented,
convolution instructions are counted in GPU and CPU program text alike, and arguments no
case can use are refused with the fix before anything compiles (the GPU's numbers
themselves are read by hand, from `device_check.py`'s report)."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.extend
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "conv_first_run.py")
spec = importlib.util.spec_from_file_location("conv_first_run", SCRIPT)
probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe)


def _convs(function, arguments):
  """The parameters of every convolution in ``function``'s jaxpr (its gradients' too)."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "conv_general_dilated":
        found.append({"groups": eqn.params["feature_group_count"],
                      "batch_groups": eqn.params["batch_group_count"],
                      "in": eqn.invars[0].aval.shape, "kernel": eqn.invars[1].aval.shape,
                      "stride": eqn.params["window_strides"],
                      "dilation": eqn.params["rhs_dilation"]})
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jax.make_jaxpr(function)(*arguments).jaxpr)
  return found


def test_each_case_is_the_convolution_program_it_names():
  batch, size, channels, count = 2, 8, 16, 8
  cases = probe.programs(batch, size, channels, count)
  assert [name for name, _, _ in cases] == list(probe.CASES)
  convs = {name: _convs(function, arguments) for name, function, arguments in cases}
  # One depthwise 3x3 convolution, twice, in two functions (two programs).
  for name in ("depthwise", "depthwise_again"):
    (conv,) = convs[name]
    assert conv["groups"] == channels and conv["kernel"] == (3, 3, 1, channels)
    assert conv["in"] == (batch, size, size, channels)
  assert cases[0][1] is not cases[1][1]
  # Eight depthwise convolutions of the eight distinct DARTS configurations, on channels
  # no other case uses.
  distinct = convs["depthwise_distinct"]
  assert {c["groups"] for c in distinct} == {channels // 2}
  assert sorted((c["kernel"][0], c["dilation"][0], c["stride"][0]) for c in distinct) == [
      (k, d, s) for k in (3, 5) for d in (1, 2) for s in (1, 2)]
  # The kernel gradient of a dilated depthwise convolution, on a quarter of the channels:
  # the forward convolution, and the one that gives the gradient (its groups are batch
  # groups, JAX's transpose of a grouped convolution).
  assert [(c["groups"], c["batch_groups"]) for c in convs["depthwise_filter_grad"]] == [
      (channels // 4, 1), (1, channels // 4)]
  assert convs["depthwise_filter_grad"][0]["dilation"] == (2, 2)
  (dense,) = convs["dense"]
  assert dense["groups"] == 1 and dense["kernel"] == (3, 3, channels // 8, channels // 8)


def test_a_probe_reports_every_case_with_its_convolutions_and_times():
  result = probe.probe(batch=2, size=8, channels=16, count=3)
  assert result["device"] == jax.devices()[0].device_kind and result["jax"] == jax.__version__
  assert (result["batch"], result["size"], result["channels"], result["count"]) == (
      2, 8, 16, 3)
  cases = result["cases"]
  assert [c["case"] for c in cases] == list(probe.CASES)
  # XLA:CPU keeps each convolution of the jaxpr as one instruction.
  assert [c["convolutions"] for c in cases] == [1, 1, 3, 1, 1]
  for case in cases:
    # The later run is the faster of two runs after the first; the overhead is what the
    # first took beyond it (negative where the first happened to be faster).
    assert case["compile_s"] > 0 and case["first_run_s"] >= 0 and case["later_run_s"] >= 0
    assert case["overhead_s"] == pytest.approx(case["first_run_s"] - case["later_run_s"],
                                               abs=2e-6)


def test_convolution_instructions_are_counted_in_gpu_and_cpu_programs():
  gpu = """
  %convolution.4 = f32[8]{0} fusion(f32[8]{0} %p), kind=kLoop, calls=%fused_convolution
  %cc.1 = (f32[2,8,8,4], u8[0]) custom-call(%a, %b), custom_call_target="__cudnn$convForward"
  %cc.2 = (f32[3,3,1,4], u8[0]) custom-call(%a, %g),
      custom_call_target="__cudnn$convBackwardFilter"
  %cc.3 = f32[8,8]{1,0} custom-call(%x, %y), custom_call_target="__cublas$gemm"
  """
  cpu = """
  %convolution.1 = f32[2,8,8,4]{3,2,1,0} convolution(%p0, %p1), window={size=3x3 pad=1_1x1_1},
      dim_labels=b01f_01io->b01f, feature_group_count=4
  %copy.convolution = f32[2,8,8,4]{3,2,1,0} copy(%convolution.1)
  """
  assert len(probe._CONVOLUTION.findall(gpu)) == 2
  assert len(probe._CONVOLUTION.findall(cpu)) == 1


@pytest.mark.parametrize("flags, message", [
    (["--count=9"], "--count=9: a DARTS cell's kernels have 8 distinct depthwise "
     "configurations; give 1 to 8"),
    (["--count=0"], "--count=0: a DARTS cell's kernels have 8 distinct depthwise "
     "configurations; give 1 to 8"),
    (["--channels=12"], "--channels=12: give a multiple of 8")])
def test_arguments_no_case_can_use_are_refused_with_the_fix(flags, message):
  out = subprocess.run([sys.executable, SCRIPT, "--batch=2", "--size=8", *flags],
                       capture_output=True, text=True, check=False, timeout=120)
  assert out.returncode == 2 and message in out.stderr and not out.stdout


def test_the_command_prints_one_json_line():
  out = subprocess.run([sys.executable, SCRIPT, "--batch=2", "--size=8", "--channels=8",
                        "--count=2"], capture_output=True, text=True, check=True,
                       timeout=300)
  (line,) = out.stdout.strip().splitlines()
  result = json.loads(line)
  assert [c["convolutions"] for c in result["cases"]] == [1, 1, 2, 1, 1]
  assert result["xla_flags"] == os.environ.get("XLA_FLAGS", "")
