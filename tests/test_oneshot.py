"""cx.oneshot against float64 NumPy references written from the papers.

The references are the plain row-by-row loops of GPTQ (Frantar et al. 2023,
arXiv:2210.17323), SparseGPT (Frantar & Alistarh 2023, arXiv:2301.00774) and
Wanda (Sun et al. 2024, arXiv:2306.11695): no lazy batching, float64. Run in
float64 (``jax.enable_x64``), the library gives the same codes and masks; in
float32 the same layer error up to a few percent.
"""

from __future__ import annotations

import math
import os
from fractions import Fraction

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import compressax as cx
from compressax.oneshot import _sweep

PATH = "params/Dense_0/kernel"


# ---------------------------------------------------------------- references

def ref_grid(x, bits, symmetric):
  maxq = 2 ** bits - 1
  lo = np.minimum(x.min(0), 0.0)
  hi = np.maximum(x.max(0), 0.0)
  if symmetric:
    hi = np.maximum(-lo, hi)
    lo = -hi
  empty = (lo == 0) & (hi == 0)
  lo[empty], hi[empty] = -1.0, 1.0
  scale = (hi - lo) / maxq
  zero = (np.full_like(scale, 2.0 ** (bits - 1)) if symmetric
          else np.clip(np.round(-lo / scale), 0, maxq))
  return scale, zero


def ref_quant(x, scale, zero, bits):
  code = np.clip(np.round(x / scale) + zero, 0, 2 ** bits - 1)
  return code, scale * (code - zero)


def ref_upper(h, damp):
  h = h + damp * np.mean(np.diag(h)) * np.eye(len(h))
  return np.linalg.cholesky(np.linalg.inv(h)).T


def ref_prepare(w, h):
  w, h = np.array(w, np.float64), np.array(h, np.float64)
  dead = np.diag(h) == 0
  h[dead, dead] = 1.0
  w[dead] = 0.0
  return w, h


def ref_obs(w, h, *, bits=None, group=None, act_order=False, symmetric=False,
            damp=0.01, block=None, sparsity=None, nm=None):
  """The row-by-row GPTQ / SparseGPT loop (Algorithm 1 of both papers)."""
  w_in = np.asarray(w, np.float64)
  w, h = ref_prepare(w, h)
  d_in, d_out = w.shape
  perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(d_in)
  w, h = w[perm], h[perm][:, perm]
  u = ref_upper(h, damp)
  q = np.zeros_like(w)
  codes = np.zeros_like(w)
  keep = np.ones(w.shape, bool)
  scales, zeros = [], []
  if bits is not None and group is None:
    s, z = ref_grid(w_in, bits, symmetric)
    scales.append(s)
    zeros.append(z)
  for i in range(d_in):
    if sparsity is not None and i % block == 0:
      rows = slice(i, min(i + block, d_in))
      score = (w[rows] ** 2 / np.diag(u)[rows, None] ** 2).ravel()
      k = math.floor(Fraction(str(sparsity)) * score.size)
      # Prune the k lowest; among equal scores the later entry first.
      order = np.lexsort((-np.arange(score.size), score))
      blk = np.ones(score.size, bool)
      blk[order[:k]] = False
      keep[rows] = blk.reshape(-1, d_out)
    if nm is not None and i % nm[1] == 0:
      score = w[i:i + nm[1]] ** 2 / np.diag(u)[i:i + nm[1], None] ** 2
      order = np.argsort(-score, axis=0, kind="stable")
      win = np.zeros(score.shape, bool)
      np.put_along_axis(win, order[:nm[0]], True, axis=0)
      keep[i:i + nm[1]] = win
    if bits is not None and group is not None and i % group == 0:
      s, z = ref_grid(w[i:i + group], bits, symmetric)
      scales.append(s)
      zeros.append(z)
    qi = np.where(keep[i], w[i], 0.0)
    if bits is not None:
      codes[i], qi = ref_quant(qi, scales[-1], zeros[-1], bits)
    q[i] = qi
    err = (w[i] - qi) / u[i, i]
    w[i:] -= u[i, i:, None] * err[None, :]
  inv = np.argsort(perm)
  return dict(q=q[inv], codes=codes[inv], keep=keep[inv],
              scale=np.array(scales) if scales else None,
              zero=np.array(zeros) if zeros else None)


