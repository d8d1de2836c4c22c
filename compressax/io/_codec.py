"""One flat array <-> one payload: the encoding chosen for each dtype kind.

* floating (float16/bfloat16/float32/float64, ...): raw little-endian bytes,
  or, when its exact ``+0.0`` elements make it smaller (a pruned weight), the
  mask of its other elements (coded as a bool mask) followed by their raw
  bytes (``scheme: "zeros"``). A zero is an all-zero bit pattern: ``-0.0`` and
  NaNs of any payload are values, so the round trip is bit-exact.
* integer: codes. Shifted by their minimum, stored with the minimal bit width
  ``bit_length(max - min)`` through the smallest of raw bit packing, canonical
  Huffman and ANS (:func:`compressax.io.encode_symbols`); a constant array
  takes no payload bytes.
* integer codes with a bit width per group (a node's grouped field, see
  ``_grouped``): also coded width class by width class, and the smaller of
  that and the generic integer encoding is kept, counting each record's
  manifest bytes too (:func:`encoded_cost`): a tiny tensor with many width
  classes is cheaper generic.
* bool: masks. Either Deep Compression relative indices (the gap codes coded
  like integer codes) or a bitmap (one bit per position, also offered to the
  entropy coders), whichever payload is smaller *after* entropy coding; the
  relative-index width is chosen the same way (:func:`encode_mask`), and the
  file writer also offers the transposed scan order of a 2-D+ mask. A third
  scheme, ``bitgroups``, codes the bitmap ``g`` bits at a time (``g`` in
  :data:`GROUP_BITS`) as symbols for the entropy coders: an N:M mask scanned
  with its N:M axis fastest has at most ``C(M, N)`` patterns per group of
  ``M`` (6 for 2:4, ``log2 6 = 2.58`` bits per 4 weights). It is kept only
  when strictly smaller than the best of the other two.

The encoding record is JSON-able; ``raw`` in it is the payload's size before
entropy coding (bit-packed codes, packed relative indices or bitmap), used by
:func:`compressax.io.size_report`.
"""

from __future__ import annotations

import json
import zlib

import jax.numpy as jnp
import numpy as np

from compressax.io._bitpack import _container, packed_nbytes
from compressax.io._entropy import decode_symbols, encode_symbols, estimate_nbytes
from compressax.io._grouped import decode_grouped, encode_grouped
from compressax.io._sparse import (best_index_bits, relative_index_decode,
                                   relative_index_encode)

__all__ = []

# Widest relative-index code tried (entropy coding works up to 16 bits).
_MAX_INDEX_BITS = 16
# Bits per symbol of the ``bitgroups`` mask scheme.
GROUP_BITS = (2, 4, 8)
# Sparse float coding is tried when at least 1/64 of the elements, and 64
# bytes of values, are zeros: below that the mask's cost eats the saving.
_MIN_ZERO_FRACTION = 64
_MIN_ZERO_BYTES = 64


def kind_of(dtype) -> str:
  """'float', 'int' or 'bool'; anything else is a ``TypeError``."""
  dtype = np.dtype(dtype)
  if dtype.kind == "b":
    return "bool"
  if np.issubdtype(dtype, np.integer):
    return "int"
  if jnp.issubdtype(dtype, jnp.floating):
    return "float"
  raise TypeError(f"cannot store arrays of dtype {dtype} (only floating, "
                  "integer and bool arrays)")


def _uint(itemsize: int) -> np.dtype:
  return np.dtype(f"<u{itemsize}")


