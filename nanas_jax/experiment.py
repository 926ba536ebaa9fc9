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

import json
import os
import tempfile
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from nanas_jax import data as data_lib
from nanas_jax import spaces
from nanas_jax.nn.nb201_supernet import SearchNetworkNB201
from nanas_jax.nn.supernet import SearchNetwork
from nanas_jax.search.random_search import (na_random_search, random_search,
                                            random_search_same_budget)
from nanas_jax.search.bilevel import BilevelSearch, neighbors_per_step, validate_search_config
from nanas_jax.search.evaluators import SupernetEvaluator, TabularEvaluator
from nanas_jax.search.weight_sharing import (RS_ALGORITHMS, WeightSharingTrainer,
                                             validate_rs_config)

FINAL_FILES = ("genotype.txt", "genotype.json")
SUPERNET_FILE = "supernet.msgpack"


def build_supernet(config: ml_collections.ConfigDict, num_classes: int):
  """The search supernet of ``config.model`` for ``num_classes`` classes: the DARTS
  network of ``layers`` cells, or the NAS-Bench-201 network with ``layers`` cells per
  stage."""
  if config.space == "nb201":
    return SearchNetworkNB201(num_classes=num_classes, channels=config.channels,
                              cells_per_stage=config.layers)
  return SearchNetwork(num_classes=num_classes, channels=config.channels,
                       layers=config.layers, steps=config.steps,
                       multiplier=config.multiplier, stem_multiplier=config.stem_multiplier,
                       dw_impl=config.depthwise_impl)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks what can be checked before any data is read or anything compiled."""
  spaces.get_space(config.model.space)
  if config.search.algorithm in RS_ALGORITHMS:
    validate_rs_config(config.search)
    if config.search.rs.evaluator == "table" and config.model.space != "nb201":
      raise ValueError(f"config.search.rs.evaluator = 'table' needs config.model.space = "
                       f"'nb201' (got {config.model.space!r}): only NAS-Bench-201 is "
                       "tabulated.")
  else:
    validate_search_config(config.search)
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
  _validate_batch(config)


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


def write_atomic(path: str, text: str) -> None:
  """Writes ``text`` to ``path`` through a temporary file and a rename."""
  directory = os.path.dirname(path) or "."
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
  with os.fdopen(fd, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def save_supernet(workdir: str, state) -> None:
  """The trained supernet variables (params, batch_stats), for flatness reports; written
  atomically. Full checkpoints with optimizer states and resume arrive with orbax."""
  payload = flax.serialization.to_bytes(
      {"params": state.params, "batch_stats": state.batch_stats})
  path = os.path.join(workdir, SUPERNET_FILE)
  fd, tmp = tempfile.mkstemp(dir=workdir, prefix=".tmp-")
  with os.fdopen(fd, "wb") as f:
    f.write(payload)
  os.replace(tmp, path)


def load_supernet(workdir: str, template) -> dict[str, Any]:
  """Reads `save_supernet`'s file into the structure of ``template`` (a variables dict)."""
  path = os.path.join(workdir, SUPERNET_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: run a search with --workdir={workdir} first.")
  with open(path, "rb") as f:
    return flax.serialization.from_bytes(template, f.read())


def append_jsonl(path: str, record: dict[str, Any]) -> None:
  with open(path, "a") as f:
    f.write(json.dumps(record) + "\n")


def evaluate(eval_fn, state, images: np.ndarray, labels: np.ndarray,
             batch_size: int) -> tuple[float, float]:
  """Mean loss and accuracy over a whole split, in fixed-size chunks (one compile): the
  last chunk is padded by wrapping around and its padding masked out."""
  n = len(images)
  loss_sum, correct = 0.0, 0.0
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size) % n
    keep = np.arange(start, start + batch_size) < n
    losses, hits = eval_fn(state, images[idx], labels[idx])
    losses, hits = np.asarray(losses), np.asarray(hits)
    loss_sum += float(losses[keep].sum())
    correct += float(hits[keep].sum())
  return loss_sum / n, correct / n


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs the experiment of ``config`` (bilevel or random search) into ``workdir``."""
  if config.search.algorithm in RS_ALGORITHMS:
    return run_random_search(config, workdir)
  return run_search(config, workdir)


def _start(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Validates the config, guards the workdir and records the config in it."""
  validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  existing = [f for f in FINAL_FILES if os.path.exists(os.path.join(workdir, f))]
  if existing:
    raise FileExistsError(
        f"{workdir} already holds a finished search ({', '.join(existing)}); choose a new "
        "--workdir (results are never overwritten).")
  write_atomic(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))


