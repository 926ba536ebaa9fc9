"""What the command-line programs share (``main``, ``summary``, ``flatness``): plain user
errors, ``--debug``, Ctrl-C, a quiet start.

- **User errors** end the program with exit status 2 and a few lines on stderr: what was
  wrong, where (the flag, the config field, the file) and the fix, never a traceback;
  ``--debug`` (or the environment variable ``NANAS_DEBUG=1``) shows the traceback instead.
  A user error is a bad flag, an unknown config field (`nanas_jax.config_check` names the
  block's fields and the closest one), a `UserError`, or a ValueError / OSError raised by
  this package's own checks, i.e. whose innermost frame is in ``nanas_jax/`` or a config
  file. The same types raised inside a library (JAX, numpy, orbax) are bugs and keep
  their traceback (exit status 1).
- **No long echo**: a line of an error message longer than a few hundred characters is
  cut in its middle (`clip_message`), so a 2 MB ``--genotype`` is never printed whole.
- **Ctrl-C ends a program at once.** Outside the epoch loop there is nothing worth saving
  (results are written atomically), so SIGINT keeps the operating system's default
  action: the process ends even inside a long XLA compile or computation, where a Python
  handler would run only once it returns. The epoch loop (`nanas_jax.loop`) takes Ctrl-C
  over while it runs: it saves a checkpoint first.
- **Quiet start**: `import_tensorflow_quietly` (what needs TensorFlow calls it first: the
  tfds and ImageNet pipelines, so a program that ends on a usage error, or searches the
  digits, never loads it) imports TensorFlow with stderr closed, since TensorFlow 2.19
  and later print C++ INFO lines at import (a oneDNN notice, twice) whatever
  ``TF_CPP_MIN_LOG_LEVEL`` says (tensorflow/tensorflow#100442), and sets
  ``TF_CPP_MIN_LOG_LEVEL=1`` unless set, for the INFO lines that variable still governs;
  `run` hides JAX's INFO line about the TPU it could not find. Warnings and errors still
  show.
- **Compile once**: `run` turns on JAX's persistent compilation cache
  (`enable_compilation_cache`), so a second run of the same search loads its compiled
  steps instead of compiling them again (a 3-epoch quick start's first step: 24 s
  compiled, 7.6 s loaded).
- **Huge pages for XLA:CPU's buffers**: `run` restarts the program once with glibc's
  malloc asked for transparent huge pages (`restart_with_huge_pages`), see
  `huge_pages_environ`.
"""

from __future__ import annotations

import importlib
import logging as std_logging
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

from absl import app
from absl import flags

DEBUG_ENV = "NANAS_DEBUG"
# JAX's own variable for its persistent compilation cache; set to "" to turn it off.
CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
# Least-recently-used entries go beyond this size (JAX locks the directory with filelock
# when a size is set, so concurrent runs never read a half-written entry).
CACHE_MAX_BYTES = 4 << 30
USAGE_EXIT_STATUS = 2
# Longer lines of an error message are cut in their middle.
MAX_LINE = 400

# "0" keeps the program from restarting with huge pages (`huge_pages_environ`).
HUGE_PAGES_ENV = "NANAS_HUGE_PAGES"
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb"
# The kernel's transparent huge page mode: "always", "madvise" or "never", the chosen one
# in brackets.
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_CONFIGS_DIR = os.path.join(os.path.dirname(_PACKAGE_DIR), "configs")
_USER_ERROR_TYPES = (ValueError, OSError)


def import_tensorflow_quietly() -> None:
  """Imports TensorFlow with file descriptor 2 on /dev/null (see the module docstring).
  A failed import is left to the module that needs TensorFlow, which then reports it with
  stderr back."""
  if "tensorflow" in sys.modules:
    return
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    importlib.import_module("tensorflow")
  except Exception:  # pylint: disable=broad-except
    pass
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


class UserError(Exception):
  """An error the user fixes (a damaged workdir, a config that no longer fits it); its
  message says what, where and how. Programs print it without a traceback."""


