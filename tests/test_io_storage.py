"""Storage declared by the node class; namespaced, versioned class names;
sparse coding of float arrays with exact zeros."""

import dataclasses
import json
import os
import struct
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import compressax as cx
from compressax import io

_HDR = struct.Struct("<8sHHQI")


def _manifest(path):
  with open(path, "rb") as f:
    data = f.read()
  _, _, flags, mlen, _ = _HDR.unpack_from(data)
  stored = data[_HDR.size:_HDR.size + mlen]
  return json.loads(zlib.decompress(stored) if flags & 1 else stored)


def _records(rec):
  """Every record under ``rec`` (depth first)."""
  yield rec
  if rec["t"] == "node":
    for _, r in rec["fields"]:
      yield from _records(r)
  elif rec["t"] == "dict":
    for _, r in rec["items"]:
      yield from _records(r)
  elif rec["t"] in ("list", "tuple"):
    for r in rec["items"]:
      yield from _records(r)


@cx.compressed_leaf
@dataclasses.dataclass(frozen=True)
class IoBlend(cx.CompressedLeaf):
  """``where(mask, a, b)``: its mask selects, it does not prune."""
  a: jax.Array
  b: jax.Array
  mask: jax.Array
  shape: tuple = dataclasses.field(metadata=dict(static=True))
  dtype: np.dtype = dataclasses.field(metadata=dict(static=True))

  def materialize(self):
    return jnp.where(self.mask, self.a, self.b).astype(self.dtype)

  def storage_bits(self):
    return 0


@cx.compressed_leaf
@dataclasses.dataclass(frozen=True)
class IoGroupedByName(cx.CompressedLeaf):
  """``codes`` + ``bits`` + ``group_size`` by name, but no ``_cx_groups`` hook."""
  codes: jax.Array
  bits: jax.Array
  shape: tuple = dataclasses.field(metadata=dict(static=True))
  dtype: np.dtype = dataclasses.field(metadata=dict(static=True))
  group_size: int = dataclasses.field(metadata=dict(static=True))

  def materialize(self):
    return jnp.asarray(self.codes).astype(self.dtype)

  def storage_bits(self):
    return 0


@cx.compressed_leaf(sparse_mask="keep", pointwise=("vals",))
@dataclasses.dataclass(frozen=True)
class IoDeclaredPruned(cx.CompressedLeaf):
  """A pruned leaf whose mask is not called ``mask``: declared, so sparse."""
  vals: jax.Array
  keep: jax.Array
  shape: tuple = dataclasses.field(metadata=dict(static=True))
  dtype: np.dtype = dataclasses.field(metadata=dict(static=True))

  def materialize(self):
    return jnp.where(self.keep, self.vals, 0).astype(self.dtype)

  def storage_bits(self):
    return 0


# --- A. storage is declared, never guessed from field names -----------------

def test_undeclared_mask_field_is_stored_exactly(tmp_path):
  """Issue 11 item 6: Blend saved [[1,7],[7,1]] and loaded [[1,0],[0,1]]."""
  node = IoBlend(a=np.array([[1, 2], [3, 1]], np.float32),
                 b=np.array([[9, 7], [7, 9]], np.float32),
                 mask=np.array([[True, False], [False, True]]), shape=(2, 2),
                 dtype=np.dtype(np.float32))
  want = np.asarray(node.materialize())
  np.testing.assert_array_equal(want, [[1, 7], [7, 1]])
  io.save(tmp_path / "b.cx", {"blend": node})
  np.testing.assert_array_equal(io.load(tmp_path / "b.cx")["blend"], want)
  back = io.load(tmp_path / "b.cx", keep_compressed=True)["blend"]
  for k in ("a", "b", "mask"):
    np.testing.assert_array_equal(getattr(back, k), getattr(node, k))
  assert not any(r.get("sparse") for r in _records(_manifest(tmp_path / "b.cx")["tree"]))


def test_declared_sparse_mask_stores_kept_positions_only(tmp_path):
  rng = np.random.default_rng(0)
  keep = rng.random((40, 30)) < 0.1
  vals = np.where(keep, rng.normal(size=(40, 30)), 99.0).astype(np.float32)
  node = IoDeclaredPruned(vals, keep, (40, 30), np.dtype(np.float32))
  io.save(tmp_path / "p.cx", node)
  rec = _manifest(tmp_path / "p.cx")["tree"]
  assert rec["kept"] == keep.sum() and rec["sparse_mask"] == "keep"
  fields = dict(rec["fields"])
  assert fields["vals"]["sparse"] and fields["vals"]["p"][1] == 4 * keep.sum()
  np.testing.assert_array_equal(io.load(tmp_path / "p.cx"), node.materialize())
  back = io.load(tmp_path / "p.cx", keep_compressed=True)
  np.testing.assert_array_equal(back.vals, np.where(keep, vals, 0))


