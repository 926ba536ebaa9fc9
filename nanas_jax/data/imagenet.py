"""ImageNet streamed from TensorFlow Datasets with tf.data, per host, deterministic per epoch.

Datasets:

- 'imagenet2012': prepared once from the manual download (`prepare`, or `tfds build`),
  never downloaded or prepared by a run. Training augmentation is DARTS train_imagenet.py's:
  RandomResizedCrop to `image_size` (scale (0.08, 1), ratio (3/4, 4/3), torchvision's
  sampling, 10 attempts then a centre crop), horizontal flip, ColorJitter(0.4, 0.4, 0.4,
  0.2) in a random order as torchvision applies it, on floats in [0, 1] (torchvision on
  PIL rounds to uint8 after each; we do not). Evaluation: shorter side resized to
  round(image_size * 256 / 224), centre crop `image_size`. Resizing is bilinear with
  antialiasing, as PIL's.
- 'imagenet_resized/NxN' (downloadable with `tfds build`): the downsampled ImageNet,
  augmented as CIFAR (crop of the image padded by N // 8 black pixels, flip).

Both normalise with the ImageNet channel mean and standard deviation. The search split is
DARTS's ordered one of 'train' (its first `max_examples` when set): the first
`train_portion` trains the weights, the rest the architecture. Training from scratch uses
'train' and evaluates on 'validation'.

`TFDSStream` keeps the `streams.Stream` contract this way: every split is read as absolute
slices, host i reading the i-th of `process_count` near-equal contiguous parts of it
(global batches are the union of the hosts' batches, not equal to a single-host run's).
An epoch shuffles the host's files and a buffer with seeds keyed on (seed, stream, epoch),
under `tf.data.Options.deterministic`; resuming skips the consumed examples before they are
decoded (they are still read from disk); each example's augmentation is seeded
statelessly with its global position in the epoch (step * B + host * B/P + row). The two
shuffles take their seeds from the op seed given here, but TensorFlow combines an op seed
with its global seed when one is set (`tf.random.set_seed`): nothing in this project sets
it, and nothing must.

TensorFlow is imported on first use (through `tfds_pipeline`, which hides the GPUs from it).
"""

from collections.abc import Callable, Iterator
import functools
import math
import os

import numpy as np

from nanas_jax.data import streams, tfds_pipeline
from nanas_jax.data.base import split_point

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MANUAL_FILES = ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar')

# DARTS train_imagenet.py: RandomResizedCrop defaults and ColorJitter(0.4, 0.4, 0.4, 0.2).
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10
BRIGHTNESS = CONTRAST = SATURATION = 0.4
HUE = 0.2
# torchvision's rgb_to_grayscale weights.
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)


@functools.cache
def _tf():
  tfds_pipeline._tensorflow_datasets()  # pylint: disable=protected-access
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf


def _tfds():
  return tfds_pipeline._tensorflow_datasets()  # pylint: disable=protected-access


def normalise(image):
  """float32 image in [0, 1] to (x - mean) / std with the ImageNet channel statistics."""
  tf = _tf()
  return (image - tf.constant(IMAGENET_MEAN)) / tf.constant(IMAGENET_STD)


