"""Per-leaf settings and rules: one form everywhere a value varies by leaf.

Every function of compressax that takes a per-leaf setting (a sparsity, a
rank, a number of clusters, a compression method) accepts the same forms:

* **one value** for every selected leaf: ``0.9``, ``jnp.float32(0.9)``,
  ``cx.methods.Uniform(bits=4)``;
* **rules**, first match wins: a sequence of :class:`Rule` or
  ``(pattern, value)`` pairs, or a ``Mapping`` ``{pattern: value}`` (in its
  order). A pattern is a regular expression searched (``re.search``) in the
  leaf's ``/``-joined path (so an exact path such as ``"params/Dense_0/kernel"``
  matches itself), or a predicate ``(path, leaf) -> bool``. A rule that matches
  no selected leaf is an error that names it: a typo would otherwise compress
  nothing;
* a **side tree** with the params' structure (as ``cx.prune.erk_sparsity``
  returns), :data:`compressax.SKIP` (or ``None``) where it does not apply;
* a **callable** ``(path, leaf) -> value``.

Example:
  >>> params = {"conv": {"kernel": jnp.ones((3, 3, 4, 8))},
  ...           "dense": {"kernel": jnp.ones((32, 10))}}
  >>> cx.per_leaf(params, {"conv": 0.5, "dense": 0.9})
  {'conv': {'kernel': 0.5}, 'dense': {'kernel': 0.9}}
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Union

import jax

from compressax import _checks
from compressax import _select

__all__ = ["Rule", "per_leaf"]

Pattern = Union[str, Callable[[str, Any], bool]]
_NO_DEFAULT = object()


@dataclasses.dataclass(frozen=True)
class Rule:
  """``value`` for the leaves whose path matches ``pattern``.

  Attributes:
    pattern: a regular expression searched in the ``/``-joined leaf path
      (``"conv"``, ``r"Dense_\\d+/kernel$"``), or a predicate
      ``(path, leaf) -> bool``.
    value: the setting (a number, a method, ...) those leaves take.
  """
  pattern: Pattern
  value: Any

  def __post_init__(self):
    if isinstance(self.pattern, str):
      try:
        re.compile(self.pattern)
      except re.error as e:
        raise ValueError(f"rule {self.pattern!r}: not a valid regular "
                         f"expression ({e})") from None
    elif not callable(self.pattern):
      raise TypeError("a rule's pattern must be a regex string or a callable "
                      f"(path, leaf) -> bool, got {type(self.pattern).__name__}")

  def matches(self, path: str, leaf) -> bool:
    if isinstance(self.pattern, str):
      return path == self.pattern or re.search(self.pattern, path) is not None
    return bool(self.pattern(path, leaf))

  def __str__(self) -> str:
    p = self.pattern
    return repr(p) if isinstance(p, str) else getattr(p, "__name__", repr(p))


def as_rules(settings) -> list[Rule] | None:
  """``settings`` as a list of rules, or ``None`` if it is another form."""
  if isinstance(settings, Rule):
    return [settings]
  if isinstance(settings, Mapping) and all(isinstance(k, str) for k in settings):
    return [Rule(k, v) for k, v in settings.items()]
  if (isinstance(settings, Sequence) and not isinstance(settings, str)
      and settings and all(
          isinstance(r, Rule) or (isinstance(r, tuple) and len(r) == 2
                                  and (isinstance(r[0], str) or callable(r[0])))
          for r in settings)):
    return [r if isinstance(r, Rule) else Rule(*r) for r in settings]
  return None


def lookup(settings, keypath, leaf, *, name: str = "setting",
           default: Any = _NO_DEFAULT, exc: type[Exception] = ValueError) -> Any:
  """One leaf's value of ``settings`` (one value, rules or a callable).

  The leaf-level form of :func:`per_leaf`, for functions that visit leaves
  one at a time; pair it with :func:`check_used` to catch rules that match
  nothing.
  """
  rules = as_rules(settings)
  path = _select.path_str(keypath) if not isinstance(keypath, str) else keypath
  if rules is not None:
    for r in rules:
      if r.matches(path, leaf):
        return r.value
    if default is not _NO_DEFAULT:
      return default
    _checks.fail(keypath, f"no {name} given for this leaf: no rule matches its "
                          f"path {path!r} (rules: {', '.join(map(str, rules))})",
                 exc)
  if callable(settings) and not hasattr(settings, "shape") and not (
      dataclasses.is_dataclass(settings)):
    return settings(path, leaf)
  return settings


def check_used(tree, settings, *, where: _select.Where = None,
               name: str = "setting") -> None:
  """Raise if a rule of ``settings`` takes no selected leaf of ``tree``."""
  rules = as_rules(settings)
  if rules is None:
    return
  used = [False] * len(rules)
  selected = _select.selected_leaves(tree, where)
  for kp, x in selected:
    path = _select.path_str(kp)
    for i, r in enumerate(rules):
      if r.matches(path, x):
        used[i] = True
        break
  unused = [str(r) for r, u in zip(rules, used) if not u]
  if unused:
    paths = [_select.path_str(p) for p, _ in selected]
    shown = ", ".join(paths[:6]) + (", ..." if len(paths) > 6 else "")
    raise ValueError(f"{name}: rule {', '.join(unused)} matches no selected "
                     f"leaf (an earlier rule may have taken them); the "
                     f"selected paths are: {shown or 'none'}")


def _same_structure(tree, settings) -> bool:
  try:
    return (jax.tree_util.tree_structure(settings, is_leaf=_select.is_leaf)
            == jax.tree_util.tree_structure(tree, is_leaf=_select.is_leaf))
  except Exception:  # noqa: BLE001 (not a pytree: not the side-tree form)
    return False


def per_leaf(tree, settings, *, where: _select.Where = None,
             default: Any = _NO_DEFAULT, name: str = "setting"):
  """The side tree of ``settings`` resolved for each selected leaf of ``tree``.

  Args:
    tree: a parameter pytree.
    settings: one value, rules, a side tree or a callable (module docstring).
    where: which leaves take a setting (default: weight matrices, kernels).
    default: the value of a selected leaf no rule matches; without it such a
      leaf is an error naming it.
    name: what the setting is, for error messages ("sparsity", "rank", ...).

  Returns:
    A tree with the structure of ``tree``: each selected leaf's setting, and
    :data:`compressax.SKIP` at the other leaves (and where a side tree holds
    ``SKIP``/``None``).

  Raises:
    ValueError: a rule that matches no selected leaf (naming the rule), a
      selected leaf no rule matches when there is no ``default`` (naming the
      leaf), or a side tree of another structure.
  """
  SKIP = _select.SKIP
  if not isinstance(settings, Rule) and _same_structure(
      tree, settings) and jax.tree_util.tree_leaves(tree):
    # A side tree. Keep its values at selected leaves only.
    return _select.map_selected(
        lambda p, x, s: SKIP if _select.is_skip(s) else s, tree, settings,
        where=where, unselected=SKIP)
  rules = as_rules(settings)
  if rules is None:
    if isinstance(settings, (Mapping, list)) and not _same_structure(
        tree, settings):
      raise ValueError(
          f"{name}: a {type(settings).__name__} of settings must be rules "
          "({pattern: value} or [(pattern, value), ...]) or a tree with the "
          f"params' structure:\n  params: "
          f"{jax.tree_util.tree_structure(tree, is_leaf=_select.is_leaf)}")
    return _select.map_selected(lambda p, x: lookup(settings, p, x), tree,
                                where=where, unselected=SKIP)
  out = _select.map_selected(
      lambda p, x: lookup(rules, p, x, name=name, default=default), tree,
      where=where, unselected=SKIP)
  check_used(tree, rules, where=where, name=name)
  return out
