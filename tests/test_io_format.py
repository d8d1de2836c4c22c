"""The compressax file: bit-exact round trips, sparse nodes, corruption, reports."""

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


@cx.compressed_leaf
@dataclasses.dataclass(frozen=True)
class IoToyCodes(cx.CompressedLeaf):
  """codes * scale + offset: a toy quantized leaf."""
  codes: jax.Array
  scale: jax.Array
  offset: jax.Array
  shape: tuple = dataclasses.field(metadata=dict(static=True))
  dtype: np.dtype = dataclasses.field(metadata=dict(static=True))
  note: str = dataclasses.field(default="", metadata=dict(static=True))

  def materialize(self):
    v = jnp.asarray(self.codes).astype(jnp.float32) * jnp.asarray(self.scale)
    return (v + jnp.asarray(self.offset)).astype(self.dtype)

  def storage_bits(self):
    return 4 * self.size + 64


@cx.compressed_leaf
@dataclasses.dataclass(frozen=True)
class IoToyMasked(cx.CompressedLeaf):
  """value * mask, where value is an array or another node."""
  value: object
  mask: jax.Array
  shape: tuple = dataclasses.field(metadata=dict(static=True))
  dtype: np.dtype = dataclasses.field(metadata=dict(static=True))

  def materialize(self):
    v = self.value.materialize() if cx.is_compressed(self.value) else jnp.asarray(self.value)
    return jnp.where(jnp.asarray(self.mask), v, jnp.zeros((), v.dtype)).astype(self.dtype)

  def storage_bits(self):
    return self.size


_DTYPES = [np.float32, np.float16, jnp.bfloat16, np.float64, np.int8, np.uint8,
           np.int16, np.int32, np.uint32, np.int64, np.uint64, np.bool_]


@st.composite
def _arrays(draw):
  dtype = np.dtype(draw(st.sampled_from(_DTYPES)))
  shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
  n = int(np.prod(shape, dtype=np.int64))
  style = draw(st.sampled_from(["random", "zeros", "one-value", "skewed"]))
  seed = draw(st.integers(0, 2 ** 31))
  rng = np.random.default_rng(seed)
  raw = rng.integers(0, 256, size=n * dtype.itemsize, dtype=np.uint8)
  if style == "zeros":
    raw[:] = 0
  elif style == "one-value" and n:
    raw = np.tile(raw[:dtype.itemsize], n)
  elif style == "skewed":  # few distinct byte values: entropy coding kicks in
    raw = (rng.geometric(0.6, size=raw.size) - 1).astype(np.uint8)
  arr = raw.view(dtype) if dtype != np.bool_ else (raw % 2).astype(bool)
  return arr.reshape(shape)  # floats include NaNs/Infs with any payload


def _trees():
  leaves = _arrays() | st.none()
  return st.recursive(
      leaves,
      lambda kids: (st.lists(kids, max_size=3)
                    | st.lists(kids, max_size=3).map(tuple)
                    | st.dictionaries(st.text(max_size=4), kids, max_size=3)),
      max_leaves=8)


def _assert_identical(a, b):
  ta, tb = jax.tree_util.tree_structure(a), jax.tree_util.tree_structure(b)
  assert ta == tb, (ta, tb)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x = np.asarray(x)
    assert isinstance(y, np.ndarray)
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.tobytes() == y.tobytes()


@given(_trees())
def test_round_trip_is_bit_exact(tmp_path_factory, tree):
  path = tmp_path_factory.mktemp("rt") / "t.cx"
  size = io.save(path, tree)
  assert size == os.path.getsize(path)
  _assert_identical(tree, io.load(path))


@st.composite
def _masked_nodes(draw):
  shape = tuple(draw(st.lists(st.integers(0, 6), min_size=1, max_size=3)))
  density = draw(st.sampled_from([0.0, 0.05, 0.5, 1.0]))
  seed = draw(st.integers(0, 2 ** 31))
  dtype = np.dtype(draw(st.sampled_from([np.float32, np.float16, jnp.bfloat16])))
  rng = np.random.default_rng(seed)
  mask = rng.random(shape) < density
  codes = rng.integers(0, 2 ** draw(st.integers(1, 8)), size=shape).astype(np.uint16)
  inner = IoToyCodes(codes, np.float32(rng.normal()), np.float32(rng.normal()),
                     shape, dtype)
  value = inner if draw(st.booleans()) else rng.normal(size=shape).astype(dtype)
  return IoToyMasked(value, mask, shape, dtype)


@given(st.lists(_masked_nodes(), min_size=1, max_size=3))
def test_masked_nodes_round_trip(tmp_path_factory, nodes):
  path = tmp_path_factory.mktemp("mn") / "m.cx"
  io.save(path, nodes)
  _assert_identical(cx.materialize(nodes), io.load(path))
  back = io.load(path, keep_compressed=True)
  for a, b in zip(nodes, back):
    np.testing.assert_array_equal(a.mask, b.mask)
    v = b.value.codes if cx.is_compressed(b.value) else b.value
    assert not np.asarray(v)[~a.mask].astype(np.float32).any()


