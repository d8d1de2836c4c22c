"""Learned step size quantization (LSQ): a quantizer whose step is trained.

``v_hat = round(clip(v / s, -Q_N, Q_P)) * s`` with a hand-written gradient:

* ``d v_hat / d v`` is 1 strictly inside ``(-Q_N, Q_P)`` (in units of ``s``)
  and 0 outside (straight-through estimator with clipping);
* ``d v_hat / d s`` is ``round(v/s) - v/s`` inside, ``-Q_N`` at or below the
  lower clip and ``Q_P`` at or above the upper one;
* the step's gradient is multiplied by ``g = 1 / sqrt(N * Q_P)``, ``N`` the
  number of values sharing that step.

Signed grids use ``Q_N = 2^(b-1)``, ``Q_P = 2^(b-1) - 1``; unsigned grids
``Q_N = 0``, ``Q_P = 2^b - 1``.

References:
  Esser, McKinstry, Bablani, Appuswamy, Modha. *Learned Step Size
  Quantization*. ICLR 2020. https://arxiv.org/abs/1902.08153
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from compressax import _checks

__all__ = ["lsq", "lsq_init"]


def _check(path, x, bits, signed):
  if not hasattr(x, "dtype"):
    x = jnp.asarray(x)
  _checks.check_floating(path, x)
  if isinstance(bits, (bool, np.bool_)):
    _checks.fail(path, f"bits must be an integer, got {bits!r}", TypeError)
  if jnp.ndim(bits) != 0:
    _checks.fail(path, f"bits must be a scalar, got shape {jnp.shape(bits)}")
  _checks.check_bits(path, bits, lo=2 if signed else 1)
  # A concrete array closed over by a jitted function is still checked.
  with jax.ensure_compile_time_eval():
    _checks.check_finite(path, x)
  return x


def _levels(bits, signed):
  """``(Q_N, Q_P)`` as float32; traced bits are rounded and clipped."""
  b = jnp.round(jnp.asarray(bits, jnp.float32))
  b = jnp.clip(b, 2 if signed else 1, 16).astype(jnp.int32)
  if signed:
    half = jnp.left_shift(1, b - 1).astype(jnp.float32)
    return half, half - 1
  return jnp.zeros((), jnp.float32), (jnp.left_shift(1, b) - 1).astype(
      jnp.float32)


@jax.custom_vjp
def _lsq_core(v, s, qn, qp, gscale):
  return jnp.round(jnp.clip(v / s, -qn, qp)) * s


def _lsq_fwd(v, s, qn, qp, gscale):
  r = v / s
  return jnp.round(jnp.clip(r, -qn, qp)) * s, (r, qn, qp, gscale)


def _lsq_bwd(res, g):
  r, qn, qp, gscale = res
  low, high = r <= -qn, r >= qp
  inside = jnp.logical_not(low | high)
  dv = jnp.where(inside, g, jnp.zeros_like(g))
  ds = jnp.where(low, -qn, jnp.where(high, qp, jnp.round(r) - r))
  return dv, g * ds * gscale, None, None, None


_lsq_core.defvjp(_lsq_fwd, _lsq_bwd)


def lsq(x, step, bits, *, signed: bool = True, path: Any = "x") -> jax.Array:
  """LSQ fake quantization with a learnable step ``step``.

  Args:
    x: floating-point values (weights or activations).
    step: the step size ``s``: a scalar, or an array of ``x``'s rank that
      broadcasts to ``x.shape`` (e.g. shape ``(1, out)`` for per-channel
      steps). A traced non-positive step is clamped to the smallest normal
      float32.
    bits: bits per value, an integer in ``[2, 16]`` (signed) or ``[1, 16]``
      (unsigned); a traced value is rounded and clipped into that range.
    signed: signed grid ``[-2^(b-1), 2^(b-1) - 1]`` (weights) or unsigned
      ``[0, 2^b - 1]`` (post-ReLU activations).
    path: the name used in error messages.

  Returns:
    ``round(clip(x/s, -Q_N, Q_P)) * s`` in ``x``'s shape and dtype (computed
    in float32), with the LSQ gradients for ``x`` and ``step``; the step's
    gradient is scaled by ``1/sqrt(N Q_P)``, ``N = x.size / step.size``.

  Raises:
    TypeError: ``x`` is not floating point.
    ValueError: concrete ``bits`` out of range, a concrete ``step`` that is
      not positive and finite, NaN/Inf in a concrete ``x``, or a ``step``
      shape that does not broadcast to ``x``.

  Example:
    >>> s = lsq_init(w, 4)
    >>> loss = lambda w, s: jnp.sum(lsq(w, s, 4) ** 2)
    >>> gw, gs = jax.grad(loss, argnums=(0, 1))(w, s)

  References:
    Esser et al. *Learned Step Size Quantization*. ICLR 2020.
    https://arxiv.org/abs/1902.08153
  """
  x = _check(path, x, bits, signed)
  step = jnp.asarray(step)
  if not jnp.issubdtype(step.dtype, jnp.floating):
    _checks.fail(path, f"step must be floating point, got {step.dtype}",
                 TypeError)
  if step.ndim not in (0, x.ndim) or any(
      d not in (1, n) for d, n in zip(step.shape, x.shape)):
    _checks.fail(path, f"step of shape {step.shape} does not broadcast to x's "
                       f"shape {x.shape} (use a scalar or an array of rank "
                       f"{x.ndim})")
  if _checks.is_concrete(step) and not np.all(
      np.isfinite(np.asarray(step)) & (np.asarray(step) > 0)):
    _checks.fail(path, f"step must be positive and finite, got {step}")
  qn, qp = _levels(bits, signed)
  n_per_step = x.size // max(step.size, 1)
  gscale = jax.lax.rsqrt(jnp.float32(max(n_per_step, 1)) * qp)
  s = jnp.maximum(step.astype(jnp.float32), jnp.finfo(jnp.float32).tiny)
  s = jnp.broadcast_to(s, x.shape)
  out = _lsq_core(x.astype(jnp.float32), s, qn, qp, gscale)
  return out.astype(x.dtype)


def lsq_init(x, bits, *, signed: bool = True, path: Any = "x") -> jax.Array:
  """LSQ's initial step ``2 mean|x| / sqrt(Q_P)`` (a float32 scalar).

  Args:
    x: the values to be quantized (e.g. a weight matrix).
    bits: bits per value, as in :func:`lsq`.
    signed: as in :func:`lsq`.
    path: the name used in error messages.

  Returns:
    The step size, a float32 scalar.

  Raises:
    TypeError, ValueError: as :func:`lsq`.

  References:
    Esser et al. *Learned Step Size Quantization*. ICLR 2020.
    https://arxiv.org/abs/1902.08153
  """
  x = _check(path, x, bits, signed)
  if x.size == 0:
    _checks.fail(path, "lsq_init needs a non-empty array")
  _, qp = _levels(bits, signed)
  return 2 * jnp.mean(jnp.abs(x.astype(jnp.float32))) / jnp.sqrt(qp)
