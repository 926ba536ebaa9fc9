"""Quick start of NA-RS: random search with weight sharing, candidates scored by their
neighborhood, on scikit-learn's embedded digits (no download).

Launch:
  python -m nanas_jax.main --config=configs/na_rs_quickstart.py --workdir=/tmp/nanas_na_rs

Cost: 2 min 43 s alone on a 2-core CPU (measured, the compilation cache cold): 10 epochs
of supernet training with one sampled architecture per step (75 s), then 10 candidates x
(8 sampled distance-1 neighbors + itself) = 90 supernet evaluations on 2 validation
batches, each with its BatchNorm statistics re-estimated on 4 training batches (51 s, 21 s
of it compiling), then plain random search with the same 90 evaluations for comparison
(34 s; both in genotype.json).
"""

import ml_collections

from configs import quickstart


def rs_block(num_candidates: int) -> ml_collections.ConfigDict:
  """The candidate-scoring settings shared by the RS and NA-RS configs."""
  rs = ml_collections.ConfigDict()
  # 'supernet': weight sharing, trained first; 'table': a NAS-Bench-201 table (no
  # training): rs.table_path (JSON {arch: accuracy %} or CSV arch,accuracy) or
  # rs.nats_bench_path (the NATS-Bench topology file, with the nats_bench package).
  rs.evaluator = "supernet"
  rs.table_path = ml_collections.FieldReference(None, field_type=str)
  rs.nats_bench_path = ml_collections.FieldReference(None, field_type=str)
  rs.nats_bench_dataset = "cifar10-valid"
  rs.num_candidates = num_candidates
  rs.radius = 1
  # Neighbors sampled per candidate (None: the whole neighborhood; on the DARTS space
  # radius 1 has 96 neighbors).
  rs.num_neighbors = ml_collections.FieldReference(8, field_type=int)
  rs.include_center = True
  rs.aggregation = "mean"
  rs.tau = 1.0
  rs.eval_batches = 2
  # Before a candidate is scored, its BatchNorm statistics are re-estimated on this many
  # training batches (the supernet's running statistics belong to the random mixture it was
  # trained with); 0 scores with each evaluation batch's own statistics instead.
  rs.recalibrate_batches = 4
  rs.chunk_size = 16
  return rs


def get_config():
  config = quickstart.get_config()
  # Every digit and the batch and width the RS quick starts were measured with (the
  # bilevel quick start's budget settings are for alpha, which RS has not).
  config.data.max_examples = None
  config.data.batch_size = 64
  config.model.channels = 8
  config.search.algorithm = "na_rs"
  config.search.epochs = 10
  config.search.rs = rs_block(num_candidates=10)
  return config
