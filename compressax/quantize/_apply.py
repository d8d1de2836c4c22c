"""The tree-level form: apply any quantizer to the selected leaves of a pytree."""

from __future__ import annotations

import inspect
from typing import Any, Callable

import jax

from compressax import _select

__all__ = ["apply"]


def _accepts(fn, name: str) -> bool:
  try:
    params = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):
    return False
  return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD
             for p in params)


def apply(params, quantizer: Callable[..., Any], *, where=None, key=None):
  """Apply ``quantizer`` to the selected leaves of a parameter pytree.

  Args:
    params: a Flax linen params dict, an ``nnx.State`` or any pytree.
    quantizer: called as ``quantizer(leaf)``, e.g.
      ``functools.partial(uniform, bits=4)`` for fake quantization or
      ``functools.partial(quantize, bits=4)`` for :class:`QuantizedArray`
      nodes. If it takes a ``path`` keyword, it gets the leaf's path for its
      error messages.
    where: which leaves (see :mod:`compressax._select`); default: weight
      matrices and kernels.
    key: optional PRNG key; it is split into one subkey per selected leaf, in
      leaf order, and passed as ``key=``.

  Returns:
    A pytree like ``params``; unselected leaves are the same objects.

  Raises:
    ValueError, TypeError: from ``quantizer``, prefixed with the leaf path.

  Example:
    >>> import functools
    >>> params = {"dense": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)}}
    >>> q = apply(params, functools.partial(cx.quantize.quantize, bits=4))
    >>> type(q["dense"]["kernel"]).__name__, q["dense"]["bias"] is params["dense"]["bias"]
    ('QuantizedArray', True)
  """
  n = len(_select.selected_leaves(params, where))
  keys = iter(jax.random.split(key, n)) if key is not None and n else None
  takes_path = _accepts(quantizer, "path")

  def fn(keypath, leaf):
    kwargs = {} if keys is None else {"key": next(keys)}
    where_ = _select.display_path(keypath)
    if takes_path:
      return quantizer(leaf, path=where_, **kwargs)
    try:
      return quantizer(leaf, **kwargs)
    except (ValueError, TypeError) as e:
      raise type(e)(f"{where_}: {e}") from e

  return _select.map_selected(fn, params, where=where)
