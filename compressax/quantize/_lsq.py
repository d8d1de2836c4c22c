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

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from compressax import _checks
from compressax import _node

__all__ = ["LSQArray", "lsq", "lsq_init", "lsq_quantize"]


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
  """``(Q_N, Q_P)`` as float32; traced bits are rounded and clipped (NaN: 16)."""
  b = jnp.round(jnp.asarray(bits, jnp.float32))
  b = jnp.where(jnp.isnan(b), 16.0, b)
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
      (unsigned); a traced value is rounded and clipped into that range (a
      traced NaN means 16 bits).
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
    >>> w = jnp.linspace(-1.0, 1.0, 64).reshape(8, 8)
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

  When that is not a positive normal float32 (an all-zero ``x``, e.g. a
  zero-initialized kernel), the step is ``1 / Q_P`` instead: the grid spans
  ``[-1, 1]`` (``[0, 1]`` unsigned), as :func:`~compressax.quantize.uniform`
  uses a unit range for a constant group. A zero step would be rejected by
  :func:`lsq` and, traced, clamped to the smallest float32, where the
  output and the step's gradient are stuck at zero.

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
  step = 2 * jnp.mean(jnp.abs(x.astype(jnp.float32))) / jnp.sqrt(qp)
  return jnp.where(step >= jnp.finfo(jnp.float32).tiny, step, 1 / qp)


@_node.compressed_leaf(name="compressax.LSQArray", pointwise=("codes",))
@dataclasses.dataclass(frozen=True)
class LSQArray(_node.CompressedLeaf):
  """An LSQ-quantized array: integer codes and the learned step.

  ``codes`` hold ``round(clip(x/s, -Q_N, Q_P)) + Q_N`` as unsigned integers
  (``uint8`` up to 8 bits); the value is ``(codes - Q_N) * step`` computed in
  float32, which equals :func:`lsq` bit for bit.

  Attributes:
    codes: unsigned codes of the dense shape.
    step: the step size (float32, of the shape given to :func:`lsq`).
    bits: bits per code (static).
    signed: the grid (static).
    shape, dtype: the dense array's (static).
  """

  codes: jax.Array
  step: jax.Array
  bits: int = dataclasses.field(metadata=dict(static=True))
  signed: bool = dataclasses.field(metadata=dict(static=True))
  shape: tuple = dataclasses.field(metadata=dict(static=True))
  dtype: np.dtype = dataclasses.field(metadata=dict(static=True))

  def materialize(self) -> jax.Array:
    qn, _ = _levels(self.bits, self.signed)
    s = jnp.maximum(jnp.asarray(self.step, jnp.float32),
                    jnp.finfo(jnp.float32).tiny)
    r = self.codes.astype(jnp.float32) - qn
    return (r * jnp.broadcast_to(s, self.shape)).astype(self.dtype)

  def storage_bits(self) -> int:
    return int(np.size(self.codes)) * int(self.bits) + 32 * int(
        np.size(self.step))


def lsq_quantize(x, step, bits: int, *, signed: bool = True,
                 path: Any = "x") -> LSQArray:
  """``x`` on LSQ's grid with step ``step``, as a storable :class:`LSQArray`.

  ``node.materialize()`` equals ``lsq(x, step, bits, signed=signed)`` bit for
  bit. ``bits`` must be a Python int (it decides the codes' dtype).

  Raises:
    TypeError, ValueError: as :func:`lsq`.

  References:
    Esser et al. *Learned Step Size Quantization*. ICLR 2020.
    https://arxiv.org/abs/1902.08153
  """
  if not _checks.is_concrete(bits):
    _checks.fail(path, "lsq_quantize needs a concrete (Python int) `bits`",
                 TypeError)
  q = lsq(x, step, bits, signed=signed, path=path)  # validates everything
  del q
  x = jnp.asarray(x)
  qn, qp = _levels(bits, signed)
  s = jnp.maximum(jnp.asarray(step, jnp.float32), jnp.finfo(jnp.float32).tiny)
  r = jnp.round(jnp.clip(x.astype(jnp.float32) / jnp.broadcast_to(s, x.shape),
                         -qn, qp))
  dtype = jnp.uint8 if int(bits) <= 8 else jnp.uint16
  return LSQArray((r + qn).astype(dtype), jnp.asarray(step, jnp.float32),
                  int(bits), bool(signed), tuple(x.shape), np.dtype(x.dtype))