def random_resized_crop_box(height, width, uniforms):
  """torchvision RandomResizedCrop.get_params with its random numbers given.

  Args:
    height, width: of the image (scalars).
    uniforms: float64 [CROP_ATTEMPTS, 4] in [0, 1): per attempt the area fraction, the log
      aspect ratio, the top and the left position, each as a fraction of its range.

  Returns:
    int32 [4]: (top, left, crop height, crop width) of the first attempt that fits, else
    the centre crop with the aspect ratio clamped to CROP_RATIO.
  """
  tf = _tf()
  image_h, image_w = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
  low, high = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
  area = image_h * image_w * (CROP_SCALE[0] + (CROP_SCALE[1] - CROP_SCALE[0]) * uniforms[:, 0])
  aspect = tf.exp(low + (high - low) * uniforms[:, 1])
  # tf.round rounds half to even, as Python's round in torchvision.
  crop_w = tf.round(tf.sqrt(area * aspect))
  crop_h = tf.round(tf.sqrt(area / aspect))
  fits = (crop_w > 0) & (crop_w <= image_w) & (crop_h > 0) & (crop_h <= image_h)
  top = tf.floor(uniforms[:, 2] * (image_h - crop_h + 1))
  left = tf.floor(uniforms[:, 3] * (image_w - crop_w + 1))
  # The first fitting attempt (tf.argmax does not promise the first of ties).
  first = tf.reduce_min(tf.where(fits, tf.range(CROP_ATTEMPTS), CROP_ATTEMPTS))
  first = tf.minimum(first, CROP_ATTEMPTS - 1)
  in_ratio = image_w / image_h
  centre_w = tf.where(in_ratio > CROP_RATIO[1], tf.round(image_h * CROP_RATIO[1]), image_w)
  centre_h = tf.where(in_ratio < CROP_RATIO[0], tf.round(image_w / CROP_RATIO[0]), image_h)
  centre = tf.stack([tf.floor((image_h - centre_h) / 2), tf.floor((image_w - centre_w) / 2),
                     centre_h, centre_w])
  attempt = tf.stack([top[first], left[first], crop_h[first], crop_w[first]])
  return tf.cast(tf.where(tf.reduce_any(fits), attempt, centre), tf.int32)


def color_jitter(image, order, factors):
  """torchvision ColorJitter with its draws given, on a float32 [H, W, 3] image in [0, 1].

  Args:
    image: float32 [H, W, 3] in [0, 1].
    order: int32 [4], a permutation of (0 brightness, 1 contrast, 2 saturation, 3 hue).
    factors: float32 [4]: brightness, contrast and saturation factors (1 = unchanged), and
      the hue shift as a fraction of the colour circle.
  """
  tf = _tf()
  weights = tf.constant(GRAY_WEIGHTS)

  def gray(x):
    return tf.reduce_sum(x * weights, axis=-1, keepdims=True)

  def blend(x, other, factor):
    return tf.clip_by_value(factor * x + (1 - factor) * other, 0.0, 1.0)

  adjust = (
      lambda x: blend(x, 0.0, factors[0]),
      lambda x: blend(x, tf.reduce_mean(gray(x)), factors[1]),
      lambda x: blend(x, gray(x), factors[2]),
      lambda x: tf.image.adjust_hue(x, factors[3]),
  )
  for position in range(4):
    image = tf.switch_case(order[position], [functools.partial(f, image) for f in adjust])
  return image


def imagenet2012_train_draws(seed) -> dict:
  """The random draws of one training example, from a stateless seed (int64 [2])."""
  tf = _tf()
  crop_seed, flip_seed, order_seed, factor_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 4))
  spread = tf.constant([BRIGHTNESS, CONTRAST, SATURATION, HUE])
  centre = tf.constant([1.0, 1.0, 1.0, 0.0])
  return {
      'crop': tf.random.stateless_uniform([CROP_ATTEMPTS, 4], crop_seed, dtype=tf.float64),
      'flip': tf.random.stateless_uniform([], flip_seed) < 0.5,
      'jitter_order': tf.argsort(tf.random.stateless_uniform([4], order_seed)),
      'jitter_factors': centre + spread * tf.random.stateless_uniform(
          [4], factor_seed, minval=-1.0, maxval=1.0),
  }


def imagenet2012_train_image(encoded, seed, image_size: int):
  """JPEG bytes to a normalised float32 [size, size, 3] training crop drawn from `seed`."""
  tf = _tf()
  draws = imagenet2012_train_draws(seed)
  shape = tf.image.extract_jpeg_shape(encoded)
  box = random_resized_crop_box(shape[0], shape[1], draws['crop'])
  # Decoding only the crop window saves decoding the rest of the image; chroma at the
  # window's edges is upsampled from inside it, so pixels there differ slightly (a few
  # levels) from cropping a full decode, as torchvision does.
  image = tf.image.decode_and_crop_jpeg(encoded, box, channels=3)
  image = tf.image.resize(image, [image_size, image_size], antialias=True) / 255.0
  image = tf.where(draws['flip'], image[:, ::-1], image)
  image = color_jitter(tf.clip_by_value(image, 0.0, 1.0), draws['jitter_order'],
                       draws['jitter_factors'])
  return tf.ensure_shape(normalise(image), [image_size, image_size, 3])


