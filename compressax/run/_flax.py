"""Flax models whose kernels are compressed nodes, run without materializing.

* linen: inside :func:`intercept`, every ``nn.Dense`` whose ``kernel`` param
  is a compressed node computes ``matmul(x, kernel) + bias`` with
  :func:`compressax.run.matmul` (Flax's own ``nn.intercept_methods``; the
  module classes are not changed). Other layers (``Conv``, ``Embed``, ...)
  take ``dot_general=cx.run.dot_general, promote_dtype=cx.run.promote_dtype``
  where Flax offers them, or decode their params at use with
  ``nn.map_variables(Layer, "params", trans_in_fn=cx.materialize)``.
* nnx: :class:`CompressedParam` is an ``nnx.Param`` holding a node;
  reading it (``layer.kernel[...]``) decodes the kernel at that point, so
  unmodified ``nnx.Linear``/``nnx.Conv`` layers run from it. With
  ``decode=False`` it hands the node itself to a layer built with
  ``dot_general=cx.run.dot_general, promote_dtype=cx.run.promote_dtype``
  (the integer paths). :func:`set_compressed` puts a tree's nodes into a
  model.

Either way the decoding is part of the jitted forward, next to the layer that
uses it: the codes are the only copy of the weights held between layers.
"""

from __future__ import annotations

import contextlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from compressax import _node
from compressax._select import is_leaf
from compressax.run._kernel import decode
from compressax.run._matmul import matmul
from compressax.run._matmul import promote_dtype

__all__ = ["CompressedParam", "intercept", "set_compressed"]


def _dense(module: nn.Dense, x):
  kernel = module.get_variable("params", "kernel")
  bias = module.get_variable("params", "bias") if module.use_bias else None
  x, kernel, bias = promote_dtype(x, kernel, bias, dtype=module.dtype)
  y = matmul(x, kernel, precision=module.precision)
  if bias is not None:
    bias = decode(bias).astype(y.dtype)   # a compressed bias is decoded here too
    y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
  return y


def _interceptor(next_fun, args, kwargs, context):
  m = context.module
  if (type(m) is nn.Dense and context.method_name == "__call__" and not kwargs
      and len(args) == 1 and m.has_variable("params", "kernel")
      and _node.is_compressed(m.get_variable("params", "kernel"))):
    return _dense(m, args[0])
  return next_fun(*args, **kwargs)


@contextlib.contextmanager
def intercept():
  """Within it, linen ``nn.Dense`` layers run from compressed kernels.

  A ``nn.Dense`` whose ``kernel`` param is a compressed node (any: a
  :class:`QuantizedKernel` runs its integer path when marked W8A8) computes
  ``cx.run.matmul(x, kernel) + bias``, the node decoded at that point of the
  forward; with dense kernels nothing changes. Uses Flax's
  ``nn.intercept_methods``; enter it around the call that traces the model
  (the jitted function's body, or around the first call of a ``jax.jit``).

  Example:
    >>> model = nn.Dense(8)
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 16)))["params"]
    >>> params["kernel"] = cx.oneshot.rtn(params["kernel"], bits=4)
    >>> with cx.run.intercept():
    ...   y = jax.jit(model.apply)({"params": params}, jnp.ones((2, 16)))
    >>> y.shape
    (2, 8)
  """
  with nn.intercept_methods(_interceptor):
    yield


class CompressedParam(nnx.Param):
  """An ``nnx.Param`` holding a compressed node, decoded where it is read.

  ``param[...]`` and ``param.value`` give the dense kernel, computed at that
  point (inside the layer's ``__call__``, under the caller's ``jit``); with
  metadata ``decode=False`` they give the node itself, for layers built with
  ``dot_general=cx.run.dot_general, promote_dtype=cx.run.promote_dtype``
  (W8A8 then runs as integer matmuls). ``get_raw_value()`` is always the
  node. ``nnx.split``/``nnx.state`` see the node's arrays (codes and scales)
  as the state's leaves.
  """

  def get_value(self, *, index: Any = ...):  # type: ignore[override]
    value = self.get_raw_value()
    if _node.is_compressed(value):
      if self.get_metadata().get("decode", True):
        value = decode(value)
        return value if index is ... else value[index]
      if index is not ...:
        raise TypeError("a CompressedParam with decode=False gives its node "
                        "whole: read it with [...] or .value")
      return value
    return super().get_value(index=index)


def _child(obj, key):
  key = getattr(key, "key", getattr(key, "idx", getattr(key, "name", key)))
  if isinstance(key, int) or not hasattr(obj, str(key)):
    return obj[key], key
  return getattr(obj, str(key)), key


def set_compressed(model: nnx.Module, tree, *, decode: bool = True) -> nnx.Module:
  """Put the compressed nodes of ``tree`` into ``model`` as :class:`CompressedParam`.

  Args:
    model: an nnx module (changed in place).
    tree: ``nnx.state(model, nnx.Param)`` (or a nested dict of the same
      paths) after compression: every compressed node at a parameter's path
      replaces that parameter. Dense leaves are left alone.
    decode: ``True``: the node is decoded wherever the layer reads it (any
      layer); ``False``: the layer gets the node (see
      :class:`CompressedParam`).

  Returns:
    ``model``.

  Raises:
    ValueError: a node's path is not a parameter of ``model``.
  """
  nodes = jax.tree_util.tree_leaves_with_path(
      tree, is_leaf=lambda x: is_leaf(x) or isinstance(x, nnx.Variable))
  for path, leaf in nodes:
    if isinstance(leaf, nnx.Variable):
      leaf = leaf.get_raw_value()
    if not _node.is_compressed(leaf):
      continue
    obj: Any = model  # then its children: modules, lists, dicts
    name = None
    try:
      for k in path[:-1]:
        obj, _ = _child(obj, k)
      last = path[-1]
      name = getattr(last, "key", getattr(last, "idx", getattr(last, "name", last)))
      old = obj[name] if isinstance(name, int) else getattr(obj, str(name))
    except (AttributeError, KeyError, IndexError, TypeError):
      raise ValueError(f"{jax.tree_util.keystr(path)}: no such parameter in "
                       f"{type(model).__name__}") from None
    if not isinstance(old, nnx.Variable):
      raise ValueError(f"{jax.tree_util.keystr(path)}: not a parameter of "
                       f"{type(model).__name__} (got {type(old).__name__})")
    new = CompressedParam(leaf, decode=decode)
    if isinstance(name, int):
      obj[name] = new
    else:
      setattr(obj, str(name), new)
  return model
