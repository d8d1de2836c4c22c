"""Compressed leaves: small pytree nodes that stand in for a dense array.

A compressed leaf (quantized codes plus scales, a codebook, a pruning mask,
low-rank factors, ...) is a frozen dataclass registered as a JAX pytree node.
Its *data* fields are arrays (or other compressed leaves) and travel through
``jit``/``vmap``/``grad``; its *meta* fields are static, JSON-able Python
values (ints, floats, strings, bools, tuples of those). Each node:

* materializes itself as the dense array it stands for (:meth:`materialize`),
* knows its exact storage size in bits before entropy coding
  (:meth:`storage_bits`), and
* is registered under a namespaced, versioned name (``compressax.QuantizedArray``
  version 1; ``module.QualName`` for user classes) so that
  :func:`compressax.save` can write it and :func:`compressax.load` can rebuild
  it without pickle, and
* declares how files store it (:func:`compressed_leaf`'s ``sparse_mask`` and
  ``pointwise``; a ``_cx_groups`` hook) and checks loaded data against its
  meta (:meth:`~CompressedLeaf.validate`). Nothing is guessed from field names.

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
from typing import TYPE_CHECKING, Any, Callable, ClassVar, TypeVar, overload

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:  # annotations only: no runtime dependency
  from typing_extensions import TypeIs

_T = TypeVar("_T")

_REGISTRY: dict[str, type] = {}


class CompressedLeaf:
  """Base class of compressed leaf nodes (see the module docstring)."""

  # Every registered subclass is a dataclass (compressed_leaf checks) with
  # static fields `shape` and `dtype`, the dense array's; compressax.save
  # writes the dtype by name. Annotations only: no fields, no attributes here.
  __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]
  shape: tuple[int, ...]
  dtype: Any

  def materialize(self) -> jax.Array:
    """The dense array this node stands for, in its original shape and dtype."""
    raise NotImplementedError

  def storage_bits(self) -> int:
    """Exact payload size in bits before entropy coding (a Python int)."""
    raise NotImplementedError

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64))

  def validate(self) -> None:
    """Checks concrete data against the meta; ``ValueError`` if they disagree.

    :func:`compressax.load` calls it on every node it rebuilds, so a file
    whose manifest lies about a shape or a bit width is refused (as a
    ``CorruptFileError`` naming the leaf). Never called under tracing: nodes
    rebuilt by JAX hold tracers or placeholders. Subclasses extend it
    (calling ``super().validate()``).
    """
    shape = self.shape
    if not isinstance(shape, tuple) or not all(
        isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0
        for d in shape):
      raise ValueError(f"shape must be a tuple of non-negative ints, got {shape!r}")
    try:
      np.dtype(self.dtype)
    except TypeError:
      raise ValueError(f"bad dtype {self.dtype!r}") from None

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


def check_codes(codes, shape, *, bits=None, table: int | None = None,
                what: str = "entries") -> np.ndarray:
  """For ``validate()``: integer codes of the dense ``shape`` that fit.

  ``bits``: unsigned codes below ``2**bits``; ``table``: codes indexing a
  table of that many ``what`` (centroids, points). Returns the codes as NumPy.
  """
  codes = np.asarray(codes)
  kind = np.unsignedinteger if bits is not None else np.integer
  if codes.shape != tuple(shape) or not np.issubdtype(codes.dtype, kind):
    raise ValueError(f"codes must be {'unsigned ' if bits is not None else ''}"
                     f"ints of shape {tuple(shape)}, got "
                     f"{codes.dtype}{list(codes.shape)}")
  if bits is not None and codes.size and int(codes.max()) >> int(bits):
    raise ValueError(f"a code does not fit in {bits} bits")
  if table is not None and codes.size and (
      int(codes.min()) < 0 or int(codes.max()) >= table):
    raise ValueError(f"codes must index {table} {what}")
  return codes


@overload
def compressed_leaf(cls: type[_T], *, name: str | None = ..., version: int = ...,
                    sparse_mask: str | None = ...,
                    pointwise: tuple[str, ...] = ...) -> type[_T]: ...


@overload
def compressed_leaf(cls: None = ..., *, name: str | None = ...,
                    version: int = ..., sparse_mask: str | None = ...,
                    pointwise: tuple[str, ...] = ...
                    ) -> Callable[[type[_T]], type[_T]]: ...


def compressed_leaf(cls=None, *, name: str | None = None,
                    version: int = 1, sparse_mask: str | None = None,
                    pointwise: tuple[str, ...] = ()) -> Any:  # typed by the overloads
  """Class decorator: register a frozen dataclass as a compressed leaf node.

  Use it bare (``@cx.compressed_leaf``) or with options
  (``@cx.compressed_leaf(name="mypkg.Pruned", sparse_mask="keep")``).

  Args:
    cls: the class (when used bare).
    name: the name files record for the class; default
      ``f"{cls.__module__}.{cls.__qualname__}"``. The library's own classes are
      ``"compressax.<ClassName>"``. Registering a new class under a name
      already taken replaces the old one (a notebook cell run again); two
      packages can each have a ``QuantizedArray`` under their own names.
    version: the storage version of the class (a positive int), recorded in
      files. Bump it when the class's fields change meaning; :func:`load`
      refuses a file node whose version is newer than the registered class's.
    sparse_mask: the name of a bool data field of the dense shape wherever
      ``False`` the node's :meth:`materialize` ignores its ``pointwise``
      fields (the node is pruned there). Files then store those fields at the
      kept positions only and restore zeros elsewhere. Without it every field
      is stored exactly, whatever its name.
    pointwise: data fields of the dense shape whose element ``i`` affects only
      element ``i`` of :meth:`materialize` (quantization codes, a masked
      node's value). Inside an enclosing ``sparse_mask`` they are stored at
      the kept positions only; a nested node in such a field passes the mask
      on to its own pointwise fields.

  Integer codes with one bit width per group of elements are declared with a
  method ``_cx_groups(self) -> {field: (group_size, widths_field)}`` (see
  ``compressax.io._grouped``).
  """
  if cls is None:
    return lambda c: compressed_leaf(c, name=name, version=version,
                                     sparse_mask=sparse_mask,
                                     pointwise=pointwise)
  if not (isinstance(cls, type) and issubclass(cls, CompressedLeaf)):
    raise TypeError(f"{cls!r} must subclass compressax.CompressedLeaf")
  if not dataclasses.is_dataclass(cls):
    raise TypeError(f"{cls.__name__} must be a dataclass")
  fields = dataclasses.fields(cls)
  data = [f.name for f in fields if not f.metadata.get("static", False)]
  meta = [f.name for f in fields if f.metadata.get("static", False)]
  if "shape" not in meta or "dtype" not in meta:
    raise TypeError(f"{cls.__name__} needs static `shape` and `dtype` fields")
  name = f"{cls.__module__}.{cls.__qualname__}" if name is None else name
  if not isinstance(name, str) or not name:
    raise TypeError(f"{cls.__name__}: name must be a non-empty string, got {name!r}")
  if isinstance(version, bool) or not isinstance(version, int) or version < 1:
    raise TypeError(f"{cls.__name__}: version must be a positive int, got {version!r}")
  pointwise = tuple(pointwise)
  for f in ((sparse_mask,) if sparse_mask is not None else ()) + pointwise:
    if f not in data:
      raise TypeError(f"{cls.__name__}: {f!r} is not a data field (have {data})")
  jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=meta)
  # Set on the class itself (not inherited through `vars`): an unregistered
  # subclass of a registered class is not taken for it.
  for attr, value in (("_cx_name", name), ("_cx_version", version),
                      ("_cx_sparse_mask", sparse_mask), ("_cx_pointwise", pointwise)):
    setattr(cls, attr, value)  # read back with _own (vars), never inherited
  _REGISTRY[name] = cls
  return cls


def _own(cls, attr, default=None):
  return vars(cls).get(attr, default)


def leaf_name(cls: type) -> str:
  """The name files record for a registered compressed-leaf class.

  A class replaced under its name (a notebook cell run again) keeps it, so
  nodes made before the re-run still save; they load as the new class.
  """
  name = _own(cls, "_cx_name")
  if name is None:
    raise TypeError(f"{cls.__qualname__} is not registered with "
                    "compressax.compressed_leaf (a subclass of a registered "
                    "class needs its own registration)")
  return name


def leaf_version(cls: type) -> int:
  """The storage version a registered class was declared with."""
  return int(_own(cls, "_cx_version", 1))


def leaf_storage(cls: type) -> tuple[str | None, tuple[str, ...]]:
  """``(sparse_mask, pointwise)`` as declared to :func:`compressed_leaf`."""
  return _own(cls, "_cx_sparse_mask"), _own(cls, "_cx_pointwise", ())


def leaf_type(name: str) -> type:
  """The registered compressed-leaf class called ``name`` (for loading).

  A bare name from a file of format version 2 (``"QuantizedArray"``) means
  the library's ``"compressax.QuantizedArray"``, else the one registered
  class whose name ends in ``"." + name``.
  """
  if name in _REGISTRY:
    return _REGISTRY[name]
  if isinstance(name, str) and "." not in name:
    if "compressax." + name in _REGISTRY:
      return _REGISTRY["compressax." + name]
    found = [k for k in _REGISTRY if k.endswith("." + name)]
    if len(found) == 1:
      return _REGISTRY[found[0]]
    if found:
      raise ValueError(f"compressed leaf type {name!r} is ambiguous: "
                       f"{sorted(found)}")
  raise ValueError(f"unknown compressed leaf type {name!r}; known: "
                   f"{sorted(_REGISTRY)}")


def is_compressed(x) -> TypeIs[CompressedLeaf]:
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
