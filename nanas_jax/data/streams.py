"""Epoch-indexed, per-host, resumable input streams for the search and for training.

A `Stream` yields the batches of one split. Its contract, which every implementation
keeps and the tests check:

- `batches(epoch, start)` is a pure function of (seed, epoch, start): the order of an
  epoch and any augmentation come from random generators keyed on (seed, stream, epoch,
  step or example position), never from global state. Resuming at step `start` of an epoch
  therefore sees exactly the data an uninterrupted run sees, bit for bit.
- Every epoch has `steps_per_epoch = num_examples // global_batch_size` full batches (the
  remainder is dropped, so a jitted step compiles once).
- Each host yields its block of `global_batch_size / process_count` rows of every global
  batch; `eval_batches` gives every host the same number of batches, the last padded, with
  a mask, so collective evaluation steps never wait on a host that ran out.

Two implementations:

- `ArrayStream` (this module): a split held in numpy memory as raw pixels (digits as floats
  in [0, 1], CIFAR as uint8: a quarter of float32's memory), normalised per batch. Every
  host holds
  the whole split and draws the same global order and the same augmentation draws, then
  keeps its row block: the hosts' batches concatenated are the single-host global batch.
  Augmentation is DARTS's, vectorised over the batch: random crop of the image padded by
  `height // 8` black pixels (4 for CIFAR), horizontal flip, and for training from scratch
  Cutout (DARTS utils.Cutout) after normalisation.
- `imagenet.TFDSStream`: ImageNet streamed with tf.data; each host reads its own part.

Datasets (`config.data.name`) and their splits:

- 'digits': search = `digits.load_search_data`'s split; training from scratch = the same
  shuffled digits cut at `train_portion` into train / test, standardised with the train
  part's statistics. There is no separate test set: a search on the digits sees the test
  part, so from-scratch accuracies on the digits are a smoke test, not a result.
- 'cifar10', 'cifar100': search = the DARTS ordered split of 'train' (first
  `train_portion` trains the weights, the rest the architecture), both augmented as DARTS
  train_search.py does; training from scratch = all of 'train' (crop, flip, cutout when
  `config.data.cutout > 0`), test = 'test'.
- 'imagenet2012', 'imagenet_resized/{8,16,32,64}x..': see `nanas_jax.data.imagenet`.

`data_config` is the `config.data` ConfigDict. Fields read (with `.get`, so older configs
keep working): name, train_portion, data_dir, max_examples (cap on the examples of each
split read, for tests and smoke runs), augment (default True except for digits), cutout
(side length, 0 = off; training from scratch only, as in DARTS), and for ImageNet
manual_dir, image_size (default 224) and shuffle_buffer (default 16384). The global batch
comes as an argument, the caller's `config.data.batch_size`, which the error messages name.
"""

from collections.abc import Callable, Iterator
import dataclasses
import numbers
from typing import Any, Protocol, runtime_checkable

import numpy as np

from nanas_jax.data.base import check_split_args

IMAGENET_RESIZED_NAMES = tuple(f'imagenet_resized/{s}x{s}' for s in (8, 16, 32, 64))
STREAM_DATASET_NAMES = ('digits', 'cifar10', 'cifar100', 'imagenet2012',
                        *IMAGENET_RESIZED_NAMES)

# Each stream of a run draws from its own keys: the two search parts usually have the same
# size, and with one key they would be shuffled by the same permutation.
STREAM_IDS = {'search_train': 0, 'search_val': 1, 'train': 2, 'test': 3}

# What a key is for; the fifth key word is a step (or 0).
ORDER, AUGMENT, TF_SHUFFLE, TF_AUGMENT = range(4)

DEFAULT_SHUFFLE_BUFFER = 16384
DEFAULT_IMAGE_SIZE = 224


def seed_sequence(seed: int, stream_id: int, epoch: int, purpose: int,
                  step: int = 0) -> np.random.SeedSequence:
  """The key of one random draw of a stream.

  Always five words: numpy's SeedSequence gives [a, b, c] and [a, b, c, 0] the same state,
  so keys of different lengths could collide.
  """
  return np.random.SeedSequence([seed, stream_id, epoch, purpose, step])


