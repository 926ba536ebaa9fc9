"""Kill-and-resume of a real search through the command line.

An uninterrupted run is the oracle. A second run is killed (SIGKILL, no chance to save) at
a random step; a third is sent SIGTERM (a preemption: it saves and exits), rerun, and that
rerun is interrupted with Ctrl-C (SIGINT: it saves at the step it was in and exits); each
time the same command resumes from the workdir's checkpoints. On a CPU the final alpha
must be bitwise that of the uninterrupted run, and metrics.jsonl must hold every step once.
"""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

from tensorboard_events import tensorboard_values

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 3 epochs x 8 steps of a 3-cell, C=4 DARTS supernet on 256 digits.
STEPS, STEPS_PER_EPOCH = 24, 8


def command(workdir, every_steps):
  """The search command; with ``every_steps=0`` (and no checkpoints by time) a checkpoint
  in mid-epoch can only be an interruption's."""
  return [sys.executable, "-m", "nanas_jax.main", "--config=configs/quickstart.py",
          f"--workdir={workdir}", "--config.model.layers=3", "--config.model.channels=4",
          "--config.search.algorithm=darts", "--config.search.epochs=3",
          "--config.search.warmup_epochs=0", "--config.search.recalibrate_batches=0",
          "--config.data.max_examples=256", "--config.data.batch_size=16",
          f"--config.checkpoint.every_steps={every_steps}",
          "--config.checkpoint.every_seconds=0", "--config.checkpoint.keep=2",
          "--config.log_every_steps=1"]


def run(workdir, env, every_steps=1):
  out = subprocess.run(command(workdir, every_steps), cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads((workdir / "genotype.json").read_text())


def saved_steps(workdir):
  directory = workdir / "checkpoints"
  return [int(d) for d in os.listdir(directory) if d.isdigit()] if directory.exists() else []


def logged_steps(workdir):
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line)["step"] for line in path.read_text().splitlines()
          if line.endswith("}") and '"train_loss"' in line and '"epoch"' not in line]


def interrupt(workdir, env, progress, at_step, sig, every_steps):
  """Starts the command and sends ``sig`` once ``progress(workdir)`` (steps saved or
  logged) reaches ``at_step``; returns the finished process and its output."""
  # Output goes to a file: an unread pipe fills up and blocks the run's logging.
  log_path = workdir.parent / f"{workdir.name}-{sig}.log"
  with open(log_path, "w") as log:
    proc = subprocess.Popen(command(workdir, every_steps), cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 900
    while max(progress(workdir), default=0) < at_step:
      assert proc.poll() is None, "the run ended before it could be interrupted"
      assert time.time() < deadline
      time.sleep(0.02)
    proc.send_signal(sig)
    proc.wait(timeout=300)
  return proc, log_path.read_text()


def test_killed_preempted_and_interrupted_searches_resume_to_the_uninterrupted_alpha(
    tmp_path, optimized_env):
  # Six runs of up to 24 steps share one compile (the cache): the steps weigh more, so
  # LLVM optimises them (`optimized_env`).
  env = optimized_env
  reference = run(tmp_path / "reference", env, every_steps=0)
  assert reference["resumed_from_step"] is None

  kill_at = random.randint(2, STEPS - 6)
  proc, _ = interrupt(tmp_path / "killed", env, saved_steps, kill_at, signal.SIGKILL, 1)
  assert proc.returncode == -signal.SIGKILL
  assert not (tmp_path / "killed" / "genotype.txt").exists()
  resumed = run(tmp_path / "killed", env)
  assert resumed["resumed_from_step"] >= kill_at, kill_at
  assert resumed["alpha"] == reference["alpha"], f"killed at step {kill_at}"
  assert resumed["genotype"] == reference["genotype"]

  # SIGTERM, then Ctrl-C in the rerun, with checkpoints only at epoch ends otherwise.
  workdir = tmp_path / "stopped"
  term_at = random.randint(2, STEPS_PER_EPOCH + 2)
  proc, log = interrupt(workdir, env, logged_steps, term_at, signal.SIGTERM, 0)
  # SIGTERM: the step in flight finishes, a checkpoint is saved, the exit status is 143.
  assert proc.returncode == 128 + signal.SIGTERM, log[-3000:]
  preempted_at = int(re.search(r"preempted: saved a checkpoint at step (\d+)", log)[1])
  assert preempted_at >= term_at and max(saved_steps(workdir)) == preempted_at

  # Ctrl-C a step or two into an epoch: the checkpoint there is the interruption's.
  int_at = next(s for s in range(preempted_at + 2, STEPS) if s % STEPS_PER_EPOCH in (1, 2))
  proc, log = interrupt(workdir, env, logged_steps, int_at, signal.SIGINT, 0)
  assert proc.returncode == 128 + signal.SIGINT, log[-3000:]
  line = re.search(r"interrupted: saved a checkpoint at step (\d+) in .*; run the same "
                   r"command again to resume\.", log)
  interrupted_at = int(line[1])
  assert interrupted_at >= int_at and interrupted_at % STEPS_PER_EPOCH, interrupted_at
  assert max(saved_steps(workdir)) == interrupted_at
  assert "Traceback" not in log and "KeyboardInterrupt" not in log

  resumed = run(workdir, env, every_steps=0)
  assert resumed["resumed_from_step"] == interrupted_at
  assert resumed["alpha"] == reference["alpha"], (term_at, int_at)
  assert resumed["genotype"] == reference["genotype"]
  events = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert {"event": "resumed", "step": preempted_at} in events
  assert {"event": "resumed", "step": interrupted_at} in events
  # Every step and every epoch once, whatever was written before each stop.
  assert logged_steps(workdir) == list(range(1, STEPS + 1))
  # TensorBoard too draws every step once, the lost sessions' steps moved aside.
  for run_dir in (workdir, tmp_path / "killed"):
    assert [s for s, _ in tensorboard_values(run_dir, "train_loss")] == list(
        range(1, STEPS + 1)), run_dir
  assert [e["epoch"] for e in events if "epoch" in e] == [1, 2, 3]
