"""Tests of benchmarks/gpu_compile.py, and through it of our networks on XLA's GPU and TPU
compilers: with the compilers installed (`gpu_compile.py --install`, which the README's
test command runs) the supernet and the network trained from scratch are compiled for an
H200, and the supernet and the search step for a TPU v5e chip, on this CPU machine."""

import collections
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import time

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import pytest

from configs import quickstart
from nanas_jax import spaces
from nanas_jax.nn import functional as F
from nanas_jax.nn.supernet import SearchNetwork
from nanas_jax.search.bilevel import BilevelSearch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SPEC = importlib.util.spec_from_file_location(
    "gpu_compile", os.path.join(ROOT, "benchmarks", "gpu_compile.py"))
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)

needs_the_cuda_compiler = pytest.mark.skipif(
    not os.path.isdir(os.path.join(bench.DEFAULT_PLUGIN_DIR, "jax_plugins")),
    reason="XLA's CUDA compiler is not installed: python benchmarks/gpu_compile.py --install")
needs_the_tpu_compiler = pytest.mark.skipif(
    not os.path.isdir(os.path.join(bench.DEFAULT_TPU_DIR, "libtpu")),
    reason="XLA's TPU compiler is not installed: python benchmarks/gpu_compile.py --install")


# Built in the child: ``fn`` is jitted on ``args`` (numpy arrays and variables).
_MODELS = {
    # Two reduction cells, the second after a reduction (its FactorizedReduce reads the
    # stem's activation at stride 2): XLA's GPU compiler aborted the process here, in its
    # Triton GEMM fusion (``triton_tiling_propagation.cc``), before the FactorizedReduce
    # read a 2x2-blocked view.
    "supernet": """
        from nanas_jax.nn.supernet import SearchNetwork
        model = SearchNetwork(num_classes=10, channels=2, layers=2, dw_impl="conv")
        images = np.zeros((2, 8, 8, 3), np.float32)
        weights = np.full((2, 14, 8), 1 / 8, np.float32)
        variables = model.init(jax.random.key(0), images, weights, train=True)
        fn = lambda v, w, x: model.apply(v, x, w, True, mutable=["batch_stats"])
        args = (variables, weights, images)
        """,
    # The network trained from scratch (DARTS_V2, auxiliary head, drop path): its
    # training gradient.
    "network": """
        from nanas_jax.nn.networks import NetworkCIFAR
        from nanas_jax.spaces import get_genotype
        model = NetworkCIFAR(genotype=get_genotype("DARTS_V2"), C=4, num_classes=10,
                             layers=3, auxiliary=True)
        images = np.zeros((2, 16, 16, 3), np.float32)
        variables = model.init(jax.random.key(0), images, train=False)

        def loss(params, stats, x, key):
          (logits, aux), _ = model.apply({"params": params, "batch_stats": stats}, x, True,
                                         drop_path_prob=0.2, mutable=["batch_stats"],
                                         rngs={"drop_path": jax.random.wrap_key_data(key)})
          return (logits ** 2).sum() + (aux ** 2).sum()

        fn = jax.grad(loss)
        args = (variables["params"], variables["batch_stats"], images,
                jax.random.key_data(jax.random.key(1)))
        """,
}


def _compiled_in_a_child(code: str, tpu: bool = False) -> str:
  """The standard output of ``code`` run in a child that compiles for an H200 (``jax``,
  ``np``, ``gpu_compile`` and ``on_gpu``, which places a tree's arrays on it, in scope),
  or with ``tpu`` for a TPU v5e chip (``on_tpu``)."""
  preamble = textwrap.dedent(f"""
      import functools, sys
      sys.path.insert(0, {os.path.join(ROOT, "benchmarks")!r})
      import jax, numpy as np
      import gpu_compile
      """) + (textwrap.dedent("""
      from jax.sharding import SingleDeviceSharding
      on_tpu = functools.partial(gpu_compile.abstract_on,
                                 SingleDeviceSharding(gpu_compile.tpu_chip("v5e:2x2")))
      """) if tpu else "on_gpu = gpu_compile.placer(gpu_compile.DEFAULT_TARGET)\n")
  plugin_dir = bench.DEFAULT_TPU_DIR if tpu else bench.DEFAULT_PLUGIN_DIR
  result = subprocess.run([sys.executable, "-c", preamble + textwrap.dedent(code)],
                          capture_output=True, text=True,
                          env=bench.compiler_environ(plugin_dir), cwd=ROOT, check=False)
  assert result.returncode == 0, bench.failure(result.stderr)
  return result.stdout


@needs_the_cuda_compiler
def test_taps_fused_leaves_cudnn_only_the_stems_convolution():
  """The supernet's training gradient compiled for an H200: with 'conv' every depthwise
  convolution is a cuDNN call (forward, and its gradients); with 'taps_fused' the only
  cuDNN convolutions left are the stem's (forward and filter gradient: its input is
  data), and no loop either (what XLA autotunes and cuDNN plans at a first run)."""
  stdout = _compiled_in_a_child("""
      import re
      from nanas_jax.nn.supernet import SearchNetwork
      images = np.zeros((2, 8, 8, 3), np.float32)
      weights = np.full((2, 14, 8), 1 / 8, np.float32)
      for impl in ("conv", "taps_fused"):
        model = SearchNetwork(num_classes=10, channels=2, layers=2, dw_impl=impl)
        variables = model.init(jax.random.key(0), images, weights, train=True)

        def loss(params, w, x):
          logits, _ = model.apply({**variables, "params": params}, x, w, True,
                                  mutable=["batch_stats"])
          return (logits ** 2).sum()

        args = (variables["params"], weights, images)
        text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*on_gpu(args)).compile().as_text()
        print(impl, len(re.findall(r'custom_call_target="__cudnn[$]conv', text)),
              len(re.findall(r" while[(]", text)))
      """)
  counts = {impl: (int(convs), int(loops)) for impl, convs, loops in
            (line.split() for line in stdout.splitlines())}
  assert counts["taps_fused"] == (2, 0)
  assert counts["conv"][0] > 20  # The control: every depthwise convolution is cuDNN's.


