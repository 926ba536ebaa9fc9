"""Kill-and-resume of a real search through the command line.

An uninterrupted run is the oracle. A second run is killed (SIGKILL, no chance to save) at
a random step, a third is sent SIGTERM (a preemption: it saves and exits); rerunning the
same command resumes each from the workdir's checkpoints. On a CPU the final alpha must be
bitwise that of the uninterrupted run.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 3 epochs x 8 steps of a 3-cell, C=4 DARTS supernet on 256 digits, a checkpoint every step.
STEPS = 24


def command(workdir):
  return [sys.executable, "-m", "nanas_jax.main", "--config=configs/quickstart.py",
          f"--workdir={workdir}", "--config.model.layers=3", "--config.model.channels=4",
          "--config.search.algorithm=darts", "--config.search.epochs=3",
          "--config.data.max_examples=256", "--config.data.batch_size=16",
          "--config.checkpoint.every_steps=1", "--config.checkpoint.keep=2"]


def run(workdir):
  out = subprocess.run(command(workdir), cwd=REPO, capture_output=True, text=True,
                       timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads((workdir / "genotype.json").read_text())


def saved_steps(workdir):
  directory = workdir / "checkpoints"
  return [int(d) for d in os.listdir(directory) if d.isdigit()] if directory.exists() else []


def interrupt(workdir, at_step, sig):
  """Starts the command and sends ``sig`` once a checkpoint at ``at_step`` or later
  exists; returns the finished process."""
  # Output goes to a file: an unread pipe fills up and blocks the run's logging.
  log = open(workdir.parent / f"{workdir.name}.log", "w")
  proc = subprocess.Popen(command(workdir), cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                          text=True)
  deadline = time.time() + 900
  while max(saved_steps(workdir), default=0) < at_step:
    assert proc.poll() is None, "the run ended before it could be interrupted"
    assert time.time() < deadline
    time.sleep(0.02)
  proc.send_signal(sig)
  proc.wait(timeout=300)
  log.close()
  return proc, (workdir.parent / f"{workdir.name}.log").read_text()


def test_killed_and_preempted_searches_resume_to_the_uninterrupted_alpha(tmp_path):
  reference = run(tmp_path / "reference")
  assert reference["resumed_from_step"] is None

  kill_at = random.randint(2, STEPS - 6)
  proc, _ = interrupt(tmp_path / "killed", kill_at, signal.SIGKILL)
  assert proc.returncode == -signal.SIGKILL
  assert not (tmp_path / "killed" / "genotype.txt").exists()
  resumed = run(tmp_path / "killed")
  assert resumed["resumed_from_step"] >= kill_at, kill_at
  assert resumed["alpha"] == reference["alpha"], f"killed at step {kill_at}"
  assert resumed["genotype"] == reference["genotype"]

  term_at = random.randint(2, STEPS - 6)
  proc, log = interrupt(tmp_path / "preempted", term_at, signal.SIGTERM)
  # SIGTERM: the step in flight finishes, a checkpoint is saved, the exit status is 143.
  assert proc.returncode == 128 + signal.SIGTERM, log[-3000:]
  assert "preempted: saved a checkpoint at step" in log
  stopped_at = max(saved_steps(tmp_path / "preempted"))
  assert stopped_at >= term_at
  resumed = run(tmp_path / "preempted")
  assert resumed["resumed_from_step"] == stopped_at
  assert resumed["alpha"] == reference["alpha"], f"preempted at step {term_at}"
  events = [json.loads(line) for line in
            (tmp_path / "preempted" / "metrics.jsonl").read_text().splitlines()]
  assert {"event": "resumed", "step": stopped_at} in events
