"""Entropy coding of integer symbols: canonical Huffman and ANS.

Deep Compression Huffman-codes the weight indices and the relative position
indices of a pruned, quantized layer, saving 20-30%. This module provides

* canonical Huffman codes (code lengths from symbol counts, limited to
  ``MAX_CODE_LEN`` bits; only the length table is stored), encoded with table
  lookups and ``np.packbits`` and decoded by a table-driven loop that decodes
  all blocks of ``BLOCK`` symbols in lockstep (the bit length of each block is
  stored so every block can start independently);
* asymmetric numeral systems (ANS) through the ``constriction`` library, with a
  categorical model built from the empirical counts quantized to integers
  (stored in the payload), so encoder and decoder use the very same model.

Both decoders are exact. :func:`encode_symbols` picks the smallest of raw bit
packing, Huffman and ANS for a payload.

References:
  Han, Mao, Dally. Deep Compression. ICLR 2016. https://arxiv.org/abs/1510.00149
  Huffman. A Method for the Construction of Minimum-Redundancy Codes. 1952.
  Duda. Asymmetric numeral systems. https://arxiv.org/abs/1311.2540
  Bamler. Understanding Entropy Coding With Asymmetric Numeral Systems
  (constriction). https://arxiv.org/abs/2201.01741
"""

from __future__ import annotations

import heapq
import math
from typing import Any

import numpy as np
from numpy.typing import DTypeLike

from compressax.io._bitpack import _container, pack_bits, packed_nbytes, unpack_bits

__all__ = [
    "huffman_code_lengths",
    "canonical_codes",
    "huffman_encode",
    "huffman_decode",
    "ans_encode",
    "ans_decode",
    "encode_symbols",
    "decode_symbols",
    "entropy_bits",
    "estimate_nbytes",
]

MAX_CODE_LEN = 20
BLOCK = 2048
# Symbols are processed in chunks of this many (a multiple of BLOCK) so that
# temporaries stay small next to the leaf itself.
_CHUNK = 1 << 18
_LEN_BITS = 5  # a code length (<= 20) in the stored length table


def _check_counts(counts, name: str) -> np.ndarray:
  c = np.asarray(counts)
  if c.ndim != 1:
    raise ValueError(f"{name}: counts must be a 1-D array, got shape {c.shape}")
  if c.size and not (np.issubdtype(c.dtype, np.integer)
                     or np.issubdtype(c.dtype, np.floating)):
    raise ValueError(f"{name}: counts must be numbers, got dtype {c.dtype}")
  bad = ~np.isfinite(c.astype(np.float64)) | (c < 0)
  if bad.any():
    raise ValueError(f"{name}: counts must be finite and >= 0, got "
                     f"{c[bad][:4].tolist()} at symbol(s) "
                     f"{np.flatnonzero(bad)[:4].tolist()}")
  return c


def entropy_bits(counts) -> float:
  """Empirical entropy of a sample in bits: ``-sum c log2(c / n)``.

  Raises:
    ValueError: ``counts`` is not 1-D, or holds a negative or non-finite
      value.
  """
  c = _check_counts(counts, "entropy_bits").astype(np.float64)
  c = c[c > 0]
  n = c.sum()
  return float(-(c * np.log2(c / n)).sum()) if n else 0.0


# ------------------------------------------------------------------ Huffman


def _huffman_lengths_unlimited(counts: np.ndarray) -> np.ndarray:
  present = np.flatnonzero(counts)
  lengths = np.zeros(counts.size, np.int64)
  if present.size == 1:
    lengths[present] = 1
  if present.size <= 1:
    return lengths
  # Ties broken by node id, so the code is a deterministic function of counts.
  heap = [(int(counts[s]), i) for i, s in enumerate(present)]
  heapq.heapify(heap)
  parent = [0] * (2 * present.size - 1)
  nxt = present.size
  while len(heap) > 1:
    w1, a = heapq.heappop(heap)
    w2, b = heapq.heappop(heap)
    parent[a] = parent[b] = nxt
    heapq.heappush(heap, (w1 + w2, nxt))
    nxt += 1
  depth = [0] * nxt
  for i in range(nxt - 2, -1, -1):  # parents have larger ids than children
    depth[i] = depth[parent[i]] + 1
  lengths[present] = depth[:present.size]
  return lengths


