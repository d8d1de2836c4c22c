"""Wanda: pruning by weight magnitude times input activation norm."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from compressax import _checks
from compressax import prune
from compressax.oneshot import _grid
from compressax.oneshot import _sparsegpt
from compressax.prune._rank import pruned_count

__all__ = ["wanda_mask"]


def wanda_mask(w, act_norm, *, sparsity=None, n_m: tuple[int, int] | None = None,
               path: Any = "w") -> jax.Array:
  """The Wanda keep-mask of a kernel (Sun et al. 2024): no weight update.

  Score ``|w_ij| * ||x_i||_2``, with ``||x_i||_2`` the L2 norm of input
  feature ``i`` over the calibration tokens. Flax layout: ``w`` is
  ``(d_in, d_out)`` and the paper's per-output comparison group is a column.

  * ``sparsity``: in every output column, exactly ``floor(sparsity * d_in)``
    lowest scores are pruned (ties: the later row is pruned).
  * ``n_m=(n, m)``: keep the ``n`` largest scores of every ``m`` consecutive
    input rows per column (``cx.prune.nm_mask`` along axis 0; ties: the
    earlier row is kept); the paper's 2:4 is ``n_m=(2, 4)``.

  Args:
    w: kernel ``(d_in, d_out)``.
    act_norm: ``(d_in,)``, the per-input L2 norm over calibration tokens,
      e.g. ``jnp.linalg.norm(x.reshape(-1, d_in), axis=0)`` or
      ``jnp.sqrt(jnp.diag(cx.oneshot.hessian(x)) / 2)``.
    sparsity: pruned fraction in ``[0, 1)``; may be traced.
    n_m: ``(n, m)`` kept of every ``m`` (static); ``m`` must divide ``d_in``.
    path: the layer's path, for error messages.

  Returns:
    ``bool (d_in, d_out)``, True = kept. Apply it with
    ``cx.prune.apply_mask`` or ``cx.prune.MaskedArray``.

  Raises:
    ValueError: a bad ``act_norm`` shape, NaN/Inf or negative norms
      (concrete), and the pattern errors of :func:`sparsegpt`, naming ``path``.

  Example:
    >>> w = jax.random.normal(jax.random.key(0), (128, 64))  # (d_in, d_out)
    >>> x = jax.random.normal(jax.random.key(1), (4, 32, 128))  # calibration
    >>> norm = jnp.linalg.norm(x.reshape(-1, 128), axis=0)  # per input feature
    >>> keep = cx.oneshot.wanda_mask(w, norm, sparsity=0.5)
    >>> int(keep.sum())
    4096

  References:
    Sun, Liu, Bair, Kolter. *A Simple and Effective Pruning Approach for Large
    Language Models*. ICLR 2024. https://arxiv.org/abs/2306.11695
  """
  _grid.check_kernel(path, w)
  d_in = w.shape[0]
  _checks.check_floating(path, act_norm)
  if tuple(np.shape(act_norm)) != (d_in,):
    _checks.fail(path, f"act_norm must have shape (d_in,) = ({d_in},), got "
                       f"{tuple(np.shape(act_norm))}")
  _checks.check_finite(path, act_norm)
  if _checks.is_concrete(act_norm) and np.any(np.asarray(act_norm) < 0):
    _checks.fail(path, "act_norm holds norms: they cannot be negative")
  nm = _sparsegpt.check_pattern(path, sparsity, n_m, d_in)
  dt = _grid.compute_dtype(w.dtype)
  score = _score(w.astype(dt), act_norm.astype(dt))
  if nm is not None:
    return prune.nm_mask(score, nm[0], nm[1], axis=0)
  return _column_keep(score, jnp.asarray(pruned_count(d_in, sparsity), jnp.int32))


@jax.jit
def _score(w, act_norm):
  return jnp.abs(w) * act_norm[:, None]


@functools.partial(jax.jit)
def _column_keep(score, k):
  d_in = score.shape[0]
  order = jnp.argsort(-score, axis=0, stable=True)
  rank = jnp.argsort(order, axis=0, stable=True)
  return rank < d_in - k