def test_saving_is_deterministic(tmp_path):
  tree = _toy_tree(seed=7)
  io.save(tmp_path / "a.cx", tree)
  io.save(tmp_path / "b.cx", _toy_tree(seed=7))  # equal values, new objects
  assert (tmp_path / "a.cx").read_bytes() == (tmp_path / "b.cx").read_bytes()


def _toy_tree(seed=0, shape=(24, 16)):
  rng = np.random.default_rng(seed)
  codes = rng.integers(0, 16, size=shape).astype(np.uint8)
  mask = rng.random(shape) < 0.15
  return {
      "dense": rng.normal(size=(3, 5)).astype(np.float32),
      "q": IoToyCodes(codes, np.float32(0.1), np.float32(-0.8), shape,
                      np.dtype(np.float32), "a"),
      "m": IoToyMasked(IoToyCodes(codes, np.float32(0.05), np.float32(0.0),
                                  shape, jnp.dtype(jnp.bfloat16)),
                       mask, shape, jnp.dtype(jnp.bfloat16)),
      "layers": [np.int32(7), (mask, None)],
  }


def test_nodes_round_trip_materialized_and_compressed(tmp_path):
  tree = _toy_tree()
  io.save(tmp_path / "n.cx", tree)
  _assert_identical(cx.materialize(tree), io.load(tmp_path / "n.cx"))
  kept = io.load(tmp_path / "n.cx", keep_compressed=True)
  q = kept["q"]
  assert type(q) is IoToyCodes and q.meta() == tree["q"].meta()
  np.testing.assert_array_equal(q.codes, tree["q"].codes)
  m = kept["m"]
  assert type(m) is IoToyMasked and type(m.value) is IoToyCodes
  assert m.value.dtype == jnp.dtype(jnp.bfloat16) and m.dtype == jnp.bfloat16
  np.testing.assert_array_equal(m.mask, tree["m"].mask)


def test_sparse_nodes_store_kept_positions_only(tmp_path):
  tree = _toy_tree(seed=1, shape=(64, 64))
  masked = {"m": tree["m"]}
  dense = {"m": tree["m"].value}
  io.save(tmp_path / "s.cx", masked)
  io.save(tmp_path / "d.cx", dense)
  # Sparse codes cost ~15% of the dense codes (plus the mask).
  manifest, _ = io._format.parse(open(tmp_path / "s.cx", "rb").read(), "s")
  codes_rec = manifest["tree"]["items"][0][1]["fields"][1][1]["fields"][0][1]
  assert codes_rec["sparse"] and codes_rec["enc"]["count"] == tree["m"].mask.sum()
  back = io.load(tmp_path / "s.cx", keep_compressed=True)["m"]
  mask = tree["m"].mask
  np.testing.assert_array_equal(back.value.codes[mask], tree["m"].value.codes[mask])
  assert not back.value.codes[~mask].any()  # zeros at pruned positions
  assert np.asarray(back.materialize()).tobytes() == \
      np.asarray(tree["m"].materialize()).tobytes()


def test_all_pruned_and_one_element_nodes(tmp_path):
  for shape, density in [((8, 8), 0.0), ((1,), 1.0), ((5, 3), 1.0)]:
    mask = np.random.default_rng(0).random(shape) < density
    node = IoToyMasked(np.full(shape, 2.5, np.float16), mask, shape,
                       np.dtype(np.float16))
    io.save(tmp_path / "p.cx", [node])
    _assert_identical([np.asarray(node.materialize())], io.load(tmp_path / "p.cx"))


def test_linen_and_nnx_trees(tmp_path):
  import flax.linen as nn
  from flax import nnx
  params = nn.Dense(3).init(jax.random.key(0), jnp.ones((1, 4)))
  io.save(tmp_path / "l.cx", params)
  _assert_identical(params, io.load(tmp_path / "l.cx"))
  model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  state = nnx.state(model)
  io.save(tmp_path / "x.cx", state)
  loaded = io.load(tmp_path / "x.cx")
  _assert_identical(state.to_pure_dict(), loaded)
  nnx.replace_by_pure_dict(state, loaded)


def test_unsupported_leaves_name_the_path(tmp_path):
  with pytest.raises(TypeError, match="a/b"):
    io.save(tmp_path / "bad.cx", {"a": {"b": np.array(["x"])}})
  with pytest.raises(TypeError, match="keys must be strings"):
    io.save(tmp_path / "bad.cx", {1: np.ones(2)})


# ------------------------------------------------------------- robustness


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("small") / "small.cx"
  tree = _toy_tree(seed=3, shape=(10, 12))
  io.save(path, tree)
  return str(path), open(path, "rb").read(), io.load(path)


def _load_bytes(path, data):
  return io._format.loads(data, path)


