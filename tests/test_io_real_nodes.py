"""Files through the library's own compressed nodes (skipped where missing)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import compressax as cx
from compressax import io


def _need(module, *names):
  mod = getattr(cx, module)
  missing = [n for n in names if not hasattr(mod, n)]
  if missing:
    pytest.skip(f"cx.{module} lacks {missing}")
  return mod


def _round_trip(tmp_path, tree):
  path = tmp_path / "real.cx"
  io.save(path, tree)
  dense = cx.materialize(tree)
  loaded = io.load(path)
  for a, b in zip(jax.tree.leaves(dense), jax.tree.leaves(loaded)):
    a = np.asarray(a)
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == b.tobytes()
  nodes = io.load(path, keep_compressed=True)
  assert jax.tree.structure(nodes) == jax.tree.structure(tree)
  report = io.size_report(path)
  assert report.file_bytes == path.stat().st_size
  return nodes, report


def _weights(shape=(32, 48), seed=0, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def test_quantized_and_codebook(tmp_path):
  q = _need("quantize", "quantize", "weight_share")
  tree = {"q": q.quantize(_weights(), 4, axis=0),
          "qb": q.quantize(_weights(seed=1, dtype=jnp.bfloat16), 3, symmetric=True),
          "cb": q.weight_share(_weights(seed=2), 16)}
  nodes, report = _round_trip(tmp_path, tree)
  np.testing.assert_array_equal(nodes["cb"].codes, np.asarray(tree["cb"].codes))
  assert by_kind(report)["QuantizedArray"].weight_bits < 5


def by_kind(report):
  return {l.kind: l for l in report.leaves}


def test_masked_codebook_is_sparse(tmp_path):
  q = _need("quantize", "weight_share")
  p = _need("prune", "MaskedArray")
  w = _weights((64, 64), seed=3)
  mask = np.asarray(jnp.abs(w) > 1.6)  # ~11% kept
  node = p.MaskedArray(q.weight_share(w, 32), jnp.asarray(mask), (64, 64),
                       np.dtype(np.float32))
  nodes, report = _round_trip(tmp_path, {"fc": node})
  np.testing.assert_array_equal(nodes["fc"].mask, mask)
  leaf = report.leaves[0]
  assert leaf.kept == mask.sum()
  assert leaf.weight_bits < 8  # codes stored at kept positions only


def test_lowrank_and_diffq(tmp_path):
  lr = _need("lowrank", "factorize")
  dq = _need("diffq", "init_logits", "quantize")
  params = {"dense": {"kernel": _weights((48, 32), seed=4)}}
  logits = dq.init_logits(params, group_size=16, init_bits=6.0, min_size=0)
  tree = {"lr": lr.factorize(_weights((40, 24), seed=5), 4),
          "dq": dq.quantize(params, logits, group_size=16)}
  assert isinstance(tree["dq"]["dense"]["kernel"], dq.DiffQArray)
  _round_trip(tmp_path, tree)
