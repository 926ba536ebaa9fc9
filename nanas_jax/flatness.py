"""Flatness report: how the validation loss and accuracy of a genotype's neighbors spread.

The paper's idea is that good architectures sit in flat regions of the architecture space:
their neighbors at small distances score nearly as well. For a genotype and the trained
supernet of a search run, this module evaluates the neighbors at EXACTLY distance
d = 1..radius (``nanas_jax.neighborhood.distance``: the number of edges whose op differs)
with the weight-sharing supernet and reports, per radius, the count, mean, std
(population, ddof=0), worst (max loss), best (min loss) and the raw losses, next to the
centre's loss; accuracies the same way.

- ``neighborhood_profile(space, codes, evaluate, radius, num_neighbors, rng)``: the pure
  part. All neighbors at distance d are enumerated when there are at most
  ``num_neighbors`` of them (or ``num_neighbors`` is None); otherwise ``num_neighbors``
  of them are drawn uniformly without replacement. One batched ``evaluate`` call per
  radius (plus one for the centre).
- ``report(workdir, ...)``: rebuilds data, supernet and genotype from a search workdir
  (``config.json``, ``supernet.msgpack``, ``genotype.txt``), runs the profile and writes
  ``flatness.json`` and ``flatness.png``.

Output names: results are never overwritten. The first report of a workdir is
``flatness.json`` / ``flatness.png``; later ones are ``flatness-1.*``, ``flatness-2.*``,
... (the next free n). Each file is written to a temporary file and hard-linked into
place, which fails rather than replaces if the name was taken meanwhile.

CLI: ``python -m nanas_jax.flatness --workdir=DIR [--genotype=NAME_OR_TEXT] [--radius=2]
[--num_neighbors=32] [--eval_batches=4] [--recalibrate_batches=4] [--seed=0]``. The
radius is at most the number of edges the genotype keeps (DARTS 16, NAS-Bench-201 6: no
neighbor is farther), checked before any data is read; the report logs its progress and
ETA every 10 s; Ctrl-C stops it at once (nothing is written until the end); user errors
exit with status 2 (`nanas_jax.cli`).

Evaluation protocol: each architecture's BatchNorm statistics are re-estimated on
``recalibrate_batches`` batches of the search-training half (`nanas_jax.nn.recalibration`:
the supernet's running statistics belong to the mixture it was trained with, not to one
architecture), then it runs in evaluation mode on the first ``eval_batches`` batches of the
search-validation half, drawn in the order ``np.random.default_rng(config.seed + 2)``.
With ``recalibrate_batches=0`` BatchNorm uses each evaluation batch's own statistics
(``train=True``, updates discarded) instead.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nanas_jax import cli
from nanas_jax import neighborhood
from nanas_jax import spaces
from nanas_jax.files import write_atomic
from nanas_jax.search.evaluators import SupernetEvaluator, filled

REPORT_STEM = "flatness"


# ----------------------------------------------------------------- neighbors at distance d
def count_at_distance(space, codes, d: int) -> int:
  """Number of neighbors of ``codes`` at exactly distance ``d``."""
  return neighborhood.neighborhood_size(space, codes, d, exact=True)


def enumerate_at_distance(space, codes, d: int) -> np.ndarray:
  """All neighbors at exactly distance ``d``, int32 ``[N, T, E]``."""
  return neighborhood.enumerate_neighbors(space, codes, d, exact=True)


def sample_at_distance(space, codes, d: int, k: int, rng: np.random.Generator) -> np.ndarray:
  """``k`` distinct neighbors at exactly distance ``d``, uniform without replacement."""
  return neighborhood.sample_neighbors(space, codes, d, k, rng, exact=True)


# ------------------------------------------------------------------------------- profile
def _check_num_neighbors(num_neighbors):
  if num_neighbors is None:
    return None
  if (isinstance(num_neighbors, bool) or not isinstance(num_neighbors, (int, np.integer))
      or num_neighbors < 1):
    raise ValueError(f"num_neighbors must be an integer >= 1 or None, got {num_neighbors!r}.")
  return int(num_neighbors)


def _split(result, n: int) -> tuple[np.ndarray, np.ndarray | None]:
  """An evaluator's answer: losses, or ``(losses, accuracies)``."""
  if isinstance(result, tuple):
    losses, accuracies = result
    accuracies = np.asarray(accuracies, np.float64)
  else:
    losses, accuracies = result, None
  losses = np.asarray(losses, np.float64)
  if losses.shape != (n,) or (accuracies is not None and accuracies.shape != (n,)):
    raise ValueError(f"the evaluator must return {n} losses (and optionally {n} "
                     f"accuracies) for {n} architectures; got shape {losses.shape}.")
  return losses, accuracies


