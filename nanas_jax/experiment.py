"""The loop around the search step, and every side effect of a search run.

Everything below this module is pure; this is where data is read, the step is driven, and
files are written into the workdir. Bilevel searches (DARTS, NA-DARTS) and random searches
with weight sharing (RS, NA-RS) share the data, validation and output conventions:

- ``config.json``: the resolved config of the run;
- ``metrics.jsonl``: one JSON object per logged step and per epoch;
- ``genotypes.jsonl``: the derived genotype after every epoch (bilevel searches);
- ``genotype.txt`` (the DARTS / NAS-Bench-201 text) and ``genotype.json`` at the end
  (for NA-RS with the search's budget and plain RS at the same number of evaluations);
- ``supernet.msgpack``: the trained supernet variables (for flatness reports).

Files are written atomically (a temporary file, then a rename). A workdir that already
holds a finished search is refused rather than overwritten.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from nanas_jax import loop, neighborhood, parallel, spaces
from nanas_jax import workdir as workdir_lib
from nanas_jax.data import loaders
from nanas_jax.files import write_atomic
from nanas_jax.nn.functional import DEPTHWISE_IMPLS
from nanas_jax.nn.supernet import INNER_IMPLS
from nanas_jax.search.bilevel import (BilevelSearch, alpha_entropy, dtype_memory_options,
                                      neighbors_per_step, validate_search_config)
from nanas_jax.search.evaluators import SupernetEvaluator, TabularEvaluator
from nanas_jax.search.random_search import (MAX_ENUMERATED_NEIGHBORS, na_random_search,
                                            random_search, random_search_same_budget,
                                            space_size)
from nanas_jax.search.weight_sharing import (RS_ALGORITHMS, WeightSharingTrainer,
                                             validate_rs_config)

FINAL_FILES = ("genotype.txt", "genotype.json")
# The picture of the genotype after every epoch of a bilevel search.
CELLS_DIR = "cells"


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks what can be checked before any data is read or anything compiled."""
  space = spaces.get_space(config.model.space)
  parallel.validate_parallel_config(config.get("parallel"))
  loop.validate_checkpoint_config(config)
  if config.search.algorithm in RS_ALGORITHMS:
    if "rs" not in config.search:
      raise ValueError(
          f"config.search.algorithm = {config.search.algorithm!r} needs the candidate "
          "scoring block config.search.rs, which this config lacks: use "
          f"--config=configs/{config.search.algorithm}_quickstart.py (or another "
          f"{config.search.algorithm} config).")
    validate_rs_config(config.search)
    size = space_size(space)
    if size is not None and config.search.rs.num_candidates > size:
      raise ValueError(f"config.search.rs.num_candidates = {config.search.rs.num_candidates} "
                       f"is invalid: the {space.name} space has {size:,} architectures; use "
                       f"at most {size:,}.")
    if config.search.algorithm == "na_rs":
      _validate_na_rs_neighborhood(config.search.rs, space)
    if config.search.rs.evaluator == "table" and config.model.space != "nb201":
      raise ValueError(f"config.search.rs.evaluator = 'table' needs config.model.space = "
                       f"'nb201' (got {config.model.space!r}): only NAS-Bench-201 is "
                       "tabulated.")
  else:
    validate_search_config(config.search)
    nb = config.search.neighbors
    if config.search.algorithm == "na_darts" and nb.kind in neighborhood.RADIUS_PERTURBATIONS:
      # Checked here rather than at the first architecture step, after the warm-up epochs.
      neighborhood.check_reach(space, nb.radius, "config.search.neighbors.radius")
  for field in ("channels", "layers", "steps", "multiplier", "stem_multiplier"):
    value = config.model[field]
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"config.model.{field} = {value!r} is invalid: expected an integer >= 1.")
  if config.model.space == "nb201":
    return _validate_batch(config)
  if config.model.layers < 3:
    raise ValueError(f"config.model.layers = {config.model.layers} is invalid: a DARTS "
                     "network needs >= 3 cells (two of them reduction cells).")
  if config.model.multiplier > config.model.steps:
    raise ValueError("config.model.multiplier must be <= config.model.steps "
                     f"(got {config.model.multiplier} > {config.model.steps}).")
  if config.model.steps != 4:
    raise ValueError(f"config.model.steps = {config.model.steps}: the DARTS space has 4 "
                     "intermediate nodes per cell; use 4.")
  for field, choices in (("depthwise_impl", DEPTHWISE_IMPLS), ("inner_impl", INNER_IMPLS)):
    if config.model.get(field, "auto") not in choices:
      raise ValueError(f"config.model.{field} = {config.model[field]!r} is invalid: use one "
                       f"of {choices}.")
  _validate_batch(config)


