"""Per-leaf plumbing shared by the mask builders (private).

Resolves a sparsity given as a scalar, a per-leaf pytree or a path mapping,
checks the leaves a mask is built for, and assembles mask trees in which
unselected leaves get a 0-d ``True`` (keep all).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from compressax import _checks
from compressax import _rules
from compressax._node import is_compressed
from compressax._select import is_leaf
from compressax._select import is_skip
from compressax._select import path_str
from compressax._select import select
from compressax.prune import _rank


def keep_all():
  """The mask of an unselected leaf: a 0-d ``True``."""
  return np.ones((), bool)


def dense_value(path, x):
  """The checked dense value of a leaf to rank (compressed leaves materialized)."""
  if is_compressed(x):
    x = x.materialize()
  _checks.check_floating(path, x)
  _checks.check_finite(path, x)
  return x


def flat_selection(params, where):
  """``(treedef, [(keypath, leaf)], [selected?])`` over the params' leaves."""
  pairs, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_leaf)
  flags = jax.tree_util.tree_leaves(select(params, where), is_leaf=is_leaf)
  return treedef, pairs, flags


def per_leaf_sparsity(params, sparsity, pairs, flags) -> list:
  """One sparsity per selected leaf, from a scalar, a pytree or a mapping.

  Accepted forms: a scalar (Python number or 0-d array, may be traced); a
  pytree with the params' structure whose leaves are scalars (values at
  unselected leaves are ignored), as returned by :func:`erk_sparsity`; or a
  mapping from ``/``-joined leaf path (``"params/Dense_0/kernel"``) to scalar
  that covers every selected leaf.
  """
  selected = [(p, x) for (p, x), f in zip(pairs, flags) if f]
  if _is_scalar(sparsity):
    out = [sparsity] * len(selected)
  elif hasattr(sparsity, "shape"):  # not _is_scalar: an array of several numbers
    _rank.check_scalar("sparsity", sparsity)
    raise AssertionError(f"check_scalar accepted {sparsity!r}")  # it raises
  else:
    treedef = jax.tree_util.tree_structure(params, is_leaf=is_leaf)
    try:
      sdef = jax.tree_util.tree_structure(sparsity)
    except Exception:  # noqa: BLE001 (unflattenable: not a pytree form)
      sdef = None
    if sdef == treedef:
      leaves = jax.tree_util.tree_leaves(sparsity)
      out = [s for s, f in zip(leaves, flags) if f]
    elif _rules.as_rules(sparsity) is not None:
      # Rules (regex or exact path, first match wins), as everywhere.
      out = [_rules.lookup(sparsity, p, x, name="sparsity") for p, x in selected]
      _rules.check_used(params, sparsity, where=lambda p, x: any(
          p == path_str(q) for q, _ in selected), name="sparsity")
    else:
      raise TypeError(
          "sparsity must be a scalar, a pytree of scalars with the params' "
          "structure, or a mapping from leaf path to scalar; got "
          f"{type(sparsity).__name__}")
  for (p, _), s in zip(selected, out):
    _rank.check_scalar(p, s)
  return out


def _is_scalar(s) -> bool:
  if isinstance(s, (int, float, np.number, np.bool_)):
    return True
  return hasattr(s, "shape") and hasattr(s, "dtype") and np.ndim(s) == 0


def assemble(treedef, flags, masks) -> Any:
  """A mask tree: ``masks`` (in order) at selected leaves, 0-d True elsewhere.

  A ``cx.SKIP`` marker of the params (whose flag is the marker itself) stays a
  marker, so the mask tree has the params' structure with or without
  compressax's ``is_leaf``.
  """
  it = iter(masks)
  leaves = [next(it) if f else (f if is_skip(f) else keep_all())
            for f in flags]
  return jax.tree_util.tree_unflatten(treedef, leaves)
