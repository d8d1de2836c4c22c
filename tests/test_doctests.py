"""Every docstring example in the ``compressax`` package runs (``doctest``).

Each example sees its module's globals plus ``cx``, ``jax``, ``jnp``, ``np``
and ``optax``, and nothing else: an example that uses a name it never
defines fails here. Outputs are compared with ``ELLIPSIS`` and
``NORMALIZE_WHITESPACE``. Rank promotion stays "raise" (conftest); dtype
promotion is the default users run with, as in tests/test_docs.py.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import compressax as cx

GLOBALS = {"cx": cx, "jax": jax, "jnp": jnp, "np": np, "optax": optax}
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _tests():
  finder = doctest.DocTestFinder(exclude_empty=True)
  names = ["compressax"] + [i.name for i in
                            pkgutil.walk_packages(cx.__path__, "compressax.")]
  out = {}
  for name in sorted(names):
    mod = importlib.import_module(name)
    for t in finder.find(mod, name):
      if t.examples and t.name not in out:
        out[t.name] = t
  return out


TESTS = _tests()


def test_examples_are_found():
  assert len(TESTS) >= 16, sorted(TESTS)


@pytest.mark.parametrize("name", sorted(TESTS))
def test_docstring_example_runs(name, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # examples that write files write them here
  test = TESTS[name]
  test.globs = {**test.globs, **GLOBALS}
  runner = doctest.DocTestRunner(optionflags=FLAGS)
  lines = []
  with jax.numpy_dtype_promotion("standard"):
    result = runner.run(test, out=lines.append, clear_globs=False)
  assert result.failed == 0, "".join(lines)