def encode_flat(flat: np.ndarray, groups=None) -> tuple[dict, bytes]:
  """Encodes a 1-D array; returns ``(record, payload)``.

  ``groups``, for integer codes only, is ``(widths, group_size, widths_field)``:
  the per-group bit widths offered to :func:`encode_grouped`.
  """
  kind = kind_of(flat.dtype)
  n = int(flat.size)
  if kind == "float":
    bits = flat.view(np.dtype(f"u{flat.dtype.itemsize}"))
    data = bits.astype(_uint(flat.dtype.itemsize)).tobytes()
    dense = dict(kind="float", raw=len(data)), data
    nonzero = bits != 0
    zeros = n - int(np.count_nonzero(nonzero))
    if zeros * flat.dtype.itemsize < _MIN_ZERO_BYTES or \
        zeros * _MIN_ZERO_FRACTION < n:
      return dense
    _, mrec, mpay = encode_mask([nonzero])
    vals = bits[nonzero].astype(_uint(flat.dtype.itemsize)).tobytes()
    sparse = (dict(kind="float", scheme="zeros", nnz=n - zeros, mask=mrec,
                   mask_bytes=len(mpay), raw=mrec["raw"] + len(vals)),
              mpay + vals)
    return sparse if encoded_cost(*sparse) < encoded_cost(*dense) else dense
  if kind == "bool":
    return encode_mask([flat])[1:]
  # Integers: subtract the minimum with wrap-around in the same-width unsigned
  # type; the true difference max - min always fits in it.
  u_t = _uint(flat.dtype.itemsize)
  if n == 0:
    return dict(kind="int", min=0, bits=0, raw=0, count=0), b""
  lo, hi = int(flat.min()), int(flat.max())
  bits = (hi - lo).bit_length()
  if bits == 0:
    return dict(kind="int", min=lo, bits=0, raw=0, count=n), b""
  u = flat.view(np.dtype(f"u{flat.dtype.itemsize}")) - u_t.type(lo % (1 << (8 * u_t.itemsize)))
  u = u.astype(_container(bits), copy=False)
  coded, payload = encode_symbols(u, bits)
  best = dict(kind="int", min=lo, raw=packed_nbytes(n, bits), **coded), payload
  if groups is not None:
    grouped = encode_grouped(flat, groups[0], groups[1], groups[2])
    if grouped is not None and encoded_cost(*grouped) <= encoded_cost(*best):
      best = grouped
  return best


def encoded_cost(record: dict, payload: bytes) -> int:
  """Payload bytes plus an estimate of the record's share of the manifest.

  The estimate is the record's JSON deflated on its own, an upper bound on
  what it adds to the zlib-compressed manifest in most cases.
  """
  js = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
  return len(payload) + len(zlib.compress(js, 9))


def _index_widths(idx: np.ndarray) -> range:
  """Relative-index widths worth trying: 2 up to the first that needs no filler.

  Beyond that width the gap codes are the gaps themselves, so their entropy
  coded size no longer changes and only the raw width grows. Width 1 (a unary
  code, one symbol per position) is tried only when no gap needs a filler:
  otherwise it is the bitmap in disguise, and as costly to size.
  """
  if not idx.size:
    return range(1, 2)
  top = int((np.diff(idx, prepend=-1) - 1).max())
  hi = min(_MAX_INDEX_BITS, max(1, (top + 1).bit_length()))
  return range(min(2, hi), hi + 1)


