"""Tests of the flatness report: the neighborhood profile and the end-to-end report."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from nanas_jax import flatness
from nanas_jax import neighborhood
from nanas_jax import spaces

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NB201_TEXT = ("|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|"
              "nor_conv_3x3~1|skip_connect~2|")


def _ops_differ(reference):
  """Synthetic evaluator: a loss = edges whose op differs from ``reference`` (+ a bias per
  op id so that losses within one distance differ) and an accuracy = 1 - loss / 100."""
  reference = np.asarray(reference)
  calls = []

  def evaluate(codes):
    codes = np.asarray(codes)
    calls.append(codes.copy())
    losses = (codes != reference).sum(axis=(1, 2)) + 0.01 * codes.sum(axis=(1, 2))
    return losses.astype(np.float64), 1.0 - losses / 100.0

  evaluate.calls = calls
  return evaluate


def test_profile_nb201_enumerated_counts_distances_and_stats():
  space = spaces.get_space("nb201")
  codes = space.encode(space.parse(NB201_TEXT))
  evaluate = _ops_differ(codes)
  profile = flatness.neighborhood_profile(space, codes, evaluate, radius=2,
                                          num_neighbors=None)
  assert [r["count"] for r in profile["radii"]] == [24, math.comb(6, 2) * 16]
  assert [r["size"] for r in profile["radii"]] == [24, 240]
  assert all(r["enumerated"] for r in profile["radii"])
  # One call: the centre, then each radius's neighbors in order.
  (asked,) = evaluate.calls
  np.testing.assert_array_equal(asked[0], codes)
  batches = np.split(asked[1:], [24])
  assert profile["center"]["loss"] == pytest.approx(0.01 * codes.sum())
  for r, batch in zip(profile["radii"], batches, strict=True):
    d = r["radius"]
    assert [neighborhood.distance(c, codes) for c in batch] == [d] * len(batch)
    assert len({c.tobytes() for c in batch}) == len(batch)
    np.testing.assert_array_equal(np.asarray(r["codes"]), batch)
    expected = (batch != codes).sum(axis=(1, 2)) + 0.01 * batch.sum(axis=(1, 2))
    np.testing.assert_allclose(r["losses"], expected)
    assert r["loss"]["mean"] == pytest.approx(np.mean(expected))
    assert r["loss"]["std"] == pytest.approx(np.std(expected))
    assert r["loss"]["worst"] == pytest.approx(np.max(expected))
    assert r["loss"]["best"] == pytest.approx(np.min(expected))
    assert r["accuracy"]["worst"] == pytest.approx(np.min(1 - expected / 100))
  # The union of both radii is the neighborhood module's radius-2 enumeration.
  every = neighborhood.enumerate_neighbors(space, codes, 2)
  ours = np.concatenate([np.asarray(r["codes"]) for r in profile["radii"]])
  assert {c.tobytes() for c in every} == {c.astype(np.int32).tobytes() for c in ours}


def test_profile_enumerates_when_num_neighbors_covers_the_distance():
  space = spaces.get_space("nb201")
  codes = space.encode(space.parse(NB201_TEXT))
  profile = flatness.neighborhood_profile(space, codes, _ops_differ(codes), radius=2,
                                          num_neighbors=32, rng=np.random.default_rng(1))
  r1, r2 = profile["radii"]
  assert (r1["count"], r1["enumerated"]) == (24, True)
  assert (r2["count"], r2["size"], r2["enumerated"]) == (32, 240, False)
  assert profile["center"]["accuracy"] is not None


@pytest.mark.parametrize("radius,num", [(2, 20), (3, 50)])
def test_profile_darts_sampling_exact_distance_distinct(radius, num):
  space = spaces.get_space("darts")
  codes = space.encode(spaces.get_genotype("DARTS_V2"))
  evaluate = _ops_differ(codes)
  profile = flatness.neighborhood_profile(space, codes, lambda c: evaluate(c)[0], radius,
                                          num_neighbors=num, rng=np.random.default_rng(0))
  sizes = [r["size"] for r in profile["radii"]]
  assert sizes[0] == 96  # 16 kept edges x 6 other non-none ops.
  assert sizes[1] == math.comb(16, 2) * 36
  (asked,) = evaluate.calls
  assert len(asked) == 1 + radius * num
  for i, r in enumerate(profile["radii"]):
    batch = asked[1 + i * num:1 + (i + 1) * num]
    np.testing.assert_array_equal(np.asarray(r["codes"]), batch)
    assert r["count"] == num and not r["enumerated"]
    assert len({c.tobytes() for c in batch}) == num
    assert all(neighborhood.distance(c, codes) == r["radius"] for c in batch)
    for c in batch:
      space.decode(c)
    assert r["accuracy"] is None
  assert profile["center"]["accuracy"] is None


def test_sample_at_distance_rejection_path_is_exact(monkeypatch):
  monkeypatch.setattr(neighborhood, "_ENUMERATE_LIMIT", 10)
  space = spaces.get_space("darts")
  codes = space.encode(spaces.get_genotype("DARTS_V2"))
  rows = flatness.sample_at_distance(space, codes, 2, 30, np.random.default_rng(0))
  assert len({c.tobytes() for c in rows}) == 30
  assert all(neighborhood.distance(c, codes) == 2 for c in rows)


def test_profile_errors():
  space = spaces.get_space("nb201")
  codes = space.encode(space.parse(NB201_TEXT))
  with pytest.raises(ValueError, match="radius must be an integer >= 1"):
    flatness.neighborhood_profile(space, codes, _ops_differ(codes), radius=0)
  with pytest.raises(ValueError, match="num_neighbors"):
    flatness.neighborhood_profile(space, codes, _ops_differ(codes), 1, num_neighbors=0)
  with pytest.raises(ValueError, match="must return 25 losses"):  # the centre and 24
    flatness.neighborhood_profile(space, codes, lambda c: np.zeros(1), radius=1)


# ------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def search_workdir(tmp_path_factory):
  sys.path.insert(0, ROOT)
  from configs import na_rs_quickstart  # pylint: disable=g-import-not-at-top
  from nanas_jax import experiment  # pylint: disable=g-import-not-at-top
  config = na_rs_quickstart.get_config()
  config.model.space = "nb201"
  config.model.layers = 1
  config.model.channels = 4
  config.search.epochs = 1
  config.data.max_examples = 400
  config.data.batch_size = 32
  config.search.rs.num_candidates = 2
  config.search.rs.eval_batches = 1
  config.search.rs.chunk_size = 8
  config.search.rs.num_neighbors = 3
  workdir = str(tmp_path_factory.mktemp("flatness_search"))
  experiment.run(config, workdir)
  return workdir


def test_report_end_to_end(search_workdir):
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from nanas_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from nanas_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from nanas_jax.search.evaluators import SupernetEvaluator  # pylint: disable=g-import-not-at-top

  first = flatness.report(search_workdir, radius=1, num_neighbors=8, eval_batches=1,
                          recalibrate_batches=2)
  assert first["files"]["json"] == os.path.join(search_workdir, "flatness.json")
  assert os.path.exists(first["files"]["json"]) and os.path.exists(first["files"]["png"])
  with open(first["files"]["json"]) as f:
    saved = json.load(f)
  with open(os.path.join(search_workdir, "genotype.txt")) as f:
    assert saved["genotype"] == f.read().strip()
  (r1,) = saved["radii"]
  assert (r1["count"], r1["size"], r1["enumerated"]) == (8, 24, False)
  assert all(np.isfinite(r1["losses"])) and 0 <= r1["accuracy"]["mean"] <= 1
  assert saved["recalibrate_batches"] == 2 and "re-estimated" in saved["protocol"]

  # The centre's loss is what a SupernetEvaluator gives on the same batches, BatchNorm
  # recalibrated on the same 2 training batches.
  with open(os.path.join(search_workdir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  dataset = data_lib.load_search_data(
      config.data.name, train_portion=config.data.train_portion, seed=config.seed,
      max_examples=config.data.max_examples)
  model = workdir_lib.build_supernet(config.model, dataset.num_classes)
  space = spaces.get_space("nb201")
  init = model.init(jax.random.key(1), dataset.train_images[:1],
                    np.full(space.alpha_shape, 0.2, np.float32), train=True)
  variables = workdir_lib.load_supernet(search_workdir, dict(init))
  eval_iter = data_lib.batches(dataset.val_images, dataset.val_labels,
                               config.data.batch_size, np.random.default_rng(config.seed + 2))
  batches = [next(eval_iter)]
  train_iter = data_lib.batches(dataset.train_images, dataset.train_labels,
                                config.data.batch_size, np.random.default_rng(config.seed + 5))
  calibration = [next(train_iter)[0] for _ in range(2)]
  direct = SupernetEvaluator(model, variables, space, batches, chunk_size=4,
                             recalibration=calibration)
  codes = space.encode(space.parse(saved["genotype"]))
  assert saved["center"]["loss"] == pytest.approx(float(direct(codes[None])[0]), rel=1e-5)
  np.testing.assert_allclose(direct(np.asarray(r1["codes"])), r1["losses"], rtol=1e-5)

  # A second report never overwrites the first; an explicit genotype text works.
  second = flatness.report(search_workdir, genotype=NB201_TEXT, radius=1,
                           num_neighbors=4, eval_batches=1)
  assert second["files"]["json"] == os.path.join(search_workdir, "flatness-1.json")
  assert second["files"]["png"] == os.path.join(search_workdir, "flatness-1.png")
  with open(first["files"]["json"]) as f:
    assert json.load(f) == saved
  assert second["genotype"] == NB201_TEXT
  assert "radius" in flatness.format_table(second)


def test_report_errors(search_workdir, tmp_path):
  with pytest.raises(FileNotFoundError, match="run a search"):
    flatness.report(str(tmp_path))
  with pytest.raises(ValueError, match="bad nb201 genotype"):
    flatness.report(search_workdir, genotype="|nor_conv_3x3~0|+|oops|")
  with pytest.raises(ValueError, match="radius must be an integer >= 1"):
    flatness.report(search_workdir, radius=0)


def test_cli_error_message(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "nanas_jax.flatness", f"--workdir={tmp_path}"],
      capture_output=True, text=True, cwd=ROOT, timeout=60)
  assert result.returncode == 2
  assert "run a search" in result.stderr
  assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) <= 5


def test_radius_beyond_the_farthest_neighbor_is_refused_before_any_data(tmp_path):
  space = spaces.get_space("darts")
  codes = space.encode(spaces.get_genotype("DARTS_V2"))
  # The profile refuses before the first evaluation, the report before reading data.
  with pytest.raises(ValueError, match=r"^radius = 17 is invalid: a darts architecture's "
                     r"neighbors are at most 16 edges away \(the edges it keeps\); use a "
                     r"radius <= 16\.$"):
    flatness.neighborhood_profile(space, codes, lambda c: 1 / 0, radius=17)
  flatness.neighborhood_profile(space, codes, lambda c: np.zeros(len(c)), radius=16,
                                num_neighbors=1)
  nb201 = spaces.get_space("nb201")
  with pytest.raises(ValueError, match="radius = 7 is invalid: a nb201 architecture's neighbors are at most 6"):
    flatness.neighborhood_profile(nb201, nb201.encode(nb201.parse(NB201_TEXT)),
                                  lambda c: 1 / 0, radius=7)
  (tmp_path / "config.json").write_text(json.dumps(
      {"seed": 0, "model": {"space": "darts"}, "data": {"name": "cifar10"}}))
  (tmp_path / "supernet.msgpack").write_bytes(b"")
  with pytest.raises(ValueError, match="radius = 100 is invalid: a darts architecture's neighbors are at most 16"):
    flatness.report(str(tmp_path), genotype="DARTS_V2", radius=100)


def test_evaluation_in_pieces_reports_progress_and_joins_the_answers():
  calls, pieces = [], []

  def answer(c):
    pieces.append(c.copy())
    return c.sum((1, 2)) * 1.0, -c.sum((1, 2))

  evaluate = flatness._in_pieces(answer, piece=4, total=11,
                                 progress=lambda done, total: calls.append(done))
  codes = np.arange(10 * 2 * 3).reshape(10, 2, 3)
  losses, accuracies = evaluate(codes)
  np.testing.assert_array_equal(losses, codes.sum((1, 2)))
  np.testing.assert_array_equal(accuracies, -codes.sum((1, 2)))
  assert calls == [4, 8, 10]
  # The short last piece was filled with copies of its first architecture: one size.
  np.testing.assert_array_equal(pieces[2], codes[[8, 9, 8, 8]])
  # Answers that are losses alone, for a request shorter than a piece.
  single = flatness._in_pieces(lambda c: c.sum((1, 2)) * 1.0, piece=4, total=11,
                               progress=lambda done, total: calls.append(done))
  np.testing.assert_array_equal(single(codes[:1]), codes[:1].sum((1, 2)))
  assert calls[-1] == 1
