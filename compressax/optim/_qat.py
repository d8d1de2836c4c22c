"""Quantization-aware training with full-precision shadow weights.

Superseded by ``cx.methods.Uniform`` in a ``cx.Plan`` (docs/design.md): the
parameter maps below emit a ``DeprecationWarning`` and are removed in the
next release.

The pattern of Polino et al.'s quantized distillation (and of plain QAT):

1. The optimizer keeps the float32 *shadow* weights ``w`` as the params.
2. The loss runs the model on ``q(w)``: :func:`quantized_params` inside the
   loss, with ``cx.quantize.uniform_ste`` so the gradient passes straight
   through the quantizer to ``w``.
3. Any Optax optimizer updates ``w`` (Polino: SGD, Nesterov momentum 0.9).
4. After training, :func:`finalize` quantizes once more into
   ``cx.quantize.QuantizedArray`` nodes (integer codes plus bucket scales).

A quantized-distillation step is then a few lines::

  tx = optax.sgd(0.01, momentum=0.9, nesterov=True)

  @jax.jit
  def step(params, opt_state, x, y, teacher_logits):
    loss, grads = jax.value_and_grad(cx.optim.quantized_distillation_loss)(
        params, apply_fn, x, y, teacher_logits, bits=4, bucket_size=256)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

References:
  Polino, Pascanu, Alistarh, *Model compression via distillation and
  quantization*, ICLR 2018. https://arxiv.org/abs/1802.05668
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import jax.numpy as jnp

from compressax import _deprecation
from compressax import _select
from compressax import distill as _distill
from compressax import quantize as _quantize

__all__ = ["finalize", "quantized_distillation_loss", "quantized_params"]


@_deprecation.deprecated("cx.optim.quantized_params", "cx.methods.Uniform in a cx.Plan (Plan.view)")
def quantized_params(params, bits, *, bucket_size: int | None = None,
                     symmetric: bool = False, where: _select.Where = None):
  """The params as the forward pass sees them: fake-quantized, STE gradient.

  Args:
    params: the full-precision shadow params.
    bits: bits per weight (may be traced; see ``cx.quantize.uniform``).
    bucket_size: Polino's bucket size (256 in the paper), or ``None`` for one
      range per tensor.
    symmetric: symmetric grid instead of min/max.
    where: which leaves to quantize (default: weight matrices, kernels).

  Returns:
    A tree like ``params``; selected leaves are ``uniform_ste(w, bits, ...)``,
    the others are the very same objects.

  Raises:
    ValueError, TypeError: as ``cx.quantize.uniform_ste`` (naming the leaf).
  """
  return _select.map_selected(
      lambda kp, x: _quantize.uniform_ste(
          x, bits, bucket_size=bucket_size, symmetric=symmetric, path=kp),
      params, where=where)


@_deprecation.deprecated("cx.optim.finalize", "cx.methods.Uniform in a cx.Plan (Plan.finalize)")
def finalize(params, bits: int, *, bucket_size: int | None = None,
             symmetric: bool = False, where: _select.Where = None):
  """Quantize the trained shadow weights into ``QuantizedArray`` nodes.

  ``node.materialize()`` equals what :func:`quantized_params` fed the model,
  bit for bit.

  Args:
    params: the trained shadow params.
    bits: a Python int.
    bucket_size: as in :func:`quantized_params`.
    symmetric: as in :func:`quantized_params`.
    where: as in :func:`quantized_params`.

  Returns:
    The params with selected leaves replaced by ``cx.quantize.QuantizedArray``.
  """
  return _select.map_selected(
      lambda kp, x: _quantize.quantize(
          x, bits, bucket_size=bucket_size, symmetric=symmetric, path=kp),
      params, where=where)


def quantized_distillation_loss(params, apply_fn: Callable[..., Any], inputs,
                                labels, teacher_logits, *, bits,
                                bucket_size: int | None = 256,
                                alpha: float = 0.7, temperature: float = 2.0,
                                where: _select.Where = None) -> Any:
  """Polino's quantized-distillation loss of the quantized student (a scalar).

  ``mean(alpha * T^2 KL(teacher/T || student/T) + (1 - alpha) CE)`` with the
  student run on :func:`quantized_params` (``cx.distill.polino_loss``).
  Differentiate it with respect to ``params`` (the shadow weights).

  Args:
    params: the student's full-precision shadow params.
    apply_fn: ``apply_fn(params, inputs) -> logits``.
    inputs: a batch of inputs.
    labels: integer class ids ``(batch,)``.
    teacher_logits: ``(batch, classes)``, from the (full-precision) teacher.
    bits: bits per weight.
    bucket_size: bucket size of the quantizer (Polino: 256).
    alpha: weight of the distillation term (Polino: 0.7).
    temperature: distillation temperature (Polino: 2).
    where: which leaves to quantize.

  Returns:
    The mean loss, a float32 scalar.

  References:
    Polino et al., ICLR 2018. https://arxiv.org/abs/1802.05668
  """
  # The undecorated function: no deprecation warning for this (current) use.
  q = inspect.unwrap(quantized_params)(params, bits, bucket_size=bucket_size, where=where)
  logits = apply_fn(q, inputs)
  per_example = _distill.polino_loss(logits, teacher_logits, labels,
                                     alpha=alpha, temperature=temperature)
  return jnp.mean(per_example)
