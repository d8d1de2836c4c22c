"""Reading compressax files: bounded parsing, verified decoding, ``load``.

The layout is described in ``_format``. Reading is defensive: the header is
read first and the rest only as far as it and the manifest declare, every
declared size is checked against the bytes present and against the load's
limits *before* anything is allocated (safetensors' rule), and every node is
rebuilt through its registered class and checked by its ``validate()``.

Limits (all overridable per call, see :func:`load`):

* ``max_elements``: array elements decoded in all, including relative-index
  codes and materialized nodes; default ``max(2**20, 1024 x file bytes)``.
  A real model file decodes to ~26 elements per byte at most (LeNet-5 at
  105x against float32, docs/results.md), so 1024 leaves 40x headroom; the
  floor lets a small file hold e.g. a zero buffer of a million elements. A
  decoded element costs at most ~48 bytes at the peak (the output and the
  decoders' int64 temporaries), so a load allocates at most a fixed multiple
  of the file's size beyond the floor.
* ``max_records``: JSON objects in the manifest; default
  ``max(2**14, file bytes / 4)`` (a parsed record costs ~0.3-1 KB).
* ``max_manifest_bytes``: bytes the manifest may inflate to; default
  ``max(1 MiB, 64 x its stored size)`` (manifests shrink ~4x under zlib).
"""

from __future__ import annotations

import json
import math
import os
import stat
import zlib
from typing import Any

import jax.numpy as jnp
import numpy as np

from compressax._node import leaf_type
from compressax._node import leaf_version
from compressax.io._codec import decode_flat
from compressax.io._grouped import dense_widths
from compressax.io._format import _HEADER
from compressax.io._format import FLAG_ZLIB_MANIFEST
from compressax.io._format import FORMAT_VERSION
from compressax.io._format import MAGIC
from compressax.io._format import CorruptFileError
from compressax.io._format import LimitExceededError
from compressax.io._format import _crc
from compressax.io._format import _desc
from compressax.io._format import _key_part
from compressax.io._format import _meta_py
from compressax.io._format import _scan
from compressax.io._format import _show
from compressax.io._format import _valid_key

__all__ = ["load", "loads", "parse"]

# Default limits (see `load`). A real model file decodes to at most ~26
# elements per byte (LeNet-5 at 105x against float32, docs/results.md); 1024
# leaves 40x headroom, and the floor lets a small file hold, e.g., a
# zero-initialised buffer of a million elements. Each decoded element costs at
# most ~48 bytes at the peak (output plus the decoders' int64 temporaries).
ELEMENTS_PER_BYTE = 1024
MIN_ELEMENTS = 1 << 20
# A manifest record (JSON object) costs ~0.3-1 KB once parsed and at least a
# few bytes of the compressed manifest; one per 4 file bytes, floor 2^14.
RECORDS_PER_BYTE = 0.25
MIN_RECORDS = 1 << 14
# A manifest shrinks ~4x under zlib; inflating more than 64x (floor 1 MiB) is
# refused (decompression bombs).
MANIFEST_RATIO = 64
MIN_MANIFEST_BYTES = 1 << 20
_CHUNK = 1 << 20


def _check_header(head: bytes, name: str) -> tuple[int, int, int, int]:
  """``(version, flags, manifest_len, manifest_crc)`` of a file's first bytes."""
  if len(head) < _HEADER.size:
    raise CorruptFileError(f"{name}: truncated: {len(head)} bytes is shorter "
                           "than the header")
  magic, version, flags, mlen, mcrc = _HEADER.unpack_from(head)
  if magic != MAGIC:
    raise CorruptFileError(f"{name}: not a compressax file (bad magic bytes)")
  if version > FORMAT_VERSION:
    raise CorruptFileError(f"{name}: format version {version} is newer than "
                           f"this compressax reads ({FORMAT_VERSION}); upgrade")
  if version < 1 or flags & ~FLAG_ZLIB_MANIFEST or (version == 1 and flags):
    raise CorruptFileError(f"{name}: bad header (version {version}, flags {flags})")
  return version, flags, mlen, mcrc


class _Limits:
  """The limits of one load, resolved against the file's size."""

  def __init__(self, file_bytes: int, manifest_len: int, max_elements=None,
               max_records=None, max_manifest_bytes=None):
    self.elements = max(MIN_ELEMENTS, ELEMENTS_PER_BYTE * file_bytes) \
        if max_elements is None else _count_arg("max_elements", max_elements)
    self.records = max(MIN_RECORDS, int(RECORDS_PER_BYTE * file_bytes)) \
        if max_records is None else _count_arg("max_records", max_records)
    self.manifest_bytes = max(MIN_MANIFEST_BYTES, MANIFEST_RATIO * manifest_len) \
        if max_manifest_bytes is None else \
        _count_arg("max_manifest_bytes", max_manifest_bytes)


