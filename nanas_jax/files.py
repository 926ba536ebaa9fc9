"""Atomic writes of result files: a reader never sees half a file.

The data goes to a temporary file in the target's directory (one file system, so the last
step is atomic), which then either replaces the target (a rename) or, with
``replace=False``, claims a name that must not exist yet (a hard link, which fails on an
existing name instead of overwriting it: how results that are never overwritten are
written). The temporary file never outlives the call.
"""

from __future__ import annotations

import os
import tempfile


def write_atomic(path: str, data: str | bytes, *, replace: bool = True) -> None:
  """Writes ``data`` (text or bytes) to ``path`` atomically.

  Raises:
    FileExistsError: ``replace`` is False and ``path`` exists; nothing is written.
  """
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
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
