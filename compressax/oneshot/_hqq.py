"""HQQ: calibration-free quantization by half-quadratic optimization of zeros."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from compressax import _checks
from compressax.oneshot import _grid

__all__ = ["hqq"]

# The reference code clamps its inverse scale at 2e4.
_MIN_SCALE = 1.0 / 2e4


def hqq(w, *, bits: int, group_size: int | None = 64, iters: int = 20,
        lp_norm: float = 0.7, beta: float = 10.0, kappa: float = 1.01,
        path: Any = "w") -> _grid.GroupQuantizedArray:
  """Quantize a kernel with HQQ (Badri & Shaji 2023): no calibration data.

  Per output column and group of ``group_size`` input rows, an affine grid
  from the group's min/max (``scale = (max - min) / (2^b - 1)``, float zero
  ``-min / scale``; unlike GPTQ's grid the range is not widened to 0). Then
  the zero points are refined by half-quadratic splitting of the sparsity-
  promoting loss ``||W - s (Q - z)||_p^p`` (``p = lp_norm < 1``): alternately

  * ``Q = clip(round(W / s + z))``, ``W_r = s (Q - z)``,
  * ``W_e = shrink_p(W - W_r, beta)`` (the generalized soft threshold
    ``sign(x) relu(|x| - |x|^(p-1) / beta)``),
  * ``z = mean over the group of (Q - (W - W_e) / s)``, ``beta *= kappa``,

  for at most ``iters`` steps, stopping at the first step whose
  ``mean |W - W_r|`` (over the whole kernel) does not improve. The reference
  code then keeps the zeros of that last step; here the zeros of the best
  step are kept, so the result is never worse than the initial grid.

  Zeros stay floats (the reference's default), stored as float32 in the
  :class:`GroupQuantizedArray` (32 bits each in ``storage_bits``).

  Args:
    w: kernel ``(d_in, d_out)``.
    bits: bits per weight, a Python int in ``[1, 16]``.
    group_size: input rows per group (must divide ``d_in``), or None for
      one group per column; ``64`` is the reference's default.
    iters, lp_norm, beta, kappa: the optimizer's settings (the reference's
      defaults), static.
    path: the layer's path, for error messages.

  Returns:
    A :class:`GroupQuantizedArray` with float zeros.

  Raises:
    ValueError: bad bits, a group size not dividing ``d_in``, ``lp_norm``
      outside ``(0, 1]``, NaN/Inf weights, naming ``path``.

  Example:
    >>> w = jax.random.normal(jax.random.key(0), (128, 64))  # (d_in, d_out)
    >>> node = cx.oneshot.hqq(w, bits=4, group_size=64)

  References:
    Badri & Shaji, *Half-Quadratic Quantization of Large Machine Learning
    Models*, 2023. https://mobiusml.github.io/hqq_blog/
    Geman & Yang, *Nonlinear image recovery with half-quadratic
    regularization*, IEEE TIP 1995.
  """
  _grid.check_kernel(path, w)
  bits = _grid.check_bits(path, bits)
  group_size = _grid.check_positive(path, "group_size", group_size, optional=True)
  d_in = w.shape[0]
  if group_size is not None and d_in % group_size:
    _checks.fail(path, f"group_size = {group_size} does not divide d_in = {d_in}")
  iters = _grid.check_positive(path, "iters", iters)
  _checks.check_range(path, "lp_norm", lp_norm, 0.0, 1.0, lo_open=True)
  _checks.check_range(path, "beta", beta, 0.0, np.inf, lo_open=True)
  _checks.check_range(path, "kappa", kappa, 0.0, np.inf, lo_open=True)
  codes, scale, zero = _hqq_jit(w, bits, group_size, iters, float(lp_norm),
                                float(beta), float(kappa))
  return _grid.GroupQuantizedArray(
      codes=codes, scale=scale, zero=zero,
      group_index=jnp.zeros((0,), jnp.int32), bits=bits, group_size=group_size,
      symmetric=False, shape=tuple(w.shape), dtype=np.dtype(w.dtype))


def _shrink(x, beta, p):
  if p == 1.0:
    return jnp.sign(x) * jax.nn.relu(jnp.abs(x) - 1.0 / beta)
  return jnp.sign(x) * jax.nn.relu(
      jnp.abs(x) - (1.0 / beta) * jnp.power(jnp.abs(x) + 1e-8, p - 1.0))


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5, 6))
def _hqq_jit(w, bits, group_size, iters, p, beta0, kappa):
  d_in, d_out = w.shape
  dt = _grid.compute_dtype(w.dtype)
  gs = d_in if group_size is None else group_size
  x = w.astype(dt).reshape(d_in // gs, gs, d_out)
  maxq = float(2 ** bits - 1)
  lo, hi = jnp.min(x, axis=1), jnp.max(x, axis=1)
  scale = jnp.maximum((hi - lo) / maxq, _MIN_SCALE)[:, None, :]
  zero0 = (-lo)[:, None, :] / scale

  def rebuild(z):
    q = jnp.clip(jnp.round(x / scale + z), 0.0, maxq)
    return q, scale * (q - z)

  def step(_, carry):
    z, beta, best_z, best_err, done = carry
    q, wr = rebuild(z)
    err = jnp.mean(jnp.abs(x - wr))
    better = (err < best_err) & ~done
    best_z = jnp.where(better, z, best_z)
    best_err = jnp.where(better, err, best_err)
    done = done | ~better
    we = _shrink(x - wr, beta, p)
    z_new = jnp.mean(q - (x - we) / scale, axis=1, keepdims=True)
    z = jnp.where(done, z, z_new)
    return z, beta * kappa, best_z, best_err, done

  init = (zero0, jnp.asarray(beta0, dt), zero0, jnp.asarray(jnp.inf, dt),
          jnp.asarray(False))
  _, _, z, _, _ = lax.fori_loop(0, iters, step, init)
  q, _ = rebuild(z)
  codes = q.reshape(d_in, d_out).astype(_grid.code_dtype(bits))
  return codes, scale[:, 0, :], z[:, 0, :]
