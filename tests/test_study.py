"""Tests of nanas_jax.study: the DARTS vs NA-DARTS study task, end to end at a tiny size
(its numbers against the files each piece wrote), resume, and config checks."""

import json
import os

import numpy as np
import pytest

from configs import study_digits
from nanas_jax import neighborhood, spaces, study
from nanas_jax.spaces import get_genotype


def tiny_config():
  config = study_digits.get_config()
  s = config.search
  s.model.layers, s.model.channels = 3, 4
  s.data.max_examples, s.data.batch_size = 400, 32
  s.search.epochs, s.search.warmup_epochs = 2, 1
  s.search.neighbors.num = 2
  s.search.recalibrate_batches = 1
  t = config.train
  t.model.layers, t.model.channels, t.model.auxiliary = 3, 4, False
  t.train.epochs, t.train.eval_every_epochs = 1, 1
  t.data.max_examples = 500
  t.data.train_portion = 0.8  # 400 training digits, the 100 others test
  config.study.seeds = (3,)
  config.study.neighbors = 1
  config.study.flatness_radius = 1
  config.study.flatness_num_neighbors = 2
  config.study.flatness_eval_batches = 1
  config.study.flatness_recalibrate_batches = 1
  return config


def test_method_config_and_parameter_free_ops():
  search = study_digits.get_config().search
  config = study.method_config(search, "na_darts_max", 7)
  assert (config.seed, config.search.algorithm,
          config.search.neighbors.aggregation) == (7, "na_darts", "max")
  assert search.seed == 0 and search.search.neighbors.aggregation == "mean"
  # DARTS_V2: normal 2 skip_connect; reduce 5 max_pool, 3 skip_connect.
  assert study.parameter_free_ops(get_genotype("DARTS_V2")) == 10


@pytest.mark.parametrize("field,value,message", [
    ("study.methods", ("darts", "enas"), "config.study.methods"),
    ("study.methods", ("darts", "darts"), "config.study.methods"),
    ("study.seeds", (1, -1), "config.study.seeds"),
    ("study.neighbors", -1, "config.study.neighbors"),
    # 16 kept edges x 6 other operations: checked before the first search, not after it.
    ("study.neighbors", 97, r"config\.study\.neighbors = 97 is invalid: a genotype has 96 "
     "neighbors at distance 1"),
    ("study.flatness_radius", 0, "config.study.flatness_radius"),
    ("study.flatness_radius", 17, r"config\.study\.flatness_radius = 17 is invalid: a darts "
     "architecture's neighbors are at most 16 edges away"),
    ("search.model.space", "nb201", "config.search.model.space"),
    ("search.model.layers", 2, "config.model.layers"),
])
def test_bad_config_fails_before_any_work(tmp_path, set_field, field, value, message):
  config = tiny_config()
  set_field(config, field, value)
  with pytest.raises(ValueError, match=message):
    study.run_study(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_tiny_study_end_to_end_and_resume(tmp_path):
  workdir = tmp_path / "study"
  config = tiny_config()
  result = study.run_study(config, str(workdir))
  runs = json.loads((workdir / "study.json").read_text())["runs"]
  assert [(r["method"], r["seed"]) for r in runs] == [("darts", 3), ("na_darts", 3)]
  space = spaces.get_space("darts")
  for run in runs:
    run_dir = workdir / "runs" / f"{run['method']}-seed3"
    search = json.loads((run_dir / "search" / "genotype.json").read_text())
    assert run["genotype"] == search["genotype"]
    genotype = space.parse(run["genotype"])
    assert run["parameter_free_ops"] == study.parameter_free_ops(genotype)
    epochs = [json.loads(line) for line in
              (run_dir / "search" / "metrics.jsonl").read_text().splitlines()
              if '"val_accuracy"' in line]
    assert run["alpha_entropy"] == [e["alpha_entropy"] for e in epochs]
    flat = json.loads((run_dir / "search" / "flatness.json").read_text())
    assert flat["recalibrate_batches"] == 1 and flat["radius"] == 1
    assert run["flatness"]["centre_accuracy"] == flat["center"]["accuracy"]
    assert run["flatness"]["radius1_worst_accuracy"] == min(flat["radii"][0]["accuracies"])
    trained = json.loads((run_dir / "train" / "results.json").read_text())
    assert run["test_top1"] == trained["test_top1"] and trained["test_examples"] == 100
    assert trained["genotype"] == run["genotype"]
    # The retrained neighbor is a distance-1 neighbor of the genotype.
    neighbor = json.loads((run_dir / "neighbor-0" / "results.json").read_text())
    assert neighborhood.distance(space.encode(space.parse(neighbor["genotype"])),
                                 space.encode(genotype)) == 1
    assert run["neighbors_mean_top1"] == run["neighbors_worst_top1"] == neighbor["test_top1"]
  # NA-DARTS records the neighbor loss spread of its architecture steps, DARTS none.
  assert runs[0]["neighbor_loss_spread"][1] == 0 and runs[1]["neighbor_loss_spread"][1] > 0
  text = (workdir / "study.md").read_text()
  assert "| darts | 1 |" in text and "| na_darts | 1 |" in text
  for picture in ("entropy.png", "spread.png", "retrained.png"):
    assert (workdir / picture).read_bytes()[:4] == b"\x89PNG"
  assert "2 runs" in result["message"]

  with pytest.raises(FileExistsError, match="already holds a finished study"):
    study.run_study(config, str(workdir))
  # Without its report the study resumes: every piece is read back, nothing runs again.
  stamps = {p: os.path.getmtime(p) for p in workdir.glob("runs/*/*/results.json")}
  os.remove(workdir / "study.md")
  again = study.run_study(config, str(workdir))
  assert {p: os.path.getmtime(p) for p in stamps} == stamps
  assert [r["test_top1"] for r in again["runs"]] == [r["test_top1"] for r in runs]
  assert np.isclose(again["runs"][1]["alpha_entropy"][-1], runs[1]["alpha_entropy"][-1])