def clip(text: str, limit: int = 200) -> str:
  """``text`` if it has at most ``limit`` characters, else its start and its length: how
  user input is quoted in messages."""
  text = str(text)
  if len(text) <= limit:
    return text
  return f"{text[:limit]}... ({len(text):,} characters)"


def clip_message(message: str, limit: int = MAX_LINE) -> str:
  """``message`` with every line longer than ``limit`` cut in its middle: the start says
  what and the end usually says the fix."""
  lines = []
  for line in str(message).splitlines() or [""]:
    if len(line) > limit:
      head, tail = line[:limit * 2 // 3], line[-(limit // 3):]
      line = f"{head} [... {len(line) - len(head) - len(tail):,} characters ...] {tail}"
    lines.append(line)
  return "\n".join(lines)


def debug_requested(argv: Sequence[str] = ()) -> bool:
  """``--debug`` on the command line (parsed or not yet) or ``NANAS_DEBUG`` set to
  anything but 0."""
  if os.environ.get(DEBUG_ENV, "0") not in ("", "0"):
    return True
  if "debug" in flags.FLAGS and flags.FLAGS.is_parsed() and flags.FLAGS.debug:
    return True
  return any(arg in ("--debug", "-debug", "--debug=true", "--debug=1") for arg in argv)


def is_user_error(error: BaseException) -> bool:
  """Whether ``error`` is one the user fixes (see the module docstring)."""
  if isinstance(error, (UserError, app.UsageError, flags.Error)):
    return True
  if not isinstance(error, _USER_ERROR_TYPES):
    return False
  traceback = error.__traceback__
  if traceback is None:
    return False
  while traceback.tb_next is not None:
    traceback = traceback.tb_next
  origin = os.path.abspath(traceback.tb_frame.f_code.co_filename)
  return any(origin.startswith(d + os.sep) for d in (_PACKAGE_DIR, _CONFIGS_DIR))


def fail(message: str) -> NoReturn:
  """Prints ``error: message`` (clipped) and how to see the traceback; exits with 2."""
  print(f"error: {clip_message(message)}", file=sys.stderr)
  print(f"(a traceback: rerun with --debug or {DEBUG_ENV}=1)", file=sys.stderr)
  sys.exit(USAGE_EXIT_STATUS)


def _message(error: BaseException) -> str:
  # OSErrors raised with (errno, text, filename) print as "[Errno 2] text: 'file'".
  return str(error) or type(error).__name__


def parse_flags(argv: list[str],
                explain: Callable[[list[str]], str | None] | None = None) -> list[str]:
  """`app.run`'s flag parser: a flag error is a user error. Flags that fail with another
  error (ml_collections raises a bare ``AttributeError: "'field'"`` for an unknown
  ``--config.*`` field) are user errors when ``explain(argv)`` finds what was wrong."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:
    if debug_requested(argv):
      raise
    fail(f"{_message(error)}\n--helpshort lists the flags.")
  except (AttributeError, KeyError):
    explained = explain(argv) if explain else None
    if explained is None or debug_requested(argv):
      raise
    fail(explained)


def default_cache_dir() -> str:
  """``$XDG_CACHE_HOME/nanas_jax/xla`` (``~/.cache/nanas_jax/xla``)."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "nanas_jax", "xla")


def enable_compilation_cache(directory: str | None = None) -> str | None:
  """Turns on JAX's persistent compilation cache; returns its directory (None: off).

  XLA compiles the supernet's gradient for tens of seconds on a CPU (minutes for the
  larger GPU steps); the cache stores the compiled program keyed by the program, the
  backend, the library versions and the XLA flags, so any run that compiles the same
  step again (a resumed or repeated search, another seed) loads it instead. A run reads
  the same executable it would have compiled: results do not change.

  ``directory`` defaults to ``$JAX_COMPILATION_CACHE_DIR`` when that variable is set
  (empty: the cache stays off, JAX's own convention), else to `default_cache_dir`. A
  directory that cannot be created leaves the cache off: it is a speed-up, never a reason
  to fail.
  """
  import jax  # pylint: disable=g-import-not-at-top,import-outside-toplevel

  if directory is None:
    directory = os.environ.get(CACHE_ENV, default_cache_dir())
  if not directory:
    return None
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError:
    return None
  jax.config.update("jax_compilation_cache_dir", directory)
  if jax.config.jax_compilation_cache_max_size == -1:  # JAX's default: no limit
    jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)
  return directory