def _count_arg(what: str, v) -> int:
  if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
    raise ValueError(f"{what} must be a non-negative int or None, got {v!r}")
  return int(v)


def _manifest(mbytes: bytes, version: int, flags: int, name: str,
              limits: _Limits) -> dict:
  """Inflates (bounded) and parses (bounded) a manifest whose CRC was checked."""
  if flags & FLAG_ZLIB_MANIFEST:
    mbytes = _inflate(mbytes, limits.manifest_bytes, name)
  elif len(mbytes) > limits.manifest_bytes:
    raise LimitExceededError(f"{name}: manifest of {len(mbytes):,} bytes is over "
                             f"max_manifest_bytes={limits.manifest_bytes:,}")
  seen = [0]

  def count(obj):
    seen[0] += 1
    if seen[0] > limits.records:
      raise LimitExceededError(
          f"{name}: the manifest has more than {limits.records:,} records "
          f"(max_records; by default max({MIN_RECORDS}, {RECORDS_PER_BYTE} x "
          "file bytes)); pass a larger max_records to load a file you trust")
    return obj

  try:
    manifest = json.loads(mbytes, object_hook=count)
    total = manifest["payload_bytes"]
    ok = manifest["format"] == "compressax" and manifest["version"] == version \
        and type(total) is int and total >= 0 and "tree" in manifest  # noqa: E721
  except LimitExceededError:
    raise
  except Exception as e:  # noqa: BLE001  any malformed manifest is corrupt
    raise CorruptFileError(f"{name}: unreadable manifest ({e})") from None
  if not ok:
    raise CorruptFileError(f"{name}: malformed manifest")
  return manifest


def parse(data: bytes, name: str, **limits) -> tuple[dict, memoryview]:
  """Checks the header and manifest of a file's bytes; ``(manifest, payloads)``.

  ``limits``: ``max_records`` and ``max_manifest_bytes`` as for :func:`load`.
  """
  version, flags, mlen, mcrc = _check_header(data[:_HEADER.size], name)
  if _HEADER.size + mlen > len(data):
    raise CorruptFileError(f"{name}: truncated inside the manifest")
  mbytes = bytes(data[_HEADER.size:_HEADER.size + mlen])
  if zlib.crc32(mbytes) != mcrc:
    raise CorruptFileError(f"{name}: manifest checksum mismatch")
  manifest = _manifest(mbytes, version, flags, name,
                       _Limits(len(data), mlen, **limits))
  start = _HEADER.size + mlen
  if start + manifest["payload_bytes"] != len(data):
    raise CorruptFileError(f"{name}: file has {len(data)} bytes, the manifest "
                           f"says {start + manifest['payload_bytes']} "
                           "(truncated or padded)")
  return manifest, memoryview(data)[start:]


def _read_exact(f, n: int, name: str, what: str) -> bytes:
  """``n`` bytes, read in chunks: a lying length allocates only what exists."""
  parts, left = [], n
  while left:
    part = f.read(min(left, _CHUNK))
    if not part:
      raise CorruptFileError(f"{name}: truncated inside {what}")
    parts.append(part)
    left -= len(part)
  return b"".join(parts)


def _read_file(name: str, max_records=None, max_manifest_bytes=None):
  """``(manifest, payloads, file_bytes)``: the header first, then as declared."""
  with open(name, "rb") as f:
    st = os.fstat(f.fileno())
    regular = stat.S_ISREG(st.st_mode)
    head = f.read(_HEADER.size)
    version, flags, mlen, mcrc = _check_header(head, name)
    if regular and _HEADER.size + mlen > st.st_size:
      raise CorruptFileError(f"{name}: truncated inside the manifest")
    mbytes = _read_exact(f, mlen, name, "the manifest")
    if zlib.crc32(mbytes) != mcrc:
      raise CorruptFileError(f"{name}: manifest checksum mismatch")
    known = st.st_size if regular else _HEADER.size + mlen
    manifest = _manifest(mbytes, version, flags, name,
                         _Limits(known, mlen, None, max_records, max_manifest_bytes))
    start = _HEADER.size + mlen
    total = manifest["payload_bytes"]
    if regular and start + total != st.st_size:
      raise CorruptFileError(f"{name}: file has {st.st_size} bytes, the manifest "
                             f"says {start + total} (truncated or padded)")
    if regular:  # the size was checked: read in place, no second copy
      payloads = bytearray(total)
      if f.readinto(payloads) != total:
        raise CorruptFileError(f"{name}: truncated inside the payloads")
    else:
      payloads = _read_exact(f, total, name, "the payloads")
    if f.read(1):
      raise CorruptFileError(f"{name}: the file is longer than the manifest "
                             "says (padded)")
  return manifest, memoryview(payloads), start + total