def _stats(values: np.ndarray, higher_is_worse: bool = True) -> dict[str, Any]:
  values = np.asarray(values, np.float64)
  if values.size == 0:
    return {"mean": None, "std": None, "worst": None, "best": None, "median": None}
  worst, best = (values.max(), values.min()) if higher_is_worse else (values.min(),
                                                                      values.max())
  return {"mean": float(values.mean()), "std": float(values.std()), "worst": float(worst),
          "best": float(best), "median": float(np.median(values))}


def neighborhood_profile(space, codes, evaluate: Callable[[np.ndarray], Any], radius: int,
                         num_neighbors: int | None = None,
                         rng: np.random.Generator | None = None) -> dict[str, Any]:
  """Losses (and accuracies) of the neighbors of ``codes`` at each distance 1..radius.

  Args:
    space: a ``SearchSpace`` or its name.
    codes: the centre architecture's encoding ``[T, E]``.
    evaluate: ``codes [N, T, E] -> losses [N]`` (lower is better) or ``-> (losses,
      accuracies)``; called once, on the centre and then every distance's neighbors.
    radius: largest distance, >= 1.
    num_neighbors: per distance, enumerate all neighbors when there are at most this many
      (always when None), else sample this many uniformly without replacement.
    rng: the sampling generator (default ``np.random.default_rng(0)``).

  Returns:
    ``{"space", "center": {"codes", "loss", "accuracy"}, "radii": [{"radius", "count",
    "size", "enumerated", "loss": {mean, std, worst, best, median}, "losses", "codes",
    "accuracy": {...} | None, "accuracies" | None}, ...]}``; ``size`` is the number of
    neighbors at that distance, ``count`` the number evaluated; std is the population
    std; for accuracy "worst" is the minimum.
  """
  space = spaces.get_space(space) if isinstance(space, str) else space
  radius = neighborhood.check_radius(radius)
  num_neighbors = _check_num_neighbors(num_neighbors)
  rng = np.random.default_rng(0) if rng is None else rng
  codes = space.check_codes(codes)
  space.decode(codes)
  neighborhood.check_reach(space, radius, "radius")
  radii = []  # (distance, its size, enumerated, its neighbors)
  for d in range(1, radius + 1):
    size = count_at_distance(space, codes, d)
    enumerated = num_neighbors is None or size <= num_neighbors
    if enumerated:
      batch = enumerate_at_distance(space, codes, d)
    else:
      batch = sample_at_distance(space, codes, d, num_neighbors, rng)
    radii.append((d, size, enumerated, batch.reshape(-1, *codes.shape)))
  # One request: an evaluator that works in pieces fills only the last one.
  every = np.concatenate([codes[None]] + [batch for *_, batch in radii])
  all_losses, all_accuracies = _split(evaluate(every), len(every))
  out = {"space": space.name,
         "center": {"codes": codes.tolist(), "loss": float(all_losses[0]),
                    "accuracy": None if all_accuracies is None else float(all_accuracies[0])},
         "num_neighbors": num_neighbors, "radii": []}
  start = 1
  for d, size, enumerated, batch in radii:
    losses = all_losses[start:start + len(batch)]
    accuracies = None
    if all_accuracies is not None and len(batch):
      accuracies = all_accuracies[start:start + len(batch)]
    start += len(batch)
    out["radii"].append({
        "radius": d, "count": int(len(batch)), "size": int(size), "enumerated": enumerated,
        "loss": _stats(losses), "losses": losses.tolist(), "codes": batch.tolist(),
        "accuracy": None if accuracies is None else _stats(accuracies, False),
        "accuracies": None if accuracies is None else accuracies.tolist()})
  return out


# ------------------------------------------------------------------------------- report
def parse_genotype(space, text: str):
  """A genotype of ``space`` from a name (DARTS: ``DARTS_V2`` ...) or its text."""
  if not isinstance(text, str) or not text.strip():
    raise ValueError(f"genotype must be a non-empty name or text, got {text!r}.")
  text = text.strip()
  try:
    if space.name == "darts":
      return spaces.get_genotype(text)
    return space.parse(text)
  except ValueError as e:
    raise ValueError(f"bad {space.name} genotype {cli.clip(text)!r}: {e}") from e


