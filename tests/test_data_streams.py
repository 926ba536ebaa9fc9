"""Tests for nanas_jax.data.streams: in-memory streams for digits and CIFAR.

Oracles: augmentation recomputed image by image with the direct formulas (np.pad and
slicing for the crop, [:, ::-1] for the flip, DARTS's Cutout loop), the normalisation
constants typed in again, the digits split from `data.load_search_data`, and the mocked
CIFAR splits read through `tfds.load`. Determinism, resume and two-host sharding are
checked bit for bit against a plain single-host, uninterrupted run.
"""

import functools
import math
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from nanas_jax import data
from nanas_jax.data import loaders, streams, tfds_pipeline

# quark0/darts utils.py (CIFAR-10) and the usual CIFAR-100 values.
REFERENCE_STATS = {
    'cifar10': ([0.49139968, 0.48215827, 0.44653124], [0.24703233, 0.24348505, 0.26158768]),
    'cifar100': ([0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762]),
}


def _config(**fields):
  base = dict(name='digits', train_portion=0.5, batch_size=8, data_dir=None,
              max_examples=None)
  base.update(fields)
  return ml_collections.ConfigDict(base)


def _normalised(images, name='cifar10'):
  mean, std = (np.asarray(v) for v in REFERENCE_STATS[name])
  return (images.astype(np.float64) / 255 - mean) / std


