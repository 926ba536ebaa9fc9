"""One experiment config, one kind of run: ``config.task`` names the run module.

- ``'search'`` (the default): `nanas_jax.experiment` (DARTS, NA-DARTS, RS, NA-RS);
- ``'train'``: `nanas_jax.train.run` (a genotype from scratch);
- ``'pipeline'``: `nanas_jax.pipeline` (search, flatness, retraining, report);
- ``'study'``: `nanas_jax.study` (methods x seeds, retrained with their neighbors).

`run` is what ``python -m nanas_jax.main`` and ``nanas_jax.run`` call. The run modules never
import one another to dispatch: this module sits above all of them.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from nanas_jax import experiment, pipeline, study
from nanas_jax.train import run as train_run

TASKS = {
    "search": experiment.run,
    "train": train_run.run_train,
    "pipeline": pipeline.run_pipeline,
    "study": study.run_study,
}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs the experiment of ``config`` into ``workdir``; returns its summary (with
  ``message``)."""
  task = config.get("task", "search")
  if task not in TASKS:
    raise ValueError(f"config.task = {task!r} is invalid: expected one of {tuple(TASKS)}.")
  return TASKS[task](config, workdir)
