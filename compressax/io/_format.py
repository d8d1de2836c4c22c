"""The compressax file: a pytree of dense arrays and compressed nodes, no pickle.

Layout (all integers little-endian)::

  offset 0   magic         8 bytes  b"\\x89CXAX\\r\\n\\x1a"
         8   version       u16      FORMAT_VERSION (2)
        10   flags         u16      bit 0: FLAG_ZLIB_MANIFEST; others 0
        12   manifest_len  u64      stored manifest bytes
        20   manifest_crc  u32      zlib.crc32 of the stored manifest bytes
        24   manifest      UTF-8 JSON, zlib-compressed (level 9) if bit 0
             payloads      concatenated; the file ends exactly after them

Version 2 writers always set bit 0 (the JSON shrinks ~4x); readers also take
a plain JSON manifest (bit 0 clear), and version 1 files (flags 0, plain
manifest, no ``perm``: pre-release, read as before). The CRC covers the stored
bytes, so a corrupted compressed manifest is caught before it is inflated, and
inflating stops at ``max(64 MiB, 64 x stored size)`` (decompression bombs).

The manifest holds ``format``, ``version``, ``payload_bytes`` and ``tree``:
the pytree as nested records. ``{"t": "dict", "items": [[key, rec], ...]}``
(string or int keys), ``"list"`` and ``"tuple"`` with ``items``, ``"none"``,
``{"t": "array", "shape", "dtype", "enc", "p"}`` and
``{"t": "node", "class", "meta", "fields": [[name, rec], ...], "kept"}`` for a
compressed node (any class registered with :func:`compressax.compressed_leaf`;
its ``data()`` fields are records, its ``meta()`` is JSON with dtypes as
``{"dtype": name}`` and tuples as lists). ``enc`` is the array encoding (see
``_codec``) and ``p = [offset, length, crc]`` locates the payload inside the
payload area. A 2-D+ bool array may carry ``"perm"``, an axis permutation: its
data is stored flattened after ``np.transpose(x, perm)``. The writer offers
C order, reversed axes (column-major) and, for 3-D+, each axis scanned
fastest, and keeps the order whose coded mask is smallest. The payload CRC is ``zlib.crc32(payload, zlib.crc32(desc))``
where ``desc`` is the canonical JSON of the leaf's typed path, enclosing node
classes and metas, and its record (without ``p``): a manifest that lies about
a shape, dtype, encoding, key or offset fails that check.

**Sparse-aware nodes.** In a node with a bool ``mask`` field of rank >= 1,
every other array of exactly the mask's shape (recursively inside nested
nodes, e.g. the codes of a ``CodebookArray`` inside a ``MaskedArray``) is
stored only at the kept positions and restored with zeros elsewhere (marked
``"sparse": true``), in the scan order (``perm``) of the node's mask record,
so values and positions pair up however the mask was scanned. The node
materializes to the same dense array because its
pruned positions are masked out; with ``keep_compressed=True`` the restored
node holds zeros there instead of the original (irrelevant) values.

**Grouped codes.** A node's integer field with a bit width per group of
elements (a ``_cx_groups`` hook, or ``codes`` + ``bits`` + a ``group_size``
meta as in :class:`compressax.diffq.DiffQArray`; see ``_grouped``) may be
stored width class by width class (``enc["scheme"] == "grouped"``, naming the
widths field). The widths field is then written, and read, before the codes.

Trees: dicts with string keys (incl. Flax ``FrozenDict``, loaded as ``dict``),
lists, tuples (``NamedTuple``\\s load as plain tuples), ``None``, arrays and
Python scalars (loaded as 0-d arrays). An ``nnx.State`` is saved as
``state.to_pure_dict()``; restore it with
``nnx.replace_by_pure_dict(state, cx.io.load(path))``.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from compressax._node import CompressedLeaf, leaf_type
from compressax.io._codec import decode_flat, encode_flat, encode_mask, kind_of
from compressax.io._grouped import group_spec

__all__ = ["save", "load", "CorruptFileError", "FORMAT_VERSION", "MAGIC",
           "FLAG_ZLIB_MANIFEST"]

MAGIC = b"\x89CXAX\r\n\x1a"
FORMAT_VERSION = 2
FLAG_ZLIB_MANIFEST = 1
_HEADER = struct.Struct("<8sHHQI")
# A zlib manifest may inflate to at most this (or 64x its stored size, if
# larger): a small file cannot make the reader allocate gigabytes.
_MANIFEST_CAP = 64 << 20


class CorruptFileError(ValueError):
  """A compressax file is truncated, corrupted, lying or of a newer version."""


def _valid_key(k) -> bool:
  # Ints too: an nnx.State of an nnx.List / nnx.Sequential has integer keys.
  return isinstance(k, str) or (isinstance(k, int) and not isinstance(k, bool))


def _key_part(k) -> str:
  """A typed path element, so that keys 0 and "0" get different checksums."""
  return ("d:" if isinstance(k, str) else "k:") + str(k)


def _show(tpath) -> str:
  return "/".join(p.split(":", 1)[1] for p in tpath) or "<root>"


def _desc(tpath, salt: str, rec: dict) -> bytes:
  body = {k: v for k, v in rec.items() if k != "p"}
  return json.dumps(["/".join(tpath), salt, body], sort_keys=True,
                    separators=(",", ":")).encode()


def _crc(payload, desc: bytes) -> int:
  return zlib.crc32(payload, zlib.crc32(desc))


def _meta_json(v, where: str):
  if isinstance(v, np.dtype) or isinstance(v, type):
    try:
      return {"dtype": np.dtype(v).name}
    except TypeError:
      pass
  if v is None or isinstance(v, (bool, int, float, str)):
    return v
  if isinstance(v, np.generic):
    return v.item()
  if isinstance(v, (tuple, list)):
    return [_meta_json(x, where) for x in v]
  raise TypeError(f"{where}: node meta value {v!r} is not JSON-able "
                  "(ints, floats, strings, bools, tuples, dtypes)")


def _meta_py(v):
  if isinstance(v, dict):
    return jnp.dtype(v["dtype"])
  if isinstance(v, list):
    return tuple(_meta_py(x) for x in v)
  return v


class _Encoder:
  """Walks a pytree, building the manifest tree and the payload list."""

  def __init__(self):
    self.chunks: list[bytes] = []
    self.offset = 0

  def tree(self, obj, tpath, salt: str, ctx) -> dict:
    if isinstance(obj, CompressedLeaf):
      return self.node(obj, tpath, salt, ctx)
    if hasattr(obj, "to_pure_dict"):  # nnx.State
      from flax import nnx
      obj = nnx.to_pure_dict(obj)
    if isinstance(obj, Mapping):
      items = []
      for k, v in obj.items():
        if not _valid_key(k):
          raise TypeError(f"{_show(tpath)}: dict keys must be strings or ints "
                          f"to be saved, got {k!r}")
        items.append([k, self.tree(v, tpath + (_key_part(k),), salt, ctx)])
      return {"t": "dict", "items": items}
    if isinstance(obj, (list, tuple)):
      t = "list" if isinstance(obj, list) else "tuple"
      return {"t": t, "items": [self.tree(v, tpath + (f"{t[0]}:{i}",), salt, ctx)
                                for i, v in enumerate(obj)]}
    if obj is None:
      return {"t": "none"}
    return self.array(obj, tpath, salt, ctx)

  def array(self, obj, tpath, salt, ctx, groups=None) -> dict:
    arr = np.asarray(obj)
    try:
      kind_of(arr.dtype)
    except TypeError as e:
      raise TypeError(f"{_show(tpath)}: {e}") from None
    if not arr.dtype.isnative:
      arr = arr.astype(arr.dtype.newbyteorder("="))
    sparse = ctx is not None and arr.shape == ctx[0].shape
    if sparse:  # the context's scan order, at its kept positions only
      perm = ctx[1]
      enc, payload = encode_flat(_scan(arr, perm)[ctx[2]])
    elif arr.dtype == bool and arr.ndim >= 2:
      perms = _scan_orders(arr.ndim)
      k, enc, payload = encode_mask([_scan(arr, p) for p in perms])
      perm = perms[k]
    else:
      perm = tuple(range(arr.ndim))
      enc, payload = encode_flat(_scan(arr, perm),
                                 groups if kind_of(arr.dtype) == "int" else None)
    rec = {"t": "array", "shape": list(arr.shape), "dtype": arr.dtype.name,
           "enc": enc}
    if sparse:
      rec["sparse"] = True
    if perm != tuple(range(arr.ndim)):
      rec["perm"] = list(perm)
    rec["p"] = [self.offset, len(payload), _crc(payload, _desc(tpath, salt, rec))]
    self.chunks.append(payload)
    self.offset += len(payload)
    return rec

  def node(self, node, tpath, salt, ctx) -> dict:
    name = type(node).__name__
    try:
      registered = leaf_type(name)
    except ValueError:
      registered = None
    if registered is not type(node):
      raise TypeError(f"{_show(tpath)}: {name} is not registered with "
                      "compressax.compressed_leaf")
    meta = {k: _meta_json(v, _show(tpath)) for k, v in node.meta().items()}
    salt = salt + json.dumps([name, meta], sort_keys=True)
    data = node.data()
    rec = {"t": "node", "class": name, "meta": meta, "fields": []}
    mask = data.get("mask")
    if mask is not None and not isinstance(mask, CompressedLeaf) \
        and np.asarray(mask).dtype == bool:
      rec["fields"].append(["mask", self.tree(mask, tpath + ("n:mask",), salt, ctx)])
      m = np.asarray(mask)
      restored = m & ctx[0] if ctx is not None and ctx[0].shape == m.shape else m
      if m.ndim >= 1:
        rec["kept"] = int(restored.sum())
        # The node's arrays follow the scan order its mask was stored in.
        perm = tuple(rec["fields"][-1][1].get("perm", range(m.ndim)))
        ctx = (restored, perm, _scan(restored, perm))
      else:  # a 0-d mask broadcasts: all or nothing kept
        rec["kept"] = node.size if bool(m) else 0
    # Per-group widths are written before the codes they lay out, so the
    # reader has them when it meets the codes (see ``_grouped``).
    spec = {k: s for k, s in group_spec(node).items()
            if isinstance(s, tuple) and len(s) == 2 and s[1] in data and s[1] != k
            and k in data and _is_array(data[k]) and _is_array(data[s[1]])
            and isinstance(s[0], (int, np.integer)) and not isinstance(s[0], bool)}
    widths = {s[1] for s in spec.values()}
    order = sorted(data, key=lambda k: k not in widths)
    for k in order:
      if k == "mask" and "kept" in rec:
        continue
      v, sub = data[k], tpath + ("n:" + k,)
      if k in spec:
        rec["fields"].append([k, self.array(
            v, sub, salt, ctx, (np.asarray(data[spec[k][1]]), int(spec[k][0]),
                                spec[k][1]))])
      else:
        rec["fields"].append([k, self.tree(v, sub, salt, ctx)])
    return rec


def _is_array(v) -> bool:
  """An array leaf (not a nested node, ``None`` or a container)."""
  return not isinstance(v, CompressedLeaf) and hasattr(v, "shape") \
      and hasattr(v, "dtype")


def _encode(tree) -> list[bytes]:
  """The file's bytes as a list of pieces (header, manifest, payloads...)."""
  enc = _Encoder()
  root = enc.tree(tree, (), "", None)
  manifest = {"format": "compressax", "version": FORMAT_VERSION,
              "payload_bytes": enc.offset, "tree": root}
  mbytes = zlib.compress(json.dumps(manifest, separators=(",", ":")).encode(), 9)
  header = _HEADER.pack(MAGIC, FORMAT_VERSION, FLAG_ZLIB_MANIFEST, len(mbytes),
                        zlib.crc32(mbytes))
  return [header, mbytes] + enc.chunks


