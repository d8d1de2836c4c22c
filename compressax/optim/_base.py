"""Construction-time checks shared by the compression-aware Optax transforms."""

from __future__ import annotations

from typing import Any, TypeGuard

import jax
import numpy as np
import optax
from jax.core import Tracer

from compressax import _checks
from compressax import _node
from compressax import _select

__all__: list[str] = []


def check_inner(inner: Any, transform: str) -> optax.GradientTransformation:
  """``inner`` must be an Optax transform (anything with ``init``/``update``).

  Raises:
    TypeError: naming ``transform`` when ``inner`` is missing or not a
      ``GradientTransformation``.
  """
  if inner is None:
    raise TypeError(f"{transform}: the inner optimizer is missing; pass an "
                    "optax.GradientTransformation, e.g. optax.sgd(0.1)")
  if isinstance(inner, optax.GradientTransformation):
    return inner
  if callable(getattr(inner, "init", None)) and callable(
      getattr(inner, "update", None)):
    return inner
  raise TypeError(f"{transform}: the inner optimizer must be an "
                  f"optax.GradientTransformation, got {type(inner).__name__}")


def require_params(params: Any, transform: str) -> None:
  """Transforms that look at the weights need ``update(..., params)``."""
  if params is None:
    raise ValueError(f"{transform} needs the current params: call "
                     "`tx.update(grads, state, params)`")


class Static:
  """A construction-time value as a static argument of a jitted kernel.

  Hashable values (transforms, regexes, functions) compare by value; others
  (a bool-tree ``where``, an unhashable inner optimizer) by identity, so the
  same object given again (as ``optax.inject_hyperparams`` does each step)
  finds the compiled kernel.
  """

  __slots__ = ("value", "_key")

  def __init__(self, value: Any):
    self.value = value
    try:
      hash(value)
      self._key = value
    except TypeError:
      self._key = _Identity(value)

  def __hash__(self) -> int:
    return hash(self._key)

  def __eq__(self, other) -> bool:
    return isinstance(other, Static) and self._key == other._key


class _Identity:
  __slots__ = ("obj",)

  def __init__(self, obj):
    self.obj = obj

  def __hash__(self) -> int:
    return id(self.obj)

  def __eq__(self, other) -> bool:
    return isinstance(other, _Identity) and self.obj is other.obj


def split_extra_args(extra_args: dict) -> tuple[Static, dict]:
  """Extra args for the inner transform: arrays travel, the rest is static."""
  dynamic = {k: v for k, v in extra_args.items() if not callable(v)}
  static = tuple(sorted((k, Static(v)) for k, v in extra_args.items()
                        if callable(v)))
  return Static(static), dynamic


def join_extra_args(static: Static, dynamic: dict) -> dict:
  return {**{k: v.value for k, v in static.value}, **dynamic}


def is_python_number(v) -> TypeGuard[int | float | np.number]:
  return isinstance(v, (int, float, np.number)) and not isinstance(v, bool)


def split_hyperparams(transform: str, **values) -> tuple[tuple, dict]:
  """Python numbers are static (part of the kernel's cache key), arrays not.

  NumPy scalars and arrays are host values: they become Python numbers.
  JAX arrays (concrete or traced, e.g. from ``optax.inject_hyperparams``)
  are passed to the kernel as arguments, so a new value does not recompile.
  """
  static, dynamic = [], {}
  for name, v in values.items():
    if isinstance(v, np.ndarray) and v.ndim == 0:
      v = v.item()
    if is_python_number(v):
      static.append((name, v.item() if isinstance(v, np.number) else v))
    elif isinstance(v, jax.Array) and np.ndim(v) == 0:
      dynamic[name] = v
    else:
      raise TypeError(f"{transform}: {name} must be a number or a 0-d "
                      f"array, got {v!r}")
  return tuple(static), dynamic


def concrete_value(v):
  """``v`` as a NumPy value when it holds one now, else ``None``."""
  if not _checks.is_concrete(v):
    return None
  return np.asarray(v)


