"""Quick start of the whole pipeline: search, retrain the found genotype, write a report.

Launch:
  python -m nanas_jax.main --config=configs/pipeline_quickstart.py --workdir=/tmp/nanas_pipeline

Cost: 7 min 43 s on a 2-core CPU (measured): search 3.6 minutes (first step, i.e.
compilation, 29 s; 6 epochs of 15 steps at batch 32), flatness 17 s, training 3.6 minutes.
Measured: the search's supernet reached 0.956 validation accuracy, and the found genotype
0.990 test top-1 (chance is 0.1) on the 797 held-out digits (DARTS_V2 with
configs/train_quickstart.py: 0.991). Alpha hardly leaves uniform in so short a search
(entropy 2.079 of log 8 = 2.079), so the genotype comes from small differences in alpha: a
quick start of the machinery, not a search result.

Writes WORKDIR/search (the search), WORKDIR/train (the training from scratch) and
WORKDIR/report.md (genotype, cell picture, search accuracy, flatness, parameters,
multiply-adds, test accuracy, wall times). Rerunning the command skips the finished stages
and resumes an unfinished one from its checkpoints; a workdir with a report is refused.

Stages, all on scikit-learn's embedded digits:
- search: the NA-DARTS quick start (`configs/quickstart.py`: 5 cells, C=8, K=4 neighbors)
  on the first 1000 shuffled digits (500 train the weights, 500 the architecture), batch
  32, 6 epochs;
- flatness: the found genotype's neighbors at distances 1 and 2 (16 sampled at each),
  scored with the trained supernet on 2 validation batches;
- training: `configs/train_quickstart.py` (8 cells, C=16, 20 epochs) on the same first
  1000 digits; its test split is the other 797, which the search never saw (the report
  checks this pixel for pixel).
"""

import ml_collections

from configs import quickstart, train_quickstart


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.task = "pipeline"

  config.search = quickstart.get_config()

  config.train = train_quickstart.get_config(arg)

  config.pipeline = ml_collections.ConfigDict()
  config.pipeline.flatness = True
  config.pipeline.flatness_radius = 2
  # Neighbors per distance (all of them when there are fewer); None: all of them.
  config.pipeline.flatness_num_neighbors = 16
  config.pipeline.flatness_eval_batches = 2
  # Training batches on which each architecture's BatchNorm statistics are re-estimated.
  config.pipeline.flatness_recalibrate_batches = 4
  config.pipeline.flatness_seed = 0
  return config