def _darts_cutout(image, y, x, length):
  """quark0/darts utils.Cutout on one [H, W, C] image, with its centre given."""
  h, w = image.shape[:2]
  mask = np.ones((h, w), np.float32)
  y1, y2 = np.clip(y - length // 2, 0, h), np.clip(y + length // 2, 0, h)
  x1, x2 = np.clip(x - length // 2, 0, w), np.clip(x + length // 2, 0, w)
  mask[y1:y2, x1:x2] = 0.
  return image * mask[:, :, None]


def _expected_image(raw, crop_y, crop_x, flip, cut_y, cut_x, length, name='cifar10', pad=4):
  """One training image by the per-image formulas: pad, crop, flip, normalise, cutout."""
  padded = np.pad(raw, ((pad, pad), (pad, pad), (0, 0)))
  h, w = raw.shape[:2]
  image = padded[crop_y:crop_y + h, crop_x:crop_x + w]
  if flip:
    image = image[:, ::-1]
  image = _normalised(image, name)
  return _darts_cutout(image, cut_y, cut_x, length) if length else image


def _uint8_stream(n=37, batch=8, *, augment=True, cutout_length=0, seed=3, index=0, count=1,
                  stream_id=streams.STREAM_IDS['train']):
  images = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
  labels = np.arange(n, dtype=np.int32)  # a label names its example
  normalise = functools.partial(tfds_pipeline.normalise, name='cifar10')
  return streams.ArrayStream(images, labels, normalise=normalise, global_batch_size=batch,
                             seed=seed, stream_id=stream_id, augment=augment,
                             cutout_length=cutout_length, process_index=index,
                             process_count=count)


def _assert_batches_equal(first, second):
  assert len(first) == len(second)
  for (x1, y1), (x2, y2) in zip(first, second):
    assert x1.dtype == x2.dtype == np.float32 and y1.dtype == y2.dtype == np.int32
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)


def test_unaugmented_batches_follow_the_epoch_order():
  stream = _uint8_stream(augment=False)
  assert stream.num_examples == 37 and stream.steps_per_epoch == 4
  assert isinstance(stream, streams.Stream)
  order = stream.order(0)
  np.testing.assert_array_equal(np.sort(order), np.arange(37))
  epoch = list(stream.batches(0))
  assert len(epoch) == 4
  for step, (images, labels) in enumerate(epoch):
    index = order[step * 8:(step + 1) * 8]
    np.testing.assert_array_equal(labels, index)
    assert images.shape == (8, 32, 32, 3) and images.dtype == np.float32
    np.testing.assert_allclose(images, _normalised(stream.images[index]), atol=1e-5)


@pytest.mark.parametrize('length', [0, 16, 5])
def test_augmentation_matches_per_image_formulas(length):
  stream = _uint8_stream(cutout_length=length)
  for step, (images, labels) in enumerate(stream.batches(2)):
    draws = stream.augmentation(2, step)
    for row, label in enumerate(labels):
      expected = _expected_image(stream.images[label], draws.crop_y[row], draws.crop_x[row],
                                 draws.flip[row], draws.cutout_y[row], draws.cutout_x[row],
                                 length)
      np.testing.assert_allclose(images[row], expected, atol=1e-5)
      if length:  # Cutout zeroes exactly, after normalisation.
        assert (images[row] == 0).all(axis=-1).sum() == (expected == 0).all(axis=-1).sum()


def test_augmentation_draws_cover_their_ranges():
  stream = _uint8_stream(n=400, batch=100)
  draws = [stream.augmentation(0, step) for step in range(4)]
  crops = np.concatenate([np.r_[d.crop_y, d.crop_x] for d in draws])
  assert set(crops) == set(range(9))  # 4-pixel padding: offsets 0..8
  flips = np.concatenate([d.flip for d in draws])
  assert 150 < flips.sum() < 250
  centres = np.concatenate([np.r_[d.cutout_y, d.cutout_x] for d in draws])
  assert set(centres) == set(range(32))
  assert not np.array_equal(draws[0].crop_y, draws[1].crop_y)  # keyed on the step


def test_cutout_clips_at_the_borders():
  image = np.ones((1, 6, 6, 1), np.float32)
  out = streams.cutout(image, np.array([0]), np.array([5]), 4)
  expected = _darts_cutout(image[0], 0, 5, 4)
  np.testing.assert_array_equal(out[0], expected)
  assert out.sum() == 36 - 2 * 3  # rows 0..1, columns 3..5


@pytest.mark.parametrize('augment, length', [(False, 0), (True, 0), (True, 16)])
def test_deterministic_and_resume_equals_the_uninterrupted_epoch(augment, length):
  stream = _uint8_stream(augment=augment, cutout_length=length)
  full = list(stream.batches(1))
  _assert_batches_equal(full, list(_uint8_stream(augment=augment,
                                                 cutout_length=length).batches(1)))
  for start in range(stream.steps_per_epoch + 1):
    _assert_batches_equal(list(stream.batches(1, start=start)), full[start:])


def test_epochs_seeds_and_streams_draw_differently():
  stream = _uint8_stream()
  labels = [np.concatenate([y for _, y in stream.batches(e)]) for e in range(3)]
  assert not np.array_equal(labels[0], labels[1])
  assert not np.array_equal(labels[1], labels[2])
  other_seed = np.concatenate([y for _, y in _uint8_stream(seed=4).batches(0)])
  assert not np.array_equal(labels[0], other_seed)
  other_stream = _uint8_stream(stream_id=streams.STREAM_IDS['search_val'])
  np.testing.assert_raises(AssertionError, np.testing.assert_array_equal,
                           stream.order(0), other_stream.order(0))


@pytest.mark.parametrize('count', [2, 4])
def test_hosts_concatenate_to_the_single_host_batch(count):
  single = list(_uint8_stream(cutout_length=16).batches(0, start=1))
  hosts = [list(_uint8_stream(cutout_length=16, index=i, count=count).batches(0, start=1))
           for i in range(count)]
  for step, (images, labels) in enumerate(single):
    parts = [host[step] for host in hosts]
    assert all(x.shape == (8 // count, 32, 32, 3) for x, _ in parts)
    np.testing.assert_array_equal(np.concatenate([x for x, _ in parts]), images)
    np.testing.assert_array_equal(np.concatenate([y for _, y in parts]), labels)


@pytest.mark.parametrize('count', [1, 2])
def test_eval_batches_cover_every_example_once(count):
  hosts = [list(_uint8_stream(n=23, batch=4, index=i, count=count).eval_batches())
           for i in range(count)]
  stream = _uint8_stream(n=23, batch=4)
  assert stream.eval_steps == 6
  assert all(len(batches) == 6 for batches in hosts)
  seen_images, seen_labels = [], []
  for step in range(6):  # global batch = the hosts' blocks, in host order
    for host in hosts:
      images, labels, mask = host[step]
      assert images.shape == (4 // count, 32, 32, 3) and mask.dtype == bool
      assert (images[~mask] == 0).all() and (labels[~mask] == 0).all()
      seen_images.append(images[mask])
      seen_labels.append(labels[mask])
  np.testing.assert_array_equal(np.concatenate(seen_labels), np.arange(23))
  np.testing.assert_allclose(np.concatenate(seen_images), _normalised(stream.images),
                             atol=1e-5)


def test_digits_search_streams_are_the_digits_search_split():
  search = loaders.load_search_streams(_config(train_portion=0.4), 16, seed=5)
  reference = data.load_search_data('digits', train_portion=0.4, seed=5)
  assert (search.name, search.num_classes, search.image_shape) == ('digits', 10, (8, 8, 1))
  for stream, images, labels in ((search.train, reference.train_images,
                                  reference.train_labels),
                                 (search.val, reference.val_images, reference.val_labels)):
    assert stream.num_examples == len(labels)
    assert stream.steps_per_epoch == len(labels) // 16
    batches = list(stream.eval_batches())
    np.testing.assert_array_equal(np.concatenate([x[m] for x, _, m in batches]), images)
    np.testing.assert_array_equal(np.concatenate([y[m] for _, y, m in batches]), labels)
    # No augmentation by default: training rows are the split's rows in the epoch order.
    order = stream.order(0)
    epoch = list(stream.batches(0))
    np.testing.assert_array_equal(np.concatenate([x for x, _ in epoch]),
                                  images[order[:len(epoch) * 16]])


def test_digits_train_streams_hold_out_a_test_part():
  train = loaders.load_train_streams(_config(train_portion=0.75), 32, seed=2,
                                     process_index=0, process_count=1)
  reference = data.load_search_data('digits', train_portion=0.75, seed=2)
  n_train = math.floor(0.75 * 1797)
  assert (train.train.num_examples, train.test.num_examples) == (n_train, 1797 - n_train)
  test_images = np.concatenate([x[m] for x, _, m in train.test.eval_batches()])
  np.testing.assert_array_equal(test_images, reference.val_images)
  # Standardised with the train part's statistics only.
  train_images = np.concatenate([x[m] for x, _, m in train.train.eval_batches()])
  assert abs(train_images.mean(dtype=np.float64)) < 1e-6
  assert abs(train_images.std(dtype=np.float64) - 1) < 1e-6
  assert abs(test_images.mean(dtype=np.float64)) > 1e-4


def test_digits_augment_pads_by_one_pixel():
  search = loaders.load_search_streams(_config(augment=True), 16, seed=0,
                                       process_index=0, process_count=1)
  assert search.train.pad == 1
  draws = search.train.augmentation(0, 0)
  assert set(np.r_[draws.crop_y, draws.crop_x]) <= {0, 1, 2}
  images, _ = next(search.train.batches(0))
  assert images.shape == (16, 8, 8, 1)


def test_digits_streams_never_import_tensorflow():
  code = ('import sys, ml_collections; from nanas_jax.data import loaders; '
          'c = ml_collections.ConfigDict(dict(name="digits", train_portion=0.5)); '
          'next(loaders.load_search_streams(c, 8, 0).train.batches(0)); '
          'next(loaders.load_train_streams(c, 8, 0).test.eval_batches()); '
          'print(sorted(m for m in sys.modules if m.split(".")[0] in '
          '("tensorflow", "tensorflow_datasets")))')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          check=True)
  assert result.stdout.strip() == '[]'


def _tfds_oracle(name, data_dir, split, n):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  dataset = tfds.load(name, split=split, data_dir=data_dir).take(n).batch(n)
  example = next(iter(tfds.as_numpy(dataset)))
  return example['image'], example['label']


@pytest.mark.parametrize('name, num_classes', [('cifar10', 10), ('cifar100', 100)])
def test_cifar_search_streams(tmp_path, name, num_classes):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  config = _config(name=name, train_portion=0.3, data_dir=str(tmp_path))
  with tfds.testing.mock_data(num_examples=20):
    search = loaders.load_search_streams(config, 4, seed=1, process_index=0,
                                         process_count=1)
    images, labels = _tfds_oracle(name, str(tmp_path), 'train', 20)
  assert (search.name, search.num_classes, search.image_shape) == (name, num_classes,
                                                                   (32, 32, 3))
  assert (search.train.num_examples, search.val.num_examples) == (6, 14)
  assert search.train.images.dtype == np.uint8  # normalised per batch, not in memory
  for stream, part in ((search.train, slice(0, 6)), (search.val, slice(6, 20))):
    batches = list(stream.eval_batches())
    np.testing.assert_array_equal(np.concatenate([y[m] for _, y, m in batches]),
                                  labels[part])
    np.testing.assert_allclose(np.concatenate([x[m] for x, _, m in batches]),
                               _normalised(images[part], name), atol=1e-5)
  # DARTS augments both search parts: crop and flip, no Cutout.
  for stream in (search.train, search.val):
    images, _ = next(stream.batches(0))
    draws, order = stream.augmentation(0, 0), stream.order(0)
    for row in range(4):
      expected = _expected_image(stream.images[order[row]], draws.crop_y[row],
                                 draws.crop_x[row], draws.flip[row], 0, 0, 0, name)
      np.testing.assert_allclose(images[row], expected, atol=1e-5)


def test_cifar_train_streams(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  config = _config(name='cifar10', data_dir=str(tmp_path), cutout=16)
  with tfds.testing.mock_data(num_examples=12):
    train = loaders.load_train_streams(config, 4, seed=0, process_index=0, process_count=1)
    test_images, test_labels = _tfds_oracle('cifar10', str(tmp_path), 'test', 12)
  assert (train.train.num_examples, train.test.num_examples) == (12, 12)
  assert train.train.augment and train.train.cutout_length == 16
  assert not train.test.augment and train.test.cutout_length == 0
  images, labels = next(train.train.batches(3))
  draws, order = train.train.augmentation(3, 0), train.train.order(3)
  for row in range(4):
    expected = _expected_image(train.train.images[order[row]], draws.crop_y[row],
                               draws.crop_x[row], draws.flip[row], draws.cutout_y[row],
                               draws.cutout_x[row], 16)
    np.testing.assert_allclose(images[row], expected, atol=1e-5)
  np.testing.assert_array_equal(labels, train.train.labels[order[:4]])
  # The test stream is never augmented, not even in `batches`.
  images, labels = next(train.test.batches(0))
  np.testing.assert_allclose(images, _normalised(test_images[train.test.order(0)[:4]]),
                             atol=1e-5)
  batches = list(train.test.eval_batches())
  np.testing.assert_array_equal(np.concatenate([y[m] for _, y, m in batches]), test_labels)


def test_cifar_missing_dataset_names_the_command(tmp_path):
  with pytest.raises(FileNotFoundError, match=f'tfds build cifar100 --data_dir={tmp_path}'):
    loaders.load_search_streams(_config(name='cifar100', data_dir=str(tmp_path)), 4, 0,
                                process_index=0, process_count=1)


@pytest.mark.parametrize('fields, batch, count, message', [
    ({}, 6, 4, r'config.data.batch_size = 6 is not divisible by the 4 processes'),
    ({}, 0, 1, r'config.data.batch_size = 0 must be a positive integer'),
    ({}, 1024, 1, r'config.data.batch_size = 1024 is larger than the search-train part '
                  r'\(898 examples\)'),
    ({'max_examples': 40}, 32, 2, r'config.data.batch_size = 32 is larger than the '
                                  r'search-train part \(20 examples\)'),
    ({'name': 'mnist'}, 8, 1, r"config.data.name = 'mnist' is not a known dataset; .*"
                              r"'digits', 'cifar10'"),
    ({'name': None}, 8, 1, r'config.data.name = None is not a known dataset'),
    ({'train_portion': 1.0}, 8, 1, r'config.data: train_portion must be a fraction'),
    ({'max_examples': 1}, 8, 1, r'config.data: max_examples must be None'),
    ({'augment': 'yes'}, 8, 1, r"config.data.augment = 'yes' must be True or False"),
    ({'cutout': -1}, 8, 1, r'config.data.cutout = -1 must be an integer >= 0'),
    ({'image_size': 4}, 8, 1, r'config.data.image_size = 4 must be an integer >= 8'),
    ({'shuffle_buffer': 0}, 8, 1, r'config.data.shuffle_buffer = 0 must be an integer >= 1'),
])
def test_bad_config_values_name_the_field(fields, batch, count, message):
  with pytest.raises(ValueError, match=message):
    loaders.load_search_streams(_config(**fields), batch, 0, process_index=0,
                                process_count=count)


def test_bad_call_arguments():
  with pytest.raises(ValueError, match=r'seed = -1 must be a non-negative integer'):
    loaders.load_train_streams(_config(), 8, -1, process_index=0, process_count=1)
  with pytest.raises(ValueError, match=r'process_index = 2 must be in \[0, 2\)'):
    loaders.load_train_streams(_config(), 8, 0, process_index=2, process_count=2)
  stream = _uint8_stream()
  with pytest.raises(ValueError, match=r'start = 5 must be an integer in \[0, 4\]'):
    stream.batches(0, start=5)
  with pytest.raises(ValueError, match=r'epoch = -1 must be a non-negative integer'):
    stream.batches(-1)
  with pytest.raises(ValueError, match=r'config.data.cutout = 2.5 must be a non-negative'):
    _uint8_stream(cutout_length=2.5)