def check_int(transform: str, name: str, v) -> None:
  """An integer: a Python int or an integer (0-d) array, maybe traced."""
  if isinstance(v, bool) or isinstance(v, int):
    return
  dtype = getattr(v, "dtype", None)
  if dtype is None or not np.issubdtype(dtype, np.integer) or np.ndim(v):
    raise TypeError(f"{transform}: {name} must be an integer (a Python int "
                    f"or a 0-d integer array), got {v!r}")


def static_int(transform: str, name: str, v, static_args: str) -> int:
  """A Python int that sets shapes; concrete integer arrays are accepted.

  Raises:
    TypeError: for a traced value, with the ``inject_hyperparams`` hint.
  """
  check_int(transform, name, v)
  if isinstance(v, Tracer):
    raise TypeError(
        f"{transform}: {name} sets array shapes, so it cannot be traced; "
        f"under optax.inject_hyperparams pass static_args=({static_args})")
  return int(v)


def check_steps(transform: str, begin_step, end_step, frequency) -> None:
  """A schedule ``[begin_step, end_step]`` updated every ``frequency`` steps.

  Each may be a Python int or an integer array (e.g. injected by
  ``optax.inject_hyperparams``); values are checked when concrete.
  """
  for name, v in (("begin_step", begin_step), ("end_step", end_step),
                  ("frequency", frequency)):
    check_int(transform, name, v)
  b, e, f = (concrete_value(v) for v in (begin_step, end_step, frequency))
  if b is not None and b < 0:
    raise ValueError(f"{transform}: begin_step must be >= 0, got {begin_step}")
  if b is not None and e is not None and e < b:
    raise ValueError(f"{transform}: end_step ({end_step}) must be >= "
                     f"begin_step ({begin_step})")
  if f is not None and f < 1:
    raise ValueError(f"{transform}: frequency must be >= 1, got {frequency}")


def selection(params: Any, where: _select.Where, transform: str,
              verb: str) -> Any:
  """``cx.select`` for a transform: compressed nodes are not touched.

  By default a compressed node in the params is not selected (it trains
  through the inner optimizer like any unselected leaf); one that ``where``
  selects explicitly is an error.

  Raises:
    TypeError: naming the leaf, for a compressed node ``where`` selects.
  """
  sel = _select.select(params, where)

  def check(kp, x, s):
    if s and _node.is_compressed(x):
      if where is None:
        return False
      _checks.fail(kp, f"{transform}: a compressed node "
                       f"({type(x).__name__}) cannot be {verb} by this "
                       "transform; leave it out of `where` (it then trains "
                       "through the inner optimizer) or materialize it first",
                   TypeError)
    return s

  return jax.tree_util.tree_map_with_path(check, params, sel,
                                          is_leaf=_select.is_leaf)


def check_node_updates(updates: Any, transform: str) -> None:
  """Compressed nodes' updates must be floating for the inner optimizer.

  The gradient of a node with integer parts (the codes of a
  ``QuantizedArray``) holds ``float0`` there, which no Optax optimizer can
  update; say so, naming the leaf, instead of failing inside optax. Runs at
  trace time only.

  Raises:
    TypeError: naming the leaf and what to do.
  """
  def check(kp, u):
    if not _node.is_compressed(u):
      return
    for part in jax.tree_util.tree_leaves(u):
      dtype = getattr(part, "dtype", None)
      if dtype is not None and not np.issubdtype(dtype, np.inexact):
        _checks.fail(kp, f"{transform}: this compressed node "
                         f"({type(u).__name__}) has non-floating parts "
                         f"(dtype {dtype} in its update), which the inner "
                         "optimizer cannot update; freeze it (e.g. "
                         "optax.partition with optax.set_to_zero() for it) "
                         "or train its materialized dense value", TypeError)

  jax.tree_util.tree_map_with_path(check, updates, is_leaf=_select.is_leaf)
