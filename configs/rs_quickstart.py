"""Quick start of random search with weight sharing (Li & Talwalkar's RS-WS) on the
embedded digits: the baseline of configs/na_rs_quickstart.py.

Launch:
  python -m nanas_jax.main --config=configs/rs_quickstart.py --workdir=/tmp/nanas_rs

Cost: 2 min 7 s alone on a 2-core CPU (measured, the compilation cache cold): 10 epochs
of supernet training with one sampled architecture per step (78 s), then 90 candidates
scored by their own validation loss (46 s; the same number of evaluations as the NA-RS
quick start).
"""

from configs import na_rs_quickstart


def get_config():
  config = na_rs_quickstart.get_config()
  config.search.algorithm = "rs"
  config.search.rs = na_rs_quickstart.rs_block(num_candidates=90)
  return config