def eval_resize_size(image_size: int) -> int:
  """The shorter side before the centre crop: 256 for 224, as DARTS evaluates."""
  return round(image_size * 256 / 224)


def imagenet2012_eval_image(encoded, image_size: int):
  """JPEG bytes to a normalised float32 [size, size, 3] centre crop."""
  tf = _tf()
  image = tf.io.decode_jpeg(encoded, channels=3)
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  size = eval_resize_size(image_size)
  # torchvision Resize(size): shorter side to size, longer side int(size * long / short).
  portrait = width <= height
  new_h = tf.where(portrait, size * height // width, size)
  new_w = tf.where(portrait, size, size * width // height)
  image = tf.image.resize(image, tf.stack([new_h, new_w]), antialias=True) / 255.0
  top = tf.cast(tf.round(tf.cast(new_h - image_size, tf.float64) / 2), tf.int32)
  left = tf.cast(tf.round(tf.cast(new_w - image_size, tf.float64) / 2), tf.int32)
  image = image[top:top + image_size, left:left + image_size]
  return tf.ensure_shape(normalise(tf.clip_by_value(image, 0.0, 1.0)),
                         [image_size, image_size, 3])


def resized_train_image(image, seed):
  """uint8 [N, N, 3] to a normalised crop of the image padded by N // 8, maybe mirrored."""
  tf = _tf()
  size = image.shape[0]
  pad = size // 8
  offset_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  offset = tf.random.stateless_uniform([2], offset_seed, minval=0, maxval=2 * pad + 1,
                                       dtype=tf.int32)
  padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
  crop = tf.slice(padded, tf.concat([offset, [0]], 0), [size, size, 3])
  crop = tf.where(tf.random.stateless_uniform([], flip_seed) < 0.5, crop[:, ::-1], crop)
  return normalise(tf.cast(crop, tf.float32) / 255.0)


def resized_eval_image(image):
  """uint8 [N, N, 3] to normalised float32."""
  tf = _tf()
  return normalise(tf.cast(image, tf.float32) / 255.0)


class TFDSStream(streams.HostBatching):
  """Slice [begin, end) of a TFDS split, streamed per host; see the module docstring."""

  def __init__(self, builder, split: str, begin: int, end: int, *,
               train_image: Callable, eval_image: Callable,
               image_shape: tuple[int, int, int], decoders: dict | None, augment: bool,
               shuffle_buffer: int, global_batch_size: int, seed: int, stream_id: int,
               process_index: int = 0, process_count: int = 1, part: str = 'split'):
    """Args:
      builder: the TFDS builder, prepared.
      split, begin, end: the examples [begin, end) of `split` in stored order.
      train_image: (image feature, stateless seed int64 [2]) -> float32 image.
      eval_image: image feature -> float32 image; also the training image when not
        `augment`.
      image_shape: (H, W, C) of both.
      decoders: `as_dataset` decoders (skip decoding JPEGs that `train_image` crops).
      augment, shuffle_buffer: augment training examples; shuffle buffer per host.
      global_batch_size, seed, stream_id, process_index, process_count, part: as
        `streams.ArrayStream`.
    """
    super().__init__(end - begin, global_batch_size, seed, stream_id, process_index,
                     process_count, part)
    self.builder = builder
    self.split = split
    self.image_shape = tuple(image_shape)
    self.augment = augment
    self.shuffle_buffer = shuffle_buffer
    self._train_image = train_image
    self._eval_image = eval_image
    self._decoders = decoders
    # Parts of near-equal size: each holds at least floor(N / P) >= steps_per_epoch * B / P
    # examples, so every host fills every step.
    bounds = [begin + (end - begin) * i // process_count for i in range(process_count + 1)]
    self.host_begin, self.host_end = bounds[process_index], bounds[process_index + 1]
    self._largest_part = max(b - a for a, b in zip(bounds, bounds[1:]))

  @property
  def eval_steps(self) -> int:
    """Number of `eval_batches`, the same on every host: the largest part's."""
    return -(-self._largest_part // self.host_batch_size)

  def _read(self, shuffle_seed: int | None):
    tfds = _tfds()
    split = f'{self.split}[{self.host_begin}:{self.host_end}]'
    dataset = self.builder.as_dataset(
        split=split, shuffle_files=shuffle_seed is not None, decoders=self._decoders,
        read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed))
    # take: a mocked builder (tfds.testing.mock_data) ignores the slice.
    return dataset.take(self.host_end - self.host_begin)

  def _options(self):
    options = _tf().data.Options()
    options.deterministic = True
    return options

  def _seed(self, epoch: int, purpose: int) -> np.ndarray:
    key = streams.seed_sequence(self.seed, self.stream_id, epoch, purpose)
    return key.generate_state(2, np.uint64) >> np.uint64(1)  # int64-safe

  def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Host-local batches of `epoch` from step `start`; arguments are checked on the call."""
    self.check_epoch_start(epoch, start)
    tf = _tf()
    shuffle_seed = int(self._seed(epoch, streams.TF_SHUFFLE)[0])
    augment_seed = tf.constant(self._seed(epoch, streams.TF_AUGMENT).astype(np.int64))
    batch, host_batch = self.global_batch_size, self.host_batch_size
    host_offset = self.process_index * host_batch

    def prepare(position, example):
      if self.augment:
        global_position = position // host_batch * batch + host_offset + position % host_batch
        image = self._train_image(
            example['image'],
            tf.random.experimental.stateless_fold_in(augment_seed, global_position))
      else:
        image = self._eval_image(example['image'])
      return image, tf.cast(example['label'], tf.int32)

    dataset = self._read(shuffle_seed).shuffle(self.shuffle_buffer, seed=shuffle_seed)
    dataset = dataset.take(self.steps_per_epoch * host_batch).enumerate()
    dataset = dataset.skip(start * host_batch).map(prepare, tf.data.AUTOTUNE)
    dataset = dataset.batch(host_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return iter(_tfds().as_numpy(dataset.with_options(self._options())))

  def eval_batches(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The host's part in stored order, padded with masked zero rows to `eval_steps`."""
    tf = _tf()

    def prepare(example):
      return (self._eval_image(example['image']), tf.cast(example['label'], tf.int32),
              tf.constant(True))

    padding = tf.data.Dataset.from_tensors(
        (tf.zeros(self.image_shape), tf.constant(0), tf.constant(False)))
    padding = padding.repeat(self.eval_steps * self.host_batch_size
                             - (self.host_end - self.host_begin))
    dataset = self._read(None).map(prepare, tf.data.AUTOTUNE).concatenate(padding)
    dataset = dataset.batch(self.host_batch_size).prefetch(tf.data.AUTOTUNE)
    return iter(_tfds().as_numpy(dataset.with_options(self._options())))


def not_prepared_message(name: str, data_dir: str, manual_dir: str | None) -> str:
  """What to do to prepare `name` in `data_dir`."""
  if name != 'imagenet2012':
    return tfds_pipeline._not_prepared_message(name, data_dir)  # pylint: disable=protected-access
  manual_dir = manual_dir or '/path/to/manual_dir'
  return (
      f"TFDS dataset 'imagenet2012' is not prepared in data_dir={data_dir!r}, and this "
      f'loader never downloads or prepares it. ImageNet needs a manual download:\n'
      f'  1. register at https://image-net.org/download-images and download '
      f'{MANUAL_FILES[0]} and {MANUAL_FILES[1]};\n'
      f'  2. put both files in manual_dir={manual_dir!r} (config.data.manual_dir);\n'
      f'  3. prepare once (hours, about 150 GB), on one machine:\n'
      f'     tfds build imagenet2012 --manual_dir={manual_dir} --data_dir={data_dir}\n'
      f'then pass that data_dir (config.data.data_dir).')


def prepare(data_dir: str, manual_dir: str, *, num_shards: int | None = None) -> None:
  """Prepares 'imagenet2012' in `data_dir` from the two tars in `manual_dir` (no download).

  The same as `tfds build imagenet2012 --manual_dir=... --data_dir=...`; run it once, on
  one machine, before any run reads the dataset. `num_shards`: files per split (None:
  TFDS's choice by size).
  """
  missing = [f for f in MANUAL_FILES if not os.path.exists(os.path.join(manual_dir, f))]
  if missing:
    raise FileNotFoundError(
        f'{", ".join(missing)} not found in manual_dir={manual_dir!r}: download them from '
        f'https://image-net.org/download-images (registration needed) and put them there.')
  tfds = _tfds()
  tfds.builder('imagenet2012', data_dir=data_dir).download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir,
                                                    num_shards=num_shards))


def _open(options: streams.DataOptions):
  """The builder of `options.name` and its image preprocessing, or FileNotFoundError."""
  tfds = _tfds()
  data_dir = options.data_dir or tfds.core.constants.DATA_DIR
  try:
    builder = tfds.builder(options.name, data_dir=options.data_dir)
    # Raises here, before anything is read, when the prepared files are missing.
    builder.as_dataset(split='train')
  except (tfds.core.DatasetNotFoundError, AssertionError) as error:
    raise FileNotFoundError(
        not_prepared_message(options.name, data_dir, options.manual_dir)) from error
  if options.name == 'imagenet2012':
    size = options.image_size
    return builder, dict(
        train_image=functools.partial(imagenet2012_train_image, image_size=size),
        eval_image=functools.partial(imagenet2012_eval_image, image_size=size),
        image_shape=(size, size, 3), decoders={'image': tfds.decode.SkipDecoding()})
  return builder, dict(train_image=resized_train_image, eval_image=resized_eval_image,
                       image_shape=builder.info.features['image'].shape, decoders=None)


def _count(builder, split: str, max_examples: int | None) -> int:
  """Examples in `split`, at most `max_examples`: tfds states it without reading."""
  count = int(builder.as_dataset(split=split).cardinality())
  return count if max_examples is None else min(count, max_examples)


def _check_no_cutout(options: streams.DataOptions) -> None:
  if options.cutout:
    raise ValueError(f'config.data.cutout = {options.cutout} is not supported for '
                     f'{options.name!r} (DARTS trains ImageNet without Cutout); set it to 0.')


def load_search_streams(options: streams.DataOptions, global_batch_size: int, seed: int, *,
                        process_index: int, process_count: int) -> streams.SearchStreams:
  """`loaders.load_search_streams` for the ImageNet datasets (options already read)."""
  builder, preprocessing = _open(options)
  total = _count(builder, 'train', options.max_examples)
  n_train = split_point(total, options.train_portion)
  common = dict(augment=options.augment, shuffle_buffer=options.shuffle_buffer,
                global_batch_size=global_batch_size, seed=seed, process_index=process_index,
                process_count=process_count, **preprocessing)
  train = TFDSStream(builder, 'train', 0, n_train, stream_id=streams.STREAM_IDS['search_train'],
                     part='search-train part', **common)
  val = TFDSStream(builder, 'train', n_train, total,
                   stream_id=streams.STREAM_IDS['search_val'], part='search-val part',
                   **common)
  return streams.SearchStreams(train=train, val=val,
                               num_classes=builder.info.features['label'].num_classes,
                               image_shape=train.image_shape, name=options.name)


def load_train_streams(options: streams.DataOptions, global_batch_size: int, seed: int, *,
                       process_index: int, process_count: int) -> streams.TrainStreams:
  """`loaders.load_train_streams` for the ImageNet datasets (options already read)."""
  _check_no_cutout(options)
  builder, preprocessing = _open(options)
  common = dict(shuffle_buffer=options.shuffle_buffer, global_batch_size=global_batch_size,
                seed=seed, process_index=process_index, process_count=process_count,
                **preprocessing)
  train = TFDSStream(builder, 'train', 0, _count(builder, 'train', options.max_examples),
                     augment=options.augment, stream_id=streams.STREAM_IDS['train'],
                     part='train split', **common)
  test = TFDSStream(builder, 'validation', 0,
                    _count(builder, 'validation', options.max_examples), augment=False,
                    stream_id=streams.STREAM_IDS['test'], part='validation split', **common)
  return streams.TrainStreams(train=train, test=test,
                              num_classes=builder.info.features['label'].num_classes,
                              image_shape=train.image_shape, name=options.name)
