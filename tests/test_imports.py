"""The package's import graph, read from the source with ``ast``: no cycles, imports inside
functions included, and the run modules dispatched from above rather than by each other.

An edge ``a -> b`` is an ``import`` or ``from ... import`` in module ``a`` naming module
``b`` of the package (``from nanas_jax.data import loaders`` names the submodule
``nanas_jax.data.loaders``; ``from nanas_jax.data import SearchData`` names the package).
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "nanas_jax")


def package_modules() -> dict[str, str]:
  """``{module name: path}`` of every module of the package."""
  modules = {}
  for folder, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
        if parts[-1] == "__init__":
          parts = parts[:-1]
        modules[".".join(parts)] = path
  return modules


def import_graph() -> dict[str, set[str]]:
  modules = package_modules()
  graph = {name: set() for name in modules}
  for name, path in modules.items():
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
        targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules
                   else node.module for alias in node.names]
      else:
        continue
      graph[name].update(t for t in targets if t in modules and t != name)
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle of ``graph`` as a list of modules, or None."""
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    stack.pop()
    state[node] = "done"
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_the_cycle_finder_finds_cycles():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_the_graph_sees_imports_inside_functions_and_submodules():
  graph = import_graph()
  assert "nanas_jax.data.digits" in graph["nanas_jax.data"]  # imported inside a function
  assert "nanas_jax.data.loaders" in graph["nanas_jax.experiment"]  # from package import mod
  assert len(graph) > 40


def test_no_import_cycles():
  cycle = find_cycle(import_graph())
  assert cycle is None, " -> ".join(cycle)


RUN_MODULES = ["nanas_jax.experiment", "nanas_jax.train.run", "nanas_jax.pipeline",
               "nanas_jax.study"]


@pytest.mark.parametrize("module", RUN_MODULES)
def test_run_modules_are_dispatched_from_tasks_only(module):
  """A run module imports no run module for dispatch; the pipeline and the study run a
  search and trainings as their stages."""
  graph = import_graph()
  stages = {"nanas_jax.pipeline": {"nanas_jax.experiment", "nanas_jax.train.run"},
            "nanas_jax.study": {"nanas_jax.experiment", "nanas_jax.train.run"}}
  assert graph[module] & set(RUN_MODULES) <= stages.get(module, set())
  assert module in graph["nanas_jax.tasks"]
  assert graph["nanas_jax.main"] & set(RUN_MODULES) == set()


def test_package_exports_hide_no_submodule():
  """``from package import name`` gives the module when ``name`` is a submodule."""
  import importlib  # pylint: disable=g-import-not-at-top
  modules = package_modules()
  for package in [m for m, path in modules.items() if path.endswith("__init__.py")]:
    exported = set(getattr(importlib.import_module(package), "__all__", ()))
    hidden = {name for name in exported if f"{package}.{name}" in modules}
    assert not hidden, f"{package} exports {hidden}, which are its submodules' names"
