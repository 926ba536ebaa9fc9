"""scikit-learn's embedded handwritten digits: a real dataset for the quick start.

1797 grayscale 8x8 images of the digits 0-9 (pixel values 0..16) ship inside
scikit-learn (`sklearn.datasets.load_digits`), so a search runs end to end with no
download and, at 8x8, compiles and steps quickly on a CPU.
"""

import numpy as np
from sklearn import datasets

from nanas_jax.data import SearchData, check_split_args, split_point

NUM_CLASSES = 10
MAX_PIXEL = 16.0


def load_raw() -> tuple[np.ndarray, np.ndarray]:
  """All images scaled to [0, 1], float32 [1797, 8, 8, 1], and their int32 labels."""
  digits = datasets.load_digits()
  images = (digits.images / MAX_PIXEL).astype(np.float32)[..., np.newaxis]
  return images, digits.target.astype(np.int32)


def load_search_data(*, train_portion: float = 0.5, seed: int = 0,
                     max_examples: int | None = None) -> SearchData:
  """The digits shuffled with `seed`, then split: the first `train_portion` trains weights.

  `max_examples` keeps the first examples of the shuffled order before the split.
  Images are standardised with one mean and standard deviation (one channel) computed on
  the search-train part only: the search-val part plays the held-out data of the
  architecture step, so its pixels must not shape the inputs the weights learn from.
  """
  check_split_args(train_portion, max_examples)
  images, labels = load_raw()
  order = np.random.default_rng(seed).permutation(len(labels))[:max_examples]
  n_train = split_point(len(order), train_portion)
  train, val = order[:n_train], order[n_train:]
  mean = images[train].mean(dtype=np.float64)
  std = images[train].std(dtype=np.float64)

  def standardise(x):
    return ((x - mean) / std).astype(np.float32)

  return SearchData(
      train_images=standardise(images[train]), train_labels=labels[train],
      val_images=standardise(images[val]), val_labels=labels[val],
      num_classes=NUM_CLASSES, name='digits')
