"""Tests for nanas_jax.data.imagenet: TFDSStream over ImageNet, no download.

'imagenet2012' is really prepared, by `imagenet.prepare`, from fake ILSVRC tars of a few
random JPEGs written here, so slicing, per-host parts and stored order are TFDS's own.
'imagenet_resized/32x32' is mocked with `tfds.testing.mock_data`. Oracles: the prepared
split read through TFDS directly; torchvision's RandomResizedCrop.get_params and
ColorJitter transcribed in Python and numpy (hue through `colorsys`); torchvision's
Resize + CenterCrop geometry; the normalisation constants typed in again.
"""

import colorsys
import hashlib
import io
import math
import os
import subprocess
import sys
import tarfile

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from nanas_jax.data import imagenet, loaders

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
SYNSETS = ('n01440764', 'n01443537', 'n01484850')  # classes 0, 1, 2 of labels.txt
PER_CLASS, NUM_VAL, SIZE = 8, 9, 16


def _add(tar, name, payload):
  info = tarfile.TarInfo(name)
  info.size = len(payload)
  tar.addfile(info, io.BytesIO(payload))


def _jpeg(rng, height, width):
  pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
  return tf.io.encode_jpeg(pixels, quality=95).numpy()


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  """(data_dir, manual_dir) of a prepared fake imagenet2012: 24 train, 9 validation."""
  root = tmp_path_factory.mktemp('imagenet')
  manual_dir, data_dir = str(root / 'manual'), str(root / 'data')
  os.makedirs(manual_dir)
  rng = np.random.default_rng(0)
  with tarfile.open(os.path.join(manual_dir, 'ILSVRC2012_img_train.tar'), 'w') as outer:
    for synset in SYNSETS:
      inner_bytes = io.BytesIO()
      with tarfile.open(fileobj=inner_bytes, mode='w') as inner:
        for k in range(PER_CLASS):  # portrait, landscape and square shapes
          _add(inner, f'{synset}_{k}.JPEG',
               _jpeg(rng, int(rng.integers(12, 48)), int(rng.integers(12, 48))))
      _add(outer, f'{synset}.tar', inner_bytes.getvalue())
  with tarfile.open(os.path.join(manual_dir, 'ILSVRC2012_img_val.tar'), 'w') as val:
    for k in range(1, NUM_VAL + 1):
      _add(val, f'ILSVRC2012_val_{k:08d}.JPEG', _jpeg(rng, 20 + k, 30 - k))
  # Several files per split, so that shuffling the files of an epoch is exercised.
  imagenet.prepare(data_dir, manual_dir, num_shards=4)
  return data_dir, manual_dir


def _config(data_dir, **fields):
  base = dict(name='imagenet2012', train_portion=0.5, batch_size=4, data_dir=data_dir,
              max_examples=None, image_size=SIZE)
  base.update(fields)
  return ml_collections.ConfigDict(base)


def _stored(data_dir, split):
  """(JPEG bytes, labels) of `split` in stored order, read by TFDS directly."""
  dataset = tfds.builder('imagenet2012', data_dir=data_dir).as_dataset(
      split=split, shuffle_files=False, decoders={'image': tfds.decode.SkipDecoding()})
  examples = list(tfds.as_numpy(dataset))
  return [e['image'] for e in examples], np.array([e['label'] for e in examples])


def _torchvision_eval(encoded, image_size):
  """torchvision Resize(round(size * 256 / 224)) + CenterCrop(size), then normalise."""
  image = tf.io.decode_jpeg(encoded, channels=3)
  height, width = image.shape[:2]
  size = round(image_size * 256 / 224)
  if width <= height:
    new_w, new_h = size, int(size * height / width)
  else:
    new_h, new_w = size, int(size * width / height)
  resized = tf.image.resize(image, [new_h, new_w], antialias=True).numpy() / 255
  top, left = int(round((new_h - image_size) / 2.)), int(round((new_w - image_size) / 2.))
  crop = np.clip(resized[top:top + image_size, left:left + image_size], 0, 1)
  return (crop - MEAN) / STD


