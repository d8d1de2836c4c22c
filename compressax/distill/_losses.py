"""Distillation losses on logits, in the style of ``optax.losses``.

Conventions shared by every loss here:

* Logits have shape ``(*batch, num_classes)``; the loss is returned **per
  example**, shape ``batch``, with no reduction (take ``.mean()`` yourself).
* Inputs of any floating dtype (bfloat16 included) are cast to float32 and
  the result is float32; probabilities come from ``log_softmax``, so logits of
  magnitude 1e4 give finite losses and gradients.
* ``temperature`` must be > 0: a concrete value <= 0 raises ``ValueError``; a
  traced value is clamped to at least ``1e-6`` (it cannot be checked).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from compressax import _checks

__all__ = ["alpha_divergence", "cross_entropy", "kd_loss", "kl_divergence",
           "polino_loss"]

_MIN_T = 1e-6


def _float_logits(name: str, x) -> jax.Array:
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    _checks.fail(name, f"expected a floating-point array, got dtype {x.dtype}",
                 TypeError)
  if x.ndim < 1:
    _checks.fail(name, "needs a class/feature axis (ndim >= 1), got a scalar")
  return x.astype(jnp.float32)


def _pair(a_name: str, a, b_name: str, b):
  a, b = _float_logits(a_name, a), _float_logits(b_name, b)
  if a.shape != b.shape:
    raise ValueError(f"{a_name} and {b_name} must have the same shape, got "
                     f"{a.shape} and {b.shape}")
  return a, b


def _temperature(temperature) -> jax.Array:
  _checks.check_range("temperature", "temperature", temperature, 0.0, np.inf,
                      lo_open=True)
  return jnp.maximum(jnp.asarray(temperature, jnp.float32), _MIN_T)


def _log_probs(logits: jax.Array, t: jax.Array) -> jax.Array:
  return jax.nn.log_softmax(logits / t, axis=-1)


def _kl(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
  """``sum p (log p - log q)`` over the last axis; ``0 log 0 = 0``."""
  p = jnp.exp(log_p)
  # Where p == 0 (e.g. a -inf logit) the term is 0; the double where keeps
  # the gradient free of 0 * inf.
  safe = p > 0
  diff = jnp.where(safe, log_p - jnp.where(safe, log_q, 0.0), 0.0)
  return jnp.sum(p * diff, axis=-1)


def kl_divergence(p_logits, q_logits, *, direction: str = "forward",
                  temperature: float | jax.Array = 1.0) -> jax.Array:
  """KL divergence between the tempered softmax distributions of two logits.

  With ``p = softmax(p_logits / T)`` and ``q = softmax(q_logits / T)``:

  * ``"forward"``: ``KL(p || q) = sum p (log p - log q)``,
  * ``"reverse"``: ``KL(q || p)``,
  * ``"symmetric"``: ``(KL(p || q) + KL(q || p)) / 2`` (the mean, so it is on
    the scale of one KL; twice it is Jeffreys' divergence).

  No ``T^2`` factor is applied (see :func:`kd_loss` for that).

  Args:
    p_logits: ``(*batch, C)`` floating logits.
    q_logits: same shape.
    direction: ``"forward"``, ``"reverse"`` or ``"symmetric"``.
    temperature: softmax temperature, > 0.

  Returns:
    float32 per-example divergences of shape ``batch``.

  Raises:
    ValueError: shapes differ, unknown direction, temperature <= 0.
    TypeError: non-floating logits.
  """
  p_logits, q_logits = _pair("p_logits", p_logits, "q_logits", q_logits)
  if direction not in ("forward", "reverse", "symmetric"):
    raise ValueError("direction must be 'forward', 'reverse' or 'symmetric', "
                     f"got {direction!r}")
  t = _temperature(temperature)
  lp, lq = _log_probs(p_logits, t), _log_probs(q_logits, t)
  if direction == "forward":
    return _kl(lp, lq)
  if direction == "reverse":
    return _kl(lq, lp)
  return 0.5 * (_kl(lp, lq) + _kl(lq, lp))


def kd_loss(student_logits, teacher_logits, temperature: float | jax.Array = 1.0) -> jax.Array:
  """Hinton distillation loss ``T^2 KL(softmax(t/T) || softmax(s/T))``.

  The ``T^2`` factor keeps the gradient magnitude independent of ``T``.

  Args:
    student_logits: ``(*batch, C)`` floating logits.
    teacher_logits: same shape (treated as constants only if you
      ``jax.lax.stop_gradient`` them).
    temperature: softmax temperature ``T`` > 0.

  Returns:
    float32 per-example losses of shape ``batch``; 0 when the logits agree.

  Raises:
    ValueError: shapes differ or temperature <= 0.
    TypeError: non-floating logits.

  Example:
    >>> s = jnp.array([[1.0, 2.0, 3.0]])
    >>> float(kd_loss(s, s, temperature=2.0)[0])
    0.0

  References:
    Hinton, Vinyals, Dean, *Distilling the Knowledge in a Neural Network*,
    2015, https://arxiv.org/abs/1503.02531.
  """
  t = _temperature(temperature)
  kl = kl_divergence(teacher_logits, student_logits, temperature=t)
  return jnp.square(t) * kl


def cross_entropy(logits, labels) -> jax.Array:
  """Softmax cross-entropy with integer class ids, per example (float32).

  Args:
    logits: ``(*batch, C)`` floating logits.
    labels: integer ``(*batch,)`` class ids in ``[0, C)``.

  Returns:
    ``-log softmax(logits)[labels]``, shape ``batch``.

  Raises:
    TypeError: non-integer labels or non-floating logits.
    ValueError: label shape is not ``logits.shape[:-1]``, or a concrete label
      is outside ``[0, C)``.
  """
  logits = _float_logits("logits", logits)
  labels = jnp.asarray(labels)
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    _checks.fail("labels", f"expected integer class ids, got dtype "
                           f"{labels.dtype}", TypeError)
  if labels.shape != logits.shape[:-1]:
    raise ValueError(f"labels must have shape logits.shape[:-1] = "
                     f"{logits.shape[:-1]}, got {labels.shape}")
  c = logits.shape[-1]
  if _checks.is_concrete(labels) and labels.size:
    lab = np.asarray(labels)
    if lab.min() < 0 or lab.max() >= c:
      _checks.fail("labels", f"class ids must be in [0, {c}), got values in "
                             f"[{lab.min()}, {lab.max()}]")
  log_p = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(log_p, labels[..., None].astype(jnp.int32),
                               axis=-1)
  return -picked[..., 0]


def polino_loss(student_logits, teacher_logits, labels, *, alpha=0.7,
                temperature: float | jax.Array = 2.0) -> jax.Array:
  """Quantized-distillation loss ``alpha * kd + (1 - alpha) * CE``.

  ``alpha * T^2 KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) *
  CE(softmax(s), labels)``, the objective of Polino et al. with their
  defaults ``alpha = 0.7``, ``T = 2``; the cross-entropy uses the student's
  untempered logits.

  Args:
    student_logits: ``(*batch, C)`` floating logits.
    teacher_logits: same shape.
    labels: integer ``(*batch,)`` class ids.
    alpha: weight of the distillation term, in ``[0, 1]``.
    temperature: distillation temperature, > 0.

  Returns:
    float32 per-example losses of shape ``batch``.

  Raises:
    ValueError: shapes differ, alpha outside ``[0, 1]``, temperature <= 0,
      labels out of range.
    TypeError: non-floating logits or non-integer labels.

  References:
    Polino, Pascanu, Alistarh, *Model compression via distillation and
    quantization*, ICLR 2018, https://arxiv.org/abs/1802.05668.
  """
  _checks.check_range("alpha", "alpha", alpha, 0.0, 1.0)
  kd = kd_loss(student_logits, teacher_logits, temperature)
  ce = cross_entropy(student_logits, labels)
  a = jnp.asarray(alpha, jnp.float32)
  return a * kd + (1.0 - a) * ce


def _alpha_small(lp, lq, a):
  """``D_a`` for ``a`` near 0 written as ``-sum q expm1(a d) / (a (1 - a))``.

  ``d = log p - log q``. Using ``expm1`` per class avoids the cancellation in
  ``1 - sum p^a q^(1-a)`` as ``a -> 0``, where ``expm1(a d) / a -> d`` gives
  ``KL(q || p)``.
  """
  d = lp - lq
  ad = a * d
  # q * expm1(a d): for large a d, exp(log q + a d) - q does not overflow.
  big = ad > 1.0
  term = jnp.where(big, jnp.exp(lq + jnp.where(big, ad, 0.0)) - jnp.exp(lq),
                   jnp.exp(lq) * jnp.expm1(jnp.where(big, 0.0, ad)))
  nonzero = a != 0
  safe_a = jnp.where(nonzero, a, 1.0)
  ratio = jnp.where(nonzero, term / safe_a, jnp.exp(lq) * d)
  return -jnp.sum(ratio, axis=-1) / (1.0 - a)


def alpha_divergence(student_logits, teacher_logits, alpha,
                     temperature: float | jax.Array = 1.0) -> jax.Array:
  """Amari alpha-divergence ``D_alpha(teacher || student)`` of the softmaxes.

  With ``p = softmax(teacher / T)`` and ``q = softmax(student / T)``:

      D_alpha(p || q) = (1 - sum_c p_c^alpha q_c^(1 - alpha))
                        / (alpha (1 - alpha)),

  whose limits are ``D_1 = KL(p || q)`` (the usual KD direction) and
  ``D_0 = KL(q || p)``; both are returned exactly at ``alpha`` in ``{0, 1}``
  and the formula is evaluated without cancellation near them (through
  ``expm1``, using ``D_alpha(p||q) = D_(1-alpha)(q||p)`` for ``alpha >= 1/2``).
  ``alpha`` may be any real and may be traced (e.g. AlphaNet draws it from
  ``[-1, 1]`` and keeps the larger of two divergences); outside ``[0, 1]``
  the divergence can be large or ``inf`` where a probability underflows. No
  ``T^2`` factor is applied.

  Args:
    student_logits: ``(*batch, C)`` floating logits.
    teacher_logits: same shape.
    alpha: the divergence order (a scalar).
    temperature: softmax temperature, > 0.

  Returns:
    float32 per-example divergences of shape ``batch``.

  Raises:
    ValueError: shapes differ, temperature <= 0, non-scalar or NaN alpha.
    TypeError: non-floating logits.

  References:
    Amari, *Differential-Geometrical Methods in Statistics*, 1985.
    Wang et al., *AlphaNet: Improved Training of Supernets with
    Alpha-Divergence*, ICML 2021, https://arxiv.org/abs/2102.07954.
  """
  s, t_logits = _pair("student_logits", student_logits, "teacher_logits",
                      teacher_logits)
  alpha = jnp.asarray(alpha)
  if alpha.ndim != 0:
    raise ValueError(f"alpha must be a scalar, got shape {alpha.shape}")
  if _checks.is_concrete(alpha) and np.isnan(float(alpha)):
    raise ValueError("alpha must not be NaN")
  alpha = alpha.astype(jnp.float32)
  t = _temperature(temperature)
  lp, lq = _log_probs(t_logits, t), _log_probs(s, t)
  low = alpha < 0.5
  # Each branch only sees alphas from its own side; the other gets a harmless
  # placeholder so that neither value nor gradient of the unused branch is NaN.
  d_low = _alpha_small(lp, lq, jnp.where(low, alpha, 0.0))
  d_high = _alpha_small(lq, lp, jnp.where(low, 0.0, 1.0 - alpha))
  return jnp.where(low, d_low, d_high)
