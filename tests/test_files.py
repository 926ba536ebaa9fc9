"""Tests of the atomic result writes."""

import os

import pytest

from nanas_jax import files


def test_replace_writes_the_whole_new_text(tmp_path):
  path = tmp_path / "f.txt"
  files.write_atomic(str(path), "one")
  files.write_atomic(str(path), "two")
  assert path.read_text() == "two"
  assert os.listdir(tmp_path) == ["f.txt"]


def test_bytes_are_written_as_given(tmp_path):
  path = tmp_path / "f.bin"
  files.write_atomic(str(path), bytes(range(256)))
  assert path.read_bytes() == bytes(range(256))


def test_without_replace_an_existing_file_is_kept(tmp_path):
  path = tmp_path / "results.json"
  files.write_atomic(str(path), "first", replace=False)
  with pytest.raises(FileExistsError):
    files.write_atomic(str(path), "second", replace=False)
  assert path.read_text() == "first"
  # No temporary file is left behind, after success or refusal.
  assert os.listdir(tmp_path) == ["results.json"]
