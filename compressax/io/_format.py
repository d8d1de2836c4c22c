"""The compressax file: a pytree of dense arrays and compressed nodes, no pickle.

Layout (all integers little-endian)::

  offset 0   magic         8 bytes  b"\\x89CXAX\\r\\n\\x1a"
         8   version       u16      FORMAT_VERSION
        10   flags         u16      0
        12   manifest_len  u64
        20   manifest_crc  u32      zlib.crc32 of the manifest bytes
        24   manifest      UTF-8 JSON, manifest_len bytes
             payloads      concatenated; the file ends exactly after them

The manifest holds ``format``, ``version``, ``payload_bytes`` and ``tree``:
the pytree as nested records. ``{"t": "dict", "items": [[key, rec], ...]}``
(string keys), ``"list"`` and ``"tuple"`` with ``items``, ``"none"``,
``{"t": "array", "shape", "dtype", "enc", "p"}`` and
``{"t": "node", "class", "meta", "fields": [[name, rec], ...], "kept"}`` for a
compressed node (any class registered with :func:`compressax.compressed_leaf`;
its ``data()`` fields are records, its ``meta()`` is JSON with dtypes as
``{"dtype": name}`` and tuples as lists). ``enc`` is the array encoding (see
``_codec``) and ``p = [offset, length, crc]`` locates the payload inside the
payload area. The payload CRC is ``zlib.crc32(payload, zlib.crc32(desc))``
where ``desc`` is the canonical JSON of the leaf's typed path, enclosing node
classes and metas, and its record (without ``p``): a manifest that lies about
a shape, dtype, encoding, key or offset fails that check.

**Sparse-aware nodes.** In a node with a bool ``mask`` field of rank >= 1,
every other array of exactly the mask's shape (recursively inside nested
nodes, e.g. the codes of a ``CodebookArray`` inside a ``MaskedArray``) is
stored only at the kept positions and restored with zeros elsewhere (marked
``"sparse": true``). The node materializes to the same dense array because its
pruned positions are masked out; with ``keep_compressed=True`` the restored
node holds zeros there instead of the original (irrelevant) values.

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
from compressax.io._codec import decode_flat, encode_flat, kind_of

__all__ = ["save", "load", "CorruptFileError", "FORMAT_VERSION", "MAGIC"]

MAGIC = b"\x89CXAX\r\n\x1a"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sHHQI")


class CorruptFileError(ValueError):
  """A compressax file is truncated, corrupted, lying or of a newer version."""


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
    if hasattr(obj, "to_pure_dict"):
      obj = obj.to_pure_dict()  # nnx.State
    if isinstance(obj, Mapping):
      items = []
      for k, v in obj.items():
        if not isinstance(k, str):
          raise TypeError(f"{_show(tpath)}: dict keys must be strings to be "
                          f"saved, got {k!r}")
        items.append([k, self.tree(v, tpath + ("d:" + k,), salt, ctx)])
      return {"t": "dict", "items": items}
    if isinstance(obj, (list, tuple)):
      t = "list" if isinstance(obj, list) else "tuple"
      return {"t": t, "items": [self.tree(v, tpath + (f"{t[0]}:{i}",), salt, ctx)
                                for i, v in enumerate(obj)]}
    if obj is None:
      return {"t": "none"}
    return self.array(obj, tpath, salt, ctx)

  def array(self, obj, tpath, salt, ctx) -> dict:
    arr = np.asarray(obj)
    try:
      kind_of(arr.dtype)
    except TypeError as e:
      raise TypeError(f"{_show(tpath)}: {e}") from None
    if not arr.dtype.isnative:
      arr = arr.astype(arr.dtype.newbyteorder("="))
    flat = np.ascontiguousarray(arr).reshape(-1)
    sparse = ctx is not None and arr.shape == ctx.shape
    if sparse:
      flat = flat[ctx.reshape(-1)]
    enc, payload = encode_flat(flat)
    rec = {"t": "array", "shape": list(arr.shape), "dtype": arr.dtype.name,
           "enc": enc}
    if sparse:
      rec["sparse"] = True
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
      restored = m & ctx if ctx is not None and ctx.shape == m.shape else m
      if m.ndim >= 1:
        rec["kept"] = int(restored.sum())
        ctx = restored
      else:  # a 0-d mask broadcasts: all or nothing kept
        rec["kept"] = node.size if bool(m) else 0
    for k, v in data.items():
      if not (k == "mask" and "kept" in rec):
        rec["fields"].append([k, self.tree(v, tpath + ("n:" + k,), salt, ctx)])
    return rec


def _encode(tree) -> list[bytes]:
  """The file's bytes as a list of pieces (header, manifest, payloads...)."""
  enc = _Encoder()
  root = enc.tree(tree, (), "", None)
  manifest = {"format": "compressax", "version": FORMAT_VERSION,
              "payload_bytes": enc.offset, "tree": root}
  mbytes = json.dumps(manifest, separators=(",", ":")).encode()
  header = _HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(mbytes), zlib.crc32(mbytes))
  return [header, mbytes] + enc.chunks


def save(path, tree) -> int:
  """Writes ``tree`` to ``path`` in the compressax format.

  Dense float arrays are stored raw (little-endian), integer arrays as codes
  at their minimal bit width through the best of bit packing / Huffman / ANS,
  bool arrays as relative indices or a bitmap, and compressed nodes field by
  field (see the module docstring). The file is written to ``path + ".tmp"``
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
  if version < 1 or flags:
    raise CorruptFileError(f"{name}: bad header (version {version}, flags {flags})")
  if _HEADER.size + mlen > len(data):
    raise CorruptFileError(f"{name}: truncated inside the manifest")
  mbytes = bytes(data[_HEADER.size:_HEADER.size + mlen])
  if zlib.crc32(mbytes) != mcrc:
    raise CorruptFileError(f"{name}: manifest checksum mismatch")
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


class _Decoder:
  """Rebuilds the pytree from the manifest tree, verifying every payload."""

  def __init__(self, name: str, payloads: memoryview, keep_compressed: bool):
    self.name, self.buf, self.keep = name, payloads, keep_compressed

  def fail(self, tpath, msg):
    raise CorruptFileError(f"{self.name}: {_show(tpath)}: {msg}")

  def tree(self, rec, tpath, salt, ctx, in_node=False):
    try:
      t = rec["t"]
      if t == "dict":
        out = {}
        for k, r in rec["items"]:
          if not isinstance(k, str) or k in out:
            self.fail(tpath, f"bad dict key {k!r}")
          out[k] = self.tree(r, tpath + ("d:" + k,), salt, ctx, in_node)
        return out
      if t in ("list", "tuple"):
        out = [self.tree(r, tpath + (f"{t[0]}:{i}",), salt, ctx, in_node)
               for i, r in enumerate(rec["items"])]
        return out if t == "list" else tuple(out)
      if t == "none":
        return None
      if t == "array":
        return self.array(rec, tpath, salt, ctx)
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

  def array(self, rec, tpath, salt, ctx) -> np.ndarray:
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
    if rec.get("sparse"):
      if ctx is None or ctx.shape != shape:
        self.fail(tpath, "sparse array without a matching mask")
      flat = decode_flat(rec["enc"], payload, dtype, int(ctx.sum()))
      out = np.zeros(n, dtype)
      out[ctx.reshape(-1)] = flat
    else:
      out = decode_flat(rec["enc"], payload, dtype, n)
    return out.reshape(shape)

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
        data[k] = self.tree(r, tpath + ("n:" + k,), salt, ctx, True)
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
