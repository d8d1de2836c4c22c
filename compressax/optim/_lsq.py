"""Learned step size quantization (LSQ): the step sizes are params.

Superseded by ``cx.methods.LSQ`` in a ``cx.Plan`` (docs/design.md): the
parameter maps below emit a ``DeprecationWarning`` and are removed in the
next release.

Keep a tree of step sizes next to the weights, quantize inside the loss with
:func:`lsq_params`, and train both with any Optax optimizer. The step-size
gradient carries the paper's scale ``1 / sqrt(N Q_P)`` (``cx.quantize.lsq``),
so one learning rate suits weights and steps::

  steps = cx.optim.lsq_init_steps(params, bits=4)
  train = {"params": params, "steps": steps}

  def loss(train, x, y):
    q = cx.optim.lsq_params(train["params"], train["steps"], bits=4)
    return cross_entropy(apply_fn(q, x), y)

References:
  Esser, McKinstry, Bablani, Appuswamy, Modha, *Learned Step Size
  Quantization*, ICLR 2020. https://arxiv.org/abs/1902.08153
"""

from __future__ import annotations

import jax

from compressax import _deprecation
from compressax import _select
from compressax import quantize as _quantize

__all__ = ["lsq_init_steps", "lsq_params"]


@_deprecation.deprecated("cx.optim.lsq_init_steps", "cx.methods.LSQ in a cx.Plan (Plan.init)")
def lsq_init_steps(params, bits, *, signed: bool = True,
                   where: _select.Where = None):
  """Initial steps ``2 mean|w| / sqrt(Q_P)`` per selected leaf, ``None`` elsewhere.

  Args:
    params: the model params.
    bits: bits per weight.
    signed: signed grid (weights).
    where: which leaves to quantize.

  Returns:
    A tree with the params' structure: float32 scalars at selected leaves.

  Raises:
    ValueError: as ``cx.quantize.lsq_init`` (naming the leaf).
  """
  sel = _select.select(params, where)
  return jax.tree_util.tree_map_with_path(
      lambda kp, x, s: _quantize.lsq_init(x, bits, signed=signed, path=kp)
      if s else None, params, sel)


@_deprecation.deprecated("cx.optim.lsq_params", "cx.methods.LSQ in a cx.Plan (Plan.view)")
def lsq_params(params, steps, bits, *, signed: bool = True,
               where: _select.Where = None):
  """The params fake-quantized with their learned steps (LSQ gradients).

  Args:
    params: the model params.
    steps: a tree from :func:`lsq_init_steps` (trained).
    bits: bits per weight (may be traced).
    signed: signed grid.
    where: the selection used for :func:`lsq_init_steps`.

  Returns:
    A params tree whose selected leaves are ``cx.quantize.lsq(w, s, bits)``.
  """
  sel = _select.select(params, where)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  treedef = jax.tree_util.tree_structure(params)
  flags = treedef.flatten_up_to(sel)
  st = treedef.flatten_up_to(steps)
  out = [_quantize.lsq(x, s, bits, signed=signed, path=kp) if f else x
         for (kp, x), s, f in zip(leaves, st, flags)]
  return treedef.unflatten(out)
