"""Tests of nanas_jax.events against TensorFlow and TensorBoard as oracles: the writer's
summaries equal ``tf.summary.scalar``'s and TensorBoard's loader reads its files; the
record reader reads what TensorFlow's writer wrote as TensorFlow's reader does; trimming
files TensorFlow wrote (a record cut short, a damaged one, a second trim); and that
writing events never imports TensorFlow (the point of the module)."""

import glob
import logging
import os
import subprocess
import sys
import textwrap

import pytest
from tensorboard.compat.proto import event_pb2
from tensorboard.util import tensor_util
from tensorboard_events import tensorboard_values

from nanas_jax import events

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_losses(logdir):
  """One event file in ``logdir`` written by TensorFlow: ``loss`` = step / 2 at steps
  1-8; returns its path."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  writer = tf.summary.create_file_writer(str(logdir))
  with writer.as_default():
    for step in range(1, 9):
      tf.summary.scalar("loss", step / 2, step=step)
  writer.close()
  (path,) = glob.glob(str(logdir / "*tfevents*"))
  return path


def summaries(path):
  """``(step, tag, plugin metadata, dtype, shape, value)`` of each summary value in an
  event file, read by TensorFlow (the value decoded: TensorFlow stores the float as
  bytes, ``scalar_pb`` as a float field)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  return [(event.step, value.tag, value.metadata, value.tensor.dtype,
           tuple(tensor_util.make_ndarray(value.tensor).shape),
           tensor_util.make_ndarray(value.tensor).item())
          for event in map(event_pb2.Event.FromString,
                           tf.data.TFRecordDataset(path).as_numpy_iterator())
          for value in event.summary.value]


def test_the_writer_writes_what_tf_summary_writes_and_tensorboard_reads_it(tmp_path):
  writer = events.ScalarWriter(str(tmp_path / "ours"))
  for step in range(1, 4):
    writer.write_scalars(step, {"loss": step / 2, "accuracy": 1 - step / 10})
  writer.close()
  assert tensorboard_values(tmp_path / "ours", "loss") == [(s, s / 2) for s in (1, 2, 3)]
  accuracy = tensorboard_values(tmp_path / "ours", "accuracy")
  assert [s for s, _ in accuracy] == [1, 2, 3]
  assert [v for _, v in accuracy] == pytest.approx([0.9, 0.8, 0.7], rel=1e-7)
  # Value for value what tf.summary.scalar writes: tag, float32 tensor, plugin metadata.
  ours = summaries(writer.path)
  theirs = summaries(write_losses(tmp_path / "tf"))
  assert [row for row in ours if row[1] == "loss"] == theirs[:3]


def test_files_sort_in_the_order_they_were_written_and_none_is_overwritten(
    tmp_path, monkeypatch):
  # Eleven writers of one process within a second or two (as the tests' resumed runs
  # are): TensorBoard reads their files in the order they were written.
  writers = [events.ScalarWriter(str(tmp_path / "fast")) for _ in range(11)]
  for step, writer in enumerate(writers, 1):
    writer.write_scalars(step, {"loss": float(step)})
    writer.close()
  assert sorted(glob.glob(str(tmp_path / "fast" / events.FILE_PATTERN))) == [
      w.path for w in writers]
  assert tensorboard_values(tmp_path / "fast", "loss") == [
      (s, float(s)) for s in range(1, 12)]
  # Two writers that read the same clock: the second gets a file of its own.
  monkeypatch.setattr(events.time, "time_ns", lambda: 1_796_168_791_000_000_007)
  first, second = (events.ScalarWriter(str(tmp_path / "same")) for _ in range(2))
  first.write_scalars(1, {"loss": 1.0})
  second.write_scalars(2, {"loss": 2.0})
  first.close()
  second.close()
  assert second.path == first.path + ".1"
  assert sorted(tensorboard_values(tmp_path / "same", "loss")) == [(1, 1.0), (2, 2.0)]


def test_the_reader_reads_what_tensorflow_reads(tmp_path):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  path = write_losses(tmp_path)
  records = events.read_records(path)
  assert [r[12:-4] for r in records] == list(tf.data.TFRecordDataset(path).as_numpy_iterator())
  with open(path, "rb") as f:
    assert b"".join(records) == f.read()


def test_events_past_the_resume_step_are_moved_and_a_second_trim_keeps_both_parts(tmp_path):
  path = write_losses(tmp_path)
  # A record cut short by a kill: unreadable, dropped.
  with open(path, "ab") as f:
    f.write(b"\x20\x00\x00\x00\x00\x00\x00\x00cut")
  assert events.supersede_after(str(tmp_path), 6) == 2
  assert events.supersede_after(str(tmp_path), 6) == 0
  assert events.supersede_after(str(tmp_path), 3) == 3
  assert tensorboard_values(tmp_path, "loss") == [(s, s / 2) for s in (1, 2, 3)]
  superseded = tmp_path / events.SUPERSEDED_DIR
  name = os.path.basename(path)
  assert sorted(os.listdir(superseded)) == [name, name + ".1"]
  assert tensorboard_values(superseded, "loss") == [(s, s / 2) for s in (7, 8, 4, 5, 6)]
  assert not glob.glob(str(tmp_path / ".*"))  # no temporary file left


@pytest.mark.parametrize("where", ["length", "data"])
def test_an_event_file_damaged_inside_is_left_as_it_is(tmp_path, caplog, where):
  path = write_losses(tmp_path)
  records = events.read_records(path)
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    # One flipped byte in the third record: its length's checksum or its data's fails.
    start = len(records[0]) + len(records[1])
    data[start + (2 if where == "length" else 14)] ^= 0xFF
    f.seek(0)
    f.write(data)
  with caplog.at_level(logging.WARNING):
    assert events.supersede_after(str(tmp_path), 3) == 0
  with open(path, "rb") as f:
    assert f.read() == data
  assert not (tmp_path / events.SUPERSEDED_DIR).exists()
  assert "left as it is" in caplog.text and f"record at byte {start}" in caplog.text


def test_writing_and_trimming_events_never_import_tensorflow(tmp_path):
  program = textwrap.dedent(f"""
      import sys
      from nanas_jax import events
      writer = events.ScalarWriter({str(tmp_path)!r})
      writer.write_scalars(1, {{"loss": 0.5}})
      writer.write_scalars(2, {{"loss": 0.25}})
      writer.close()
      assert events.supersede_after({str(tmp_path)!r}, 1) == 1
      print(sorted(m for m in sys.modules if m.split(".")[0] == "tensorflow"))
      """)
  out = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, check=True)
  assert out.stdout.strip() == "[]"