def _torchvision_box(height, width, uniforms):
  """torchvision RandomResizedCrop.get_params, its random numbers taken from `uniforms`."""
  area = height * width
  log_ratio = (math.log(3 / 4), math.log(4 / 3))
  for u in uniforms:
    target_area = area * (0.08 + (1 - 0.08) * u[0])
    aspect_ratio = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
    w = int(round(math.sqrt(target_area * aspect_ratio)))
    h = int(round(math.sqrt(target_area / aspect_ratio)))
    if 0 < w <= width and 0 < h <= height:
      return int(u[2] * (height - h + 1)), int(u[3] * (width - w + 1)), h, w
  in_ratio = width / height
  if in_ratio < 3 / 4:
    w, h = width, int(round(width / (3 / 4)))
  elif in_ratio > 4 / 3:
    h, w = height, int(round(height * (4 / 3)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def _numpy_jitter(image, order, factors):
  """torchvision's tensor ColorJitter ops in `order`; hue through colorsys, pixel by pixel."""
  image = image.astype(np.float64)

  def gray(x):
    return (x * np.array([0.2989, 0.587, 0.114])).sum(-1, keepdims=True)

  def blend(x, other, factor):
    return np.clip(factor * x + (1 - factor) * other, 0, 1)

  for op in order:
    if op == 0:
      image = blend(image, 0, factors[0])
    elif op == 1:
      image = blend(image, gray(image).mean(), factors[1])
    elif op == 2:
      image = blend(image, gray(image), factors[2])
    else:
      flat = image.reshape(-1, 3)
      for i, (r, g, b) in enumerate(flat):
        h, s, v = colorsys.rgb_to_hsv(r, g, b)
        flat[i] = colorsys.hsv_to_rgb((h + factors[3]) % 1, s, v)
  return image


def _rows(batches):
  """Images and labels of (images, labels, mask) batches, masked rows only."""
  batches = list(batches)
  return (np.concatenate([x[m] for x, _, m in batches]),
          np.concatenate([y[m] for _, y, m in batches]))


def _match(rows, references):
  """Index in `references` of each row (all must match one, within float noise)."""
  rows, references = rows.reshape(len(rows), -1), references.reshape(len(references), -1)
  # 256 values spread over random images tell them apart; full rows are compared next.
  probe = np.random.default_rng(0).choice(rows.shape[1], 256, replace=False)
  probe = np.abs(rows[:, None, probe] - references[None, :, probe]).max(-1)
  index = probe.argmin(1)
  np.testing.assert_allclose(rows, references[index], atol=1e-5)
  return index


def test_random_resized_crop_box_is_torchvisions():
  rng = np.random.default_rng(0)
  shapes = [(375, 500), (500, 375), (40, 40), (10, 200), (200, 10), (13, 17)]
  for height, width in shapes:
    for _ in range(30):
      uniforms = rng.random((imagenet.CROP_ATTEMPTS, 4))
      box = imagenet.random_resized_crop_box(height, width, tf.constant(uniforms))
      assert tuple(box.numpy()) == _torchvision_box(height, width, uniforms)
  # Too wide for any attempt: the centre crop with the ratio clamped to 4/3.
  box = imagenet.random_resized_crop_box(10, 200, tf.constant(rng.random((10, 4))))
  assert tuple(box.numpy()) == (0, 93, 10, 13)


def test_color_jitter_is_torchvisions():
  rng = np.random.default_rng(1)
  image = rng.random((5, 4, 3)).astype(np.float32)
  for order in ([0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]):
    factors = np.array([1.3, 0.7, 1.4, -0.15], np.float32)
    out = imagenet.color_jitter(tf.constant(image), tf.constant(order), tf.constant(factors))
    np.testing.assert_allclose(out.numpy(), _numpy_jitter(image, order, factors), atol=2e-5)


def test_train_draws_cover_torchvisions_ranges():
  draws = [imagenet.imagenet2012_train_draws(tf.constant([7, i], tf.int64))
           for i in range(200)]
  factors = np.array([d['jitter_factors'].numpy() for d in draws])
  assert (np.abs(factors[:, :3] - 1) <= 0.4).all() and (np.abs(factors[:, 3]) <= 0.2).all()
  assert (factors[:, :3].min(0) < 0.65).all() and (factors[:, :3].max(0) > 1.35).all()
  orders = {tuple(d['jitter_order'].numpy()) for d in draws}
  assert all(sorted(o) == [0, 1, 2, 3] for o in orders) and len(orders) > 12
  assert 70 < sum(bool(d['flip']) for d in draws) < 130


def test_train_image_composes_crop_resize_flip_jitter(prepared):
  encoded, _ = _stored(prepared[0], 'train[:6]')
  for i, jpeg in enumerate(encoded):
    seed = tf.constant([3, i], tf.int64)
    out = imagenet.imagenet2012_train_image(tf.constant(jpeg), seed, SIZE).numpy()
    draws = {k: v.numpy() for k, v in imagenet.imagenet2012_train_draws(seed).items()}
    box = _torchvision_box(*tf.io.decode_jpeg(jpeg).shape[:2], draws['crop'])
    # Decoding just the window upsamples chroma at its edges from inside the window only,
    # so it differs slightly from a full decode cropped: the oracle decodes the same way.
    window = tf.image.decode_and_crop_jpeg(jpeg, box, channels=3)
    crop = tf.image.resize(window, [SIZE, SIZE], antialias=True).numpy() / 255
    crop = np.clip(crop[:, ::-1] if draws['flip'] else crop, 0, 1)
    expected = (_numpy_jitter(crop, draws['jitter_order'], draws['jitter_factors'])
                - MEAN) / STD
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-4)


def test_eval_resize_size():
  assert imagenet.eval_resize_size(224) == 256
  assert imagenet.eval_resize_size(SIZE) == 18


def test_resized_train_image_is_a_padded_crop_maybe_mirrored():
  image = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
  padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
  candidates, keys = [], []
  for y in range(9):
    for x in range(9):
      for flip in (False, True):
        crop = padded[y:y + 32, x:x + 32]
        candidates.append((((crop[:, ::-1] if flip else crop) / 255) - MEAN) / STD)
        keys.append((y, x, flip))
  # Through tf.data, as the stream calls it: graph mode, and fast for 300 draws.
  outputs = tf.data.Dataset.range(300).map(
      lambda i: imagenet.resized_train_image(tf.constant(image), tf.stack([5, i])))
  outputs = next(iter(outputs.batch(300))).numpy()
  seen = [keys[k] for k in _match(outputs, np.array(candidates))]
  assert {y for y, _, _ in seen} == {x for _, x, _ in seen} == set(range(9))
  assert 100 < sum(flip for _, _, flip in seen) < 200


def test_missing_dataset_gives_the_steps(tmp_path):
  config = _config(str(tmp_path / 'data'), manual_dir=str(tmp_path / 'manual'))
  with pytest.raises(FileNotFoundError) as error:
    loaders.load_train_streams(config, 4, 0, process_index=0, process_count=1)
  message = str(error.value)
  assert (f'tfds build imagenet2012 --manual_dir={tmp_path / "manual"} '
          f'--data_dir={tmp_path / "data"}') in message
  assert 'ILSVRC2012_img_train.tar' in message and 'ILSVRC2012_img_val.tar' in message
  config = _config(str(tmp_path), name='imagenet_resized/32x32')
  with pytest.raises(FileNotFoundError,
                     match=f'tfds build imagenet_resized/32x32 --data_dir={tmp_path}'):
    loaders.load_search_streams(config, 4, 0, process_index=0, process_count=1)
  with pytest.raises(FileNotFoundError, match=r'ILSVRC2012_img_train.tar, '
                                              r'ILSVRC2012_img_val.tar not found'):
    imagenet.prepare(str(tmp_path / 'data'), str(tmp_path))


def test_eval_batches_match_torchvision_geometry(prepared):
  data_dir, _ = prepared
  train = loaders.load_train_streams(_config(data_dir), 4, 0, process_index=0,
                                     process_count=1)
  assert (train.name, train.num_classes, train.image_shape) == ('imagenet2012', 1000,
                                                                (SIZE, SIZE, 3))
  assert (train.train.num_examples, train.test.num_examples) == (24, NUM_VAL)
  assert train.train.augment and not train.test.augment
  encoded, labels = _stored(data_dir, 'validation')
  batches = list(train.test.eval_batches())
  assert len(batches) == train.test.eval_steps == 3
  assert [m.sum() for _, _, m in batches] == [4, 4, 1]
  images, seen_labels = _rows(batches)
  np.testing.assert_array_equal(seen_labels, labels)
  for image, jpeg in zip(images, encoded):
    np.testing.assert_allclose(image, _torchvision_eval(jpeg, SIZE), atol=1e-5)
  assert (batches[-1][0][1:] == 0).all()


@pytest.mark.parametrize('max_examples, sizes', [(None, (12, 12)), (15, (7, 8))])
def test_search_split_is_the_ordered_split_of_train(prepared, max_examples, sizes):
  data_dir, _ = prepared
  search = loaders.load_search_streams(_config(data_dir, max_examples=max_examples), 4, 0,
                                       process_index=0, process_count=1)
  assert (search.train.num_examples, search.val.num_examples) == sizes
  _, labels = _stored(data_dir, 'train')
  np.testing.assert_array_equal(_rows(search.train.eval_batches())[1], labels[:sizes[0]])
  np.testing.assert_array_equal(_rows(search.val.eval_batches())[1],
                                labels[sizes[0]:sum(sizes)])
  images, _ = next(search.val.batches(0))
  assert images.shape == (4, SIZE, SIZE, 3) and images.dtype == np.float32


def test_train_batches_are_deterministic_and_resumable(prepared):
  data_dir, _ = prepared
  stream, fresh = (loaders.load_train_streams(_config(data_dir), 4, 11, process_index=0,
                                              process_count=1).train for _ in range(2))
  full = list(stream.batches(0))
  assert len(full) == 6
  for (x1, y1), (x2, y2) in zip(full, fresh.batches(0)):
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
  for start in (2, 6):
    resumed = list(fresh.batches(0, start))
    assert len(resumed) == 6 - start
    for (x1, y1), (x2, y2) in zip(full[start:], resumed):
      np.testing.assert_array_equal(x1, x2)
      np.testing.assert_array_equal(y1, y2)
  assert not np.array_equal(full[0][0], next(stream.batches(1))[0])


def test_a_new_process_resumes_with_the_same_data(prepared):
  """A resumed run is a new process: its batches must equal this process's, bit for bit."""
  data_dir, _ = prepared
  code = (
      'import sys, hashlib, ml_collections; from nanas_jax.data import loaders; '
      f'c = ml_collections.ConfigDict(dict(name="imagenet2012", data_dir={data_dir!r}, '
      f'image_size={SIZE})); '
      's = loaders.load_train_streams(c, 4, 5, process_index=1, process_count=2).train; '
      'h = hashlib.sha256(); '
      '[h.update(x.tobytes() + y.tobytes()) for x, y in s.batches(3, start=2)]; '
      'print(h.hexdigest())')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          check=True)
  stream = loaders.load_train_streams(_config(data_dir), 4, 5, process_index=1,
                                      process_count=2).train
  digest = hashlib.sha256()
  for images, labels in list(stream.batches(3))[2:]:
    digest.update(images.tobytes() + labels.tobytes())
  assert result.stdout.strip().splitlines()[-1] == digest.hexdigest()