def _validate_na_rs_neighborhood(rs: ml_collections.ConfigDict, space) -> None:
  """NA-RS's neighborhoods, checked before the supernet trains (`na_random_search` checks
  them again per candidate, once it is trained): within a radius every architecture of a
  space has the same number of neighbors."""
  radius = neighborhood.check_reach(space, rs.radius, "config.search.rs.radius")
  size = neighborhood.space_neighborhood_size(space, radius)
  if rs.num_neighbors is None and size > MAX_ENUMERATED_NEIGHBORS:
    raise ValueError(
        f"config.search.rs.num_neighbors = None enumerates each candidate's {size:,} "
        f"neighbors within radius {radius}, more than the {MAX_ENUMERATED_NEIGHBORS:,} "
        "NA-RS enumerates; set config.search.rs.num_neighbors=K to sample K of them, or "
        "lower config.search.rs.radius.")
  if rs.num_neighbors is not None and rs.num_neighbors > size:
    raise ValueError(
        f"config.search.rs.num_neighbors = {rs.num_neighbors} is invalid: a {space.name} "
        f"architecture has {size:,} neighbors within radius {radius}; lower it, or raise "
        "config.search.rs.radius.")


def _validate_batch(config: ml_collections.ConfigDict) -> None:
  batch = config.data.batch_size
  if not isinstance(batch, int) or batch < 1:
    raise ValueError(f"config.data.batch_size = {batch!r} is invalid: expected an integer >= 1.")
  k = 1 if config.search.algorithm in RS_ALGORITHMS else neighbors_per_step(config.search)
  if config.search.algorithm == "na_darts" and config.search.neighbors.batch == "split" \
      and batch % k:
    raise ValueError(
        f"config.data.batch_size = {batch} must be divisible by the {k} neighbors per step "
        "when config.search.neighbors.batch = 'split'.")


def evaluate_search(sums_fn, state, stream, mesh) -> tuple[float, float]:
  """Mean loss and accuracy of the supernet over a whole split (`loop.evaluate`)."""
  sums = loop.evaluate(sums_fn, state, stream, mesh)
  return sums["loss"] / sums["count"], sums["correct"] / sums["count"]


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs the search of ``config`` into ``workdir``: bilevel (DARTS, NA-DARTS) or random
  search (RS, NA-RS) by ``config.search.algorithm``."""
  validate_config(config)
  if config.search.algorithm in RS_ALGORITHMS:
    return run_random_search(config, workdir)
  return run_search(config, workdir)


def _start(config: ml_collections.ConfigDict, workdir: str):
  """Validates the config, starts the processes and the mesh and guards the workdir.
  Returns the device mesh. Nothing is written: `_record` does that once the data loads."""
  validate_config(config)
  loop.check_workdir(workdir)
  parallel.initialize(config.get("parallel"))
  mesh = parallel.data_mesh()
  if config.search.algorithm not in RS_ALGORITHMS or config.search.rs.evaluator != "table":
    parallel.check_batch_size(config.data.batch_size, mesh)
  existing = [f for f in FINAL_FILES if os.path.exists(os.path.join(workdir, f))]
  if existing:
    raise FileExistsError(
        f"{workdir} already holds a finished search ({', '.join(existing)}); choose a new "
        "--workdir (results are never overwritten).")
  return mesh


def _record(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Creates the workdir and records the config: after every check, data included."""
  if parallel.is_main_process():
    os.makedirs(workdir, exist_ok=True)
    workdir_lib.record_config(config, workdir)


