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
import os
import stat
import struct
import tempfile
import zlib
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from compressax import _checks
from compressax._node import CompressedLeaf
from compressax._node import leaf_name
from compressax._node import leaf_storage
from compressax._node import leaf_version
from compressax.io._codec import encode_flat, encode_mask, kind_of
from compressax.io._grouped import dense_widths
from compressax.io._grouped import group_spec

__all__ = ["save", "CorruptFileError", "LimitExceededError", "FORMAT_VERSION",
           "MAGIC", "FLAG_ZLIB_MANIFEST"]

MAGIC = b"\x89CXAX\r\n\x1a"
FORMAT_VERSION = 3
FLAG_ZLIB_MANIFEST = 1
_HEADER = struct.Struct("<8sHHQI")



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
    if ctx is not None and sparse:  # the context's scan order, at its kept positions only
      perm = ctx[1]
      kept_groups, node_group_size = None, None
      if groups is not None and kind_of(arr.dtype) == "int":
        try:  # each kept code at its group's width (see ``_grouped``)
          ew = _scan(dense_widths(groups[0], groups[1], arr.shape), perm)[ctx[2]]
          kept_groups, node_group_size = (ew, 1, groups[2]), int(groups[1])
        except ValueError:
          pass
      enc, payload = encode_flat(_scan(arr, perm)[ctx[2]], kept_groups)
      if node_group_size is not None and enc.get("scheme") == "grouped":
        enc["group_size"] = node_group_size
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
    if mask_field is not None and _is_array(mask) and np.asarray(mask).dtype == bool:
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
  bool arrays as relative indices, a bitmap or a bitmap in g-bit groups
  (scheme, index width, group width and scan order chosen by entropy-coded
  size; see ``_codec``), and compressed nodes as their classes
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
  _checks.check_tree(tree, "cx.save")
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