def _prepare(config: ml_collections.ConfigDict, workdir: str):
  """`_start`, then the data: ``(space, dataset, steps per epoch)``."""
  _start(config, workdir)
  space = spaces.get_space(config.model.space)
  dataset = data_lib.load_search_data(
      config.data.name, train_portion=config.data.train_portion, seed=config.seed,
      data_dir=config.data.data_dir, max_examples=config.data.max_examples)
  batch = config.data.batch_size
  n_train, n_val = len(dataset.train_images), len(dataset.val_images)
  if batch > min(n_train, n_val):
    raise ValueError(f"config.data.batch_size = {batch} exceeds the search split sizes "
                     f"(train {n_train}, val {n_val}); lower it.")
  return space, dataset, data_lib.steps_per_epoch(min(n_train, n_val), batch)


def run_search(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs the bilevel (DARTS / NA-DARTS) search of ``config`` into ``workdir``."""
  space, dataset, steps_per_epoch = _prepare(config, workdir)
  batch = config.data.batch_size
  model = build_supernet(config.model, dataset.num_classes)
  search = BilevelSearch(model, space, config.search, steps_per_epoch)

  rng = jax.random.key(config.seed)
  t0 = time.time()
  state = search.init(rng, jnp.asarray(dataset.train_images[:1]))
  init_seconds = time.time() - t0
  step_fn = search.jit_step()
  eval_fn = search.eval_fn()
  data_rng = np.random.default_rng(config.seed)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  logging.info("Search: %s, %d epochs x %d steps, batch %d, %s.", config.search.algorithm,
               config.search.epochs, steps_per_epoch, batch, dataset.name)

  compile_seconds = None
  best = None
  for epoch in range(config.search.epochs):
    epoch_start = time.time()
    train_iter = data_lib.batches(dataset.train_images, dataset.train_labels, batch, data_rng)
    val_iter = data_lib.batches(dataset.val_images, dataset.val_labels, batch, data_rng)
    totals: dict[str, float] = {}
    for i, (train_batch, val_batch) in enumerate(zip(train_iter, val_iter)):
      if i == steps_per_epoch:
        break
      t = time.time()
      state, metrics = step_fn(state, train_batch, val_batch)
      metrics = jax.device_get(metrics)
      if compile_seconds is None:
        compile_seconds = time.time() - t
        logging.info("First step (compile + run): %.1f s", compile_seconds)
      for key, value in metrics.items():
        totals[key] = totals.get(key, 0.0) + float(value)
      step = int(state.step)
      if step % config.log_every_steps == 0:
        append_jsonl(metrics_path, {"step": step, **{k: float(v) for k, v in metrics.items()}})
      if not np.isfinite(float(metrics["train_loss"])) or not np.isfinite(
          float(metrics["arch_loss"])):
        raise FloatingPointError(
            f"non-finite loss at step {step} (train {metrics['train_loss']}, arch "
            f"{metrics['arch_loss']}); lower config.search.weights.lr or arch.lr.")
    means = {k: v / steps_per_epoch for k, v in totals.items()}
    val_loss, val_acc = evaluate(eval_fn, state, dataset.val_images, dataset.val_labels,
                                 batch)
    weights = np.asarray(jax.nn.softmax(state.alpha, -1))
    genotype = space.derive(weights)
    record = {"epoch": epoch + 1, "step": int(state.step), "val_loss": val_loss,
              "val_accuracy": val_acc, "epoch_seconds": time.time() - epoch_start,
              **{f"mean_{k}": v for k, v in means.items()}}
    append_jsonl(metrics_path, record)
    append_jsonl(os.path.join(workdir, "genotypes.jsonl"),
                 {"epoch": epoch + 1, "genotype": space.format(genotype),
                  "val_accuracy": val_acc})
    if best is None or val_acc > best["val_accuracy"]:
      best = {"epoch": epoch + 1, "val_accuracy": val_acc, "genotype": genotype}
    logging.info("epoch %d/%d  train loss %.4f acc %.3f  arch loss %.4f  val loss %.4f "
                 "acc %.3f  (%.1f s)\n  genotype: %s", epoch + 1, config.search.epochs,
                 means["train_loss"], means["train_accuracy"], means["arch_loss"], val_loss,
                 val_acc, record["epoch_seconds"], space.format(genotype))

  final = space.derive(np.asarray(jax.nn.softmax(state.alpha, -1)))
  save_supernet(workdir, state)
  write_atomic(os.path.join(workdir, "genotype.txt"), space.format(final) + "\n")
  summary = {
      "space": space.name, "genotype": space.format(final),
      "genotype_json": space.to_json(final), "final_val_accuracy": val_acc,
      "best_epoch": best["epoch"], "best_val_accuracy": best["val_accuracy"],
      "best_genotype": space.format(best["genotype"]),
      "alpha": np.asarray(state.alpha).tolist(), "init_seconds": init_seconds,
      "first_step_seconds": compile_seconds, "total_seconds": time.time() - t0,
  }
  write_atomic(os.path.join(workdir, "genotype.json"), json.dumps(summary, indent=2) + "\n")
  summary["message"] = (f"Search finished: validation accuracy {val_acc:.3f} (best "
                        f"{best['val_accuracy']:.3f} at epoch {best['epoch']}).")
  logging.info("Final genotype (written to %s):\n%s", os.path.join(workdir, "genotype.txt"),
               space.format(final))
  return summary


def _train_weight_sharing(config, workdir, space, dataset, steps_per_epoch):
  """Trains the supernet on one sampled architecture per step; returns the state and a
  `SupernetEvaluator` on the first ``rs.eval_batches`` validation batches."""
  batch, rs = config.data.batch_size, config.search.rs
  model = build_supernet(config.model, dataset.num_classes)
  trainer = WeightSharingTrainer(model, space, config.search, steps_per_epoch)
  state = trainer.init(jax.random.key(config.seed), jnp.asarray(dataset.train_images[:1]))
  data_rng = np.random.default_rng(config.seed)
  arch_rng = np.random.default_rng(config.seed + 1)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  for epoch in range(config.search.epochs):
    epoch_start, totals = time.time(), {}
    train_iter = data_lib.batches(dataset.train_images, dataset.train_labels, batch, data_rng)
    for i, train_batch in enumerate(train_iter):
      if i == steps_per_epoch:
        break
      state, metrics = trainer.step(state, train_batch, arch_rng)
      metrics = jax.device_get(metrics)
      if not np.isfinite(float(metrics["train_loss"])):
        raise FloatingPointError(f"non-finite training loss at step {int(state.step)}; "
                                 "lower config.search.weights.lr.")
      for key, value in metrics.items():
        totals[key] = totals.get(key, 0.0) + float(value)
    means = {k: v / steps_per_epoch for k, v in totals.items()}
    append_jsonl(metrics_path, {"epoch": epoch + 1, "step": int(state.step),
                                "epoch_seconds": time.time() - epoch_start,
                                **{f"mean_{k}": v for k, v in means.items()}})
    logging.info("epoch %d/%d  train loss %.4f acc %.3f (one sampled architecture per "
                 "step, %.1f s)", epoch + 1, config.search.epochs, means["train_loss"],
                 means["train_accuracy"], time.time() - epoch_start)
  eval_iter = data_lib.batches(dataset.val_images, dataset.val_labels, batch,
                               np.random.default_rng(config.seed + 2))
  eval_batches = [b for _, b in zip(range(rs.eval_batches), eval_iter)]
  evaluator = SupernetEvaluator(
      model, {"params": state.params, "batch_stats": state.batch_stats}, space,
      eval_batches, chunk_size=rs.chunk_size)
  return state, evaluator


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
  else:
    space, dataset, steps_per_epoch = _prepare(config, workdir)
    state, evaluator = _train_weight_sharing(config, workdir, space, dataset,
                                             steps_per_epoch)
  train_seconds = time.time() - t0
  search_rng = np.random.default_rng(config.seed + 3)
  if config.search.algorithm == "na_rs":
    result = na_random_search(
        space, evaluator, rs.num_candidates, search_rng, radius=rs.radius,
        num_neighbors=rs.num_neighbors, include_center=rs.include_center,
        aggregation=rs.aggregation, tau=rs.tau)
    baseline = random_search_same_budget(space, evaluator, result,
                                                np.random.default_rng(config.seed + 4))
  else:
    result = random_search(space, evaluator, rs.num_candidates, search_rng)
    baseline = None
  best = space.decode(result.best_codes)
  if state is not None:
    save_supernet(workdir, state)
  write_atomic(os.path.join(workdir, "genotype.txt"), space.format(best) + "\n")
  summary = {
      "space": space.name, "algorithm": config.search.algorithm,
      "genotype": space.format(best), "genotype_json": space.to_json(best),
      "result": result.to_json(),
      "same_budget_random_search": None if baseline is None else baseline.to_json(),
      "train_seconds": train_seconds, "total_seconds": time.time() - t0,
  }
  write_atomic(os.path.join(workdir, "genotype.json"), json.dumps(summary, indent=2) + "\n")
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
