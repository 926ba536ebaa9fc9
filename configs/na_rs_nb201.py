"""NA-RS on NAS-Bench-201 with the tabular benchmark (the paper's NB201 setting).

Every candidate is scored by the mean validation error of itself and its 24 distance-1
neighbors, looked up in NATS-Bench's topology table (no training); plain RS with the same
number of evaluations (100 x 25 = 2500) runs alongside and both land in genotype.json.

Launch (needs `pip install nats_bench` and the NATS-tss-v1_0-3ffb9-simple file from the
NATS-Bench README):
  python -m nanas_jax.main --config=configs/na_rs_nb201.py --workdir=/tmp/na_rs_nb201 \
      --config.search.rs.nats_bench_path=/path/to/NATS-tss-v1_0-3ffb9-simple
or with a table you wrote (JSON {"|op~0|+...|": accuracy %, ...} or CSV arch,accuracy):
  python -m nanas_jax.main --config=configs/na_rs_nb201.py --workdir=/tmp/na_rs_nb201 \
      --config.search.rs.table_path=table.json
Exactly one of the two must be given; the run fails before any work otherwise.

Cost: seconds to minutes on a CPU (table look-ups only; loading the NATS-Bench file takes
the longest). Not run here: the benchmark file cannot be downloaded on this machine.
"""

from configs import na_rs_quickstart


def get_config():
  config = na_rs_quickstart.get_config()
  config.model.space = "nb201"
  rs = config.search.rs
  rs.evaluator = "table"
  rs.nats_bench_dataset = "cifar10-valid"
  rs.num_candidates = 100
  rs.num_neighbors = None
  rs.include_center = True
  return config
