"""Layer Hessians from calibration inputs: ``H = 2 X^T X`` over ``d_in``.

For a Flax Dense layer ``y = x @ W`` with calibration inputs ``X (n, d_in)``,
the layer-wise objective ``||X W - X W_hat||_F^2`` is a quadratic in each
output column with Hessian ``H = 2 X^T X``, shared by all columns. GPTQ and
SparseGPT need only ``H``; Wanda needs only its diagonal
(``||x_i||_2 = sqrt(H_ii / 2)``).

References:
  Frantar et al., GPTQ, ICLR 2023. https://arxiv.org/abs/2210.17323
  Frantar & Alistarh, SparseGPT, ICML 2023. https://arxiv.org/abs/2301.00774
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from compressax import _checks

__all__ = ["hessian", "hessian_update"]


def _flat(path, x):
  _checks.check_floating(path, x)
  if np.ndim(x) < 1:
    _checks.fail(path, "calibration inputs need a feature axis (..., d_in)")
  dt = np.float64 if x.dtype == np.float64 else np.float32
  return jnp.reshape(x, (-1, x.shape[-1])).astype(dt)


def hessian(x, *, axis_name: Any = None, path: Any = "x") -> jax.Array:
  """``2 X^T X`` of calibration inputs, summed over every leading axis of ``x``.

  Args:
    x: inputs of one layer, ``(..., d_in)`` (e.g. ``(batch, seq, d_in)``);
      float32 arithmetic (float64 for float64 inputs), full matmul precision.
    axis_name: inside ``jax.shard_map`` (or ``pmap``) over a batch axis, the
      mapped axis name: the per-device sums are ``psum``-ed, so every device
      gets the Hessian of the whole batch.
    path: the layer's path, for error messages.

  Returns:
    ``(d_in, d_in)`` symmetric positive semi-definite.

  Example:
    >>> x = jax.random.normal(jax.random.key(1), (4, 32, 128))  # calibration
    >>> h = cx.oneshot.hessian(x)               # x: (batch, seq, d_in)
    >>> h.shape
    (128, 128)

  References:
    Frantar et al. 2023, Sec. 3. https://arxiv.org/abs/2210.17323
  """
  x = _flat(path, x)
  h = 2 * jnp.matmul(x.T, x, precision=lax.Precision.HIGHEST)
  if axis_name is not None:
    h = lax.psum(h, axis_name)
  return h


def hessian_update(h, n, x, *, axis_name: Any = None, path: Any = "x"):
  """Fold one batch into a running *average* Hessian; returns ``(h, n)``.

  After batches ``X_1 .. X_k`` of ``n_1 .. n_k`` rows (tokens: every leading
  axis), ``h = hessian(concat X) / (n_1 + ... + n_k)`` and ``n`` is the row
  count, as the reference code's running average (there over sequences).
  The scale of ``h`` does not change GPTQ or SparseGPT, whose dampening is
  relative to ``mean(diag H)``; the average keeps float32 sums bounded.

  Args:
    h: the running Hessian, ``(d_in, d_in)``; start from zeros.
    n: rows seen so far (an int or a scalar array); start from 0.
    x: the new batch ``(..., d_in)``.
    axis_name: as in :func:`hessian` (the row count is ``psum``-ed too).
    path: the layer's path, for error messages.

  Returns:
    ``(h, n)``: the updated average and the row count (float32 scalar).

  Example:
    >>> d_in = 16
    >>> batches = jax.random.normal(jax.random.key(0), (3, 8, d_in))
    >>> h, n = jnp.zeros((d_in, d_in)), 0
    >>> for x in batches:
    ...   h, n = cx.oneshot.hessian_update(h, n, x)
  """
  d_in = np.shape(x)[-1] if np.ndim(x) else None
  if tuple(np.shape(h)) != (d_in, d_in):
    _checks.fail(path, f"the running Hessian has shape {tuple(np.shape(h))}, "
                       f"expected ({d_in}, {d_in}) for inputs (..., {d_in})")
  batch = hessian(x, axis_name=axis_name, path=path)
  dt = batch.dtype
  b = jnp.asarray(int(np.prod(np.shape(x)[:-1], dtype=np.int64)), dt)
  if axis_name is not None:
    b = lax.psum(b, axis_name)
  n = jnp.asarray(n).astype(dt)
  total = n + b
  h = jnp.asarray(h).astype(dt) * (n / total) + batch / total
  return h, total
