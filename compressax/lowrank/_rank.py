"""Rank selection: retained energy, a global parameter ratio, stable rank."""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from compressax import _checks
from compressax import _select
from compressax import _sharding
from compressax.lowrank._svd import _check_leaf
from compressax.lowrank._svd import matrix_shape

__all__ = ["rank_for_energy", "ranks_for_ratio", "stable_rank",
           "rank_for_stable_rank", "singular_values"]

PyTree = Any


def singular_values(x: jax.Array, *, path=None) -> jax.Array:
  """Singular values (descending, float32) of a leaf's matrix view.

  The matrix view is ``x.reshape(-1, x.shape[-1])`` as in :func:`factorize`.
  Gradients flow through ``jnp.linalg.svd(compute_uv=False)``, whose
  derivative ``u_i v_i^T`` stays finite for repeated singular values.

  Args:
    x: a floating leaf with ``ndim >= 2``.
    path: the leaf's path, for error messages.

  Returns:
    ``float32[min(m, n)]``.

  Raises:
    TypeError: ``x`` is not floating point.
    ValueError: ``x`` is 1-D or holds NaN/Inf (checked when concrete).
  """
  path = "x" if path is None else path
  _check_leaf(path, x)
  m, n = matrix_shape(x.shape)
  # The SVD needs the whole matrix (a sharded leaf is gathered).
  w = _sharding.replicated(jnp.asarray(x)).reshape(m, n).astype(jnp.float32)
  return jnp.linalg.svd(w, compute_uv=False)


def rank_for_energy(x: jax.Array, energy, *, path=None):
  """The smallest rank ``r`` whose factors keep ``>= energy`` of ``||W||_F^2``.

  ``r = min{r : sum_{i<=r} sigma_i^2 >= energy * sum_i sigma_i^2}``. By
  Eckart-Young the rank-``r`` truncated SVD then has relative squared error
  ``||W - W_r||_F^2 / ||W||_F^2 <= 1 - energy``. A zero matrix gets rank 1.

  Args:
    x: a floating leaf with ``ndim >= 2`` (matrix view as in :func:`factorize`).
    energy: the retained fraction, in ``(0, 1]``. May be traced; a traced
      value outside the interval is clipped into it, and a traced NaN
      means 1 (keep all the energy).
    path: the leaf's path, for error messages.

  Returns:
    A Python ``int`` when ``x`` and ``energy`` are concrete, else a traced
    ``int32`` scalar.

  Raises:
    ValueError: ``energy`` outside ``(0, 1]``, or a bad leaf (see
      :func:`factorize`).
  """
  path = "x" if path is None else path
  _checks.check_range(path, "energy", energy, 0.0, 1.0, lo_open=True)
  s2 = jnp.square(singular_values(x, path=path))
  cum = jnp.cumsum(s2)
  e = jnp.asarray(energy, jnp.float32)
  target = jnp.clip(jnp.where(jnp.isnan(e), 1.0, e), 0.0, 1.0) * cum[-1]
  # Rounding can leave cum[-1] a hair below target for energy == 1; the clip
  # keeps r within [1, min(m, n)].
  r = jnp.clip(jnp.sum(cum < target) + 1, 1, s2.shape[0]).astype(jnp.int32)
  if _checks.is_concrete(r):
    return int(r)
  return r


def _selected_matrices(params, where, *, what: str):
  leaves = _select.selected_leaves(params, where)
  if not leaves:
    raise ValueError(f"{what}: `where` selects no leaves")
  out = []
  for keypath, x in leaves:
    _check_leaf(keypath, x)
    out.append((keypath, x, *matrix_shape(x.shape)))
  return out


