"""scikit-learn's embedded handwritten digits: a real dataset for the quick start.

1797 grayscale 8x8 images of the digits 0-9 (pixel values 0..16) ship inside
scikit-learn (`sklearn.datasets.load_digits`), so a search runs end to end with no
download and, at 8x8, compiles and steps quickly on a CPU.
"""

import dataclasses

import numpy as np
from sklearn import datasets

from nanas_jax.data.base import SearchData, check_split_args, split_point

NUM_CLASSES = 10
MAX_PIXEL = 16.0


def load_raw() -> tuple[np.ndarray, np.ndarray]:
  """All images scaled to [0, 1], float32 [1797, 8, 8, 1], and their int32 labels."""
  digits = datasets.load_digits()
  images = (digits.images / MAX_PIXEL).astype(np.float32)[..., np.newaxis]
  return images, digits.target.astype(np.int32)


# eq=False: the generated __eq__ would compare arrays element-wise and fail on `bool()`.
@dataclasses.dataclass(frozen=True, eq=False)
class Split:
  """The shuffled digits cut in two, images still in [0, 1], with the first part's statistics.

  The search uses the parts as search-train / search-val, training from scratch as
  train / test (`nanas_jax.data.streams`); both standardise with `standardise`.
  """

  train_images: np.ndarray  # float32 [N, 8, 8, 1] in [0, 1]
  train_labels: np.ndarray  # int32 [N]
  val_images: np.ndarray  # float32 [M, 8, 8, 1] in [0, 1]
  val_labels: np.ndarray  # int32 [M]
  mean: np.float64  # of the train part's pixels
  std: np.float64

  def standardise(self, images: np.ndarray) -> np.ndarray:
    """float32 (images - mean) / std with the train part's statistics."""
    return ((images - self.mean) / self.std).astype(np.float32)


def load_split(*, train_portion: float = 0.5, seed: int = 0,
               max_examples: int | None = None) -> Split:
  """The digits shuffled with `seed`, then split: the first `train_portion` is the train part.

  `max_examples` keeps the first examples of the shuffled order before the split.
  The statistics (one mean and standard deviation, one channel) come from the train part
  only: the other part plays held-out data, so its pixels must not shape the inputs the
  weights learn from.
  """
  check_split_args(train_portion, max_examples)
  images, labels = load_raw()
  order = np.random.default_rng(seed).permutation(len(labels))[:max_examples]
  n_train = split_point(len(order), train_portion)
  train, val = order[:n_train], order[n_train:]
  return Split(train_images=images[train], train_labels=labels[train],
               val_images=images[val], val_labels=labels[val],
               mean=images[train].mean(dtype=np.float64),
               std=images[train].std(dtype=np.float64))


def load_search_data(*, train_portion: float = 0.5, seed: int = 0,
                     max_examples: int | None = None) -> SearchData:
  """The search split of `load_split`, standardised: the first part trains the weights."""
  split = load_split(train_portion=train_portion, seed=seed, max_examples=max_examples)
  return SearchData(
      train_images=split.standardise(split.train_images), train_labels=split.train_labels,
      val_images=split.standardise(split.val_images), val_labels=split.val_labels,
      num_classes=NUM_CLASSES, name='digits')
