"""A search study in one command: ``config.task = 'study'`` (DARTS vs NA-DARTS by default).

`run_study(config, workdir)` runs every method of ``config.study.methods`` with every seed
of ``config.study.seeds``; per run, under ``workdir/runs/<method>-seed<seed>/``:

1. ``search/``: the bilevel search of ``config.search`` with the method's settings and the
   seed (`experiment.run`), which records the alpha entropy and the neighbor loss spread of
   every epoch;
2. the flatness report of its genotype at distances 1..``flatness_radius`` in the trained
   supernet, each neighbor's BatchNorm statistics recalibrated (`flatness.report`);
3. ``train/``: the genotype trained from scratch with ``config.train``, test top-1 on the
   held-out test split (`train.run.run_train`);
4. ``neighbor-<i>/``: ``config.study.neighbors`` random distance-1 neighbors of the genotype
   (drawn with the run's seed), each trained the same way: the genotype's true
   neighborhood, mean and worst.

Then it writes ``study.json`` (every number), ``study.md`` (mean +- std per method, then
one row per run) and three pictures: ``entropy.png`` and ``spread.png`` (alpha entropy and
neighbor loss spread per epoch, one line per run), ``retrained.png`` (each genotype's test
accuracy beside its neighbors').

Resume: a rerun of the same command skips every finished piece (a search with its
``genotype.json``, a flatness report with the same settings, a training with its
``results.json``) and resumes an unfinished one from its checkpoints; a workdir with a
``study.md`` is refused (results are never overwritten).

Config layout::

  config.task = 'study'
  config.search   a search config (task 'search', bilevel; its seed is replaced per run)
  config.train    a training config (task 'train'; the genotype is set per run)
  config.study    {methods: tuple of METHODS names, seeds: tuple of ints, neighbors: int,
                   flatness_radius, flatness_num_neighbors, flatness_eval_batches,
                   flatness_recalibrate_batches}
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import ml_collections
import numpy as np
from absl import logging
from matplotlib.figure import Figure

from nanas_jax import experiment, flatness, loop, neighborhood, parallel, spaces, viz
from nanas_jax import workdir as workdir_lib
from nanas_jax.files import write_atomic
from nanas_jax.train import run as train_run

STUDY_FILE, RESULTS_FILE = "study.md", "study.json"
# Each method is a set of config.search.search overrides.
METHODS: dict[str, dict[str, Any]] = {
    "darts": {"algorithm": "darts"},
    "na_darts": {"algorithm": "na_darts", "neighbors.aggregation": "mean"},
    "na_darts_max": {"algorithm": "na_darts", "neighbors.aggregation": "max"},
}
# Operations without parameters (a stride-2 skip_connect is a FactorizedReduce and has some;
# the count is per genotype edge, as papers count skip connections).
PARAMETER_FREE = ("max_pool_3x3", "avg_pool_3x3", "skip_connect")


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def validate_study_config(config: ml_collections.ConfigDict) -> None:
  """Checks every block before anything runs; a ValueError names the field."""
  for block in ("search", "train", "study"):
    if not isinstance(config.get(block), ml_collections.ConfigDict):
      raise ValueError(f"config.{block} is missing: a study config has search, train and "
                       "study blocks (see configs/study_digits.py).")
  study = config.study
  methods = tuple(study.get("methods") or ())
  unknown = [m for m in methods if m not in METHODS]
  if not methods or unknown or len(set(methods)) != len(methods):
    raise ValueError(f"config.study.methods = {methods!r} is invalid: expected distinct "
                     f"names from {tuple(METHODS)}.")
  seeds = tuple(study.get("seeds") or ())
  if not seeds or not all(_is_int(s) and s >= 0 for s in seeds) or len(set(seeds)) != len(seeds):
    raise ValueError(f"config.study.seeds = {seeds!r} is invalid: expected distinct "
                     "integers >= 0.")
  for field, least in (("neighbors", 0), ("flatness_radius", 1),
                       ("flatness_eval_batches", 1), ("flatness_recalibrate_batches", 0)):
    if not _is_int(study.get(field)) or study.get(field) < least:
      raise ValueError(f"config.study.{field} = {study.get(field)!r} is invalid: expected "
                       f"an integer >= {least}.")
  count = study.get("flatness_num_neighbors")
  if count is not None and (not _is_int(count) or count < 1):
    raise ValueError(f"config.study.flatness_num_neighbors = {count!r} is invalid: expected "
                     "an integer >= 1 or None (every neighbor).")
  for method in methods:
    experiment.validate_config(method_config(config.search, method, seeds[0]))
  if config.search.model.space != "darts":
    raise ValueError(f"config.search.model.space = {config.search.model.space!r} is "
                     "invalid: expected 'darts' (the genotypes are trained as DARTS "
                     "networks).")
  space = spaces.get_space("darts")
  neighborhood.check_reach(space, study.flatness_radius, "config.study.flatness_radius")
  nearest = neighborhood.space_neighborhood_size(space, 1)
  if study.neighbors > nearest:
    raise ValueError(f"config.study.neighbors = {study.neighbors} is invalid: a genotype has "
                     f"{nearest} neighbors at distance 1 to retrain; use at most {nearest}.")
  train_run.validate_run_config(config.train)


def method_config(search: ml_collections.ConfigDict, method: str,
                  seed: int) -> ml_collections.ConfigDict:
  """The search config of one run: ``search`` with the method's overrides and the seed."""
  config = search.copy_and_resolve_references()
  config.seed = seed
  for dotted, value in METHODS[method].items():
    node = config.search
    *parents, leaf = dotted.split(".")
    for name in parents:
      node = node[name]
    node[leaf] = value
  return config


