"""Command-line entry point: ``python -m nanas_jax.main --config=configs/quickstart.py --workdir=DIR``.

Any config field can be overridden on the command line, e.g.
``--config.search.neighbors.num=8``. The console script ``nanas-jax`` runs the same.
"""

import logging as std_logging
import signal
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from nanas_jax import experiment, loop

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (a module with get_config()).",
    lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for results, metrics and logs.")
flags.mark_flags_as_required(["config", "workdir"])


def _quiet_orbax(record: std_logging.LogRecord) -> bool:
  """Keeps every record except orbax's INFO and DEBUG lines."""
  return record.levelno > std_logging.INFO or "/orbax/" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  # Orbax logs every phase of every checkpoint at INFO (over a hundred lines each); its
  # warnings and errors still show.
  logging.get_absl_handler().addFilter(_quiet_orbax)
  try:
    summary = experiment.run(FLAGS.config, FLAGS.workdir)
  except loop.Preempted as preempted:
    print(preempted)
    # 128 + SIGTERM, the status of a process the signal ended: schedulers (SLURM
    # --requeue) treat the job as preempted, not finished.
    sys.exit(128 + signal.SIGTERM)
  print(summary["message"])
  print(f"Genotype ({summary.get('genotype_path', FLAGS.workdir + '/genotype.txt')}):\n"
        f"{summary['genotype']}")


def run():
  """Console-script entry point (``nanas-jax``)."""
  app.run(main)


if __name__ == "__main__":
  run()