def test_grouped_codes_only_through_the_hook(tmp_path):
  """Field names ``codes``/``bits``/``group_size`` no longer imply grouping."""
  rng = np.random.default_rng(1)
  widths = np.repeat(np.array([1, 12], np.uint8), 32)
  codes = (rng.integers(0, 1 << widths.astype(np.int64).repeat(16))).astype(np.uint16)
  node = IoGroupedByName(codes.reshape(32, 32), widths, (32, 32),
                         np.dtype(np.float32), 16)
  io.save(tmp_path / "g.cx", node)
  recs = list(_records(_manifest(tmp_path / "g.cx")["tree"]))
  assert not any(r.get("enc", {}).get("scheme") == "grouped" for r in recs)
  back = io.load(tmp_path / "g.cx", keep_compressed=True)
  np.testing.assert_array_equal(back.codes, node.codes)
  # DiffQArray declares it (``_cx_groups``), so its codes are grouped.
  dq = cx.diffq.DiffQArray(codes=node.codes, bits=widths, lo=np.float32(0),
                           hi=np.float32(1), shape=(32, 32),
                           dtype=np.dtype(np.float32), group_size=16)
  io.save(tmp_path / "d.cx", dq)
  recs = list(_records(_manifest(tmp_path / "d.cx")["tree"]))
  assert any(r.get("enc", {}).get("scheme") == "grouped" for r in recs)


def test_nested_node_inside_a_mask_is_sparse_only_where_pointwise(tmp_path):
  """A square low-rank factor has the mask's shape but is not pointwise."""
  rng = np.random.default_rng(2)
  u, v = rng.normal(size=(6, 6)).astype(np.float32), np.eye(6, dtype=np.float32)
  lr = cx.lowrank.LowRankArray(u=u, v=v, shape=(6, 6), dtype=np.dtype(np.float32))
  keep = rng.random((6, 6)) < 0.5
  node = cx.prune.MaskedArray(value=lr, mask=keep, shape=(6, 6),
                              dtype=np.dtype(np.float32))
  io.save(tmp_path / "l.cx", node)
  back = io.load(tmp_path / "l.cx", keep_compressed=True)
  np.testing.assert_array_equal(back.value.u, u)
  np.testing.assert_array_equal(io.load(tmp_path / "l.cx"), node.materialize())


# --- B. namespaced, versioned class names ------------------------------------

def test_library_classes_have_namespaced_names(tmp_path):
  q = cx.quantize.quantize(jnp.ones((4, 4)), 4)
  io.save(tmp_path / "q.cx", q)
  rec = _manifest(tmp_path / "q.cx")["tree"]
  assert rec["class"] == "compressax.QuantizedArray" and rec["version"] == 1
  assert io.leaf_name(IoBlend) == f"{IoBlend.__module__}.IoBlend"


def _define(name=None, version=1, module="mypkg.layers", qual="QuantizedArray"):
  deco = cx.compressed_leaf(name=name, version=version) if name else cx.compressed_leaf

  @dataclasses.dataclass(frozen=True)
  class Leaf(cx.CompressedLeaf):
    x: jax.Array
    shape: tuple = dataclasses.field(metadata=dict(static=True))
    dtype: np.dtype = dataclasses.field(metadata=dict(static=True))

    def materialize(self):
      return jnp.asarray(self.x).astype(self.dtype)

    def storage_bits(self):
      return 0

  Leaf.__module__, Leaf.__qualname__, Leaf.__name__ = module, qual, qual
  return deco(Leaf)


def test_same_short_name_in_two_packages_and_rerun_cells(tmp_path):
  a = _define(module="pkg_a.nodes")
  b = _define(module="pkg_b.nodes")
  tree = {"a": a(np.arange(3.0), (3,), np.dtype(np.float64)),
          "b": b(np.arange(4.0), (4,), np.dtype(np.float64)),
          "q": cx.quantize.quantize(jnp.ones((2, 2)), 4)}
  io.save(tmp_path / "t.cx", tree)
  back = io.load(tmp_path / "t.cx", keep_compressed=True)
  assert type(back["a"]) is a and type(back["b"]) is b
  assert type(back["q"]) is cx.quantize.QuantizedArray
  # A notebook cell run again defines a new class object under the same name.
  a2 = _define(module="pkg_a.nodes")
  assert type(io.load(tmp_path / "t.cx", keep_compressed=True)["a"]) is a2
  io.save(tmp_path / "t2.cx", a2(np.zeros(2), (2,), np.dtype(np.float64)))
  # A node made before the re-run still saves, and loads as the new class.
  io.save(tmp_path / "t3.cx", tree["a"])
  assert type(io.load(tmp_path / "t3.cx", keep_compressed=True)) is a2


def test_unregistered_subclass_is_refused(tmp_path):
  @dataclasses.dataclass(frozen=True)
  class Sub(cx.prune.MaskedArray):
    pass
  node = Sub(value=np.ones(2, np.float32), mask=np.ones(2, bool), shape=(2,),
             dtype=np.dtype(np.float32))
  with pytest.raises(TypeError, match=r"w: .*Sub is not registered"):
    io.save(tmp_path / "s.cx", {"w": node})


