"""``load(path, like=tree)``: the file's tree in the caller's containers.

A compressax file records dicts, lists and tuples; the caller's tree may be a
Flax ``FrozenDict``, an ``nnx.State``, NamedTuples (an optax state) or plain
containers. :func:`restore_like` walks the loaded tree and ``like`` together
and rebuilds ``like``'s containers around the loaded leaves, checking keys,
lengths, and each leaf's shape and dtype where ``like`` has them; the first
disagreement is an error naming its path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NoReturn

import numpy as np

from compressax._node import CompressedLeaf

__all__ = []


def _show(path) -> str:
  return "/".join(str(p) for p in path) or "<root>"


def _fail(name, path, msg) -> NoReturn:
  raise ValueError(f"{name}: {_show(path)}: the file and `like` disagree: {msg}")


def _is_state(x) -> bool:
  return hasattr(x, "to_pure_dict") and hasattr(x, "flat_state")


def restore_like(tree, like, name: str) -> Any:
  """``tree`` (as loaded, nodes kept) in ``like``'s containers."""
  if _is_state(like):  # nnx.State: fill a copy, never the caller's
    import jax
    from flax import nnx
    pure = _restore(tree, nnx.to_pure_dict(like), (), name)
    out = jax.tree.map(lambda v: v, like)
    nnx.replace_by_pure_dict(out, pure)
    return out
  return _restore(tree, like, (), name)


def _restore(x, like, path, name) -> Any:  # a pytree
  if isinstance(like, CompressedLeaf) or _is_leaf(like):
    return _leaf(x, like, path, name)
  if _is_state(like):
    return restore_like(x, like, name + ": " + _show(path))
  if isinstance(like, Mapping):
    if not isinstance(x, dict):
      _fail(name, path, f"`like` has a mapping, the file a {_kind(x)}")
    missing = [k for k in like if k not in x]
    extra = [k for k in x if k not in like]
    if missing or extra:
      _fail(name, path, f"keys only in `like`: {missing}, only in the file: "
            f"{extra}")
    items = {k: _restore(x[k], v, path + (k,), name) for k, v in like.items()}
    return items if type(like) is dict else _rebuild_mapping(like, items)
  if isinstance(like, (list, tuple)):
    if not isinstance(x, (list, tuple)):
      _fail(name, path, f"`like` has a {type(like).__name__}, the file a {_kind(x)}")
    if len(x) != len(like):
      _fail(name, path, f"`like` has {len(like)} items, the file {len(x)}")
    items = [_restore(a, b, path + (i,), name) for i, (a, b) in enumerate(zip(x, like))]
    if isinstance(like, list):
      return items if type(like) is list else type(like)(items)
    if hasattr(like, "_fields"):  # NamedTuple
      return type(like)(*items)
    return tuple(items) if type(like) is tuple else type(like)(items)
  if like is None:
    if x is not None:
      _fail(name, path, f"`like` has None, the file a {_kind(x)}")
    return None
  _fail(name, path, f"cannot rebuild a {type(like).__name__}")


def _rebuild_mapping(like, items: dict):
  try:  # flax FrozenDict and dict subclasses take a dict
    return type(like)(items)
  except Exception:  # noqa: BLE001  an exotic Mapping: a plain dict then
    return items


def _is_leaf(x) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype") or \
      isinstance(x, (int, float, complex, bool, np.generic))


def _kind(x) -> str:
  if isinstance(x, CompressedLeaf):
    return type(x).__name__
  if hasattr(x, "shape"):
    return f"{np.dtype(x.dtype).name}{list(x.shape)} array"
  return "None" if x is None else type(x).__name__


def _leaf(x, like, path, name):
  if x is None or isinstance(x, (dict, list, tuple)):
    _fail(name, path, f"`like` has a leaf, the file a {_kind(x)}")
  want = (tuple(np.shape(like)), np.dtype(like.dtype) if hasattr(like, "dtype")
          else np.asarray(like).dtype)
  got = (tuple(x.shape), np.dtype(x.dtype))
  if want[0] != got[0]:
    _fail(name, path, f"shape {list(want[0])} in `like`, {list(got[0])} in the file")
  if want[1] != got[1]:
    _fail(name, path, f"dtype {want[1].name} in `like`, {got[1].name} in the file")
  return x