def _read_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{path} not found: {workdir} is not a search workdir; run a search first "
        f"(python -m nanas_jax.main --config=... --workdir={workdir}).")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def _stem(n: int) -> str:
  return REPORT_STEM if n == 0 else f"{REPORT_STEM}-{n}"


def _write_outputs(workdir: str, payload: dict, plot_bytes: bytes | None):
  """Writes JSON (and PNG) under the first free ``flatness[-n]`` name; never overwrites."""
  n = 0
  while True:
    stem = _stem(n)
    json_path = os.path.join(workdir, stem + ".json")
    png_path = os.path.join(workdir, stem + ".png")
    if os.path.exists(json_path) or os.path.exists(png_path):
      n += 1
      continue
    payload["files"] = {"json": json_path, "png": png_path if plot_bytes else None}
    try:
      # Claims the name.
      write_atomic(json_path, json.dumps(payload, indent=2) + "\n", replace=False)
    except FileExistsError:
      n += 1
      continue
    if plot_bytes:
      write_atomic(png_path, plot_bytes, replace=False)
    return payload["files"]


def _plot(profile: dict, title: str) -> bytes | None:
  """PNG bytes: per radius, a box plot and the points of the losses (and accuracies),
  the centre as a dashed line; None without matplotlib."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  import io  # pylint: disable=g-import-not-at-top
  radii = profile["radii"]
  has_acc = profile["center"]["accuracy"] is not None
  panels = [("losses", "loss", "validation loss")]
  if has_acc:
    panels.append(("accuracies", "accuracy", "validation accuracy"))
  fig = Figure(figsize=(4 + 1.2 * len(radii) * len(panels), 4))
  jitter = np.random.default_rng(0)
  for i, (key, centre_key, label) in enumerate(panels):
    ax = fig.add_subplot(1, len(panels), i + 1)
    data = [r[key] for r in radii]
    positions = [r["radius"] for r in radii]
    ax.boxplot(data, positions=positions, widths=0.5, showfliers=False)
    for pos, values in zip(positions, data):
      ax.scatter(pos + jitter.uniform(-0.15, 0.15, len(values)), values, s=8, alpha=0.5)
    ax.axhline(profile["center"][centre_key], color="red", linestyle="--", label="centre")
    ax.set_xlabel("distance to the genotype")
    ax.set_ylabel(label)
    ax.set_xticks(positions)
    ax.set_xticklabels([f"{r['radius']}\n(n={r['count']})" for r in radii])
    ax.legend(loc="best")
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100)
  return buf.getvalue()


def _in_pieces(evaluate: Callable[[np.ndarray], Any], piece: int, total: int,
               progress: Callable[[int, int], None]) -> Callable[[np.ndarray], Any]:
  """``evaluate`` called on ``piece`` architectures at a time, ``progress(done, total)``
  after each; the answers (losses, or losses and accuracies) joined.

  The last piece, when short, is `filled` up to ``piece`` (copies of an architecture,
  their answers dropped), so that the vmapped evaluation compiles for one size: on a CPU
  one more size compiled for 16-18 s where the copies take about 1.5 s (the quick start's
  report: 41-46 s with two sizes, 34 s of it compiling; 27-30 s with one)."""
  done = 0

  def evaluate_in_pieces(codes: np.ndarray):
    nonlocal done
    answers = []
    for i in range(0, len(codes), piece):
      part = codes[i:i + piece]
      answer = evaluate(filled(part, piece))
      answers.append(tuple(a[:len(part)] for a in answer) if isinstance(answer, tuple)
                     else answer[:len(part)])
      done += len(part)
      progress(done, total)
    if isinstance(answers[0], tuple):
      return tuple(np.concatenate(parts) for parts in zip(*answers))
    return np.concatenate(answers)

  return evaluate_in_pieces


def report(workdir: str, genotype: str | None = None, radius: int = 2,
           num_neighbors: int | None = 32, eval_batches: int = 4, seed: int = 0,
           chunk_size: int = 16, recalibrate_batches: int = 4) -> dict[str, Any]:
  """The flatness report of a genotype in the trained supernet of a search ``workdir``.

  ``genotype``: a name (DARTS space) or text parsed by the run's space; default the
  workdir's ``genotype.txt``. ``recalibrate_batches``: training batches on which each
  architecture's BatchNorm statistics are re-estimated before it is scored (0: each
  evaluation batch's own statistics). Writes ``flatness[-n].json`` and ``.png`` (see the
  module docstring) and returns the JSON payload (with ``files``).
  """
  radius = neighborhood.check_radius(radius)
  num_neighbors = _check_num_neighbors(num_neighbors)
  if isinstance(eval_batches, bool) or not isinstance(eval_batches, int) or eval_batches < 1:
    raise ValueError(f"eval_batches must be an integer >= 1, got {eval_batches!r}.")
  if (isinstance(recalibrate_batches, bool) or not isinstance(recalibrate_batches, int)
      or recalibrate_batches < 0):
    raise ValueError(f"recalibrate_batches must be an integer >= 0 (0: no recalibration), "
                     f"got {recalibrate_batches!r}.")
  from nanas_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from nanas_jax import loop  # pylint: disable=g-import-not-at-top
  from nanas_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"workdir {workdir} does not exist: run a search first.")
  supernet_path = os.path.join(workdir, workdir_lib.SUPERNET_FILE)
  if not os.path.exists(supernet_path):
    raise FileNotFoundError(
        f"{supernet_path} not found: run a search with --workdir={workdir} first (a "
        "finished search saves its trained supernet there).")
  config = _read_config(workdir)
  space = spaces.get_space(config.model.space)
  if genotype is None:
    genotype_path = os.path.join(workdir, "genotype.txt")
    if not os.path.exists(genotype_path):
      raise FileNotFoundError(f"{genotype_path} not found: pass --genotype.")
    with open(genotype_path) as f:
      genotype = f.read()
  arch = parse_genotype(space, genotype)
  codes = space.encode(arch)
  neighborhood.check_reach(space, radius, "radius")

  dataset = data_lib.load_search_data(
      config.data.name, train_portion=config.data.train_portion, seed=config.seed,
      data_dir=config.data.data_dir, max_examples=config.data.max_examples)
  batch = config.data.batch_size
  for flag, wanted, split in (("eval_batches", eval_batches, dataset.val_images),
                              ("recalibrate_batches", recalibrate_batches,
                               dataset.train_images)):
    available = len(split) // batch
    if wanted > available:
      raise ValueError(f"{flag} = {wanted} exceeds the {available} batches of {batch} "
                       "examples in its half of the search data; lower it.")
  model = workdir_lib.build_supernet(config.model, dataset.num_classes)
  weights = jnp.full(space.alpha_shape, 1.0 / space.num_ops, jnp.float32)
  template = jax.eval_shape(
      functools.partial(model.init, train=True), jax.random.key(0),
      jnp.asarray(dataset.train_images[:1]), weights)
  template = {"params": template["params"], "batch_stats": template.get("batch_stats", {})}
  variables = workdir_lib.load_supernet(workdir, template)
  eval_iter = data_lib.batches(dataset.val_images, dataset.val_labels, batch,
                               np.random.default_rng(config.seed + 2))
  batches = [b for _, b in zip(range(eval_batches), eval_iter)]
  recalibration = None
  if recalibrate_batches:
    train_iter = data_lib.batches(dataset.train_images, dataset.train_labels, batch,
                                  np.random.default_rng(config.seed + 5))
    recalibration = [x for _, (x, _) in zip(range(recalibrate_batches), train_iter)]
  evaluator = SupernetEvaluator(model, variables, space, batches, chunk_size=chunk_size,
                                with_accuracy=True, recalibration=recalibration)
  total = 1 + sum(min(count_at_distance(space, codes, d), num_neighbors or np.inf)
                  for d in range(1, radius + 1))
  with loop.Progress("flatness", "architectures") as progress:
    profile = neighborhood_profile(
        space, codes, _in_pieces(evaluator, chunk_size, int(total), progress),
        radius, num_neighbors, np.random.default_rng(seed))
  text = space.format(arch)
  payload = {
      "workdir": os.path.abspath(workdir), "genotype": text,
      "genotype_sha1": hashlib.sha1(text.encode()).hexdigest()[:12],
      "radius": radius, "num_neighbors": num_neighbors, "eval_batches": eval_batches,
      "eval_examples": evaluator.num_examples, "seed": seed,
      "recalibrate_batches": recalibrate_batches,
      "protocol": ("supernet with one-hot architecture weights; "
                   + ("BatchNorm statistics re-estimated per architecture on "
                      "recalibrate_batches batches of the search-training half (order "
                      "rng(config.seed + 5)), then evaluation mode"
                      if recalibrate_batches else
                      "BatchNorm on batch statistics (train=True)")
                   + "; first eval_batches batches of the search-validation half in the "
                   "order rng(config.seed + 2); std is the population std"),
      **profile,
  }
  png = _plot(profile, f"{space.name} {text if len(text) < 90 else text[:87] + '...'}")
  _write_outputs(workdir, payload, png)
  return payload


def find_or_report(workdir: str, genotype: str, **settings) -> tuple[dict[str, Any], bool]:
  """The flatness payload of ``genotype`` in the search ``workdir`` with ``settings`` (the
  keyword arguments of `report`): an existing report with the same genotype and settings
  when there is one, else a new one. Returns ``(payload, whether it ran now)``."""
  for path in sorted(glob.glob(os.path.join(workdir, f"{REPORT_STEM}*.json"))):
    with open(path) as f:
      payload = json.load(f)
    if payload.get("genotype") == genotype and all(
        payload.get(k) == v for k, v in settings.items()):
      return payload, False
  return report(workdir, genotype=genotype, **settings), True


def format_table(payload: dict) -> str:
  """A readable table: radius, count (of size), mean, std, worst, best (and accuracy)."""
  has_acc = payload["center"]["accuracy"] is not None
  centre = f"centre: loss {payload['center']['loss']:.4f}"
  if has_acc:
    centre += f", accuracy {payload['center']['accuracy']:.4f}"
  header = f"{'radius':>6} {'count':>11} {'mean':>8} {'std':>8} {'worst':>8} {'best':>8}"
  if has_acc:
    header += f" {'acc mean':>9} {'acc worst':>9}"
  lines = [f"genotype: {payload['genotype']}", centre, header]
  for r in payload["radii"]:
    loss = r["loss"]
    count = f"{r['count']}/{r['size']}"
    if r["count"] == 0:
      lines.append(f"{r['radius']:>6} {count:>11}  (no neighbors)")
      continue
    row = (f"{r['radius']:>6} {count:>11} {loss['mean']:>8.4f} {loss['std']:>8.4f} "
           f"{loss['worst']:>8.4f} {loss['best']:>8.4f}")
    if has_acc:
      row += f" {r['accuracy']['mean']:>9.4f} {r['accuracy']['worst']:>9.4f}"
    lines.append(row)
  return "\n".join(lines)


# ---------------------------------------------------------------------------------- CLI
def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("workdir", None, "Workdir of a finished search.")
  flags.DEFINE_string("genotype", None,
                      "Genotype name (DARTS) or text; default: the workdir's genotype.txt.")
  flags.DEFINE_integer("radius", 2, "Largest neighbor distance.")
  flags.DEFINE_integer("num_neighbors", 32,
                       "Neighbors per distance (all of them when there are fewer).")
  flags.DEFINE_integer("eval_batches", 4, "Validation batches per evaluation.")
  flags.DEFINE_integer("seed", 0, "Seed of the neighbor sampling.")
  flags.DEFINE_integer("recalibrate_batches", 4,
                       "Training batches on which each architecture's BatchNorm statistics "
                       "are re-estimated before it is scored (0: batch statistics).")
  flags.mark_flag_as_required("workdir")
  return flags.FLAGS


def main(argv):
  from absl import logging  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {cli.clip(' '.join(argv[1:]))}: every setting is a "
             "flag (--helpshort lists them).")
  logging.set_verbosity(logging.INFO)
  f = FLAGS
  payload = report(f.workdir, genotype=f.genotype, radius=f.radius,
                   num_neighbors=f.num_neighbors, eval_batches=f.eval_batches, seed=f.seed,
                   recalibrate_batches=f.recalibrate_batches)
  print(format_table(payload))
  print(f"Report: {payload['files']['json']}")
  if payload["files"]["png"]:
    print(f"Plot: {payload['files']['png']}")
  else:
    print("Plot: not written (matplotlib is not installed).")


if __name__ == "__main__":
  FLAGS = _define_flags()
  cli.run(main)
