"""Search, retrain, report in one command: ``config.task = 'pipeline'``.

`run_pipeline(config, workdir)` runs three stages into one workdir:

1. ``workdir/search``: the search of ``config.search`` (a whole search config, e.g.
   ``configs/quickstart.py``'s; DARTS space) through `nanas_jax.experiment.run`;
2. optionally (``config.pipeline.flatness``) the neighborhood flatness report of the found
   genotype in the trained supernet (`nanas_jax.flatness.report`, written into
   ``workdir/search``);
3. ``workdir/train``: training the found genotype from scratch with ``config.train`` (a
   whole training config, e.g. ``configs/train_quickstart.py``'s) through
   `nanas_jax.train.run.run_train`;

then writes ``workdir/report.md``: the genotype and its cell picture, the search's
validation accuracy, the flatness numbers, parameters and multiply-adds (at the trained
input size and at the DARTS CIFAR-10 evaluation size), test top-1 / top-5, whether the test
examples were held out from the search, and the wall time of each stage.

Resume: a rerun of the same command skips the finished stages (a search is finished when
its ``genotype.txt`` exists, a training when its ``results.json`` does, a flatness report
when a ``flatness*.json`` with the same radius, neighbors, batches, seed and genotype
does) and resumes an unfinished one from its checkpoints. A workdir that already holds a
``report.md`` is refused: the report, like every result, is never overwritten (move it
away to write a new one from the finished stages).

Config layout::

  config.task = 'pipeline'
  config.search     a search config (its task 'search'; config.search.model.space 'darts')
  config.train      a training config (task 'train'; model.genotype and genotype_file are
                    set by the pipeline: genotype_file must be left None)
  config.pipeline   {flatness: bool, flatness_radius, flatness_num_neighbors,
                     flatness_eval_batches, flatness_seed}

Every value is checked before any data is read or anything compiled; errors name the field
as this config spells it (``config.search.model.layers = ...``). The training's data is
then read and checked too (the dataset prepared, each split able to fill its batch), before
the search starts, unless the training has already finished. The search's ``parallel``
block starts the processes (the training's is then a no-op).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from typing import Any, Callable

import ml_collections
import numpy as np
from absl import logging

from nanas_jax import (experiment, flatness, loop, neighborhood, parallel, spaces,
                       summary)
from nanas_jax import workdir as workdir_lib
from nanas_jax.data import loaders
from nanas_jax.files import write_atomic
from nanas_jax.train import run as train_run

REPORT_FILE = "report.md"
SEARCH_DIR, TRAIN_DIR = "search", "train"


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _within(prefix: str, check: Callable[[ml_collections.ConfigDict], None],
            config: ml_collections.ConfigDict) -> None:
  """Runs ``check`` on a sub-config, naming fields in its errors from the pipeline
  config's root (``config.model.x`` becomes ``config.<prefix>.model.x``)."""
  try:
    check(config)
  except ValueError as error:
    raise ValueError(re.sub(r"\bconfig\.", f"config.{prefix}.", str(error))) from error


