"""Tests for nanas_jax.data.digits and the package interface (SearchData, batches).

The oracle is scikit-learn's own copy of the digits, read here with numpy; the split is
located by hashing rows, so the tests do not repeat the module's shuffle.
"""

import collections
import math
import subprocess
import sys

import numpy as np
import pytest
from sklearn import datasets

from nanas_jax import data


@pytest.fixture(scope='module')
def raw():
  """sklearn's digits: uint8 pixel rows [1797, 64] in 0..16 and their labels."""
  loaded = datasets.load_digits()
  return loaded.data.astype(np.uint8), loaded.target


def _raw_rows(search, images):
  """Pixel rows 0..16 of normalised `images`, undoing the affine map of the train part.

  Pixel 0 (background) and 16 (full ink) both occur in any sizeable part, so the train
  part's minimum and maximum give the map without knowing its statistics.
  """
  lo, hi = search.train_images.min(), search.train_images.max()
  pixels = (images.astype(np.float64) - lo) / (hi - lo) * 16
  rounded = np.rint(pixels)
  np.testing.assert_allclose(pixels, rounded, atol=1e-4)
  return rounded.astype(np.uint8).reshape(len(images), -1)


def _row_keys(rows, labels):
  return [row.tobytes() + bytes([label]) for row, label in zip(rows, labels)]


@pytest.mark.parametrize('portion', [0.5, 0.25, 0.9])
def test_sizes_shapes_and_dtypes(portion):
  search = data.load_search_data('digits', train_portion=portion)
  assert search.num_train == math.floor(portion * 1797)
  assert search.num_train + search.num_val == 1797
  assert search.train_images.shape == (search.num_train, 8, 8, 1)
  assert search.val_images.shape == (search.num_val, 8, 8, 1)
  assert search.image_shape == (8, 8, 1)
  assert search.train_images.dtype == search.val_images.dtype == np.float32
  assert search.train_labels.dtype == search.val_labels.dtype == np.int32
  assert search.num_classes == 10 and search.name == 'digits'
  assert set(search.train_labels) == set(range(10))


def test_max_examples_caps_before_the_split():
  search = data.load_search_data('digits', max_examples=101, train_portion=0.5)
  assert (search.num_train, search.num_val) == (50, 51)


def test_halves_partition_the_dataset(raw):
  search = data.load_search_data('digits', seed=3)
  train = _row_keys(_raw_rows(search, search.train_images), search.train_labels)
  val = _row_keys(_raw_rows(search, search.val_images), search.val_labels)
  assert set(train).isdisjoint(val)
  assert collections.Counter(train + val) == collections.Counter(_row_keys(*raw))


def test_normalisation_uses_train_part_statistics(raw):
  rows, labels = raw
  search = data.load_search_data('digits', seed=5, train_portion=0.4)
  index = {key: i for i, key in enumerate(_row_keys(rows, labels))}
  train_idx = [index[k] for k in _row_keys(_raw_rows(search, search.train_images),
                                           search.train_labels)]
  val_idx = [index[k] for k in _row_keys(_raw_rows(search, search.val_images),
                                         search.val_labels)]
  scaled = rows.astype(np.float64) / 16
  mean, std = scaled[train_idx].mean(), scaled[train_idx].std()
  np.testing.assert_allclose(search.train_images.reshape(search.num_train, 64),
                             (scaled[train_idx] - mean) / std, atol=1e-6)
  np.testing.assert_allclose(search.val_images.reshape(search.num_val, 64),
                             (scaled[val_idx] - mean) / std, atol=1e-6)
  assert abs(search.train_images.mean(dtype=np.float64)) < 1e-6
  assert abs(search.train_images.std(dtype=np.float64) - 1) < 1e-6
  # The val part is normalised with the train part's statistics, not its own.
  assert abs(search.val_images.mean(dtype=np.float64)) > 1e-4


def test_deterministic_for_a_seed_and_different_across_seeds():
  first = data.load_search_data('digits', seed=7)
  again = data.load_search_data('digits', seed=7)
  other = data.load_search_data('digits', seed=8)
  for field in ('train_images', 'train_labels', 'val_images', 'val_labels'):
    np.testing.assert_array_equal(getattr(first, field), getattr(again, field))
  assert not np.array_equal(first.train_labels, other.train_labels)
  assert not np.array_equal(first.train_images, other.train_images)


@pytest.mark.parametrize('portion', [0, 1, 1.0, -0.1, 1.5, '0.5', True])
def test_bad_train_portion(portion):
  with pytest.raises(ValueError, match=r'train_portion must be a fraction strictly between 0'):
    data.load_search_data('digits', train_portion=portion)


def test_portion_that_empties_the_train_part():
  with pytest.raises(ValueError,
                     match=r'0.0005 of 1797 examples leaves the search-train part empty'):
    data.load_search_data('digits', train_portion=0.0005)
  with pytest.raises(ValueError, match=r'0.4 of 2 examples leaves the search-train part empty'):
    data.load_search_data('digits', train_portion=0.4, max_examples=2)