@needs_the_cuda_compiler
@pytest.mark.parametrize("model", sorted(_MODELS))
def test_compiles_for_an_h200_with_triton_gemms(model):
  """XLA's GPU compiler accepts the program, and its argument buffers hold exactly the
  program's inputs."""
  stdout = _compiled_in_a_child(textwrap.dedent(_MODELS[model]) + textwrap.dedent("""
      compiled = jax.jit(fn, keep_unused=True).lower(*on_gpu(args)).compile()
      print(compiled.memory_analysis().argument_size_in_bytes,
            sum(np.asarray(a).nbytes for a in jax.tree.leaves(args)))
      """))
  xla_bytes, input_bytes = map(int, stdout.split())
  assert xla_bytes == input_bytes


@needs_the_cuda_compiler
def test_the_loop_step_compiles_for_an_h200_with_a_conditional_a_gate(tmp_path, monkeypatch):
  """The smallest DARTS step compiled as a loop (``--compile=loop``: C=2, 2 cells, 8x8,
  batch 2, the inner nodes unrolled) for an H200: XLA's GPU compiler accepts it, and a run
  takes one conditional for each of the supernet's kernel gradient gates and one for the
  architecture update, in each of its two iterations (the gates counted here by tracing
  the same supernet); with each conditional's smallest branch it launches fewer kernels."""
  output = tmp_path / "rows.jsonl"
  subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_compile.py"),
                  "--algorithm=darts", "--compile=loop", "--channels=2", "--layers=2",
                  "--size=8", "--batch=2", "--inner_impl=unroll", "--no-side_by_side",
                  f"--output={output}"], check=True, cwd=ROOT, capture_output=True)
  (row,) = [json.loads(line) for line in output.read_text().splitlines()]
  assert "error" not in row, row.get("error")
  assert [p["name"] for p in row["programs"]] == ["step"]
  gates, gated = [], F.kernel_gated

  def counted(fn, x, kernels, kernel_grads=None):
    gates.append(kernel_grads)
    return gated(fn, x, kernels, kernel_grads)

  monkeypatch.setattr(F, "kernel_gated", counted)
  model = SearchNetwork(num_classes=10, channels=2, layers=2, dw_impl=row["depthwise_impl"],
                        inner_impl="unroll")
  images = jnp.zeros((2, 8, 8, 3))
  weights = jnp.full(spaces.get_space("darts").alpha_shape, 1 / 8)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), images, weights,
                                                train=True))
  gates.clear()
  jax.eval_shape(lambda v: model.apply(v, images, weights, train=True, mutable=["batch_stats"],
                                       kernel_grads=jnp.asarray(True)), variables)
  assert len(gates) > 10 and all(g is not None for g in gates)
  assert row["conditionals"] == 2 * (len(gates) + 1)
  assert row["smallest_branches"]["launches"] < row["launches"]


@needs_the_cuda_compiler
def test_a_search_without_autotuning_gives_xlas_gpu_compiler_cublas_matmuls():
  """The supernet (training mode) compiled for an H200 with the options of a search for a GPU
  (`bilevel.xla_compiler_options`): with ``gpu_autotune`` False its matmuls are cuBLAS
  calls, none a Triton fusion, where XLA's own settings (True) make them Triton's: XLA's
  GPU compiler takes the options by these names."""
  stdout = _compiled_in_a_child(textwrap.dedent(_MODELS["supernet"]) + textwrap.dedent("""
      import re
      from configs import quickstart
      from nanas_jax.search import bilevel
      config = quickstart.get_config().search
      for autotune in (False, True):
        config.gpu_autotune = autotune
        options = dict(bilevel.xla_compiler_options(config, "gpu")) or None
        text = jax.jit(fn, compiler_options=options).lower(*on_gpu(args)).compile().as_text()
        print(autotune, len(re.findall(r'custom_call_target="__cublas', text)),
              len(re.findall(r'"kind":"__triton', text)))
      """))
  counts = {autotune: (int(cublas), int(triton)) for autotune, cublas, triton in
            (line.split() for line in stdout.splitlines())}
  assert counts["False"][0] > 0 and counts["False"][1] == 0
  assert counts["True"][1] > 0  # The control: XLA's own settings give Triton's matmuls.


