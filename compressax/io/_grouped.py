"""Integer codes with a bit width per group of consecutive elements.

A DiffQ tensor holds each group of ``group_size`` (flattened, C-order)
weights at its own bit width; packing the whole tensor at the widest group's
width wastes the difference. DiffQ's reference code packs the levels of each
bit width separately, and so does this module:

* for every distinct width ``w`` (a *width class*), the codes of all groups of
  width ``w`` are gathered in element order and coded as ``w``-bit symbols by
  :func:`compressax.io.encode_symbols` (the smallest of raw bit packing,
  Huffman and ANS, chosen per class);
* the per-group widths are an ordinary integer field of the same node, stored
  (and checksummed) on their own and decoded first, so the layout of the codes
  is implied and only each class's coder record is written: in the record's
  ``classes`` (one entry per width present, ascending), a raw-packed class is
  just its width (count and size follow from the widths), an entropy-coded
  one is :func:`~compressax.io.encode_symbols`'s record without ``count``,
  plus ``bytes``, its payload size. Payloads follow in the same order.

A node opts in with a method ``_cx_groups(self) -> {field: (group_size,
widths_field)}`` (group size 0 = one group per tensor), as
:class:`compressax.diffq.DiffQArray` does; nothing is inferred from field
names (a node without the hook is stored field by field). The writer
uses the grouped layout only when it is consistent (one width per group, every
code fits its width) and smaller than the generic integer encoding.

Inside an enclosing sparse mask (a ``MaskedArray`` over a grouped node, as
``cx.methods.AJPQ`` and ``Magnitude >> DiffQ`` store) only the kept codes are
written, in the mask's scan order; each kept code keeps its group's width, so
the same classes apply to them: the record's ``group_size`` is still the
node's, and the reader expands the widths to the dense shape, scans them as
the mask and keeps the kept positions' (:func:`kept_widths`) before decoding.

References:
  Défossez, Adi, Synnaeve, *Differentiable Model Compression via
  Pseudo Quantization Noise*, 2021, Sec. 2 (levels bit-packed per bit width).
  https://arxiv.org/abs/2104.09987
"""

from __future__ import annotations

import numpy as np

from compressax.io._bitpack import packed_nbytes
from compressax.io._entropy import decode_symbols, encode_symbols

__all__ = []

# Widths above this cannot be entropy coded; beyond 64 nothing packs them.
_MAX_WIDTH = 64


def group_spec(node) -> dict:
  """``{field: (group_size, widths_field)}`` for a node's grouped int fields."""
  hook = getattr(node, "_cx_groups", None)
  if callable(hook):
    spec = hook()
    return dict(spec) if isinstance(spec, dict) else {}
  return {}


def group_lengths(count: int, group_size: int, n_groups: int) -> np.ndarray | None:
  """Elements per group, or None if ``n_groups`` does not fit the layout."""
  if group_size < 0:
    return None
  if group_size == 0:
    return np.array([count], np.int64) if n_groups == 1 else None
  if n_groups != -(-count // group_size):
    return None
  lengths = np.full(n_groups, group_size, np.int64)
  if n_groups:
    lengths[-1] = count - (n_groups - 1) * group_size
  return lengths


def _element_widths(widths: np.ndarray, lengths: np.ndarray) -> np.ndarray:
  return np.repeat(widths.astype(np.int64), lengths)


def dense_widths(widths, group_size, shape: tuple) -> np.ndarray:
  """Each element's width, in the dense ``shape``; ``ValueError`` if it cannot be."""
  widths = np.asarray(widths)
  if not np.issubdtype(widths.dtype, np.integer) or widths.ndim != 1:
    raise ValueError("grouped widths must be a 1-D integer array")
  if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)):
    raise ValueError(f"bad group size {group_size!r}")
  count = int(np.prod(shape, dtype=np.int64))
  lengths = group_lengths(count, int(group_size), widths.size)
  if lengths is None:
    raise ValueError(f"{widths.size} groups do not fit {count} codes in groups "
                     f"of {group_size}")
  return _element_widths(widths, lengths).reshape(shape)


