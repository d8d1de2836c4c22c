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

import dataclasses
import functools
import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from compressax import _checks
from compressax import _sharding
from compressax import _node
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
  # optax's name for the step counter; it shadows tuple.count, as in optax's
  # own states (ScaleByAdamState.count).
  count: jax.Array  # pyright: ignore[reportIncompatibleMethodOverride]
  masks: Any
  inner_state: Any


def _all_kept(params, where, name="prune"):
  sel = _base.selection(params, where, name, "pruned")
  # A SKIP marker in the params (a Plan's side state) stays a marker, so the
  # mask tree keeps the params' structure for plain tree_maps.
  return jax.tree_util.tree_map(
      lambda x, s: _sharding.like(jnp.ones(jnp.shape(x), bool), x) if s else
      (x if _select.is_skip(x) else jnp.ones((), bool)),
      params, sel, is_leaf=_select.is_leaf)


def _keep(m, x):
  if _select.is_skip(m) or _node.is_compressed(x):
    return x
  return jnp.where(m, x, jnp.zeros_like(x))


def _force(m, p, u):
  """The update that leaves ``p`` at exactly zero where ``m`` is off."""
  if _select.is_skip(m) or _node.is_compressed(p):
    return u  # compressed nodes train through the inner optimizer as is
  return jnp.where(m, u.astype(p.dtype), -p)


def _tree_map(fn, *trees):
  return jax.tree_util.tree_map(fn, *trees, is_leaf=_select.is_leaf)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _masked_update(name, inner, rule, extra_static, updates, state, params,
                   dynamic, extra_args):
  """The shared update: mask gradients, run ``inner``, force zeros.

  One jitted kernel for every pruning transform: the construction-time
  config (``inner``, ``rule``) is static, so eager calls reuse one compiled
  program (a ``lax.cond`` of fresh lambdas would recompile every call), and
  array hyperparameters (``dynamic``) are arguments, so a new value does not
  recompile either. Inside an outer ``jit`` the call is inlined.
  """
  inner = optax.with_extra_args_support(inner.value)
  extra_args = _base.join_extra_args(extra_static, extra_args)
  masks = state.masks
  if rule is not None:
    hp = rule.hyperparams(dynamic)
    # From the weights as they are (pruned ones already zero). Deciding the
    # mask before the inner update keeps the cond small: the gradient, the
    # inner update and the final `where` then fuse into one pass per leaf.
    masks = jax.lax.cond(
        rule.is_update(state.count, hp),
        lambda: rule.new_masks(_tree_map(_keep, state.masks, params),
                               state.count, hp),
        lambda: state.masks)
  _base.check_node_updates(updates, name)
  grads = _tree_map(_keep, masks, updates)
  inner_u, inner_state = inner.update(grads, state.inner_state, params,
                                      **extra_args)
  out = _tree_map(_force, masks, params, inner_u)
  return out, PruneState(state.count + 1, masks, inner_state)


@dataclasses.dataclass(frozen=True)
class _Callables:
  """A mask rule from two functions (the method layer's Channel uses it)."""
  new_masks_fn: Callable[[Any, jax.Array], Any]
  is_update_fn: Callable[[jax.Array], jax.Array]

  def hyperparams(self, dynamic):
    return dynamic

  def is_update(self, count, hp):
    del hp
    return self.is_update_fn(count)

  def new_masks(self, after, count, hp):
    del hp
    return self.new_masks_fn(after, count)


