"""Command-line entry point:
``python -m nanas_jax.main --config=configs/quickstart.py --workdir=DIR``.

Any config field can be overridden on the command line, e.g.
``--config.search.neighbors.num=8``. The console script ``nanas-jax`` runs the same.

Exit status: 0 when the run finished; 2 for a user error (a bad flag, field or value, a
missing dataset, a finished workdir: a few lines say what, where and the fix; ``--debug``
or ``NANAS_DEBUG=1`` shows the traceback, `nanas_jax.cli`); 143 after SIGTERM and 130
after Ctrl-C, each with a checkpoint saved and one line on how to resume (a second Ctrl-C
stops at once, without saving; `nanas_jax.loop`).
"""

import logging as std_logging
import sys

from absl import flags
from absl import logging
from ml_collections import config_flags

from nanas_jax import cli

if __name__ == "__main__":
  # Before TensorFlow and JAX load (seconds that a restart would repeat); the console
  # script restarts in `cli.run`.
  cli.restart_with_huge_pages()

# pylint: disable=g-import-not-at-top,wrong-import-position
from nanas_jax import config_check, loop, tasks
# pylint: enable=g-import-not-at-top,wrong-import-position

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
    cli.fail(f"unexpected arguments {cli.clip(' '.join(argv[1:]))}: every setting is a "
             "flag (--config.FIELD=VALUE).")
  logging.set_verbosity(logging.INFO)
  # Orbax logs every phase of every checkpoint at INFO (over a hundred lines each); its
  # warnings and errors still show.
  logging.get_absl_handler().addFilter(_quiet_orbax)
  try:
    summary = tasks.run(FLAGS.config, FLAGS.workdir)
  except loop.Preempted as preempted:
    print(preempted)
    # 128 + the signal, the status of a process the signal ended: schedulers (SLURM
    # --requeue) treat the job as preempted, not finished, and shells as interrupted.
    sys.exit(128 + preempted.signum)
  print(summary["message"])
  if "genotype" in summary:  # a study has one per run, in its study.md
    print(f"Genotype ({summary.get('genotype_path', FLAGS.workdir + '/genotype.txt')}):\n"
          f"{summary['genotype']}")


def run():
  """Console-script entry point (``nanas-jax``)."""
  cli.run(main, explain=config_check.explain_override_error)


if __name__ == "__main__":
  run()