def encode_grouped(flat: np.ndarray, widths, group_size: int,
                   widths_field: str) -> tuple[dict, bytes] | None:
  """Codes ``flat`` (1-D ints) class by class; None if the layout does not fit.

  Args:
    flat: the codes, flattened in C order.
    widths: one bit width per group (integer array).
    group_size: elements per group, 0 = one group.
    widths_field: the name of the node field holding ``widths`` (recorded so
      the reader knows which decoded sibling gives the layout).

  Returns:
    ``(record, payload)`` or None when the widths do not describe ``flat``
    (wrong count, width outside [0, 64], or a code that does not fit its
    group's width: a negative code never fits).
  """
  widths = np.asarray(widths)
  if not np.issubdtype(widths.dtype, np.integer) or widths.ndim != 1:
    return None
  lengths = group_lengths(flat.size, group_size, widths.size)
  if lengths is None or flat.size == 0:
    return None
  w64 = widths.astype(np.int64)
  if w64.min() < 0 or w64.max() > min(_MAX_WIDTH, 8 * flat.dtype.itemsize):
    return None
  ew = _element_widths(w64, lengths)
  if np.issubdtype(flat.dtype, np.signedinteger) and flat.min() < 0:
    return None
  u = flat.astype(np.uint64)
  # A code fits in w bits iff code >> w == 0 (w < 64; w == 64 always fits).
  fits = np.where(ew >= 64, True, (u >> np.minimum(ew, 63).astype(np.uint64)) == 0)
  if not fits.all():
    return None
  classes, payloads, raw = [], [], 0
  for w in np.unique(w64):
    w = int(w)
    sel = u[ew == w]
    if w == 0:  # zero-width codes are all 0: nothing to store
      classes.append(0)
      continue
    rec, payload = encode_symbols(sel, w)
    if rec["coder"] == "raw":  # its size and parameters follow from the widths
      classes.append(w)
    else:
      classes.append(dict({k: v for k, v in rec.items() if k != "count"},
                          bytes=len(payload)))
    payloads.append(payload)
    raw += packed_nbytes(sel.size, w)
  record = dict(kind="int", scheme="grouped", group_size=int(group_size),
                widths=widths_field, classes=classes, raw=raw, count=int(flat.size))
  return record, b"".join(payloads)


def decode_grouped(rec: dict, payload: np.ndarray, dtype: np.dtype, count: int,
                   widths) -> np.ndarray:
  """Inverts :func:`encode_grouped`; ``ValueError`` if anything disagrees."""
  if widths is None:
    raise ValueError(f"grouped codes without their widths field {rec.get('widths')!r}")
  widths = np.asarray(widths)
  if not np.issubdtype(widths.dtype, np.integer) or widths.ndim != 1:
    raise ValueError("grouped widths must be a 1-D integer array")
  if int(rec["count"]) != count:
    raise ValueError("grouped code count does not match the shape")
  lengths = group_lengths(count, int(rec["group_size"]), widths.size)
  if lengths is None:
    raise ValueError(f"{widths.size} groups do not fit {count} codes in groups "
                     f"of {rec['group_size']}")
  w64 = widths.astype(np.int64)
  ew = _element_widths(w64, lengths)
  present = [int(w) for w in np.unique(w64)]
  classes = rec["classes"]
  if not isinstance(classes, list) or \
      [_class_width(c) for c in classes] != present:
    raise ValueError("grouped width classes do not match the widths field")
  if present and (present[0] < 0 or present[-1] > min(_MAX_WIDTH, 8 * dtype.itemsize)):
    raise ValueError(f"group width outside [0, {8 * dtype.itemsize}]")
  out = np.zeros(count, np.uint64)
  off = 0
  for c, w in zip(classes, present):
    sel = ew == w
    n = int(sel.sum())
    if w == 0:
      continue
    if isinstance(c, dict):
      nbytes, coded = int(c["bytes"]), dict(c, count=n)
    else:
      nbytes, coded = packed_nbytes(n, w), dict(coder="raw", bits=w, count=n)
    if nbytes < 0 or off + nbytes > payload.size:
      raise ValueError("grouped class sizes overrun the payload")
    sym = decode_symbols(coded, payload[off:off + nbytes])
    if sym.size != n:
      raise ValueError(f"width class {w} decoded {sym.size} codes, expected {n}")
    out[sel] = sym
    off += nbytes
  if off != payload.size:
    raise ValueError("grouped class sizes do not add up to the payload")
  return out.astype(np.dtype(f"u{dtype.itemsize}")).view(dtype)


def _class_width(c) -> int | None:
  """A class entry's width: an int (raw-packed class) or a coder record's bits."""
  if isinstance(c, dict):
    return c.get("bits") if type(c.get("bits")) is int else None  # noqa: E721
  return c if type(c) is int else None  # noqa: E721  JSON ints only, no bools