def validate_pipeline_config(config: ml_collections.ConfigDict) -> None:
  """Checks the three blocks before anything runs; a ValueError names the field."""
  for block in ("search", "train", "pipeline"):
    if not isinstance(config.get(block), ml_collections.ConfigDict):
      raise ValueError(f"config.{block} is missing: a pipeline config has search, train "
                       "and pipeline blocks (see configs/pipeline_quickstart.py).")
  search, train, options = config.search, config.train, config.pipeline
  if search.get("task", "search") != "search":
    raise ValueError(f"config.search.task = {search.task!r} is invalid: expected 'search'.")
  if search.model.get("space") != "darts":
    raise ValueError(f"config.search.model.space = {search.model.get('space')!r} is "
                     "invalid: expected 'darts' (the networks trained from scratch are "
                     "DARTS networks).")
  _within("search", experiment.validate_config, search)
  if train.model.get("genotype_file"):
    raise ValueError(f"config.train.model.genotype_file = {train.model.genotype_file!r} "
                     "is invalid: expected None (the pipeline trains the genotype its "
                     "search finds).")
  _within("train", train_run.validate_run_config, train)
  if not isinstance(options.get("flatness"), bool):
    raise ValueError(f"config.pipeline.flatness = {options.get('flatness')!r} is invalid: "
                     "expected True or False.")
  for field, least in (("flatness_radius", 1), ("flatness_eval_batches", 1),
                       ("flatness_recalibrate_batches", 0), ("flatness_seed", 0)):
    value = options.get(field)
    if not _is_int(value) or value < least:
      raise ValueError(f"config.pipeline.{field} = {value!r} is invalid: expected an "
                       f"integer >= {least}.")
  neighborhood.check_reach(spaces.get_space("darts"), options.flatness_radius,
                           "config.pipeline.flatness_radius")
  neighbors = options.get("flatness_num_neighbors")
  if neighbors is not None and (not _is_int(neighbors) or neighbors < 1):
    raise ValueError(f"config.pipeline.flatness_num_neighbors = {neighbors!r} is invalid: "
                     "expected an integer >= 1 or None (every neighbor).")


def _read_json(path: str) -> dict[str, Any]:
  with open(path) as f:
    return json.load(f)


def _flatness(search_dir: str, genotype: str, options: ml_collections.ConfigDict
              ) -> tuple[dict[str, Any], bool]:
  """The flatness payload of ``genotype`` with ``options``' settings, and whether it ran
  now (`flatness.find_or_report`)."""
  return flatness.find_or_report(
      search_dir, genotype, radius=options.flatness_radius,
      num_neighbors=options.flatness_num_neighbors,
      eval_batches=options.flatness_eval_batches,
      recalibrate_batches=options.get("flatness_recalibrate_batches", 4),
      seed=options.flatness_seed)


def search_overlap(search_config: ml_collections.ConfigDict,
                 train_config: ml_collections.ConfigDict) -> dict[str, int] | None:
  """How many of the training's test examples the search saw: pixel-identical images in
  the search's two parts (``{'test_examples', 'in_search'}``), None when a split is
  streamed rather than held in memory (ImageNet) and so not compared."""
  search = loaders.load_search_streams(
      search_config.data, search_config.data.batch_size, search_config.seed,
      process_index=0, process_count=1)
  test = loaders.load_train_streams(
      train_config.data, train_config.data.batch_size, train_config.seed,
      process_index=0, process_count=1).test
  parts = (search.train, search.val, test)
  if any(getattr(part, "images", None) is None for part in parts):
    return None

  def digests(images):
    return [hashlib.sha1(np.ascontiguousarray(image).tobytes()).digest() for image in images]

  seen = set(digests(search.train.images)) | set(digests(search.val.images))
  test_digests = digests(test.images)
  return {"test_examples": len(test_digests),
          "in_search": sum(d in seen for d in test_digests)}


def _seconds(value: float | None) -> str:
  return "-" if value is None else f"{value:.0f} s"


def _pct(value: float | None) -> str:
  return "-" if value is None else f"{100 * value:.2f} %"