@needs_the_cuda_compiler
def test_kernel_launches_grow_with_a_loops_trip_count_and_kernels_do_not():
  """A loop of n iterations compiled for an H200: its launches are an affine function of
  n with a positive slope (each iteration launches its body's kernels), and the distinct
  kernels and library calls are the same for every n (XLA compiles the body once)."""
  stdout = _compiled_in_a_child("""
      import json
      import jax.numpy as jnp
      def loop(x, n):
        return jax.lax.scan(lambda c, _: (jnp.sin(c) @ c + 1.0, None), x, None, length=n)[0]
      x = jax.ShapeDtypeStruct((64, 64), jnp.float32)
      for n in (3, 5, 9):
        compiled = jax.jit(loop, static_argnums=1).lower(on_gpu(x), n).compile()
        print(json.dumps(gpu_compile.program_counts(compiled.as_text())[0]))
      """)
  counts = [json.loads(line) for line in stdout.splitlines()]
  launches = [c["launches"] for c in counts]
  assert launches[2] - launches[1] == 2 * (launches[1] - launches[0]) > 0
  assert len({(c["kernels"], c["library_calls"]) for c in counts}) == 1
  assert counts[0]["kernels"] + counts[0]["library_calls"] >= 2  # the sin, the matmul


def test_program_counts_of_a_module_by_hand():
  """A module written here: two fusions of equal bodies (one kernel), a library call and
  a copy in a loop of 5 iterations whose condition launches a compare."""
  hlo = textwrap.dedent("""\
      HloModule by_hand

      %fused_a (p: f32[4]) -> f32[4] {
        %p = f32[4]{0} parameter(0)
        ROOT %n = f32[4]{0} negate(%p), metadata={op_name="a"}
      }

      %fused_b (q: f32[4]) -> f32[4] {
        %q = f32[4]{0} parameter(0)
        ROOT %m = f32[4]{0} negate(%q), metadata={op_name="b"}
      }

      %body (t: (s32[], f32[4])) -> (s32[], f32[4]) {
        %t = (s32[], f32[4]{0}) parameter(0)
        %i = s32[] get-tuple-element(%t), index=0
        %v = f32[4]{0} get-tuple-element(%t), index=1
        %c = (f32[4]{0}, u8[0]{0}) custom-call(%v), custom_call_target="__cublas$gemm"
        %g = f32[4]{0} get-tuple-element(%c), index=0
        %k = f32[4]{0} copy(%g)
        ROOT %r = (s32[], f32[4]{0}) tuple(%i, %k)
      }

      %cond (u: (s32[], f32[4])) -> pred[] {
        %u = (s32[], f32[4]{0}) parameter(0)
        %j = s32[] get-tuple-element(%u), index=0
        %five = s32[] constant(5)
        ROOT %lt = pred[] compare(%j, %five), direction=LT
      }

      ENTRY %main (x: f32[4]) -> (s32[], f32[4]) {
        %x = f32[4]{0} parameter(0)
        %f1 = f32[4]{0} fusion(%x), kind=kLoop, calls=%fused_a
        %f2 = f32[4]{0} fusion(%f1), kind=kLoop, calls=%fused_b
        %zero = s32[] constant(0)
        %init = (s32[], f32[4]{0}) tuple(%zero, %f2)
        ROOT %w = (s32[], f32[4]{0}) while(%init), condition=%cond, body=%body, \
backend_config={"known_trip_count":{"n":"5"}}
      }
      """)
  counts, _ = bench.program_counts(hlo)
  assert {k: counts[k] for k in ("launches", "kernels", "library_calls")} == {
      "launches": 2 + 5 * (2 + 1), "kernels": 3, "library_calls": 1}
  # Without the trip count on the loop (as XLA's TPU compiler writes one), it is read
  # from the condition, i < 5; a condition of another form leaves it unknown.
  unknown = hlo.replace(', backend_config={"known_trip_count":{"n":"5"}}', "")
  assert "known_trip_count" not in unknown
  assert bench.program_counts(unknown)[0] == counts
  for other in ("direction=LE", "direction=GT"):
    with pytest.raises(ValueError, match="known trip count"):
      bench.program_counts(unknown.replace("direction=LT", other))
  with pytest.raises(ValueError, match="known trip count"):
    bench.program_counts(unknown.replace("constant(5)", "parameter(1)"))
  with pytest.raises(ValueError, match="ENTRY"):
    bench.program_counts("HloModule nothing\n")


def test_library_calls_shared_by_two_programs_count_once_among_distinct_calls():
  """Two modules written here: each calls a GEMM of the same shapes (other names and
  metadata, the same call to autotune) and one of its own; a program's calls are its
  distinct ones (a repeated call counts once)."""
  def module(own_n: int, repeats: int) -> str:
    calls = "\n".join(
        f'  %g{i} = (f32[8,8]{{1,0}}, s8[64]{{0}}) custom-call(%x, %x), '
        f'custom_call_target="__cublas$lt$matmul", metadata={{op_name="g{i}_{own_n}"}}'
        for i in range(repeats))
    return textwrap.dedent(f"""\
        HloModule m{own_n}

        ENTRY %main (x: f32[8,8]) -> f32[{own_n},8] {{
          %x = f32[8,8]{{1,0}} parameter(0)
        """) + calls + textwrap.dedent(f"""
          %c = (f32[{own_n},8]{{1,0}}, u8[0]{{0}}) custom-call(%x), window={{size=3x3}}, \
        custom_call_target="__cudnn$convForward"
          ROOT %r = f32[{own_n},8]{{1,0}} get-tuple-element(%c), index=0
        }}
        """)

  (first, first_calls), (second, second_calls) = (
      bench.program_counts(module(2, repeats=1)), bench.program_counts(module(4, repeats=3)))
  assert first["library_calls"] == second["library_calls"] == 2
  assert first["launches"] == 2 and second["launches"] == 4
  assert len(first_calls & second_calls) == 1
  assert bench.distinct_calls([first_calls, second_calls]) == 3
  assert bench.distinct_calls([first_calls, first_calls]) == 2
  assert bench.distinct_calls([]) == 0
  # The same output from operands of other shapes (a longer contraction): another call.
  longer = module(2, repeats=1).replace(
      "%x, %x), custom_call_target", "%y, %y), custom_call_target").replace(
      "ENTRY %main (x: f32[8,8])", "ENTRY %main (x: f32[8,8], y: f32[8,16])").replace(
      "  %x = f32[8,8]{1,0} parameter(0)\n",
      "  %x = f32[8,8]{1,0} parameter(0)\n  %y = f32[8,16]{1,0} parameter(1)\n")
  longer_counts, longer_calls = bench.program_counts(longer)
  assert longer_counts["library_calls"] == 2 and "f32[8,16]" in longer
  assert bench.distinct_calls([first_calls, longer_calls]) == 3


