"""Tests of the package's exports and of the README's Python section, which uses them."""

import os
import re
import subprocess
import sys

import pytest

import nanas_jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_export_resolves_to_its_module_attribute():
  # pylint: disable-next=g-import-not-at-top
  from nanas_jax import neighborhood, spaces, summary, tasks
  for name in nanas_jax.__all__:
    assert getattr(nanas_jax, name) is not None, name
  assert nanas_jax.Genotype is spaces.Genotype
  assert nanas_jax.summarize is summary.summarize
  assert nanas_jax.run is tasks.run
  assert nanas_jax.enumerate_neighbors is neighborhood.enumerate_neighbors
  assert set(nanas_jax.__all__) <= set(dir(nanas_jax))
  with pytest.raises(AttributeError, match="has no attribute 'nope'"):
    nanas_jax.nope  # pylint: disable=pointless-statement


def test_importing_the_package_loads_no_framework():
  out = subprocess.run(
      [sys.executable, "-c", "import sys, nanas_jax; "
       "print(sorted(m for m in ('jax', 'flax', 'tensorflow') if m in sys.modules))"],
      cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
  assert out.stdout.strip() == "[]"


def test_the_readme_python_section_runs(tmp_path, capsys):
  with open(os.path.join(REPO, "README.md")) as f:
    readme = f.read()
  section = readme[readme.index("### From Python"):]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  assert "/tmp/nanas_python" in code
  code = code.replace("/tmp/nanas_python", str(tmp_path / "run"))
  exec(compile(code, "README.md", "exec"), {})  # pylint: disable=exec-used
  printed = capsys.readouterr().out.splitlines()
  assert printed[0] == "3349342"
  assert printed[1].startswith("96 Genotype(normal=[")
  assert printed[2].startswith("Search finished: validation accuracy")
  genotype = (tmp_path / "run" / "genotype.txt").read_text().strip()
  assert printed[3] == genotype == str(nanas_jax.Genotype.parse(genotype))