def bit_groups(flat: np.ndarray, g: int) -> np.ndarray:
  """A bool bitmap as ``g``-bit symbols: bit ``i`` of symbol ``j`` is position
  ``j * g + i``; the last group is zero-padded. ``uint8`` (``g <= 8``)."""
  n = int(flat.size)
  bits = np.zeros(-(-n // g) * g, np.uint8)
  bits[:n] = flat
  weights = (1 << np.arange(g)).astype(np.uint8)
  return (bits.reshape(-1, g) * weights).sum(axis=1, dtype=np.uint8)


def _bitgroups_decode(rec: dict, payload: np.ndarray, count: int) -> np.ndarray:
  """Inverts the ``bitgroups`` mask scheme, checking the record before use."""
  g = rec.get("group_bits")
  if type(g) is not int or g not in GROUP_BITS:  # noqa: E721
    raise ValueError(f"group_bits must be one of {GROUP_BITS}, got {g!r}")
  groups = -(-count // g)
  bits, n = rec.get("bits"), rec.get("count")
  if type(bits) is not int or type(n) is not int or bits != g or n != groups:  # noqa: E721
    raise ValueError(f"a bitgroups mask of {count} positions needs {groups} "
                     f"symbols of {g} bits, the record says {n!r} of {bits!r}")
  sym = decode_symbols(rec, payload)
  if sym.size != groups or (sym.size and int(sym.max()) >> g):
    raise ValueError(f"bitgroups symbols must be {groups} values < 2**{g}")
  if groups and int(sym[-1]) >> (count - (groups - 1) * g):
    raise ValueError("the last bit group has nonzero padding bits")
  shifts = np.arange(g, dtype=np.uint8)
  return ((sym[:, None] >> shifts) & 1).astype(bool).reshape(-1)[:count]


def encode_mask(candidates) -> tuple[int, dict, bytes]:
  """Codes a bool mask given in one or more scan orders; the smallest wins.

  For every scan order, the bitmap and relative indices of every useful width
  (:func:`_index_widths`) are sized by what the entropy coder would make of
  them (:func:`compressax.io._entropy.estimate_nbytes`, exact for raw and
  Huffman). The two smallest estimates are then coded for real, together with
  the choice of the raw-size rule in the first order (:func:`best_index_bits`
  and the bitmap), and the smallest payload is kept: never larger than the raw
  rule's. The bitmap in groups of ``g`` bits (``bitgroups``, every ``g`` in
  :data:`GROUP_BITS` and every order) is sized the same way, and its smallest
  estimate is coded last: it is kept only if strictly smaller than all the
  others, so a mask it does not help is stored as before.

  Args:
    candidates: the same mask flattened in different scan orders (1-D bool
      arrays of equal size); the first is the reference order.

  Returns:
    ``(k, record, payload)`` for the chosen candidate ``k``.

  References:
    Han, Mao, Dally. Deep Compression. ICLR 2016, Sec. 3.
    https://arxiv.org/abs/1510.00149
    Mishra et al. Accelerating Sparse Deep Neural Networks (2:4 sparsity).
    https://arxiv.org/abs/2104.08378
  """
  kept = [np.flatnonzero(flat) for flat in candidates]

  def symbols(k, b):
    if b < 0:
      return bit_groups(candidates[k], -b), -b
    return (candidates[k].astype(np.uint8), 1) if b == 0 else \
        (relative_index_encode(kept[k], b), b)

  # (estimated bytes, candidate, width; 0 = bitmap, -g = bitgroups of g bits)
  # A bitmap's symbol counts, hence its size, do not depend on the order.
  options = [(estimate_nbytes(*symbols(0, 0)), 0, 0)]
  for k, idx in enumerate(kept):
    options += [(estimate_nbytes(*symbols(k, b)), k, b) for b in _index_widths(idx)]
  options.sort()
  tries = [o[1:] for o in options[:2]]
  for must in ((0, best_index_bits(kept[0], _MAX_INDEX_BITS)[0]), (0, 0)):
    if must not in tries:
      tries.append(must)
  if candidates[0].size >= 2 and GROUP_BITS:
    tries.append(min((estimate_nbytes(*symbols(k, -g)), k, -g)
                     for k in range(len(candidates)) for g in GROUP_BITS)[1:])

  def encoded(k, b):
    sym, width = symbols(k, b)
    rec, payload = encode_symbols(sym, width)
    n = candidates[k].size
    if b < 0:
      meta = dict(kind="bool", scheme="bitgroups", group_bits=-b,
                  raw=packed_nbytes(sym.size, -b))
    elif b == 0:
      meta = dict(kind="bool", scheme="bitmap", raw=packed_nbytes(n, 1))
    else:
      meta = dict(kind="bool", scheme="relidx", index_bits=b,
                  raw=packed_nbytes(sym.size, b))
    return k, dict(**meta, **rec), payload

  # The smallest payload; the first of equals, in `tries` order.
  return min((encoded(k, b) for k, b in tries), key=lambda t: len(t[2]))


def decode_flat(rec: dict, payload, dtype, count: int, siblings=None) -> np.ndarray:
  """Inverts :func:`encode_flat`: ``count`` elements of ``dtype``.

  ``siblings``: the node's fields decoded so far (name -> array), where a
  grouped record finds its widths.
  """
  dtype = np.dtype(dtype)
  kind = kind_of(dtype)
  if rec.get("kind") != kind:
    raise ValueError(f"encoding {rec.get('kind')!r} does not match dtype {dtype}")
  payload = np.frombuffer(payload, np.uint8)
  if kind == "float" and "scheme" in rec:
    return _decode_zeros(rec, payload, dtype, count)
  if kind == "float":
    if payload.size != count * dtype.itemsize:
      raise ValueError(f"{count} x {dtype} needs {count * dtype.itemsize} "
                       f"bytes, got {payload.size}")
    return payload.view(_uint(dtype.itemsize)).astype(
        np.dtype(f"u{dtype.itemsize}")).view(dtype)
  if kind == "bool":
    if rec["scheme"] == "bitgroups":
      return _bitgroups_decode(rec, payload, count)
    if rec["scheme"] == "bitmap" and int(rec["count"]) != count:
      raise ValueError("bitmap size does not match the shape")
    symbols = decode_symbols(rec, payload)
    if rec["scheme"] == "bitmap":
      return symbols.astype(bool)
    if rec["scheme"] != "relidx":
      raise ValueError(f"unknown mask scheme {rec['scheme']!r}")
    return relative_index_decode(symbols, int(rec["index_bits"]), count)
  if "scheme" in rec:
    if rec["scheme"] != "grouped":
      raise ValueError(f"unknown integer scheme {rec['scheme']!r}")
    return decode_grouped(rec, payload, dtype, count,
                          (siblings or {}).get(rec["widths"]))
  bits = int(rec["bits"])
  if bits < 0 or bits > 8 * dtype.itemsize or int(rec["count"]) != count:
    raise ValueError(f"bad integer encoding for {count} x {dtype}")
  u_t = _uint(dtype.itemsize)
  lo = int(rec["min"]) % (1 << (8 * u_t.itemsize))
  if bits == 0:
    if payload.size:
      raise ValueError("a constant integer array has a non-empty payload")
    u = np.zeros(count, u_t)
  else:
    u = decode_symbols(rec, payload).astype(u_t)
  return (u + u_t.type(lo)).astype(np.dtype(f"u{dtype.itemsize}")).view(dtype)


def _decode_zeros(rec: dict, payload: np.ndarray, dtype: np.dtype,
                  count: int) -> np.ndarray:
  """A float array stored as the mask of its nonzero elements plus their bytes."""
  if rec["scheme"] != "zeros":
    raise ValueError(f"unknown float scheme {rec['scheme']!r}")
  nnz, mb = rec["nnz"], rec["mask_bytes"]
  if type(nnz) is not int or type(mb) is not int or not 0 <= nnz <= count \
      or not 0 <= mb <= payload.size \
      or payload.size - mb != nnz * dtype.itemsize:  # noqa: E721
    raise ValueError(f"{nnz!r} nonzeros of {dtype} and a mask of {mb!r} bytes "
                     f"do not fill a payload of {payload.size} bytes")
  mrec = rec["mask"]
  if not isinstance(mrec, dict) or mrec.get("scheme") not in ("bitmap", "relidx",
                                                             "bitgroups"):
    raise ValueError("bad mask record for the nonzeros")
  if mrec["scheme"] == "relidx" and int(mrec["count"]) > count + nnz:
    # Kept entries plus fillers (one per 2^b - 1 pruned positions) fit easily.
    raise ValueError("more relative-index codes than positions")
  mask = decode_flat(mrec, payload[:mb], np.bool_, count)
  if int(np.count_nonzero(mask)) != nnz:
    raise ValueError(f"the mask keeps {int(np.count_nonzero(mask))} elements, "
                     f"the record says {nnz}")
  u_t = np.dtype(f"u{dtype.itemsize}")
  out = np.zeros(count, u_t)
  out[mask] = payload[mb:].view(_uint(dtype.itemsize)).astype(u_t)
  return out.view(dtype)
