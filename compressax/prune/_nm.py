"""Fine-grained N:M structured sparsity (e.g. 2:4 for sparse tensor cores)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from compressax import _checks
from compressax import _sharding
from compressax.prune import _leaves

__all__ = ["nm_mask", "nm_mask_tree"]


def _check_nm(path, n, m, length: int) -> None:
  for name, v in (("n", n), ("m", m)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
      _checks.fail(path, f"{name} must be a Python int, got {v!r}", TypeError)
  if m < 1:
    _checks.fail(path, f"m must be >= 1, got {m}")
  if not 0 <= n <= m:
    _checks.fail(path, f"n must be in [0, m] = [0, {m}], got n={n}")
  if length % m:
    _checks.fail(path, f"the axis has length {length}, which m={m} does not "
                       "divide; N:M groups must tile the axis")


def _nm(path, x, n: int, m: int, axis: int):
  x = _leaves.dense_value(path, x)
  ax = _checks.check_axis(path, axis, x.ndim)
  _check_nm(path, n, m, x.shape[ax])
  # Groups are cut locally when each shard holds whole groups of m.
  return _sharding.like(_nm_core(_sharding.whole_groups(x, ax, int(m)), int(n),
                                 int(m), ax), x)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _nm_core(x, n: int, m: int, ax: int):
  moved = jnp.moveaxis(x, ax, -1)
  groups = moved.reshape(moved.shape[:-1] + (moved.shape[-1] // m, m))
  # magnitude_keys' bit pattern, kept in the groups' shape: a flat round
  # trip would mix axes split over explicit mesh axes.
  keys = lax.bitcast_convert_type(jnp.abs(groups).astype(jnp.float32), jnp.int32)
  # Stable sort of -key: largest magnitude first, equal ones by position.
  order = jnp.argsort(-keys, axis=-1, stable=True)
  rank = jnp.argsort(order, axis=-1, stable=True)
  keep = (rank < n).reshape(moved.shape)
  return jnp.moveaxis(keep, -1, ax)


def nm_mask(x, n: int, m: int, axis: int = -1):
  """Keep exactly ``n`` of every ``m`` consecutive weights along ``axis``.

  Within each group the ``n`` largest ``|w|`` are kept; equal magnitudes are
  kept in order of position (the earlier one first), so every group holds
  exactly ``n`` True entries whatever the ties.

  Args:
    x: a floating array.
    n: kept per group, ``0 <= n <= m`` (static Python int).
    m: group size, ``>= 1``, must divide ``x.shape[axis]`` (no padding).
    axis: the axis along which groups run (default ``-1``).

  Returns:
    A ``bool`` array of ``x.shape`` (True = kept).

  Raises:
    ValueError: ``n > m``, ``n < 0``, ``m < 1``, ``m`` not dividing the axis,
      a bad axis, NaN/Inf weights.
    TypeError: non-integer ``n``/``m`` or a non-floating ``x``.

  Example:
    >>> w = jax.random.normal(jax.random.key(0), (8, 4))
    >>> mask = cx.prune.nm_mask(w, 2, 4, axis=0)  # 2:4 along input features
    >>> mask.reshape(2, 4, 4).sum(axis=1).tolist() == [[2] * 4] * 2
    True

  References:
    Mishra et al., *Accelerating Sparse Deep Neural Networks*, 2021,
    arXiv:2104.08378 (2:4 on NVIDIA Ampere);
    Zhou et al., *Learning N:M Fine-grained Structured Sparse Neural
    Networks From Scratch*, ICLR 2021, arXiv:2102.04010.
  """
  return _nm("x", x, n, m, axis)


def nm_mask_tree(params, n: int, m: int, *, axis: int = -2, where=None):
  """:func:`nm_mask` on every selected leaf of a parameter pytree.

  The default ``axis=-2`` is the input-feature axis of linen/nnx kernels
  (Dense ``(in, out)``, Conv ``(..., in, out)``), the reduction axis along
  which sparse tensor cores expect N:M groups.

  Args:
    params: a parameter pytree.
    n: kept per group.
    m: group size; must divide each selected leaf's ``axis``.
    axis: the group axis of every selected leaf.
    where: which leaves (default: weight matrices and kernels).

  Returns:
    A mask pytree: ``bool`` arrays at selected leaves, 0-d ``True`` elsewhere.

  Raises:
    ValueError, TypeError: as :func:`nm_mask`, naming the leaf path.

  References:
    Mishra et al. 2021, arXiv:2104.08378.
  """
  treedef, pairs, flags = _leaves.flat_selection(params, where)
  masks = [_nm(p, x, n, m, axis) for (p, x), f in zip(pairs, flags) if f]
  return _leaves.assemble(treedef, flags, masks)