def format_report(*, workdir: str, search: dict[str, Any], search_config, flat,
                  results: dict[str, Any], cifar10: dict[str, Any],
                  overlap: dict[str, int] | None, stages: dict[str, dict[str, Any]]) -> str:
  """The markdown of ``report.md`` (links relative to ``workdir``)."""
  algorithm = search_config.search.algorithm
  lines = [
      "# Search, retrain, report", "",
      f"Workdir `{os.path.abspath(workdir)}`: the search in `{SEARCH_DIR}/`, the training "
      f"from scratch in `{TRAIN_DIR}/`, the configs in `config.json` (and in each stage's).",
      "", "## Genotype found", "", "```", search["genotype"], "```", "",
      f"![cells of the genotype]({SEARCH_DIR}/genotype.png)", "",
      "## Search", "",
      f"{algorithm} on {search_config.data.name}, {search_config.model.layers} cells, "
      f"C={search_config.model.channels}, {search_config.search.epochs} epochs.", ""]
  if "final_val_accuracy" in search:
    lines += [
        "| supernet validation accuracy (final) | best (epoch) | devices |",
        "| --- | --- | --- |",
        f"| {_pct(search['final_val_accuracy'])} | {_pct(search['best_val_accuracy'])} "
        f"({search['best_epoch']}) | {search.get('devices', '-')} |", ""]
  else:
    result = search.get("result", {})
    lines += [f"Best candidate: validation loss {result.get('best_loss', float('nan')):.4f}, "
              f"score {result.get('best_score', float('nan')):.4f}.", ""]
  if flat is not None:
    centre = flat["center"]
    lines += [
        "## Neighborhood flatness", "",
        f"Neighbors of the genotype at each distance, scored with the trained supernet on "
        f"{flat['eval_examples']} search-validation examples (`{SEARCH_DIR}/"
        f"{os.path.basename(flat['files']['json'])}`). Centre: loss {centre['loss']:.4f}, "
        f"accuracy {_pct(centre['accuracy'])}.", "",
        "| distance | evaluated / all | loss mean | loss std | worst loss | accuracy mean "
        "| worst accuracy |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in flat["radii"]:
      if not r["count"]:
        lines.append(f"| {r['radius']} | 0 / {r['size']} | - | - | - | - | - |")
        continue
      acc = r["accuracy"] or {"mean": None, "worst": None}
      lines.append(
          f"| {r['radius']} | {r['count']} / {r['size']} | {r['loss']['mean']:.4f} | "
          f"{r['loss']['std']:.4f} | {r['loss']['worst']:.4f} | {_pct(acc['mean'])} | "
          f"{_pct(acc['worst'])} |")
    lines.append("")
    if flat["files"].get("png"):
      lines += [f"![flatness]({SEARCH_DIR}/{os.path.basename(flat['files']['png'])})", ""]
  lines += [
      "## Training from scratch", "",
      f"{results['network']} network, {results['layers']} cells, C={results['channels']}, "
      f"{results['epochs']} epochs, batch {results['global_batch_size']}, on "
      f"{results['dataset']} ({results['train_examples']} training, "
      f"{results['test_examples']} test examples).", "",
      "| test top-1 | test top-5 | test loss | best top-1 (epoch) | params | mult-adds |",
      "| --- | --- | --- | --- | --- | --- |",
      f"| {_pct(results['test_top1'])} | {_pct(results['test_top5'])} | "
      f"{results['test_loss']:.4f} | {_pct(results['best_test_top1'])} "
      f"({results['best_epoch']}) | {results['params']:,} | {results['mult_adds']:,} |", "",
      "The final epoch's accuracy is the result; the best evaluated epoch is for "
      "information (choosing it would select on the test set). Parameters exclude the "
      "auxiliary head; multiply-adds are per "
      f"{'x'.join(str(d) for d in results['image_shape'])} image, convolutions and dense "
      "layers (`nanas_jax.summary`).", "",
      f"At the DARTS CIFAR-10 evaluation size ({cifar10['layers']} cells, "
      f"C={cifar10['channels']}, 32x32x3): {cifar10['params']:,} parameters "
      f"({cifar10['params'] / 1e6:.2f}M), {cifar10['mult_adds'] / 1e6:.1f}M multiply-adds.",
      "", "Held-out test data: "]
  if overlap is None:
    lines[-1] += "not checked (a split is streamed, not held in memory)."
  elif overlap["in_search"]:
    lines[-1] += (f"**no**: {overlap['in_search']} of the {overlap['test_examples']} test "
                  "examples are also in the search's data, so the test accuracy is not a "
                  "held-out result.")
  else:
    lines[-1] += (f"yes: none of the {overlap['test_examples']} test examples is among the "
                  "search's data (compared pixel for pixel).")
  lines += ["", "## Wall time", "",
            "| stage | this command | as the stage recorded it |", "| --- | --- | --- |"]
  for name, stage in stages.items():
    lines.append(f"| {name} | {stage['status']}, {_seconds(stage['seconds'])} | "
                 f"{stage['recorded']} |")
  return "\n".join(lines) + "\n"


def run_pipeline(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Searches, retrains the found genotype and writes ``report.md`` into ``workdir``
  (see the module docstring); returns a summary with ``message`` and ``genotype``."""
  validate_pipeline_config(config)
  loop.check_workdir(workdir)
  report_path = os.path.join(workdir, REPORT_FILE)
  if os.path.exists(report_path):
    raise FileExistsError(
        f"{workdir} already holds a finished pipeline ({REPORT_FILE}); choose a new "
        "--workdir (results are never overwritten).")
  parallel.initialize(config.search.get("parallel"))
  main = parallel.is_main_process()
  search_dir = os.path.join(workdir, SEARCH_DIR)
  train_dir = os.path.join(workdir, TRAIN_DIR)
  stages: dict[str, dict[str, Any]] = {}
  t0 = time.time()

  training_done = os.path.exists(os.path.join(train_dir, train_run.RESULTS_FILE))
  if not training_done:
    # The training's data now, not after a search of hours: a dataset not prepared, or a
    # split too small for its batch, fails before anything runs.
    _within("train", train_run.load_data, config.train)

  if os.path.exists(os.path.join(search_dir, "genotype.txt")):
    search = _read_json(os.path.join(search_dir, "genotype.json"))
    stages["search"] = {"status": "finished earlier", "seconds": None}
  else:
    search = experiment.run(config.search, search_dir)
    stages["search"] = {"status": "ran", "seconds": time.time() - t0}
  # Recorded once the search has passed its checks (its data's included) and run.
  if main:
    workdir_lib.record_config(config, workdir)
  resumed = search.get("resumed_from_step")
  stages["search"]["recorded"] = (
      _seconds(search.get("total_seconds")) +
      (f" (the last session, resumed at step {resumed})" if resumed is not None else "") +
      (f", first step {_seconds(search['first_step_seconds'])}"
       if search.get("first_step_seconds") is not None else ""))
  genotype = search["genotype"]

  flat = None
  if config.pipeline.flatness and main:
    t = time.time()
    flat, ran = _flatness(search_dir, genotype, config.pipeline)
    stages["flatness"] = {"status": "ran" if ran else "finished earlier",
                          "seconds": time.time() - t if ran else None, "recorded": "-"}

  # The genotype goes in as text, not as the search's genotype.txt: only process 0 writes
  # that file, and the other processes may start training before it is there.
  train_config = config.train.copy_and_resolve_references()
  train_config.model.genotype = genotype
  t = time.time()
  if training_done:
    results = _read_json(os.path.join(train_dir, train_run.RESULTS_FILE))
    stages["train"] = {"status": "finished earlier", "seconds": None}
  else:
    results = train_run.run_train(train_config, train_dir)
    stages["train"] = {"status": "ran", "seconds": time.time() - t}
  stages["train"]["recorded"] = (
      f"{_seconds(results['train_seconds'])} training (summed over sessions), first step "
      f"{_seconds(results['first_step_seconds'])}")

  summary_ = {"genotype": genotype,
              "genotype_path": os.path.join(search_dir, "genotype.txt"),
              "report": report_path, "test_top1": results["test_top1"],
              "test_top5": results["test_top5"], "params": results["params"]}
  if main:
    cifar10 = summary.summarize(genotype, "cifar10")
    overlap = search_overlap(config.search, train_config)
    text = format_report(workdir=workdir, search=search, search_config=config.search,
                         flat=flat, results=results, cifar10=cifar10, overlap=overlap,
                         stages=stages)
    write_atomic(report_path, text, replace=False)
    summary_["test_overlap"] = overlap
  summary_["message"] = (
      f"Pipeline finished: the found genotype trains to test top-1 "
      f"{results['test_top1']:.4f}, top-5 {results['test_top5']:.4f} "
      f"({results['params']:,} parameters); report in {report_path}.")
  logging.info(summary_["message"])
  return summary_