def ref_wanda(w, norm, *, sparsity=None, nm=None):
  score = np.abs(np.asarray(w, np.float64)) * np.asarray(norm, np.float64)[:, None]
  d_in = score.shape[0]
  keep = np.zeros(score.shape, bool)
  if sparsity is not None:
    k = math.floor(Fraction(str(sparsity)) * d_in)
    order = np.argsort(-score, axis=0, kind="stable")
    np.put_along_axis(keep, order[:d_in - k], True, axis=0)
  else:
    n, m = nm
    for i in range(0, d_in, m):
      order = np.argsort(-score[i:i + m], axis=0, kind="stable")
      win = np.zeros((m, score.shape[1]), bool)
      np.put_along_axis(win, order[:n], True, axis=0)
      keep[i:i + m] = win
  return keep


# ---------------------------------------------------------------- problems

def problem(d_in=80, d_out=24, n=256, seed=0, dtype=np.float32):
  """Correlated inputs (so the Hessian matters) and a Gaussian kernel."""
  rng = np.random.default_rng(seed)
  mix = rng.normal(size=(d_in, d_in)) / np.sqrt(d_in) + np.eye(d_in)
  x = (rng.normal(size=(n, d_in)) @ mix * rng.uniform(0.2, 2.0, d_in)).astype(dtype)
  w = rng.normal(size=(d_in, d_out)).astype(dtype)
  return x, w


def layer_error(x, w, w_hat):
  x = np.asarray(x, np.float64)
  d = x @ (np.asarray(w, np.float64) - np.asarray(w_hat, np.float64))
  return float(np.sum(d * d))


# ---------------------------------------------------------------- Hessians