@pytest.mark.parametrize("scratch, target", [("u8", "__cudnn$convForward"),
                                             ("s8", "__cublas$lt$matmul")])
def test_bytes_moved_of_a_module_by_hand(scratch, target):
  """A fusion that reads a quarter of one input (a slice of its view in bfloat16) and all of
  another, and a library call with a 1 GiB scratch buffer (as XLA types a cuDNN call's and
  a cuBLASLt call's), each run twice by a loop: the fusion moves 64 + 4 + 64 MiB, the call
  64 + 4 + 64 MiB; the whole input and the scratch are not moved."""
  n = 2**20
  hlo = textwrap.dedent(f"""\
      HloModule moved

      %fused_slice (p: f32[{n},64], q: f32[{n}]) -> f32[{n},16] {{
        %p = f32[{n},64]{{1,0}} parameter(0)
        %v = f32[{n},4,16]{{2,1,0}} bitcast(%p)
        %nv = bf16[{n},4,16]{{2,1,0}} convert(%v)
        %sv = bf16[{n},1,16]{{2,1,0}} slice(%nv), slice={{[0:{n}], [1:2], [0:16]}}
        %sb = bf16[{n},16]{{1,0}} bitcast(%sv)
        %s = f32[{n},16]{{1,0}} convert(%sb)
        %q = f32[{n}]{{0}} parameter(1)
        %b = f32[{n},16]{{1,0}} broadcast(%q), dimensions={{0}}
        ROOT %a = f32[{n},16]{{1,0}} add(%s, %b)
      }}

      %body (t: (f32[{n},64], f32[{n}])) -> (f32[{n},64], f32[{n}]) {{
        %t = (f32[{n},64]{{1,0}}, f32[{n}]{{0}}) parameter(0)
        %x = f32[{n},64]{{1,0}} get-tuple-element(%t), index=0
        %y = f32[{n}]{{0}} get-tuple-element(%t), index=1
        %f = f32[{n},16]{{1,0}} fusion(%x, %y), kind=kLoop, calls=%fused_slice
        %c = (f32[{n},16]{{1,0}}, {scratch}[1073741824]{{0}}) custom-call(%f, %y), \
custom_call_target="{target}"
        ROOT %r = (f32[{n},64]{{1,0}}, f32[{n}]{{0}}) tuple(%x, %y)
      }}

      %cond (u: (f32[{n},64], f32[{n}])) -> pred[] {{
        %u = (f32[{n},64]{{1,0}}, f32[{n}]{{0}}) parameter(0)
        ROOT %no = pred[] constant(false)
      }}

      ENTRY %main (x: f32[{n},64], y: f32[{n}]) -> (f32[{n},64], f32[{n}]) {{
        %x = f32[{n},64]{{1,0}} parameter(0)
        %y = f32[{n}]{{0}} parameter(1)
        %init = (f32[{n},64]{{1,0}}, f32[{n}]{{0}}) tuple(%x, %y)
        ROOT %w = (f32[{n},64]{{1,0}}, f32[{n}]{{0}}) while(%init), condition=%cond, \
body=%body, backend_config={{"known_trip_count":{{"n":"2"}}}}
      }}
      """)
  counts, _ = bench.program_counts(hlo)
  assert counts["launches"] == 4
  assert counts["gb_moved"] == round(2 * 2 * (64 + 4 + 64) / 1024, 3)


def test_memory_bandwidth_is_the_targets(tmp_path):
  assert bench.memory_bandwidth(bench.DEFAULT_TARGET) == 4.8e12
  target = tmp_path / "bare.txtpb"
  target.write_text("gpu_device_info { core_count: 1 }\n")
  with pytest.raises(ValueError, match="memory_bandwidth"):
    bench.memory_bandwidth(str(target))


def test_a_dead_child_is_reported_by_its_check_failure():
  stderr = ("I0000 cudart_stub.cc:31] Could not find cuda drivers\n"
            "F1203 06:38:52.324381 1865 triton_tiling_propagation.cc:627] Check failed: "
            "subdim_size_accumulator == dim_size (16 vs. 8) \n"
            "*** Check failure stack trace: ***\n    @ 0x7f9caf1fe2a5 xla::Foo()\n")
  assert bench.failure(stderr) == "Check failed: subdim_size_accumulator == dim_size (16 vs. 8) "
  assert bench.failure("Traceback\nValueError: bad\n") == "ValueError: bad"