def _masked_training(inner, name: str, initial_masks: Callable[[Any], Any],
                     new_masks: Callable[[Any, jax.Array], Any] | None = None,
                     is_update: Callable[[jax.Array], jax.Array] | None = None,
                     *, rule: Any = None, dynamic: dict | None = None
                     ) -> optax.GradientTransformationExtraArgs:
  """The shared wrapper around :func:`_masked_update`.

  The mask updates come from ``rule`` (a hashable config object with
  ``hyperparams``, ``is_update`` and ``new_masks``; array hyperparameters in
  ``dynamic``) or from the two functions ``new_masks(after, count)`` and
  ``is_update(count)``; neither: the masks are held.
  """
  if new_masks is not None:
    if is_update is None:
      raise TypeError(f"{name}: new_masks needs is_update (when to apply it)")
    rule = _Callables(new_masks, is_update)
  inner = _base.check_inner(inner, name)
  static_inner = _base.Static(inner)
  dynamic = dynamic or {}

  def init(params):
    _checks.check_tree(params, name + ".init")
    return PruneState(jnp.zeros((), jnp.int32), initial_masks(params),
                      optax.with_extra_args_support(inner).init(params))

  def update(updates, state, params=None, **extra_args):
    _checks.check_tree(updates, name + ".update")
    _base.require_params(params, name)
    _checks.check_tree(params, name + ".update")
    extra_static, extra_args = _base.split_extra_args(extra_args)
    return _masked_update(name, static_inner, rule, extra_static, updates,
                          state, params, dynamic, extra_args)

  return optax.GradientTransformationExtraArgs(init, update)


def _polynomial(count, hp):
  """The Zhu-Gupta sparsity at ``count``; array steps allowed."""
  keys = ("begin_step", "end_step", "frequency", "power")
  if all(_base.is_python_number(hp[k]) for k in keys):
    return _prune.polynomial_schedule(
        count, initial_sparsity=hp["initial_sparsity"],
        final_sparsity=hp["final_sparsity"], begin_step=hp["begin_step"],
        end_step=hp["end_step"], frequency=hp["frequency"], power=hp["power"])
  # The same formula with the steps as (possibly traced) arrays.
  f32 = jnp.float32
  t = jnp.asarray(count).astype(f32)
  b, e, f = (jnp.asarray(hp[k]).astype(f32) for k in keys[:3])
  frac = jnp.clip(jnp.floor((t - b) / f) * f / jnp.maximum(e - b, 1.0),
                  0.0, 1.0)
  frac = jnp.where(e == b, jnp.where(t >= b, 1.0, 0.0).astype(f32), frac)
  s_i = jnp.asarray(hp["initial_sparsity"]).astype(f32)
  s_f = jnp.asarray(hp["final_sparsity"]).astype(f32)
  power = hp["power"]
  if not _base.is_python_number(power):
    power = jnp.asarray(power).astype(f32)
  return s_f + (s_i - s_f) * (1.0 - frac) ** power


def _steps(count, hp, name):
  v = hp[name]
  return v if _base.is_python_number(v) else jnp.asarray(v).astype(count.dtype)


@dataclasses.dataclass(frozen=True)
class _Magnitude:
  """The static config of :func:`prune_magnitude`'s mask updates."""
  static: tuple  # ((name, Python number), ...); array ones come as `dynamic`
  scope: str
  distribution: str
  where: _base.Static

  def hyperparams(self, dynamic):
    return {**dict(self.static), **dynamic}

  def is_update(self, count, hp):
    b, e, f = (_steps(count, hp, k) for k in ("begin_step", "end_step",
                                              "frequency"))
    return (count >= b) & (count <= e) & ((count - b) % f == 0)

  def new_masks(self, after, count, hp):
    where = _base.selection(after, self.where.value, "prune_magnitude",
                            "pruned")
    s = _polynomial(count, hp)
    if self.distribution == "erk":
      s = _prune.erk_sparsity(after, s, where=where)
    # One sparsity per call: the bisection beats a sort on CPU.
    return _prune.magnitude_mask(after, s, scope=self.scope, where=where,
                                 method="bisect")


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
  _checks.check_range(name, "power", power, 0, float("inf"), lo_open=True)
  if scope not in ("layer", "global"):
    raise ValueError(f"{name}: scope must be 'layer' or 'global', got {scope!r}")
  if distribution not in ("uniform", "erk"):
    raise ValueError(f"{name}: distribution must be 'uniform' or 'erk', "
                     f"got {distribution!r}")
  if distribution == "erk" and scope != "layer":
    raise ValueError(f"{name}: distribution='erk' sets per-layer sparsities; "
                     "use scope='layer'")
  static, dynamic = _base.split_hyperparams(
      name, final_sparsity=final_sparsity, initial_sparsity=initial_sparsity,
      begin_step=begin_step, end_step=end_step, frequency=frequency,
      power=power)
  rule = _Magnitude(static, scope, distribution, _base.Static(where))
  return _masked_training(inner, name, lambda p: _all_kept(p, where, name),
                          rule=rule, dynamic=dynamic)