@runtime_checkable
class Stream(Protocol):
  """The batches of one split; see the module docstring for the contract."""

  num_examples: int
  global_batch_size: int
  steps_per_epoch: int

  def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Host-local (images float32 [B/P, H, W, C], labels int32) of `epoch` from step `start`."""

  def eval_batches(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The split once, in order, unaugmented: (images, labels, mask), the last batch padded."""


@dataclasses.dataclass(frozen=True)
class SearchStreams:
  """The DARTS search split: `train` trains the weights, `val` the architecture."""

  train: Stream
  val: Stream
  num_classes: int
  image_shape: tuple[int, int, int]
  name: str


@dataclasses.dataclass(frozen=True)
class TrainStreams:
  """Training a network from scratch: `train` trains it, `test` measures it."""

  train: Stream
  test: Stream
  num_classes: int
  image_shape: tuple[int, int, int]
  name: str


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


class HostBatching:
  """Batch layout shared by the streams: sizes, host block, argument checks."""

  def __init__(self, num_examples: int, global_batch_size: int, seed: int, stream_id: int,
               process_index: int, process_count: int, part: str):
    check_batch_layout(global_batch_size, process_count, process_index)
    check_seed(seed)
    if global_batch_size > num_examples:
      raise ValueError(
          f'config.data.batch_size = {global_batch_size} is larger than the {part} '
          f'({num_examples} examples); lower config.data.batch_size or use more examples '
          f'(config.data.max_examples, config.data.train_portion).')
    self.num_examples = num_examples
    self.global_batch_size = global_batch_size
    self.steps_per_epoch = num_examples // global_batch_size
    self.host_batch_size = global_batch_size // process_count
    self.process_index = process_index
    self.process_count = process_count
    self.seed = seed
    self.stream_id = stream_id
    self.part = part

  def check_epoch_start(self, epoch: int, start: int) -> None:
    if not _is_int(epoch) or epoch < 0:
      raise ValueError(f'epoch = {epoch!r} must be a non-negative integer (epochs count '
                       f'from 0).')
    if not _is_int(start) or not 0 <= start <= self.steps_per_epoch:
      raise ValueError(f'start = {start!r} must be an integer in [0, {self.steps_per_epoch}]'
                       f' (the steps of one epoch of the {self.part}) to resume inside it.')


def check_seed(seed: int) -> None:
  if not _is_int(seed) or seed < 0:
    raise ValueError(f'seed = {seed!r} must be a non-negative integer (config.seed).')


def check_batch_layout(global_batch_size: int, process_count: int,
                       process_index: int = 0) -> None:
  """Rejects a global batch that the hosts cannot share equally."""
  if not _is_int(global_batch_size) or global_batch_size < 1:
    raise ValueError(f'config.data.batch_size = {global_batch_size!r} must be a positive '
                     f'integer (the global batch, summed over hosts).')
  if not _is_int(process_count) or process_count < 1:
    raise ValueError(f'process_count = {process_count!r} must be a positive integer.')
  if not _is_int(process_index) or not 0 <= process_index < process_count:
    raise ValueError(f'process_index = {process_index!r} must be in [0, {process_count}).')
  if global_batch_size % process_count:
    raise ValueError(
        f'config.data.batch_size = {global_batch_size} is not divisible by the '
        f'{process_count} processes (hosts): each host loads an equal block of every global '
        f'batch; use a multiple of {process_count}.')


# eq=False: the generated __eq__ would compare arrays element-wise and fail on `bool()`.
@dataclasses.dataclass(frozen=True, eq=False)
class Augmentation:
  """The random draws of one batch, one entry per row.

  Cutout centres are drawn even when cutout is off, so turning it on leaves the crops and
  flips of a run unchanged.
  """

  crop_y: np.ndarray  # int64 [B]: top row of the crop in the padded image, in [0, 2 * pad]
  crop_x: np.ndarray  # int64 [B]: left column, likewise
  flip: np.ndarray  # bool [B]: mirror left-right after the crop
  cutout_y: np.ndarray  # int64 [B]: centre row of the cutout square, in [0, H)
  cutout_x: np.ndarray  # int64 [B]: centre column, in [0, W)

  def rows(self, index: slice) -> 'Augmentation':
    """The draws of rows `index` (a host's block of a global batch)."""
    return Augmentation(*(getattr(self, f.name)[index] for f in dataclasses.fields(self)))