def save(path, tree) -> int:
  """Writes ``tree`` to ``path`` in the compressax format.

  Dense float arrays are stored raw (little-endian), integer arrays as codes
  at their minimal bit width through the best of bit packing / Huffman / ANS,
  bool arrays as relative indices or a bitmap (index width and scan order
  chosen by entropy-coded size), and compressed nodes field by field, under a
  zlib-compressed JSON manifest (see the module docstring). The file is written to ``path + ".tmp"``
  and renamed, so a crash never leaves a half-written ``path``.

  Args:
    path: the file to write.
    tree: a pytree of arrays and compressed nodes (module docstring).

  Returns:
    The file size in bytes.

  Raises:
    TypeError: naming the leaf, for an unsupported leaf, key or meta value.

  Example:
    >>> cx.io.save("model.cx", params)  # doctest: +SKIP
    >>> params = cx.io.load("model.cx")  # doctest: +SKIP

  References:
    Han, Mao, Dally. Deep Compression. ICLR 2016.
    https://arxiv.org/abs/1510.00149
  """
  pieces = _encode(tree)
  path = os.fspath(path)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    for piece in pieces:
      f.write(piece)
  os.replace(tmp, path)
  return sum(len(p) for p in pieces)


def parse(data: bytes, name: str) -> tuple[dict, memoryview]:
  """Checks the header and manifest of a file's bytes; ``(manifest, payloads)``."""
  if len(data) < _HEADER.size:
    raise CorruptFileError(f"{name}: truncated: {len(data)} bytes is shorter "
                           "than the header")
  magic, version, flags, mlen, mcrc = _HEADER.unpack_from(data)
  if magic != MAGIC:
    raise CorruptFileError(f"{name}: not a compressax file (bad magic bytes)")
  if version > FORMAT_VERSION:
    raise CorruptFileError(f"{name}: format version {version} is newer than "
                           f"this compressax reads ({FORMAT_VERSION}); upgrade")
  if version < 1 or flags & ~FLAG_ZLIB_MANIFEST or (version == 1 and flags):
    raise CorruptFileError(f"{name}: bad header (version {version}, flags {flags})")
  if _HEADER.size + mlen > len(data):
    raise CorruptFileError(f"{name}: truncated inside the manifest")
  mbytes = bytes(data[_HEADER.size:_HEADER.size + mlen])
  if zlib.crc32(mbytes) != mcrc:
    raise CorruptFileError(f"{name}: manifest checksum mismatch")
  if flags & FLAG_ZLIB_MANIFEST:
    mbytes = _inflate(mbytes, max(_MANIFEST_CAP, 64 * mlen), name)
  try:
    manifest = json.loads(mbytes)
    total = manifest["payload_bytes"]
    ok = manifest["format"] == "compressax" and manifest["version"] == version \
        and isinstance(total, int) and "tree" in manifest
  except Exception as e:  # noqa: BLE001  any malformed manifest is corrupt
    raise CorruptFileError(f"{name}: unreadable manifest ({e})") from None
  if not ok:
    raise CorruptFileError(f"{name}: malformed manifest")
  start = _HEADER.size + mlen
  if start + total != len(data):
    raise CorruptFileError(f"{name}: file has {len(data)} bytes, the manifest "
                           f"says {start + total} (truncated or padded)")
  return manifest, memoryview(data)[start:]