def _uniform_ranks(dims, f: Fraction):
  """``max(1, floor(f * min(m, n)))`` per layer, in exact arithmetic."""
  return [max(1, (f.numerator * min(m, n)) // f.denominator) for m, n in dims]


def ranks_for_ratio(params: PyTree, ratio, *, where: _select.Where = None
                    ) -> dict[str, int]:
  """Per-leaf ranks from one uniform rank fraction meeting a parameter ratio.

  The rule: every selected leaf ``l`` (matrix view ``m_l x n_l``, full rank
  ``k_l = min(m_l, n_l)``) gets ``r_l = max(1, floor(f * k_l))`` for one
  fraction ``f`` shared by all leaves; ``f`` is the largest value with

      sum_l r_l (m_l + n_l) <= ratio * sum_l m_l n_l,

  i.e. the factorized parameter count of the selected leaves is at most
  ``ratio`` times their dense count. Only the finitely many fractions
  ``j / k_l`` change a rank, so the search is exact integer arithmetic over
  them (no floating-point slack).

  Args:
    params: a parameter pytree.
    ratio: the target parameter ratio, in ``(0, 1]`` (a Python number).
    where: which leaves to factorize (default: weight matrices and kernels).

  Returns:
    ``{path: rank}`` with :func:`compressax.path_str` paths, for
    :func:`factorize_tree`'s ``rank=``.

  Raises:
    ValueError: ``ratio`` outside ``(0, 1]``, no leaf selected, a bad leaf,
      or a ratio so small that rank 1 everywhere exceeds the budget.
  """
  _checks.check_range("ranks_for_ratio", "ratio", ratio, 0.0, 1.0,
                      lo_open=True)
  mats = _selected_matrices(params, where, what="ranks_for_ratio")
  dims = [(m, n) for _, _, m, n in mats]
  budget = float(ratio) * sum(m * n for m, n in dims)

  def cost(ranks):
    return sum(r * (m + n) for r, (m, n) in zip(ranks, dims))

  if cost([1] * len(dims)) > budget:
    raise ValueError(
        f"ratio {ratio} is too small: rank 1 in every selected leaf already "
        f"needs {cost([1] * len(dims))} parameters, budget "
        f"{budget:.0f} = ratio * {sum(m * n for m, n in dims)}")
  # Candidate fractions j / k_l as exact (num, den) pairs, sorted by value.
  cands = sorted({Fraction(j, min(m, n)) for _, _, m, n in mats
                  for j in range(1, min(m, n) + 1)})
  lo, hi = -1, len(cands) - 1  # invariant: cands[lo] feasible (or none yet)
  while lo < hi:
    mid = (lo + hi + 1) // 2
    if cost(_uniform_ranks(dims, cands[mid])) <= budget:
      lo = mid
    else:
      hi = mid - 1
  ranks = ([1] * len(dims) if lo < 0 else _uniform_ranks(dims, cands[lo]))
  return {_select.path_str(kp): r for (kp, *_), r in zip(mats, ranks)}


def stable_rank(x: jax.Array, *, path=None) -> jax.Array:
  """Stable rank ``||W||_F^2 / ||W||_2^2 = sum_i sigma_i^2 / sigma_1^2``.

  A continuous, differentiable surrogate of the rank, in ``[1, min(m, n)]``;
  0 for the zero matrix (where the ratio is undefined).

  Args:
    x: a floating leaf with ``ndim >= 2`` (matrix view as in :func:`factorize`).
    path: the leaf's path, for error messages.

  Returns:
    A float32 scalar.

  References:
    Rudelson and Vershynin, *Sampling from large matrices*, JACM 2007.
    Eo, Kang, Rhee 2021, https://arxiv.org/abs/2111.15179.
  """
  s2 = jnp.square(singular_values(x, path=path))
  top = s2[0]
  safe = jnp.where(top > 0, top, 1.0)
  return jnp.where(top > 0, jnp.sum(s2) / safe, 0.0)


def rank_for_stable_rank(x: jax.Array, *, scale: float = 1.0, path=None):
  """Rank ``ceil(scale * stable_rank(x))`` clipped to ``[1, min(m, n)]``.

  Args:
    x: a floating leaf with ``ndim >= 2``.
    scale: multiplier on the stable rank (> 0); larger keeps more.
    path: the leaf's path, for error messages.

  Returns:
    A Python ``int`` for concrete ``x``, else a traced ``int32`` scalar.
  """
  path = "x" if path is None else path
  _checks.check_range(path, "scale", scale, 0.0, np.inf, lo_open=True)
  m, n = matrix_shape(np.shape(x))
  # The tiny slack keeps an exact integer stable rank (e.g. an identity)
  # from rounding up by one ulp.
  sr = stable_rank(x, path=path) * scale
  r = jnp.clip(jnp.ceil(sr * (1 - 1e-6)), 1, min(m, n)).astype(jnp.int32)
  return int(r) if _checks.is_concrete(r) else r