def _inflate(zbytes: bytes, cap: int, name: str) -> bytes:
  """zlib-decompresses a manifest, refusing more than ``cap`` bytes."""
  try:
    d = zlib.decompressobj()
    out = d.decompress(zbytes, cap)
    if d.unconsumed_tail or (len(out) == cap and d.decompress(b"", 1)):
      raise LimitExceededError(
          f"{name}: manifest inflates to more than {cap:,} bytes (a "
          "decompression bomb? max_manifest_bytes; by default max(1 MiB, "
          f"{MANIFEST_RATIO} x its stored size))")
    if not d.eof or d.unused_data:
      raise CorruptFileError(f"{name}: compressed manifest is truncated or "
                             "followed by junk")
  except zlib.error as e:
    raise CorruptFileError(f"{name}: compressed manifest does not inflate "
                           f"({e})") from None
  return out


def _perm(rec, ndim: int) -> tuple:
  perm = tuple(rec.get("perm", range(ndim)))
  if sorted(perm) != list(range(ndim)) or \
      not all(type(p) is int for p in perm):  # noqa: E721  JSON ints only
    raise ValueError(f"bad scan order {rec.get('perm')!r}")
  return perm


class _Decoder:
  """Rebuilds the pytree from the manifest tree, verifying every payload."""

  def __init__(self, name: str, payloads: memoryview, keep_compressed: bool,
               max_elements: int):
    self.name, self.buf, self.keep = name, payloads, keep_compressed
    self.limit = self.left = max_elements

  def fail(self, tpath, msg):
    raise CorruptFileError(f"{self.name}: {_show(tpath)}: {msg}")

  def charge(self, tpath, n: int, what: str):
    """Books ``n`` elements against the limit before they are allocated."""
    if n > self.left:
      raise LimitExceededError(
          f"{self.name}: {_show(tpath)}: {what} needs {n:,} elements, over the "
          f"limit of {self.limit:,} for this file (max_elements; by default "
          f"max(2**20, {ELEMENTS_PER_BYTE} x file bytes)); pass a larger "
          "max_elements to load a file you trust")
    self.left -= n

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
        self.charge(tpath, node.size, "materializing the node")
        return np.asarray(node.materialize())
      self.fail(tpath, f"unknown record type {t!r}")
    except CorruptFileError:
      raise
    except Exception as e:  # noqa: BLE001  a lying manifest must not leak garbage
      self.fail(tpath, f"{type(e).__name__}: {e}")

  def array(self, rec, tpath, salt, ctx, siblings=None) -> np.ndarray:
    shape = tuple(rec["shape"])
    if not all(type(d) is int and d >= 0 for d in shape):  # noqa: E721
      self.fail(tpath, f"bad shape {rec['shape']!r}")
    dtype = jnp.dtype(rec["dtype"])
    off, length, crc = rec["p"]
    if not (type(off) is int and type(length) is int and off >= 0  # noqa: E721
            and length >= 0 and off + length <= len(self.buf)):
      self.fail(tpath, f"payload [{off}, +{length}) is outside the file")
    payload = self.buf[off:off + length]
    if _crc(payload, _desc(tpath, salt, rec)) != crc:
      self.fail(tpath, "payload checksum mismatch (corrupted data or manifest)")
    n = math.prod(shape)
    self.charge(tpath, n, f"an array of shape {list(shape)}")
    enc = rec["enc"]
    if isinstance(enc, dict) and enc.get("scheme") == "relidx":
      # Relative-index codes (with fillers) are decoded before the mask.
      self.charge(tpath, int(enc["count"]), "the mask's relative indices")
    perm = _perm(rec, len(shape))
    if rec.get("sparse"):
      if ctx is None or ctx.shape != shape:
        self.fail(tpath, "sparse array without a matching mask")
      sel = _scan(ctx, perm)
      if isinstance(enc, dict) and enc.get("scheme") == "grouped":
        # The kept codes' widths: the node's, expanded and scanned as the mask.
        field = enc.get("widths")
        widths = (siblings or {}).get(field) if isinstance(field, str) else None
        if widths is None:
          self.fail(tpath, f"grouped codes without their widths field {field!r}")
        try:
          ew = _scan(dense_widths(widths, enc.get("group_size"), shape), perm)[sel]
        except ValueError as e:
          self.fail(tpath, f"grouped codes under a mask: {e}")
        flat = decode_flat(dict(enc, group_size=1), payload, dtype, int(sel.sum()),
                           {field: ew})
      else:
        flat = decode_flat(enc, payload, dtype, int(sel.sum()))
      out = np.zeros(n, dtype)
      out[sel] = flat
    else:
      out = decode_flat(enc, payload, dtype, n, siblings)
    # Undo the scan order: the flat data is the array transposed by `perm`.
    out = out.reshape(tuple(shape[p] for p in perm))
    inverse = tuple(sorted(range(len(perm)), key=perm.__getitem__))
    return np.transpose(out, inverse).copy(order="C")

  def node(self, rec, tpath, salt, ctx):
    cls = leaf_type(rec["class"])
    version = rec.get("version", 1)
    if type(version) is not int or version < 1:  # noqa: E721
      self.fail(tpath, f"bad class version {version!r}")
    if version > leaf_version(cls):
      self.fail(tpath, f"{rec['class']} version {version} is newer than the "
                f"registered class {cls.__module__}.{cls.__qualname__} (version "
                f"{leaf_version(cls)}); upgrade the package that defines it")
    meta = {k: _meta_py(v) for k, v in rec["meta"].items()}
    salt = salt + json.dumps([rec["class"], rec["meta"]], sort_keys=True)
    fields = dict(rec["fields"])
    data = {}
    if "kept" in rec:  # the mask was written first; its restored form is the context
      mask_field = rec.get("sparse_mask", "mask")  # version 2: always "mask"
      m = self.tree(fields[mask_field], tpath + ("n:" + mask_field,), salt, ctx, True)
      data[mask_field] = m
      if isinstance(m, np.ndarray) and m.ndim >= 1:
        ctx = m
    for k, r in rec["fields"]:
      if k not in data:
        data[k] = self.tree(r, tpath + ("n:" + k,), salt, ctx, True, data)
    node = cls(**data, **meta)
    node.validate()  # the meta must agree with the data (forged manifests)
    return node


