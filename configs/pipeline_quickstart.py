"""Quick start of the whole pipeline: search, retrain the found genotype, write a report.

Launch:
  python -m nanas_jax.main --config=configs/pipeline_quickstart.py --workdir=/tmp/nanas_pipeline

Cost: about 7 minutes on a 2-core CPU shared with other jobs: search 4 minutes (first
step, i.e. compilation, 46 s; 28 steps of about 6 s), flatness 1 minute, training 2.3
minutes (the found genotype is lighter than DARTS_V2). Measured: the found genotype
reached 0.984 test top-1 (chance is 0.1) on the 797 held-out digits. The shortened search
barely moves alpha (its supernet validation accuracy was 0.21): a quick start of the
machinery, not a search result.

Writes WORKDIR/search (the search), WORKDIR/train (the training from scratch) and
WORKDIR/report.md (genotype, cell picture, search accuracy, flatness, parameters,
multiply-adds, test accuracy, wall times). Rerunning the command skips the finished stages
and resumes an unfinished one from its checkpoints; a workdir with a report is refused.

Stages, all on scikit-learn's embedded digits:
- search: the NA-DARTS quick start (`configs/quickstart.py`: 5 cells, C=8, K=4 neighbors)
  shortened to 4 epochs on the first 1000 shuffled digits (500 train the weights, 500 the
  architecture);
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
  config.search.data.max_examples = 1000
  config.search.data.batch_size = 32
  config.search.search.epochs = 6

  config.train = train_quickstart.get_config(arg)

  config.pipeline = ml_collections.ConfigDict()
  config.pipeline.flatness = True
  config.pipeline.flatness_radius = 2
  # Neighbors per distance (all of them when there are fewer); None: all of them.
  config.pipeline.flatness_num_neighbors = 16
  config.pipeline.flatness_eval_batches = 2
  config.pipeline.flatness_seed = 0
  return config