def test_a_dead_childs_row_names_its_configuration(tmp_path, monkeypatch):
  """A child that died (XLA found the program too large for the chip) gives a row that
  says which configuration it was, on a TPU with the TPU's depthwise convolutions."""
  (tmp_path / "libtpu").mkdir()
  stderr = ("jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED: Ran out of memory on HBM, the "
            "total memory required for HLO temporaries (43.19G) exceeds available HBM\n")
  monkeypatch.setattr(bench.subprocess, "run", lambda cmd, **kwargs: (
      subprocess.CompletedProcess(cmd, 1, stdout="", stderr=stderr)))
  output = tmp_path / "rows.jsonl"
  bench.main(["--tpu=v5e:2x2", f"--tpu_dir={tmp_path}", "--algorithm=na_darts", "--chunk=0",
              "--preset=reference", f"--output={output}"])
  (row,) = [json.loads(line) for line in output.read_text().splitlines()]
  assert row["target"] == "tpu v5e:2x2" and row["error"] == stderr.strip()
  assert {k: row[k] for k in ("space", "algorithm", "chunk", "depthwise_impl", "dtype",
                              "batch")} == {
      "space": "darts", "algorithm": "na_darts", "chunk": 0, "depthwise_impl": "conv_each",
      "dtype": "float32", "batch": 64}


def test_programs_are_listed_once_however_often_the_step_calls_them():
  """The second order evaluates the architecture gradient at w+ and at w- with the same
  program: the trace calls it twice, the list holds it once, as jit compiles it once, and
  says it runs twice a step."""
  config = quickstart.get_config().search
  config.order, config.compile, config.warmup_epochs = "second_fd", "shared", 0
  search = BilevelSearch(SearchNetwork(num_classes=10, channels=2, layers=1),
                         spaces.get_space("darts"), config, steps_per_epoch=10)
  state = search.init(jax.random.key(0), np.zeros((1, 8, 8, 1), np.float32))
  batch = (np.zeros((2, 8, 8, 1), np.float32), np.zeros((2,), np.int32))
  calls = [e.params["name"] for e in jax.make_jaxpr(search.step)(state, batch, batch).eqns
           if e.primitive.name in ("jit", "pjit")]
  programs = bench.step_programs(search.step, (state, batch, batch))
  names = [name for name, _, _ in programs]
  assert set(calls) == set(names)
  # Two points of the finite difference, the same architecture-side program.
  arch = "supernet_value_and_weights_grad"
  assert calls.count(arch) == 2 and names.count(arch) == 1
  assert {name: n for name, _, n in programs} == {name: calls.count(name) for name in names}


def test_programs_of_one_name_and_inputs_but_other_outputs_are_two():
  twice = jax.jit(lambda x: x * 2)
  both = jax.jit(lambda x: (x, x * 2))
  programs = bench.step_programs(lambda x: (twice(x), both(x), twice(x)),
                                 (np.zeros(3, np.float32),))
  assert [(name, calls) for name, _, calls in programs] == [("<lambda>", 2), ("<lambda>", 1)]


def test_refuses_to_run_without_the_compiler(tmp_path):
  with pytest.raises(SystemExit, match="--install"):
    bench.main([f"--plugin_dir={tmp_path}"])


@pytest.mark.parametrize("flags", ["", "--xla_gpu_enable_triton_gemm=false"])
def test_a_row_compiled_under_xla_flags_carries_them(tmp_path, monkeypatch, capsys, flags):
  """The children inherit XLA_FLAGS; the row says what they were (none: no field)."""
  (tmp_path / "jax_plugins").mkdir()
  seen = []

  def fake_child(cmd, env, **kwargs):
    del kwargs
    seen.append(env.get("XLA_FLAGS", ""))
    return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps({"compile_s": 1.0}) + "\n")

  monkeypatch.setenv("XLA_FLAGS", flags)
  monkeypatch.setattr(bench.subprocess, "run", fake_child)
  output = tmp_path / "rows.jsonl"
  bench.main([f"--plugin_dir={tmp_path}", "--algorithm=darts", f"--output={output}"])
  (row,) = [json.loads(line) for line in output.read_text().splitlines()]
  assert seen == [flags] and row["compile_s"] == 1.0
  assert row.get("xla_flags") == (flags or None)
  assert json.loads(capsys.readouterr().out) == row


def test_the_children_are_given_the_profile_directory(tmp_path, monkeypatch):
  (tmp_path / "jax_plugins").mkdir()
  commands = []

  def fake_child(cmd, env, **kwargs):
    del env, kwargs
    commands.append(cmd)
    return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps({"compile_s": 1.0}) + "\n")

  monkeypatch.setattr(bench.subprocess, "run", fake_child)
  bench.main([f"--plugin_dir={tmp_path}", f"--profile={tmp_path / 'traces'}"])
  bench.main([f"--plugin_dir={tmp_path}", "--algorithm=darts"])
  assert [[a for a in cmd if a.startswith("--profile")] for cmd in commands] == [
      [f"--profile={tmp_path / 'traces'}"]] * 2 + [[]]


