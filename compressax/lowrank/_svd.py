"""Truncated-SVD factorization of weight matrices into ``U @ V``.

A leaf ``W`` of shape ``(..., n)`` is viewed as the matrix
``W.reshape(-1, n)``: a Dense kernel ``(m, n)`` as itself and a conv kernel
``(H, W, Cin, Cout)`` as ``(H*W*Cin, Cout)`` (all leading axes are collapsed
into rows, the output channels stay as columns). The factors are reshaped back
to the leaf's shape on :meth:`LowRankArray.materialize`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Union

import jax
import jax.numpy as jnp
import numpy as np

from compressax import _checks
from compressax import _rules
from compressax import _select
from compressax import _sharding
from compressax._node import CompressedLeaf
from compressax._node import compressed_leaf
from compressax._node import is_compressed

__all__ = ["LowRankArray", "factorize", "factorize_tree", "matrix_shape"]

PyTree = Any
RankSpec = Union[int, Mapping[str, int], Callable[[str, Any], int], None]


@compressed_leaf(name="compressax.LowRankArray")
@dataclasses.dataclass(frozen=True)
class LowRankArray(CompressedLeaf):
  """A weight stored as two low-rank factors, ``W ~= (u @ v).reshape(shape)``.

  Attributes:
    u: ``float32[m, k]`` left factor, ``U_r * sqrt(sigma_r)``.
    v: ``float32[k, n]`` right factor, ``sqrt(sigma_r) * V_r^T``.
    shape: the dense leaf's shape; ``m = prod(shape[:-1])``, ``n = shape[-1]``.
    dtype: the dense leaf's dtype.
    rank: the effective rank ``r <= k`` when it was concrete at factorization
      time, else ``None`` (a traced rank: columns ``r..k-1`` of ``u`` and rows
      of ``v`` are zero, but their number is not known statically).
  """

  u: jax.Array
  v: jax.Array
  shape: tuple = dataclasses.field(metadata=dict(static=True))
  dtype: Any = dataclasses.field(metadata=dict(static=True))
  rank: Any = dataclasses.field(default=None, metadata=dict(static=True))

  def materialize(self) -> jax.Array:
    # The factors may themselves be compressed (e.g. 8-bit codes).
    u, v = (f.materialize() if is_compressed(f) else f for f in (self.u, self.v))
    # The product of the (small) gathered factors: a product of shards would
    # round differently on CPU. It is then laid out as u's rows (a matrix)
    # and v's columns say, the layout factorize gave a sharded leaf.
    dense = (_sharding.replicated(u) @ _sharding.replicated(v)).reshape(
        self.shape).astype(self.dtype)
    su, sv = _sharding.named(u), _sharding.named(v)
    if su is None and sv is None:
      return dense
    rows = _sharding.spec_tuple(su, 2)[0] if su is not None else None
    cols = _sharding.spec_tuple(sv, 2)[1] if sv is not None else None
    nd = len(self.shape)
    spec = ((rows,) if nd == 2 else (None,) * (nd - 1)) + (cols,)
    return _sharding.like_spec(dense, u if su is not None else v,
                               lambda _: spec)

  def storage_bits(self) -> int:
    """``32 * r * (m + n)``: both float32 factors at the effective rank ``r``.

    ``r`` is :attr:`rank` when known, else the stored width ``k`` (an upper
    bound: zero columns from a traced rank are counted). Use :meth:`compact`
    on concrete factors to drop those columns first.
    """
    if is_compressed(self.u) or is_compressed(self.v):
      return sum(int(f.storage_bits()) if is_compressed(f)
                 else 32 * int(np.size(f)) for f in (self.u, self.v))
    m, n = matrix_shape(self.shape)
    r = self.rank if self.rank is not None else self.u.shape[-1]
    return 32 * int(r) * (m + n)

  def validate(self) -> None:
    """``u`` is ``(m, k)``, ``v`` is ``(k, n)`` for the dense ``(m, n)``."""
    super().validate()
    m, n = matrix_shape(tuple(self.shape)) if len(self.shape) else (None, None)
    us, vs = (tuple(f.shape) if is_compressed(f) else np.shape(f)
              for f in (self.u, self.v))
    if len(us) != 2 or len(vs) != 2 or us[1] != vs[0] or (m, n) != (us[0], vs[1]):
      raise ValueError(f"factors {us} @ {vs} do not make the dense shape "
                       f"{tuple(self.shape)} (as ({m}, {n}))")
    r = self.rank
    if r is not None and (isinstance(r, bool) or not isinstance(r, int)
                          or not 0 <= r <= us[1]):
      raise ValueError(f"rank must be None or an int in [0, {us[1]}], got {r!r}")

  def compact(self) -> "LowRankArray":
    """Drop the zero columns left by a traced rank (concrete factors only).

    Returns:
      A node whose ``u``/``v`` hold exactly ``rank`` columns/rows, with
      ``rank`` set: the columns that are zero in both factors are removed.

    Raises:
      ValueError: the factors are traced (inside ``jit``/``vmap``).
    """
    if not (_checks.is_concrete(self.u) and _checks.is_concrete(self.v)):
      raise ValueError("LowRankArray.compact needs concrete (non-traced) "
                       "factors")
    live = (np.any(np.asarray(self.u) != 0, axis=0)
            | np.any(np.asarray(self.v) != 0, axis=1))
    r = int(live.sum())
    # Masked singular values are a suffix, so the live columns are a prefix.
    return LowRankArray(self.u[:, :r], self.v[:r], self.shape, self.dtype, r)


def matrix_shape(shape) -> tuple[int, int]:
  """``(m, n) = (prod(shape[:-1]), shape[-1])``: a leaf's matrix view.

  Raises:
    ValueError: ``shape`` is ``()`` (a scalar has no matrix view).
  """
  shape = tuple(int(d) for d in shape)
  if not shape:
    raise ValueError("matrix_shape: a scalar (shape ()) has no matrix view; "
                     "low-rank factorization needs ndim >= 2")
  return math.prod(shape[:-1]), shape[-1]


def _check_leaf(path, x) -> None:
  _checks.check_floating(path, x)
  if np.ndim(x) < 2:
    _checks.fail(path, "low-rank factorization needs a matrix or a conv "
                       f"kernel (ndim >= 2), got shape {tuple(np.shape(x))}; "
                       "exclude 1-D leaves with `where`")
  _checks.check_finite(path, x)


def _check_rank(path, rank, width: int) -> None:
  _checks.check_range(path, "rank", rank, 1, width, integer=True)


def _split_factors(u, s, vt, rank, width: int):
  """Factors of width ``width`` with singular values past ``rank`` zeroed."""
  keep = jnp.arange(width) < rank
  root = jnp.sqrt(jnp.where(keep, s[:width], 0.0))
  return u[:, :width] * root[None, :], root[:, None] * vt[:width]


def factorize(x: jax.Array, rank, *, path=None,
              max_rank: int | None = None) -> LowRankArray:
  """Truncated SVD ``W ~= U V`` of a weight matrix or conv kernel.

  With ``W = P diag(sigma) Q^T`` (singular values descending), the factors are
  ``U = P_r diag(sqrt(sigma_r))`` and ``V = diag(sqrt(sigma_r)) Q_r^T``: the
  singular values are split evenly so that both factors have the same scale
  (better conditioned for fine-tuning than putting ``sigma`` on one side). By
  Eckart-Young, ``||W - U V||_F^2 = sum_{i > r} sigma_i^2``, the discarded
  energy, and no rank-``r`` matrix does better.

  ``rank`` may be a traced integer (``jax.vmap`` over ranks, ``jit`` with a
  dynamic rank): the SVD is computed at full width and singular values at
  index ``>= rank`` are masked to zero, so ``u`` and ``v`` keep
  ``min(m, n)`` columns (or ``max_rank``). A traced ``rank`` outside
  ``[1, width]`` is clipped into it, and a traced NaN means full width
  (no truncation). With a concrete ``rank`` and no
  ``max_rank`` the factors hold exactly ``rank`` columns.

  Args:
    x: a floating leaf with ``ndim >= 2``; viewed as the matrix
      ``x.reshape(-1, x.shape[-1])`` (a conv kernel ``(H, W, Cin, Cout)`` as
      ``(H*W*Cin, Cout)``). Computed in float32.
    rank: the number of singular values kept, in ``[1, min(m, n)]``.
    path: the leaf's path, used in error messages.
    max_rank: static cap on the stored width (``u`` is ``(m, max_rank)``);
      a concrete ``rank`` must not exceed it.

  Returns:
    A :class:`LowRankArray` whose ``materialize()`` is the rank-``rank``
    approximation in ``x``'s shape and dtype.

  Raises:
    TypeError: ``x`` is not floating point.
    ValueError: ``x`` is 1-D, holds NaN/Inf, or a concrete ``rank`` is not an
      integer in ``[1, min(m, n)]`` (or exceeds ``max_rank``).

  Example:
    >>> w = jnp.eye(4)
    >>> f = factorize(w, 2)
    >>> f.u.shape, f.v.shape, f.storage_bits()
    ((4, 2), (2, 4), 512)

  References:
    Eckart and Young, *The approximation of one matrix by another of lower
    rank*, Psychometrika 1936. Eo, Kang, Rhee, *A Highly Effective Low-Rank
    Compression of Deep Neural Networks with Modified Beam-Search and Modified
    Stable Rank*, 2021, https://arxiv.org/abs/2111.15179.
  """
  path = "x" if path is None else path
  _check_leaf(path, x)
  m, n = matrix_shape(x.shape)
  full = min(m, n)
  if max_rank is not None:
    _checks.check_range(path, "max_rank", max_rank, 1, full, integer=True)
    width = int(max_rank)
  else:
    width = full
  _check_rank(path, rank, width)
  concrete = _checks.is_concrete(rank)
  if concrete and max_rank is None:
    width = int(rank)
  # The SVD needs the whole matrix: a sharded leaf is factorized on a
  # gathered copy (the same factors as unsharded).
  w = _sharding.replicated(jnp.asarray(x)).reshape(m, n).astype(jnp.float32)
  u, s, vt = jnp.linalg.svd(w, full_matrices=False)
  r = jnp.asarray(rank)
  if jnp.issubdtype(r.dtype, jnp.inexact):  # a traced NaN rank keeps them all
    # (keeps index < r, i.e. ceil(r), in integers: no float/int promotion).
    r = jnp.ceil(jnp.where(jnp.isnan(r), width, r)).astype(jnp.int32)
  r = jnp.clip(r, 1, width)
  uf, vf = _split_factors(u, s, vt, r, width)
  # u's rows follow a matrix leaf's row sharding (a conv kernel's collapsed
  # rows stay replicated), v's columns the output channels'; the rank axis
  # is replicated. So u @ v comes out laid out like x.
  uf = _sharding.like_spec(uf, x, lambda spec: (
      spec[0] if len(spec) == 2 else None, None))
  vf = _sharding.like_spec(vf, x, lambda spec: (None, spec[-1]))
  return LowRankArray(uf, vf, tuple(int(d) for d in x.shape), np.dtype(x.dtype),
                      int(rank) if concrete else None)


def _rank_for_leaf(rank: RankSpec, keypath, x):
  return _rules.lookup(rank, keypath, x, name="rank", exc=KeyError)


def factorize_tree(params: PyTree, *, rank: RankSpec = None,
                   energy: float | None = None, ratio: float | None = None,
                   where: _select.Where = None,
                   max_rank: int | None = None) -> PyTree:
  """Replace the selected leaves of ``params`` with :class:`LowRankArray` nodes.

  Exactly one of ``rank``, ``energy`` and ``ratio`` says how each leaf's rank
  is chosen.

  Args:
    params: a parameter pytree (linen dict, ``nnx.State``, nested dicts).
    rank: an int for every selected leaf, a mapping ``path -> int`` (as
      returned by :func:`ranks_for_ratio` or :func:`bsr_ranks`; paths as
      :func:`compressax.path_str`), or a callable ``(path, leaf) -> int``.
    energy: keep, per leaf, the smallest rank that retains at least this
      fraction of the squared Frobenius norm (:func:`rank_for_energy`).
    ratio: a uniform rank fraction meeting this parameter ratio for the whole
      tree (:func:`ranks_for_ratio`).
    where: which leaves to factorize (default: weight matrices and kernels).
    max_rank: passed to :func:`factorize`.

  Returns:
    ``params`` with the selected leaves factorized; the other leaves are the
    same objects.

  Raises:
    ValueError: not exactly one of ``rank``/``energy``/``ratio``, or any error
      of :func:`factorize`, naming the leaf.
    KeyError: a rank mapping lacks a selected leaf's path.
  """
  given = [k for k, v in (("rank", rank), ("energy", energy), ("ratio", ratio))
           if v is not None]
  if len(given) != 1:
    raise ValueError("factorize_tree needs exactly one of rank=, energy=, "
                     f"ratio=; got {given or 'none'}")
  if ratio is not None:
    from compressax.lowrank._rank import ranks_for_ratio
    rank = ranks_for_ratio(params, ratio, where=where)
  if energy is not None:
    from compressax.lowrank._rank import rank_for_energy

    def fn(p, x):
      return factorize(x, rank_for_energy(x, energy, path=p), path=p,
                       max_rank=max_rank)
  else:
    _rules.check_used(params, rank, where=where, name="rank")

    def fn(p, x):
      return factorize(x, _rank_for_leaf(rank, p, x), path=p, max_rank=max_rank)

  return _select.map_selected(fn, params, where=where)