def test_hessian_sums_every_leading_axis_and_running_average():
  x, _ = problem(d_in=16, n=48)
  x3 = x.reshape(4, 12, 16)
  h = cx.oneshot.hessian(x3)
  np.testing.assert_allclose(h, 2 * x.astype(np.float64).T @ x, rtol=1e-5, atol=1e-4)
  hh, n = jnp.zeros((16, 16)), 0
  for part in np.split(x3, 2):
    hh, n = cx.oneshot.hessian_update(hh, n, part)
  assert float(n) == 48
  np.testing.assert_allclose(hh, h / 48, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- GPTQ

GPTQ_CASES = [  # bits, group, act_order, symmetric, block
    (4, None, False, False, 32),
    (3, 16, False, False, 32),
    (4, 16, True, False, 32),
    (3, None, True, True, 24),
    (2, 32, False, True, 16),   # groups larger than the block: block -> 32
]


@pytest.mark.parametrize("bits,group,act,sym,block", GPTQ_CASES)
def test_gptq_float64_equals_reference(bits, group, act, sym, block):
  with jax.enable_x64(True):
    x, w = problem(dtype=np.float64, seed=bits)
    h = 2 * x.T @ x
    node = cx.oneshot.gptq(jnp.asarray(w), jnp.asarray(h), bits=bits,
                           group_size=group, act_order=act, symmetric=sym,
                           block_size=block)
    ref = ref_obs(w, h, bits=bits, group=group, act_order=act, symmetric=sym)
    np.testing.assert_array_equal(np.asarray(node.codes), ref["codes"])
    np.testing.assert_allclose(node.materialize(), ref["q"], rtol=0, atol=1e-10)
    assert node.materialize().dtype == jnp.float64


@pytest.mark.parametrize("bits,group,act", [(4, None, True), (3, 16, False)])
def test_gptq_float32_close_to_reference_and_beats_rtn(bits, group, act):
  x, w = problem(seed=3)
  h = cx.oneshot.hessian(x)
  node = cx.oneshot.gptq(w, h, bits=bits, group_size=group, act_order=act,
                         block_size=32)
  ref = ref_obs(w, 2 * x.astype(np.float64).T @ x, bits=bits, group=group,
                act_order=act)
  same = np.mean(np.asarray(node.codes) == ref["codes"])
  assert same > 0.95, same
  err, err_ref = layer_error(x, w, node.materialize()), layer_error(x, w, ref["q"])
  assert abs(err - err_ref) < 0.03 * err_ref
  rtn = cx.oneshot.rtn(w, bits=bits, group_size=group)
  assert err < layer_error(x, w, rtn.materialize())


@pytest.mark.parametrize("group,act", [(None, False), (16, True)])
def test_gptq_node_materializes_bit_for_bit(group, act):
  x, w = problem(seed=5)
  h = cx.oneshot.hessian(x)
  cfg = _sweep.Config(block=32, group=group, bits=3, symmetric=False, nm=None,
                      unstructured=False, act_order=act)
  res = _sweep.sweep(w, h, jnp.zeros((1,), jnp.int32), cfg=cfg)
  node = cx.oneshot.gptq(w, h, bits=3, group_size=group, act_order=act,
                         block_size=32)
  np.testing.assert_array_equal(np.asarray(node.materialize()), np.asarray(res.q))
  assert node.codes.dtype == jnp.uint8 and node.materialize().dtype == w.dtype
  n_groups = 1 if group is None else 5
  assert node.scale.shape == (n_groups, 24) and node.zero.shape == (n_groups, 24)
  assert node.group_index.shape == ((80,) if act and group else (0,))
  assert node.storage_bits() == (80 * 24 * 3 + n_groups * 24 * (3 + 32)
                                 + (80 * 3 if act and group else 0))


@pytest.mark.parametrize("bits,group,sym", [(4, None, False), (3, 16, True),
                                            (12, 32, False)])
def test_rtn_equals_reference_grid(bits, group, sym):
  # float64: a symmetric grid puts the extreme weight exactly on a rounding
  # tie (hi / scale = 2^(b-1) - 1/2), which float32 may round either way.
  with jax.enable_x64(True):
    _, w = problem(seed=7, dtype=np.float64)
    node = cx.oneshot.rtn(jnp.asarray(w), bits=bits, group_size=group, symmetric=sym)
    gs = group or 80
    out, tie = np.zeros_like(w), np.zeros(w.shape, bool)
    for i in range(0, 80, gs):
      s, z = ref_grid(w[i:i + gs], bits, sym)
      out[i:i + gs] = ref_quant(w[i:i + gs], s, z, bits)[1]
      y = w[i:i + gs] / s
      tie[i:i + gs] = np.abs(np.abs(y - np.floor(y)) - 0.5) < 1e-9
    assert tie.sum() <= (2 * 24 * 80 // gs if sym else 0)
    np.testing.assert_allclose(np.asarray(node.materialize())[~tie], out[~tie],
                               rtol=0, atol=1e-12)
    assert node.codes.dtype == (jnp.uint16 if bits > 8 else jnp.uint8)


def test_zero_is_on_the_grid():
  _, w = problem(seed=8)
  w = np.abs(w) + 0.5                     # all positive: range widened to 0
  w[3, :] = 0.0
  node = cx.oneshot.rtn(w, bits=2)
  assert np.all(np.asarray(node.materialize())[3] == 0.0)


# ---------------------------------------------------------------- SparseGPT

SPARSE_CASES = [  # sparsity, nm, bits, group, block
    (0.5, None, None, None, 32),
    (0.7, None, 4, None, 24),
    (None, (2, 4), None, None, 32),
    (None, (1, 4), 3, 16, 32),
]


@pytest.mark.parametrize("sparsity,nm,bits,group,block", SPARSE_CASES)
def test_sparsegpt_float64_equals_reference(sparsity, nm, bits, group, block):
  with jax.enable_x64(True):
    x, w = problem(dtype=np.float64, seed=11)
    h = 2 * x.T @ x
    out = cx.oneshot.sparsegpt(jnp.asarray(w), jnp.asarray(h), sparsity=sparsity,
                               n_m=nm, bits=bits, group_size=group,
                               block_size=block)
    ref = ref_obs(w, h, bits=bits, group=group, sparsity=sparsity, nm=nm,
                  block=block)
    np.testing.assert_array_equal(np.asarray(out.mask), ref["keep"])
    np.testing.assert_allclose(out.materialize(), ref["q"], rtol=0, atol=1e-10)


@pytest.mark.parametrize("sparsity,nm,bits", [(0.5, None, None), (None, (2, 4), 4)])
def test_sparsegpt_float32_counts_zeros_and_error(sparsity, nm, bits):
  x, w = problem(seed=12)
  h = cx.oneshot.hessian(x)
  out = cx.oneshot.sparsegpt(w, h, sparsity=sparsity, n_m=nm, bits=bits,
                             block_size=32)
  assert isinstance(out, cx.prune.MaskedArray)
  mask = np.asarray(out.mask)
  dense = np.asarray(out.materialize())
  assert np.all(dense[~mask] == 0.0)
  if sparsity is not None:   # per block of 32 rows: floor(0.5 * rows * 24)
    assert (~mask).sum() == 12 * 32 + 12 * 32 + 12 * 16
    assert np.all(np.asarray(out.value)[~mask] == 0.0)
  else:
    assert np.all(mask.reshape(20, 4, 24).sum(1) == 2)
  ref = ref_obs(w, 2 * x.astype(np.float64).T @ x, bits=bits, sparsity=sparsity,
                nm=nm, block=32)
  err, err_ref = layer_error(x, w, dense), layer_error(x, w, ref["q"])
  assert abs(err - err_ref) < 0.03 * err_ref
  magnitude = (cx.prune.nm_mask(w, 2, 4, axis=0) if nm else
               cx.prune.magnitude_mask({"k": w}, 0.5)["k"])
  assert err < layer_error(x, w, np.where(magnitude, w, 0))


def test_sparsegpt_joint_values_on_the_grid():
  x, w = problem(seed=13)
  out = cx.oneshot.sparsegpt(w, cx.oneshot.hessian(x), sparsity=0.6, bits=3,
                             group_size=16, block_size=32)
  node, mask = out.value, np.asarray(out.mask)
  assert isinstance(node, cx.oneshot.GroupQuantizedArray)
  codes = np.asarray(node.codes).astype(np.int64)
  zero = np.repeat(np.asarray(node.zero), 16, axis=0).astype(np.int64)
  assert np.all(codes[~mask] == zero[~mask])       # pruned: the zero point
  assert np.all(np.asarray(node.materialize())[~mask] == 0.0)
  scale = np.repeat(np.asarray(node.scale), 16, axis=0)
  np.testing.assert_array_equal(np.asarray(out.materialize()),
                                np.where(mask, scale * (codes - zero).astype(np.float32), 0))


def test_sparsegpt_traced_sparsity_vmaps():
  x, w = problem(d_in=32, d_out=8, seed=14)
  h = cx.oneshot.hessian(x)
  f = jax.vmap(lambda s: cx.oneshot.sparsegpt(w, h, sparsity=s, block_size=16).mask)
  masks = f(jnp.array([0.25, 0.5]))
  assert [int((~m).sum()) for m in masks] == [64, 128]


@hypothesis.settings(max_examples=5)
@hypothesis.given(nm=st.sampled_from([(1, 2), (2, 4), (3, 4)]),
                  seed=st.integers(0, 2 ** 16))
def test_nm_patterns_are_exact(nm, seed):
  n, m = nm
  x, w = problem(d_in=32, d_out=8, n=64, seed=seed)
  h = cx.oneshot.hessian(x)
  for keep in (cx.oneshot.sparsegpt(w, h, n_m=nm, block_size=16).mask,
               cx.oneshot.wanda_mask(w, jnp.linalg.norm(x, axis=0), n_m=nm)):
    assert np.all(np.asarray(keep).reshape(32 // m, m, 8).sum(1) == n)


# ---------------------------------------------------------------- Wanda

@pytest.mark.parametrize("sparsity,nm", [(0.5, None), (0.3, None), (None, (2, 4))])
def test_wanda_equals_reference(sparsity, nm):
  x, w = problem(seed=21)
  norm = np.linalg.norm(x.astype(np.float64), axis=0).astype(np.float32)
  keep = cx.oneshot.wanda_mask(w, norm, sparsity=sparsity, n_m=nm)
  np.testing.assert_array_equal(np.asarray(keep), ref_wanda(w, norm, sparsity=sparsity, nm=nm))
  if sparsity is not None:
    assert np.all(np.asarray(keep).sum(0) == 80 - math.floor(Fraction(str(sparsity)) * 80))


def test_wanda_ties_keep_the_earlier_row():
  keep = cx.oneshot.wanda_mask(jnp.ones((4, 2)), jnp.ones(4), sparsity=0.5)
  np.testing.assert_array_equal(keep, [[1, 1], [1, 1], [0, 0], [0, 0]])


# ---------------------------------------------------------------- HQQ

def ref_hqq(w, bits, gs, iters=20, p=0.7, beta=10.0, kappa=1.01):
  """HQQ's proximal zero-point loop (Badri & Shaji 2023), keeping the best."""
  d_in, d_out = w.shape
  x = w.reshape(d_in // gs, gs, d_out)
  maxq = 2 ** bits - 1
  lo, hi = x.min(1, keepdims=True), x.max(1, keepdims=True)
  s = np.maximum((hi - lo) / maxq, 1 / 2e4)
  z = -lo / s
  best, best_z = np.inf, z
  for _ in range(iters):
    q = np.clip(np.round(x / s + z), 0, maxq)
    wr = s * (q - z)
    err = np.mean(np.abs(x - wr))
    if not err < best:
      break
    best, best_z = err, z
    e = x - wr
    we = np.sign(e) * np.maximum(np.abs(e) - np.power(np.abs(e) + 1e-8, p - 1) / beta, 0)
    z = np.mean(q - (x - we) / s, axis=1, keepdims=True)
    beta *= kappa
  q = np.clip(np.round(x / s + best_z), 0, maxq)
  return (s * (q - best_z)).reshape(d_in, d_out), best, np.mean(
      np.abs(x - s * (np.clip(np.round(x / s - lo / s), 0, maxq) + lo / s)))


def test_hqq_equals_reference_and_improves_the_grid():
  with jax.enable_x64(True):
    _, w = problem(seed=71, dtype=np.float64)
    node = cx.oneshot.hqq(jnp.asarray(w), bits=3, group_size=16)
    ref, best, initial = ref_hqq(w, 3, 16)
    np.testing.assert_allclose(node.materialize(), ref, rtol=0, atol=1e-12)
    assert best < initial
  _, w = problem(seed=71)
  node = cx.oneshot.hqq(w, bits=3, group_size=16)
  assert node.zero.dtype == jnp.float32 and node.scale.shape == (5, 24)
  assert node.storage_bits() == 80 * 24 * 3 + 2 * 5 * 24 * 32
  _bad(lambda: cx.oneshot.hqq(w, bits=3, group_size=24, path=PATH), "divide")
  _bad(lambda: cx.oneshot.hqq(w, bits=3, group_size=16, lp_norm=1.5, path=PATH),
       "lp_norm")


# ---------------------------------------------------------------- edge cases

def test_dead_inputs():
  x, w = problem(seed=31)
  x[:, [3, 40]] = 0.0
  h = cx.oneshot.hessian(x)
  for out in (cx.oneshot.gptq(w, h, bits=4, block_size=32, act_order=True),
              cx.oneshot.sparsegpt(w, h, sparsity=0.5, block_size=32)):
    dense = np.asarray(out.materialize())
    assert np.all(np.isfinite(dense)) and np.all(dense[[3, 40]] == 0.0)
  with jax.enable_x64(True):
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    h64 = 2 * x64.T @ x64
    node = cx.oneshot.gptq(jnp.asarray(w64), jnp.asarray(h64), bits=4, block_size=32)
    np.testing.assert_allclose(node.materialize(), ref_obs(w64, h64, bits=4)["q"],
                               rtol=0, atol=1e-10)


def _bad(fn, match):
  with pytest.raises(ValueError, match=match) as info:
    fn()
  assert PATH in str(info.value)


def test_bad_inputs_name_the_layer():
  x, w = problem(d_in=16, d_out=8, n=32)
  h = np.asarray(cx.oneshot.hessian(x))
  g, s, wd = cx.oneshot.gptq, cx.oneshot.sparsegpt, cx.oneshot.wanda_mask
  norm = np.ones(16, np.float32)
  nan_h, nan_w = h.copy(), w.copy()
  nan_h[1, 2] = np.nan
  nan_w[0, 0] = np.inf
  _bad(lambda: g(w, h[:8, :8], bits=4, path=PATH), "shape")
  _bad(lambda: s(w, h[:, :8], sparsity=0.5, path=PATH), "shape")
  _bad(lambda: g(w, h, bits=0, path=PATH), "bits")
  _bad(lambda: g(w, h, bits=17, path=PATH), "bits")
  _bad(lambda: s(w, h, sparsity=0.5, bits=20, path=PATH), "bits")
  _bad(lambda: s(w, h, n_m=(3, 2), path=PATH), "n <= m")
  _bad(lambda: wd(w, norm, n_m=(5, 4), path=PATH), "n <= m")
  _bad(lambda: s(w, h, n_m=(2, 3), path=PATH), "divide")
  _bad(lambda: s(w, h, sparsity=1.0, path=PATH), "sparsity")
  _bad(lambda: wd(w, norm, sparsity=-0.1, path=PATH), "sparsity")
  _bad(lambda: s(w, h, path=PATH), "exactly one")
  _bad(lambda: s(w, h, sparsity=0.5, n_m=(2, 4), path=PATH), "exactly one")
  _bad(lambda: g(w, nan_h, bits=4, path=PATH), "NaN")
  _bad(lambda: s(nan_w, h, sparsity=0.5, path=PATH), "NaN")
  _bad(lambda: wd(nan_w, norm, sparsity=0.5, path=PATH), "NaN")
  _bad(lambda: g(w, h, bits=4, damp=-1.0, path=PATH), "damp")
  _bad(lambda: g(w, h, bits=4, group_size=0, path=PATH), "group_size")
  _bad(lambda: g(w, -np.eye(16, dtype=np.float32), bits=4, damp=0.0, path=PATH),
       "positive definite")
  _bad(lambda: wd(w, norm[:8], sparsity=0.5, path=PATH), "act_norm")
  _bad(lambda: cx.oneshot.rtn(w[0], bits=4, path=PATH), "2-D")
  _bad(lambda: cx.oneshot.hessian_update(h[:8, :8], 0, x, path=PATH), "shape")


# ---------------------------------------------------------------- jit, devices

def test_jit_is_bit_identical():
  x, w = problem(seed=41)
  h = cx.oneshot.hessian(x)
  norm = jnp.linalg.norm(x, axis=0)
  fns = [
      lambda w, h: cx.oneshot.gptq(w, h, bits=3, group_size=16, act_order=True,
                                   block_size=32),
      lambda w, h: cx.oneshot.sparsegpt(w, h, n_m=(2, 4), bits=4, block_size=32),
      lambda w, h: cx.oneshot.wanda_mask(w, norm, sparsity=0.5),
  ]
  for fn in fns:
    eager, jitted = fn(w, h), jax.jit(fn)(w, h)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sharded_hessian_and_gptq_over_d_out():
  mesh = Mesh(np.array(jax.devices()[:8]), ("d",))
  x, w = problem(d_in=32, d_out=16, n=64, seed=51)
  h = cx.oneshot.hessian(x)
  hs = jax.jit(jax.shard_map(lambda xb: cx.oneshot.hessian(xb, axis_name="d"),
                             mesh=mesh, in_specs=P("d"), out_specs=P()))(x)
  np.testing.assert_allclose(hs, h, rtol=1e-5, atol=1e-3)

  def local(wc, h):
    node = cx.oneshot.gptq(wc, h, bits=4, group_size=16, block_size=16)
    return node.codes, node.scale, node.zero

  sharded = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(None, "d"), P()),
                                  out_specs=P(None, "d")))(w, h)
  node = cx.oneshot.gptq(w, h, bits=4, group_size=16, block_size=16)
  for a, b in zip(sharded, (node.codes, node.scale, node.zero)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------- files

def test_save_load_and_file_size(tmp_path):
  x, w = problem(seed=61)
  h = cx.oneshot.hessian(x)
  tree = {"gptq": cx.oneshot.gptq(w, h, bits=3, group_size=16, act_order=True,
                                  block_size=32),
          "sparse": cx.oneshot.sparsegpt(w, h, sparsity=0.5, block_size=32),
          "joint": cx.oneshot.sparsegpt(w, h, n_m=(2, 4), bits=4, block_size=32),
          "hqq": cx.oneshot.hqq(w, bits=3, group_size=16)}
  for name, leaf in tree.items():
    path = os.fspath(tmp_path / f"{name}.cx")
    cx.save(path, {"w": leaf})
    back = cx.load(path, keep_compressed=True)["w"]
    assert type(back) is type(leaf)
    np.testing.assert_array_equal(cx.load(path)["w"], np.asarray(leaf.materialize()))
    np.testing.assert_array_equal(back.materialize(), leaf.materialize())
    size = os.path.getsize(path)
    # At most the declared payload plus the manifest (well under 2 kB here).
    assert size <= cx.storage_bits(leaf) / 8 + 2048, (name, size)
  # Only kept positions of the codes are stored: 4-bit codes of half the
  # weights, not all of them.
  joint = os.path.getsize(tmp_path / "joint.cx")
  assert joint < 80 * 24 * 4 / 8 + 80 * 24 / 8 + 2048
