"""Which leaves of a parameter pytree a compression transform touches.

Every transform in compressax takes a ``where`` argument and resolves it here, so
that Flax linen ``{'params': ...}`` dicts, ``flax.nnx.State`` from ``nnx.split``
and plain nested dicts/lists/tuples are all treated the same way.

``where`` may be:

* ``None``: the default rule, :func:`default_rule`: floating-point leaves with
  ``ndim >= 2`` (Dense kernels, conv kernels) whose path does not name an
  embedding. Biases, norm scales and embeddings are skipped.
* a ``str``: a regular expression searched (``re.search``) in the leaf's
  ``/``-joined path, e.g. ``"Dense_0/kernel"`` or ``"kernel$"``.
* a callable ``(path: str, leaf) -> bool``.
* a ``bool`` pytree with the same structure as the params (a precomputed
  selection, as returned by :func:`select`).

Paths are ``/``-joined key names with the ``.value`` of ``nnx`` variables
dropped: ``params/Dense_0/kernel`` for linen, ``linear/kernel`` for an nnx
State, ``0/1`` for nested lists.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Union

import jax
import jax.numpy as jnp

PyTree = Any
Where = Union[None, str, Callable[[str, Any], bool], PyTree]

_EMBEDDING = re.compile(r"(^|/)(embedding|embed|embeddings|wte|wpe)($|/)", re.I)


def _key_name(k) -> str | None:
  if isinstance(k, jax.tree_util.DictKey):
    return str(k.key)
  if isinstance(k, jax.tree_util.SequenceKey):
    return str(k.idx)
  if isinstance(k, jax.tree_util.GetAttrKey):
    return None if k.name == "value" else k.name
  if isinstance(k, jax.tree_util.FlattenedIndexKey):
    return str(k.key)
  return str(k)


def path_str(keypath) -> str:
  """The ``/``-joined path of a JAX key path (``nnx`` ``.value`` dropped)."""
  names = (_key_name(k) for k in keypath)
  return "/".join(n for n in names if n is not None)


def display_path(keypath, root: str = "params") -> str:
  """A Python-looking path for error messages: ``params['Dense_0']['kernel']``."""
  keys = [k for k in keypath
          if not (isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value")]
  # A linen variables dict already starts with 'params': don't say it twice.
  if keys and isinstance(keys[0], jax.tree_util.DictKey) and keys[0].key == root:
    keys = keys[1:]
  return root + jax.tree_util.keystr(tuple(keys))


class Skip:
  """The one marker for "not compressed here" in a side tree.

  Side trees (per-leaf settings, method state, masks from the method layer)
  have the params' structure; a leaf a method does not touch holds
  :data:`SKIP`. It is a pytree node with no children (like
  ``optax.MaskedNode``), so a side tree with markers goes through ``jit``,
  ``optax`` and checkpoints unchanged, and :func:`map_selected` walks params
  and side trees together without an ``is_leaf`` of the caller's.
  """

  __slots__ = ()

  def __repr__(self) -> str:
    return "cx.SKIP"

  def __eq__(self, other) -> bool:
    return isinstance(other, Skip)

  def __hash__(self) -> int:
    return hash(Skip)

  def __bool__(self) -> bool:  # never selected
    return False


jax.tree_util.register_pytree_node(
    Skip, lambda s: ((), None), lambda aux, children: SKIP)

SKIP = Skip()


def is_skip(x) -> bool:
  """True for the "not here" marker (:data:`SKIP`, or a legacy ``None``)."""
  return x is None or isinstance(x, Skip)


def is_leaf(x) -> bool:
  """Leaves of compressax: arrays, scalars, compressed nodes and markers.

  The one ``is_leaf`` every tree walk of the library uses, so that compressed
  nodes count as single leaves for pure functions and Optax transforms alike
  and a side tree with :data:`SKIP` (or ``None``) markers has the params'
  structure.
  """
  from compressax._node import CompressedLeaf  # local: avoid an import cycle
  return x is None or isinstance(x, (CompressedLeaf, Skip))


def default_rule(path: str, leaf) -> bool:
  """Weight matrices and conv kernels: floating, ``ndim >= 2``, not embeddings."""
  dtype = getattr(leaf, "dtype", None)
  # jnp.issubdtype: NumPy's own does not know bfloat16 is floating.
  if dtype is None or not jnp.issubdtype(dtype, jnp.inexact):
    return False
  return len(getattr(leaf, "shape", ())) >= 2 and not _EMBEDDING.search(path)


def _rule(where: Where) -> Callable[[str, Any], object] | None:  # bool() of its result
  if where is None:
    return default_rule
  if isinstance(where, str):
    try:
      pattern = re.compile(where)
    except re.error as e:
      raise ValueError(f"where={where!r} is not a valid regular expression: "
                       f"{e}") from None
    return lambda path, leaf: pattern.search(path) is not None
  if callable(where) and not isinstance(where, (dict, list, tuple)):
    return where
  return None  # a bool tree


def select(tree: PyTree, where: Where = None) -> PyTree:
  """A pytree of Python bools: which leaves ``where`` selects.

  Args:
    tree: a parameter pytree.
    where: the selection rule (see the module docstring).

  Returns:
    A pytree of the same structure as ``tree`` with ``True`` at selected
    leaves.

  Raises:
    ValueError: if ``where`` is a bool tree whose structure differs, or a
      regex that matches no leaf of a non-empty tree (a typo would otherwise
      compress nothing, silently).
  """
  from compressax import _checks  # local: _checks imports this module
  _checks.check_tree(tree)
  rule = _rule(where)
  if rule is None:
    return _check_bool_tree(tree, where)
  # A marker in the tree stays a marker (unselected), so the selection has the
  # tree's structure with or without compressax's is_leaf.
  sel = jax.tree_util.tree_map_with_path(
      lambda p, x: x if is_skip(x) else bool(rule(path_str(p), x)), tree,
      is_leaf=is_leaf)
  if isinstance(where, str) and not any(jax.tree_util.tree_leaves(sel)):
    paths = [path_str(p) for p, _ in
             jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_leaf)]
    if paths:  # an empty tree has nothing to miss
      shown = ", ".join(paths[:6]) + (", ..." if len(paths) > 6 else "")
      raise ValueError(f"where={where!r} matches no leaf (a regex searched in "
                       f"each '/'-joined path); the paths are: {shown}")
  return sel


def _check_bool_tree(tree: PyTree, where: PyTree) -> PyTree:
  t1 = jax.tree_util.tree_structure(tree, is_leaf=is_leaf)
  t2 = jax.tree_util.tree_structure(where, is_leaf=is_leaf)
  if t1 != t2:
    raise ValueError(
        f"`where` is a pytree whose structure does not match the params:\n"
        f"  params: {t1}\n  where:  {t2}")
  return jax.tree_util.tree_map(lambda w, x: x if is_skip(x) else bool(w),
                                where, tree, is_leaf=is_leaf)


_KEEP = object()


def map_selected(fn: Callable[..., Any], tree: PyTree, *rest: PyTree,
                 where: Where = None, unselected: Any = _KEEP) -> PyTree:
  """Apply ``fn(path, leaf, *rest_leaves)`` to the selected leaves.

  The one walk of compressax: compressed nodes are single leaves, and side
  trees in ``rest`` may hold :data:`SKIP` (or ``None``) where they do not
  apply; a leaf is visited when ``where`` selects it and no side tree skips
  it. ``path`` is the full JAX key path, so ``fn`` can name it in an error
  with :func:`display_path` or match it with :func:`path_str`.

  Args:
    fn: called as ``fn(keypath, leaf, *rest_leaves)`` for each visited leaf.
    tree: the parameter pytree.
    *rest: side trees with the structure of ``tree`` (masks, settings,
      method state), :data:`SKIP` where they do not apply.
    where: the selection rule (see the module docstring).
    unselected: what leaves that are not visited become; by default the very
      same objects (same dtype and sharding); pass :data:`SKIP` to build a
      side tree.

  Returns:
    A pytree like ``tree`` with the visited leaves replaced.

  Raises:
    ValueError: if a side tree's structure differs from ``tree``'s (the
      message shows both).
  """
  sel = select(tree, where)
  for i, other in enumerate(rest):
    t1 = jax.tree_util.tree_structure(tree, is_leaf=is_leaf)
    t2 = jax.tree_util.tree_structure(other, is_leaf=is_leaf)
    if t1 != t2:
      raise ValueError(
          f"pytree argument {i + 1} does not match the params' structure:\n"
          f"  params: {t1}\n  other:  {t2}")

  def apply(p, x, s, *others):
    if s and not any(isinstance(o, Skip) for o in others):
      return fn(p, x, *others)
    return x if unselected is _KEEP else unselected

  return jax.tree_util.tree_map_with_path(
      apply, tree, sel, *rest, is_leaf=is_leaf)


def selected_leaves(tree: PyTree, where: Where = None) -> list[tuple[Any, Any]]:
  """``[(keypath, leaf), ...]`` of the selected leaves, in tree order."""
  sel = select(tree, where)
  pairs = jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_leaf)
  flags = jax.tree_util.tree_leaves(sel, is_leaf=is_leaf)
  return [pl for pl, s in zip(pairs, flags) if s]
