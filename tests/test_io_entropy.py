"""Canonical Huffman and ANS: exact decoding, optimality, entropy targets."""

import heapq

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from compressax import io


def _huffman_cost(counts):
  """Reference: total bits of an optimal prefix code = sum of merged weights."""
  heap = [int(c) for c in counts if c > 0]
  if len(heap) == 1:
    return heap[0]
  heapq.heapify(heap)
  total = 0
  while len(heap) > 1:
    merged = heapq.heappop(heap) + heapq.heappop(heap)
    total += merged
    heapq.heappush(heap, merged)
  return total


@st.composite
def _symbols(draw):
  bits = draw(st.integers(1, 8))
  n = draw(st.integers(0, 5000))
  skew = draw(st.floats(0.0, 3.0))
  seed = draw(st.integers(0, 2 ** 31))
  rng = np.random.default_rng(seed)
  p = np.exp(-skew * np.arange(1 << bits))
  return bits, rng.choice(1 << bits, size=n, p=p / p.sum())


@given(_symbols())
def test_huffman_is_optimal_canonical_and_exact(case):
  _, x = case
  counts = np.bincount(x, minlength=2)
  lengths = io.huffman_code_lengths(counts)
  assert np.all((lengths > 0) == (counts > 0)) or (counts > 0).sum() == 0
  if (counts > 0).sum() >= 2:
    assert np.sum(2.0 ** -lengths[lengths > 0]) == 1.0  # complete code (Kraft)
    if lengths.max() < io._entropy.MAX_CODE_LEN:
      assert int((counts * lengths).sum()) == _huffman_cost(counts)
  codes = io.canonical_codes(lengths)
  words = {format(int(c), f"0{l}b") for c, l in zip(codes, lengths) if l}
  assert all(not b.startswith(a) for a in words for b in words if a != b)  # prefix-free
  if x.size:
    stream, block_bits = io.huffman_encode(x, lengths)
    assert int(block_bits.sum()) == int((counts * lengths).sum())
    np.testing.assert_array_equal(io.huffman_decode(stream, lengths, block_bits, x.size), x)


@given(_symbols())
def test_ans_and_best_of_three_are_exact(case):
  bits, x = case
  record, payload = io.encode_symbols(x, bits)
  np.testing.assert_array_equal(io.decode_symbols(record, payload), x)
  assert len(payload) <= io.packed_nbytes(x.size, bits)  # never worse than raw
  if x.size > 1:
    counts = np.bincount(x, minlength=2)
    q = np.maximum(counts, 1)
    np.testing.assert_array_equal(io.ans_decode(io.ans_encode(x, q), q, x.size), x)


def test_code_length_limit():
  counts = np.array([2 ** k for k in range(40)], np.int64)  # Fibonacci-like: deep tree
  lengths = io.huffman_code_lengths(counts, max_len=12)
  assert lengths.max() == 12
  assert np.sum(2.0 ** -lengths) == 1.0
  x = np.repeat(np.arange(40), 3)
  stream, bb = io.huffman_encode(x, lengths)
  np.testing.assert_array_equal(io.huffman_decode(stream, lengths, bb, x.size), x)


def _laplace_codes(n, bits=5, seed=0):
  rng = np.random.default_rng(seed)
  half = 1 << (bits - 1)
  return np.clip(np.round(rng.laplace(0.0, 2.5, size=n)) + half, 0, 2 * half - 1
                 ).astype(np.int64)


def test_within_one_percent_of_entropy_on_1m_symbols():
  x = _laplace_codes(1_000_000)
  h = io.entropy_bits(np.bincount(x))
  assert h < 0.8 * 5 * x.size  # skewed: worth coding
  record, payload = io.encode_symbols(x, 5)
  assert record["coder"] == "ans"
  assert 8 * len(payload) <= 1.01 * h
  np.testing.assert_array_equal(io.decode_symbols(record, payload), x)
  lengths = io.huffman_code_lengths(np.bincount(x))
  stream, bb = io.huffman_encode(x, lengths)
  assert 8 * stream.size <= h + x.size  # Huffman's bound: < H + 1 bit/symbol
  np.testing.assert_array_equal(io.huffman_decode(stream, lengths, bb, x.size), x)


def test_huffman_chosen_when_smallest_and_raw_for_uniform():
  rng = np.random.default_rng(1)
  uniform = rng.integers(0, 16, size=4096)
  record, _ = io.encode_symbols(uniform, 4)
  assert record["coder"] == "raw"
  # Dyadic probabilities: Huffman is exactly optimal; ANS pays its table.
  dyadic = rng.choice(4, size=200, p=[0.5, 0.25, 0.125, 0.125])
  record, payload = io.encode_symbols(dyadic, 8)
  assert record["coder"] in ("huffman", "ans")
  assert len(payload) < io.packed_nbytes(200, 8)
  np.testing.assert_array_equal(io.decode_symbols(record, payload), dyadic)


def test_corrupt_streams_raise():
  x = _laplace_codes(5000)
  lengths = io.huffman_code_lengths(np.bincount(x))
  stream, bb = io.huffman_encode(x, lengths)
  with pytest.raises(ValueError):
    io.huffman_decode(stream[:-1], lengths, bb, x.size)
  bad = bb.copy()
  bad[0] += 1
  bad[-1] -= 1
  with pytest.raises(ValueError, match="block table"):
    io.huffman_decode(stream, lengths, bad, x.size)
  q = np.bincount(x)
  words = io.ans_encode(x, q)
  with pytest.raises(ValueError):
    io.ans_decode(words, q, x.size - 10)