def draw_augmentation(rng: np.random.Generator, batch: int, height: int, width: int,
                      pad: int) -> Augmentation:
  """Crop offsets, flips and cutout centres for `batch` images, in this order from `rng`."""
  return Augmentation(
      crop_y=rng.integers(0, 2 * pad + 1, batch), crop_x=rng.integers(0, 2 * pad + 1, batch),
      flip=rng.integers(0, 2, batch).astype(bool),
      cutout_y=rng.integers(0, height, batch), cutout_x=rng.integers(0, width, batch))


def pad_crop_flip(images: np.ndarray, augmentation: Augmentation, pad: int) -> np.ndarray:
  """Pads `images` [B, H, W, C] by `pad` zeros, crops H x W at the drawn offsets, flips.

  Padding happens on the raw pixels, before normalisation: black borders, as the PIL
  RandomCrop in DARTS pads.
  """
  batch, height, width, _ = images.shape
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  rows = augmentation.crop_y[:, None] + np.arange(height)
  cols = augmentation.crop_x[:, None] + np.arange(width)
  # A mirrored crop reads the crop's columns right to left: one gather does both.
  cols = np.where(augmentation.flip[:, None], cols[:, ::-1], cols)
  return padded[np.arange(batch)[:, None, None], rows[:, :, None], cols[:, None, :]]


def cutout(images: np.ndarray, centre_y: np.ndarray, centre_x: np.ndarray,
           length: int) -> np.ndarray:
  """Zeroes one square per image as DARTS utils.Cutout: rows [y - L//2, y + L//2) clipped."""
  _, height, width, _ = images.shape
  half = length // 2
  y0, y1 = np.clip(centre_y - half, 0, height), np.clip(centre_y + half, 0, height)
  x0, x1 = np.clip(centre_x - half, 0, width), np.clip(centre_x + half, 0, width)
  ys, xs = np.arange(height), np.arange(width)
  in_rows = (ys >= y0[:, None]) & (ys < y1[:, None])
  in_cols = (xs >= x0[:, None]) & (xs < x1[:, None])
  square = in_rows[:, :, None] & in_cols[:, None, :]
  return np.where(square[..., None], np.zeros((), images.dtype), images)