def parameter_free_ops(genotype) -> int:
  """How many of the genotype's edges (both cells) hold a parameter-free operation."""
  return sum(op in PARAMETER_FREE for op, _ in genotype.normal + genotype.reduce)


def _read_json(path: str) -> dict[str, Any]:
  with open(path) as f:
    return json.load(f)


def _epoch_records(search_dir: str) -> list[dict[str, Any]]:
  """The per-epoch records of a search's ``metrics.jsonl`` (the last one of each epoch,
  should a resumed run have written one twice)."""
  records: dict[int, dict[str, Any]] = {}
  with open(os.path.join(search_dir, loop.METRICS_FILE)) as f:
    for line in f:
      row = json.loads(line)
      if "epoch" in row and "val_accuracy" in row:
        records[row["epoch"]] = row
  return [records[e] for e in sorted(records)]


def _train(train_config: ml_collections.ConfigDict, genotype_text: str, workdir: str,
           seed: int) -> dict[str, Any]:
  """Trains a genotype from scratch into ``workdir``, or reads the finished results."""
  path = os.path.join(workdir, train_run.RESULTS_FILE)
  if os.path.exists(path):
    return _read_json(path)
  config = train_config.copy_and_resolve_references()
  config.model.genotype = genotype_text
  config.seed = seed
  return train_run.run_train(config, workdir)


def run_one(config: ml_collections.ConfigDict, method: str, seed: int,
            run_dir: str) -> dict[str, Any]:
  """Search, flatness, retraining of the genotype and of its neighbors for one run."""
  space = spaces.get_space("darts")
  study = config.study
  search_dir = os.path.join(run_dir, "search")
  if os.path.exists(os.path.join(search_dir, "genotype.json")):
    search = _read_json(os.path.join(search_dir, "genotype.json"))
  else:
    search = experiment.run(method_config(config.search, method, seed), search_dir)
  genotype = space.parse(search["genotype"])
  flat, _ = flatness.find_or_report(
      search_dir, search["genotype"], radius=study.flatness_radius,
      num_neighbors=study.flatness_num_neighbors, eval_batches=study.flatness_eval_batches,
      recalibrate_batches=study.flatness_recalibrate_batches, seed=seed)
  centre = _train(config.train, search["genotype"], os.path.join(run_dir, "train"), seed)
  neighbors = neighborhood.sample_neighbors(
      space, space.encode(genotype), 1, study.neighbors, np.random.default_rng([seed, 1]))
  trained = []
  for i, codes in enumerate(neighbors):
    text = space.format(space.decode(codes))
    result = _train(config.train, text, os.path.join(run_dir, f"neighbor-{i}"), seed)
    trained.append({"genotype": text, "test_top1": result["test_top1"]})
  epochs = _epoch_records(search_dir)
  neighbor_top1 = [n["test_top1"] for n in trained]
  radii = {r["radius"]: r for r in flat["radii"]}
  return {
      "method": method, "seed": seed, "genotype": search["genotype"],
      "parameter_free_ops": parameter_free_ops(genotype),
      "supernet_val_accuracy": search["final_val_accuracy"],
      "alpha_entropy": [e["alpha_entropy"] for e in epochs],
      "neighbor_loss_spread": [e.get("mean_neighbor_loss_std") for e in epochs],
      "genotype_stable_epochs": epochs[-1].get("genotype_stable_epochs"),
      "flatness": {
          "centre_accuracy": flat["center"]["accuracy"],
          **{f"radius{d}_{k}_accuracy": radii[d]["accuracy"][k]
             for d in radii for k in ("mean", "worst")}},
      "test_top1": centre["test_top1"],
      "neighbors": trained,
      "neighbors_mean_top1": float(np.mean(neighbor_top1)) if trained else None,
      "neighbors_worst_top1": float(np.min(neighbor_top1)) if trained else None,
      "search_seconds": search.get("total_seconds"),
  }


