"""CIFAR-10 and CIFAR-100 through TensorFlow Datasets, held in memory for the search.

This reads a split into numpy (CIFAR fits), normalises it as the DARTS code does, and
cuts the DARTS search split from the 'train' split. Epoch-indexed batches with
augmentation and per-host sharding over these arrays live in `nanas_jax.data.streams`.

TensorFlow is imported on first use, not with this module: it takes seconds, and the
digits quick start never needs it. This loader never downloads: on a pod every host
would race to fetch and prepare the same files, so preparing a dataset is a separate,
explicit step whose command the error message spells out.
"""

import functools

import numpy as np

from nanas_jax.data.base import SearchData, check_split_args, split_point

# Per-channel mean and standard deviation of the training images in [0, 1].
# CIFAR-10: quark0/darts utils._data_transforms_cifar10. quark0/darts has no CIFAR-100;
# these are the values common in PyTorch CIFAR-100 code (P-DARTS rounds them differently,
# by at most 2e-4).
NORMALISATION = {
    'cifar10': ((0.49139968, 0.48215827, 0.44653124), (0.24703233, 0.24348505, 0.26158768)),
    'cifar100': ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

# Examples per tf.data batch while copying into numpy: large enough to amortise the
# per-batch overhead, small enough to keep the transient copy a few tens of MB.
_READ_BATCH = 4096


@functools.cache
def _tensorflow_datasets():
  """Imports tensorflow_datasets with TensorFlow kept off every GPU."""
  from nanas_jax import cli  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  cli.import_tensorflow_quietly()
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  # JAX owns the accelerators; TensorFlow only decodes images here and would otherwise
  # reserve most of a GPU's memory for itself.
  tf.config.set_visible_devices([], 'GPU')
  return tfds


def _check_name(name: str) -> None:
  if name not in NORMALISATION:
    raise ValueError(f'unknown TFDS dataset {name!r}; choose one of {tuple(NORMALISATION)}.')


def _not_prepared_message(name: str, data_dir: str) -> str:
  """What to run to prepare `name` in `data_dir`."""
  return (
      f'TFDS dataset {name!r} is not prepared in data_dir={data_dir!r}, and this loader '
      f'never downloads. Prepare it once, on a machine with network access:\n'
      f'  tfds build {name} --data_dir={data_dir}\n'
      f'or\n'
      f'  python -c "import tensorflow_datasets as tfds; '
      f"tfds.builder('{name}', data_dir='{data_dir}').download_and_prepare()\"\n"
      f'then pass that data_dir (or set TFDS_DATA_DIR).')


def load_split(name: str, split: str = 'train', *, data_dir: str | None = None,
               max_examples: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
  """Split `split` ('train' or 'test') in its stored order: uint8 [N, 32, 32, 3], int32 labels.

  Returns:
    (images, labels, num_classes); at most `max_examples` examples, the first ones.

  Raises:
    FileNotFoundError: the dataset is not prepared in `data_dir`; the message gives the
      command that prepares it.
  """
  _check_name(name)
  tfds = _tensorflow_datasets()
  # TFDS signals a dataset it cannot find with DatasetNotFoundError, and prepared files
  # missing from data_dir with an AssertionError from as_dataset, before reading anything.
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    # shuffle_files=False: the same order on every run and host, so the split is fixed.
    dataset = builder.as_dataset(split=split, shuffle_files=False, as_supervised=True)
  except (tfds.core.DatasetNotFoundError, AssertionError) as error:
    raise FileNotFoundError(
        _not_prepared_message(name, data_dir or tfds.core.constants.DATA_DIR)) from error
  if max_examples is not None:
    dataset = dataset.take(max_examples)
  images, labels = [], []
  for image_batch, label_batch in tfds.as_numpy(dataset.batch(_READ_BATCH)):
    images.append(image_batch)
    labels.append(label_batch)
  num_classes = builder.info.features['label'].num_classes
  return np.concatenate(images), np.concatenate(labels).astype(np.int32), num_classes


def load_train_split(name: str, *, data_dir: str | None = None,
                     max_examples: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
  """`load_split` of the 'train' split."""
  return load_split(name, 'train', data_dir=data_dir, max_examples=max_examples)


def normalise(images: np.ndarray, name: str) -> np.ndarray:
  """uint8 images to float32 (x / 255 - mean) / std with the channel statistics of `name`."""
  _check_name(name)
  mean, std = (np.asarray(v, np.float32) for v in NORMALISATION[name])
  return (images.astype(np.float32) / np.float32(255) - mean) / std


def load_search_data(name: str, *, train_portion: float = 0.5, data_dir: str | None = None,
                     max_examples: int | None = None) -> SearchData:
  """DARTS search split of the 'train' split: the first `train_portion` trains weights.

  The rest trains the architecture. As in DARTS the split is ordered, not shuffled; the
  order is TFDS's stored one, which differs from torchvision's but is fixed.
  """
  _check_name(name)
  check_split_args(train_portion, max_examples)
  images, labels, num_classes = load_train_split(name, data_dir=data_dir,
                                                 max_examples=max_examples)
  n_train = split_point(len(labels), train_portion)
  return SearchData(
      train_images=normalise(images[:n_train], name), train_labels=labels[:n_train],
      val_images=normalise(images[n_train:], name), val_labels=labels[n_train:],
      num_classes=num_classes, name=name)
