"""Times a PyTorch reference search step (DARTS's or NAS-Bench-201's) on this machine.

DARTS's reference is quark0/darts ``cnn/``; NAS-Bench-201's is D-X-Y/AutoDL-Projects's
``DARTS-V1`` (first order) and ``DARTS-V2`` (second order).

The reference code is read from a path given as an argument and never copied here:

  python benchmarks/reference_step.py --reference=PATH/TO/darts/cnn --order=first \\
      --batch=64 --channels=16 --layers=8 --size=32 [--steps=3] [--threads=2]
  python benchmarks/reference_step.py --space=nb201 --reference=PATH/TO/AutoDL-Projects \\
      --order=second --batch=64 --channels=16 --layers=5 --size=32

One DARTS step is the reference's ``train_search.train`` body: ``architect.step`` (first
order, or the unrolled second order by finite differences) on a validation batch, then the
weight step (SGD lr 0.025, momentum 0.9, weight decay 3e-4, gradient clip 5) on a training
batch. One NAS-Bench-201 step is the body of AutoDL-Projects's
``exps/NAS-Bench-201-algos/DARTS-V1.py`` ``search_func``: the weight step (SGD lr 0.025,
Nesterov momentum 0.9, weight decay 5e-4, gradient clip 5, its ``DARTS.config``) on a
training batch, then the architecture step (Adam lr 3e-4, betas 0.5 and 0.999, weight
decay 1e-3) on a validation batch, with its ``TinyNetworkDarts`` of ``--layers`` cells a
stage (``affine=False``, running statistics tracked: ``DARTS-V1.sh``'s ``BN=1``). Its
second order is ``DARTS-V2.py``'s: the architecture step by ``backward_step_unrolled``
(DARTS's finite differences), then the weight step. That file is a script whose imports
need torchvision, the datasets and NAS-Bench-201's API, none of which the step uses, so
its three step functions are compiled from its source alone (`reference_functions`).
Both run on random CIFAR-sized data.
Prints one JSON row in `search_step.py`'s format with ``impl = 'pytorch_reference'``:
first step (the first call, including cuDNN autotuning on a GPU), the median of the next
steps, peak memory (GPU: ``max_memory_allocated``; CPU: the process's maximum resident
set).

quark0/darts hard-codes ``.cuda()`` and uses PyTorch 0.3's argument orders; on a machine
without a GPU ``.cuda()`` becomes a no-op, and the old ``add_(value, tensor)`` orders are
translated at run time (`_torch_compat`). Nothing in the reference's computation changes.
"""

from __future__ import annotations

import argparse
import ast
import copy
import importlib
import json
import os
import resource
import statistics
import sys
import time
import types

import numpy as np


def _torch_compat(torch) -> None:
  """PyTorch 0.3's ``x.add_(value, other)`` (and ``sub``/``sub_``) as today's
  ``x.add_(other, alpha=value)``, and ``.cuda()`` as a no-op without a GPU."""

  def reorder(method):
    def call(self, *args, **kwargs):
      if len(args) == 2 and not kwargs and isinstance(args[1], torch.Tensor):
        value, other = args
        return method(self, other, alpha=float(value))
      return method(self, *args, **kwargs)
    return call

  for name in ("add_", "sub_", "sub", "add"):
    setattr(torch.Tensor, name, reorder(getattr(torch.Tensor, name)))
  if not torch.cuda.is_available():
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self


REFERENCE_FILES = ("model_search.py", "architect.py", "operations.py", "genotypes.py")
# NAS-Bench-201's reference: the folder that holds AutoDL-Projects's package.
NB201_REFERENCE_FILES = ("xautodl/models/cell_searchs/search_model_darts.py",
                         "xautodl/models/cell_searchs/search_cells.py",
                         "xautodl/models/cell_operations.py")
# Per space: the files its reference holds, what the folder is, and how to get it.
REFERENCES = {
    "darts": (REFERENCE_FILES, "quark0/darts's cnn/ directory",
              "Clone https://github.com/quark0/darts and pass --reference=PATH/TO/darts/cnn."),
    "nb201": (NB201_REFERENCE_FILES, "D-X-Y/AutoDL-Projects's root",
              "Clone https://github.com/D-X-Y/AutoDL-Projects and pass "
              "--reference=PATH/TO/AutoDL-Projects (the folder that holds xautodl/)."),
}


# AutoDL-Projects's second order on NAS-Bench-201: a script, and the functions of it that
# make the architecture step.
NB201_SECOND_ORDER_FILE = "exps/NAS-Bench-201-algos/DARTS-V2.py"
NB201_SECOND_ORDER_FUNCTIONS = ("_concat", "_hessian_vector_product", "backward_step_unrolled")


def check_reference(path: str, space: str = "darts", order: str = "first") -> str:
  """The absolute path of the reference for ``space`` (quark0/darts's ``cnn/`` directory,
  or AutoDL-Projects's root for ``'nb201'``) and ``order``, or ValueError naming what is
  missing and how to get it (before torch is imported or anything is timed)."""
  files, what, fix = REFERENCES[space]
  if space == "nb201" and order == "second":
    files += (NB201_SECOND_ORDER_FILE,)
  missing = [name for name in files if not os.path.isfile(os.path.join(path, name))]
  if missing:
    raise ValueError(f"--reference={path} is not {what}: it lacks {', '.join(missing)}. "
                     f"{fix}")
  return os.path.abspath(path)


