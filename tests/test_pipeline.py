"""Tests of nanas_jax.pipeline: a tiny search -> flatness -> retrain -> report in one
process, interrupted after the search and rerun (the finished stages are skipped, not
rerun), the report's numbers against the stages' own files and independent oracles, and
refusals (a finished pipeline, bad configs) before anything runs.

Sizes: a 3-cell C=4 DARTS search for 1 epoch on the first 256 shuffled digits, the flatness
of 4 neighbors at distance 1 on one batch, and a 3-cell C=4 DARTS-network training for 1
epoch; about 1-2 minutes on 2 cores, nearly all of it compilation."""

import json
import os
import re

import pytest

from configs import pipeline_quickstart
from nanas_jax import loop, pipeline, summary
from nanas_jax.data import split_point
from nanas_jax.train import run as train_run

SEARCH_EXAMPLES, TRAIN_EXAMPLES, TRAIN_PORTION = 256, 400, 0.5


def tiny_config():
  config = pipeline_quickstart.get_config()
  search = config.search
  search.model.layers, search.model.channels = 3, 4
  search.search.algorithm = "darts"
  search.search.epochs, search.search.warmup_epochs = 1, 0
  search.data.max_examples = SEARCH_EXAMPLES
  search.data.batch_size = 16
  train = config.train
  train.model.layers, train.model.channels = 3, 4
  train.train.epochs = 1
  train.data.max_examples = TRAIN_EXAMPLES
  train.data.train_portion = TRAIN_PORTION
  train.data.batch_size = 32
  config.pipeline.flatness_radius = 1
  config.pipeline.flatness_num_neighbors = 4
  config.pipeline.flatness_eval_batches = 1
  return config


def _fail(what):
  def fail(*args, **kwargs):
    raise AssertionError(f"{what} ran again")
  return fail


def _read(path):
  with open(path) as f:
    return f.read()


def test_pipeline_searches_retrains_reports_and_skips_finished_stages(tmp_path, monkeypatch):
  config, workdir = tiny_config(), str(tmp_path / "pipeline")
  search_dir = os.path.join(workdir, pipeline.SEARCH_DIR)
  train_dir = os.path.join(workdir, pipeline.TRAIN_DIR)
  report_path = os.path.join(workdir, pipeline.REPORT_FILE)

  # 1. Stopped during the training (as a preemption stops it): search and flatness done.
  def preempted(config, workdir):
    raise loop.Preempted(0, workdir)

  run_train = train_run.run_train
  monkeypatch.setattr(train_run, "run_train", preempted)
  with pytest.raises(loop.Preempted):
    pipeline.run_pipeline(config, workdir)
  assert os.path.exists(os.path.join(search_dir, "genotype.txt"))
  assert os.path.exists(os.path.join(search_dir, "flatness.json"))
  assert not os.path.exists(report_path)

  # 2. The rerun trains without searching or profiling again.
  monkeypatch.setattr(train_run, "run_train", run_train)
  monkeypatch.setattr(pipeline.experiment, "run", _fail("the search"))
  monkeypatch.setattr(pipeline.flatness, "report", _fail("the flatness report"))
  result = pipeline.run_pipeline(config, workdir)
  report = _read(report_path)

  genotype = _read(os.path.join(search_dir, "genotype.txt")).strip()
  search = json.loads(_read(os.path.join(search_dir, "genotype.json")))
  results = json.loads(_read(os.path.join(train_dir, train_run.RESULTS_FILE)))
  flat = json.loads(_read(os.path.join(search_dir, "flatness.json")))
  assert result["genotype"] == genotype == results["genotype"]
  assert f"```\n{genotype}\n```" in report
  assert result["test_top1"] == results["test_top1"]
  assert f"| {100 * results['test_top1']:.2f} % | {100 * results['test_top5']:.2f} % |" in report
  assert f"| {100 * search['final_val_accuracy']:.2f} % |" in report

  # Parameters: the trained 8x8x1 network is summarize()'s CIFAR-10 network of the same
  # size but for its stem's input channels (1, not 3); the CIFAR-10 line is summarize's.
  small = summary.summarize(genotype, "cifar10", 3, 4)
  assert results["params"] == small["params"] - 3 * 3 * (3 - 1) * (3 * 4)
  assert f"| {results['params']:,} | {results['mult_adds']:,} |" in report
  assert f"{summary.summarize(genotype, 'cifar10')['params']:,} parameters" in report

  # Flatness: the numbers of the report's file, which profiled the genotype found.
  assert flat["genotype"] == genotype and flat["radius"] == 1
  row = flat["radii"][0]
  assert (f"| 1 | {row['count']} / {row['size']} | {row['loss']['mean']:.4f} | "
          f"{row['loss']['std']:.4f} |") in report

  # The search saw the first 256 shuffled digits; the training's test split is shuffled
  # positions [200, 400) of the same order (same seed): 56 of them were seen.
  cut = split_point(TRAIN_EXAMPLES, TRAIN_PORTION)
  seen = SEARCH_EXAMPLES - cut
  assert result["test_overlap"] == {"test_examples": TRAIN_EXAMPLES - cut, "in_search": seen}
  assert f"**no**: {seen} of the {TRAIN_EXAMPLES - cut} test examples" in report

  # Every picture the report links exists, relative to the workdir.
  for link in re.findall(r"!\[[^]]*\]\(([^)]+)\)", report):
    assert os.path.getsize(os.path.join(workdir, link)) > 1000, link
  assert "| search | finished earlier, - |" in report
  assert re.search(r"\| train \| ran, \d+ s \|", report)

  # 3. A finished pipeline is refused and its report left as it was.
  with pytest.raises(FileExistsError, match="already holds a finished pipeline"):
    pipeline.run_pipeline(config, workdir)
  assert _read(report_path) == report

  # 4. With the report moved away, a rerun writes it again from the finished stages alone.
  os.rename(report_path, report_path + ".old")
  monkeypatch.setattr(train_run, "run_train", _fail("the training"))
  monkeypatch.setattr(train_run, "load_data", _fail("the training's data check"))
  again = pipeline.run_pipeline(config, workdir)
  assert again["test_top1"] == result["test_top1"]
  rewritten = _read(report_path)
  assert "| train | finished earlier, - |" in rewritten
  strip = lambda text: text.split("## Wall time")[0]
  assert strip(rewritten) == strip(report)


