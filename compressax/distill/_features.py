"""Feature matching (hints) and ensemble teachers."""

from __future__ import annotations

from typing import Callable, Sequence, Union

import jax
import jax.numpy as jnp

from compressax.distill._losses import _float_logits
from compressax.distill._losses import _temperature

__all__ = ["ensemble_teacher", "hint_loss"]


def hint_loss(student_features, teacher_features,
              projection: Union[None, jax.Array, Callable] = None) -> jax.Array:
  """FitNets hint loss: mean squared error between (projected) features.

  ``mean_d (proj(s)_d - t_d)^2`` over the last (feature) axis, where
  ``proj(s) = s @ projection`` for a ``(D_s, D_t)`` matrix, ``projection(s)``
  for a callable (e.g. a Flax module's ``apply`` closed over its params) and
  ``s`` itself when ``projection`` is None. Gradients flow into a matrix
  ``projection``, so it can be learned jointly with the student.

  Args:
    student_features: ``(*batch, D_s)`` floating features.
    teacher_features: ``(*batch, D_t)`` floating features.
    projection: None, a ``(D_s, D_t)`` matrix, or a callable.

  Returns:
    float32 per-example losses of shape ``batch`` (all axes but the last; for
    conv features ``(B, H, W, C)`` that is ``(B, H, W)``: take the mean).

  Raises:
    ValueError: the projected student and the teacher shapes differ, or a
      projection matrix that does not fit ``D_s``.
    TypeError: non-floating features.

  References:
    Romero et al., *FitNets: Hints for Thin Deep Nets*, ICLR 2015,
    https://arxiv.org/abs/1412.6550.
  """
  s = _float_logits("student_features", student_features)
  t = _float_logits("teacher_features", teacher_features)
  if projection is not None:
    if callable(projection):
      s = _float_logits("projection(student_features)", projection(s))
    else:
      proj = _float_logits("projection", projection)
      if proj.ndim != 2 or proj.shape[0] != s.shape[-1]:
        raise ValueError(
            f"projection must be a ({s.shape[-1]}, D_t) matrix for student "
            f"features of shape {s.shape}, got shape {proj.shape}")
      s = s @ proj
  if s.shape != t.shape:
    raise ValueError(f"(projected) student features and teacher features "
                     f"must have the same shape, got {s.shape} and {t.shape}")
  return jnp.mean(jnp.square(s - t), axis=-1)


def cosine_loss(student_features, teacher_features, *, eps: float = 1e-8) -> jax.Array:
  """One minus the cosine similarity of the two feature vectors.

  ``1 - <s, t> / (max(|s|, eps) max(|t|, eps))`` over the last axis: 0 when
  the student's feature points the teacher's way, whatever its length; the
  embedding-level distillation term for sentence embeddings (Wang et al.
  2022 distill the final representation; the cosine is what retrieval
  compares).

  Args:
    student_features: ``(*batch, D)`` floating features.
    teacher_features: ``(*batch, D)`` floating features.
    eps: the smallest norm divided by (a zero vector gives a loss of 1).

  Returns:
    float32 per-example losses of shape ``batch``, in ``[0, 2]``.

  Raises:
    ValueError: the two shapes differ.
    TypeError: non-floating features.

  References:
    Wang et al., *Deep Compression of Pre-trained Transformer Models*,
    NeurIPS 2022. https://openreview.net/forum?id=ijVH3GyGgrp
  """
  s = _float_logits("student_features", student_features)
  t = _float_logits("teacher_features", teacher_features)
  if s.shape != t.shape:
    raise ValueError(f"student and teacher features must have the same shape, got "
                     f"{s.shape} and {t.shape}")
  # sqrt(max(|x|^2, eps^2)): max(|x|, eps) with a finite gradient at x = 0.
  ns = jnp.sqrt(jnp.maximum(jnp.sum(s * s, axis=-1), eps * eps))
  nt = jnp.sqrt(jnp.maximum(jnp.sum(t * t, axis=-1), eps * eps))
  return 1.0 - jnp.sum(s * t, axis=-1) / (ns * nt)


def ensemble_teacher(logits: Union[Sequence[jax.Array], jax.Array], *,
                     temperature=1.0) -> jax.Array:
  """Logits of the average of several teachers' tempered probabilities.

  Returns ``z = T * log(mean_e softmax(l_e / T))``, so that
  ``softmax(z / T) = mean_e softmax(l_e / T)``: pass ``z`` as the teacher to
  :func:`kd_loss` with the same ``temperature``. Computed with
  ``logsumexp`` of log-probabilities, so it is stable for large logits.

  Args:
    logits: a list of ``(*batch, C)`` teacher logits, or one array stacked on
      axis 0, ``(E, *batch, C)``.
    temperature: softmax temperature, > 0.

  Returns:
    float32 logits of shape ``(*batch, C)`` (normalised: ``z / T`` are
    log-probabilities).

  Raises:
    ValueError: no teachers, teachers of different shapes, temperature <= 0.
    TypeError: non-floating logits.

  References:
    Hinton, Vinyals, Dean 2015, https://arxiv.org/abs/1503.02531 (ensembles
    as teachers).
  """
  if isinstance(logits, (list, tuple)):
    if not logits:
      raise ValueError("ensemble_teacher needs at least one teacher")
    shapes = {tuple(jnp.shape(l)) for l in logits}
    if len(shapes) != 1:
      raise ValueError(f"all teachers' logits must have the same shape, got "
                       f"{sorted(shapes)}")
    stacked = jnp.stack([_float_logits(f"logits[{i}]", l)
                         for i, l in enumerate(logits)])
  else:
    stacked = _float_logits("logits", logits)
    if stacked.ndim < 2:
      raise ValueError("stacked teacher logits need shape (E, *batch, C), got "
                       f"{stacked.shape}")
    if stacked.shape[0] == 0:
      raise ValueError("ensemble_teacher needs at least one teacher")
  t = _temperature(temperature)
  log_p = jax.nn.log_softmax(stacked / t, axis=-1)
  n = stacked.shape[0]
  return t * (jax.nn.logsumexp(log_p, axis=0) - jnp.log(float(n)))
