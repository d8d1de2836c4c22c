"""The documented public API exists: removing a public name is a failure.

Two sources say what is public, and both are checked against the package:

* every ``__all__`` of every module of ``compressax`` (the package, its
  public modules and the private modules they re-export from);
* every ``cx.…`` name in a table of docs/*.md (the API tables and the
  overview tables) and of the README's "API at a glance".
"""

from __future__ import annotations

import importlib
import pathlib
import pkgutil
import re

import pytest

import compressax as cx

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Public modules every user relies on; a missing one must fail, not skip.
MODULES = ["quantize", "prune", "lowrank", "distill", "diffq", "optim", "io",
           "weightless", "run"]
NAME = re.compile(r"`(cx\.[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)")


def _modules():
  names = ["compressax"]
  for info in pkgutil.walk_packages(cx.__path__, "compressax."):
    names.append(info.name)
  return sorted(names)


def _resolve(dotted: str):
  """``cx.a.b`` -> the object, or raise AttributeError naming the missing part."""
  obj, seen = cx, "cx"
  for part in dotted.split(".")[1:]:
    if not hasattr(obj, part):
      raise AttributeError(f"{seen} has no attribute {part!r}")
    obj, seen = getattr(obj, part), f"{seen}.{part}"
  return obj


def _table_names(path: pathlib.Path) -> list[str]:
  names = []
  for line in path.read_text().splitlines():
    if line.lstrip().startswith("|"):
      names += NAME.findall(line)
  return names


def _pages():
  return sorted(p.name for p in (ROOT / "docs").glob("*.md"))


@pytest.mark.parametrize("module", MODULES)
def test_public_modules_exist(module):
  assert hasattr(cx, module), f"compressax has no module {module!r}"
  assert getattr(cx, module).__all__, f"cx.{module}.__all__ is empty"


@pytest.mark.parametrize("name", _modules())
def test_every_name_in_all_exists(name):
  mod = importlib.import_module(name)
  public = getattr(mod, "__all__", [])
  assert len(set(public)) == len(public), f"{name}.__all__ repeats a name"
  missing = [n for n in public if not hasattr(mod, n)]
  assert not missing, f"{name}.__all__ lists missing names: {missing}"


def _unresolved(names) -> list[str]:
  """The names (with the reason) that do not resolve to a public object."""
  bad = []
  for n in sorted(set(names)):
    try:
      _resolve(n)
    except AttributeError as e:
      bad.append(f"{n} ({e})")
  return bad


@pytest.mark.parametrize("page", _pages())
def test_every_name_in_a_docs_table_exists(page):
  bad = _unresolved(_table_names(ROOT / "docs" / page))
  assert not bad, f"docs/{page} tables list names that do not exist: {bad}"


def test_api_tables_are_checked():
  """The tables above are really read: each module page lists its own names."""
  for module in MODULES:
    names = _table_names(ROOT / "docs" / f"{module}.md")
    assert any(n.startswith(f"cx.{module}.") for n in names), module


def test_every_name_in_the_readme_table_exists():
  names = _table_names(ROOT / "README.md")
  assert len(names) > 30, "the README's API table was not found"
  bad = _unresolved(names)
  assert not bad, f"README.md lists names that do not exist: {bad}"


def test_top_level_all_exists():
  missing = [n for n in cx.__all__ if not hasattr(cx, n)]
  assert not missing, f"compressax.__all__ lists missing names: {missing}"