def load(path, *, keep_compressed: bool = False, like=None,
         max_elements: int | None = None, max_records: int | None = None,
         max_manifest_bytes: int | None = None) -> Any:
  """Reads a file written by :func:`save`.

  The header is read first and the rest only as far as it and the manifest
  say; every declared size is checked against the bytes present and against
  the limits below *before* anything is allocated, so a small hostile file
  cannot make the reader allocate gigabytes. The defaults scale with the
  file's size (a real model file decodes to ~26 elements per byte at most);
  raise them to load a trusted file that compresses better, e.g. large
  constant buffers.

  Args:
    path: the file.
    keep_compressed: if True, compressed nodes are returned as nodes (with
      NumPy arrays in their data fields) instead of dense arrays.
    like: a tree whose containers the result takes: a dict, Flax
      ``FrozenDict``, ``nnx.State``, list, tuple or NamedTuple tree with the
      file's keys and lengths (its leaves' shapes and dtypes are checked
      too). Compressed nodes in the file stay nodes (as with
      ``keep_compressed=True``). ``like`` itself is not modified.
    max_elements: the most array elements the load may decode in all
      (arrays, masks' index codes and materialized nodes); default
      ``max(2**20, 1024 * file_bytes)``.
    max_records: the most JSON objects (records, encodings, metas) the
      manifest may hold; default ``max(2**14, file_bytes // 4)``.
    max_manifest_bytes: the most bytes the manifest may inflate to; default
      ``max(2**20, 64 * stored_manifest_bytes)``.

  Returns:
    The pytree (dicts, lists, tuples, or ``like``'s containers) with NumPy
    arrays of the original dtypes and shapes, bit-identical to what was saved
    on any machine (pruned positions of nodes with a declared sparse mask
    aside, see the module docstring).

  Raises:
    CorruptFileError: (a ``ValueError``) naming the file and the leaf, for a
      truncated or corrupted file, a wrong magic, a newer format or class
      version, a manifest that disagrees with its payloads or a node whose
      meta disagrees with its data.
    LimitExceededError: (a ``CorruptFileError``) the file would exceed a limit.
    ValueError: naming the path where the file's tree and ``like`` disagree.

  References:
    Han, Mao, Dally. Deep Compression. ICLR 2016.
    https://arxiv.org/abs/1510.00149
  """
  name = os.fspath(path)
  manifest, payloads, size = _read_file(name, max_records, max_manifest_bytes)
  return _decode(manifest, payloads, size, name, keep_compressed, like,
                 max_elements)


def loads(data: bytes, name: str = "<bytes>", *, keep_compressed: bool = False,
          like=None, max_elements: int | None = None,
          max_records: int | None = None,
          max_manifest_bytes: int | None = None):
  """:func:`load` from the file's bytes; ``name`` is used in errors."""
  manifest, payloads = parse(data, name, max_records=max_records,
                             max_manifest_bytes=max_manifest_bytes)
  return _decode(manifest, payloads, len(data), name, keep_compressed, like,
                 max_elements)


def _decode(manifest, payloads, size, name, keep, like, max_elements):
  limit = _Limits(size, 0, max_elements).elements
  dec = _Decoder(name, payloads, keep or like is not None, limit)
  tree = dec.tree(manifest["tree"], (), "", None)
  if like is None:
    return tree
  from compressax.io._like import restore_like
  return restore_like(tree, like, name)
