"""Tests of the command-line plumbing: clipped messages, which errors are the user's, and a
program's exit status and output for a user error, a bug, --debug and a bad flag; the
persistent compilation cache a program turns on; TensorFlow imported quietly."""

import os
import subprocess
import sys
import textwrap

import pytest
from absl import app

from nanas_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_clip_keeps_short_text_and_says_how_long_the_rest_was():
  assert cli.clip("DARTS_V2") == "DARTS_V2"
  assert cli.clip("x" * 2_000_000, 10) == "xxxxxxxxxx... (2,000,000 characters)"


def test_clip_message_cuts_long_lines_in_the_middle_keeping_the_fix():
  message = "bad genotype " + "y" * 100_000 + " : pass a name instead.\nsecond line"
  first, second = cli.clip_message(message, limit=90).splitlines()
  assert first.startswith("bad genotype yyy") and first.endswith("pass a name instead.")
  assert "[... 99,9" in first and len(first) < 150
  assert second == "second line"


def raise_here(error):
  raise error


def test_user_errors_are_this_packages_checks_not_library_failures():
  for error in (ValueError("config.x = 1 is invalid"), FileNotFoundError("no data"),
                NotADirectoryError("a file")):
    with pytest.raises(type(error)) as caught:
      raise_here(error)  # raised in tests/, outside nanas_jax/
    assert not cli.is_user_error(caught.value)
  from nanas_jax import loop  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError) as caught:
    loop.check_workdir("gs://bucket/run")
  assert cli.is_user_error(caught.value)
  with pytest.raises(ValueError) as caught:
    int("abc")  # a builtin raising inside this test file: not the package's check
  assert not cli.is_user_error(caught.value)
  assert cli.is_user_error(cli.UserError("damaged"))
  assert cli.is_user_error(app.UsageError("usage"))
  assert not cli.is_user_error(RuntimeError("a bug"))


# A program on cli.run, light enough to start fast (nanas_jax.main itself: test_main.py).
PROGRAM = textwrap.dedent("""
    from absl import flags
    from nanas_jax import cli
    flags.DEFINE_string("what", "user", "")

    def main(argv):
      if flags.FLAGS.what == "user":
        raise cli.UserError("the workdir /runs/" + "x" * 5000 + " is damaged; choose a "
                            "new --workdir.")
      if flags.FLAGS.what == "bug":
        raise RuntimeError("an internal bug")
      print("fine")

    cli.run(main)
    """)


def program(*args, env=None):
  return subprocess.run([sys.executable, "-c", PROGRAM, *args], cwd=REPO,
                        capture_output=True, text=True, timeout=120,
                        env={**os.environ, **(env or {})})


def test_a_user_error_is_two_short_lines_and_status_2():
  out = program()
  assert out.returncode == 2
  lines = out.stderr.splitlines()
  assert len(lines) == 2, out.stderr
  assert lines[0].startswith("error: the workdir /runs/xxx")
  assert lines[0].endswith("is damaged; choose a new --workdir.")
  assert len(lines[0]) < cli.MAX_LINE + 50  # the 5000 characters are cut in the middle
  assert lines[1] == "(a traceback: rerun with --debug or NANAS_DEBUG=1)"


@pytest.mark.parametrize("args,env", [(["--debug"], None), ([], {"NANAS_DEBUG": "1"})])
def test_debug_shows_the_traceback(args, env):
  out = program(*args, env=env)
  assert out.returncode == 1
  assert "Traceback" in out.stderr and "UserError: the workdir" in out.stderr


def test_a_bug_keeps_its_traceback_and_a_bad_flag_is_a_user_error():
  out = program("--what=bug")
  assert out.returncode == 1 and "RuntimeError: an internal bug" in out.stderr
  out = program("--whta=bug")
  assert out.returncode == 2
  assert out.stderr.startswith("error: Unknown command line flag 'whta'")
  assert "--helpshort" in out.stderr and len(out.stderr.splitlines()) <= 4
  assert program("--what=ok").stdout == "fine\n"


def test_fail_prints_and_exits_with_2(capsys):
  with pytest.raises(SystemExit) as exit_:
    cli.fail("config.x = 1 is invalid: use 2.")
  assert exit_.value.code == 2
  assert capsys.readouterr().err.startswith("error: config.x = 1 is invalid: use 2.\n")



_CACHE_PROBE = """
import jax, jax.numpy as jnp
from nanas_jax import cli
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
directory = cli.enable_compilation_cache()
x = jnp.arange(64.0).reshape(8, 8)
y = jax.jit(lambda a: jnp.tanh(a @ a.T).sum(0))(x)
print(directory)
print(events.count('/jax/compilation_cache/cache_hits'))
print(repr(y.tolist()))
"""


def _probe(tmp_path, **env):
  environ = {k: v for k, v in os.environ.items() if k != cli.CACHE_ENV}
  # Every compile is cached (JAX's default keeps only those of a second or more).
  environ.update(XDG_CACHE_HOME=str(tmp_path), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                 **env)
  out = subprocess.run([sys.executable, "-c", _CACHE_PROBE], env=environ, cwd=REPO,
                       capture_output=True, text=True, timeout=300, check=True)
  directory, hits, values = out.stdout.strip().splitlines()[-3:]
  return directory, int(hits), values