# The columns of study.md: (label, how to read a run's value).
COLUMNS = (
    ("final alpha entropy", lambda r: r["alpha_entropy"][-1]),
    ("supernet val acc", lambda r: r["supernet_val_accuracy"]),
    ("param-free ops", lambda r: r["parameter_free_ops"]),
    ("flatness: centre acc", lambda r: r["flatness"]["centre_accuracy"]),
    ("r=1 mean acc", lambda r: r["flatness"].get("radius1_mean_accuracy")),
    ("r=1 worst acc", lambda r: r["flatness"].get("radius1_worst_accuracy")),
    ("r=2 mean acc", lambda r: r["flatness"].get("radius2_mean_accuracy")),
    ("r=2 worst acc", lambda r: r["flatness"].get("radius2_worst_accuracy")),
    ("retrained top-1", lambda r: r["test_top1"]),
    ("neighbors mean top-1", lambda r: r["neighbors_mean_top1"]),
    ("neighbors worst top-1", lambda r: r["neighbors_worst_top1"]),
)


def _fmt(value) -> str:
  if value is None:
    return "-"
  return f"{value:d}" if isinstance(value, int) else f"{value:.4f}"


def format_study(runs: list[dict[str, Any]], config: ml_collections.ConfigDict,
                 seconds: float) -> str:
  """The markdown of ``study.md``."""
  s, t, st = config.search, config.train, config.study
  header = "| " + " | ".join(["method", "runs"] + [c for c, _ in COLUMNS]) + " |"
  rule = "| " + " | ".join(["---"] * (len(COLUMNS) + 2)) + " |"
  lines = [
      "# Search study", "",
      f"Methods {', '.join(st.methods)}; seeds {', '.join(map(str, st.seeds))}. Search: "
      f"{s.data.name} ({s.data.get('max_examples') or 'all'} examples, half train, half "
      f"validation), {s.model.layers} cells, C={s.model.channels}, batch "
      f"{s.data.batch_size}, {s.search.epochs} epochs ({s.search.get('warmup_epochs', 0)} "
      f"weight-only), arch lr {s.search.arch.lr}, K={s.search.neighbors.num} neighbors "
      f"({s.search.neighbors.kind}, radius {s.search.neighbors.radius}). Flatness: "
      f"supernet accuracy of the genotype and of its neighbors at distance 1.."
      f"{st.flatness_radius} ({st.flatness_num_neighbors or 'all'} per distance, "
      f"{st.flatness_recalibrate_batches} BatchNorm recalibration batches each). "
      f"Retraining: {t.model.layers} cells, C={t.model.channels}, {t.train.epochs} epochs, "
      f"test top-1 on the held-out digits; {st.neighbors} random distance-1 neighbors of "
      f"each genotype trained the same way. Wall time {seconds / 60:.1f} min (this "
      "command).", "",
      "## Mean +- std over seeds", "", header, rule]
  for method in st.methods:
    mine = [r for r in runs if r["method"] == method]
    cells = []
    for _, get in COLUMNS:
      values = [get(r) for r in mine if get(r) is not None]
      cells.append(f"{np.mean(values):.4f} +- {np.std(values):.4f}" if values else "-")
    lines.append(f"| {method} | {len(mine)} | " + " | ".join(cells) + " |")
  lines += ["", "## Runs", "", header.replace("| runs |", "| seed |"), rule]
  for r in runs:
    lines.append(f"| {r['method']} | {r['seed']} | "
                 + " | ".join(_fmt(get(r)) for _, get in COLUMNS) + " |")
  lines += ["", "## Genotypes", ""]
  for r in runs:
    lines += [f"- {r['method']}, seed {r['seed']} (stable for the last "
              f"{r['genotype_stable_epochs']} epochs): `{r['genotype']}`"]
  lines += ["", "![alpha entropy](entropy.png)", "", "![neighbor loss spread](spread.png)",
            "", "![retrained accuracy](retrained.png)", ""]
  return "\n".join(lines)


