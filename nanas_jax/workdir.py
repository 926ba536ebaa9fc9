"""The files of a run's workdir that every kind of run shares (search, training, pipeline,
study, flatness report): the recorded config, pictures of cells, and the trained supernet
(built from the config, saved at the end of a search, loaded back for a report).

Below the run modules and used by all of them, so that no run module imports another
for these.
"""

from __future__ import annotations

import os
from typing import Any

import flax
import ml_collections
from absl import logging

from nanas_jax import parallel, viz
from nanas_jax.files import write_atomic
from nanas_jax.nn.nb201_supernet import SearchNetworkNB201
from nanas_jax.nn.supernet import SearchNetwork

SUPERNET_FILE = "supernet.msgpack"


def record_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes ``config.json``; a resumed run with a changed config keeps the first file and
  records its own next to it (``config-<n>.json``), so no record is lost."""
  text = config.to_json_best_effort(indent=2)
  path = os.path.join(workdir, "config.json")
  n = 0
  while os.path.exists(path):
    with open(path) as f:
      if f.read() == text:
        return
    n += 1
    path = os.path.join(workdir, f"config-{n}.json")
  if n:
    logging.warning("The config differs from the one this workdir started with; recorded "
                    "as %s.", path)
  write_atomic(path, text)


def write_cell_picture(space, genotype, path: str, same_as: str | None = None) -> None:
  """A picture of the genotype's cells (process 0 only). ``same_as``, the path of a
  picture of the same genotype, is copied instead when it exists: drawing one takes
  0.6-0.9 s on a 2-core CPU, and a settling search repeats its genotype epoch after
  epoch."""
  if not parallel.is_main_process():
    return
  if same_as is not None and os.path.isfile(same_as):
    with open(same_as, "rb") as f:
      write_atomic(path, f.read())
    return
  viz.plot_arch(space, genotype, path)


def build_supernet(config: ml_collections.ConfigDict, num_classes: int):
  """The search supernet of ``config.model`` for ``num_classes`` classes: the DARTS
  network of ``layers`` cells, or the NAS-Bench-201 network with ``layers`` cells per
  stage."""
  if config.space == "nb201":
    return SearchNetworkNB201(num_classes=num_classes, channels=config.channels,
                              cells_per_stage=config.layers,
                              inner_impl=config.get("inner_impl", "auto"))
  return SearchNetwork(num_classes=num_classes, channels=config.channels,
                       layers=config.layers, steps=config.steps,
                       multiplier=config.multiplier, stem_multiplier=config.stem_multiplier,
                       dw_impl=config.depthwise_impl,
                       # Configs written before the field existed meant 'auto'.
                       inner_impl=config.get("inner_impl", "auto"))


def save_supernet(workdir: str, state) -> None:
  """The trained supernet variables (params, batch_stats), for flatness reports; written
  atomically. Full checkpoints with optimizer states and resume arrive with orbax."""
  write_atomic(os.path.join(workdir, SUPERNET_FILE), flax.serialization.to_bytes(
      {"params": state.params, "batch_stats": state.batch_stats}))


def load_supernet(workdir: str, template) -> dict[str, Any]:
  """Reads `save_supernet`'s file into the structure of ``template`` (a variables dict)."""
  path = os.path.join(workdir, SUPERNET_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: run a search with --workdir={workdir} first.")
  with open(path, "rb") as f:
    return flax.serialization.from_bytes(template, f.read())
