"""Compressed leaves: small pytree nodes that stand in for a dense array.

A compressed leaf (quantized codes plus scales, a codebook, a pruning mask,
low-rank factors, ...) is a frozen dataclass registered as a JAX pytree node.
Its *data* fields are arrays (or other compressed leaves) and travel through
``jit``/``vmap``/``grad``; its *meta* fields are static, JSON-able Python
values (ints, floats, strings, bools, tuples of those). Each node:

* materializes itself as the dense array it stands for (:meth:`materialize`),
* knows its exact storage size in bits before entropy coding
  (:meth:`storage_bits`), and
* is registered by class name so that :func:`compressax.save` can write it and
  :func:`compressax.load` can rebuild it without pickle.

Define one with::

  @cx.compressed_leaf
  @dataclasses.dataclass(frozen=True)
  class MyLeaf(cx.CompressedLeaf):
    codes: jax.Array
    scale: jax.Array
    shape: tuple = dataclasses.field(metadata=dict(static=True))
    dtype: np.dtype = dataclasses.field(metadata=dict(static=True))
    ...
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_REGISTRY: dict[str, type] = {}


class CompressedLeaf:
  """Base class of compressed leaf nodes (see the module docstring)."""

  def materialize(self) -> jax.Array:
    """The dense array this node stands for, in its original shape and dtype."""
    raise NotImplementedError

  def storage_bits(self) -> int:
    """Exact payload size in bits before entropy coding (a Python int)."""
    raise NotImplementedError

  # Subclasses declare static fields `shape: tuple[int, ...]` and
  # `dtype: numpy.dtype` (the dense array's); compressax.save writes the dtype
  # by name.

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64))

  def data(self) -> dict[str, Any]:
    """The node's array (data) fields by name."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
            if not f.metadata.get("static", False)}

  def meta(self) -> dict[str, Any]:
    """The node's static (meta) fields by name."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
            if f.metadata.get("static", False)}

  def __array__(self, dtype=None, copy=None):
    out = np.asarray(self.materialize())
    return out if dtype is None else out.astype(dtype)


def compressed_leaf(cls: type) -> type:
  """Class decorator: register a frozen dataclass as a compressed leaf node."""
  if not (isinstance(cls, type) and issubclass(cls, CompressedLeaf)):
    raise TypeError(f"{cls!r} must subclass compressax.CompressedLeaf")
  if not dataclasses.is_dataclass(cls):
    raise TypeError(f"{cls.__name__} must be a dataclass")
  fields = dataclasses.fields(cls)
  data = [f.name for f in fields if not f.metadata.get("static", False)]
  meta = [f.name for f in fields if f.metadata.get("static", False)]
  if "shape" not in meta or "dtype" not in meta:
    raise TypeError(f"{cls.__name__} needs static `shape` and `dtype` fields")
  jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=meta)
  name = cls.__name__
  if name in _REGISTRY and _REGISTRY[name] is not cls:
    raise TypeError(f"a compressed leaf named {name} is already registered")
  _REGISTRY[name] = cls
  return cls


def leaf_type(name: str) -> type:
  """The registered compressed-leaf class called ``name`` (for loading)."""
  try:
    return _REGISTRY[name]
  except KeyError:
    raise ValueError(f"unknown compressed leaf type {name!r}; known: "
                     f"{sorted(_REGISTRY)}") from None


def is_compressed(x) -> bool:
  """True if ``x`` is a compressed leaf node (a :class:`CompressedLeaf`)."""
  return isinstance(x, CompressedLeaf)


def materialize(tree):
  """Replace every compressed leaf in ``tree`` with its dense array."""
  return jax.tree_util.tree_map(
      lambda x: x.materialize() if is_compressed(x) else x, tree,
      is_leaf=is_compressed)


def storage_bits(x) -> int:
  """Payload bits of a leaf: a compressed node's own count, or dense bits."""
  if is_compressed(x):
    return int(x.storage_bits())
  return int(np.prod(np.shape(x), dtype=np.int64)) * jnp.dtype(x.dtype).itemsize * 8
