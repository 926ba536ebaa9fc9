"""Loading a dataset's streams by name: `load_search_streams` (the DARTS search split) and
`load_train_streams` (training from scratch), dispatching to the in-memory sources
(`digits`, `tfds_pipeline`, as `streams.ArrayStream`) and to `imagenet`'s tf.data streams.
The splits, their checks and the stream contract are `nanas_jax.data.streams`'s; this
module sits above every source, so none of them imports another to dispatch.
"""

from __future__ import annotations

import functools

import jax

from nanas_jax.data import imagenet
from nanas_jax.data.base import split_point
from nanas_jax.data.streams import (STREAM_IDS, ArrayStream, SearchStreams, TrainStreams,
                                    check_batch_layout, check_seed, read_options)


def _processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  return (jax.process_index() if process_index is None else process_index,
          jax.process_count() if process_count is None else process_count)


def _checked_layout(data_config, global_batch_size, seed, process_index, process_count):
  """The options and host layout of a loader call, checked before any data is read."""
  options = read_options(data_config)
  process_index, process_count = _processes(process_index, process_count)
  check_batch_layout(global_batch_size, process_count, process_index)
  check_seed(seed)
  return options, process_index, process_count


def load_search_streams(data_config, global_batch_size: int, seed: int, *,
                        process_index: int | None = None,
                        process_count: int | None = None) -> SearchStreams:
  """The DARTS search split of `config.data.name` as two streams.

  Args:
    data_config: `config.data` (see the module docstring for the fields).
    global_batch_size: examples per step summed over hosts (`config.data.batch_size`).
    seed: keys every order and augmentation draw (`config.seed`).
    process_index, process_count: this host and the number of hosts; default
      `jax.process_index()` and `jax.process_count()`.

  `config.data.cutout` is ignored here: DARTS searches without it.
  """
  options, process_index, process_count = _checked_layout(
      data_config, global_batch_size, seed, process_index, process_count)
  if options.name.startswith('imagenet'):
    return imagenet.load_search_streams(options, global_batch_size, seed,
                                        process_index=process_index,
                                        process_count=process_count)
  layout = dict(global_batch_size=global_batch_size, seed=seed,
                process_index=process_index, process_count=process_count,
                augment=options.augment)
  if options.name == 'digits':
    from nanas_jax.data import digits  # pylint: disable=g-import-not-at-top
    split = digits.load_split(train_portion=options.train_portion, seed=seed,
                              max_examples=options.max_examples)
    parts = (split.train_images, split.train_labels), (split.val_images, split.val_labels)
    normalise, num_classes = split.standardise, digits.NUM_CLASSES
  else:
    from nanas_jax.data import tfds_pipeline  # pylint: disable=g-import-not-at-top
    images, labels, num_classes = tfds_pipeline.load_split(
        options.name, 'train', data_dir=options.data_dir, max_examples=options.max_examples)
    n_train = split_point(len(labels), options.train_portion)
    # Slices, not copies: both parts view the one uint8 array.
    parts = (images[:n_train], labels[:n_train]), (images[n_train:], labels[n_train:])
    normalise = functools.partial(tfds_pipeline.normalise, name=options.name)
  (train_images, train_labels), (val_images, val_labels) = parts
  train = ArrayStream(train_images, train_labels, normalise=normalise,
                      stream_id=STREAM_IDS['search_train'], part='search-train part',
                      **layout)
  val = ArrayStream(val_images, val_labels, normalise=normalise,
                    stream_id=STREAM_IDS['search_val'], part='search-val part', **layout)
  return SearchStreams(train=train, val=val, num_classes=num_classes,
                       image_shape=train.image_shape, name=options.name)


def load_train_streams(data_config, global_batch_size: int, seed: int, *,
                       process_index: int | None = None,
                       process_count: int | None = None) -> TrainStreams:
  """Streams for training a network from scratch on `config.data.name`.

  Arguments as `load_search_streams`. The train stream is augmented when
  `config.data.augment` (plus Cutout when `config.data.cutout > 0`); the test stream never.
  """
  options, process_index, process_count = _checked_layout(
      data_config, global_batch_size, seed, process_index, process_count)
  if options.name.startswith('imagenet'):
    return imagenet.load_train_streams(options, global_batch_size, seed,
                                       process_index=process_index,
                                       process_count=process_count)
  layout = dict(global_batch_size=global_batch_size, seed=seed,
                process_index=process_index, process_count=process_count)
  if options.name == 'digits':
    from nanas_jax.data import digits  # pylint: disable=g-import-not-at-top
    split = digits.load_split(train_portion=options.train_portion, seed=seed,
                              max_examples=options.max_examples)
    parts = (split.train_images, split.train_labels), (split.val_images, split.val_labels)
    normalise, num_classes = split.standardise, digits.NUM_CLASSES
  else:
    from nanas_jax.data import tfds_pipeline  # pylint: disable=g-import-not-at-top
    read = functools.partial(tfds_pipeline.load_split, options.name,
                             data_dir=options.data_dir, max_examples=options.max_examples)
    train_images, train_labels, num_classes = read('train')
    test_images, test_labels, _ = read('test')
    parts = (train_images, train_labels), (test_images, test_labels)
    normalise = functools.partial(tfds_pipeline.normalise, name=options.name)
  (train_images, train_labels), (test_images, test_labels) = parts
  train = ArrayStream(train_images, train_labels, normalise=normalise,
                      stream_id=STREAM_IDS['train'], augment=options.augment,
                      cutout_length=options.cutout, part='train split', **layout)
  test = ArrayStream(test_images, test_labels, normalise=normalise,
                     stream_id=STREAM_IDS['test'], augment=False, part='test split',
                     **layout)
  return TrainStreams(train=train, test=test, num_classes=num_classes,
                      image_shape=train.image_shape, name=options.name)
