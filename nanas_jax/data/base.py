"""The in-memory search split shared by every data source: `SearchData` (one part trains
the weights, the other the architecture), the split checks (`check_split_args`) and cut
(`split_point`) every source uses, and `batches` / `steps_per_epoch` over it. Every source
module imports these from here, and the package re-exports them."""

from collections.abc import Iterator
import dataclasses
import numbers

import numpy as np

DATASET_NAMES = ('digits', 'cifar10', 'cifar100')


# eq=False: the generated __eq__ would compare arrays element-wise and fail on `bool()`.
@dataclasses.dataclass(frozen=True, eq=False)
class SearchData:
  """Search split of a training set: weights train on `train`, the architecture on `val`."""

  train_images: np.ndarray  # float32 [N, H, W, C], normalised
  train_labels: np.ndarray  # int32 [N]
  val_images: np.ndarray  # float32 [M, H, W, C], normalised like train_images
  val_labels: np.ndarray  # int32 [M]
  num_classes: int
  name: str

  def __post_init__(self):
    for part in ('train', 'val'):
      images = getattr(self, f'{part}_images')
      labels = getattr(self, f'{part}_labels')
      if images.dtype != np.float32 or images.ndim != 4:
        raise ValueError(f'{part}_images must be float32 [N, H, W, C], got '
                         f'{images.dtype} {images.shape}')
      if labels.dtype != np.int32 or labels.shape != images.shape[:1]:
        raise ValueError(f'{part}_labels must be int32 [{len(images)}] to match '
                         f'{part}_images, got {labels.dtype} {labels.shape}')
    if self.train_images.shape[1:] != self.val_images.shape[1:]:
      raise ValueError(f'train and val images differ in shape: '
                       f'{self.train_images.shape[1:]} vs {self.val_images.shape[1:]}')

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of one image, the input shape a network is initialised with."""
    return self.train_images.shape[1:]

  @property
  def num_train(self) -> int:
    return len(self.train_labels)

  @property
  def num_val(self) -> int:
    return len(self.val_labels)


def check_split_args(train_portion: float, max_examples: int | None) -> None:
  """Rejects a bad `train_portion` or `max_examples` before any data is read."""
  if (isinstance(train_portion, bool) or not isinstance(train_portion, numbers.Real)
      or not 0 < train_portion < 1):
    raise ValueError(
        f'train_portion must be a fraction strictly between 0 and 1, got '
        f'{train_portion!r}: it is the part of the training set that trains the weights, '
        f'the rest trains the architecture (DARTS uses 0.5).')
  if max_examples is not None:
    if (isinstance(max_examples, bool) or not isinstance(max_examples, numbers.Integral)
        or max_examples < 2):
      raise ValueError(f'max_examples must be None (all examples) or an integer >= 2, '
                       f'got {max_examples!r}.')
    split_point(max_examples, train_portion)


def split_point(n: int, train_portion: float) -> int:
  """Number of search-train examples among `n`: floor(train_portion * n), as in DARTS.

  Raises ValueError when the search-train part would be empty. For a `train_portion`
  below 1 (`check_split_args`) the flooring always leaves the search-val part an example.
  """
  n_train = int(np.floor(train_portion * n))
  if n_train < 1:
    raise ValueError(
        f'train_portion={train_portion} of {n} examples leaves the search-train part '
        f'empty; use a train_portion nearer 0.5 or more examples (max_examples).')
  return n_train


def _check_batch_size(n: int, batch_size: int) -> None:
  if (isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral)
      or batch_size < 1):
    raise ValueError(f'batch_size must be a positive integer, got {batch_size!r}.')
  if batch_size > n:
    raise ValueError(f'batch_size {batch_size} is larger than the split ({n} examples); '
                     f'lower batch_size or use more examples (max_examples, train_portion).')


def steps_per_epoch(n: int, batch_size: int, *, drop_remainder: bool = True) -> int:
  """Number of batches `batches` yields for `n` examples."""
  _check_batch_size(n, batch_size)
  return n // batch_size if drop_remainder else (n + batch_size - 1) // batch_size


def batches(images: np.ndarray, labels: np.ndarray, batch_size: int,
            rng: np.random.Generator, *,
            drop_remainder: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """One epoch of (images, labels) batches in an order drawn from `rng`.

  The order is drawn and the arguments checked when this is called, not at the first
  batch. With `drop_remainder` (the default) every batch has `batch_size` examples, so a
  jitted step compiles once; the examples left over differ from epoch to epoch.
  """
  n = len(images)
  if len(labels) != n:
    raise ValueError(f'images and labels differ in length: {n} vs {len(labels)}.')
  _check_batch_size(n, batch_size)
  order = rng.permutation(n)
  stop = steps_per_epoch(n, batch_size, drop_remainder=drop_remainder) * batch_size

  def epoch():
    for start in range(0, stop, batch_size):
      idx = order[start:start + batch_size]
      yield images[idx], labels[idx]

  return epoch()
