"""End-to-end test of the command line: the quick-start search at its smallest size."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from tensorboard_events import tensorboard_values

from nanas_jax import spaces

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_command_runs_a_real_search_and_writes_the_genotype(tmp_path):
  workdir = tmp_path / "run"
  # The quick-start command at the smallest size: 3 cells, 2 epochs on 400 digits.
  cmd = [sys.executable, "-m", "nanas_jax.main", "--config=configs/quickstart.py",
         f"--workdir={workdir}", "--config.model.layers=3", "--config.model.channels=4",
         "--config.search.epochs=2", "--config.data.max_examples=400",
         "--config.data.batch_size=32", "--config.search.neighbors.num=2",
         "--config.search.warmup_epochs=1"]
  # Under the usual umask every result is readable by others. (`umask=`, not a
  # `preexec_fn`: that forks this multithreaded process and runs Python in the child.)
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900,
                       umask=0o022)
  assert out.returncode == 0, out.stderr[-3000:]
  for name in ("config.json", "genotype.txt", "genotype.json", "supernet.msgpack",
               "metrics.jsonl", "genotypes.jsonl", "genotype.png"):
    assert os.stat(workdir / name).st_mode & 0o777 == 0o644, name
  # The console: no start-up noise, one short line per log interval (every 5 steps of
  # 12), not the metric dump that TensorBoard and metrics.jsonl get.
  for noise in ("oneDNN", "backend 'tpu'", "logging_writer", "Setting work unit notes"):
    assert noise not in out.stderr, noise
  lines = [line.split("] ", 1)[1] for line in out.stderr.splitlines()
           if "] step " in line]
  assert [line.split("  ")[0] for line in lines] == ["step 5/12", "step 10/12"]
  assert all(len(line) < 160 and "train_loss" in line and "ETA" in line for line in lines)
  assert "val_accuracy" in lines[1]  # known from the first epoch on
  text = (workdir / "genotype.txt").read_text().strip()
  genotype = spaces.get_space("darts").parse(text)
  assert str(genotype) == text
  assert text in out.stdout
  summary = json.loads((workdir / "genotype.json").read_text())
  assert summary["genotype"] == text
  assert spaces.get_space("darts").from_json(summary["genotype_json"]) == genotype
  epochs = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()
            if '"epoch"' in line]
  assert [e["epoch"] for e in epochs] == [1, 2]
  assert all(0.0 <= e["val_accuracy"] <= 1.0 for e in epochs)
  # Epoch 1 is the weight-only warm-up: no architecture step, alpha untouched.
  assert "mean_arch_loss" not in epochs[0] and "mean_arch_loss" in epochs[1]
  assert [e["genotype_changed"] for e in epochs][0] == 1
  # Validation with BatchNorm statistics recalibrated at softmax(alpha): it follows the
  # training accuracy (the lagging running statistics read near chance, 0.1).
  assert all(e["val_accuracy"] > 0.8 * e["mean_train_accuracy"] for e in epochs)
  assert len((workdir / "genotypes.jsonl").read_text().splitlines()) == 2
  # Alpha starts near uniform over the 8 operations: entropy log(8) per edge.
  assert abs(epochs[0]["alpha_entropy"] - np.log(8)) < 0.01
  # Pictures of both cells every epoch and of the final genotype.
  for name in ("cells/epoch_001.png", "cells/epoch_002.png", "genotype.png"):
    assert (workdir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert sorted(os.listdir(workdir / "checkpoints")) == ["12", "6"]
  # TensorBoard holds the same per-step numbers as metrics.jsonl.
  steps = {r["step"]: r for r in map(json.loads,
                                     (workdir / "metrics.jsonl").read_text().splitlines())
           if "train_loss" in r}
  assert dict(tensorboard_values(workdir, "train_loss")) == pytest.approx(
      {s: r["train_loss"] for s, r in steps.items()}, rel=1e-6)
  # Rerunning into the same workdir must not overwrite the finished search.
  again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert again.returncode == 2
  assert "already holds a finished search" in again.stderr
  assert "Traceback" not in again.stderr and len(again.stderr.splitlines()) <= 5
  assert (workdir / "genotype.txt").read_text().strip() == text


@pytest.mark.parametrize("config_file", ["quickstart", "na_rs_quickstart"])
def test_nas_bench_201_searches_run_end_to_end(tmp_path, config_file):
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "nanas_jax.main", f"--config=configs/{config_file}.py",
         f"--workdir={workdir}", "--config.model.space=nb201", "--config.model.layers=1",
         "--config.model.channels=4", "--config.search.epochs=1",
         "--config.data.max_examples=400", "--config.data.batch_size=32"]
  if config_file == "quickstart":
    cmd += ["--config.search.warmup_epochs=0"]
  if config_file == "na_rs_quickstart":
    # All 7 validation batches: 200 examples, the last batch padded with 24 rows.
    cmd += ["--config.search.rs.num_candidates=2", "--config.search.rs.eval_batches=7",
            "--config.search.rs.chunk_size=8", "--config.search.rs.num_neighbors=3"]
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  space = spaces.get_space("nb201")
  text = (workdir / "genotype.txt").read_text().strip()
  assert space.format(space.parse(text)) == text
  summary = json.loads((workdir / "genotype.json").read_text())
  if config_file == "na_rs_quickstart":
    # 2 candidates x (3 neighbors + the candidate), and plain RS given the same budget.
    assert summary["result"]["budget"]["total_evaluations"] == 8
    assert summary["same_budget_random_search"]["budget"]["total_evaluations"] == 8
    assert summary["result"]["best_arch"] == text
    # Candidates are scored on the 200 validation digits, never on the padding.
    assert summary["eval_examples"] == 200


def test_missing_workdir_is_a_usage_error_before_tensorflow_loads():
  # -X importtime lists every module imported on stderr (the restart keeps the option).
  out = subprocess.run([sys.executable, "-X", "importtime", "-m", "nanas_jax.main",
                        "--config=configs/quickstart.py"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode != 0
  assert "workdir" in out.stderr
  imported = [line.rsplit("|", 1)[1].strip() for line in out.stderr.splitlines()
              if line.startswith("import time:")]
  assert "jax" in imported and "tensorflow" not in imported


def test_na_rs_on_a_nas_bench_201_table_file(tmp_path):
  space = spaces.get_space("nb201")
  table = {}
  # Every architecture of the space, with an accuracy that depends on its ops.
  for codes in np.stack(np.meshgrid(*[range(5)] * 6, indexing="ij"), -1).reshape(-1, 6):
    table[space.format(space.decode(codes[None]))] = float(50 + 5 * (codes == 3).sum())
  path = tmp_path / "table.json"
  path.write_text(json.dumps(table))
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "nanas_jax.main", "--config=configs/na_rs_nb201.py",
         f"--workdir={workdir}", f"--config.search.rs.table_path={path}",
         "--config.search.rs.num_candidates=5"]
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.loads((workdir / "genotype.json").read_text())
  # 5 candidates x (24 neighbors + the candidate), and RS with the same 125 evaluations.
  assert summary["result"]["budget"]["total_evaluations"] == 125
  assert summary["same_budget_random_search"]["budget"]["total_evaluations"] == 125
  best = space.encode(space.parse((workdir / "genotype.txt").read_text().strip()))
  assert summary["result"]["best_loss"] == 100 - table[space.format(space.decode(best))]


def test_table_search_without_a_table_fails_before_any_work(tmp_path):
  out = subprocess.run([sys.executable, "-m", "nanas_jax.main",
                        "--config=configs/na_rs_nb201.py", f"--workdir={tmp_path / 'w'}"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode == 2
  assert "config.search.rs.table_path" in out.stderr
  assert "Traceback" not in out.stderr and len(out.stderr.splitlines()) <= 5
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("override,says", [
    ("--config.search.bogus=1", ["config.search has no field 'bogus'",
                                 "Fields of config.search: algorithm, arch, compile"]),
    ("--config.data.dataset=cifar10", ["config.data has no field 'dataset'",
                                       "That setting is config.data.name here"]),
])
def test_an_unknown_config_field_exits_2_in_a_few_lines_naming_it(tmp_path, override, says):
  cmd = [sys.executable, "-m", "nanas_jax.main", "--config=configs/quickstart.py",
         f"--workdir={tmp_path / 'w'}", override]
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode == 2
  assert len(out.stderr.splitlines()) <= 5, out.stderr
  assert all(text in out.stderr for text in says), out.stderr
  assert not (tmp_path / "w").exists()
  if "bogus" in override:
    # --debug shows the traceback instead.
    debug = subprocess.run(cmd + ["--debug"], cwd=REPO, capture_output=True, text=True,
                           timeout=120)
    assert debug.returncode == 1 and "AttributeError" in debug.stderr