def _rewrite(path, edit):
  """Edits the manifest of a file (no payload CRC depends on what is edited)."""
  with open(path, "rb") as f:
    data = f.read()
  magic, version, flags, mlen, _ = _HDR.unpack_from(data)
  m = json.loads(zlib.decompress(data[_HDR.size:_HDR.size + mlen]))
  edit(m)
  mb = zlib.compress(json.dumps(m).encode(), 9)
  with open(path, "wb") as f:
    f.write(_HDR.pack(magic, version, flags, len(mb), zlib.crc32(mb)) + mb
            + data[_HDR.size + mlen:])


def test_newer_class_version_is_refused_clearly(tmp_path):
  v2 = _define(name="mypkg.Thing", version=2, module="mypkg", qual="Thing")
  io.save(tmp_path / "v.cx", {"w": v2(np.ones(2), (2,), np.dtype(np.float64))})
  assert _manifest(tmp_path / "v.cx")["tree"]["items"][0][1]["version"] == 2
  _define(name="mypkg.Thing", version=1, module="mypkg", qual="Thing")
  with pytest.raises(io.CorruptFileError, match=r"w: mypkg.Thing version 2 is newer "
                     r"than the registered class mypkg.Thing \(version 1\)"):
    io.load(tmp_path / "v.cx")


def test_old_bare_names_load():
  """Format v2 files name classes bare: ``QuantizedArray`` is the library's."""
  path = os.path.join(os.path.dirname(__file__), "fixtures", "io_v2.cx")
  recs = list(_records(_manifest(path)["tree"]))
  assert "QuantizedArray" in {r.get("class") for r in recs}
  back = io.load(path, keep_compressed=True)
  assert type(back["quantized"]["affine"]) is cx.quantize.QuantizedArray
  assert io.leaf_type("QuantizedArray") is cx.quantize.QuantizedArray
  assert io.leaf_type("compressax.QuantizedArray") is cx.quantize.QuantizedArray
  assert io.leaf_type("IoBlend") is IoBlend  # a unique user class by its tail
  with pytest.raises(ValueError, match="unknown compressed leaf type 'Nope'"):
    io.leaf_type("Nope")


# --- C. float arrays with exact zeros are stored sparse ----------------------

def test_pruned_float_params_are_not_stored_dense(tmp_path):
  """Issue 11 item 8: apply_mask then save stored the full dense tree."""
  params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (256, 128)),
                      "bias": jnp.zeros(128)},
            "out": {"kernel": jax.random.normal(jax.random.key(1), (128, 10)),
                    "bias": jnp.zeros(10)}}
  mask = cx.prune.magnitude_mask(params, 0.9, scope="global")
  pruned = cx.prune.apply_mask(params, mask)
  dense_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(pruned))
  size = io.save(tmp_path / "p.cx", pruned)
  assert size < 0.3 * dense_bytes, (size, dense_bytes)
  back = io.load(tmp_path / "p.cx")
  for x, y in zip(jax.tree.leaves(pruned), jax.tree.leaves(back)):
    assert np.asarray(x).tobytes() == y.tobytes()


def test_ninety_percent_zero_tree_is_much_smaller_than_dense(tmp_path):
  rng = np.random.default_rng(3)
  w = rng.normal(size=(300, 200)).astype(np.float32)
  w[rng.random(w.shape) < 0.9] = 0
  size = io.save(tmp_path / "z.cx", {"w": w})
  assert size < 0.25 * w.nbytes, size
  assert io.load(tmp_path / "z.cx")["w"].tobytes() == w.tobytes()


@st.composite
def _sparse_floats(draw):
  dtype = np.dtype(draw(st.sampled_from([np.float32, np.float16, jnp.bfloat16,
                                         np.float64])))
  n = draw(st.integers(0, 400))
  rng = np.random.default_rng(draw(st.integers(0, 2 ** 31)))
  bits = rng.integers(0, 256, n * dtype.itemsize, dtype=np.uint8).view(dtype)
  zero = rng.random(n) < draw(st.sampled_from([0.0, 0.5, 0.9, 1.0]))
  special = np.array([0.0, -0.0, np.nan, -np.inf], np.float64).astype(dtype)
  out = np.where(zero, special[rng.integers(0, 4, n)] * 0
                 if draw(st.booleans()) else dtype.type(0), bits)
  return out.astype(dtype).reshape(draw(st.sampled_from([(n,), (1, n)])))


@given(_sparse_floats())
def test_sparse_floats_round_trip_bit_exactly(tmp_path_factory, x):
  """-0.0 and NaN payloads are values, not zeros: only +0.0 bits are dropped."""
  path = tmp_path_factory.mktemp("sf") / "x.cx"
  size = io.save(path, {"x": x})
  y = io.load(path)["x"]
  assert y.dtype == x.dtype and y.shape == x.shape
  assert y.tobytes() == x.tobytes()
  if x.size >= 200 and not x.view(f"u{x.dtype.itemsize}").any():
    assert size < x.nbytes
