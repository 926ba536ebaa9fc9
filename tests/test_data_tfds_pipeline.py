"""Tests for nanas_jax.data.tfds_pipeline under tfds.testing.mock_data (no download).

The oracle reads the same mocked 'train' split through `tfds.load` and normalises it
with numpy and the reference constants typed in again here.
"""

import math

import numpy as np
import pytest
import tensorflow_datasets as tfds

from nanas_jax import data
from nanas_jax.data import tfds_pipeline

# quark0/darts utils.py (CIFAR-10) and the usual CIFAR-100 values.
REFERENCE_STATS = {
    'cifar10': ([0.49139968, 0.48215827, 0.44653124], [0.24703233, 0.24348505, 0.26158768]),
    'cifar100': ([0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762]),
}


def _oracle(name, data_dir, n):
  """First `n` mocked 'train' examples read by tfds directly: uint8 images, labels."""
  dataset = tfds.load(name, split='train', data_dir=data_dir).take(n).batch(n)
  example = next(iter(tfds.as_numpy(dataset)))
  return example['image'], example['label']


def _expected(images, name):
  mean, std = (np.asarray(v) for v in REFERENCE_STATS[name])
  return (images.astype(np.float64) / 255 - mean) / std


@pytest.mark.parametrize('name, num_classes', [('cifar10', 10), ('cifar100', 100)])
@pytest.mark.parametrize('portion', [0.5, 0.3])
def test_search_split_matches_oracle(tmp_path, name, num_classes, portion):
  with tfds.testing.mock_data(num_examples=20):
    search = data.load_search_data(name, train_portion=portion, data_dir=str(tmp_path))
    images, labels = _oracle(name, str(tmp_path), 20)
  n_train = math.floor(portion * 20)
  assert (search.num_train, search.num_val) == (n_train, 20 - n_train)
  assert search.train_images.shape == (n_train, 32, 32, 3)
  assert search.val_images.shape == (20 - n_train, 32, 32, 3)
  assert search.image_shape == (32, 32, 3)
  assert search.train_images.dtype == np.float32 and search.train_labels.dtype == np.int32
  assert search.num_classes == num_classes and search.name == name
  all_labels = np.concatenate([search.train_labels, search.val_labels])
  assert 0 <= all_labels.min() and all_labels.max() < num_classes
  np.testing.assert_array_equal(all_labels, labels)
  np.testing.assert_allclose(search.train_images, _expected(images[:n_train], name),
                             atol=1e-5)
  np.testing.assert_allclose(search.val_images, _expected(images[n_train:], name),
                             atol=1e-5)


def test_max_examples_keeps_the_first_examples(tmp_path):
  with tfds.testing.mock_data(num_examples=20):
    search = data.load_search_data('cifar10', data_dir=str(tmp_path), max_examples=11)
    images, labels = _oracle('cifar10', str(tmp_path), 11)
  assert (search.num_train, search.num_val) == (5, 6)
  np.testing.assert_array_equal(np.concatenate([search.train_labels, search.val_labels]),
                                labels)
  np.testing.assert_allclose(search.val_images, _expected(images[5:], 'cifar10'), atol=1e-5)


def test_missing_dataset_names_the_command_and_data_dir(tmp_path):
  with pytest.raises(FileNotFoundError) as error:
    data.load_search_data('cifar10', data_dir=str(tmp_path))
  message = str(error.value)
  assert f'tfds build cifar10 --data_dir={tmp_path}' in message
  assert f"tfds.builder('cifar10', data_dir='{tmp_path}').download_and_prepare()" in message
  assert f"data_dir='{tmp_path}'" in message


def test_bad_arguments_fail_before_any_read(tmp_path):
  # The data is missing too: a ValueError, not FileNotFoundError, shows the check came first.
  with pytest.raises(ValueError, match='train_portion must be a fraction'):
    data.load_search_data('cifar10', train_portion=1.0, data_dir=str(tmp_path))
  with pytest.raises(ValueError, match='max_examples must be None'):
    data.load_search_data('cifar100', max_examples=1, data_dir=str(tmp_path))
  with pytest.raises(ValueError, match=r"unknown TFDS dataset 'svhn_cropped'"):
    tfds_pipeline.load_search_data('svhn_cropped', data_dir=str(tmp_path))


def test_normalise_maps_channel_mean_to_zero():
  mean = np.asarray(REFERENCE_STATS['cifar10'][0])
  pixel = np.rint(mean * 255).astype(np.uint8)
  out = tfds_pipeline.normalise(np.broadcast_to(pixel, (1, 2, 2, 3)), 'cifar10')
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, np.broadcast_to(_expected(pixel, 'cifar10'), out.shape),
                             atol=1e-6)
  assert np.abs(out).max() < 0.5 / 255 / min(REFERENCE_STATS['cifar10'][1])
