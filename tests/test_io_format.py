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


@cx.compressed_leaf(pointwise=("codes",))
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


@cx.compressed_leaf(sparse_mask="mask", pointwise=("value",))
@dataclasses.dataclass(frozen=True)
class IoToyMasked(cx.CompressedLeaf):
  """value * mask, where value is an array or another node (declared sparse)."""
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
  density = draw(st.sampled_from([0.0, 0.05, 0.5, 1.0, "runs"]))
  seed = draw(st.integers(0, 2 ** 31))
  dtype = np.dtype(draw(st.sampled_from([np.float32, np.float16, jnp.bfloat16])))
  rng = np.random.default_rng(seed)
  if density == "runs":  # runs along the first axis: often stored transposed
    offset = rng.integers(0, 3, shape[1:])
    mask = (np.arange(shape[0]).reshape((-1,) + (1,) * (len(shape) - 1))
            + offset) % 3 == 0
  else:
    mask = rng.random(shape) < density
  codes = rng.integers(0, 2 ** draw(st.integers(1, 8)), size=shape).astype(np.uint16)
  inner = IoToyCodes(codes, np.float32(rng.normal()), np.float32(rng.normal()),
                     shape, dtype)
  value = inner if draw(st.booleans()) else rng.normal(size=shape).astype(dtype)
  if draw(st.booleans()):  # a masked node inside a masked node
    value = IoToyMasked(value, rng.random(shape) < 0.6, shape, dtype)
  return IoToyMasked(value, mask, shape, dtype)


@given(st.lists(_masked_nodes(), min_size=1, max_size=3))
def test_masked_nodes_round_trip(tmp_path_factory, nodes):
  path = tmp_path_factory.mktemp("mn") / "m.cx"
  io.save(path, nodes)
  _assert_identical(cx.materialize(nodes), io.load(path))
  back = io.load(path, keep_compressed=True)
  for a, b in zip(nodes, back):
    np.testing.assert_array_equal(a.mask, b.mask)
    while isinstance(b.value, IoToyMasked):
      a, b = a.value, b.value
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
  manifest, _ = io._load.parse(open(tmp_path / "s.cx", "rb").read(), "s")
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
  with pytest.raises(TypeError, match="keys must be strings or ints"):
    io.save(tmp_path / "bad.cx", {(1, 2): np.ones(2)})


# ------------------------------------------------------------- robustness


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("small") / "small.cx"
  tree = _toy_tree(seed=3, shape=(10, 12))
  io.save(path, tree)
  return str(path), open(path, "rb").read(), io.load(path)


def _load_bytes(path, data):
  return io._load.loads(data, path)


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


_HDR = struct.Struct("<8sHHQI")


def _manifest(data):
  magic, ver, flags, mlen, _ = _HDR.unpack_from(data)
  stored = data[_HDR.size:_HDR.size + mlen]
  return json.loads(zlib.decompress(stored) if flags & 1 else stored)


def _with_manifest(data, stored, version=None, flags=None):
  """`data` with its manifest bytes replaced by `stored` (valid CRC)."""
  magic, ver, fl, mlen, _ = _HDR.unpack_from(data)
  return (_HDR.pack(magic, ver if version is None else version,
                    fl if flags is None else flags, len(stored),
                    zlib.crc32(stored)) + stored + data[_HDR.size + mlen:])


def _rewrite(data, edit, version=None, compress=True):
  """Re-serializes a file after `edit(manifest)`, with a valid manifest CRC."""
  manifest = _manifest(data)
  edit(manifest)
  m = json.dumps(manifest).encode()
  return _with_manifest(data, zlib.compress(m, 9) if compress else m, version,
                        flags=1 if compress else 0)


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
@pytest.mark.parametrize("compress", [True, False])
def test_lying_manifest_names_file_and_leaf(small_file, tmp_path, lie, where,
                                            compress):
  _, data, _ = small_file
  path = str(tmp_path / "lie.cx")
  with pytest.raises(io.CorruptFileError) as e:
    _load_bytes(path, _rewrite(data, lie, compress=compress))
  assert path in str(e.value) and where in str(e.value)