def _inflate(zbytes: bytes, cap: int, name: str) -> bytes:
  """zlib-decompresses a manifest, refusing more than ``cap`` bytes."""
  try:
    d = zlib.decompressobj()
    out = d.decompress(zbytes, cap)
    if d.unconsumed_tail:
      raise CorruptFileError(f"{name}: manifest inflates to more than {cap} "
                             "bytes (a decompression bomb?)")
    if not d.eof or d.unused_data:
      raise CorruptFileError(f"{name}: compressed manifest is truncated or "
                             "followed by junk")
  except zlib.error as e:
    raise CorruptFileError(f"{name}: compressed manifest does not inflate "
                           f"({e})") from None
  return out


def _scan_orders(ndim: int) -> list[tuple]:
  """Scan orders offered for a mask: C, reversed axes, each axis fastest."""
  axes = tuple(range(ndim))
  out = [axes, axes[::-1]]
  for a in axes:  # e.g. a conv kernel's input-channel axis, scanned fastest
    p = tuple(x for x in axes if x != a) + (a,)
    if p not in out:
      out.append(p)
  return out


def _scan(arr: np.ndarray, perm) -> np.ndarray:
  """``arr`` flattened in the scan order ``perm`` (an axis permutation)."""
  return np.ascontiguousarray(np.transpose(arr, perm)).reshape(-1)


