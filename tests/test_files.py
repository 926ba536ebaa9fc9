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


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_get_the_mode_the_umask_gives(tmp_path, umask, mode):
  previous = os.umask(umask)
  try:
    files.write_atomic(str(tmp_path / "a.json"), "{}")
    files.write_atomic(str(tmp_path / "b.bin"), b"\0", replace=False)
  finally:
    os.umask(previous)
  assert os.stat(tmp_path / "a.json").st_mode & 0o777 == mode
  assert os.stat(tmp_path / "b.bin").st_mode & 0o777 == mode
