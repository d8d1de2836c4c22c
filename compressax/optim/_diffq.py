"""DiffQ training: bit logits as params, a size penalty, their own Adam.

Superseded by ``cx.methods.DiffQ`` in a ``cx.Plan`` (docs/design.md): the
parameter maps below emit a ``DeprecationWarning`` and are removed in the
next release.

The trained tree is ``{"params": params, "bit_logits": logits}``. The loss
sees the params with DiffQ's pseudo-quantization noise (``cx.diffq.noisy``)
and adds ``penalty * cx.diffq.model_size`` (MB); ``optax.partition`` gives the
logits their own Adam (the paper: lr about 1e-3, no weight decay) while the
model keeps its optimizer. After training, :func:`diffq_finalize` truly
quantizes (``cx.diffq.quantize``)::

  train = cx.optim.diffq_init(params, group_size=16)
  tx = cx.optim.diffq_optimizer(optax.adam(1e-3))
  loss_fn = cx.optim.diffq_loss(task_loss, penalty=1e-2)

  @jax.jit
  def step(train, opt_state, key, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(train, key, x, y)
    updates, opt_state = tx.update(grads, opt_state, train)
    return optax.apply_updates(train, updates), opt_state, loss

References:
  Défossez, Adi, Synnaeve, *Differentiable Model Compression via
  Pseudo Quantization Noise*, 2021. https://arxiv.org/abs/2104.09987
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax

from compressax import _deprecation
from compressax import diffq as _diffq
from compressax import _select
from compressax.optim import _base

__all__ = ["diffq_finalize", "diffq_init", "diffq_loss", "diffq_optimizer"]


@_deprecation.deprecated("cx.optim.diffq_init", "cx.methods.DiffQ in a cx.Plan (Plan.init)")
def diffq_init(params, *, group_size: int = 16, init_bits: float = 8.0,
               b_min: float = 2, b_max: float = 15, min_size: float = 0.01,
               where: _select.Where = None) -> dict:
  """The trained tree ``{"params": params, "bit_logits": logits}``.

  Args: as ``cx.diffq.init_logits``.

  Returns:
    A dict with the params (same objects) and their bit logits.
  """
  logits = _diffq.init_logits(params, group_size=group_size,
                              init_bits=init_bits, b_min=b_min, b_max=b_max,
                              min_size=min_size, where=where)
  return {"params": params, "bit_logits": logits}


@_deprecation.deprecated("cx.optim.diffq_optimizer", "cx.methods.DiffQ in a cx.Plan (Plan.optimizer)")
def diffq_optimizer(model_tx: optax.GradientTransformation, *,
                    logit_learning_rate: float = 1e-3
                    ) -> optax.GradientTransformation:
  """``optax.partition``: ``model_tx`` on the params, Adam on the bit logits.

  Args:
    model_tx: the model's optimizer.
    logit_learning_rate: Adam learning rate of the logits (paper: 1e-3).

  Returns:
    An Optax transform over ``{"params": ..., "bit_logits": ...}``.

  Raises:
    TypeError: if ``model_tx`` is not an Optax transform.
  """
  model_tx = _base.check_inner(model_tx, "diffq_optimizer")

  def labels(tree):
    return {"params": jax.tree_util.tree_map(lambda _: "model", tree["params"]),
            "bit_logits": jax.tree_util.tree_map(lambda _: "logits",
                                                 tree["bit_logits"])}

  return optax.partition({"model": model_tx,
                          "logits": optax.adam(logit_learning_rate)}, labels)


@_deprecation.deprecated("cx.optim.diffq_loss", "cx.methods.DiffQ in a cx.Plan (Plan.loss)")
def diffq_loss(task_loss: Callable[..., Any], *, penalty: float,
               group_size: int = 16, b_min: float = 2, b_max: float = 15,
               noise: str = "uniform") -> Callable[..., Any]:
  """The penalized DiffQ objective ``task(noisy params) + penalty * MB``.

  Args:
    task_loss: ``task_loss(params, *args) -> scalar``.
    penalty: ``lambda`` of the size penalty, per MB (paper: 1e-3 to 10).
    group_size, b_min, b_max: as given to :func:`diffq_init`.
    noise: ``"uniform"`` (paper) or ``"gaussian"`` (reference code).

  Returns:
    ``loss(train, key, *args) -> scalar`` over the :func:`diffq_init` tree.

  Raises:
    ValueError: if ``penalty`` is negative.
  """
  if penalty < 0:
    raise ValueError(f"diffq_loss: penalty must be >= 0, got {penalty}")
  kw: dict[str, Any] = dict(group_size=group_size, b_min=b_min, b_max=b_max)

  def loss(train, key, *args):
    p, logits = train["params"], train["bit_logits"]
    noisy = _diffq.noisy(p, logits, key, noise=noise, **kw)
    return task_loss(noisy, *args) + penalty * _diffq.model_size(p, logits,
                                                                 **kw)

  return loss


@_deprecation.deprecated("cx.optim.diffq_finalize", "cx.methods.DiffQ in a cx.Plan (Plan.finalize)")
def diffq_finalize(train, *, group_size: int = 16, b_min: float = 2,
                   b_max: float = 15):
  """Quantize the trained params with their learned bits (``DiffQArray``)."""
  return _diffq.quantize(train["params"], train["bit_logits"],
                         group_size=group_size, b_min=b_min, b_max=b_max)
