"""The compressax file: a pytree of dense arrays and compressed nodes, no pickle.

Layout (all integers little-endian)::

  offset 0   magic         8 bytes  b"\\x89CXAX\\r\\n\\x1a"
         8   version       u16      FORMAT_VERSION (3)
        10   flags         u16      bit 0: FLAG_ZLIB_MANIFEST; others 0
        12   manifest_len  u64      stored manifest bytes
        20   manifest_crc  u32      zlib.crc32 of the stored manifest bytes
        24   manifest      UTF-8 JSON, zlib-compressed (level 9) if bit 0
             payloads      concatenated; the file ends exactly after them

Writers always set bit 0 (the JSON shrinks ~4x); readers also take a plain
JSON manifest (bit 0 clear), version 2 files (bare class names such as
``"QuantizedArray"``, no class versions) and version 1 files (flags 0, plain
manifest, no ``perm``: pre-release, read as before). The CRC covers the stored
bytes, so a corrupted compressed manifest is caught before it is inflated.
The reader reads the header first and the rest only as the header and
manifest say, and checks every declared size against the bytes present and
against :func:`load`'s limits before it allocates (see ``Limits`` below).

The manifest holds ``format``, ``version``, ``payload_bytes`` and ``tree``:
the pytree as nested records. ``{"t": "dict", "items": [[key, rec], ...]}``
(string or int keys), ``"list"`` and ``"tuple"`` with ``items``, ``"none"``,
``{"t": "array", "shape", "dtype", "enc", "p"}`` and
``{"t": "node", "class", "version", "meta", "fields": [[name, rec], ...]}``
(plus ``"sparse_mask"`` and ``"kept"`` for a node with a declared sparse
mask) for a compressed node (any class registered with
:func:`compressax.compressed_leaf`, under its namespaced name such as
``"compressax.QuantizedArray"``; its ``data()`` fields are records, its
``meta()`` is JSON with dtypes as ``{"dtype": name}`` and tuples as lists). ``enc`` is the array encoding (see
``_codec``) and ``p = [offset, length, crc]`` locates the payload inside the
payload area. A 2-D+ bool array may carry ``"perm"``, an axis permutation: its
data is stored flattened after ``np.transpose(x, perm)``. The writer offers
C order, reversed axes (column-major) and, for 3-D+, each axis scanned
fastest, and keeps the order whose coded mask is smallest. The payload CRC is ``zlib.crc32(payload, zlib.crc32(desc))``
where ``desc`` is the canonical JSON of the leaf's typed path, enclosing node
classes and metas, and its record (without ``p``): a manifest that lies about
a shape, dtype, encoding, key or offset fails that check.

**Declared storage.** How a node is stored is declared by its class, never
guessed from field names (:func:`compressax.compressed_leaf`). A node whose
class declares ``sparse_mask="mask"`` (a bool field of rank >= 1, as
:class:`compressax.prune.MaskedArray`) stores its ``pointwise`` fields of the
mask's shape (recursively: the pointwise fields of a node in such a field,
e.g. the codes of a ``CodebookArray`` inside a ``MaskedArray``) only at the
kept positions and restores zeros elsewhere (marked ``"sparse": true``), in
the scan order (``perm``) of the mask's record, so values and positions pair
up however the mask was scanned. The node materializes to the same dense
array because its pruned positions are masked out; with
``keep_compressed=True`` the restored node holds zeros there instead of the
original (irrelevant) values. Every other node is stored field by field,
exactly. The reader follows the records (``"sparse"`` is covered by the
payload CRC), so version 2 files, whose writer guessed, load as written.

**Grouped codes.** A node's integer field with a bit width per group of
elements, declared by a ``_cx_groups`` hook (as on
:class:`compressax.diffq.DiffQArray`; see ``_grouped``), may be stored width
class by width class (``enc["scheme"] == "grouped"``, naming the widths
field). The widths field is then written, and read, before the codes.

**Zeros.** A float array whose exact ``+0.0`` elements make it smaller is
stored as a mask of its other elements plus their raw values
(``enc["scheme"] == "zeros"``, see ``_codec``): bit-exact, ``-0.0`` and NaN
payloads are values like any other.

**Limits.** :func:`load` refuses, before allocating, a file that would decode
to more elements, or hold more manifest records, than its limits (by default
proportional to the file's size; see :func:`load`).

Trees: dicts with string keys (incl. Flax ``FrozenDict``, loaded as ``dict``),
lists, tuples (``NamedTuple``\\s load as plain tuples), ``None``, arrays and
Python scalars (loaded as 0-d arrays). An ``nnx.State`` is saved as
``state.to_pure_dict()``. ``load(path, like=tree)`` gives the caller's
containers back (``FrozenDict``, ``nnx.State``, NamedTuples; ``_like``).
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
import tempfile
import zlib
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from compressax._node import CompressedLeaf
from compressax._node import leaf_name
from compressax._node import leaf_storage
from compressax._node import leaf_type
from compressax._node import leaf_version
from compressax.io._codec import decode_flat, encode_flat, encode_mask, kind_of
from compressax.io._grouped import group_spec

__all__ = ["save", "load", "CorruptFileError", "LimitExceededError",
           "FORMAT_VERSION", "MAGIC", "FLAG_ZLIB_MANIFEST"]

MAGIC = b"\x89CXAX\r\n\x1a"
FORMAT_VERSION = 3
FLAG_ZLIB_MANIFEST = 1
_HEADER = struct.Struct("<8sHHQI")

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


class CorruptFileError(ValueError):
  """A compressax file is truncated, corrupted, lying or of a newer version."""


class LimitExceededError(CorruptFileError):
  """A file would decode to more than :func:`load`'s limits allow.

  Not necessarily corrupt: a trusted file can be loaded with a higher limit.
  """


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
    """A node's record. ``ctx``: the enclosing mask, if this node is pointwise."""
    try:
      name = leaf_name(type(node))
    except TypeError as e:
      raise TypeError(f"{_show(tpath)}: {e}") from None
    meta = {k: _meta_json(v, _show(tpath)) for k, v in node.meta().items()}
    salt = salt + json.dumps([name, meta], sort_keys=True)
    data = node.data()
    rec = {"t": "node", "class": name, "version": leaf_version(type(node)),
           "meta": meta, "fields": []}
    mask_field, pointwise = leaf_storage(type(node))
    mask = data.get(mask_field) if mask_field is not None else None
    own = ctx
    if _is_array(mask) and np.asarray(mask).dtype == bool:
      m = np.asarray(mask)
      outer = ctx if ctx is not None and ctx[0].shape == m.shape else None
      mrec = self.tree(m, tpath + ("n:" + mask_field,), salt, outer)
      rec["fields"].append([mask_field, mrec])
      rec["sparse_mask"] = mask_field
      restored = m & outer[0] if outer is not None else m
      if m.ndim >= 1:
        rec["kept"] = int(restored.sum())
        # The node's arrays follow the scan order its mask was stored in.
        perm = tuple(mrec.get("perm", range(m.ndim)))
        own = (restored, perm, _scan(restored, perm))
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
      if k == mask_field and "sparse_mask" in rec:
        continue
      v, sub = data[k], tpath + ("n:" + k,)
      sub_ctx = own if k in pointwise else None
      if k in spec:
        rec["fields"].append([k, self.array(
            v, sub, salt, sub_ctx, (np.asarray(data[spec[k][1]]), int(spec[k][0]),
                                    spec[k][1]))])
      else:
        rec["fields"].append([k, self.tree(v, sub, salt, sub_ctx)])
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
  chosen by entropy-coded size), and compressed nodes as their classes
  declare, under a zlib-compressed JSON manifest (see the module docstring).
  Float arrays whose exact zeros make them smaller are stored sparse. The
  file is written to a temp file of its own in the same folder, synced to
  disk and renamed over ``path``: concurrent saves to one path leave one of
  the trees whole, and a crash never leaves a half-written ``path`` (nor,
  short of a killed process, a temp file).

  Args:
    path: the file to write.
    tree: a pytree of arrays and compressed nodes (module docstring).

  Returns:
    The file size in bytes.

  Raises:
    TypeError: naming the leaf, for an unsupported leaf, key or meta value,
      or a node class not registered with :func:`compressax.compressed_leaf`.

  Example:
    >>> cx.io.save("model.cx", params)  # doctest: +SKIP
    >>> params = cx.io.load("model.cx")  # doctest: +SKIP

  References:
    Han, Mao, Dally. Deep Compression. ICLR 2016.
    https://arxiv.org/abs/1510.00149
  """
  pieces = _encode(tree)
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  # A temp file of its own in the target's folder (so the rename is atomic):
  # concurrent writers never share one, and a failed write leaves none behind.
  fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".",
                             suffix=".tmp", dir=folder)
  try:
    with os.fdopen(fd, "wb") as f:
      for piece in pieces:
        f.write(piece)
      f.flush()
      os.fsync(f.fileno())  # the data is on disk before the name points at it
    os.chmod(tmp, _file_mode(path))
    os.replace(tmp, path)
  except BaseException:
    try:
      os.unlink(tmp)
    except OSError:
      pass
    raise
  _fsync_dir(folder)
  return sum(len(p) for p in pieces)


def _file_mode(path: str) -> int:
  """An existing target's permissions, else the umask's default (as ``open``)."""
  try:
    return stat.S_IMODE(os.stat(path).st_mode)
  except OSError:
    return 0o666 & ~_umask()


def _umask() -> int:
  try:  # Linux: read it without changing it (os.umask is process-wide)
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError):
    pass
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def _fsync_dir(folder: str) -> None:
  """Makes the rename durable (POSIX); a no-op where folders cannot be opened."""
  try:
    fd = os.open(folder, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


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
