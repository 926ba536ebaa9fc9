"""Atomic writes of result files: a reader never sees half a file.

The data goes to a temporary file in the target's directory (one file system, so the last
step is atomic), which then either replaces the target (a rename) or, with
``replace=False``, claims a name that must not exist yet (a hard link, which fails on an
existing name instead of overwriting it: how results that are never overwritten are
written). The temporary file never outlives the call.

Results are meant to be shared (collaborators on a cluster read each other's workdirs), so
a file gets the mode any file the process creates gets, ``0666`` less the umask (``0644``
under the usual ``022``). `tempfile.mkstemp` would give ``0600`` whatever the umask: the
temporary file is created here with ``os.open(O_CREAT | O_EXCL)`` and a random name
instead, which is what mkstemp does, less its fixed mode.
"""

from __future__ import annotations

import os
import secrets


def _create_temporary(directory: str) -> tuple[int, str]:
  """An open descriptor and the path of a new, empty file in ``directory``."""
  while True:
    path = os.path.join(directory, f".tmp-{secrets.token_hex(8)}")
    try:
      return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), path
    except FileExistsError:
      continue


def write_atomic(path: str, data: str | bytes, *, replace: bool = True) -> None:
  """Writes ``data`` (text or bytes) to ``path`` atomically, readable by others as the
  umask allows.

  Raises:
    FileExistsError: ``replace`` is False and ``path`` exists; nothing is written.
  """
  fd, tmp = _create_temporary(os.path.dirname(path) or ".")
  try:
    with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
      f.write(data)
    if replace:
      os.replace(tmp, path)
    else:
      os.link(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