class ArrayStream(HostBatching):
  """A split held in memory, shuffled, augmented and normalised with numpy per batch."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, *,
               normalise: Callable[[np.ndarray], np.ndarray], global_batch_size: int,
               seed: int, stream_id: int, augment: bool, cutout_length: int = 0,
               process_index: int = 0, process_count: int = 1, part: str = 'split'):
    """Args:
      images: raw images [N, H, W, C] (uint8, or floats in [0, 1]); kept, not copied.
      labels: int32 [N].
      normalise: raw images of a batch to float32 network inputs.
      global_batch_size, seed, process_index, process_count: see `loaders.load_search_streams`.
      stream_id: one of `STREAM_IDS`' values; streams of one run draw independently.
      augment: random crop (padding `H // 8`) and flip in `batches`.
      cutout_length: side of the Cutout square in `batches`, 0 for none.
      part: what the split is, for error messages.
    """
    if images.ndim != 4 or labels.shape != images.shape[:1]:
      raise ValueError(f'images must be [N, H, W, C] and labels [N], got {images.shape} and '
                       f'{labels.shape}.')
    if not _is_int(cutout_length) or cutout_length < 0:
      raise ValueError(f'config.data.cutout = {cutout_length!r} must be a non-negative '
                       f'integer (the side of the square, 0 = off).')
    super().__init__(len(labels), global_batch_size, seed, stream_id, process_index,
                     process_count, part)
    self.images = images
    self.labels = labels.astype(np.int32, copy=False)
    self.normalise = normalise
    self.augment = augment
    self.cutout_length = cutout_length
    self.image_shape = tuple(images.shape[1:])
    self.pad = self.image_shape[0] // 8
    self._host_rows = slice(process_index * self.host_batch_size,
                            (process_index + 1) * self.host_batch_size)

  @property
  def eval_steps(self) -> int:
    """Number of `eval_batches`, the same on every host."""
    return -(-self.num_examples // self.global_batch_size)

  def order(self, epoch: int) -> np.ndarray:
    """The global order of the examples in `epoch`; batch k holds order[k*B:(k+1)*B]."""
    rng = np.random.default_rng(seed_sequence(self.seed, self.stream_id, epoch, ORDER))
    return rng.permutation(self.num_examples)

  def augmentation(self, epoch: int, step: int) -> Augmentation:
    """The draws of global batch `step` of `epoch`, all rows (hosts keep their block)."""
    rng = np.random.default_rng(
        seed_sequence(self.seed, self.stream_id, epoch, AUGMENT, step))
    height, width, _ = self.image_shape
    return draw_augmentation(rng, self.global_batch_size, height, width, self.pad)

  def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Host-local batches of `epoch` from step `start`; arguments are checked on the call."""
    self.check_epoch_start(epoch, start)
    order = self.order(epoch)
    batch = self.global_batch_size

    def generate():
      for step in range(start, self.steps_per_epoch):
        index = order[step * batch:(step + 1) * batch][self._host_rows]
        images = self.images[index]
        draws = self.augmentation(epoch, step).rows(self._host_rows)
        if self.augment:
          images = pad_crop_flip(images, draws, self.pad)
        images = self.normalise(images)
        if self.cutout_length:
          images = cutout(images, draws.cutout_y, draws.cutout_x, self.cutout_length)
        yield images, self.labels[index]

    return generate()

  def eval_batches(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Global batch k holds examples [k*B, (k+1)*B), padded past the end; hosts their block."""
    batch = self.global_batch_size

    def generate():
      for step in range(self.eval_steps):
        position = np.arange(step * batch, (step + 1) * batch)[self._host_rows]
        mask = position < self.num_examples
        index = np.where(mask, position, 0)
        images = np.where(mask[:, None, None, None],
                          self.normalise(self.images[index]), np.float32(0))
        yield images, np.where(mask, self.labels[index], 0).astype(np.int32), mask

    return generate()


@dataclasses.dataclass(frozen=True)
class DataOptions:
  """The `config.data` fields the streams read, checked, with their defaults filled in."""

  name: str
  train_portion: float
  data_dir: str | None
  max_examples: int | None
  augment: bool
  cutout: int
  manual_dir: str | None
  image_size: int
  shuffle_buffer: int


def read_options(data_config) -> DataOptions:
  """Reads and checks `config.data`; fields missing from older configs take defaults."""
  get = data_config.get
  name = get('name', None)
  if name not in STREAM_DATASET_NAMES:
    raise ValueError(f'config.data.name = {name!r} is not a known dataset; choose one of '
                     f'{STREAM_DATASET_NAMES}.')
  train_portion = get('train_portion', 0.5)
  max_examples = get('max_examples', None)
  try:
    check_split_args(train_portion, max_examples)
  except ValueError as error:
    raise ValueError(f'config.data: {error}') from error
  augment = get('augment', None)
  if augment is None:
    augment = name != 'digits'
  if not isinstance(augment, bool):
    raise ValueError(f'config.data.augment = {augment!r} must be True or False.')
  for field, default, least in (('cutout', 0, 0), ('image_size', DEFAULT_IMAGE_SIZE, 8),
                                ('shuffle_buffer', DEFAULT_SHUFFLE_BUFFER, 1)):
    value = get(field, default)
    if not _is_int(value) or value < least:
      raise ValueError(f'config.data.{field} = {value!r} must be an integer >= {least}.')
  return DataOptions(name=name, train_portion=train_portion, data_dir=get('data_dir', None),
                     max_examples=max_examples, augment=augment, cutout=get('cutout', 0),
                     manual_dir=get('manual_dir', None),
                     image_size=get('image_size', DEFAULT_IMAGE_SIZE),
                     shuffle_buffer=get('shuffle_buffer', DEFAULT_SHUFFLE_BUFFER))
