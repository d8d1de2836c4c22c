"""Files through the library's own compressed nodes (a missing one fails)."""

import jax
import jax.numpy as jnp
import numpy as np

import compressax as cx
from compressax import io


def _need(module, *names):
  """The module; a missing name is a failure (it is public API), not a skip."""
  assert hasattr(cx, module), f"compressax lacks the module {module!r}"
  mod = getattr(cx, module)
  missing = [n for n in names if not hasattr(mod, n)]
  assert not missing, f"cx.{module} lacks {missing}"
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


def test_product_quantized(tmp_path):
  q = _need("quantize", "product", "ProductQuantizedArray")
  node = q.product(_weights((300, 16), seed=6), subvectors=4, bits=5,
                   key=jax.random.key(0), iters=3)
  nodes, report = _round_trip(tmp_path, {"emb": node})
  back = nodes["emb"]
  assert type(back) is q.ProductQuantizedArray and back.bits == 5
  np.testing.assert_array_equal(np.asarray(back.codes), np.asarray(node.codes))
  # Codes bit-packed at 5 bits (all 32 codewords used), float32 codebooks.
  assert np.unique(np.asarray(node.codes)).size == 32
  leaf = by_kind(report)["ProductQuantizedArray"]
  assert leaf.bytes_raw == -(-300 * 4 * 5 // 8) + 4 * 4 * 32 * 4
  assert 8 * leaf.bytes_raw - node.storage_bits() < 8


def test_masked_codebook_in_transposed_scan_order(tmp_path):
  q = _need("quantize", "CodebookArray")
  p = _need("prune", "MaskedArray")
  rng = np.random.default_rng(4)
  shape = (96, 40)
  # Runs of 6 kept rows every 24 rows, at a random offset per column: regular
  # gaps down each column, geometric ones along each row.
  offset = rng.integers(0, 24, shape[1])
  mask = (np.arange(shape[0])[:, None] + offset) % 24 < 6
  codes = rng.integers(0, 64, size=shape).astype(np.uint8)
  cb = q.CodebookArray(jnp.asarray(codes), jnp.asarray(rng.normal(size=64), jnp.float32),
                       shape, np.dtype(np.float32))
  node = p.MaskedArray(cb, jnp.asarray(mask), shape, np.dtype(np.float32))
  nodes, _ = _round_trip(tmp_path, {"fc": node})
  manifest = io._load.parse((tmp_path / "real.cx").read_bytes(), "real")[0]
  fields = dict(manifest["tree"]["items"][0][1]["fields"])
  assert fields["mask"]["perm"] == [1, 0]
  assert dict(fields["value"]["fields"])["codes"]["perm"] == [1, 0]
  back = nodes["fc"]
  assert type(back) is p.MaskedArray and type(back.value) is q.CodebookArray
  np.testing.assert_array_equal(back.mask, mask)
  np.testing.assert_array_equal(np.asarray(back.value.codes)[mask], codes[mask])
  np.testing.assert_array_equal(back.value.centroids, np.asarray(cb.centroids))
