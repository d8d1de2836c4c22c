"""Weightless's layer-by-layer loop: encode a layer, freeze it, retrain the rest.

The false positives of a Bloomier-filter layer are fixed once it is encoded,
so Reagen et al. encode the layers one at a time and, after each, retrain
the layers not yet encoded around the errors, with every encoded layer frozen
at its decoded values.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from compressax import _checks
from compressax import _select

__all__ = ["freeze", "freeze_and_retrain"]


def freeze(inner: optax.GradientTransformation, where: _select.Where
           ) -> optax.GradientTransformationExtraArgs:
  """``inner`` with zero updates at the leaves ``where`` selects.

  The frozen leaves keep their values bit for bit whatever ``inner`` does
  (momentum, weight decay); the others get ``inner``'s updates unchanged.

  Args:
    inner: any Optax transform.
    where: the frozen leaves: a path regex, a predicate ``(path, leaf)``, or
      a bool tree (as :func:`freeze_and_retrain` passes its callback).

  Returns:
    An Optax transform (with extra-args support).

  References:
    Reagen et al., *Weightless*, ICML 2018. https://arxiv.org/abs/1711.04686
  """
  from compressax.optim import _base
  inner = optax.with_extra_args_support(_base.check_inner(inner, "freeze"))
  if where is None:
    raise ValueError("freeze: say which leaves to freeze (where=...)")

  def update(updates, state, params=None, **extra):
    new, state = inner.update(updates, state, params, **extra)
    sel = _select.select(updates if params is None else params, where)
    new = jax.tree_util.tree_map(
        lambda u, s: u if _select.is_skip(u) or s is not True
        else jnp.zeros_like(u), new, sel, is_leaf=_select.is_leaf)
    return new, state

  return optax.GradientTransformationExtraArgs(inner.init, update)


def _order(params, plan):
  """``[(keypath, method)]`` of the Weightless leaves: rule by rule, tree order."""
  from compressax.methods._weightless import Weightless
  leaves = jax.tree_util.tree_leaves_with_path(params, is_leaf=_select.is_leaf)
  methods = jax.tree_util.tree_leaves(plan.methods(params),
                                      is_leaf=_select.is_leaf)
  out = []
  for i, ((kp, w), m) in enumerate(zip(leaves, methods)):
    if _select.is_skip(m):
      continue
    if not isinstance(m, Weightless):
      _checks.fail(kp, f"freeze_and_retrain: the plan's rules must give "
                       f"cx.methods.Weightless, got {m!r}", TypeError)
    path = _select.path_str(kp)
    rank = next(r for r, rule in enumerate(plan.rules) if rule.matches(path, w))
    out.append((rank, i, kp, m))
  return [(kp, m) for _, _, kp, m in sorted(out, key=lambda t: t[:2])]


def freeze_and_retrain(params, plan, retrain: Callable[[Any, Any], Any]):
  """Encodes the plan's layers one by one, retraining the rest after each.

  For each leaf the plan gives a ``cx.methods.Weightless`` (in the order of
  the plan's rules, then tree order): the leaf, pruned and clustered (zeros
  pruned, its distinct nonzero values the clusters), is encoded in a Bloomier
  filter (``method.finalize``); the leaf is replaced by the filter's decoded
  values, false positives included, and frozen; then ``retrain(params,
  frozen)`` trains the rest. Each layer is encoded as ``retrain`` left it.

  Args:
    params: a tree of dense arrays.
    plan: a ``cx.Plan`` whose rules give ``cx.methods.Weightless`` to the
      leaves to encode.
    retrain: ``retrain(params, frozen) -> params``, called after each layer:
      ``frozen`` is a bool tree of ``params``' structure (True at the leaves
      encoded so far), to be left exactly as given, e.g. by training with
      ``cx.weightless.freeze(inner, frozen)`` or a ``cx.Plan`` where they get
      ``Weightless`` (whose optimizer wrapper freezes). A later layer must
      stay clustered (e.g. ``cx.methods.KMeans(pruned=True)``).

  Returns:
    ``params`` as the last ``retrain`` left them, with each encoded leaf
    replaced by its ``cx.weightless.BloomierArray`` (whose ``materialize()``
    is the frozen value the rest was retrained around).

  Raises:
    TypeError: a rule gives another method.
    ValueError: naming the leaf, when ``retrain`` changes a frozen leaf or
      the tree's structure, or a layer cannot be encoded (see
      :func:`compressax.weightless.encode`).

  References:
    Reagen et al., *Weightless*, ICML 2018. https://arxiv.org/abs/1711.04686
  """
  treedef = jax.tree_util.tree_structure(params, is_leaf=_select.is_leaf)
  nodes: dict = {}
  for kp, method in _order(params, plan):
    leaf = dict(jax.tree_util.tree_leaves_with_path(
        params, is_leaf=_select.is_leaf))[kp]
    node = method.finalize(kp, leaf, {})
    nodes[kp] = node
    decoded = {k: np.asarray(n.materialize()) for k, n in nodes.items()}
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: decoded[p] if p in decoded else x, params,
        is_leaf=_select.is_leaf)
    frozen = jax.tree_util.tree_map_with_path(
        lambda p, x: x if _select.is_skip(x) else p in nodes, params,
        is_leaf=_select.is_leaf)
    params = retrain(params, frozen)
    if jax.tree_util.tree_structure(params, is_leaf=_select.is_leaf) != treedef:
      raise ValueError("freeze_and_retrain: retrain returned a tree of another "
                       "structure than the params")
    for p, x in jax.tree_util.tree_leaves_with_path(params, is_leaf=_select.is_leaf):
      if p in decoded and not np.array_equal(np.asarray(x), decoded[p]):
        _checks.fail(p, "freeze_and_retrain: retrain changed this frozen "
                        "(encoded) layer; leave the `frozen` leaves as given")
  return jax.tree_util.tree_map_with_path(
      lambda p, x: nodes.get(p, x), params, is_leaf=_select.is_leaf)
