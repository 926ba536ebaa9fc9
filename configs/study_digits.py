"""A DARTS vs NA-DARTS study on scikit-learn's embedded digits (no download).

Launch:
  python -m nanas_jax.main --config=configs/study_digits.py --workdir=/tmp/nanas_study
  python -m nanas_jax.main --config=configs/study_digits.py:gpu --workdir=...   # larger

Cost (measured, the default variant, alone on a 2-core CPU: an AMD EPYC Zen 4, 2026-12-07,
the compilation cache cold): 32.1 minutes for the README's study section
(`docs/study_digits/`; 57.5 minutes before issue 11's speed changes). The
``gpu`` variant (5 seeds, the reference supernet width, longer searches and trainings, 8
neighbors retrained per genotype) is sized for one GPU, untimed.

What runs (`nanas_jax.study`): per method (DARTS; NA-DARTS with the swap neighborhood and
the mean aggregate; add ``na_darts_max`` with
``--config.study.methods="('darts','na_darts','na_darts_max')"``) and seed, the quick-start
search (`configs/quickstart.py`) on the first 1000 shuffled digits, the flatness of its
genotype at distances 1 and 2 in the trained supernet (BatchNorm recalibrated per
neighbor), the genotype trained from scratch and ``study.neighbors`` random distance-1
neighbors of it trained the same way, each tested on the other 797 digits, which no search
saw. Writes study.md, study.json and the pictures into the workdir; a rerun resumes and
skips what is finished.
"""

import ml_collections

from configs import quickstart, train_quickstart


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.task = "study"
  config.search = quickstart.get_config()
  config.train = train_quickstart.get_config()
  # Small networks trained briefly: 5 genotypes per run (the found one and its neighbors).
  config.train.model.layers = 5
  config.train.model.channels = 8
  config.train.train.epochs = 10
  config.train.train.eval_every_epochs = 10
  config.study = ml_collections.ConfigDict()
  config.study.methods = ("darts", "na_darts")
  config.study.seeds = (0, 1, 2)
  config.study.neighbors = 4
  config.study.flatness_radius = 2
  config.study.flatness_num_neighbors = 16
  config.study.flatness_eval_batches = 4
  config.study.flatness_recalibrate_batches = 4
  if arg == "gpu":
    config.study.seeds = (0, 1, 2, 3, 4)
    config.study.neighbors = 8
    config.study.flatness_num_neighbors = 48
    config.search.model.channels = 16
    config.search.model.layers = 8
    config.search.search.epochs *= 2
    config.train.model.layers = 8
    config.train.model.channels = 16
    config.train.train.epochs = 30
  elif arg is not None:
    raise ValueError(f"configs/study_digits.py takes no argument or 'gpu', got {arg!r}.")
  return config
