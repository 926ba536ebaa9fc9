"""Datasets for the architecture search behind one small in-memory interface.

The search loop sees only `SearchData` (the DARTS search split of a training set: one
part trains the weights, the other trains the architecture), `batches` and
`steps_per_epoch`. The sources live in submodules, imported on first use so that the
quick start on `digits` never imports TensorFlow:

- `digits`: scikit-learn's embedded 8x8 handwritten digits, no download;
- `tfds_pipeline`: CIFAR-10 and CIFAR-100 through TensorFlow Datasets.

Every source checks its arguments with `check_split_args` before reading anything and
cuts the split at `split_point`, so all of them split the same way.

`streams` serves the same splits, and the training splits for training from scratch, as
epoch-indexed, augmented, per-host, resumable streams (digits and CIFAR in memory;
ImageNet streamed with tf.data by `imagenet`).
"""

from nanas_jax.data.base import (DATASET_NAMES, SearchData, batches, check_split_args,
                                 split_point, steps_per_epoch)

__all__ = ["DATASET_NAMES", "SearchData", "batches", "check_split_args", "load_search_data",
           "split_point", "steps_per_epoch"]


def load_search_data(name: str, *, train_portion: float = 0.5, seed: int = 0,
                     data_dir: str | None = None,
                     max_examples: int | None = None) -> SearchData:
  """Loads the DARTS search split of dataset `name` into memory.

  Args:
    name: one of `DATASET_NAMES`.
    train_portion: fraction of the examples that trains the weights; the rest trains the
      architecture.
    seed: shuffles `digits` before the split. The CIFAR split is the fixed ordered one
      DARTS uses (first part / rest of the 'train' split), so `seed` does not change it.
    data_dir: TensorFlow Datasets directory for CIFAR (None: TFDS's default); unused by
      `digits`.
    max_examples: cap on the examples read before the split (tests, smoke runs).

  Returns:
    The `SearchData`, images normalised.
  """
  if name not in DATASET_NAMES:
    raise ValueError(f'unknown dataset {name!r}; choose one of {DATASET_NAMES}.')
  # Imported here: only the source asked for is loaded (digits never imports TensorFlow).
  if name == 'digits':
    from nanas_jax.data import digits  # pylint: disable=g-import-not-at-top
    return digits.load_search_data(train_portion=train_portion, seed=seed,
                                   max_examples=max_examples)
  from nanas_jax.data import tfds_pipeline  # pylint: disable=g-import-not-at-top
  return tfds_pipeline.load_search_data(name, train_portion=train_portion,
                                        data_dir=data_dir, max_examples=max_examples)
