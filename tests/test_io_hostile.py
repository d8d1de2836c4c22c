"""Hostile files (issue 12 items 1-3): memory bombs, concurrent writers and
forged metadata with recomputed checksums."""

import copy
import json
import os
import struct
import threading
import time
import tracemalloc
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import compressax as cx
from compressax import io
from compressax.io import _format
from compressax.io import _load

_HDR = struct.Struct("<8sHHQI")


# --------------------------------------------------------------- forging kit

def _split(data):
  _, version, flags, mlen, _ = _HDR.unpack_from(data)
  stored = data[_HDR.size:_HDR.size + mlen]
  manifest = json.loads(zlib.decompress(stored) if flags & 1 else stored)
  return version, manifest, data[_HDR.size + mlen:]


def _recrc(rec, payloads, tpath=(), salt=""):
  """Recomputes every payload CRC as an honest writer would have."""
  t = rec.get("t") if isinstance(rec, dict) else None
  if t == "dict":
    for k, r in rec["items"]:
      _recrc(r, payloads, tpath + (_format._key_part(k),), salt)
  elif t in ("list", "tuple"):
    for i, r in enumerate(rec["items"]):
      _recrc(r, payloads, tpath + (f"{t[0]}:{i}",), salt)
  elif t == "node":
    salt = salt + json.dumps([rec["class"], rec["meta"]], sort_keys=True)
    for k, r in rec["fields"]:
      _recrc(r, payloads, tpath + ("n:" + k,), salt)
  elif t == "array":
    off, length = rec["p"][:2]
    if isinstance(off, int) and isinstance(length, int) and off >= 0 and length >= 0:
      rec["p"][2] = _format._crc(payloads[off:off + length],
                                 _format._desc(tpath, salt, rec))


def _build(tree, payloads=b"", version=_format.FORMAT_VERSION):
  """A file with a valid header, manifest CRC and payload CRCs."""
  manifest = {"format": "compressax", "version": version,
              "payload_bytes": len(payloads), "tree": tree}
  _recrc(tree, payloads)
  mb = zlib.compress(json.dumps(manifest, separators=(",", ":")).encode(), 9)
  return _HDR.pack(_format.MAGIC, version, 1, len(mb), zlib.crc32(mb)) + mb + payloads


def _forge(data, edit):
  """``data`` with its manifest edited and every checksum recomputed."""
  version, manifest, payloads = _split(data)
  edit(manifest["tree"])
  return _build(manifest["tree"], payloads, version)


def _peak(fn):
  """``(result or exception, peak traced bytes)`` of ``fn()``."""
  tracemalloc.start()
  tracemalloc.reset_peak()
  try:
    out = fn()
  except Exception as e:  # noqa: BLE001
    out = e
  peak = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  return out, peak


def _arr(shape, dtype, enc):
  return {"t": "array", "shape": list(shape), "dtype": dtype, "enc": enc,
          "p": [0, 0, 0]}


# ------------------------------------------------------------ 1. memory bombs

_MB = 1 << 20


def test_constant_int64_bomb(tmp_path):
  """190 bytes that declared a constant int64 array of 2^26 elements (1 GB)."""
  data = _build(_arr([1 << 26], "int64",
                     {"kind": "int", "min": 0, "bits": 0, "raw": 0,
                      "count": 1 << 26}))
  assert len(data) < 200
  out, peak = _peak(lambda: _load.loads(data, "bomb.cx"))
  assert isinstance(out, io.LimitExceededError), out
  assert "<root>: an array of shape [67108864] needs 67,108,864 elements" in str(out)
  assert "max_elements" in str(out)
  assert peak < 4 * _MB, peak
  # A caller who trusts the file can raise the limit.
  small = _build(_arr([3 << 20], "int8", {"kind": "int", "min": 5, "bits": 0,
                                          "raw": 0, "count": 3 << 20}))
  with pytest.raises(io.LimitExceededError):
    _load.loads(small, "ok.cx")
  assert (_load.loads(small, "ok.cx", max_elements=3 << 20) == 5).all()


