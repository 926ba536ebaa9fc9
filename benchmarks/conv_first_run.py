"""How long a compiled convolution's first run takes on this machine's accelerator, beside
its later runs (a benchmark, not a test).

  python benchmarks/conv_first_run.py [--batch=64 --size=32 --channels=128 --count=8]

Why. The first H200 run of our reference-size DARTS step spent 46 s after its compile
with one CPU core busy and the GPU idle, during the first run of the architecture side's
gradient (379 cuDNN convolutions; `benchmarks/README.md`, "The first GPU run"). XLA builds
a convolution's cuDNN runner, its execution plan, at the instruction's first run, and
from cuDNN 9.10 finalising the plan of a depthwise convolution can compile a kernel then
(NVIDIA/cudnn-frontend#1066 reports about 1.5 s, once per process). This script says, in
seconds, whether that is so on this machine and at what grain, so that one GPU call
settles it (`device_check.py` runs it first).

Each case is one jitted program, compiled first (``compile_s``) and then run three times:
``first_run_s``, ``later_run_s`` (the faster of the next two) and ``overhead_s``, their
difference: what the first run costs beyond a run. ``convolutions`` counts the program's
convolution instructions (cuDNN calls on a GPU). The cases run in this order, each on
channel counts no earlier case used, except ``depthwise_again``:

- ``depthwise``: one depthwise 3x3 convolution (``feature_group_count`` = channels, as
  `functional._depthwise_conv_grouped` calls it);
- ``depthwise_again``: the same convolution in a program of its own: a new instruction of
  a configuration already run. An overhead near ``depthwise``'s means a plan a
  convolution instruction (the 46 s would then go with the step's number of
  convolutions); near 0, a plan a configuration, cached for the process (it would go
  with the number of distinct shapes);
- ``depthwise_distinct``: ``count`` depthwise convolutions of distinct configurations
  (kernel 3 or 5, dilation 1 or 2, stride 1 or 2, as in a DARTS cell on a CPU; on a GPU
  its 3x3 kernels now run zero-padded to 5x5 beside the 5x5 ones), in one program;
- ``depthwise_filter_grad``: the kernel gradient of a dilated depthwise convolution (XLA's
  form of it: a forward convolution whose window is as large as the image);
- ``dense``: a dense 3x3 convolution, for contrast.

Prints one JSON line: ``device``, ``jax``, ``xla_flags``, the sizes, and ``cases``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import time

CASES = ("depthwise", "depthwise_again", "depthwise_distinct", "depthwise_filter_grad",
         "dense")
# A DARTS cell's depthwise convolutions, each kernel on its own: (kernel, dilation, stride).
CONFIGS = tuple(itertools.product((3, 5), (1, 2), (1, 2)))
# A convolution instruction in an optimised program's text: a cuDNN call on a GPU, XLA's
# own op elsewhere.
_CONVOLUTION = re.compile(r'custom_call_target="__cudnn\$conv|\bconvolution\(')


def conv(x, kernel, stride: int = 1, dilation: int = 1, groups: int = 1):
  """A 'same' NHWC convolution of ``x`` with ``kernel[k, k, C_in / groups, C_out]``."""
  from jax import lax  # pylint: disable=g-import-not-at-top
  pad = dilation * (kernel.shape[0] - 1) // 2
  return lax.conv_general_dilated(
      x, kernel, (stride, stride), ((pad, pad), (pad, pad)), rhs_dilation=(dilation, dilation),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)


def check_arguments(channels: int, count: int) -> None:
  """Raises ValueError, naming the fix, for sizes no case can use."""
  if not 1 <= count <= len(CONFIGS):
    raise ValueError(f"--count={count}: a DARTS cell's kernels have {len(CONFIGS)} distinct "
                     f"depthwise configurations; give 1 to {len(CONFIGS)}")
  if channels < 8 or channels % 8:
    raise ValueError(f"--channels={channels}: give a multiple of 8 (the cases use "
                     "channels, channels / 2, / 4 and / 8)")


def programs(batch: int, size: int, channels: int, count: int):
  """``(case, function, arguments)`` for each of `CASES`, in order, on random arrays."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  check_arguments(channels, count)
  rng = np.random.default_rng(0)

  def array(*shape):
    return jax.block_until_ready(jax.device_put(rng.standard_normal(shape, np.float32)))

  image = lambda c: array(batch, size, size, c)
  c2, c4, c8 = channels // 2, channels // 4, channels // 8
  depthwise = lambda x, w: conv(x, w, groups=x.shape[-1])
  distinct = CONFIGS[:count]

  def several(xs, ws):
    return tuple(conv(x, w, s, d, x.shape[-1]) for x, w, (_, d, s) in zip(xs, ws, distinct))

  def filter_grad(x, w, g):
    _, pullback = jax.vjp(lambda w: conv(x, w, dilation=2, groups=x.shape[-1]), w)
    return pullback(g)[0]

  x1, w1 = image(channels), array(3, 3, 1, channels)
  return [
      ("depthwise", depthwise, (x1, w1)),
      # A function of its own: JAX compiles it anew, XLA gives it instructions of its own.
      ("depthwise_again", lambda x, w: conv(x, w, groups=x.shape[-1]), (x1, w1)),
      ("depthwise_distinct", several, (tuple(image(c2) for _ in distinct),
                                       tuple(array(k, k, 1, c2) for k, _, _ in distinct))),
      ("depthwise_filter_grad", filter_grad, (image(c4), array(3, 3, 1, c4), image(c4))),
      ("dense", conv, (image(c8), array(3, 3, c8, c8))),
  ]


def measure(function, arguments) -> dict:
  """One case: compile, then three runs, each waited for."""
  import jax  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  compiled = jax.jit(function).lower(*arguments).compile()
  compile_s = time.perf_counter() - start
  runs = []
  for _ in range(3):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*arguments))
    runs.append(time.perf_counter() - start)
  later = min(runs[1:])
  # To the microsecond: a small program's run on a CPU takes a few.
  return {"convolutions": len(_CONVOLUTION.findall(compiled.as_text())),
          "compile_s": round(compile_s, 6), "first_run_s": round(runs[0], 6),
          "later_run_s": round(later, 6), "overhead_s": round(runs[0] - later, 6)}


def probe(batch: int, size: int, channels: int, count: int) -> dict:
  """Every case, in order, in this process."""
  import jax  # pylint: disable=g-import-not-at-top
  cases = [{"case": name, **measure(function, arguments)}
           for name, function, arguments in programs(batch, size, channels, count)]
  return {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
          "xla_flags": os.environ.get("XLA_FLAGS", ""), "batch": batch, "size": size,
          "channels": channels, "count": count, "cases": cases}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--size", type=int, default=32)
  parser.add_argument("--channels", type=int, default=128,
                      help="the first cases' channels (8 edges of C=16, as the "
                      "reference-size supernet groups them)")
  parser.add_argument("--count", type=int, default=len(CONFIGS))
  args = parser.parse_args(argv)
  try:
    check_arguments(args.channels, args.count)
  except ValueError as error:
    parser.error(str(error))
  print(json.dumps(probe(args.batch, args.size, args.channels, args.count)), flush=True)


if __name__ == "__main__":
  main()