def test_manifest_is_zlib_compressed(small_file, tmp_path):
  _, data, ref = small_file
  magic, ver, flags, mlen, crc = _HDR.unpack_from(data)
  assert ver == io.FORMAT_VERSION == 3 and flags == io._format.FLAG_ZLIB_MANIFEST
  stored = data[_HDR.size:_HDR.size + mlen]
  assert crc == zlib.crc32(stored)
  plain = json.dumps(_manifest(data), separators=(",", ":")).encode()
  assert stored == zlib.compress(plain, 9) and len(stored) < len(plain)
  # Readers also take a plain manifest, and version 1 files (flags 0).
  path = str(tmp_path / "p.cx")
  _assert_identical(ref, _load_bytes(path, _rewrite(data, lambda m: None,
                                                    compress=False)))
  v1 = _rewrite(data, lambda m: m.update(version=1), version=1, compress=False)
  _assert_identical(ref, _load_bytes(path, v1))
  with pytest.raises(io.CorruptFileError, match="bad header"):
    _load_bytes(path, _with_manifest(v1, zlib.compress(plain), flags=1))
  with pytest.raises(io.CorruptFileError, match="bad header"):
    _load_bytes(path, _with_manifest(data, stored, flags=3))


def test_bad_compressed_manifest_with_valid_crc(small_file, tmp_path):
  _, data, _ = small_file
  path = str(tmp_path / "z.cx")
  stored = data[_HDR.size:_HDR.size + _HDR.unpack_from(data)[3]]
  for bad in (b"not zlib at all", stored[:len(stored) // 2], stored + b"junk",
              stored[:2] + bytes([stored[2] ^ 0xFF]) + stored[3:]):
    with pytest.raises(io.CorruptFileError, match="z.cx"):
      _load_bytes(path, _with_manifest(data, bad))


def test_decompression_bomb_is_refused(small_file, tmp_path, monkeypatch):
  _, data, _ = small_file
  manifest = _manifest(data)
  # Whitespace inflates far past the cap but is valid JSON around the manifest.
  bomb = zlib.compress(json.dumps(manifest).encode() + b" " * 2_000_000, 9)
  assert 64 * len(bomb) < 2_000_000
  del monkeypatch
  bombed = _with_manifest(data, bomb)
  with pytest.raises(io.LimitExceededError, match="more than 1,048,576 bytes"):
    _load_bytes(str(tmp_path / "b.cx"), bombed)
  with pytest.raises(io.CorruptFileError, match="more than 100,000"):
    io._load.loads(bombed, "b.cx", max_manifest_bytes=100_000)
  # Under a raised cap it loads (the whitespace is valid JSON).
  io._load.loads(bombed, "b.cx", max_manifest_bytes=1 << 22)


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


# ------------------------------------------------------------- scan order


def _banded(shape, run=8, seed=0):
  """Each column keeps one run of rows at a random start: cheap column-major."""
  start = np.random.default_rng(seed).integers(0, shape[0] - run, shape[1])
  i = np.arange(shape[0])[:, None]
  return (i >= start) & (i < start + run)


def test_transposed_scan_order_is_picked_and_round_trips(tmp_path):
  shape = (64, 48)
  rng = np.random.default_rng(11)
  codes = rng.integers(0, 64, size=shape).astype(np.uint8)
  mask = _banded(shape)
  inner = IoToyCodes(codes, np.float32(0.5), np.float32(-3.0), shape,
                     np.dtype(np.float32))
  tree = {"col": IoToyMasked(inner, mask, shape, np.dtype(np.float32)),
          "row": IoToyMasked(IoToyCodes(codes.T.copy(), np.float32(0.5),
                                        np.float32(-3.0), shape[::-1],
                                        np.dtype(np.float32)),
                             mask.T.copy(), shape[::-1], np.dtype(np.float32))}
  path = tmp_path / "t.cx"
  io.save(path, tree)
  manifest = io._load.parse(path.read_bytes(), "t")[0]
  assert _leaf(manifest, "col", "mask")["perm"] == [1, 0]
  codes_rec = _leaf(manifest, "col", "value", "codes")
  assert codes_rec["sparse"] and codes_rec["perm"] == [1, 0]
  assert "perm" not in _leaf(manifest, "row", "mask")  # C order wins there
  # Same payload sizes: the transposed mask is coded like the other one.
  assert _leaf(manifest, "col", "mask")["p"][1] == _leaf(manifest, "row", "mask")["p"][1]
  _assert_identical(cx.materialize(tree), io.load(path))
  back = io.load(path, keep_compressed=True)
  for k in tree:
    m = np.asarray(tree[k].mask)
    np.testing.assert_array_equal(back[k].mask, m)
    np.testing.assert_array_equal(back[k].value.codes[m], tree[k].value.codes[m])
    assert not back[k].value.codes[~m].any()
  # A manifest that swaps the order back is caught by the payload checksums.
  with pytest.raises(io.CorruptFileError, match="col/mask"):
    io._load.loads(_rewrite(path.read_bytes(),
                              lambda m: _leaf(m, "col", "mask").pop("perm")), "t")


def test_nested_masks_follow_the_outer_scan_order(tmp_path):
  shape = (40, 3, 32)
  rng = np.random.default_rng(12)
  outer = np.broadcast_to(_banded((40, 32), run=12)[:, None, :], shape).copy()
  inner_mask = rng.random(shape) < 0.7
  codes = rng.integers(0, 200, size=shape).astype(np.uint8)
  node = IoToyMasked(IoToyMasked(IoToyCodes(codes, np.float32(1), np.float32(0),
                                            shape, np.dtype(np.float16)),
                                 inner_mask, shape, np.dtype(np.float16)),
                     outer, shape, np.dtype(np.float16))
  io.save(tmp_path / "n.cx", [node])
  manifest = io._load.parse((tmp_path / "n.cx").read_bytes(), "n")[0]
  perm = _leaf(manifest, 0, "mask").get("perm")
  inner_rec = _leaf(manifest, 0, "value", "mask")
  assert inner_rec["sparse"] and inner_rec.get("perm") == perm
  assert _leaf(manifest, 0, "value", "value", "codes").get("perm") == perm
  _assert_identical([np.asarray(node.materialize())], io.load(tmp_path / "n.cx"))
  back = io.load(tmp_path / "n.cx", keep_compressed=True)[0]
  both = outer & inner_mask
  np.testing.assert_array_equal(back.value.mask, both)
  np.testing.assert_array_equal(back.value.value.codes[both], codes[both])


def test_3d_mask_scans_its_regular_axis_fastest(tmp_path):
  rng = np.random.default_rng(13)
  shape = (12, 60, 10)
  off = rng.integers(0, 6, (shape[0], 1, shape[2]))
  mask = (np.arange(shape[1])[None, :, None] + off) % 6 < 2  # runs along axis 1
  io.save(tmp_path / "c.cx", {"m": mask})
  manifest = io._load.parse((tmp_path / "c.cx").read_bytes(), "c")[0]
  assert _leaf(manifest, "m")["perm"] == [0, 2, 1]
  _assert_identical({"m": mask}, io.load(tmp_path / "c.cx"))


def test_nnx_state_with_integer_keys_round_trips(tmp_path):
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.blocks = nnx.List([nnx.Linear(3, 4, rngs=rngs), nnx.Linear(4, 2, rngs=rngs)])

  _, state = nnx.split(Net(nnx.Rngs(0)))
  path = tmp_path / "nnx.cx"
  cx.io.save(path, state)
  loaded = cx.io.load(path)
  assert set(loaded["blocks"]) == {0, 1}
  restored = nnx.to_pure_dict(state)
  for i in (0, 1):
    for name in ("kernel", "bias"):
      np.testing.assert_array_equal(loaded["blocks"][i][name], restored["blocks"][i][name])
  # int key 0 and str key "0" are different trees
  cx.io.save(tmp_path / "a.cx", {0: np.ones(2, np.float32), "0": np.zeros(2, np.float32)})
  both = cx.io.load(tmp_path / "a.cx")
  assert both[0].sum() == 2 and both["0"].sum() == 0
  with pytest.raises(TypeError, match="strings or ints"):
    cx.io.save(tmp_path / "b.cx", {1.5: np.ones(2)})
