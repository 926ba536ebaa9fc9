"""Command-line entry point: ``python -m nanas_jax.main --config=configs/quickstart.py --workdir=DIR``.

Any config field can be overridden on the command line, e.g.
``--config.search.neighbors.num=8``. The console script ``nanas-jax`` runs the same.
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from nanas_jax import experiment

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (a module with get_config()).",
    lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for results, metrics and logs.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  summary = experiment.run(FLAGS.config, FLAGS.workdir)
  print(summary["message"])
  print(f"Genotype ({FLAGS.workdir}/genotype.txt):\n{summary['genotype']}")


def run():
  """Console-script entry point (``nanas-jax``)."""
  app.run(main)


if __name__ == "__main__":
  run()