def _prepare(config: ml_collections.ConfigDict, workdir: str):
  """`_start`, then the data: ``(mesh, space, search streams, steps per epoch)``."""
  mesh = _start(config, workdir)
  space = spaces.get_space(config.model.space)
  streams = loaders.load_search_streams(config.data, config.data.batch_size,
                                             config.seed)
  _check_batch_counts(config.search, streams)
  _record(config, workdir)
  steps = min(streams.train.steps_per_epoch, streams.val.steps_per_epoch)
  return mesh, space, streams, steps


def _check_batch_counts(search: ml_collections.ConfigDict, streams) -> None:
  """Batch counts the config asks of the data (recalibration, RS scoring) that it has."""
  rs = search.get("rs") if search.algorithm in RS_ALGORITHMS else None
  wanted = [("recalibrate_batches", search.get("recalibrate_batches", 0), streams.train)]
  if rs is not None:
    wanted = [("rs.recalibrate_batches", rs.get("recalibrate_batches", 0), streams.train),
              ("rs.eval_batches", rs.eval_batches, streams.val)]
  for field, count, split in wanted:
    available = (-(-split.num_examples // split.global_batch_size)
                 if field == "rs.eval_batches" else split.steps_per_epoch)
    if count > available:
      raise ValueError(f"config.search.{field} = {count} exceeds the {available} batches "
                       "of its half of the search data; lower it.")


def recalibration_images(stream, num_batches: int, epoch: int = 0):
  """The images of the first ``num_batches`` training batches of ``epoch``, on which
  BatchNorm statistics are re-estimated before an architecture is scored (None for 0)."""
  if not num_batches:
    return None
  return [x for x, _ in itertools.islice(stream.batches(epoch), num_batches)]


def _paired_batches(streams, steps_per_epoch: int):
  """``(epoch, start) -> (train batch, val batch)`` pairs for the rest of the epoch."""

  def batches(epoch: int, start: int):
    return itertools.islice(zip(streams.train.batches(epoch, start),
                                streams.val.batches(epoch, start)), steps_per_epoch - start)

  return batches


def epoch_picture(workdir: str, epoch: int) -> str:
  """The picture of the genotype a search held at the end of ``epoch`` (1-based)."""
  return os.path.join(workdir, CELLS_DIR, f"epoch_{epoch:03d}.png")


def architecture_summary(algorithm: str, means: dict[str, float]) -> str:
  """The epoch line's architecture part from the epoch's metric means: the architecture
  loss and, for NA-DARTS, the spread (std) of its neighbors' losses. DARTS's one
  architecture has no spread to show (its metric is 0 by construction); a weight-only
  warm-up epoch has no architecture step."""
  if "mean_arch_loss" not in means:
    return "weight-only warm-up"
  text = f"arch loss {means['mean_arch_loss']:.4f}"
  if algorithm == "na_darts":
    text += f"  neighbor spread {means['mean_neighbor_loss_std']:.4f}"
  return text


def run_search(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs the bilevel (DARTS / NA-DARTS) search of ``config`` into ``workdir``, data
  parallel over every device, resuming from the workdir's checkpoints."""
  mesh, space, streams, steps_per_epoch = _prepare(config, workdir)
  batch = config.data.batch_size
  model = workdir_lib.build_supernet(config.model, streams.num_classes)
  search = BilevelSearch(model, space, config.search, steps_per_epoch)
  main = parallel.is_main_process()

  t0 = time.time()
  state = search.init(jax.random.key(config.seed), jnp.zeros((1, *streams.image_shape)))
  state = parallel.replicate(state, mesh)
  init_seconds = time.time() - t0
  sums_fn = search.eval_fn()
  recalibrate = config.search.get("recalibrate_batches", 0)
  uniform = float(np.log(space.num_ops))
  logging.info("Search: %s, %d epochs x %d steps (%d weight-only warm-up epochs), global "
               "batch %d over %d devices, %s.", config.search.algorithm,
               config.search.epochs, steps_per_epoch, config.search.get("warmup_epochs", 0),
               batch, mesh.devices.size, streams.name)

  def end_of_epoch(state, epoch, means, extra):
    eval_state = state
    if recalibrate:
      # The running statistics lag behind a supernet whose weights and alpha move fast;
      # validation uses statistics re-estimated at the current softmax(alpha).
      images = recalibration_images(streams.train, recalibrate, epoch)
      stats = search.recalibrated_batch_stats(
          state, (parallel.shard_batch(x, mesh) for x in images))
      eval_state = state.replace(batch_stats=stats)
    val_loss, val_acc = evaluate_search(sums_fn, eval_state, streams.val, mesh)
    alpha = parallel.to_host(state.alpha)
    genotype = space.derive(np.asarray(jax.nn.softmax(alpha, -1)))
    text = space.format(genotype)
    changed = extra.get("genotype") != text
    stable = 1 if changed else extra.get("stable_epochs", 0) + 1
    entropy = float(alpha_entropy(alpha))
    record = {"epoch": epoch + 1, "step": (epoch + 1) * steps_per_epoch,
              "val_loss": val_loss, "val_accuracy": val_acc, "alpha_entropy": entropy,
              "alpha_entropy_fraction": entropy / uniform,
              "genotype_changed": int(changed), "genotype_stable_epochs": stable, **means}
    if main:
      loop.append_jsonl(os.path.join(workdir, "genotypes.jsonl"),
                        {"epoch": epoch + 1, "genotype": text, "val_accuracy": val_acc,
                         "alpha_entropy": entropy, "changed": changed})
      os.makedirs(os.path.join(workdir, CELLS_DIR), exist_ok=True)
      workdir_lib.write_cell_picture(
          space, genotype, epoch_picture(workdir, epoch + 1),
          same_as=None if changed else epoch_picture(workdir, epoch))
    if "best_val_accuracy" not in extra or val_acc > extra["best_val_accuracy"]:
      extra.update(best_epoch=epoch + 1, best_val_accuracy=val_acc, best_genotype=text)
    extra.update(val_accuracy=val_acc, genotype=text, stable_epochs=stable)
    arch = architecture_summary(config.search.algorithm, means)
    logging.info("epoch %d/%d  train loss %.4f acc %.3f  %s  val loss %.4f acc %.3f  alpha "
                 "entropy %.3f (%.0f%% of uniform)  genotype %s\n  genotype: %s", epoch + 1,
                 config.search.epochs, means["mean_train_loss"],
                 means["mean_train_accuracy"], arch, val_loss, val_acc, entropy,
                 100 * entropy / uniform,
                 "changed" if changed else f"unchanged for {stable} epochs", text)
    return record

  result = loop.run_epochs(
      workdir=workdir, config=config, mesh=mesh, state=state, step_fn=search.jit_step(),
      batches_fn=_paired_batches(streams, steps_per_epoch), steps_per_epoch=steps_per_epoch,
      epochs=config.search.epochs, end_of_epoch=end_of_epoch,
      finite_keys=("train_loss", "arch_loss"),
      hint="Lower config.search.weights.lr or config.search.arch.lr and rerun: the run "
           "resumes from that checkpoint.",
      memory_hint=loop.memory_hint(search.memory_options(), batch, mesh.devices.size),
      step_logs=("genotypes.jsonl",))
  state, extra = result.state, result.extra
  parallel.assert_replicas_agree(state.alpha, "alpha")
  alpha = parallel.to_host(state.alpha)
  final = space.derive(np.asarray(jax.nn.softmax(alpha, -1)))
  summary = {
      "space": space.name, "genotype": space.format(final),
      "genotype_json": space.to_json(final), "final_val_accuracy": extra["val_accuracy"],
      "best_epoch": extra["best_epoch"], "best_val_accuracy": extra["best_val_accuracy"],
      "best_genotype": extra["best_genotype"], "alpha": alpha.tolist(),
      "devices": int(mesh.devices.size), "processes": jax.process_count(),
      "resumed_from_step": result.resumed_from, "init_seconds": init_seconds,
      "first_step_seconds": result.first_step_seconds, "total_seconds": time.time() - t0,
  }
  if main:
    workdir_lib.save_supernet(workdir, parallel.to_host(state))
    workdir_lib.write_cell_picture(
        space, final, os.path.join(workdir, "genotype.png"),
        same_as=(epoch_picture(workdir, config.search.epochs)
                 if summary["genotype"] == extra["genotype"] else None))
    write_atomic(os.path.join(workdir, "genotype.txt"), space.format(final) + "\n")
    write_atomic(os.path.join(workdir, "genotype.json"), json.dumps(summary, indent=2) + "\n")
  summary["message"] = (
      f"Search finished: validation accuracy {extra['val_accuracy']:.3f} (best "
      f"{extra['best_val_accuracy']:.3f} at epoch {extra['best_epoch']}).")
  logging.info("Final genotype (written to %s):\n%s", os.path.join(workdir, "genotype.txt"),
               space.format(final))
  return summary


def _train_weight_sharing(config, workdir, mesh, space, streams, steps_per_epoch):
  """Trains the supernet on one sampled architecture per step; returns the state and a
  `SupernetEvaluator` on the first ``rs.eval_batches`` validation batches."""
  rs = config.search.rs
  model = workdir_lib.build_supernet(config.model, streams.num_classes)
  trainer = WeightSharingTrainer(model, space, config.search, steps_per_epoch)
  state = trainer.init(jax.random.key(config.seed), jnp.zeros((1, *streams.image_shape)))
  state = parallel.replicate(state, mesh)

  def step_fn(state, train_batch):
    # The architecture of step s is drawn from (seed, s): a resumed run draws the same ones.
    step = int(parallel.to_host(state.step))
    return trainer.step(state, train_batch, np.random.default_rng([config.seed + 1, step]),
                        put=lambda w: parallel.replicate(w, mesh))

  def end_of_epoch(state, epoch, means, extra):
    logging.info("epoch %d/%d  train loss %.4f acc %.3f (one sampled architecture per "
                 "step)", epoch + 1, config.search.epochs, means["mean_train_loss"],
                 means["mean_train_accuracy"])
    return {"epoch": epoch + 1, "step": (epoch + 1) * steps_per_epoch, **means}

  def batches(epoch, start):
    return ((b,) for b in itertools.islice(streams.train.batches(epoch, start),
                                           steps_per_epoch - start))

  state = loop.run_epochs(
      workdir=workdir, config=config, mesh=mesh, state=state, step_fn=step_fn,
      batches_fn=batches, steps_per_epoch=steps_per_epoch, epochs=config.search.epochs,
      end_of_epoch=end_of_epoch, finite_keys=("train_loss",),
      hint="Lower config.search.weights.lr and rerun: the run resumes from that "
           "checkpoint.",
      memory_hint=loop.memory_hint(dtype_memory_options(config.search),
                                   config.data.batch_size, mesh.devices.size)).state
  # Candidates are scored on whole validation batches that every process holds, so every
  # process ranks them identically; one process already holds them.
  full = streams if jax.process_count() == 1 else loaders.load_search_streams(
      config.data, config.data.batch_size, config.seed, process_index=0, process_count=1)
  eval_batches = list(itertools.islice(full.val.eval_batches(), rs.eval_batches))
  host_state = parallel.to_host(state)
  evaluator = SupernetEvaluator(
      model, {"params": host_state.params, "batch_stats": host_state.batch_stats}, space,
      eval_batches, chunk_size=rs.chunk_size,
      recalibration=recalibration_images(full.train, rs.get("recalibrate_batches", 0)),
      compiler_options=trainer.compiler_options)
  return host_state, evaluator


def run_random_search(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Random search or NA-RS. Candidates are scored by a weight-sharing supernet trained on
  sampled architectures (``search.rs.evaluator = 'supernet'``) or looked up in a
  NAS-Bench-201 table (``'table'``); NA-RS scores each by its neighborhood's aggregate and
  is compared with plain RS given the same number of evaluations."""
  rs = config.search.rs
  t0 = time.time()
  state = None
  if rs.evaluator == "table":
    _start(config, workdir)
    space = spaces.get_space(config.model.space)
    if rs.nats_bench_path:
      evaluator = TabularEvaluator.from_nats_bench(rs.nats_bench_path,
                                                   dataset=rs.nats_bench_dataset)
    else:
      evaluator = TabularEvaluator.from_file(rs.table_path)
    _record(config, workdir)
  else:
    mesh, space, streams, steps_per_epoch = _prepare(config, workdir)
    state, evaluator = _train_weight_sharing(config, workdir, mesh, space, streams,
                                             steps_per_epoch)
  train_seconds = time.time() - t0
  search_rng = np.random.default_rng(config.seed + 3)
  if config.search.algorithm == "na_rs":
    with loop.Progress("NA-RS scoring", "candidates") as progress:
      result = na_random_search(
          space, evaluator, rs.num_candidates, search_rng, radius=rs.radius,
          num_neighbors=rs.num_neighbors, include_center=rs.include_center,
          aggregation=rs.aggregation, tau=rs.tau, progress=progress)
    with loop.Progress("random search with the same budget", "candidates") as progress:
      baseline = random_search_same_budget(
          space, evaluator, result, np.random.default_rng(config.seed + 4),
          progress=progress)
  else:
    with loop.Progress("random search scoring", "candidates") as progress:
      result = random_search(space, evaluator, rs.num_candidates, search_rng,
                             progress=progress)
    baseline = None
  best = space.decode(result.best_codes)
  main = parallel.is_main_process()
  if state is not None and main:
    workdir_lib.save_supernet(workdir, state)
  if main:
    workdir_lib.write_cell_picture(space, best, os.path.join(workdir, "genotype.png"))
    write_atomic(os.path.join(workdir, "genotype.txt"), space.format(best) + "\n")
  summary = {
      "space": space.name, "algorithm": config.search.algorithm,
      "genotype": space.format(best), "genotype_json": space.to_json(best),
      "result": result.to_json(),
      "eval_examples": getattr(evaluator, "num_examples", None),
      "same_budget_random_search": None if baseline is None else baseline.to_json(),
      "train_seconds": train_seconds, "total_seconds": time.time() - t0,
  }
  if main:
    write_atomic(os.path.join(workdir, "genotype.json"),
                 json.dumps(summary, indent=2) + "\n")
  message = (f"{config.search.algorithm}: best validation loss {result.best_loss:.4f} "
             f"(score {result.best_score:.4f}); {result.budget['total_evaluations']} "
             "evaluations")
  if baseline is not None:
    message += (f"; random search with the same budget: loss {baseline.best_loss:.4f} "
                f"over {baseline.budget['total_evaluations']} evaluations")
  summary["message"] = message
  logging.info("%s\nGenotype (written to %s):\n%s", message,
               os.path.join(workdir, "genotype.txt"), space.format(best))
  return summary