def test_all_false_mask_bomb():
  """208 bytes that declared an all-false mask of 2^29 elements (+512 MB)."""
  enc = {"kind": "bool", "scheme": "relidx", "index_bits": 1, "raw": 0,
         "coder": "raw", "bits": 1, "count": 0}
  data = _build(_arr([1 << 29], "bool", enc))
  assert len(data) < 220
  out, peak = _peak(lambda: _load.loads(data, "mask.cx"))
  assert isinstance(out, io.LimitExceededError), out
  assert peak < 4 * _MB, peak


def test_huge_relative_index_width_is_refused_before_use(tmp_path):
  """A mask record claiming 2^31-bit relative indices: 2^b alone is 256 MB."""
  io.save(tmp_path / "f.cx", {"f": np.zeros((4, 4), bool)})

  def edit(tree):
    dict(tree["items"])["f"]["enc"]["index_bits"] = 1 << 31

  bad = _forge((tmp_path / "f.cx").read_bytes(), edit)
  out, peak = _peak(lambda: _load.loads(bad, "f.cx"))
  assert isinstance(out, io.CorruptFileError), out
  assert "index_bits must be an integer in [1, 32], got 2147483648" in str(out)
  assert peak < 4 * _MB, peak


def test_lowrank_materialization_bomb():
  """Factors (8192, 0) @ (0, 8192) materialize a 256 MB matrix."""
  empty = {"kind": "float", "raw": 0}
  node = {"t": "node", "class": "compressax.LowRankArray", "version": 1,
          "meta": {"shape": [8192, 8192], "dtype": {"dtype": "float32"},
                   "rank": None},
          "fields": [["u", _arr([8192, 0], "float32", empty)],
                     ["v", _arr([0, 8192], "float32", empty)]]}
  data = _build({"t": "dict", "items": [["w", node]]})
  out, peak = _peak(lambda: _load.loads(data, "lr.cx"))
  assert isinstance(out, io.LimitExceededError), out
  assert "w: materializing the node needs 67,108,864 elements" in str(out)
  assert peak < 4 * _MB, peak
  # Kept compressed, nothing big is allocated: the factors are empty.
  kept = _load.loads(data, "lr.cx", keep_compressed=True)["w"]
  assert kept.u.shape == (8192, 0)


def test_many_records_bomb():
  """4 million ``none`` records in a ~100 KB manifest (+1.1 GB parsed)."""
  tree = {"t": "list", "items": [{"t": "none"}] * 4_000_000}
  data = _build(tree)
  assert len(data) < 200_000
  out, peak = _peak(lambda: _load.loads(data, "many.cx"))
  assert isinstance(out, io.LimitExceededError), out
  assert peak < 16 * _MB, peak
  # With the inflation cap raised, the record count still stops it early.
  out, peak = _peak(lambda: _load.loads(data, "many.cx",
                                          max_manifest_bytes=1 << 27))
  assert isinstance(out, io.LimitExceededError) and "records" in str(out), out
  few = _build({"t": "list", "items": [{"t": "none"}] * 20_000})
  with pytest.raises(io.LimitExceededError, match="more than 16,384 records"):
    _load.loads(few, "few.cx")
  # Records are JSON objects: the 20,000 items, the list and the manifest.
  assert len(_load.loads(few, "few.cx", max_records=20_002)) == 20_000


def test_dev_zero_fails_fast():
  t0 = time.perf_counter()
  with pytest.raises(io.CorruptFileError, match="bad magic"):
    io.load("/dev/zero")
  assert time.perf_counter() - t0 < 1.0


def test_declared_lengths_are_checked_before_reading(tmp_path):
  """A header claiming a 2^60-byte manifest is refused without reading it."""
  path = tmp_path / "h.cx"
  path.write_bytes(_HDR.pack(_format.MAGIC, 3, 1, 1 << 60, 0) + b"x" * 10)
  out, peak = _peak(lambda: io.load(path))
  assert isinstance(out, io.CorruptFileError) and "truncated" in str(out)
  assert peak < _MB