def _figure_per_epoch(runs, key: str, ylabel: str, methods) -> Figure:
  fig = Figure(figsize=(6, 4))
  ax = fig.add_subplot(1, 1, 1)
  colors = {m: f"C{i}" for i, m in enumerate(methods)}
  for r in runs:
    values = [np.nan if v is None else v for v in r[key]]
    ax.plot(range(1, len(values) + 1), values, color=colors[r["method"]], marker="o",
            markersize=3, label=r["method"])
  handles, labels = ax.get_legend_handles_labels()
  unique = dict(zip(labels, handles))
  ax.legend(unique.values(), unique.keys())
  ax.set_xlabel("epoch")
  ax.set_ylabel(ylabel)
  fig.tight_layout()
  return fig


def _figure_retrained(runs, methods) -> Figure:
  fig = Figure(figsize=(1.5 + 0.6 * len(runs), 4))
  ax = fig.add_subplot(1, 1, 1)
  for i, r in enumerate(runs):
    color = f"C{methods.index(r['method'])}"
    ax.scatter([i] * len(r["neighbors"]), [n["test_top1"] for n in r["neighbors"]],
               color=color, alpha=0.5, s=14)
    ax.scatter([i], [r["test_top1"]], color=color, marker="D", s=40, edgecolor="black")
  ax.set_xticks(range(len(runs)))
  ax.set_xticklabels([f"{r['method']}\nseed {r['seed']}" for r in runs], fontsize=7)
  ax.set_ylabel("test top-1 (diamond: genotype, dots: its neighbors)")
  fig.tight_layout()
  return fig


def run_study(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs the study of ``config`` into ``workdir`` (see the module docstring)."""
  validate_study_config(config)
  loop.check_workdir(workdir)
  path = os.path.join(workdir, STUDY_FILE)
  if os.path.exists(path):
    raise FileExistsError(f"{workdir} already holds a finished study ({STUDY_FILE}); choose "
                          "a new --workdir (results are never overwritten).")
  parallel.initialize(config.search.get("parallel"))
  if parallel.is_main_process():
    os.makedirs(workdir, exist_ok=True)
    workdir_lib.record_config(config, workdir)
  t0 = time.time()
  runs = []
  for method in config.study.methods:
    for seed in config.study.seeds:
      logging.info("Study: %s, seed %d.", method, seed)
      runs.append(run_one(config, method, seed,
                          os.path.join(workdir, "runs", f"{method}-seed{seed}")))
  seconds = time.time() - t0
  methods = list(config.study.methods)
  if parallel.is_main_process():
    write_atomic(os.path.join(workdir, RESULTS_FILE),
                 json.dumps({"runs": runs, "seconds": seconds}, indent=2) + "\n")
    viz.save_figure(_figure_per_epoch(runs, "alpha_entropy", "mean alpha entropy (nats)",
                                      methods), os.path.join(workdir, "entropy.png"))
    viz.save_figure(_figure_per_epoch(runs, "neighbor_loss_spread",
                                      "neighbor loss std (architecture step)", methods),
                    os.path.join(workdir, "spread.png"))
    viz.save_figure(_figure_retrained(runs, methods), os.path.join(workdir, "retrained.png"))
    write_atomic(path, format_study(runs, config, seconds), replace=False)
  message = f"Study finished: {len(runs)} runs in {seconds / 60:.1f} min; see {path}."
  logging.info(message)
  return {"runs": runs, "message": message}