def test_the_neighbors_per_pass_default_to_what_auto_takes_on_the_target(tmp_path,
                                                                        monkeypatch):
  """Without ``--chunk`` the children compile NA-DARTS's neighbors one a pass for a TPU
  with its depthwise convolutions, as ``neighbors.evaluate='auto'`` does there, and all
  at once for a GPU or with a GPU's convolutions; a chunk given is passed as given."""
  (tmp_path / "jax_plugins").mkdir()
  (tmp_path / "libtpu").mkdir()
  commands = []
  monkeypatch.setattr(bench.subprocess, "run", lambda cmd, **kwargs: commands.append(cmd) or (
      subprocess.CompletedProcess(cmd, 0, stdout=json.dumps({"compile_s": 1.0}) + "\n")))
  for extra in (["--tpu=v5e:2x2"], ["--tpu=v5e:2x2", "--depthwise_impl=conv"], [],
                ["--tpu=v5e:2x2", "--chunk=2"]):
    bench.main([f"--plugin_dir={tmp_path}", f"--tpu_dir={tmp_path}", "--algorithm=na_darts",
                *extra])
  assert [[a for a in cmd if a.startswith("--chunk")] for cmd in commands] == [
      ["--chunk=1"], ["--chunk=0"], ["--chunk=0"], ["--chunk=2"]]
  # The space reaches the children too (NAS-Bench-201's supernet: `search_step.build_search`).
  bench.main([f"--plugin_dir={tmp_path}", "--space=nb201", "--algorithm=darts"])
  assert "--space=nb201" in commands[-1] and "--space=darts" in commands[0]


@needs_the_cuda_compiler
def test_refuses_a_missing_target(tmp_path):
  with pytest.raises(SystemExit, match="GpuTargetConfigProto"):
    bench.main([f"--target={tmp_path / 'nope.txtpb'}"])


def test_side_by_side_compiles_programs_on_side_threads_started_first():
  """Four programs of 0.4 s each, the second and the fourth compiled ahead: they are
  lowered first and compiled on threads of their own, the others in order on this one;
  the wall time is about two programs', not four."""
  events = []

  class Lowered:
    def __init__(self, i):
      self.i = i

    def compile(self):
      events.append(("compile", self.i, threading.current_thread() is threading.main_thread()))
      time.sleep(0.4)

  def lowering(i):
    return lambda: events.append(("lower", i)) or Lowered(i)

  seconds = bench.side_by_side_s([lowering(i) for i in range(4)], ahead=[1, 3])
  assert [e for e in events if e[0] == "lower"][:2] == [("lower", 1), ("lower", 3)]
  assert ("compile", 1, False) in events and ("compile", 3, False) in events
  assert [e for e in events if e[0] == "compile" and e[2]] == [("compile", 0, True),
                                                               ("compile", 2, True)]
  assert 0.8 <= seconds < 1.2


def test_program_counts_sums_a_tpu_programs_estimated_cycles_by_hand():
  """A module written here as XLA's TPU compiler writes one, each instruction with its
  estimated cycles but one: a fusion (100) before a loop of 3 iterations whose body runs
  a fusion (10), a copy (5) and a reduce-window without an estimate, and a conditional of
  two branches (7 and 40 cycles): the step's cycles are 100 + 3 * (10 + 5) + 40, the
  largest branch counted, and the reduce-window is counted as unestimated 3 times; a
  GPU's module (no estimates) has no such counts."""
  cfg = lambda n: f'backend_config={{"flag_configs":[],"estimated_cycles":"{n}"}}'
  hlo = textwrap.dedent(f"""\
      HloModule tpu_like

      %fused (p: f32[8]) -> f32[8] {{
        %p = f32[8]{{0}} parameter(0)
        ROOT %n = f32[8]{{0}} negate(%p)
      }}

      %body (t: f32[8]) -> f32[8] {{
        %t = f32[8]{{0}} parameter(0)
        %f = f32[8]{{0}} fusion(%t), kind=kLoop, calls=%fused, {cfg(10)}
        %k = f32[8]{{0}} copy(%f), {cfg(5)}
        %z = f32[] constant(0)
        ROOT %m = f32[8]{{0}} reduce-window(%k, %z), window={{size=3 pad=1_1}}, to_apply=%max
      }}

      %max (l: f32[], r: f32[]) -> f32[] {{
        %l = f32[] parameter(0)
        %r = f32[] parameter(1)
        ROOT %y = f32[] maximum(%l, %r)
      }}

      %cond (u: f32[8]) -> pred[] {{
        %u = f32[8]{{0}} parameter(0)
        ROOT %no = pred[] constant(false)
      }}

      %small (a: f32[8]) -> f32[8] {{
        %a = f32[8]{{0}} parameter(0)
        ROOT %c = f32[8]{{0}} copy(%a), {cfg(7)}
      }}

      %large (b: f32[8]) -> f32[8] {{
        %b = f32[8]{{0}} parameter(0)
        ROOT %d = f32[8]{{0}} fusion(%b), kind=kLoop, calls=%fused, {cfg(40)}
      }}

      ENTRY %main (x: f32[8], i: s32[]) -> f32[8] {{
        %x = f32[8]{{0}} parameter(0)
        %i = s32[] parameter(1)
        %g = f32[8]{{0}} fusion(%x), kind=kLoop, calls=%fused, {cfg(100)}
        %w = f32[8]{{0}} while(%g), condition=%cond, body=%body, \
backend_config={{"known_trip_count":{{"n":"3"}}}}
        ROOT %r = f32[8]{{0}} conditional(%i, %w, %w), branch_computations={{%small, %large}}
      }}
      """)
  counts, _ = bench.program_counts(hlo)
  assert counts["estimated_cycles"] == 100 + 3 * (10 + 5) + 40
  assert counts["unestimated"] == {"reduce-window": 3}
  assert counts["launches"] == 1 + 3 * 3 + 1
  without = re.sub(r', backend_config=\{"flag_configs":\[\],"estimated_cycles":"\d+"\}', "", hlo)
  assert not {"estimated_cycles", "unestimated"} & set(bench.program_counts(without)[0])