def huffman_code_lengths(counts, max_len: int = MAX_CODE_LEN) -> np.ndarray:
  """Huffman code lengths from symbol counts, at most ``max_len`` bits.

  Args:
    counts: 1-D non-negative counts per symbol ``0..A-1``.
    max_len: the longest code allowed. Longer codes are avoided by halving
      the counts (keeping them >= 1) until the code fits, a standard
      near-optimal length limit.

  Returns:
    An ``int64`` array of lengths, 0 for absent symbols. A lone symbol gets
    length 1.

  Raises:
    ValueError: ``counts`` is not 1-D or holds a negative, non-finite or
      fractional value, or ``max_len`` is too short for the present symbols
      (``A`` symbols need ``max_len >= max(1, ceil(log2 A))``).

  References:
    Huffman. A Method for the Construction of Minimum-Redundancy Codes. 1952.
    Han, Mao, Dally. Deep Compression. ICLR 2016.
    https://arxiv.org/abs/1510.00149
  """
  c = _check_counts(counts, "huffman_code_lengths")
  if np.any(c != np.floor(c)):
    raise ValueError("huffman_code_lengths: counts must be whole numbers")
  counts = c.astype(np.int64)
  if isinstance(max_len, (bool, np.bool_)) or not isinstance(
      max_len, (int, np.integer)):
    raise ValueError(f"huffman_code_lengths: max_len must be an int, got "
                     f"{max_len!r}")
  present = int(np.count_nonzero(counts))
  need = max(1, (present - 1).bit_length()) if present else 0
  if max_len < need:
    # Halving the counts could never make the code fit: it would loop.
    raise ValueError(f"huffman_code_lengths: {present} symbols need codes of "
                     f"at least {need} bits, but max_len={max_len}")
  lengths = _huffman_lengths_unlimited(counts)
  while lengths.max(initial=0) > max_len:
    counts = np.where(counts > 0, (counts + 1) // 2, 0)
    lengths = _huffman_lengths_unlimited(counts)
  return lengths


def canonical_codes(lengths) -> np.ndarray:
  """Canonical Huffman codes: by (length, symbol), consecutive integers.

  Returns:
    ``uint32`` codes (MSB-first values of ``lengths[s]`` bits; 0 where absent).
  """
  lengths = np.asarray(lengths, np.int64)
  codes = np.zeros(lengths.size, np.uint32)
  code = 0
  prev_len = 0
  for ln in range(1, int(lengths.max(initial=0)) + 1):
    syms = np.flatnonzero(lengths == ln)
    code <<= ln - prev_len
    prev_len = ln
    codes[syms] = code + np.arange(syms.size, dtype=np.uint32)
    code += syms.size
  return codes


def huffman_encode(symbols, lengths) -> tuple[np.ndarray, np.ndarray]:
  """Encodes symbols with a canonical code; returns ``(stream, block_bits)``.

  The stream is the codes' bits MSB first, packed big-endian into bytes;
  ``block_bits[k]`` is the bit length of symbols ``[k*BLOCK, (k+1)*BLOCK)``.
  """
  symbols = np.asarray(symbols).reshape(-1)
  lengths = np.asarray(lengths, np.int64)
  codes = canonical_codes(lengths)
  top = max(int(lengths.max(initial=0)), 1)
  shifts = np.arange(top - 1, -1, -1, dtype=np.uint32)
  pieces, carry, blocks = [], np.zeros(0, np.uint8), []
  for start in range(0, symbols.size, _CHUNK):
    s = symbols[start:start + _CHUNK]
    ln = lengths[s]
    blocks.append(np.add.reduceat(ln, np.arange(0, s.size, BLOCK)))
    aligned = codes[s] << (top - ln).astype(np.uint32)  # left-align to `top`
    bitmat = ((aligned[:, None] >> shifts[None, :]) & 1).astype(np.uint8)
    valid = np.arange(top)[None, :] < ln[:, None]
    bits = np.concatenate([carry, bitmat[valid]])
    whole = bits.size // 8 * 8
    pieces.append(np.packbits(bits[:whole]))
    carry = bits[whole:]
  pieces.append(np.packbits(carry))
  return np.concatenate(pieces), np.concatenate(blocks or [np.zeros(0, np.int64)])


def _block_bits(symbols, lengths) -> np.ndarray:
  return np.concatenate(
      [np.add.reduceat(lengths[symbols[i:i + _CHUNK]],
                       np.arange(0, min(_CHUNK, symbols.size - i), BLOCK))
       for i in range(0, symbols.size, _CHUNK)] or [np.zeros(0, np.int64)])


def _counts(symbols) -> np.ndarray:
  size = max(2, int(symbols.max()) + 1) if symbols.size else 2
  counts = np.zeros(size, np.int64)
  for i in range(0, symbols.size, _CHUNK):
    counts += np.bincount(symbols[i:i + _CHUNK].astype(np.intp), minlength=size)
  return counts


def huffman_decode(stream, lengths, block_bits, count: int,
                   dtype: DTypeLike = np.int64) -> np.ndarray:
  """Inverts :func:`huffman_encode`; raises ``ValueError`` on a bad stream."""
  lengths = np.asarray(lengths, np.int64)
  count = int(count)
  nblocks = -(-count // BLOCK)
  block_bits = np.asarray(block_bits, np.int64)
  data = np.frombuffer(stream, np.uint8) if isinstance(stream, (bytes, bytearray)) \
      else np.asarray(stream, np.uint8)
  total = int(block_bits.sum())
  if block_bits.size != nblocks or (total + 7) // 8 != data.size:
    raise ValueError("Huffman block table does not match the stream")
  if count == 0:
    return np.zeros(0, dtype)
  top = int(lengths.max(initial=0))
  if top == 0 or top > MAX_CODE_LEN:
    raise ValueError("bad Huffman code length table")
  present = np.flatnonzero(lengths)
  order = present[np.lexsort((present, lengths[present]))]
  span = 1 << (top - lengths[order])
  if int(span.sum()) > (1 << top):
    raise ValueError("Huffman code lengths violate the Kraft inequality")
  pad = (1 << top) - int(span.sum())  # only a lone symbol leaves a gap
  table_sym = np.concatenate([np.repeat(order, span), np.zeros(pad, np.int64)]
                             ).astype(dtype)
  table_len = np.concatenate([np.repeat(lengths[order], span),
                              np.ones(pad, np.int64)])
  # 32-bit big-endian word at every byte offset: a code of <= 20 bits starting
  # at any bit of byte i lies within it.
  buf = np.concatenate([data, np.zeros(4, np.uint8)]).astype(np.uint32)
  word = (buf[:-3] << 24) | (buf[1:-2] << 16) | (buf[2:-1] << 8) | buf[3:]
  limit = np.uint64(data.size * 8)
  starts = np.concatenate([[0], np.cumsum(block_bits)[:-1]]).astype(np.uint64)
  pos = starts.copy()
  out = np.empty((nblocks, BLOCK), dtype)
  last_n = count - (nblocks - 1) * BLOCK
  end_last = None
  shift_down = np.uint32(32 - top)
  # A lone block needs only its symbols' steps: a small array is not charged a
  # full block's loop (2048 NumPy steps), which dominated loading tiny masks.
  for j in range(BLOCK if nblocks > 1 else last_n):
    w = word[(pos >> np.uint64(3)).astype(np.intp)]
    win = (w << (pos & np.uint64(7)).astype(np.uint32)) >> shift_down
    out[:, j] = table_sym[win]
    pos = np.minimum(pos + table_len[win].astype(np.uint64), limit)
    if j == last_n - 1:
      end_last = int(pos[-1])
  ends = np.concatenate([starts[1:], [total]]).astype(np.uint64)
  if nblocks > 1 and not np.array_equal(pos[:-1], ends[:-1]):
    raise ValueError("Huffman stream does not decode to its block table")
  if end_last != total:
    raise ValueError("Huffman stream does not decode to its block table")
  return out.reshape(-1)[:count]


# ---------------------------------------------------------------------- ANS


def _ans_table(counts: np.ndarray) -> tuple[np.ndarray, int]:
  precision = min(22, max(16, int(counts.size - 1).bit_length() + 2))
  n = int(counts.sum())
  q = np.where(counts > 0,
               np.maximum(1, np.rint(counts * ((1 << precision) / n))), 0)
  return q.astype(np.int64), precision


def _stream() -> Any:
  """``constriction.stream`` (imported here: only needed to code)."""
  import constriction
  # A compiled module without type stubs: its names are unknown to checkers.
  return constriction.stream  # pyright: ignore[reportAttributeAccessIssue]


def _ans_model(q: np.ndarray):
  return _stream().model.Categorical(
      q.astype(np.float64) / float(q.sum()), perfect=False)


def ans_encode(symbols, q) -> np.ndarray:
  """ANS-encodes ``symbols`` with the categorical model ``q / q.sum()``.

  Returns:
    The compressed ``uint32`` words (``constriction``'s stack coder).

  References:
    Duda. Asymmetric numeral systems. https://arxiv.org/abs/1311.2540
    Bamler. Understanding Entropy Coding With Asymmetric Numeral Systems.
    https://arxiv.org/abs/2201.01741
  """
  symbols = np.asarray(symbols).reshape(-1)
  model = _ans_model(q)
  coder = _stream().stack.AnsCoder()
  # A stack: push chunks last to first so that decoding pops them in order.
  for start in reversed(range(0, symbols.size, _CHUNK)):
    coder.encode_reverse(symbols[start:start + _CHUNK].astype(np.int32), model)
  return coder.get_compressed()


def ans_decode(words, q, count: int, dtype: DTypeLike = np.int64) -> np.ndarray:
  """Inverts :func:`ans_encode`; raises ``ValueError`` if it does not."""
  words = np.asarray(words, np.uint32)
  if count == 0:
    if words.size:
      raise ValueError("ANS stream is not empty")
    return np.zeros(0, dtype)
  out = np.empty(int(count), dtype)
  try:
    coder = _stream().stack.AnsCoder(words)
    model = _ans_model(q)
    for start in range(0, out.size, _CHUNK):
      out[start:start + _CHUNK] = coder.decode(model, min(_CHUNK, out.size - start))
  except Exception as e:  # constriction reports corrupt data as its own errors
    raise ValueError(f"ANS stream does not decode: {e}") from None
  if not coder.is_empty():
    raise ValueError("ANS stream has data left after the last symbol")
  return out


# ------------------------------------------------------------- best of three


def encode_symbols(symbols, bits: int) -> tuple[dict, bytes]:
  """Codes unsigned symbols of ``bits`` bits with the smallest coder.

  Candidates: ``raw`` (bit packing), ``huffman`` and ``ans`` (only for
  ``bits <= 16``). Sizes of raw and Huffman are computed exactly from counts;
  ANS is encoded only when its estimated size wins, and then kept only if its
  actual size does.

  Args:
    symbols: 1-D non-negative integers ``< 2**bits``.
    bits: the code width, in ``[1, 64]``.

  Returns:
    ``(record, payload)``: ``record`` is a JSON-able dict of the coder's
    parameters (``coder``, ``bits``, ``count`` and section sizes), ``payload``
    the bytes.

  References:
    Han, Mao, Dally. Deep Compression. ICLR 2016.
    https://arxiv.org/abs/1510.00149
  """
  symbols = np.asarray(symbols).reshape(-1)
  plan = _plan(symbols, bits)
  n = symbols.size
  best = (plan["raw"], "raw")
  if plan.get("huffman", math.inf) < best[0]:
    best = (plan["huffman"], "huffman")
  if plan.get("ans", math.inf) < best[0]:
    q, precision, qbits, table = plan["_ans"]
    words = ans_encode(symbols, q)
    if table + 4 * words.size < best[0]:
      record = dict(coder="ans", bits=bits, count=n, alphabet=q.size,
                    precision=precision, table_bits=qbits, table_bytes=table)
      return record, pack_bits(q, qbits).tobytes() + words.astype("<u4").tobytes()
  if best[1] == "huffman":
    lengths = plan["_lengths"]
    stream, block_bits = huffman_encode(symbols, lengths)
    bb_bits = max(1, int(block_bits.max()).bit_length())
    lt = pack_bits(lengths, _LEN_BITS).tobytes()
    bt = pack_bits(block_bits, bb_bits).tobytes()
    record = dict(coder="huffman", bits=bits, count=n, alphabet=lengths.size,
                  block=BLOCK, block_bits=bb_bits, sections=[len(lt), len(bt)])
    return record, lt + bt + stream.tobytes()
  return dict(coder="raw", bits=bits, count=n), pack_bits(symbols, bits).tobytes() \
      if n else b""


def _plan(symbols: np.ndarray, bits: int) -> dict:
  """Payload sizes per coder: exact for raw and Huffman, estimated for ANS.

  The ANS figure is its table plus the cross-entropy of the symbols under the
  quantized model rounded up to 32-bit words, plus two words of coder state.
  """
  n = symbols.size
  plan: dict[str, Any] = {"raw": packed_nbytes(n, bits)}
  if bits <= 16 and n > 1:
    counts = _counts(symbols)
    lengths = huffman_code_lengths(counts)
    nblocks = -(-n // BLOCK)
    block_bits = _block_bits(symbols, lengths)
    bb_bits = max(1, int(block_bits.max()).bit_length())
    plan["huffman"] = (packed_nbytes(counts.size, _LEN_BITS)
                       + packed_nbytes(nblocks, bb_bits)
                       + (int((counts * lengths).sum()) + 7) // 8)
    plan["_lengths"] = lengths
    q, precision = _ans_table(counts)
    qbits = int(q.max()).bit_length()
    table = packed_nbytes(counts.size, qbits)
    present = counts > 0
    xent = -(counts[present] * np.log2(q[present] / q.sum())).sum()
    plan["ans"] = table + 4 * math.ceil(xent / 32 + 2)
    plan["_ans"] = (q, precision, qbits, table)
  return plan


def estimate_nbytes(symbols, bits: int) -> int:
  """The payload size :func:`encode_symbols` would produce, without coding.

  Exact when raw packing or Huffman wins; when ANS is expected to win, an
  estimate from the cross-entropy (usually within a word or two of the truth).

  Args:
    symbols: 1-D non-negative integers ``< 2**bits``.
    bits: the code width.

  Returns:
    The estimated payload bytes.

  References:
    Han, Mao, Dally. Deep Compression. ICLR 2016.
    https://arxiv.org/abs/1510.00149
  """
  plan = _plan(np.asarray(symbols).reshape(-1), bits)
  return int(min(v for k, v in plan.items() if not k.startswith("_")))


def decode_symbols(record: dict, payload) -> np.ndarray:
  """Inverts :func:`encode_symbols`; raises ``ValueError`` on bad data."""
  buf = np.frombuffer(payload, np.uint8)
  coder, bits, n = record["coder"], int(record["bits"]), int(record["count"])
  if coder == "raw":
    return unpack_bits(buf, bits, n)
  if bits > 16:
    raise ValueError(f"{coder} coding needs bits <= 16, got {bits}")
  a = int(record["alphabet"])
  if not 2 <= a <= max(2, 1 << bits):
    raise ValueError(f"alphabet of {a} symbols for {bits}-bit codes")
  if coder == "huffman":
    if int(record["block"]) != BLOCK:
      raise ValueError(f"unsupported Huffman block size {record['block']}")
    s1, s2 = (int(v) for v in record["sections"])
    nblocks = -(-n // BLOCK)
    if s1 != packed_nbytes(a, _LEN_BITS) or \
        s2 != packed_nbytes(nblocks, int(record["block_bits"])) or \
        s1 + s2 > buf.size:
      raise ValueError("Huffman section sizes do not match the payload")
    lengths = unpack_bits(buf[:s1], _LEN_BITS, a).astype(np.int64)
    block_bits = unpack_bits(buf[s1:s1 + s2], int(record["block_bits"]), nblocks)
    out = huffman_decode(buf[s1 + s2:], lengths, block_bits, n, _container(bits))
  elif coder == "ans":
    t = int(record["table_bytes"])
    if t != packed_nbytes(a, int(record["table_bits"])) or t > buf.size or \
        (buf.size - t) % 4:
      raise ValueError("ANS table size does not match the payload")
    q = unpack_bits(buf[:t], int(record["table_bits"]), a).astype(np.int64)
    if not q.any():
      raise ValueError("ANS frequency table is empty")
    out = ans_decode(buf[t:].view("<u4"), q, n, _container(bits))
  else:
    raise ValueError(f"unknown coder {coder!r}")
  if out.size and int(out.max()) >= a:
    raise ValueError("decoded symbol outside the alphabet")
  return out