def test_smallest_split_keeps_one_example_each():
  search = data.load_search_data('digits', train_portion=0.99, max_examples=2)
  assert (search.num_train, search.num_val) == (1, 1)


@pytest.mark.parametrize('max_examples', [1, 0, 2.5])
def test_bad_max_examples(max_examples):
  with pytest.raises(ValueError, match=r'max_examples must be None .* or an integer >= 2'):
    data.load_search_data('digits', max_examples=max_examples)


def test_unknown_dataset_lists_known_ones():
  with pytest.raises(ValueError,
                     match=r"unknown dataset 'mnist'; .*'digits', 'cifar10', 'cifar100'"):
    data.load_search_data('mnist')


def test_digits_never_imports_tensorflow():
  code = ('import sys; from nanas_jax import data; data.load_search_data("digits"); '
          'print(sorted(m for m in sys.modules if m.split(".")[0] in '
          '("tensorflow", "tensorflow_datasets")))')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          check=True)
  assert result.stdout.strip() == '[]'


def test_search_data_rejects_bad_arrays():
  images = np.zeros((4, 8, 8, 1), np.float32)
  labels = np.zeros(4, np.int32)
  with pytest.raises(ValueError, match=r'train_images must be float32 \[N, H, W, C\]'):
    data.SearchData(images.astype(np.float64), labels, images, labels, 10, 'x')
  with pytest.raises(ValueError, match=r'val_labels must be int32 \[4\]'):
    data.SearchData(images, labels, images, labels[:3], 10, 'x')
  with pytest.raises(ValueError, match='train and val images differ in shape'):
    data.SearchData(images, labels, images[:, :4], labels, 10, 'x')


def _ids(n):
  """Images that carry their own index, so a batch says which examples it holds."""
  images = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None, None],
                           (n, 2, 2, 1))
  return images, np.arange(n, dtype=np.int32)


def test_batches_cover_every_example_once_without_drop_remainder():
  images, labels = _ids(103)
  epoch = list(data.batches(images, labels, 10, np.random.default_rng(0),
                            drop_remainder=False))
  assert [len(y) for _, y in epoch] == [10] * 10 + [3]
  seen = np.concatenate([y for _, y in epoch])
  np.testing.assert_array_equal(np.sort(seen), np.arange(103))
  assert not np.array_equal(seen, np.arange(103))  # shuffled
  for x, y in epoch:
    np.testing.assert_array_equal(x[:, 0, 0, 0], y)  # images stay with their labels
  assert data.steps_per_epoch(103, 10, drop_remainder=False) == len(epoch)


def test_batches_drop_remainder_gives_one_shape():
  images, labels = _ids(103)
  epoch = list(data.batches(images, labels, 10, np.random.default_rng(1)))
  assert len(epoch) == data.steps_per_epoch(103, 10) == 10
  assert {x.shape for x, _ in epoch} == {(10, 2, 2, 1)}
  seen = np.concatenate([y for _, y in epoch])
  assert len(np.unique(seen)) == 100


def test_batches_order_follows_the_generator():
  images, labels = _ids(50)
  first = [y for _, y in data.batches(images, labels, 5, np.random.default_rng(4))]
  again = [y for _, y in data.batches(images, labels, 5, np.random.default_rng(4))]
  other = [y for _, y in data.batches(images, labels, 5, np.random.default_rng(9))]
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other)


def test_batch_errors_are_raised_on_the_call():
  images, labels = _ids(20)
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match=r'batch_size 21 is larger than the split \(20 examples\)'):
    data.batches(images, labels, 21, rng)
  with pytest.raises(ValueError, match='batch_size must be a positive integer'):
    data.batches(images, labels, 0, rng)
  with pytest.raises(ValueError, match='images and labels differ in length: 20 vs 19'):
    data.batches(images, labels[:19], 4, rng)
  with pytest.raises(ValueError, match=r'batch_size 64 is larger than the split'):
    data.steps_per_epoch(10, 64)


def test_load_split_holds_raw_pixels_and_the_train_statistics(raw):
  from nanas_jax.data import digits  # pylint: disable=g-import-not-at-top
  split = digits.load_split(train_portion=0.4, seed=5)
  search = data.load_search_data('digits', train_portion=0.4, seed=5)
  assert 0 <= split.train_images.min() and split.train_images.max() <= 1
  np.testing.assert_array_equal(split.train_labels, search.train_labels)
  rows = np.rint(split.train_images.reshape(len(split.train_images), -1) * 16)
  assert set(_row_keys(rows.astype(np.uint8), split.train_labels)) <= set(_row_keys(*raw))
  assert split.mean == split.train_images.mean(dtype=np.float64)
  assert split.std == split.train_images.std(dtype=np.float64)
  np.testing.assert_array_equal(split.standardise(split.val_images), search.val_images)
