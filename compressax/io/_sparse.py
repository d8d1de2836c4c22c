"""Sparse position storage: Deep Compression's relative indices, or a bitmap.

Deep Compression stores the positions of the kept weights of a pruned layer
as *gaps* between consecutive kept entries, each in ``b`` bits (5 for fully
connected layers, 8 for conv layers), and inserts a *filler zero* entry when a
gap does not fit.

Exact convention used here (positions are C-order flat indices):

* The gap of a kept entry is the number of pruned positions between it and
  the previous entry (the first entry counts from position ``-1``), so a gap
  is ``>= 0``. Positions after the last kept entry are implicit.
* With ``b`` index bits, let ``F = 2**b - 1`` (the all-ones code). Codes
  ``0 .. F-1`` are kept entries with that gap. The code ``F`` is a filler
  zero: an entry that sits on the pruned position ``F`` places after the
  previous entry (the ``F-1`` positions before it are pruned too) and is not
  kept.
* A gap ``g >= F`` therefore becomes ``g // F`` fillers, at positions
  ``prev + F, prev + 2F, ...``, followed by the kept entry with code
  ``g % F``.

Deep Compression's figure spends all ``2**b`` codes on gaps and gives the
filler a stored zero weight, which cannot be told apart from a kept weight
that happens to be zero; reserving the all-ones code makes decoding exact for
masks at the cost of one code value.

References:
  Han, Mao, Dally. Deep Compression: Compressing Deep Neural Networks with
  Pruning, Trained Quantization and Huffman Coding. ICLR 2016, Sec. 3 and
  Fig. 2. https://arxiv.org/abs/1510.00149
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "relative_index_encode",
    "relative_index_decode",
    "best_index_bits",
    "bitmap_encode",
    "bitmap_decode",
]


def _flat_indices(mask_or_flat_indices) -> np.ndarray:
  a = np.asarray(mask_or_flat_indices)
  if a.dtype == bool:
    return np.flatnonzero(a.reshape(-1)).astype(np.int64)
  if not np.issubdtype(a.dtype, np.integer) or a.ndim != 1:
    raise ValueError("expected a bool mask or a 1-D array of flat indices, "
                     f"got dtype {a.dtype} and shape {a.shape}")
  idx = a.astype(np.int64)
  if idx.size and (idx[0] < 0 or np.any(np.diff(idx) <= 0)):
    raise ValueError("flat indices must be non-negative and strictly increasing")
  return idx


def _gaps(idx: np.ndarray) -> np.ndarray:
  return np.diff(idx, prepend=np.int64(-1)) - 1


def relative_index_encode(mask_or_flat_indices, index_bits: int) -> np.ndarray:
  """Deep Compression relative-index coding of kept positions.

  Args:
    mask_or_flat_indices: a bool mask of any shape (True = kept; flattened in
      C order) or a 1-D strictly increasing array of flat indices.
    index_bits: ``b``, bits per stored gap, in ``[1, 32]``.

  Returns:
    A 1-D ``uint32`` array of codes in ``[0, 2**b - 1]``: one per kept entry
    plus one per filler (see the module docstring for where fillers go).

  Raises:
    ValueError: for a bad ``index_bits`` or unsorted indices.

  Example:
    >>> relative_index_encode([1, 4, 15], 2).tolist()  # F = 3
    [1, 2, 3, 3, 3, 1]

  References:
    Han, Mao, Dally. Deep Compression. ICLR 2016, Fig. 2.
    https://arxiv.org/abs/1510.00149
  """
  if isinstance(index_bits, bool) or index_bits != int(index_bits) or \
      not 1 <= index_bits <= 32:
    raise ValueError(f"index_bits must be an integer in [1, 32], got {index_bits!r}")
  fill = (1 << int(index_bits)) - 1
  g = _gaps(_flat_indices(mask_or_flat_indices))
  nfill, last = np.divmod(g, fill)
  # Kept entry k lands after all fillers of entries 0..k.
  where_kept = np.arange(g.size) + np.cumsum(nfill)
  out = np.full(g.size + int(nfill.sum()), fill, np.uint32)
  out[where_kept] = last
  return out


def relative_index_decode(codes, index_bits: int, size: int) -> np.ndarray:
  """Inverts :func:`relative_index_encode` into a flat bool mask.

  Args:
    codes: the stored gap codes.
    index_bits: ``b`` used to encode.
    size: the number of positions (the dense leaf's size).

  Returns:
    A 1-D bool array of length ``size``.

  Raises:
    ValueError: for ``index_bits`` outside [1, 32] (a file's claim: checked
      before ``2**b`` is formed), or if the codes point past ``size`` or
      exceed ``2**b - 1``.

  References:
    Han, Mao, Dally. Deep Compression. ICLR 2016.
    https://arxiv.org/abs/1510.00149
  """
  if isinstance(index_bits, bool) or index_bits != int(index_bits) or \
      not 1 <= index_bits <= 32:
    raise ValueError(f"index_bits must be an integer in [1, 32], got {index_bits!r}")
  fill = (1 << int(index_bits)) - 1
  c = np.asarray(codes).astype(np.int64).reshape(-1)
  if c.size and (c.min() < 0 or c.max() > fill):
    raise ValueError(f"relative index codes must be in [0, {fill}]")
  is_fill = c == fill
  pos = np.cumsum(np.where(is_fill, fill, c + 1)) - 1
  if c.size and pos[-1] >= size:
    raise ValueError(f"relative indices reach position {int(pos[-1])} of a "
                     f"leaf with {size} positions")
  out = np.zeros(int(size), bool)
  out[pos[~is_fill]] = True
  return out


def best_index_bits(mask_or_flat_indices, max_bits: int = 16) -> tuple[int, int]:
  """The ``b`` minimizing ``b * len(relative_index_encode(., b))``.

  This is the raw (bit-packed) size. :func:`compressax.io.save` instead picks
  the width by the *entropy-coded* size of the gap codes, which favours wider
  codes with fewer fillers (e.g. 8 instead of 4 bits on LeNet-300-100's first
  layer); it never does worse than this rule.

  Returns:
    ``(b, number_of_codes)``; ``(1, 0)`` when nothing is kept.
  """
  g = _gaps(_flat_indices(mask_or_flat_indices))
  if not g.size:
    return 1, 0
  best: tuple[int, int] | None = None
  for b in range(1, max_bits + 1):
    fill = (1 << b) - 1
    n = g.size + int((g // fill).sum())
    if best is None or b * n < best[0] * best[1]:
      best = (b, n)
    if int(g.max()) < fill:  # wider codes only cost more from here on
      break
  if best is None:
    raise ValueError(f"max_bits must be >= 1, got {max_bits}")
  return best


def bitmap_encode(mask) -> np.ndarray:
  """One bit per position, C order, LSB first (``np.packbits`` little)."""
  return np.packbits(np.asarray(mask, bool).reshape(-1), bitorder="little")


def bitmap_decode(buf, size: int) -> np.ndarray:
  """Inverts :func:`bitmap_encode` into a flat bool mask of ``size``."""
  data = np.frombuffer(buf, np.uint8) if isinstance(buf, (bytes, bytearray)) \
      else np.asarray(buf, np.uint8)
  if data.size != (int(size) + 7) // 8:
    raise ValueError(f"a bitmap of {size} positions needs {(size + 7) // 8} "
                     f"bytes, got {data.size}")
  return np.unpackbits(data, bitorder="little", count=int(size)).astype(bool)