def _check_nm_leaves(params, m: int, axis: int, where):
  sel = _base.selection(params, where, "prune_nm", "pruned")
  leaves = jax.tree_util.tree_leaves_with_path(params, is_leaf=_select.is_leaf)
  flags = jax.tree_util.tree_leaves(sel, is_leaf=_select.is_leaf)
  for kp, x in (pair for pair, s in zip(leaves, flags) if s):
    ax = _checks.check_axis(kp, axis, x.ndim)
    if x.shape[ax] % m:
      _checks.fail(kp, f"prune_nm: axis {axis} has length {x.shape[ax]}, "
                       f"which m={m} does not divide (exclude the leaf with "
                       "`where`)")
  return _all_kept(params, sel, "prune_nm")


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
  name = "prune_fixed"
  if mask is None:
    raise TypeError(f"{name}: mask is missing")

  def initial(params):
    _checks.check_same_structure(name, params, mask)

    def one(kp, x, m):
      if _select.is_skip(m):
        return m
      m = jnp.asarray(m, bool)
      if _node.is_compressed(x) and (m.ndim or not bool(m)):
        _checks.fail(kp, f"{name}: a compressed node ({type(x).__name__}) "
                         "cannot be pruned by this transform; give it a 0-d "
                         "True mask (build the mask with a `where` that "
                         "leaves it out) or materialize it first", TypeError)
      # In the leaf's sharding, like the masks prune_magnitude computes.
      return _sharding.like(m, x) if m.shape == jnp.shape(x) else m

    return jax.tree_util.tree_map_with_path(one, params, mask,
                                            is_leaf=_select.is_leaf)

  return _masked_training(inner, name, initial)


def prune_nm(inner: optax.GradientTransformation, n: int, m: int, *,
             axis: int | None = None, begin_step: int = 0, frequency: int = 1,
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
    axis: the axis grouped (``-2``: the input features of Dense and conv
      kernels; ``-1``: the output features). Pass it explicitly: without it
      ``-1`` is used with a ``DeprecationWarning`` (the default becomes
      ``-2``, as in ``cx.prune.nm_mask_tree`` and ``cx.methods.NM``).
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
  if axis is None:
    warnings.warn(
        "prune_nm: pass axis= explicitly. Its default (-1, the output features "
        "of a Dense kernel) disagrees with cx.prune.nm_mask_tree and "
        "cx.methods.NM (-2, the input features, as sparse tensor cores and "
        "Wang et al. 2022 use) and becomes -2 in the next release",
        DeprecationWarning, stacklevel=2)
    axis = -1
  hint = "'n', 'm', 'axis'"
  n, m, axis = (_base.static_int(name, k, v, hint)
                for k, v in (("n", n), ("m", m), ("axis", axis)))
  if not 0 < n <= m:
    raise ValueError(f"{name}: need 0 < n <= m, got n={n}, m={m}")
  _base.check_steps(name, begin_step, begin_step, frequency)
  static, dynamic = _base.split_hyperparams(name, begin_step=begin_step,
                                            frequency=frequency)
  rule = _NM(static, n, m, axis, _base.Static(where))
  return _masked_training(inner, name,
                          lambda p: _check_nm_leaves(p, m, axis, where),
                          rule=rule, dynamic=dynamic)


@dataclasses.dataclass(frozen=True)
class _NM:
  """The static config of :func:`prune_nm`'s mask updates."""
  static: tuple
  n: int
  m: int
  axis: int
  where: _base.Static

  def hyperparams(self, dynamic):
    return {**dict(self.static), **dynamic}

  def is_update(self, count, hp):
    b, f = _steps(count, hp, "begin_step"), _steps(count, hp, "frequency")
    return (count >= b) & ((count - b) % f == 0)

  def new_masks(self, after, count, hp):
    del count, hp
    sel = _base.selection(after, self.where.value, "prune_nm", "pruned")
    return jax.tree_util.tree_map(
        lambda x, s: _prune.nm_mask(x, self.n, self.m, axis=self.axis) if s
        else (x if _select.is_skip(x) else jnp.ones((), bool)), after, sel,
        is_leaf=_select.is_leaf)
