"""Files written by earlier releases keep loading to the same arrays.

``tests/fixtures/io_v2.cx`` was written by the last release of format
version 2 (bare class names, sparse storage guessed from a ``mask`` field),
``io_v3.cx`` by the release that namespaced class names and made storage a
declaration of the node class. Neither is ever regenerated: each must load,
in every later release, to exactly the arrays recorded next to it (see
``tests/fixtures/make_io_fixtures.py``).
"""

import json
import os

import jax
import numpy as np
import pytest

import compressax as cx

_HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
_NAMES = [n[:-3] for n in sorted(os.listdir(_HERE)) if n.endswith(".cx")]


def _same(got, want, where):
  got, want = np.asarray(got), np.asarray(want)
  assert got.dtype == want.dtype, where
  assert got.shape == want.shape, where
  # Bit for bit: -0.0 and NaN payloads included.
  assert got.tobytes() == want.tobytes(), where


@pytest.mark.parametrize("name", _NAMES)
def test_fixture_loads_exactly(name):
  path = os.path.join(_HERE, name + ".cx")
  with open(path, "rb") as f:  # io_v<N>: written as format version N
    assert int.from_bytes(f.read(10)[8:10], "little") == int(name.split("_v")[1])
  with np.load(os.path.join(_HERE, name + ".npz")) as f:
    want = dict(f)
  with open(os.path.join(_HERE, name + ".json")) as f:
    nodes = json.load(f)
  kept = cx.load(path, keep_compressed=True)
  dense = cx.load(path)
  got = {jax.tree_util.keystr(p): v for p, v in
         jax.tree_util.tree_flatten_with_path(kept)[0]}
  got.update({jax.tree_util.keystr(p) + "#dense": v for p, v in
              jax.tree_util.tree_flatten_with_path(dense)[0]})
  assert sorted(got) == sorted(want)
  for k in want:
    _same(got[k], want[k], k)
  seen = {}

  def visit(path, x):
    if cx.is_compressed(x):
      meta = {k: (np.dtype(v).name if isinstance(v, (np.dtype, type)) else v)
              for k, v in x.meta().items()}
      seen[jax.tree_util.keystr(path)] = [type(x).__name__,
                                          json.loads(json.dumps(meta))]
      for k, v in x.data().items():
        visit(path + (jax.tree_util.GetAttrKey(k),), v)
  for p, v in jax.tree_util.tree_flatten_with_path(
      kept, is_leaf=cx.is_compressed)[0]:
    visit(p, v)
  assert seen == nodes
  # Every node type of the library is covered.
  assert {c for c, _ in nodes.values()} >= {
      "QuantizedArray", "CodebookArray", "PointsArray", "MaskedArray",
      "LowRankArray", "DiffQArray"}
