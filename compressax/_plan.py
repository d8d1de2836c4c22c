r"""A compression plan: rules pick a method per leaf, one lifecycle for all.

::

  plan = cx.Plan([
      (r"Conv_\d+/kernel", cx.methods.KMeans(bits=5)),
      (r"Dense_0/kernel", cx.methods.DiffQ(size_penalty=1e-2)),
      (r"Dense_1/kernel", cx.methods.NM(2, 4) >> cx.methods.Uniform(4, symmetric=True)),
      (r"Embed_0/embedding", cx.methods.LowRank(rank=16)),
  ])
  train = plan.init(params, key)            # {"params": ..., "aux": ...}
  loss_fn = plan.loss(task_loss)            # task(view) + penalties
  tx = plan.optimizer(optax.adam(1e-3))     # wrappers + the aux optimizers
  ...                                       # an ordinary optax loop over `train`
  cx.save("model.cx", plan.finalize(train)) # one file, every method's node

The rules are those of :func:`compressax.per_leaf` (first match wins; a rule
that matches no leaf is an error naming it); leaves no rule matches are left
as they are. See ``docs/design.md``.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from compressax import _rules
from compressax import _select
from compressax.methods._base import Method

__all__ = ["Plan"]


def _floating(path: str, leaf) -> bool:
  del path
  dtype = getattr(leaf, "dtype", None)
  return (dtype is not None and jnp.issubdtype(dtype, jnp.inexact)
          and not _select.is_leaf(leaf) and len(getattr(leaf, "shape", ())) >= 1)


class Plan:
  """Compression methods chosen per leaf by rules (see the module docstring).

  Args:
    rules: a method for every weight matrix and kernel (``default_rule``), or
      rules ``[(pattern, method), ...]`` / ``{pattern: method}`` /
      :class:`compressax.Rule`\\ s over every floating-point array leaf, first
      match wins.
    where: restricts the leaves the rules see (default as above).

  Raises:
    TypeError: a rule's value is not a method.
  """

  def __init__(self, rules, *, where: _select.Where = None):
    if isinstance(rules, Method):
      rules = [_rules.Rule(_select.default_rule, rules)]
      where = where
    parsed = _rules.as_rules(rules)
    if parsed is None:
      raise TypeError("Plan: rules must be a method, [(pattern, method), ...], "
                      "{pattern: method} or a list of cx.Rule, got "
                      f"{type(rules).__name__}")
    for r in parsed:
      if not isinstance(r.value, Method):
        raise TypeError(f"Plan: rule {r} gives {r.value!r}, not a compression "
                        "method (cx.methods.Uniform(...), ...)")
    self.rules = tuple(parsed)
    self.where = _floating if where is None else where
    self._cache: dict[Any, list] = {}

  def __repr__(self) -> str:
    inner = ",\n  ".join(f"({r}, {r.value!r})" for r in self.rules)
    return f"Plan([\n  {inner}])"

  # -- resolution ------------------------------------------------------------

  def methods(self, params) -> Any:
    """The side tree of methods: each leaf's method, ``cx.SKIP`` elsewhere."""
    return _rules.per_leaf(params, list(self.rules), where=self.where,
                           default=_select.SKIP, name="Plan")

  def _flat(self, params):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(
        params, is_leaf=_select.is_leaf)
    if treedef not in self._cache:
      methods = jax.tree_util.tree_leaves(self.methods(params),
                                          is_leaf=_select.is_leaf)
      self._cache[treedef] = [None if _select.is_skip(m) else m
                              for m in methods]
    return leaves, treedef, self._cache[treedef]

  @staticmethod
  def _split(train):
    if not (isinstance(train, dict) and set(train) == {"params", "aux"}):
      raise TypeError("expected the tree from Plan.init, "
                      "{'params': ..., 'aux': ...}, got "
                      f"{type(train).__name__}")
    return train["params"], train["aux"]

  # -- the lifecycle ---------------------------------------------------------

  def init(self, params, key=None) -> dict:
    """``{"params": params, "aux": aux}``: the tree to train.

    ``aux`` has the params' structure with each compressed leaf's side state
    (``{}`` when its method has none) and ``cx.SKIP`` elsewhere.
    """
    leaves, treedef, methods = self._flat(params)
    aux = []
    for i, ((kp, w), m) in enumerate(zip(leaves, methods)):
      k = None if key is None else jax.random.fold_in(key, i)
      aux.append(_select.SKIP if m is None else m.init(kp, w, k))
    return {"params": params, "aux": jax.tree_util.tree_unflatten(treedef, aux)}

  def _zip(self, train):
    params, aux = self._split(train)
    leaves, treedef, methods = self._flat(params)
    return leaves, treedef, methods, treedef.flatten_up_to(aux)

  def view(self, train, key=None):
    """The params as the training forward pass sees them."""
    leaves, treedef, methods, aux = self._zip(train)
    out = []
    for i, ((kp, w), m, a) in enumerate(zip(leaves, methods, aux)):
      k = None if key is None else jax.random.fold_in(key, i)
      out.append(w if m is None else m.view(w, a, k))
    return jax.tree_util.tree_unflatten(treedef, out)

  def penalty(self, train) -> jax.Array:
    """The sum of the methods' penalties (e.g. DiffQ's size term)."""
    leaves, _, methods, aux = self._zip(train)
    total = jnp.zeros((), jnp.float32)
    for (_, w), m, a in zip(leaves, methods, aux):
      if m is not None:
        total = total + m.penalty(w, a)
    return total

  def loss(self, task_loss: Callable[..., Any]) -> Callable[..., Any]:
    """``loss(train, key, *args) = task_loss(view(train, key), *args) + penalty``."""
    def loss(train, key, *args):
      return task_loss(self.view(train, key), *args) + self.penalty(train)
    return loss

  def optimizer(self, inner: optax.GradientTransformation
                ) -> optax.GradientTransformation:
    """``inner`` for the params, with each method's wrapper and aux optimizer.

    Methods with an optimizer wrapper (pruning, weight sharing) wrap
    ``inner`` for their leaves; side state with an optimizer of its own
    (DiffQ's logits: Adam) gets it through ``optax.partition``; the rest of
    the side state trains with ``inner``. Use the result in ``optax.chain``,
    ``MultiSteps`` etc. like any transform; its ``init`` takes the tree from
    :meth:`init`.
    """
    from compressax.optim import _base
    _base.check_inner(inner, "Plan.optimizer")
    cache: dict = {}

    def build(train):
      params, aux = self._split(train)
      leaves, treedef, methods = self._flat(params)
      key = (treedef, jax.tree_util.tree_structure(aux))
      if key in cache:
        return cache[key]
      aux_methods = treedef.flatten_up_to(aux)
      own = []  # distinct methods with an aux optimizer
      labels = []
      for m, a in zip(methods, aux_methods):
        if m is not None and m.aux_optimizer() is not None:
          if m not in own:
            own.append(m)
          lab = f"aux{own.index(m)}"
        else:
          lab = "model"
        labels.append(jax.tree_util.tree_map(lambda _, lab=lab: lab, a))
      label_tree = {
          "params": jax.tree_util.tree_map(lambda _: "model", params,
                                           is_leaf=_select.is_leaf),
          "aux": jax.tree_util.tree_unflatten(treedef, labels)}
      tx = inner
      if own:
        txs: dict[Hashable, optax.GradientTransformation] = {"model": inner}
        txs.update({f"aux{i}": m.aux_optimizer() for i, m in enumerate(own)})
        tx = optax.partition(txs, label_tree)
      wrapped = []
      for m in methods:
        if m is not None and type(m).wrap is not Method.wrap and m not in wrapped:
          wrapped.append(m)
      no = jax.tree_util.tree_map(lambda _: False, aux,
                                  is_leaf=_select.is_leaf)
      for m in wrapped:
        sel = jax.tree_util.tree_unflatten(treedef, [mm == m for mm in methods])
        tx = m.wrap(tx, {"params": sel, "aux": no})
      cache[key] = optax.with_extra_args_support(tx)
      return cache[key]

    def init(params):  # the tree from Plan.init (named as optax's protocol)
      return build(params).init(params)

    def update(updates, state, params=None, **extra):
      if params is None:
        raise ValueError("Plan.optimizer needs the current tree: call "
                         "`tx.update(grads, state, train)`")
      return build(params).update(updates, state, params, **extra)

    return optax.GradientTransformationExtraArgs(init, update)

  def finalize(self, train):
    """The params with each compressed leaf replaced by its stored node."""
    leaves, treedef, methods, aux = self._zip(train)
    out = [w if m is None else m.finalize(kp, w, a)
           for (kp, w), m, a in zip(leaves, methods, aux)]
    return jax.tree_util.tree_unflatten(treedef, out)
