"""Bit packing of unsigned integer codes at any width.

A leaf of ``b``-bit codes costs ``ceil(n * b / 8)`` bytes instead of one byte
(or more) per code. The packed layout is fixed and platform independent:
code ``i`` occupies bits ``[i * b, (i + 1) * b)`` of the stream, least
significant bit first, and stream bit ``k`` is bit ``k % 8`` of byte
``k // 8`` (NumPy's ``bitorder="little"``). Unused high bits of the last byte
are zero.

References:
  Han, Mao, Dally. Deep Compression: Compressing Deep Neural Networks with
  Pruning, Trained Quantization and Huffman Coding. ICLR 2016.
  https://arxiv.org/abs/1510.00149
"""

from __future__ import annotations

import numpy as np

__all__ = ["pack_bits", "unpack_bits", "packed_nbytes"]

MAX_BITS = 64
# Codes are processed in chunks of this many elements (a multiple of 8, so
# every chunk's bit stream is whole bytes) to bound temporary memory.
_CHUNK = 1 << 20


def _container(bits: int) -> np.dtype:
  for width in (8, 16, 32, 64):
    if bits <= width:
      return np.dtype(f"<u{width // 8}")
  raise AssertionError(bits)


def _check_width(bits) -> int:
  if isinstance(bits, bool) or int(bits) != bits or not 1 <= bits <= MAX_BITS:
    raise ValueError(f"bits must be an integer in [1, {MAX_BITS}], got {bits!r}")
  return int(bits)


def packed_nbytes(count: int, bits: int) -> int:
  """Bytes taken by ``count`` codes of ``bits`` bits each."""
  return (int(count) * int(bits) + 7) // 8


def pack_bits(codes, bits: int) -> np.ndarray:
  """Packs unsigned integer codes into a dense little-endian bit stream.

  Args:
    codes: array-like of non-negative integers (any shape; flattened in C
      order).
    bits: code width, an integer in ``[1, 64]`` (Deep Compression uses 5 to 8).

  Returns:
    A 1-D ``uint8`` array of ``ceil(codes.size * bits / 8)`` bytes.

  Raises:
    ValueError: if ``bits`` is out of range, ``codes`` is not integer, or a
      code is negative or ``>= 2**bits``.

  Example:
    >>> pack_bits([1, 2, 3], 2).tolist()
    [57]

  References:
    Han, Mao, Dally. Deep Compression. ICLR 2016.
    https://arxiv.org/abs/1510.00149
  """
  bits = _check_width(bits)
  codes = np.asarray(codes)
  if codes.dtype == bool:
    codes = codes.astype(np.uint8)
  if not np.issubdtype(codes.dtype, np.integer):
    raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
  flat = codes.reshape(-1)
  if flat.size:
    lo, hi = int(flat.min()), int(flat.max())
    if lo < 0 or hi >= (1 << bits):
      bad = lo if lo < 0 else hi
      raise ValueError(f"code {bad} does not fit in {bits} bits "
                       f"(codes must be in [0, {(1 << bits) - 1}])")
  container = _container(bits)
  if bits in (4, 8, 16, 32, 64):  # byte-aligned layouts: no bit matrix needed
    c = flat.astype(container)
    if bits == 4:
      c = np.concatenate([c, np.zeros(c.size % 2, c.dtype)]).reshape(-1, 2)
      c = c[:, 0] | (c[:, 1] << np.uint8(4))
    return c.view(np.uint8).reshape(-1)
  nbytes_in = container.itemsize
  out = np.empty(packed_nbytes(flat.size, bits), np.uint8)
  step = _CHUNK
  for start in range(0, flat.size, step):
    chunk = flat[start:start + step].astype(container, copy=False)
    # Little-endian bytes of each code, then its bits LSB first: column j of
    # `bitmat` is bit j of the code; keep the low `bits` columns.
    bitmat = np.unpackbits(chunk.view(np.uint8).reshape(-1, nbytes_in),
                           axis=1, bitorder="little")[:, :bits]
    packed = np.packbits(bitmat.reshape(-1), bitorder="little")
    o = start * bits // 8  # whole bytes: `start` is a multiple of 8
    out[o:o + packed.size] = packed
  return out


def unpack_bits(buf, bits: int, count: int) -> np.ndarray:
  """Inverts :func:`pack_bits`.

  Args:
    buf: the packed bytes (``bytes``, ``bytearray`` or a ``uint8`` array).
    bits: the code width used to pack, in ``[1, 64]``.
    count: the number of codes to read.

  Returns:
    A 1-D array of ``count`` codes in the smallest unsigned dtype holding
    ``bits`` bits (``uint8``, ``uint16``, ``uint32`` or ``uint64``).

  Raises:
    ValueError: if ``buf`` does not hold exactly
      ``ceil(count * bits / 8)`` bytes or its padding bits are not zero.

  References:
    Han, Mao, Dally. Deep Compression. ICLR 2016.
    https://arxiv.org/abs/1510.00149
  """
  bits = _check_width(bits)
  count = int(count)
  data = np.frombuffer(buf, np.uint8) if isinstance(buf, (bytes, bytearray, memoryview)) \
      else np.asarray(buf, np.uint8).reshape(-1)
  need = packed_nbytes(count, bits)
  if count < 0 or data.size != need:
    raise ValueError(f"{count} codes of {bits} bits need {need} bytes, "
                     f"got {data.size}")
  tail = count * bits % 8
  if tail and data[-1] >> tail:
    raise ValueError("nonzero padding bits after the last code")
  container = _container(bits)
  if bits in (8, 16, 32, 64):
    return data.view(container).copy()
  if bits == 4:
    out = np.empty((data.size, 2), np.uint8)
    out[:, 0] = data & np.uint8(15)
    out[:, 1] = data >> np.uint8(4)
    return out.reshape(-1)[:count]
  width = container.itemsize * 8
  out = np.empty(count, container)
  step = _CHUNK
  for start in range(0, count, step):
    n = min(step, count - start)
    o = start * bits // 8
    chunk_bits = np.unpackbits(data[o:o + packed_nbytes(n, bits)],
                               bitorder="little", count=n * bits)
    full = np.zeros((n, width), np.uint8)
    full[:, :bits] = chunk_bits.reshape(n, bits)
    le = np.packbits(full, axis=1, bitorder="little")
    out[start:start + n] = le.reshape(-1).view(container)
  return out