def _fuzz_base():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(6, 5)).astype(np.float32)
  keep = rng.random((6, 5)) < 0.4
  return {
      "q": cx.quantize.quantize(jnp.asarray(w), 3, bucket_size=8),
      "m": cx.prune.MaskedArray(value=np.where(keep, w, 0), mask=keep,
                                shape=(6, 5), dtype=np.dtype(np.float32)),
      "z": np.where(rng.random(64) < 0.9, 0, rng.normal(size=64)).astype(np.float32),
      "i": rng.integers(0, 5, 40).astype(np.int32),
      "lr": cx.lowrank.factorize(jnp.asarray(w), 2),
      "c": np.full(50, 3, np.int64),    # constant: no payload at all
      "f": np.zeros((4, 4), bool),      # all false: no index codes
      "g": _masked_grouped(rng),        # kept codes at their groups' widths
      "pq": cx.quantize.product(jnp.asarray(w[:, :4]), subvectors=2, bits=1,
                                key=jax.random.key(0), iters=2),
      "nm": _two_four(rng, (64, 32)),   # a 2:4 mask: the bitgroups scheme
  }


def _two_four(rng, shape):
  """A 2:4 mask along axis 0 (a Dense kernel's inputs), random per group."""
  rows, cols = shape
  pick = np.argsort(rng.random((rows // 4, 4, cols)), axis=1) < 2
  return pick.reshape(rows, cols)


def _masked_grouped(rng):
  """A ``MaskedArray`` over a ``DiffQArray`` (AJPQ's node): grouped codes under a mask."""
  w = jnp.asarray(rng.normal(size=(32, 16)).astype(np.float32))
  logits = {"w": jnp.asarray(4 * rng.normal(size=64).astype(np.float32))}
  node = cx.diffq.quantize({"w": w}, logits, group_size=8, b_min=1, b_max=8)["w"]
  keep = np.repeat(rng.random(64) < 0.6, 8).reshape(32, 16)
  return cx.prune.MaskedArray(node, keep, (32, 16), np.dtype(np.float32))


_NASTY = [0, 1, -1, 7, 255, 1 << 20, 1 << 26, 1 << 31, 1 << 40, 1 << 62, 2 ** 70,
          [], [1 << 26], [1 << 29], [8192, 8192], [1 << 16, 1 << 16], [0, 1 << 40],
          None, "x", 2.5, True, {}, [[]]]
# Where sizes are declared: the mutator aims there half the time.
_SIZES = {"shape", "count", "bits", "nnz", "mask_bytes", "index_bits", "p",
          "group_size", "bucket_size", "rank", "alphabet", "raw", "group_bits"}


def _slots(obj, path=()):
  """Every (container, key) in a JSON tree, for the mutator."""
  if isinstance(obj, dict):
    for k, v in obj.items():
      yield obj, k
      yield from _slots(v, path + (k,))
  elif isinstance(obj, list):
    for i, v in enumerate(obj):
      yield obj, i
      yield from _slots(v, path + (i,))


@pytest.mark.parametrize("keep", [False, True])
def test_mutated_manifests_never_allocate_much(tmp_path, keep):
  """No forged manifest (checksums recomputed) makes a load allocate more
  than a fixed multiple of the file's size, beyond the documented floor."""
  io.save(tmp_path / "f.cx", _fuzz_base())
  data = (tmp_path / "f.cx").read_bytes()
  _, manifest, payloads = _split(data)
  budget = max(_load.MIN_ELEMENTS, _load.ELEMENTS_PER_BYTE * len(data))
  bound = 48 * budget + 8 * _MB  # bytes per element at the peak, plus slack
  rng = np.random.default_rng(1 + keep)
  worst = 0
  for _ in range(400):
    tree = copy.deepcopy(manifest["tree"])
    for _ in range(rng.integers(1, 4)):
      slots = list(_slots(tree))
      sized = [(o, k) for o, k in slots if k in _SIZES]
      pool = sized if sized and rng.random() < 0.5 else slots
      obj, k = pool[rng.integers(len(pool))]
      obj[k] = copy.deepcopy(_NASTY[rng.integers(len(_NASTY))])
    try:
      bad = _build(tree, payloads)
    except Exception:  # noqa: BLE001  the mutation broke the forger itself
      continue
    out, peak = _peak(lambda: _load.loads(bad, "fuzz.cx", keep_compressed=keep))
    assert out is not None
    if isinstance(out, Exception):
      assert isinstance(out, io.CorruptFileError), repr(out)
    worst = max(worst, peak)
    assert peak <= bound, (peak, bound)
  assert worst < bound


# ------------------------------------------------------- 2. concurrent saves

def test_concurrent_writers_leave_one_whole_tree(tmp_path):
  """Two threads on one path corrupted it in 4 of 10 trials (fixed .tmp name)."""
  path = tmp_path / "c.cx"
  trees = [{"w": np.full((300 + 97 * i, 64), i, np.float32) + np.arange(64, dtype=np.float32),
            "i": np.arange(i + 1)} for i in range(6)]
  for trial in range(6):
    errors = []

    def work(t):
      try:
        for _ in range(3):
          io.save(path, t)
      except Exception as e:  # noqa: BLE001
        errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in trees]
    for th in threads:
      th.start()
    for th in threads:
      th.join()
    assert not errors, errors
    back = io.load(path)
    assert any(back["i"].shape == t["i"].shape and
               back["w"].tobytes() == t["w"].tobytes() for t in trees), trial
    assert os.listdir(tmp_path) == ["c.cx"], os.listdir(tmp_path)


def test_failed_write_leaves_no_temp_and_the_old_file(tmp_path, monkeypatch):
  path = tmp_path / "f.cx"
  io.save(path, {"a": np.arange(4.0)})
  os.chmod(path, 0o640)

  def boom(fd):
    raise OSError("disk full")
  monkeypatch.setattr(os, "fsync", boom)
  with pytest.raises(OSError, match="disk full"):
    io.save(path, {"b": np.arange(1000.0)})
  monkeypatch.undo()
  assert os.listdir(tmp_path) == ["f.cx"]
  assert list(io.load(path)) == ["a"]
  io.save(path, {"c": np.arange(3.0)})  # an existing file keeps its mode
  assert os.stat(path).st_mode & 0o777 == 0o640


# -------------------------------------------------------- 3. forged metadata

def _node_tree():
  rng = np.random.default_rng(5)
  w = rng.normal(size=(12, 10)).astype(np.float32)
  keep = rng.random((12, 10)) < 0.5
  dq = cx.diffq.quantize({"k": jnp.asarray(w)}, {"k": jnp.zeros(8)},
                         group_size=16)["k"]
  return {"q": cx.quantize.quantize(jnp.asarray(w), 4, bucket_size=16),
          "m": cx.prune.MaskedArray(value=np.where(keep, w, 0), mask=keep,
                                    shape=(12, 10), dtype=np.dtype(np.float32)),
          "lr": cx.lowrank.factorize(jnp.asarray(w), 3),
          "cb": cx.quantize.weight_share(jnp.asarray(w), 4),
          "pt": cx.quantize.quantize_points(
              jnp.asarray(w), jnp.linspace(0.0, 1.0, 4, dtype=jnp.float32)),
          "dq": dq,
          "pq": cx.quantize.product(jnp.asarray(w), subvectors=5, bits=2,
                                    key=jax.random.key(0), iters=2)}


def _meta(key, **kw):
  def edit(tree):
    dict(tree["items"])[key]["meta"].update(kw)
  return edit


@pytest.mark.parametrize("edit, match", [
    (_meta("q", shape=[10, 12]), r"q: ValueError: codes must be unsigned ints of shape \(10, 12\)"),
    (_meta("q", bits=99), r"q: ValueError: bits must be an int in \[1, 16\], got 99"),
    (_meta("q", bits=0), r"q: ValueError: bits must be an int in \[1, 16\], got 0"),
    (_meta("q", bits=2), r"q: ValueError: a code does not fit in 2 bits"),
    (_meta("q", bucket_size=7), r"q: ValueError: scale must be floats of shape"),
    (_meta("m", shape=[10, 12]), r"m: ValueError: mask must be bool of shape \(10, 12\)"),
    (_meta("lr", shape=[10, 12]), r"lr: ValueError: factors \(12, 3\) @ \(3, 10\) do not"),
    (_meta("lr", rank=9), r"lr: ValueError: rank must be None or an int in \[0, 3\]"),
    (_meta("cb", shape=[120]), r"cb: ValueError: codes must be ints of shape \(120,\)"),
    (_meta("pt", bucket_size=16), r"pt: ValueError: alpha must be floats of shape \(8,\)"),
    (_meta("dq", group_size=8), r"dq: ValueError: bits must be ints of shape \(15,\)"),
    (_meta("dq", shape=[120]), r"dq: ValueError: codes must be unsigned ints of shape"),
    (_meta("pq", shape=[12, 15]), r"pq: ValueError: codebooks must be floats of shape \(m, 4, 15"),
    (_meta("pq", shape=[11, 10]), r"pq: ValueError: codes must be unsigned ints of shape \(11, 5\)"),
    (_meta("pq", bits=1), r"pq: ValueError: codebooks must be floats of shape \(m, 2, 10"),
    (_meta("pq", bits=0), r"pq: ValueError: bits must be an int in \[1, 16\], got 0"),
    (_meta("pq", shape=[120]), r"pq: ValueError: shape must be 2-D"),
])
@pytest.mark.parametrize("keep", [True, False])
def test_forged_metadata_is_refused(tmp_path, edit, match, keep):
  io.save(tmp_path / "n.cx", _node_tree())
  bad = _forge((tmp_path / "n.cx").read_bytes(), edit)
  with pytest.raises(io.CorruptFileError, match="n.cx: " + match):
    _load.loads(bad, str(tmp_path / "n.cx"), keep_compressed=keep)


def test_honest_files_pass_validation(tmp_path):
  tree = _node_tree()
  io.save(tmp_path / "n.cx", tree)
  back = io.load(tmp_path / "n.cx", keep_compressed=True)
  for k, node in tree.items():
    np.testing.assert_array_equal(back[k].materialize(), node.materialize())
  # The forger itself is faithful: an unedited round trip still loads.
  again = _forge((tmp_path / "n.cx").read_bytes(), lambda t: None)
  _load.loads(again, "again.cx")


@pytest.mark.parametrize("edit", [{"group_size": 5}, {"group_size": "x"},
                                  {"widths": "nope"}, {"widths": None}])
def test_forged_grouped_codes_under_a_mask_are_corrupt(tmp_path, edit):
  """The kept codes of a masked grouped node: a group size that does not fit
  the node, or a widths field that is not there, is a CorruptFileError."""
  io.save(tmp_path / "g.cx", {"g": _masked_grouped(np.random.default_rng(0))})

  def forge(tree):
    value = dict(tree["items"][0][1]["fields"])["value"]
    enc = dict(value["fields"])["codes"]["enc"]
    assert enc["scheme"] == "grouped"
    enc.update(edit)

  bad = _forge((tmp_path / "g.cx").read_bytes(), forge)
  with pytest.raises(io.CorruptFileError, match="codes"):
    _load.loads(bad, "g.cx")


def _bitgroups_file(tmp_path):
  io.save(tmp_path / "b.cx", {"m": _two_four(np.random.default_rng(0), (64, 32))})
  data = (tmp_path / "b.cx").read_bytes()
  enc = dict(_split(data)[1]["tree"]["items"])["m"]["enc"]
  assert enc["scheme"] == "bitgroups" and enc["group_bits"] == 4, enc
  return data


def test_fuzz_base_holds_a_bitgroups_mask(tmp_path):
  io.save(tmp_path / "f.cx", _fuzz_base())
  rec = dict(_split((tmp_path / "f.cx").read_bytes())[1]["tree"]["items"])["nm"]
  assert rec["enc"]["scheme"] == "bitgroups"


@pytest.mark.parametrize("edit, match", [
    ({"group_bits": 3}, "group_bits must be one of (2, 4, 8), got 3"),
    ({"group_bits": 16}, "group_bits must be one of (2, 4, 8), got 16"),
    ({"group_bits": 1 << 40}, "group_bits must be one of (2, 4, 8), got 1099511627776"),
    ({"group_bits": "4"}, "group_bits must be one of (2, 4, 8), got '4'"),
    ({"group_bits": True}, "group_bits must be one of (2, 4, 8), got True"),
    ({"group_bits": None}, "group_bits must be one of (2, 4, 8), got None"),
    ({"group_bits": 8}, "needs 256 symbols of 8 bits, the record says 512 of 4"),
    ({"count": 511}, "needs 512 symbols of 4 bits, the record says 511 of 4"),
    ({"count": 1 << 40}, "needs 512 symbols of 4 bits, the record says 1099511627776"),
    ({"bits": 8}, "needs 512 symbols of 4 bits, the record says 512 of 8"),
    ({"count": 512.0}, "needs 512 symbols of 4 bits, the record says 512.0 of 4"),
    ({"bits": True}, "needs 512 symbols of 4 bits, the record says 512 of True"),
])
def test_forged_bitgroups_records_are_corrupt(tmp_path, edit, match):
  """A forged group width or symbol count is refused before decoding."""
  def forge(tree):
    dict(tree["items"])["m"]["enc"].update(edit)

  bad = _forge(_bitgroups_file(tmp_path), forge)
  out, peak = _peak(lambda: _load.loads(bad, "b.cx"))
  assert isinstance(out, io.CorruptFileError), out
  assert str(out).startswith("b.cx: m: ValueError: ") and match in str(out), str(out)
  assert peak < 4 * _MB, peak


@pytest.mark.parametrize("n, g, symbols, match", [
    # 6 positions in groups of 4: bits 2 and 3 of the last symbol are padding.
    (6, 4, [0b0011, 0b0101], "the last bit group has nonzero padding bits"),
    (6, 4, [0b0011, 0b1000], "the last bit group has nonzero padding bits"),
    (5, 2, [0b11, 0b01, 0b10], "the last bit group has nonzero padding bits"),
    # 8-bit symbols (up to 255) under group_bits=4, the record's bits forged too.
    (8, 4, [0x21, 0x03], "a bitgroups mask of 8 positions needs 2 symbols of 4 bits, the record says 2 of 8"),
])
def test_forged_bitgroups_payloads_are_corrupt(n, g, symbols, match):
  """Symbols the honest writer never makes: padding bits set, or too wide."""
  sym = np.array(symbols, np.uint8)
  bits = g if int(sym.max()) < (1 << g) else 8
  rec, payload = io.encode_symbols(sym, bits)
  enc = dict(kind="bool", scheme="bitgroups", group_bits=g,
             raw=io.packed_nbytes(sym.size, bits), **rec)
  bad = _build({"t": "dict", "items": [["m", {
      "t": "array", "shape": [n], "dtype": "bool", "enc": enc,
      "p": [0, len(payload), 0]}]]}, payload)
  with pytest.raises(io.CorruptFileError, match="b.cx: m: ValueError: " + match):
    _load.loads(bad, "b.cx")
  # The same symbols with the padding cleared and the right width load.
  if "padding" in match:
    ok = sym.copy()
    ok[-1] &= np.uint8((1 << (n - (sym.size - 1) * g)) - 1)
    rec, payload = io.encode_symbols(ok, g)
    enc = dict(kind="bool", scheme="bitgroups", group_bits=g, raw=0, **rec)
    good = _build({"t": "dict", "items": [["m", {
        "t": "array", "shape": [n], "dtype": "bool", "enc": enc,
        "p": [0, len(payload), 0]}]]}, payload)
    want = ((np.repeat(ok, g) >> np.tile(np.arange(g, dtype=np.uint8), ok.size)) & 1)
    np.testing.assert_array_equal(_load.loads(good, "b.cx")["m"], want[:n].astype(bool))
