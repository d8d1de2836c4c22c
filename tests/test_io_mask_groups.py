"""The ``bitgroups`` mask scheme: a bitmap coded g bits at a time (issue 14).

An N:M mask scanned with its N:M axis fastest has at most C(M, N) patterns
per group of M positions (6 for 2:4: log2 6 = 2.58 bits per 4 weights), which
the entropy coders exploit; relative indices cost ~0.93 bits per weight.
Forged ``bitgroups`` records are in ``test_io_hostile``.
"""

import functools

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import compressax as cx
from compressax import io
from compressax.io import _codec
from compressax.io import _format
from compressax.io import _load


def _reference_groups(flat, g):
  """Symbol j = sum_i flat[j*g + i] * 2**i, the last group zero-padded."""
  flat = [int(x) for x in np.asarray(flat).reshape(-1)]
  flat += [0] * (-len(flat) % g)
  return np.array([sum(flat[j + i] << i for i in range(g))
                   for j in range(0, len(flat), g)], np.int64)


@given(n=st.integers(0, 200), g=st.sampled_from(_codec.GROUP_BITS),
       density=st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]),
       seed=st.integers(0, 2 ** 31))
def test_bit_groups_match_reference_and_round_trip(n, g, density, seed):
  flat = np.random.default_rng(seed).random(n) < density
  sym = _codec.bit_groups(flat, g)
  np.testing.assert_array_equal(sym, _reference_groups(flat, g))
  rec, payload = io.encode_symbols(sym, g)
  rec = dict(kind="bool", scheme="bitgroups", group_bits=g, raw=0, **rec)
  back = _codec.decode_flat(rec, payload, bool, n)
  assert back.dtype == bool
  np.testing.assert_array_equal(back, flat)


def _save_load(tree):
  data = b"".join(_format._encode(tree))
  return _load.loads(data, "t.cx", keep_compressed=True), data


def _nm_mask(w, n, m):
  """N:M along axis 0 (a Dense kernel's inputs): the n largest |w| of every m."""
  rows, cols = w.shape
  rank = np.argsort(np.argsort(-np.abs(w.reshape(rows // m, m, cols)), axis=1,
                               kind="stable"), axis=1)
  return (rank < n).reshape(rows, cols)


@settings(max_examples=25, deadline=None)
@given(nm=st.sampled_from([(2, 4), (1, 4), (4, 8)]), blocks=st.integers(1, 24),
       out=st.integers(1, 48), seed=st.integers(0, 2 ** 31))
def test_nm_masks_of_dense_kernels_round_trip(nm, blocks, out, seed):
  n, m = nm
  w = np.random.default_rng(seed).normal(size=(blocks * m, out)).astype(np.float32)
  mask = _nm_mask(w, n, m)
  assert (mask.reshape(blocks, m, out).sum(axis=1) == n).all()
  node = cx.prune.MaskedArray(value=np.where(mask, w, 0), mask=mask,
                              shape=w.shape, dtype=np.dtype(np.float32))
  back, _ = _save_load({"k": node, "mask": mask})
  assert back["mask"].dtype == bool
  np.testing.assert_array_equal(back["mask"], mask)
  np.testing.assert_array_equal(back["k"].mask, mask)
  np.testing.assert_array_equal(np.asarray(back["k"].materialize()), np.where(mask, w, 0))


@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (4, 8)])
def test_nm_mask_is_stored_as_bit_groups_of_its_axis(nm):
  """A large enough N:M kernel mask takes the new scheme, input axis fastest."""
  n, m = nm
  w = np.random.default_rng(0).normal(size=(64 * m, 96)).astype(np.float32)
  mask = _nm_mask(w, n, m)
  back, data = _save_load({"mask": mask})
  np.testing.assert_array_equal(back["mask"], mask)
  rec = dict(_load.parse(data, "t.cx")[0]["tree"]["items"])["mask"]
  assert rec["enc"]["scheme"] == "bitgroups"
  assert rec["perm"] == [1, 0]  # the input axis (-2) scanned fastest
  assert rec["enc"]["group_bits"] % m == 0 or m % rec["enc"]["group_bits"] == 0


def test_two_four_index_bits_per_weight():
  """A 2:4 + 4-bit MaskedArray: the mask costs <= 0.70 bits per weight
  (log2(6) / 4 = 0.646 is the bound for independent groups of 4); relative
  indices took ~0.93."""
  rng = np.random.default_rng(1)
  w = jnp.asarray(rng.normal(size=(384, 384)).astype(np.float32))
  q = cx.quantize.apply({"k": w}, functools.partial(cx.quantize.quantize, bits=4,
                                                    bucket_size=128))
  tree = cx.prune.apply_mask(q, cx.prune.nm_mask_tree({"k": w}, 2, 4))
  assert isinstance(tree["k"], cx.prune.MaskedArray)
  report = io.size_report(tree)
  (leaf,) = report.leaves
  assert leaf.kept == w.size // 2
  per_weight = 8 * leaf.index_bytes / leaf.params
  assert np.log2(6) / 4 - 0.01 <= per_weight <= 0.70, per_weight
  back, _ = _save_load(tree)
  np.testing.assert_array_equal(np.asarray(back["k"].materialize()),
                                np.asarray(cx.materialize(tree)["k"]))


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 80), cols=st.integers(1, 80),
       density=st.sampled_from([0.02, 0.3, 0.5, 0.7]), seed=st.integers(0, 2 ** 31))
def test_other_masks_are_never_larger(rows, cols, density, seed):
  """With bitgroups offered, a mask is stored exactly as before unless the
  new scheme is strictly smaller."""
  mask = np.random.default_rng(seed).random((rows, cols)) < density
  cands = [_format._scan(mask, p) for p in _format._scan_orders(2)]
  new = _codec.encode_mask(cands)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(_codec, "GROUP_BITS", ())
    old = _codec.encode_mask(cands)
  assert old[1]["scheme"] != "bitgroups"
  if new[1]["scheme"] == "bitgroups":
    assert len(new[2]) < len(old[2])
  else:
    assert new == old


def test_unstructured_half_masks_keep_their_size():
  rng = np.random.default_rng(3)
  for shape in [(384, 384), (1536, 96)]:
    mask = rng.random(shape) < 0.5
    cands = [_format._scan(mask, p) for p in _format._scan_orders(2)]
    k, rec, payload = _codec.encode_mask(cands)
    assert rec["scheme"] != "bitgroups"
    assert len(payload) <= io.packed_nbytes(mask.size, 1)
