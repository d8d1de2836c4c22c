"""PQK: a teacher made of the pruned network's own unimportant weights.

After iterative pruning with quantization-aware training (phase 1), PQK
(phase 2) puts the pruned, "unimportant" weights back into the network to
form a teacher, and distills the pruned, quantized network (the student)
from it. Teacher and student share the important weights, so no separately
pre-trained teacher is needed, and both are trained together.

References:
  Kim, Chang, Kwak, *PQK: Model Compression via Pruning, Quantization, and
  Knowledge Distillation*, Interspeech 2021. https://arxiv.org/abs/2106.14681
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from compressax import _checks
from compressax._node import is_compressed
from compressax.distill import _losses
from compressax.prune import _mask

__all__ = ["pqk_loss", "pqk_teacher"]


def pqk_teacher(student, dense, mask) -> Any:
  """The PQK teacher: ``where(mask, student, dense)`` leaf by leaf.

  At kept positions the teacher uses the student's weights (as the student's
  forward pass sees them, e.g. quantized), at pruned positions the
  unimportant weights of ``dense``. Gradients of a loss on the teacher reach
  the student's kept weights and ``dense``'s pruned ones, and nothing else.

  Args:
    student: the student's (pruned, possibly quantized) parameter pytree of
      plain arrays (e.g. ``plan.view(train)``).
    dense: a pytree of the same structure and shapes holding the unimportant
      weights at the pruned positions (e.g. the weights just before they were
      pruned); its values at kept positions are ignored.
    mask: a ``bool`` pytree of the same structure, ``True`` where the
      student keeps a weight; a 0-d ``True`` leaf (an unpruned leaf, e.g. a
      bias) makes the teacher's leaf the student's.

  Returns:
    The teacher's parameter pytree.

  Raises:
    ValueError: the trees differ (the first differing leaf is named), a
      mask does not fit its leaf, or ``dense`` has a different shape or dtype
      at a leaf (named).
    TypeError: a non-bool mask leaf, or a compressed node in ``student`` or
      ``dense`` (materialize them first).

  Example:
    >>> s = {"w": jnp.array([1.0, 0.0, 2.0])}
    >>> d = {"w": jnp.array([9.0, 0.5, 9.0])}
    >>> m = {"w": jnp.array([True, False, True])}
    >>> pqk_teacher(s, d, m)["w"].tolist()
    [1.0, 0.5, 2.0]
  """
  pairs, m_leaves, treedef = _mask._check_mask_tree(student, mask)
  _, d_leaves, _ = _mask._check_mask_tree(student, dense)
  out = []
  for (p, s), d, m in zip(pairs, d_leaves, m_leaves):
    for name, x in (("student", s), ("dense", d)):
      if is_compressed(x):
        _checks.fail(p, f"pqk_teacher: the {name} leaf is a compressed node "
                        f"({type(x).__name__}); pass plain arrays "
                        f"(cx.materialize)", TypeError)
    m = _mask._leaf_mask(p, s, m)
    if jnp.shape(d) != jnp.shape(s) or jnp.result_type(d) != jnp.result_type(s):
      _checks.fail(p, f"pqk_teacher: dense leaf {jnp.result_type(d)}"
                      f"{list(jnp.shape(d))} does not match the student's "
                      f"{jnp.result_type(s)}{list(jnp.shape(s))}")
    out.append(s if _mask._is_keep_all(m) else jnp.where(m, s, d))
  return jax.tree_util.tree_unflatten(treedef, out)


def pqk_loss(student_logits, teacher_logits, labels, *, alpha=0.5,
             temperature: float | jax.Array = 4.0) -> jax.Array:
  """PQK's joint objective for the teacher and the student, per example.

  ``CE(teacher, labels) + alpha * T^2 KL(softmax(t/T) || softmax(s/T)) +
  (1 - alpha) * CE(student, labels)``, with the teacher's logits held
  constant in the KL term: the teacher learns the task only from the labels
  (updating the shared important weights and its own unimportant ones), and
  the student learns from the labels and from the teacher
  (:func:`polino_loss` of ``stop_gradient(teacher_logits)``).

  Args:
    student_logits: ``(*batch, C)`` logits of the pruned, quantized network.
    teacher_logits: same shape, the network with the unimportant weights put
      back (:func:`pqk_teacher`).
    labels: integer ``(*batch,)`` class ids.
    alpha: weight of the distillation term of the student, in ``[0, 1]``.
    temperature: distillation temperature, > 0.

  Returns:
    float32 per-example losses of shape ``batch``.

  Raises:
    ValueError, TypeError: as :func:`polino_loss`.

  References:
    Kim, Chang, Kwak, *PQK: Model Compression via Pruning, Quantization, and
    Knowledge Distillation*, Interspeech 2021.
    https://arxiv.org/abs/2106.14681
  """
  student = _losses.polino_loss(student_logits,
                                jax.lax.stop_gradient(teacher_logits), labels,
                                alpha=alpha, temperature=temperature)
  return _losses.cross_entropy(teacher_logits, labels) + student
