"""Pruning while training: gradual magnitude pruning, fixed masks, N:M masks.

All three wrap any inner Optax transform and return updates that leave the
params *exactly* zero where the mask is off after a single
``optax.apply_updates``: a pruned weight ``p`` gets the update ``-p`` and
``p + (-p)`` is exactly ``+0.0`` in IEEE arithmetic. No post-update hook is
needed (unlike jaxpruner, whose optimizer wrapper leaves the masking to a
second call).

A mask update at step ``t`` ranks the weights as they are when step ``t``
begins (pruned ones held at zero, so a pruned weight never comes back while
the sparsity grows) and applies at once: step ``t``'s gradient is masked with
it, so momentum and Adam moments do not build up behind the mask, and its
update zeroes the newly pruned weights.

References:
  Zhu, Gupta, *To prune, or not to prune: exploring the efficacy of pruning
  for model compression*, 2017. https://arxiv.org/abs/1710.01878
  Han, Mao, Dally, *Deep Compression*, ICLR 2016.
  https://arxiv.org/abs/1510.00149
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from compressax import _checks
from compressax import _select
from compressax import prune as _prune
from compressax.optim import _base

__all__ = ["PruneState", "prune_fixed", "prune_magnitude", "prune_nm"]


class PruneState(NamedTuple):
  """State of the pruning wrappers.

  Attributes:
    count: int32 number of updates done so far.
    masks: bool mask tree with the params' structure (``True`` = kept); 0-d
      ``True`` on leaves that are never pruned.
    inner_state: the inner transform's state.
  """
  count: jax.Array
  masks: Any
  inner_state: Any


def _all_kept(params, where):
  sel = _select.select(params, where)
  return jax.tree_util.tree_map(
      lambda x, s: jnp.ones(jnp.shape(x), bool) if s else jnp.ones((), bool),
      params, sel)


def _keep(m, x):
  return jnp.where(m, x, jnp.zeros_like(x))


def _masked_training(inner, name: str, initial_masks: Callable[[Any], Any],
                     new_masks: Callable[[Any, jax.Array], Any],
                     is_update: Callable[[jax.Array], jax.Array] | None
                     ) -> optax.GradientTransformationExtraArgs:
  """The shared wrapper: mask gradients, run ``inner``, force zeros."""
  inner = optax.with_extra_args_support(_base.check_inner(inner, name))

  def init(params):
    return PruneState(jnp.zeros((), jnp.int32), initial_masks(params),
                      inner.init(params))

  def update(updates, state, params=None, **extra_args):
    _base.require_params(params, name)
    tm = jax.tree_util.tree_map
    masks = state.masks
    if is_update is not None:
      # From the weights as they are (pruned ones already zero). Deciding the
      # mask before the inner update keeps the cond small: the gradient, the
      # inner update and the final `where` then fuse into one pass per leaf.
      masks = jax.lax.cond(
          is_update(state.count),
          lambda: new_masks(tm(_keep, state.masks, params), state.count),
          lambda: state.masks)
    grads = tm(_keep, masks, updates)
    inner_u, inner_state = inner.update(grads, state.inner_state, params,
                                        **extra_args)
    out = tm(lambda m, p, u: jnp.where(m, u.astype(p.dtype), -p),
             masks, params, inner_u)
    return out, PruneState(state.count + 1, masks, inner_state)

  return optax.GradientTransformationExtraArgs(init, update)


def prune_magnitude(inner: optax.GradientTransformation, *,
                    final_sparsity, begin_step: int, end_step: int,
                    frequency: int = 100, initial_sparsity=0.0,
                    power: int = 3, scope: str = "layer",
                    distribution: str = "uniform",
                    where: _select.Where = None
                    ) -> optax.GradientTransformationExtraArgs:
  """Gradual magnitude pruning (Zhu and Gupta) around any Optax optimizer.

  At steps ``begin_step, begin_step + frequency, ..., <= end_step`` the mask
  is recomputed from the weight magnitudes at the sparsity of the polynomial
  schedule ``s_t = s_f + (s_i - s_f) * (1 - (t - t_0) / (t_1 - t_0))^power``
  (``cx.prune.polynomial_schedule``); in between and afterwards it is held.
  Pruned weights are exactly zero after every ``optax.apply_updates``.

  Args:
    inner: the optimizer to wrap, e.g. ``optax.adam(1e-3)``.
    final_sparsity: target fraction of zeros, in ``[0, 1)`` (may be a traced
      scalar, e.g. under ``optax.inject_hyperparams``).
    begin_step: first step (0-based update count) that prunes.
    end_step: step at which the final sparsity is reached.
    frequency: steps between mask updates.
    initial_sparsity: sparsity at ``begin_step``.
    power: exponent of the schedule (3 in the paper).
    scope: ``"layer"`` (each leaf reaches the sparsity) or ``"global"``
      (one threshold over all selected leaves).
    distribution: ``"uniform"`` (every layer the same sparsity) or
      ``"erk"`` (per-layer sparsities from ``cx.prune.erk_sparsity``; implies
      ``scope="layer"``).
    where: which leaves to prune (default: weight matrices and kernels).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs
    ``params``; its state is :class:`PruneState`.

  Raises:
    ValueError: on a sparsity outside ``[0, 1)``, ``end_step < begin_step``,
      an unknown scope or distribution, or ``update`` without params.
    TypeError: if ``inner`` is not an Optax transform.

  Example:
    >>> tx = cx.optim.prune_magnitude(optax.sgd(0.1), final_sparsity=0.8,
    ...                               begin_step=0, end_step=1000)

  References:
    Zhu, Gupta, 2017. https://arxiv.org/abs/1710.01878
  """
  name = "prune_magnitude"
  _checks.check_sparsity(name, final_sparsity)
  _checks.check_sparsity(name + " initial_sparsity", initial_sparsity)
  _base.check_steps(name, begin_step, end_step, frequency)
  if scope not in ("layer", "global"):
    raise ValueError(f"{name}: scope must be 'layer' or 'global', got {scope!r}")
  if distribution not in ("uniform", "erk"):
    raise ValueError(f"{name}: distribution must be 'uniform' or 'erk', "
                     f"got {distribution!r}")
  if distribution == "erk" and scope != "layer":
    raise ValueError(f"{name}: distribution='erk' sets per-layer sparsities; "
                     "use scope='layer'")

  def sparsity_at(count):
    return _prune.polynomial_schedule(
        count, initial_sparsity=initial_sparsity,
        final_sparsity=final_sparsity, begin_step=begin_step,
        end_step=end_step, frequency=frequency, power=power)

  def new_masks(after, count):
    s = sparsity_at(count)
    if distribution == "erk":
      s = _prune.erk_sparsity(after, s, where=where)
    # One sparsity per call: the bisection beats a sort on CPU.
    return _prune.magnitude_mask(after, s, scope=scope, where=where,
                                 method="bisect")

  def is_update(count):
    return ((count >= begin_step) & (count <= end_step)
            & ((count - begin_step) % frequency == 0))

  return _masked_training(inner, name, lambda p: _all_kept(p, where),
                          new_masks, is_update)


def _check_nm_leaves(params, m: int, axis: int, where):
  for kp, x in _select.selected_leaves(params, where):
    ax = _checks.check_axis(kp, axis, x.ndim)
    if x.shape[ax] % m:
      _checks.fail(kp, f"prune_nm: axis {axis} has length {x.shape[ax]}, "
                       f"which m={m} does not divide (exclude the leaf with "
                       "`where`)")
  return _all_kept(params, where)


def prune_fixed(inner: optax.GradientTransformation, mask: Any
                ) -> optax.GradientTransformationExtraArgs:
  """Retrain with a fixed mask (Deep Compression stage 1, after pruning).

  Args:
    inner: the optimizer to wrap.
    mask: a bool mask tree with the params' structure (``True`` = kept), as
      returned by ``cx.prune.magnitude_mask``; 0-d ``True`` keeps a whole leaf.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; the first update already
    zeroes the masked weights, later ones keep them at zero.

  Raises:
    TypeError: if ``inner`` is not an Optax transform.
    ValueError: if ``mask`` does not match the params' structure.

  References:
    Han, Mao, Dally, *Deep Compression*, ICLR 2016.
    https://arxiv.org/abs/1510.00149
  """
  if mask is None:
    raise TypeError("prune_fixed: mask is missing")

  def initial(params):
    _checks.check_same_structure("prune_fixed", params, mask)
    return jax.tree_util.tree_map(lambda m: jnp.asarray(m, bool), mask)

  return _masked_training(inner, "prune_fixed", initial, None, None)


def prune_nm(inner: optax.GradientTransformation, n: int, m: int, *,
             axis: int = -1, begin_step: int = 0, frequency: int = 1,
             where: _select.Where = None
             ) -> optax.GradientTransformationExtraArgs:
  """N:M structured sparsity (keep ``n`` of every ``m``) while training.

  From ``begin_step`` on, the N:M mask (``cx.prune.nm_mask``) is recomputed
  every ``frequency`` steps from the weights this step produces; before it
  the model trains dense.

  Args:
    inner: the optimizer to wrap.
    n: weights kept per group.
    m: group size along ``axis``.
    axis: the axis grouped (the input dimension of a Dense kernel is 0; the
      default ``-1`` groups along the output dimension).
    begin_step: first step that applies the mask.
    frequency: steps between mask recomputations.
    where: which leaves to prune.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Raises:
    ValueError: unless ``0 < n <= m`` are ints.
    TypeError: if ``inner`` is not an Optax transform.

  References:
    Mishra et al., *Accelerating Sparse Deep Neural Networks*, 2021.
    https://arxiv.org/abs/2104.08378
  """
  name = "prune_nm"
  if not all(isinstance(v, int) and not isinstance(v, bool) for v in (n, m)):
    raise TypeError(f"{name}: n and m must be Python ints, got {n!r}, {m!r}")
  if not 0 < n <= m:
    raise ValueError(f"{name}: need 0 < n <= m, got n={n}, m={m}")
  _base.check_steps(name, begin_step, begin_step, frequency)

  def new_masks(after, count):
    del count
    sel = _select.select(after, where)
    return jax.tree_util.tree_map(
        lambda x, s: _prune.nm_mask(x, n, m, axis=axis) if s
        else jnp.ones((), bool), after, sel)

  def is_update(count):
    return (count >= begin_step) & ((count - begin_step) % frequency == 0)

  return _masked_training(inner, name,
                          lambda p: _check_nm_leaves(p, m, axis, where),
                          new_masks, is_update)