def test_unaugmented_epochs_permute_the_split(prepared):
  data_dir, _ = prepared
  train = loaders.load_train_streams(_config(data_dir, augment=False), 4, 0,
                                     process_index=0, process_count=1)
  references, labels = _rows(train.train.eval_batches())
  orders = []
  for e in range(2):
    batches = list(train.train.batches(e))
    index = _match(np.concatenate([x for x, _ in batches]), references)
    np.testing.assert_array_equal(np.sort(index), np.arange(24))
    np.testing.assert_array_equal(np.concatenate([y for _, y in batches]), labels[index])
    orders.append(index)
  assert not np.array_equal(orders[0], orders[1])


def test_two_hosts_read_disjoint_parts(prepared):
  data_dir, _ = prepared
  config = _config(data_dir, augment=False, max_examples=None)
  hosts = [loaders.load_train_streams(config, 4, 0, process_index=i, process_count=2)
           for i in range(2)]
  single = loaders.load_train_streams(config, 4, 0, process_index=0, process_count=1)
  references, labels = _rows(single.train.eval_batches())
  seen = []
  for host in hosts:
    assert host.train.steps_per_epoch == 6 and host.train.host_batch_size == 2
    batches = list(host.train.batches(0))
    assert len(batches) == 6 and all(x.shape == (2, SIZE, SIZE, 3) for x, _ in batches)
    seen.append(set(_match(np.concatenate([x for x, _ in batches]), references)))
  assert seen == [set(range(12)), set(range(12, 24))]
  # Validation has 9 examples: parts of 4 and 5, both hosts give 3 padded batches.
  test_refs, test_labels = _rows(single.test.eval_batches())
  parts = [list(host.test.eval_batches()) for host in hosts]
  assert [len(p) for p in parts] == [3, 3]
  assert [sum(m.sum() for _, _, m in p) for p in parts] == [4, 5]
  images, labels_seen = zip(*(_rows(p) for p in parts))
  np.testing.assert_array_equal(np.concatenate(labels_seen), test_labels)
  np.testing.assert_array_equal(_match(np.concatenate(images), test_refs), np.arange(9))