def huge_pages_environ(environ: Mapping[str, str],
                       thp_mode_file: str = THP_MODE_FILE) -> dict[str, str] | None:
  """``environ`` with glibc's malloc asked to back its memory with transparent huge pages
  (``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``), or None where that would change nothing.

  Why: XLA:CPU allocates an executable's buffers with malloc at every run and frees them
  after it, and glibc serves every block above 32 MB with a fresh ``mmap`` and unmaps it
  on free, so each search step touches its gigabytes of buffers as new memory: one page
  fault per 4 KiB page, each zero-filled by the kernel (measured: writing a new 134 MB
  array costs 49 ms, 5.6 ms into a reused one; with huge pages 14-17 ms, 512 times fewer
  faults). With huge pages one supernet gradient at B=16, C=8, 5 cells, 32x32 took
  0.83-0.96 s instead of 1.22-1.34 s on this project's 2-core CPU (README, "Designed for
  compile time"). Huge pages change how memory is mapped, never what is computed.

  glibc reads the tunable only when a process starts, hence a restart (`restart_with_
  huge_pages`). None: ``NANAS_HUGE_PAGES=0``, no glibc or one older than 2.35 (no such
  tunable), the tunable already set (by the user, or by the restart: it never loops), or
  a kernel whose huge pages are ``always`` (malloc's memory has them already) or
  ``never`` (nothing to ask for), the mode read from ``thp_mode_file``.
  """
  if environ.get(HUGE_PAGES_ENV) == "0":
    return None
  try:
    libc, version = os.confstr("CS_GNU_LIBC_VERSION").split()
  except (ValueError, OSError, AttributeError):  # no glibc (macOS, musl), or no confstr
    return None
  if libc != "glibc" or tuple(int(v) for v in version.split(".")[:2]) < (2, 35):
    return None
  tunables = environ.get("GLIBC_TUNABLES", "")
  if HUGE_PAGES_TUNABLE in tunables:
    return None
  try:
    with open(thp_mode_file, encoding="ascii") as f:
      if "[madvise]" not in f.read():
        return None
  except OSError:
    return None
  return dict(environ, GLIBC_TUNABLES=":".join(
      filter(None, [tunables, f"{HUGE_PAGES_TUNABLE}=1"])))


def restart_with_huge_pages() -> None:
  """Replaces this process by the same command line with `huge_pages_environ`'s
  environment (same process id, so schedulers and launchers see one program), where it
  changes anything; call it before anything slow has run, since the restart repeats it."""
  environ = huge_pages_environ(os.environ)
  if environ is not None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, environ)


def run(main: Callable[[list[str]], Any],
        explain: Callable[[list[str]], str | None] | None = None) -> None:
  """Runs ``main(argv)`` as a program: `app.run` with `parse_flags` (``explain`` as
  there), user errors as a few lines and exit status 2, Ctrl-C ending it at once."""
  restart_with_huge_pages()
  if "debug" not in flags.FLAGS:
    flags.DEFINE_bool("debug", False,
                      f"Show the traceback of a user error (or set {DEBUG_ENV}=1).")
  std_logging.getLogger("jax._src.xla_bridge").setLevel(std_logging.WARNING)
  enable_compilation_cache()
  if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, signal.SIG_DFL)

  def guarded(argv: list[str]) -> Any:
    try:
      return main(argv)
    except Exception as error:  # pylint: disable=broad-except
      if debug_requested(argv) or not is_user_error(error):
        raise
      fail(_message(error))

  app.run(guarded, flags_parser=lambda argv: parse_flags(argv, explain))
