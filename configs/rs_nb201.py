"""Random search on NAS-Bench-201 with the tabular benchmark: 2500 candidates, the same
number of evaluations as configs/na_rs_nb201.py (100 candidates x 25).

Launch (see configs/na_rs_nb201.py for the benchmark file):
  python -m nanas_jax.main --config=configs/rs_nb201.py --workdir=/tmp/rs_nb201 \
      --config.search.rs.nats_bench_path=/path/to/NATS-tss-v1_0-3ffb9-simple

Cost: seconds to minutes on a CPU (table look-ups only). Not run here.
"""

from configs import na_rs_nb201


def get_config():
  config = na_rs_nb201.get_config()
  config.search.algorithm = "rs"
  config.search.rs.num_candidates = 2500
  return config
