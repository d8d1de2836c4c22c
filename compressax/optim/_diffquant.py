"""Differentiable quantization: the quantization points are trained.

Superseded by ``cx.methods.Points`` in a ``cx.Plan`` (docs/design.md): the
parameter maps below emit a ``DeprecationWarning`` and are removed in the
next release.

Polino et al.'s second method. Each selected tensor has its own sorted
points in the bucket-scaled ``[0, 1]`` domain; every weight takes its nearest
point (``cx.quantize.nearest_point``), and the gradient of a point is the sum
over its weights of ``alpha(bucket) * dL/dw_hat``. The points are an extra
params tree, trained by :func:`diff_quant_points` (which re-sorts and clips
them after every step); the weights usually stay fixed and the loss is
distillation from the model's own full-precision copy::

  points = cx.optim.init_points(params, 2 ** 4, method="quantiles")
  tx = cx.optim.diff_quant_points(optax.sgd(1e-5, momentum=0.9, nesterov=True))
  opt_state = tx.init(points)

  def loss(points):
    q = cx.optim.points_quantized(params, points)
    return jnp.mean(cx.distill.kd_loss(apply_fn(q, x), apply_fn(params, x)))

  grads = jax.grad(loss)(points)
  updates, opt_state = tx.update(grads, opt_state, points)
  points = optax.apply_updates(points, updates)

Budget split: ``cx.quantize.allocate_points(gradient_norms(grads), total)``
gives a point count per path, which :func:`init_points` accepts.

References:
  Polino, Pascanu, Alistarh, *Model compression via distillation and
  quantization*, ICLR 2018, section 3. https://arxiv.org/abs/1802.05668
"""

from __future__ import annotations

from typing import Mapping, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from compressax import _deprecation
from compressax import _rules
from compressax import _select
from compressax import quantize as _quantize
from compressax.optim import _base

__all__ = ["diff_quant_points", "gradient_norms", "init_points",
           "points_quantized"]


def _count(n_points, keypath, leaf=None) -> int:
  n = _rules.lookup(n_points, keypath, leaf, name="point count")
  return int(n) if isinstance(n, (int, np.integer)) else n


@_deprecation.deprecated("cx.optim.init_points", "cx.methods.Points in a cx.Plan (Plan.init)")
def init_points(params, n_points: Union[int, Mapping[str, int]], *,
                method: str = "uniform", bucket_size: int | None = None,
                where: _select.Where = None):
  """A points tree: sorted float32 points per selected leaf, ``None`` elsewhere.

  Args:
    params: the model params.
    n_points: points per tensor (``2 ** bits``), or a mapping from leaf path
      (``cx.path_str``) to count, e.g. from ``cx.quantize.allocate_points``.
    method: ``"uniform"`` or ``"quantiles"`` (``cx.quantize.points_init``).
    bucket_size: as in ``cx.quantize.nearest_point``.
    where: which leaves to quantize.

  Returns:
    A tree with the params' structure: ``(n,)`` float32 points at selected
    leaves and ``None`` at the others.
  """
  sel = _select.select(params, where)
  _rules.check_used(params, n_points, where=where, name="n_points")
  return jax.tree_util.tree_map_with_path(
      lambda kp, x, s: _quantize.points_init(
          x, _count(n_points, kp, x), method=method, bucket_size=bucket_size,
          path=kp)
      if s else None, params, sel)


@_deprecation.deprecated("cx.optim.points_quantized", "cx.methods.Points in a cx.Plan (Plan.view)")
def points_quantized(params, points, *, bucket_size: int | None = None,
                     straight_through: bool = False,
                     where: _select.Where = None):
  """The params with selected leaves quantized onto their points.

  Differentiable with respect to ``points`` (and, with
  ``straight_through=True``, the weights).

  Args:
    params: the model params.
    points: a tree from :func:`init_points`.
    bucket_size: as in :func:`init_points`.
    straight_through: pass ``dL/dw_hat`` to the weights too.
    where: the selection used for :func:`init_points`.

  Returns:
    A params tree with quantized selected leaves.
  """
  sel = _select.select(params, where)
  leaves, treedef = jax.tree_util.tree_flatten(params)
  flags = treedef.flatten_up_to(sel)
  pts = treedef.flatten_up_to(points)
  out = [_quantize.nearest_point(x, p, bucket_size=bucket_size,
                                 straight_through=straight_through) if s else x
         for x, p, s in zip(leaves, pts, flags)]
  return treedef.unflatten(out)


def gradient_norms(grads, *, where: _select.Where = None) -> dict:
  """``{path: ||g||_2}`` (Python floats) over the selected leaves.

  Average several minibatches' results before ``cx.quantize.allocate_points``.
  """
  return {_select.path_str(kp): float(np.linalg.norm(np.asarray(g, np.float64)))
          for kp, g in _select.selected_leaves(grads, where)}


def diff_quant_points(inner: optax.GradientTransformation
                      ) -> optax.GradientTransformationExtraArgs:
  """Train quantization points with ``inner``; re-sort and clip every step.

  The updates are ``sort(clip(p + u, 0, 1)) - p``, so after
  ``optax.apply_updates`` each leaf of the points tree is sorted and in
  ``[0, 1]`` (to within one rounding of the subtraction).

  Args:
    inner: the optimizer of the points (Polino: SGD, Nesterov momentum 0.9,
      lr around 1e-5).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` over the points tree; its
    ``update`` needs the current points as ``params``.

  Raises:
    TypeError: if ``inner`` is not an Optax transform.

  References:
    Polino et al., ICLR 2018. https://arxiv.org/abs/1802.05668
  """
  name = "diff_quant_points"
  inner = optax.with_extra_args_support(_base.check_inner(inner, name))

  def update(updates, state, params=None, **extra_args):
    _base.require_params(params, name)
    u, state = inner.update(updates, state, params, **extra_args)
    out = jax.tree_util.tree_map(
        lambda p, d: jnp.sort(jnp.clip(p + d.astype(p.dtype), 0.0, 1.0)) - p,
        params, u)
    return out, state

  return optax.GradientTransformationExtraArgs(inner.init, update)