def test_imagenet_errors(prepared):
  data_dir, _ = prepared
  with pytest.raises(ValueError, match=r'config.data.cutout = 8 is not supported'):
    loaders.load_train_streams(_config(data_dir, cutout=8), 4, 0, process_index=0,
                               process_count=1)
  with pytest.raises(ValueError, match=r'config.data.batch_size = 16 is larger than the '
                                       r'search-train part \(12 examples\)'):
    loaders.load_search_streams(_config(data_dir), 16, 0, process_index=0, process_count=1)
  with pytest.raises(ValueError, match=r'config.data.batch_size = 6 is not divisible by '
                                       r'the 4 processes'):
    loaders.load_search_streams(_config(data_dir), 6, 0, process_index=0, process_count=4)


def test_imagenet_resized_under_mock_data(tmp_path):
  config = _config(str(tmp_path), name='imagenet_resized/32x32', train_portion=0.5)
  with tfds.testing.mock_data(num_examples=12):
    search = loaders.load_search_streams(config, 2, 4, process_index=0, process_count=1)
    oracle = next(iter(tfds.as_numpy(tfds.load('imagenet_resized/32x32', split='train',
                                                data_dir=str(tmp_path)).batch(12))))
    assert (search.train.num_examples, search.val.num_examples) == (6, 6)
    assert (search.num_classes, search.image_shape) == (1000, (32, 32, 3))
    images, labels = _rows(search.train.eval_batches())
    # The mock ignores slices: each part streams the first examples of 'train'.
    np.testing.assert_array_equal(labels, oracle['label'][:6])
    np.testing.assert_allclose(images, (oracle['image'][:6] / 255 - MEAN) / STD, atol=1e-5)
    full = list(search.train.batches(2))
    resumed = list(search.train.batches(2, start=1))
    assert len(full) == 3 and full[0][0].shape == (2, 32, 32, 3)
    assert full[0][1].dtype == np.int32 and full[0][0].dtype == np.float32
    for (x1, y1), (x2, y2) in zip(full[1:], resumed):
      np.testing.assert_array_equal(x1, x2)
      np.testing.assert_array_equal(y1, y2)
