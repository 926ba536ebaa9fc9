"""TensorBoard event files without TensorFlow: the scalar writer of every run, and the
trimming of events past the step a resumed run starts from.

TensorFlow's import takes 11 s on this project's 2-core CPU (clu's writers and
`tf.summary` need it; a digits search needs nothing else from it), so a run writes its
event files with TensorBoard's own pieces instead: `scalar_pb` builds the summary that
``tf.summary.scalar`` writes (a float32 tensor with the scalars plugin's metadata), and
TensorBoard's `RecordWriter` frames each event as a TFRecord (length, masked CRC-32C of
the length, the event, masked CRC-32C of the event). TensorBoard reads the files as it
reads TensorFlow's, and the tests read them with TensorBoard's loader and trim files that
TensorFlow wrote.

- `ScalarWriter`: one new event file per run session, one event per `write_scalars`
  call, written synchronously (a few hundred bytes: microseconds) and put on disk by
  `flush` (the loop flushes before each checkpoint, so a killed run's events reach its
  last checkpoint).
- `supersede_after`: moves the events of steps after a resume step into files of the
  same names in ``superseded/`` (a run of that name in TensorBoard), so each step is
  drawn once and nothing readable is lost.
"""

from __future__ import annotations

import glob
import itertools
import os
import socket
import struct
import time
from collections.abc import Mapping

from absl import logging
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
# TensorBoard's pure-Python checksum (what its RecordWriter uses; no TensorFlow import).
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
from tensorboard.plugins.scalar.summary_v2 import scalar_pb
from tensorboard.summary.writer.record_writer import RecordWriter

from nanas_jax.files import write_atomic

SUPERSEDED_DIR = "superseded"
# TensorBoard reads every file whose name contains "tfevents".
FILE_PATTERN = "*tfevents*"
# A TFRecord: uint64 length, uint32 masked CRC of the length, the data, uint32 masked CRC
# of the data (little-endian).
_HEADER, _FOOTER = 12, 4


class ScalarWriter:
  """Scalars of a run into a new event file in ``logdir``."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    # TensorBoard reads a directory's event files in the order of their names, so the
    # name starts with the time to the nanosecond (seconds, then nanoseconds, both
    # zero-padded): a resumed session's file sorts after the one it continues, also
    # within the same second (TensorFlow's names would order two processes of one second
    # by their process ids).
    now = time.time_ns()
    name = (f"events.out.tfevents.{now // 10**9:010d}.{now % 10**9:09d}."
            f"{socket.gethostname()}.{os.getpid()}")
    for copy in itertools.count():
      self.path = os.path.join(logdir, name + (f".{copy}" if copy else ""))
      try:
        # Exclusive: never truncates a file that is already there.
        self._file = open(self.path, "xb")
        break
      except FileExistsError:
        continue
    self._records = RecordWriter(self._file)
    self._write(event_pb2.Event(file_version="brain.Event:2"))

  def write_scalars(self, step: int, values: Mapping[str, float]) -> None:
    """One event at ``step`` holding every ``tag: value`` of ``values``."""
    summary = summary_pb2.Summary()
    for tag, value in values.items():
      summary.value.extend(scalar_pb(tag, value).value)
    self._write(event_pb2.Event(step=int(step), summary=summary))

  def _write(self, event: event_pb2.Event) -> None:
    event.wall_time = time.time()
    self._records.write(event.SerializeToString())

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    self._file.close()


class DamagedRecord(ValueError):
  """A record inside an event file whose checksum fails."""


def read_records(path: str) -> list[bytes]:
  """The records of the TFRecord file ``path``, each with its framing, checksums checked.
  A record cut short at the end of the file (by a kill during a write) is unreadable, to
  TensorBoard too, and is dropped; a checksum that fails raises `DamagedRecord`."""
  with open(path, "rb") as f:
    data = f.read()
  records, start = [], 0
  while len(data) - start >= _HEADER:
    length_bytes = data[start:start + 8]
    (length_crc,) = struct.unpack("<I", data[start + 8:start + _HEADER])
    if masked_crc32c(length_bytes) != length_crc:
      raise DamagedRecord(f"the length of the record at byte {start} fails its checksum")
    end = start + _HEADER + struct.unpack("<Q", length_bytes)[0] + _FOOTER
    if end > len(data):
      break
    (data_crc,) = struct.unpack("<I", data[end - _FOOTER:end])
    if masked_crc32c(data[start + _HEADER:end - _FOOTER]) != data_crc:
      raise DamagedRecord(f"the record at byte {start} fails its checksum")
    records.append(data[start:end])
    start = end
  return records


def _step(record: bytes) -> int:
  return event_pb2.Event.FromString(record[_HEADER:-_FOOTER]).step


def supersede_after(logdir: str, step: int) -> int:
  """Moves the events of steps after ``step`` out of the event files directly in
  ``logdir`` into files of the same names in ``logdir/superseded/``, as
  `nanas_jax.loop.supersede_rows_after` does for ``metrics.jsonl``: a run restarting at
  ``step`` then draws each step once. A record cut short at a file's end is dropped; a
  file with a damaged record inside is left as it is. Returns how many events moved."""
  total = 0
  for path in sorted(glob.glob(os.path.join(logdir, FILE_PATTERN))):
    if not os.path.isfile(path):
      continue
    try:
      records = read_records(path)
    except DamagedRecord as error:
      logging.warning("%s: %s; the file is left as it is (its steps after %d may show "
                      "twice in TensorBoard).", path, error, step)
      continue
    kept, moved = [], []
    for record in records:
      (moved if _step(record) > step else kept).append(record)
    if not moved:
      continue
    directory = os.path.join(logdir, SUPERSEDED_DIR)
    os.makedirs(directory, exist_ok=True)
    name = os.path.basename(path)
    target, copies = os.path.join(directory, name), 0
    while os.path.exists(target):  # trimmed before, by a resume from a later step
      copies += 1
      target = os.path.join(directory, f"{name}.{copies}")
    # The superseded copy first, then the trimmed file in one rename: an interruption in
    # between leaves both copies, never neither. The records keep their framing, so
    # nothing is encoded again; `write_atomic`'s temporary names hold no "tfevents", so
    # TensorBoard skips them while they are written.
    write_atomic(target, b"".join(moved), replace=False)
    write_atomic(path, b"".join(kept))
    total += len(moved)
  return total
