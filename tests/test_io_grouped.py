"""Per-group bit widths in files: DiffQ codes packed group by group.

Size bounds checked here (``S`` = sum over groups of group length x width,
``C`` = distinct widths, ``G`` = groups):

* codes payload <= ceil(S / 8) + C (each width class is at most its raw
  packing, which rounds up to a byte once per class);
* file <= ceil(storage_bits / 8) + 24 (header) + manifest + C + 2: the
  widths field costs at most the 4 bits per group ``storage_bits`` counts
  (rounded up: +1), ``lo``/``hi`` are 8 raw bytes (the 64 bits it counts),
  and the codes' per-class rounding is the ``C``; 1 more byte of slack for the
  widths' rounding against the codes' total.
"""

import dataclasses
import json
import math
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
from compressax.io import _codec
from compressax.io import _grouped

_HDR = struct.Struct("<8sHHQI")


@cx.compressed_leaf
@dataclasses.dataclass(frozen=True)
class IoGrpHooked(cx.CompressedLeaf):
  """Per-group widths under other field names, announced by ``_cx_groups``."""
  q: jax.Array
  w: jax.Array
  shape: tuple = dataclasses.field(metadata=dict(static=True))
  dtype: np.dtype = dataclasses.field(metadata=dict(static=True))
  gs: int = dataclasses.field(metadata=dict(static=True))

  def _cx_groups(self):
    return {"q": (self.gs, "w")}

  def materialize(self):
    return jnp.asarray(self.q).astype(self.dtype)

  def storage_bits(self):
    return 0


@cx.compressed_leaf
@dataclasses.dataclass(frozen=True)
class IoGrpPlain(cx.CompressedLeaf):
  """Has ``codes`` and ``bits`` but no ``group_size``: not grouped."""
  codes: jax.Array
  bits: jax.Array
  shape: tuple = dataclasses.field(metadata=dict(static=True))
  dtype: np.dtype = dataclasses.field(metadata=dict(static=True))

  def materialize(self):
    return jnp.asarray(self.codes).astype(self.dtype)

  def storage_bits(self):
    return 0


