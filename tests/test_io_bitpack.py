"""Bit packing: bit-exact round trips and a bit-string reference."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from compressax import io


def _reference_pack(codes, bits):
  """Code i's bits, LSB first, at stream bits [i*bits, (i+1)*bits)."""
  stream = []
  for c in codes:
    stream += [(int(c) >> j) & 1 for j in range(bits)]
  stream += [0] * (-len(stream) % 8)
  return bytes(sum(b << k for k, b in enumerate(stream[i:i + 8]))
               for i in range(0, len(stream), 8))


@st.composite
def _codes(draw):
  bits = draw(st.integers(1, 64))
  n = draw(st.integers(0, 40))
  codes = draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=n, max_size=n))
  return bits, np.array(codes, np.uint64)


@given(_codes())
def test_pack_matches_reference_and_round_trips(case):
  bits, codes = case
  packed = io.pack_bits(codes, bits)
  assert packed.dtype == np.uint8
  assert packed.size == io.packed_nbytes(codes.size, bits)
  assert packed.tobytes() == _reference_pack(codes.tolist(), bits)
  out = io.unpack_bits(packed.tobytes(), bits, codes.size)
  np.testing.assert_array_equal(out.astype(np.uint64), codes)
  assert out.dtype.itemsize * 8 >= bits


@pytest.mark.parametrize("bits", [1, 3, 4, 5, 8, 11, 16])
def test_large_round_trip_across_chunks(bits):
  rng = np.random.default_rng(bits)
  codes = rng.integers(0, 1 << bits, size=(1 << 20) + 13)
  out = io.unpack_bits(io.pack_bits(codes, bits), bits, codes.size)
  np.testing.assert_array_equal(out, codes)


def test_errors():
  with pytest.raises(ValueError, match="does not fit in 3 bits"):
    io.pack_bits([0, 8], 3)
  with pytest.raises(ValueError, match="does not fit"):
    io.pack_bits(np.array([-1], np.int8), 4)
  with pytest.raises(ValueError, match="bits must be"):
    io.pack_bits([0], 0)
  with pytest.raises(ValueError, match="integers"):
    io.pack_bits([0.5], 4)
  with pytest.raises(ValueError, match="need 2 bytes"):
    io.unpack_bits(b"\x00", 5, 3)
  with pytest.raises(ValueError, match="padding"):
    io.unpack_bits(b"\xff", 3, 2)
