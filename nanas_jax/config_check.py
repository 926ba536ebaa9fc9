"""Config fields named on the command line that the config does not have, explained.

``--config.search.bogus=1`` makes ml_collections fail with a bare ``AttributeError:
"'bogus'"``. `explain_override_error(argv)` finds the override at fault and says what the
block holds instead:

    --config.search.bogus: config.search has no field 'bogus'. Its fields: algorithm,
    arch, compile, epochs, neighbors, order, weights.

the closest field when there is one (`difflib`), and the right field for names other
tools use (`KNOWN_NAMES`: ``data.dataset`` is ``data.name`` here, DARTS's
``init_channels`` is ``model.channels``...). Field names are user input: they are quoted
clipped (`nanas_jax.cli.clip`).
"""

from __future__ import annotations

import difflib
import importlib.util
import re
from collections.abc import Sequence
from typing import Any

import ml_collections

from nanas_jax.cli import clip

# Names a user may try (DARTS's train_search.py flags, other tools' config names) and the
# fields that may hold the same setting here. Keys are dotted paths or leaf names; the
# first field the config has is named, relative to the block the user named (a
# pipeline's ``search.data.dataset`` is its ``search.data.name``).
KNOWN_NAMES = {
    "data.dataset": "data.name",
    "dataset": "data.name",
    "init_channels": "model.channels",
    "model.init_channels": "model.channels",
    "model.cells": "model.layers",
    "model.num_cells": "model.layers",
    "batch_size": "data.batch_size",
    "epochs": ("search.epochs", "train.epochs"),
    "learning_rate": "search.weights.lr",
    "arch_learning_rate": "search.arch.lr",
    "arch_weight_decay": "search.arch.weight_decay",
    "unrolled": "search.order",
    # The Flax examples' switch for bfloat16 compute.
    "half_precision": "search.dtype",
}

_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=]+)")
_CONFIG_FILE = re.compile(r"^--?config=(.+)$")


def load_config(spec: str) -> ml_collections.ConfigDict:
  """The config of a ``--config`` value, ``path[:argument]``: ``get_config(argument)``
  of the file (``get_config()`` without an argument), as ml_collections' config_flags
  loads it. Hand-written: config_flags' loader is private."""
  path, _, argument = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("nanas_config_file", path)
  if module_spec is None or module_spec.loader is None:
    raise FileNotFoundError(f"--config={clip(spec)}: no such config file.")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(argument) if argument else module.get_config()


def _fields(block: ml_collections.ConfigDict) -> list[str]:
  return sorted(block.keys())


def _has(config: Any, path: str) -> bool:
  node = config
  for name in path.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or name not in node:
      return False
    node = node[name]
  return True


def _known_name(config: ml_collections.ConfigDict, path: str) -> str | None:
  """The field of ``config`` that holds what ``path`` names elsewhere, if known."""
  names = path.split(".")
  for start in range(len(names)):
    prefix, rest = names[:start], ".".join(names[start:])
    for key in (rest, names[-1]):
      targets = KNOWN_NAMES.get(key, ())
      for target in (targets,) if isinstance(targets, str) else targets:
        candidate = ".".join(prefix + [target])
        if _has(config, candidate):
          return candidate
  return None


def unknown_field(config: ml_collections.ConfigDict, path: str) -> str | None:
  """Why ``config.<path>`` does not exist (the block's fields, the closest match, the
  known right name), or None when it does."""
  node, parents = config, []
  for name in path.split("."):
    where = ".".join(["config"] + parents)
    if not isinstance(node, ml_collections.ConfigDict):
      return (f"--config.{clip(path, 100)}: {where} is a value ({type(node).__name__}), "
              f"not a block of fields; set it as --{where}=VALUE.")
    if name not in node:
      message = f"--config.{clip(path, 100)}: {where} has no field {clip(name, 60)!r}."
      known = _known_name(config, path)
      close = difflib.get_close_matches(name, _fields(node), n=1, cutoff=0.6)
      if known:
        message += f" That setting is config.{known} here (--config.{known}=...)."
      elif close:
        message += f" Did you mean {where}.{close[0]}?"
      return message + f"\nFields of {where}: {', '.join(_fields(node))}."
    node, parents = node[name], parents + [name]
  return None


def overrides(argv: Sequence[str]) -> list[str]:
  """The dotted field paths of the ``--config.a.b=...`` arguments, in order."""
  return [m.group(1) for m in map(_OVERRIDE.match, argv) if m]


def explain_override_error(argv: Sequence[str]) -> str | None:
  """What is wrong with the first ``--config.*`` override of ``argv`` that names no field
  of the ``--config`` file; None when every field exists or the file cannot be loaded
  (then the original error stands)."""
  specs = [m.group(1) for m in map(_CONFIG_FILE.match, argv) if m]
  if not specs:
    return None
  try:
    config = load_config(specs[-1])
  except Exception:  # pylint: disable=broad-except
    # The flag parser reports a config file that does not load; this only explains fields.
    return None
  for path in overrides(argv):
    message = unknown_field(config, path)
    if message:
      return message
  return None