def reference_functions(path: str, names, namespace: dict) -> types.SimpleNamespace:
  """The top-level functions ``names`` of the Python file ``path``, compiled from its source
  into ``namespace`` (their globals) without running the rest of the file, its imports
  included; ValueError naming those it does not define."""
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), path)
  found = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
  missing = [name for name in names if name not in found]
  if missing:
    raise ValueError(f"{path} defines no top-level {', '.join(missing)}, which the step "
                     "calls: is it the reference's file, at a version that has them?")
  exec(compile(ast.Module(body=[found[name] for name in names], type_ignores=[]), path,
               "exec"), namespace)
  return types.SimpleNamespace(**{name: namespace[name] for name in names})


def _darts_step(args, torch, nn, device):
  """quark0/darts's search step: the architecture step, then the weight step."""
  _torch_compat(torch)
  model_search = importlib.import_module("model_search")
  architect_lib = importlib.import_module("architect")
  criterion = nn.CrossEntropyLoss().to(device)
  model = model_search.Network(args.channels, 10, args.layers, criterion).to(device)
  optimizer = torch.optim.SGD(model.parameters(), 0.025, momentum=0.9, weight_decay=3e-4)
  hyper = types.SimpleNamespace(momentum=0.9, weight_decay=3e-4, arch_learning_rate=3e-4,
                                arch_weight_decay=1e-3)
  architect = architect_lib.Architect(model, hyper)

  def step(x, y, vx, vy):
    architect.step(x, y, vx, vy, 0.025, optimizer, unrolled=args.order == "second")
    optimizer.zero_grad()
    loss = criterion(model(x), y)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 5.0)
    optimizer.step()

  return step


def _nb201_step(args, torch, nn, device):
  """AutoDL-Projects's step on NAS-Bench-201: DARTS-V1's (the weight step, then the
  architecture step) or DARTS-V2's (the architecture step by finite differences, then the
  weight step)."""
  models = importlib.import_module("xautodl.models")
  space = models.get_search_spaces("cell", "nas-bench-201")
  model = models.get_cell_based_tiny_net(dict(
      name="DARTS-V1", C=args.channels, N=args.layers, max_nodes=4, num_classes=10,
      space=space, affine=False, track_running_stats=True)).to(device)
  criterion = nn.CrossEntropyLoss().to(device)
  w_optimizer = torch.optim.SGD(model.get_weights(), 0.025, momentum=0.9,
                                weight_decay=5e-4, nesterov=True)
  a_optimizer = torch.optim.Adam(model.get_alphas(), lr=3e-4, betas=(0.5, 0.999),
                                 weight_decay=1e-3)

  def weight_step(network, x, y):
    w_optimizer.zero_grad()
    criterion(network(x)[1], y).backward()
    nn.utils.clip_grad_norm_(network.parameters(), 5.0)
    w_optimizer.step()

  if args.order == "first":
    def step(x, y, vx, vy):
      weight_step(model, x, y)
      a_optimizer.zero_grad()
      criterion(model(vx)[1], vy).backward()
      a_optimizer.step()

    return step
  _torch_compat(torch)
  v2 = reference_functions(os.path.join(args.reference, NB201_SECOND_ORDER_FILE),
                           NB201_SECOND_ORDER_FUNCTIONS,
                           {"torch": torch, "np": np, "deepcopy": copy.deepcopy})
  # DARTS-V2 reads the model through the DataParallel wrapper it runs in (``.module``).
  network = nn.DataParallel(model)

  def step(x, y, vx, vy):
    a_optimizer.zero_grad()
    v2.backward_step_unrolled(network, criterion, x, y, w_optimizer, vx, vy)
    a_optimizer.step()
    weight_step(network, x, y)

  return step


def measure(args) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(args.threads)
  gpu = torch.cuda.is_available()
  device = torch.device("cuda" if gpu else "cpu")
  torch.manual_seed(0)
  sys.path.insert(0, args.reference)
  body = (_nb201_step if args.space == "nb201" else _darts_step)(args, torch, nn, device)
  shape = (args.batch, 3, args.size, args.size)

  def batch():
    return (torch.randn(shape, device=device),
            torch.randint(0, 10, (args.batch,), device=device))

  def step():
    body(*batch(), *batch())
    if gpu:
      torch.cuda.synchronize()

  times = []
  for _ in range(args.steps + 1):
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
  peak = (torch.cuda.max_memory_allocated() if gpu
          else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
  return {
      "impl": "pytorch_reference", "space": args.space, "algorithm": "darts",
      "order": "first" if args.order == "first" else "second_fd", "neighbors": 1,
      "batch": args.batch, "channels": args.channels, "layers": args.layers,
      "size": args.size, "dtype": "float32", "first_step_s": round(times[0], 3),
      "step_s": round(statistics.median(times[1:]), 4) if len(times) > 1 else None,
      "peak_gb": round(peak / 2**30, 2),
      "device": torch.cuda.get_device_name() if gpu else "cpu",
      "torch": torch.__version__, "threads": args.threads,
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--reference", required=True,
                      help="the reference: quark0/darts's cnn/ directory, or for "
                      "--space=nb201 AutoDL-Projects's root")
  parser.add_argument("--space", default="darts", choices=["darts", "nb201"],
                      help="the search space: DARTS's cells (--layers of them) or "
                      "NAS-Bench-201's (--layers a stage)")
  parser.add_argument("--order", choices=["first", "second"], default="first")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--channels", type=int, default=16)
  parser.add_argument("--layers", type=int, default=8)
  parser.add_argument("--size", type=int, default=32)
  parser.add_argument("--steps", type=int, default=3, help="timed steps after the first")
  parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch)")
  args = parser.parse_args(argv)
  try:
    args.reference = check_reference(args.reference, args.space, args.order)
  except ValueError as error:
    parser.error(str(error))
  print(json.dumps(measure(args)), flush=True)


if __name__ == "__main__":
  main()