def test_program_counts_counts_the_conditionals_a_run_takes_by_hand():
  """A module written here: a conditional in a loop of 4 iterations, then one whose larger
  branch holds another: 4 + 1 + 1 conditionals a run (each one's predicate is read back to
  the host on a GPU), none in a module without them; the counts with each conditional's
  smallest branch besides, the bounds of what a run launches."""
  hlo = textwrap.dedent("""\
      HloModule gated

      %fused (p: f32[8]) -> f32[8] {
        %p = f32[8]{0} parameter(0)
        ROOT %n = f32[8]{0} negate(%p)
      }

      %small (a: f32[8]) -> f32[8] {
        %a = f32[8]{0} parameter(0)
        ROOT %c = f32[8]{0} copy(%a)
      }

      %large (b: f32[8]) -> f32[8] {
        %b = f32[8]{0} parameter(0)
        %f = f32[8]{0} fusion(%b), kind=kLoop, calls=%fused
        ROOT %d = f32[8]{0} copy(%f)
      }

      %nested (e: f32[8]) -> f32[8] {
        %e = f32[8]{0} parameter(0)
        %h = f32[8]{0} fusion(%e), kind=kLoop, calls=%fused
        %q = pred[] constant(true)
        ROOT %k = f32[8]{0} conditional(%q, %h, %h), true_computation=%large, \
false_computation=%small
      }

      %body (t: (pred[], f32[8])) -> (pred[], f32[8]) {
        %t = (pred[], f32[8]{0}) parameter(0)
        %b = pred[] get-tuple-element(%t), index=0
        %v = f32[8]{0} get-tuple-element(%t), index=1
        %g = f32[8]{0} conditional(%b, %v, %v), true_computation=%large, \
false_computation=%small
        ROOT %r = (pred[], f32[8]{0}) tuple(%b, %g)
      }

      %cond (u: (pred[], f32[8])) -> pred[] {
        %u = (pred[], f32[8]{0}) parameter(0)
        ROOT %no = pred[] constant(false)
      }

      ENTRY %main (x: f32[8], b: pred[], i: s32[]) -> f32[8] {
        %x = f32[8]{0} parameter(0)
        %b = pred[] parameter(1)
        %i = s32[] parameter(2)
        %init = (pred[], f32[8]{0}) tuple(%b, %x)
        %w = (pred[], f32[8]{0}) while(%init), condition=%cond, body=%body, \
backend_config={"known_trip_count":{"n":"4"}}
        %y = f32[8]{0} get-tuple-element(%w), index=1
        ROOT %r = f32[8]{0} conditional(%i, %y, %y), branch_computations={%small, %nested}
      }
      """)
  counts, _ = bench.program_counts(hlo)
  assert counts["conditionals"] == 4 + 1 + 1
  assert counts["launches"] == 4 * 2 + (1 + 2)
  # With each conditional's smallest branch: the copies, and %small at the end.
  assert counts["smallest_branches"].keys() == {"launches", "gb_moved"}
  assert counts["smallest_branches"]["launches"] == 4 * 1 + 1
  plain = "HloModule plain\n\nENTRY %main (x: f32[8]) -> f32[8] {\n" \
      "  %x = f32[8]{0} parameter(0)\n  ROOT %c = f32[8]{0} copy(%x)\n}\n"
  assert bench.program_counts(plain)[0]["conditionals"] == 0
  assert "smallest_branches" not in bench.program_counts(plain)[0]


def test_the_v5e_clock_is_its_published_peak_over_its_mxus():
  """197 TFLOP/s of bfloat16 (Google's figure for a v5e chip) from 4 MXUs of 128 x 128
  multiply-adds a cycle: 1.503 GHz."""
  assert bench.CLOCK_GHZ["TPU v5 lite"] == pytest.approx(1.503, abs=5e-4)


def test_libtpu_is_the_one_the_installed_jax_asks_for(monkeypatch):
  """``--install`` puts both compilers in their folders: the CUDA plugin of jaxlib's
  version, and the libtpu that jax's own metadata names for ``jax[tpu]``."""
  from importlib import metadata
  wanted = [r.split(";")[0].strip().replace(" ", "") for r in metadata.requires("jax")
            if r.startswith("libtpu") and "tpu" in r.split(";")[1]]
  assert [bench.libtpu_requirement()] == wanted
  commands = []
  monkeypatch.setattr(bench.subprocess, "run", lambda cmd, **kwargs: commands.append(cmd))
  bench.main(["--install", "--plugin_dir=/p", "--tpu_dir=/t"])
  assert [cmd[cmd.index("--target") + 1:] for cmd in commands] == [
      ["/p", *bench.plugin_requirements(jaxlib.__version__)], ["/t", *wanted]]


def test_refuses_to_compile_for_a_tpu_without_its_compiler(tmp_path):
  with pytest.raises(SystemExit, match="TPU compiler .*--install"):
    bench.main(["--tpu=v5e:2x2", f"--tpu_dir={tmp_path}"])