def test_a_second_program_loads_its_compiled_step_from_the_cache(tmp_path):
  directory, hits, first = _probe(tmp_path)
  assert directory == str(tmp_path / "nanas_jax" / "xla")  # $XDG_CACHE_HOME/nanas_jax/xla
  assert hits == 0 and any(name.endswith("-cache") for name in os.listdir(directory))
  _, hits, second = _probe(tmp_path)
  assert hits >= 1
  assert second == first  # the cached executable computes the same numbers


def test_the_compilation_cache_follows_jax_s_variable(tmp_path):
  chosen = tmp_path / "chosen"
  directory, _, _ = _probe(tmp_path, **{cli.CACHE_ENV: str(chosen)})
  assert directory == str(chosen) and os.listdir(chosen)
  # JAX's convention: an empty directory name turns the cache off.
  directory, hits, _ = _probe(tmp_path, **{cli.CACHE_ENV: ""})
  assert directory == "None" and hits == 0
  assert not (tmp_path / "nanas_jax").exists()


def _thp_mode_file(tmp_path, mode):
  path = tmp_path / "enabled"
  path.write_text(" ".join(f"[{m}]" if m == mode else m
                           for m in ("always", "madvise", "never")) + "\n")
  return str(path)


def test_huge_pages_are_asked_for_only_where_they_change_something(tmp_path, monkeypatch):
  monkeypatch.setattr(os, "confstr", lambda name: "glibc 2.36")
  madvise = _thp_mode_file(tmp_path, "madvise")
  env = cli.huge_pages_environ({"PATH": "/bin"}, madvise)
  assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  # The user's own tunables stay, before ours.
  env = cli.huge_pages_environ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, madvise)
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  for environ in ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"},  # the user's choice
                  {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},  # restarted already
                  {cli.HUGE_PAGES_ENV: "0"}):
    assert cli.huge_pages_environ(environ, madvise) is None
  for mode in ("always", "never"):
    assert cli.huge_pages_environ({}, _thp_mode_file(tmp_path, mode)) is None
  assert cli.huge_pages_environ({}, str(tmp_path / "missing")) is None
  for libc in ("glibc 2.34", "musl 1.2"):  # no such tunable before glibc 2.35
    monkeypatch.setattr(os, "confstr", lambda name, libc=libc: libc)
    assert cli.huge_pages_environ({}, madvise) is None


# Prints the tunables it runs with, restarts, then reports how much of a 64 MiB block from
# glibc's malloc (as XLA:CPU's buffers are; numpy asks for huge pages itself) the kernel
# backs with huge pages once written (AnonHugePages, /proc/self/smaps_rollup).
_RESTART_PROBE = textwrap.dedent("""
    import ctypes, os, sys
    from nanas_jax import cli
    cli.THP_MODE_FILE = sys.argv[1]
    print("tunables", os.environ.get("GLIBC_TUNABLES"), os.getpid(), flush=True)
    cli.restart_with_huge_pages()

    def huge_kb():
      with open("/proc/self/smaps_rollup") as f:
        return sum(int(l.split()[1]) for l in f if l.startswith("AnonHugePages:"))

    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    before = huge_kb()
    block = libc.malloc(64 << 20)
    ctypes.memset(block, 1, 64 << 20)
    print("huge_mb", (huge_kb() - before) // 1024)
    """)


def test_a_program_restarts_once_with_huge_pages_and_gets_them(tmp_path):
  if cli.huge_pages_environ({}) is None:
    pytest.skip("this machine's glibc or kernel offers no transparent huge pages to ask "
                "for (see cli.huge_pages_environ)")
  env = {k: v for k, v in os.environ.items()
         if k not in ("GLIBC_TUNABLES", cli.HUGE_PAGES_ENV)}
  out = subprocess.run([sys.executable, "-c", _RESTART_PROBE, cli.THP_MODE_FILE], env=env,
                       cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
  lines = out.stdout.splitlines()
  first, second = (line.split() for line in lines if line.startswith("tunables"))
  # Once without, once with the tunable, in the same process; then no third start.
  assert first[1] == "None" and second[1] == "glibc.malloc.hugetlb=1"
  assert first[2] == second[2]
  # The kernel backs (nearly) all of the 64 MiB block with 2 MiB pages.
  assert int(lines[-1].split()[1]) >= 60
  # And without the restart, none of it.
  env[cli.HUGE_PAGES_ENV] = "0"
  out = subprocess.run([sys.executable, "-c", _RESTART_PROBE, cli.THP_MODE_FILE], env=env,
                       cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
  assert out.stdout.splitlines()[-1] == "huge_mb 0"


def test_tensorflow_is_imported_without_its_info_lines():
  """TensorFlow prints C++ INFO lines (a oneDNN notice, CPU features) imported plainly; imported
  through `import_tensorflow_quietly`, it is loaded and stderr stays empty. Both imports
  run side by side, each in a fresh process (an import happens once per process)."""
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  quiet = ("import sys; from nanas_jax import cli; cli.import_tensorflow_quietly(); "
           "print('tensorflow' in sys.modules)")
  procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
           for code in ("import tensorflow", quiet)]
  (_, plain_err), (quiet_out, quiet_err) = (p.communicate(timeout=300) for p in procs)
  assert plain_err.strip(), ("TensorFlow no longer prints anything at import: the quiet "
                             "import may no longer be needed.")
  assert quiet_out.strip() == "True"
  assert quiet_err == ""