def test_every_byte_flip_is_detected_or_harmless(small_file, tmp_path):
  _, data, ref = small_file
  path = str(tmp_path / "flip.cx")
  for xor in (0x01, 0x80):
    for i in range(len(data)):
      bad = bytearray(data)
      bad[i] ^= xor
      try:
        out = _load_bytes(path, bytes(bad))
      except io.CorruptFileError as e:
        assert path in str(e)
        continue
      _assert_identical(ref, out)


def test_every_truncation_is_detected(small_file, tmp_path):
  _, data, _ = small_file
  path = str(tmp_path / "cut.cx")
  for n in range(len(data)):
    with pytest.raises(io.CorruptFileError, match="cut.cx"):
      _load_bytes(path, data[:n])
  with pytest.raises(io.CorruptFileError, match="padded"):
    _load_bytes(path, data + b"\0")
  with open(path, "wb") as f:  # and through a real file
    f.write(data[:len(data) // 2])
  with pytest.raises(io.CorruptFileError, match="cut.cx"):
    io.load(path)


def _rewrite(data, edit, version=None):
  """Re-serializes a file after `edit(manifest)`, with a valid manifest CRC."""
  hdr = struct.Struct("<8sHHQI")
  magic, ver, flags, mlen, _ = hdr.unpack_from(data)
  manifest = json.loads(data[hdr.size:hdr.size + mlen])
  edit(manifest)
  m = json.dumps(manifest).encode()
  return (hdr.pack(magic, ver if version is None else version, flags, len(m),
                   zlib.crc32(m)) + m + data[hdr.size + mlen:])


def _leaf(manifest, *keys):
  rec = manifest["tree"]
  for k in keys:
    rec = dict(rec["items"])[k] if rec["t"] == "dict" else \
        dict(rec["fields"])[k] if rec["t"] == "node" else rec["items"][k]
  return rec


@pytest.mark.parametrize("lie, where", [
    (lambda m: _leaf(m, "dense").update(shape=[5, 3]), "dense"),
    (lambda m: _leaf(m, "dense").update(shape=[4, 5]), "dense"),
    (lambda m: _leaf(m, "dense").update(dtype="int32"), "dense"),
    (lambda m: _leaf(m, "q", "codes")["p"].__setitem__(0, _leaf(m, "q", "codes")["p"][0] + 1), "q/codes"),
    (lambda m: _leaf(m, "q", "codes")["p"].__setitem__(1, 10 ** 9), "q/codes"),
    (lambda m: _leaf(m, "q", "codes")["enc"].update(bits=3), "q/codes"),
    (lambda m: _leaf(m, "q").update(meta=dict(_leaf(m, "q")["meta"], shape=[12, 10])), "q/codes"),
    (lambda m: _leaf(m, "m", "value", "codes").pop("sparse"), "m/value/codes"),
    (lambda m: _leaf(m, "m").update({"class": "NoSuchNode"}), "m"),
    (lambda m: m["tree"]["items"].__setitem__(0, ["dense2", m["tree"]["items"][0][1]]), "dense2"),
])
def test_lying_manifest_names_file_and_leaf(small_file, tmp_path, lie, where):
  _, data, _ = small_file
  path = str(tmp_path / "lie.cx")
  with pytest.raises(io.CorruptFileError) as e:
    _load_bytes(path, _rewrite(data, lie))
  assert path in str(e.value) and where in str(e.value)


def test_header_errors(small_file, tmp_path):
  _, data, _ = small_file
  path = str(tmp_path / "h.cx")
  with pytest.raises(io.CorruptFileError, match="newer"):
    _load_bytes(path, _rewrite(data, lambda m: None, version=io.FORMAT_VERSION + 1))
  with pytest.raises(io.CorruptFileError, match="magic"):
    _load_bytes(path, b"PK\x03\x04" + data[4:])
  assert issubclass(io.CorruptFileError, ValueError)


# ------------------------------------------------------------- size report


def test_size_report_matches_the_file(tmp_path):
  tree = _toy_tree(seed=5, shape=(128, 96))
  path = str(tmp_path / "r.cx")
  io.save(path, tree)
  report = io.size_report(path)
  dense = 4 * sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(cx.materialize(tree)))
  assert report.dense_fp32_bytes == dense
  assert report.file_bytes == os.path.getsize(path)
  assert report.ratio == dense / os.path.getsize(path)
  text = str(report)
  assert f"({dense / os.path.getsize(path):.2f}x)" in text
  by_path = {l.path: l for l in report.leaves}
  m = by_path["m"]
  assert m.kept == int(tree["m"].mask.sum()) and m.kind == "IoToyMasked"
  assert m.index_bytes > 0 and m.weight_bits_coded <= m.weight_bits
  assert by_path["q"].value_bytes_raw == 128 * 96 // 2 + 8  # 4-bit codes + 2 floats
  assert sum(l.bytes for l in report.leaves) + report.overhead_bytes == report.file_bytes
  same = io.size_report(tree)  # in memory, identical encodings
  assert same.file_bytes == report.file_bytes and same.leaves == report.leaves
  again = io.size_report(tree, file=tmp_path / "r2.cx")
  assert again.file_bytes == os.path.getsize(tmp_path / "r2.cx")
