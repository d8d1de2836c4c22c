"""Deep Compression relative indices (with filler zeros) and bitmaps."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from compressax import io


def _reference_encode(mask, b):
  """Walks the positions one by one, emitting the module's documented codes.

  Fillers are only written when a kept entry follows (trailing pruned
  positions are implicit).
  """
  fill = 2 ** b - 1
  out, run, fillers = [], 0, 0  # run: pruned positions since the last entry
  for keep in np.asarray(mask).reshape(-1):
    if keep:
      out += [fill] * fillers + [run]
      run = fillers = 0
    else:
      run += 1
      if run == fill:  # a filler sits on this pruned position
        fillers += 1
        run = 0
  return np.array(out, np.int64)


@st.composite
def _masks(draw):
  n = draw(st.integers(0, 300))
  density = draw(st.sampled_from([0.0, 0.01, 0.1, 0.5, 0.95, 1.0]))
  seed = draw(st.integers(0, 2 ** 31))
  mask = np.random.default_rng(seed).random(n) < density
  return mask, draw(st.integers(1, 9))


@given(_masks())
def test_relative_index_matches_reference_and_round_trips(case):
  mask, b = case
  codes = io.relative_index_encode(mask, b)
  np.testing.assert_array_equal(codes, _reference_encode(mask, b))
  assert codes.max(initial=0) <= 2 ** b - 1
  np.testing.assert_array_equal(
      io.relative_index_encode(np.flatnonzero(mask), b), codes)
  np.testing.assert_array_equal(io.relative_index_decode(codes, b, mask.size), mask)


def test_filler_positions_and_counts():
  # b = 2, F = 3: gaps 1, 2, 10 -> 10 = 3 fillers (at 7, 10, 13) + gap 1.
  codes = io.relative_index_encode([1, 4, 15], 2)
  np.testing.assert_array_equal(codes, [1, 2, 3, 3, 3, 1])
  mask = np.zeros(20, bool)
  mask[[1, 4, 15]] = True
  np.testing.assert_array_equal(io.relative_index_decode(codes, 2, 20), mask)
  # A gap of exactly F - 1 = 2 needs no filler; a gap of F = 3 needs one.
  np.testing.assert_array_equal(io.relative_index_encode([2], 2), [2])
  np.testing.assert_array_equal(io.relative_index_encode([3], 2), [3, 0])


def test_all_pruned_and_2d_mask():
  mask = np.zeros((7, 9), bool)
  assert io.relative_index_encode(mask, 3).size == 0
  mask[6, 8] = True
  codes = io.relative_index_encode(mask, 3)
  np.testing.assert_array_equal(io.relative_index_decode(codes, 3, mask.size),
                                mask.reshape(-1))


@given(_masks())
def test_best_index_bits_is_the_minimum(case):
  mask, _ = case
  b, n = io.best_index_bits(mask)
  assert n == io.relative_index_encode(mask, b).size
  if mask.any():
    costs = [k * io.relative_index_encode(mask, k).size for k in range(1, 17)]
    assert b * n == min(costs)


@given(_masks())
def test_bitmap_round_trip(case):
  mask, _ = case
  buf = io.bitmap_encode(mask)
  assert buf.size == (mask.size + 7) // 8
  np.testing.assert_array_equal(io.bitmap_decode(buf, mask.size), mask)


def test_decode_errors():
  with pytest.raises(ValueError, match="reach position"):
    io.relative_index_decode([5], 3, 4)
  with pytest.raises(ValueError, match="must be in"):
    io.relative_index_decode([9], 3, 40)
  with pytest.raises(ValueError, match="increasing"):
    io.relative_index_encode(np.array([3, 1]), 3)


@st.composite
def _clustered_masks(draw):
  n = draw(st.integers(1, 3000))
  density = draw(st.sampled_from([0.002, 0.02, 0.08, 0.3, 0.7]))
  rng = np.random.default_rng(draw(st.integers(0, 2 ** 31)))
  if draw(st.booleans()):  # magnitude pruning of smooth weights: clustered runs
    w = np.convolve(rng.normal(size=n), np.ones(9), "same")
    return np.abs(w) >= np.quantile(np.abs(w), 1 - density)
  return rng.random(n) < density


def _old_rule_nbytes(mask):
  b, _ = io.best_index_bits(mask)
  rel = io.encode_symbols(io.relative_index_encode(mask, b), b)[1]
  return min(len(rel), len(io.encode_symbols(mask.astype(np.uint8), 1)[1]))


@given(_clustered_masks())
def test_coded_index_width_beats_the_raw_rule(mask):
  from compressax.io import _codec
  k, rec, payload = _codec.encode_mask([mask])
  assert k == 0
  np.testing.assert_array_equal(_codec.decode_flat(rec, payload, bool, mask.size), mask)
  assert len(payload) <= _old_rule_nbytes(mask)
  # And within a few bytes (ANS size estimates) of trying every width for real.
  every = [len(io.encode_symbols(io.relative_index_encode(mask, b), b)[1])
           for b in range(1, 17)]
  assert len(payload) <= min(every) + 8
  if rec["scheme"] == "relidx":
    assert len(payload) == len(io.encode_symbols(
        io.relative_index_encode(mask, rec["index_bits"]), rec["index_bits"])[1])


def test_scan_order_candidate_is_decoded_as_chosen():
  from compressax.io import _codec
  i, j = np.indices((50, 40))
  mask = (i + 3 * j) % 50 < 5  # contiguous runs down each column
  k, rec, payload = _codec.encode_mask([mask.reshape(-1), mask.T.reshape(-1)])
  assert k == 1
  np.testing.assert_array_equal(
      _codec.decode_flat(rec, payload, bool, mask.size), mask.T.reshape(-1))
  assert len(payload) < len(_codec.encode_mask([mask.reshape(-1)])[2])


def test_estimate_is_exact_for_raw_and_huffman():
  rng = np.random.default_rng(0)
  for sym, bits in [(rng.integers(0, 4, 100), 2), (rng.geometric(0.3, 5000) % 16, 4),
                    (np.zeros(0, np.int64), 3)]:
    rec, payload = io.encode_symbols(sym, bits)
    est = io._entropy.estimate_nbytes(sym, bits)
    if rec["coder"] in ("raw", "huffman"):
      assert est == len(payload)
    else:
      assert abs(est - len(payload)) <= 8
