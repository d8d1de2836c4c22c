"""The OBS sweep shared by GPTQ and SparseGPT (private).

Both algorithms walk the input rows of a kernel ``W (d_in, d_out)`` once, in
order. With ``U`` the upper Cholesky factor of the damped ``H^-1``, row ``i``
is replaced by its compressed value ``q_i`` (rounded to the grid, set to 0
when pruned, or both), and its error is spread over the rows not yet visited:

  ``err_i = (w_i - q_i) / U_ii``,  ``w_j -= U_ij * err_i``  for ``j > i``.

Lazy batches: the rows are taken in blocks of ``B``; inside a block the update
touches only the block's rows, and the rows after the block receive all of the
block's updates at once (``W[after] -= U[block, after]^T @ Err``). That is the
same arithmetic as the row-by-row loop, up to float rounding.

Granularities. A grid group (``group_size`` rows) takes its scale and zero
from its rows' weights as they are when the group starts, with every earlier
row's update applied; an N:M window (``m`` rows) chooses its mask the same
way; an unstructured mask is chosen per block from the block's weights when
the block starts. So every group and window must lie inside one block: the
block is rounded to a multiple of the least common multiple of the two (down,
but at least one). The reference GPTQ code takes the grid of a group that
starts inside a block from weights not yet updated by that block's earlier
rows; both agree whenever ``group_size`` is a multiple of ``block_size``.

References:
  Frantar et al., GPTQ, ICLR 2023, Sec. 3 and Algorithm 1.
  https://arxiv.org/abs/2210.17323
  Frantar & Alistarh, SparseGPT, ICML 2023, Sec. 3-4 and Algorithm 1.
  https://arxiv.org/abs/2301.00774
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from compressax import _checks
from compressax.oneshot import _grid

_HIGHEST = lax.Precision.HIGHEST


class Config(NamedTuple):
  """Static settings of one sweep (hashable: a jit static argument)."""
  block: int                  # rows per lazy batch (already rounded)
  group: int | None           # grid group size (None: one grid per column)
  bits: int | None            # None: no quantization
  symmetric: bool
  nm: tuple | None            # (n kept, m) or None
  unstructured: bool          # prune `counts[b]` entries of block b
  act_order: bool
  # Static: a traced damp would let XLA fold a constant one differently
  # under an outer jit than in the eager call (1-ulp apart, not bit-identical).
  damp: float = 0.01


class Result(NamedTuple):
  q: jax.Array            # (d_in, d_out) compressed weights, original row order
  codes: jax.Array        # (d_in, d_out) grid codes (floats), or zeros
  scale: jax.Array        # (n_groups, d_out)
  zero: jax.Array         # (n_groups, d_out)
  keep: jax.Array         # (d_in, d_out) bool
  perm: jax.Array         # (d_in,) processing order (arange without act-order)
  ok: jax.Array           # () bool: the Cholesky factors are finite


def effective_block(block_size: int, *units) -> int:
  """``block_size`` rounded down to a multiple of every unit (at least one)."""
  unit = 1
  for u in units:
    if u:
      unit = unit * u // math.gcd(unit, u)
  return max(1, block_size // unit) * unit


def check_hessian(path, h, d_in: int) -> None:
  _checks.check_floating(path, h)
  if tuple(np.shape(h)) != (d_in, d_in):
    _checks.fail(path, f"the Hessian must have shape (d_in, d_in) = "
                       f"({d_in}, {d_in}) for a kernel with d_in = {d_in}, got "
                       f"{tuple(np.shape(h))}")
  _checks.check_finite(path, h)


def check_damp(path, damp) -> float:
  if isinstance(damp, bool) or not (isinstance(damp, (int, float, np.number)) or (
      _checks.is_concrete(damp) and np.ndim(damp) == 0 and hasattr(damp, "dtype"))):
    _checks.fail(path, f"damp must be a concrete number (it is static), got "
                       f"{type(damp).__name__}", TypeError)
  _checks.check_range(path, "damp", damp, 0.0, np.inf)
  return float(damp)


def check_ok(path, res: Result) -> None:
  if _checks.is_concrete(res.ok) and not bool(res.ok):
    _checks.fail(path, "the damped Hessian is not positive definite (its "
                       "Cholesky factor is not finite); raise `damp`")


def _prepare(w, h, cfg: Config):
  """Dead inputs, act-order, damping, ``U = chol(H^-1)^T`` (upper)."""
  dt = _grid.compute_dtype(w.dtype)
  w = w.astype(dt)
  h = h.astype(dt)
  d_in = w.shape[0]
  diag = jnp.diagonal(h)
  dead = diag == 0
  # An input that never fires: H_ii = 1 (so H stays invertible), w_i = 0.
  h = jnp.where(jnp.eye(d_in, dtype=bool) & dead[:, None], jnp.ones_like(h), h)
  w = jnp.where(dead[:, None], jnp.zeros_like(w), w)
  if cfg.act_order:
    perm = jnp.argsort(-jnp.diagonal(h), stable=True).astype(jnp.int32)
    w = w[perm]
    h = h[perm][:, perm]
  else:
    perm = jnp.arange(d_in, dtype=jnp.int32)
  damp = cfg.damp * jnp.mean(jnp.diagonal(h))
  h = h + damp * jnp.eye(d_in, dtype=dt)
  low = jnp.linalg.cholesky(h)
  hinv = jax.scipy.linalg.cho_solve((low, True), jnp.eye(d_in, dtype=dt))
  hinv = (hinv + hinv.T) / 2
  u = jnp.triu(jnp.linalg.cholesky(hinv).T)
  return w, u, perm


def _nm_keep(score, n: int):
  """Per column of ``score`` (m, cols): the ``n`` largest; ties: earlier row."""
  m = score.shape[0]
  a = score[:, None, :]   # k
  b = score[None, :, :]   # j
  idx = np.arange(m)
  earlier = jnp.asarray(idx[:, None] < idx[None, :])[:, :, None]
  beats = (a > b) | ((a == b) & earlier)
  rank = jnp.sum(beats, axis=0, dtype=jnp.int32)
  return rank < n


def _block_keep(score, k):
  """Prune the ``k`` lowest of ``score`` (>= 0, any shape); ties: later first.

  The ``k``-th smallest score is found by bisection on its IEEE bit pattern
  (monotonic for non-negative floats): a count per step, no sort (XLA's CPU
  sort of a block of 128 x 4096 scores costs more than the block's sweep).
  """
  itype = jnp.int32 if score.dtype == jnp.float32 else jnp.int64
  steps = 8 * np.dtype(itype).itemsize
  keys = lax.bitcast_convert_type(score, itype).ravel()

  def body(_, lohi):
    lo, hi = lohi
    mid = lo + (hi - lo) // 2
    ok = jnp.sum(keys <= mid, dtype=jnp.int32) >= k
    return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

  bounds = (jnp.zeros((), itype), jnp.asarray(np.iinfo(itype).max, itype))
  t, _ = lax.fori_loop(0, steps, body, bounds)
  below = keys < t
  tie = keys == t
  need = k - jnp.sum(below, dtype=jnp.int32)
  # Among the ties at the threshold, the last `need` in flat order go.
  from_end = jnp.cumsum(tie[::-1], dtype=jnp.int32)[::-1]
  pruned = below | (tie & (from_end <= need))
  return (~pruned).reshape(score.shape)


@functools.partial(jax.jit, static_argnames=("cfg",))
def sweep(w, h, counts, *, cfg: Config) -> Result:
  """One GPTQ/SparseGPT sweep over the rows of ``w`` (see the module notes).

  Args:
    w: kernel ``(d_in, d_out)``.
    h: Hessian ``(d_in, d_in)``.
    counts: ``int32 (n_blocks,)``, entries to prune per block (unstructured).
    cfg: static settings.
  """
  d_in, d_out = w.shape
  w0 = w.astype(_grid.compute_dtype(w.dtype))
  w, u, perm = _prepare(w, h, cfg)
  dt = w.dtype
  ok = jnp.all(jnp.isfinite(u))
  bsz = cfg.block
  n_blocks = -(-d_in // bsz)
  rows = n_blocks * bsz
  pad = rows - d_in
  # Padding rows are zeros that no real row updates (identity block of U).
  w = jnp.pad(w, ((0, pad), (0, 0)))
  u = jnp.pad(u, ((0, pad), (0, pad)))
  u = u + jnp.diag(jnp.concatenate([jnp.zeros(d_in, dt), jnp.ones(pad, dt)]))
  real = jnp.arange(rows) < d_in

  bits = cfg.bits
  group = cfg.group
  if bits is not None and group is None:
    # One grid per column, from the weights as given (as the reference code).
    s0, z0 = _grid.find_grid(w0, bits, cfg.symmetric)
    scales, zeros = s0[None], z0[None]
  else:
    # Initial values shaped `like` w: inside shard_map they vary like it.
    n_g = rows // group if group else 1
    scales = jnp.ones_like(w[:n_g])
    zeros = jnp.zeros_like(w[:n_g])

  def block_body(b, carry):
    w, q, codes, keep, scales, zeros = carry
    i1 = b * bsz
    w1 = lax.dynamic_slice(w, (i1, 0), (bsz, d_out))
    u1 = lax.dynamic_slice(u, (i1, i1), (bsz, bsz))
    d1 = jnp.diagonal(u1)
    if cfg.unstructured:
      score = w1 ** 2 / (d1 ** 2)[:, None]
      pad_row = ~lax.dynamic_slice(real, (i1,), (bsz,))
      score = jnp.where(pad_row[:, None], jnp.inf, score)
      m1 = _block_keep(score, counts[b])
    else:
      m1 = jnp.ones_like(w1, dtype=bool)
    s_cur, z_cur = scales[0], zeros[0]

    def row_body(r, rc):
      w1, m1, q1, c1, e1, s_cur, z_cur, scales, zeros = rc
      # Selects instead of lax.cond: the same program on every shard_map shard.
      if bits is not None and group is not None:
        s_new, z_new = _grid.find_grid(
            lax.dynamic_slice(w1, (r - r % group, 0), (group, d_out)), bits,
            cfg.symmetric)
        start = r % group == 0
        s_cur = jnp.where(start, s_new, s_cur)
        z_cur = jnp.where(start, z_new, z_cur)
        g = (i1 + r) // group
        scales = lax.dynamic_update_slice(scales, s_cur[None], (g, 0))
        zeros = lax.dynamic_update_slice(zeros, z_cur[None], (g, 0))
      if cfg.nm is not None:
        n, m = cfg.nm
        r0 = r - r % m
        sc = lax.dynamic_slice(w1, (r0, 0), (m, d_out)) ** 2
        dd = lax.dynamic_slice(d1, (r0,), (m,))
        win = jnp.where(r % m == 0, _nm_keep(sc / (dd ** 2)[:, None], n),
                        lax.dynamic_slice(m1, (r0, 0), (m, d_out)))
        m1 = lax.dynamic_update_slice(m1, win, (r0, 0))
      wr = w1[r]
      keep_r = m1[r]
      qr = jnp.where(keep_r, wr, jnp.zeros_like(wr))
      if bits is not None:
        cr, qr = _grid.quantize(qr, s_cur, z_cur, bits)
      else:
        cr = jnp.zeros_like(wr)
      err = (wr - qr) / u1[r, r]
      # U is upper triangular: rows before r are left untouched.
      w1 = w1 - u1[r][:, None] * err[None, :]
      q1 = q1.at[r].set(qr)
      c1 = c1.at[r].set(cr)
      e1 = e1.at[r].set(err)
      return w1, m1, q1, c1, e1, s_cur, z_cur, scales, zeros

    zeros_blk = jnp.zeros_like(w1)
    _, m1, q1, c1, e1, _, _, scales, zeros = lax.fori_loop(
        0, bsz, row_body,
        (w1, m1, zeros_blk, zeros_blk, zeros_blk, s_cur, z_cur, scales, zeros))
    # Lazy batch: the later rows get the whole block's updates at once (rows
    # at or before the block get U_ij = 0 or are done).
    u_rows = lax.dynamic_slice(u, (i1, 0), (bsz, rows))
    w = w - jnp.matmul(u_rows.T, e1, precision=_HIGHEST)
    q = lax.dynamic_update_slice(q, q1, (i1, 0))
    codes = lax.dynamic_update_slice(codes, c1, (i1, 0))
    keep = lax.dynamic_update_slice(keep, m1, (i1, 0))
    return w, q, codes, keep, scales, zeros

  full = jnp.zeros_like(w)
  _, q, codes, keep, scales, zeros = lax.fori_loop(
      0, n_blocks, block_body,
      (w, full, full, jnp.ones_like(w, dtype=bool), scales, zeros))
  q, codes, keep = q[:d_in], codes[:d_in], keep[:d_in]
  if group is not None and bits is not None:
    n_groups = -(-d_in // group)
    scales, zeros = scales[:n_groups], zeros[:n_groups]
  if cfg.act_order:
    inv = jnp.argsort(perm)
    q, codes, keep = q[inv], codes[inv], keep[inv]
  return Result(q, codes, scales, zeros, keep, perm, ok)