def _counts(size, group_size):
  if group_size == 0:
    return np.array([size], np.int64)
  g = -(-size // group_size)
  c = np.full(g, group_size, np.int64)
  c[-1] = size - (g - 1) * group_size
  return c


def _diffq_node(shape, group_size, widths, seed, full_range=True):
  """A DiffQArray built directly: codes uniform in each group's [0, 2^b - 1]."""
  rng = np.random.default_rng(seed)
  size = math.prod(shape)
  counts = _counts(size, group_size)
  widths = np.asarray(widths, np.uint8)
  top = np.repeat((1 << widths.astype(np.int64)) - 1, counts)
  codes = (rng.integers(0, top + 1) if full_range else
           np.minimum(top, rng.geometric(0.3, size) - 1))
  return cx.diffq.DiffQArray(
      codes=codes.astype(np.uint16).reshape(shape), bits=widths,
      lo=np.float32(-1.0), hi=np.float32(2.0), shape=tuple(shape),
      dtype=np.dtype(np.float32), group_size=group_size)


def _quantized(shape, group_size, widths, seed=0):
  """The same through cx.diffq.quantize, logits set to hit ``widths``."""
  x = jax.random.normal(jax.random.PRNGKey(seed), shape)
  params = {"w": x}
  logits = cx.diffq.init_logits(params, group_size=group_size, b_min=1, b_max=15,
                                min_size=0)
  p = (np.asarray(widths, np.float64) - 1) / 14
  lg = np.where(p <= 0, -30.0, np.where(p >= 1, 30.0,
                                        np.log(np.clip(p, 1e-9, 1 - 1e-9)
                                                   / np.clip(1 - p, 1e-9, 1))))
  assert logits["w"].shape == lg.shape
  q = cx.diffq.quantize(params, {"w": jnp.asarray(lg, jnp.float32)},
                        group_size=group_size, b_min=1, b_max=15)
  np.testing.assert_array_equal(np.asarray(q["w"].bits), widths)
  return q["w"]


def _manifest(data):
  _, _, flags, mlen, _ = _HDR.unpack_from(data)
  stored = data[_HDR.size:_HDR.size + mlen]
  return json.loads(zlib.decompress(stored) if flags & 1 else stored), mlen


def _fields(manifest, key):
  return dict(dict(manifest["tree"]["items"])[key]["fields"])


def _save(tmp_path, tree, name="f.cx"):
  path = tmp_path / name
  size = io.save(path, tree)
  data = open(path, "rb").read()
  assert size == len(data)
  return path, data


def _assert_node_equal(a, b):
  assert type(a) is type(b)
  assert a.meta() == b.meta()
  for k, v in a.data().items():
    x, y = np.asarray(v), np.asarray(b.data()[k])
    assert x.dtype == y.dtype and x.shape == y.shape, k
    assert x.tobytes() == y.tobytes(), k


def _check_bounds(node, data):
  """The module docstring's bounds; returns the node's field records."""
  manifest, mlen = _manifest(data)
  fields = _fields(manifest, "dq")
  flat = np.asarray(node.codes).reshape(-1)
  counts = _counts(node.size, node.group_size)
  widths = np.asarray(node.bits, np.int64)
  n_classes = np.unique(widths).size
  s = int((counts * widths).sum())
  grouped = _grouped.encode_grouped(flat, node.bits, node.group_size, "bits")
  assert len(grouped[1]) <= -(-s // 8) + n_classes
  # The writer may keep the generic record when the grouped one's manifest
  # entry costs more than its payload saves; it then pays at most that much.
  extra = 0
  if fields["codes"]["enc"].get("scheme") != "grouped":
    generic = _codec.encode_flat(flat)
    assert fields["codes"]["enc"] == generic[0]
    assert _codec.encoded_cost(*generic) < _codec.encoded_cost(*grouped)
    extra = max(0, (_codec.encoded_cost(*grouped) - len(grouped[1]))
                - (_codec.encoded_cost(*generic) - len(generic[1])))
  assert fields["codes"]["p"][1] <= -(-s // 8) + n_classes + extra
  assert len(data) <= (-(-node.storage_bits() // 8) + _HDR.size + mlen
                       + n_classes + 2 + extra)
  return fields


@st.composite
def _layouts(draw):
  shape = tuple(draw(st.lists(st.integers(1, 9), min_size=1, max_size=3)))
  group_size = draw(st.sampled_from([1, 16, 0]))
  n_groups = len(_counts(math.prod(shape), group_size))
  widths = draw(st.lists(st.integers(1, 15), min_size=n_groups, max_size=n_groups))
  return shape, group_size, widths, draw(st.integers(0, 2 ** 31)), draw(st.booleans())


@given(_layouts())
def test_mixed_widths_round_trip_within_the_bounds(tmp_path_factory, layout):
  shape, group_size, widths, seed, full = layout
  node = _diffq_node(shape, group_size, widths, seed, full_range=full)
  _, data = _save(tmp_path_factory.mktemp("h"), {"dq": node})
  back = io._load.loads(data, keep_compressed=True)["dq"]
  _assert_node_equal(node, back)
  _check_bounds(node, data)


@pytest.mark.parametrize("shape, group_size", [((7, 9), 16), ((5, 4, 3), 1),
                                               ((3, 11), 0), ((10, 17), 16)])
def test_quantize_output_round_trips_and_beats_the_widest_width(tmp_path, shape,
                                                                group_size):
  n = len(_counts(math.prod(shape), group_size))
  widths = np.arange(n) % 15 + 1 if n > 1 else np.array([7])
  node = _quantized(shape, group_size, widths.astype(np.uint8))
  _, data = _save(tmp_path, {"dq": node})
  back = io._load.loads(data, keep_compressed=True)["dq"]
  _assert_node_equal(node, back)
  fields = _check_bounds(node, data)
  np.testing.assert_array_equal(io._load.loads(data)["dq"],
                                np.asarray(node.materialize()))
  if n >= 8:  # many mixed widths: per-class packing wins over one width for all
    assert fields["codes"]["enc"].get("scheme") == "grouped"
    assert fields["codes"]["p"][1] < math.ceil(node.size * widths.max() / 8)


def test_widths_are_written_before_the_codes(tmp_path):
  node = _diffq_node((16, 8), 16, [3, 9, 3, 12, 1, 9, 3, 15], seed=1)
  _, data = _save(tmp_path, {"dq": node})
  names = [k for k, _ in dict(_manifest(data)[0]["tree"]["items"])["dq"]["fields"]]
  assert names.index("bits") < names.index("codes")
  enc = _fields(_manifest(data)[0], "dq")["codes"]["enc"]
  assert enc["scheme"] == "grouped" and enc["widths"] == "bits"
  assert [c if isinstance(c, int) else c["bits"] for c in enc["classes"]] \
      == [1, 3, 9, 12, 15]


def test_hook_announces_other_field_names(tmp_path):
  rng = np.random.default_rng(0)
  w = np.array([2, 11, 2, 5, 11, 2, 2, 2, 2], np.uint8)
  q = rng.integers(0, (1 << np.repeat(w.astype(np.int64), 16)[:135])).astype(np.uint16)
  node = IoGrpHooked(q=q.reshape(5, 27), w=w, shape=(5, 27),
                     dtype=np.dtype(np.float32), gs=16)
  _, data = _save(tmp_path, {"dq": node})
  _assert_node_equal(node, io._load.loads(data, keep_compressed=True)["dq"])
  enc = _fields(_manifest(data)[0], "dq")["q"]["enc"]
  assert enc["scheme"] == "grouped" and enc["widths"] == "w"


def test_other_nodes_keep_the_generic_encoding(tmp_path):
  codes = np.arange(24, dtype=np.uint16).reshape(4, 6)
  node = IoGrpPlain(codes=codes, bits=np.array([5, 5], np.uint8), shape=(4, 6),
                    dtype=np.dtype(np.float32))
  _, data = _save(tmp_path, {"dq": node})
  fields = _fields(_manifest(data)[0], "dq")
  assert [k for k, _ in dict(_manifest(data)[0]["tree"]["items"])["dq"]["fields"]] \
      == ["codes", "bits"]
  assert "scheme" not in fields["codes"]["enc"]
  assert fields["codes"]["enc"] == _codec.encode_flat(codes.reshape(-1))[0]
  _assert_node_equal(node, io._load.loads(data, keep_compressed=True)["dq"])


def test_codes_that_do_not_fit_their_width_fall_back(tmp_path):
  node = _diffq_node((6, 8), 16, [2, 9, 4], seed=2)
  codes = np.asarray(node.codes).copy()
  codes[0, 0] = 300  # group 0 claims 2 bits
  node = dataclasses.replace(node, codes=codes)
  assert _grouped.encode_grouped(codes.reshape(-1), node.bits, 16, "bits") is None
  _, data = _save(tmp_path, {"dq": node})
  assert "scheme" not in _fields(_manifest(data)[0], "dq")["codes"]["enc"]
  # The generic record holds the codes exactly, but such a node is invalid
  # (a code beyond its group's width): the loader's validation refuses it.
  rec = _fields(_manifest(data)[0], "dq")["codes"]
  start = _HDR.size + _manifest(data)[1]
  off, length, _ = rec["p"]
  got = _codec.decode_flat(rec["enc"], data[start + off:start + off + length],
                           np.dtype(np.uint16), codes.size)
  np.testing.assert_array_equal(got, codes.reshape(-1))
  with pytest.raises(io.CorruptFileError, match="dq: .*does not fit"):
    io._load.loads(data, keep_compressed=True)


def test_decoder_rejects_widths_that_disagree():
  node = _diffq_node((5, 8), 8, [3, 10, 3, 6, 1], seed=3)
  flat = np.asarray(node.codes).reshape(-1)
  rec, payload = _grouped.encode_grouped(flat, node.bits, 8, "bits")
  buf = np.frombuffer(payload, np.uint8)
  ok = _codec.decode_flat(rec, buf, np.dtype(np.uint16), 40, {"bits": node.bits})
  np.testing.assert_array_equal(ok, flat)
  bad_widths = [np.array([3, 10, 3, 6], np.uint8),     # a group missing
                np.array([3, 10, 10, 6, 1], np.uint8),  # class counts differ
                np.array([3, 11, 3, 6, 1], np.uint8),  # a class width differs
                None]                                  # widths not decoded
  for w in bad_widths:
    with pytest.raises(ValueError):
      _codec.decode_flat(rec, buf, np.dtype(np.uint16), 40, {"bits": w})
  with pytest.raises(ValueError):
    _codec.decode_flat(rec, buf[:-1], np.dtype(np.uint16), 40, {"bits": node.bits})
  with pytest.raises(ValueError):
    _codec.decode_flat(rec, buf, np.dtype(np.uint16), 41, {"bits": node.bits})


# ------------------------------------------------------------- robustness


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
  node = _quantized((6, 16), 8, np.array([3, 11, 5, 3, 8, 1, 13, 8, 3, 5, 11, 5],
                                         np.uint8), seed=7)
  tree = {"dq": node, "b": np.arange(3, dtype=np.float32)}
  path, data = _save(tmp_path_factory.mktemp("small"), tree)
  assert _fields(_manifest(data)[0], "dq")["codes"]["enc"]["scheme"] == "grouped"
  return data, io._load.loads(data, keep_compressed=True)


def _identical(a, b):
  _assert_node_equal(a["dq"], b["dq"])
  assert a["b"].tobytes() == b["b"].tobytes()


def test_every_byte_flip_is_detected_or_harmless(small_file):
  data, ref = small_file
  for xor in (0x01, 0x80):
    for i in range(len(data)):
      bad = bytearray(data)
      bad[i] ^= xor
      try:
        out = io._load.loads(bytes(bad), "flip.cx", keep_compressed=True)
      except io.CorruptFileError as e:
        assert "flip.cx" in str(e)
        continue
      _identical(ref, out)


def test_every_truncation_is_detected(small_file):
  data, _ = small_file
  for n in range(len(data)):
    with pytest.raises(io.CorruptFileError, match="cut.cx"):
      io._load.loads(data[:n], "cut.cx")


def _lie(data, edit):
  manifest, mlen = _manifest(data)
  edit(_fields(manifest, "dq"))
  m = zlib.compress(json.dumps(manifest).encode(), 9)
  magic, ver, fl, _, _ = _HDR.unpack_from(data)
  return _HDR.pack(magic, ver, fl, len(m), zlib.crc32(m)) + m + data[_HDR.size + mlen:]


@pytest.mark.parametrize("edit", [
    lambda f: f["codes"]["enc"].update(group_size=4),
    lambda f: f["codes"]["enc"].update(widths="codes"),
    lambda f: f["codes"]["enc"]["classes"].reverse(),
    lambda f: f["codes"]["enc"]["classes"].append(4),
    lambda f: f["codes"]["enc"].update(scheme="other"),
    lambda f: f["codes"]["enc"].pop("scheme"),
])
def test_lying_manifest_is_caught(small_file, edit):
  data, _ = small_file
  with pytest.raises(io.CorruptFileError, match="lie.cx: dq/codes"):
    io._load.loads(_lie(data, edit), "lie.cx")


def test_pruned_diffq_codes_stay_sparse(tmp_path):
  """Inside a mask the codes are stored at kept positions: generic coding."""
  node = _diffq_node((8, 16), 16, [3, 9, 3, 12, 1, 9, 3, 15], seed=4)
  mask = np.random.default_rng(4).random((8, 16)) < 0.3
  tree = {"m": cx.prune.MaskedArray(value=node, mask=mask, shape=(8, 16),
                                    dtype=np.dtype(np.float32))}
  _, data = _save(tmp_path, tree)
  value = dict(_fields(_manifest(data)[0], "m")["value"]["fields"])
  assert value["codes"].get("sparse") and "scheme" not in value["codes"]["enc"]
  back = io._load.loads(data, keep_compressed=True)["m"].value
  np.testing.assert_array_equal(np.asarray(back.codes)[mask], np.asarray(node.codes)[mask])
  np.testing.assert_array_equal(back.bits, node.bits)
  np.testing.assert_array_equal(io._load.loads(data)["m"],
                                np.asarray(tree["m"].materialize()))