@needs_the_tpu_compiler
def test_tpu_estimates_are_no_faster_than_the_chips_published_peaks():
  """Compiled for a v5e chip: the estimated time (cycles at `CLOCK_GHZ`) of a large
  bfloat16 matmul is no less than its FLOPs at 197 TFLOP/s and within 1.5x of it (XLA
  expects a matmul this large near the MXUs' peak); that of adding two vectors of 2^26
  floats is no less than its 768 MiB at the chip's 819 GB/s of HBM bandwidth, and within
  3x of it. A clock set too fast would break the first bound, one too slow the second."""
  stdout = _compiled_in_a_child("""
      import json
      import jax.numpy as jnp
      m, n = 8192, 2**26
      x = jax.ShapeDtypeStruct((m, m), jnp.bfloat16)
      v = jax.ShapeDtypeStruct((n,), jnp.float32)
      for fn, args in ((jnp.matmul, (x, x)), (jnp.add, (v, v))):
        text = jax.jit(fn).lower(*on_tpu(args)).compile().as_text()
        print(gpu_compile.program_counts(text)[0]["estimated_cycles"])
      """, tpu=True)
  matmul_s, add_s = (int(c) / (bench.CLOCK_GHZ["TPU v5 lite"] * 1e9)
                     for c in stdout.split())
  assert 1 <= matmul_s / (2 * 8192**3 / 197e12) <= 1.5
  assert 1 <= add_s / (3 * 2**26 * 4 / 819e9) <= 3


@needs_the_tpu_compiler
def test_the_search_step_compiles_for_a_tpu_v5e_chip(tmp_path):
  """The smallest search step (DARTS, C=2, 2 cells, 8x8, batch 2) compiled by XLA's TPU
  compiler for one v5e chip, with the TPU's depthwise convolutions: every program
  compiles, each program's estimated cycles, and its count of instructions left
  unestimated, sum to the row's, and its time at the chip's clock is the row's estimate;
  XLA's buffer assignment gives both supernet gradients memory."""
  output = tmp_path / "rows.jsonl"
  subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_compile.py"),
                  "--tpu=v5e:2x2", "--algorithm=darts", "--channels=2", "--layers=2",
                  "--size=8", "--batch=2", "--no-side_by_side", f"--output={output}"],
                 check=True, cwd=ROOT, capture_output=True)
  (row,) = [json.loads(line) for line in output.read_text().splitlines()]
  assert "error" not in row, row.get("error")
  assert row["target"] == "tpu v5e:2x2" and row["chip"] == "TPU v5 lite"
  assert row["depthwise_impl"] == "conv_each"  # What 'auto' picks on a TPU.
  assert row["estimated_cycles"] == sum(p["calls"] * p.get("estimated_cycles", 0)
                                        for p in row["programs"]) > 0
  unestimated = collections.Counter()
  for p in row["programs"]:
    unestimated.update({op: p["calls"] * n for op, n in p["unestimated"].items()})
  assert row["unestimated"] == dict(unestimated) and unestimated["copy-start"] > 0
  # XLA's TPU compiler estimates no reduce-window; on a TPU the average pools are sums of
  # their windows (`functional.avg_pool_3x3`), and so in the estimate.
  assert "reduce-window" not in unestimated
  assert row["estimated_ms"] == round(
      row["estimated_cycles"] / bench.CLOCK_GHZ["TPU v5 lite"] / 1e6, 2)
  gradients = [p for p in row["programs"] if p["name"].startswith("supernet_value_and")]
  assert len(gradients) == 2 and all(p["gb"] > 0 for p in gradients)
  assert "traffic_ms" not in row and "side_by_side_s" not in row


@needs_the_tpu_compiler
def test_tpu_layout_puts_the_batch_minor_and_cuts_xlas_estimate():
  """A cell's 4 input edges (MixedEdges, 64 images of 8x8, C=4) and their gradient,
  compiled for a v5e chip: with `F.tpu_layout` the edges' activations lie batch-minor (the
  64 rows pad 2x on the 128 lanes, the 8 columns 16x, the 4 channels 32x) and XLA's
  estimated cycles are less than a third of those of the same program left to XLA's own
  layouts (4.7x fewer when written), which holds no batch-minor activation."""
  stdout = _compiled_in_a_child("""
      import re
      from nanas_jax.nn import functional as F
      from nanas_jax.nn.supernet import MixedEdges
      edges = MixedEdges(4, 4, 1, "conv_each", sources=(0, 1) * 2)
      xs = np.zeros((2, 64, 8, 8, 4), np.float32)
      weights = np.full((4, 8), 1 / 8, np.float32)
      variables = edges.init(jax.random.key(0), xs, weights, True)

      def loss(params, xs):
        out, _ = edges.apply({**variables, "params": params}, xs, weights, True,
                             mutable=["batch_stats"])
        return (out ** 2).sum()

      pinned = F.tpu_layout
      for layout in (pinned, lambda x, impl: x):
        F.tpu_layout = layout
        text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(
            *on_tpu((variables["params"], xs))).compile().as_text()
        print(gpu_compile.program_counts(text)[0]["estimated_cycles"],
              len(re.findall(r"f32\\[4,64,8,8,4\\]\\{1,4,3,2,0:", text)))
      """, tpu=True)
  (pinned, pinned_batch_minor), (own, own_batch_minor) = (
      map(int, line.split()) for line in stdout.splitlines())
  assert pinned_batch_minor > 0 and own_batch_minor == 0
  assert 0 < pinned < own / 3
