"""Gradual pruning schedule of Zhu & Gupta (polynomial sparsity ramp)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from compressax.prune import _rank

__all__ = ["polynomial_schedule"]


def polynomial_schedule(step, *, initial_sparsity: float = 0.0,
                        final_sparsity: float, begin_step: int, end_step: int,
                        frequency: int = 1, power: float = 3) -> jax.Array:
  """Sparsity at ``step`` on the polynomial ramp of gradual magnitude pruning.

  ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** power`` for
  ``t0 <= t <= t0 + n * dt``, where ``t0 = begin_step``,
  ``n * dt = end_step - begin_step`` and ``t`` is rounded down to a multiple of
  ``frequency`` after ``t0`` (the mask is only updated every ``dt`` steps).
  Before ``begin_step`` it is ``s_i``; from ``end_step`` on it is ``s_f``.
  A pure function of a (possibly traced) step, so it runs inside a jitted
  training step.

  Args:
    step: the training step (int or traced integer/float scalar).
    initial_sparsity: ``s_i`` in ``[0, 1)``.
    final_sparsity: ``s_f`` in ``[0, 1)``.
    begin_step: ``t0``.
    end_step: ``t0 + n * dt``, ``>= begin_step``. Equal values give a step
      from ``s_i`` to ``s_f`` at ``begin_step``.
    frequency: ``dt``, the number of steps between mask updates, ``>= 1``.
    power: the exponent (3 in the paper), ``> 0``.

  Returns:
    A float32 scalar sparsity.

  Raises:
    ValueError: ``end_step < begin_step``, a sparsity outside ``[0, 1)``,
      ``frequency < 1`` or ``power <= 0``.

  References:
    Zhu, Gupta, *To prune, or not to prune: exploring the efficacy of pruning
    for model compression*, 2017, arXiv:1710.01878 (equation 1).
  """
  _rank.check_scalar("initial_sparsity", initial_sparsity)
  _rank.check_scalar("final_sparsity", final_sparsity)
  if end_step < begin_step:
    raise ValueError(f"end_step ({end_step}) must be >= begin_step ({begin_step})")
  if frequency < 1:
    raise ValueError(f"frequency must be >= 1, got {frequency}")
  if power <= 0:
    raise ValueError(f"power must be > 0, got {power}")
  t = jnp.asarray(step).astype(jnp.float32)
  span = max(end_step - begin_step, 1)
  elapsed = jnp.floor((t - begin_step) / frequency) * frequency
  frac = jnp.clip(elapsed / span, 0.0, 1.0)
  if end_step == begin_step:
    frac = jnp.where(t >= begin_step, 1.0, 0.0)
  s_i = jnp.float32(initial_sparsity)
  s_f = jnp.float32(final_sparsity)
  return s_f + (s_i - s_f) * (1.0 - frac) ** power