def _perm(rec, ndim: int) -> tuple:
  perm = tuple(rec.get("perm", range(ndim)))
  if sorted(perm) != list(range(ndim)) or \
      not all(type(p) is int for p in perm):  # noqa: E721  JSON ints only
    raise ValueError(f"bad scan order {rec.get('perm')!r}")
  return perm


class _Decoder:
  """Rebuilds the pytree from the manifest tree, verifying every payload."""

  def __init__(self, name: str, payloads: memoryview, keep_compressed: bool):
    self.name, self.buf, self.keep = name, payloads, keep_compressed

  def fail(self, tpath, msg):
    raise CorruptFileError(f"{self.name}: {_show(tpath)}: {msg}")

  def tree(self, rec, tpath, salt, ctx, in_node=False, siblings=None):
    try:
      t = rec["t"]
      if t == "dict":
        out = {}
        for k, r in rec["items"]:
          if not _valid_key(k) or k in out:
            self.fail(tpath, f"bad dict key {k!r}")
          out[k] = self.tree(r, tpath + (_key_part(k),), salt, ctx, in_node)
        return out
      if t in ("list", "tuple"):
        out = [self.tree(r, tpath + (f"{t[0]}:{i}",), salt, ctx, in_node)
               for i, r in enumerate(rec["items"])]
        return out if t == "list" else tuple(out)
      if t == "none":
        return None
      if t == "array":
        return self.array(rec, tpath, salt, ctx, siblings)
      if t == "node":
        node = self.node(rec, tpath, salt, ctx)
        if in_node or self.keep:
          return node
        return np.asarray(node.materialize())
      self.fail(tpath, f"unknown record type {t!r}")
    except CorruptFileError:
      raise
    except Exception as e:  # noqa: BLE001  a lying manifest must not leak garbage
      self.fail(tpath, f"{type(e).__name__}: {e}")

  def array(self, rec, tpath, salt, ctx, siblings=None) -> np.ndarray:
    shape = tuple(rec["shape"])
    if not all(isinstance(d, int) and d >= 0 for d in shape):
      self.fail(tpath, f"bad shape {rec['shape']!r}")
    dtype = jnp.dtype(rec["dtype"])
    off, length, crc = rec["p"]
    if not (isinstance(off, int) and isinstance(length, int) and off >= 0
            and length >= 0 and off + length <= len(self.buf)):
      self.fail(tpath, f"payload [{off}, +{length}) is outside the file")
    payload = self.buf[off:off + length]
    if _crc(payload, _desc(tpath, salt, rec)) != crc:
      self.fail(tpath, "payload checksum mismatch (corrupted data or manifest)")
    n = int(np.prod(shape, dtype=np.int64))
    perm = _perm(rec, len(shape))
    if rec.get("sparse"):
      if ctx is None or ctx.shape != shape:
        self.fail(tpath, "sparse array without a matching mask")
      sel = _scan(ctx, perm)
      flat = decode_flat(rec["enc"], payload, dtype, int(sel.sum()))
      out = np.zeros(n, dtype)
      out[sel] = flat
    else:
      out = decode_flat(rec["enc"], payload, dtype, n, siblings)
    # Undo the scan order: the flat data is the array transposed by `perm`.
    out = out.reshape(tuple(shape[p] for p in perm))
    inverse = tuple(sorted(range(len(perm)), key=perm.__getitem__))
    return np.transpose(out, inverse).copy(order="C")

  def node(self, rec, tpath, salt, ctx):
    cls = leaf_type(rec["class"])
    meta = {k: _meta_py(v) for k, v in rec["meta"].items()}
    salt = salt + json.dumps([rec["class"], rec["meta"]], sort_keys=True)
    fields = dict(rec["fields"])
    data = {}
    if "kept" in rec:  # the mask was written first; its restored form is the context
      m = self.tree(fields["mask"], tpath + ("n:mask",), salt, ctx, True)
      data["mask"] = m
      if m.ndim >= 1:
        ctx = m
    for k, r in rec["fields"]:
      if k not in data:
        data[k] = self.tree(r, tpath + ("n:" + k,), salt, ctx, True, data)
    return cls(**data, **meta)


def load(path, *, keep_compressed: bool = False) -> Any:
  """Reads a file written by :func:`save`.

  Args:
    path: the file.
    keep_compressed: if True, compressed nodes are returned as nodes (with
      NumPy arrays in their data fields) instead of dense arrays.

  Returns:
    The pytree (dicts, lists, tuples) with NumPy arrays of the original dtypes
    and shapes, bit-identical to what was saved on any machine (pruned
    positions of sparse-aware nodes aside, see the module docstring).

  Raises:
    CorruptFileError: (a ``ValueError``) naming the file and the leaf, for a
      truncated or corrupted file, a wrong magic, a newer format version or a
      manifest that disagrees with its payloads.

  References:
    Han, Mao, Dally. Deep Compression. ICLR 2016.
    https://arxiv.org/abs/1510.00149
  """
  name = os.fspath(path)
  with open(name, "rb") as f:
    data = f.read()
  return loads(data, name, keep_compressed=keep_compressed)


def loads(data: bytes, name: str = "<bytes>", *, keep_compressed: bool = False):
  """:func:`load` from the file's bytes; ``name`` is used in errors."""
  manifest, payloads = parse(data, name)
  return _Decoder(name, payloads, keep_compressed).tree(manifest["tree"], (), "", None)