@pytest.mark.parametrize("path, value, message", [
    ("search.model.layers", 2, r"config\.search\.model\.layers = 2 is invalid"),
    ("search.model.space", "nb201", r"config\.search\.model\.space = 'nb201' is invalid"),
    ("search.search.epochs", 0, r"config\.search\."),
    ("train.model.channels", 0, r"config\.train\.model\.channels = 0 is invalid"),
    ("train.model.genotype_file", "/tmp/genotype.txt",
     r"config\.train\.model\.genotype_file = '/tmp/genotype\.txt' is invalid: expected None"),
    ("train.train.eval_every_epochs", -2,
     r"config\.train\.train\.eval_every_epochs = -2 is invalid"),
    ("pipeline.flatness", "yes", r"config\.pipeline\.flatness = 'yes' is invalid"),
    ("pipeline.flatness_radius", 0, r"config\.pipeline\.flatness_radius = 0 is invalid"),
    ("pipeline.flatness_radius", 17,
     r"config\.pipeline\.flatness_radius = 17 is invalid: a darts architecture's neighbors are "
     "at most 16 edges away"),
    ("pipeline.flatness_num_neighbors", 0,
     r"config\.pipeline\.flatness_num_neighbors = 0 is invalid"),
])
def test_a_bad_config_fails_before_anything_runs(tmp_path, monkeypatch, set_field, path, value,
                                                 message):
  monkeypatch.setattr(pipeline.experiment, "run", _fail("the search"))
  config = tiny_config()
  set_field(config, path, value)
  workdir = tmp_path / "never"
  with pytest.raises(ValueError, match=message):
    pipeline.run_pipeline(config, str(workdir))
  assert not workdir.exists()


@pytest.mark.parametrize("data, error, message", [
    # 40 digits at train_portion 0.5: a train split of 20 for a global batch of 32.
    ({"max_examples": 40}, ValueError,
     r"config\.train\.data\.batch_size = 32 is larger than the train split \(20 examples\)"),
    ({"name": "cifar10", "data_dir": "NO_DATA"}, FileNotFoundError,
     r"TFDS dataset 'cifar10' is not prepared in data_dir='.*no_data'"),
])
def test_the_training_data_is_checked_before_the_search(tmp_path, monkeypatch, data, error,
                                                        message):
  monkeypatch.setattr(pipeline.experiment, "run", _fail("the search"))
  config = tiny_config()
  for field, value in data.items():
    config.train.data[field] = str(tmp_path / "no_data") if value == "NO_DATA" else value
  workdir = tmp_path / "never"
  with pytest.raises(error, match=message):
    pipeline.run_pipeline(config, str(workdir))
  assert not workdir.exists()


def test_the_quickstart_test_digits_are_held_out_from_its_search():
  config = pipeline_quickstart.get_config()
  overlap = pipeline.search_overlap(config.search, config.train)
  assert overlap == {"test_examples": 797, "in_search": 0}
