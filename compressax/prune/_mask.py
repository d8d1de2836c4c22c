"""Applying masks, the ``MaskedArray`` compressed leaf, and sparsity statistics."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from compressax import _checks
from compressax import _sharding
from compressax._node import CompressedLeaf
from compressax._node import compressed_leaf
from compressax._node import is_compressed
from compressax._select import default_rule
from compressax._select import display_path
from compressax._select import is_leaf
from compressax._select import path_str
from compressax._select import select

__all__ = ["MaskedArray", "apply_mask", "mask_to_nodes", "sparsity_stats"]


@compressed_leaf(name="compressax.MaskedArray", sparse_mask="mask",
                 pointwise=("value",))
@dataclasses.dataclass(frozen=True)
class MaskedArray(CompressedLeaf):
  """A pruned leaf: values plus a keep-mask of the dense shape.

  Attributes:
    value: the dense array, or another compressed leaf (e.g. a quantized
      array) with the same dense shape. Pruned entries are ignored.
    mask: ``bool`` array of the dense shape (True = kept).
    shape: the dense shape (static).
    dtype: the dense dtype (static, ``numpy.dtype``).

  ``storage_bits()`` counts, for a dense ``value``, only the kept entries
  (``kept * bits of dtype``), for a compressed ``value`` its own
  ``storage_bits()``, plus the position index as a bitmap of one bit per
  dense entry. That is an upper bound on what a sparse format needs; the file
  writer (``cx.io``) may choose a cheaper index (e.g. relative gaps).
  Needs a concrete mask (call it outside ``jit``).
  """

  value: jax.Array | CompressedLeaf
  mask: jax.Array
  shape: tuple = dataclasses.field(metadata=dict(static=True))
  dtype: np.dtype = dataclasses.field(metadata=dict(static=True))

  def materialize(self) -> jax.Array:
    v = self.value.materialize() if is_compressed(self.value) else self.value
    return jnp.where(self.mask, jnp.asarray(v, self.dtype), 0).astype(self.dtype)

  def storage_bits(self) -> int:
    numel = int(np.prod(self.shape, dtype=np.int64))
    if is_compressed(self.value):
      value_bits = int(self.value.storage_bits())
    else:
      kept = int(np.count_nonzero(np.asarray(self.mask)))
      value_bits = kept * np.dtype(self.dtype).itemsize * 8
    return value_bits + numel

  def validate(self) -> None:
    """A bool mask and a value of the dense shape (or 0-d)."""
    super().validate()
    shape = tuple(self.shape)
    mask = np.asarray(self.mask)
    if mask.dtype != bool or mask.shape not in (shape, ()):
      raise ValueError(f"mask must be bool of shape {shape}, got "
                       f"{mask.dtype}{list(mask.shape)}")
    vshape = tuple(self.value.shape) if is_compressed(self.value) \
        else np.shape(self.value)
    if vshape not in (shape, ()):
      raise ValueError(f"value has shape {vshape}, the meta says {shape}")


def _check_mask_tree(params, mask):
  """Leaf pairs of two trees, or an error naming the first mismatched leaf."""
  p_pairs, p_def = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_leaf)
  m_pairs, m_def = jax.tree_util.tree_flatten_with_path(mask, is_leaf=is_leaf)
  if p_def == m_def:
    return p_pairs, [m for _, m in m_pairs], p_def
  m_paths = {path_str(p) for p, _ in m_pairs}
  p_paths = {path_str(p) for p, _ in p_pairs}
  for p, _ in p_pairs:
    if path_str(p) not in m_paths:
      _checks.fail(p, "the mask tree has no entry for this leaf (mask and "
                      "params trees differ)")
  for p, _ in m_pairs:
    if path_str(p) not in p_paths:
      _checks.fail(display_path(p, "mask"), "no such leaf in the params (mask "
                   "and params trees differ)")
  _checks.fail("mask", f"the mask tree does not match the params tree:\n"
                       f"  params: {p_def}\n  mask:   {m_def}")


def _leaf_mask(path, x, m):
  """Validate one mask leaf against its param leaf; return it as an array."""
  if isinstance(m, (bool, np.bool_)):
    m = np.asarray(m)
  dtype = getattr(m, "dtype", None)
  if dtype is None or np.dtype(dtype) != np.bool_:
    _checks.fail(path, f"mask must be bool, got {dtype or type(m).__name__}", TypeError)
  shape = tuple(np.shape(x))
  fits = m.ndim == len(shape) and all(a in (1, b) for a, b in zip(m.shape, shape))
  if m.ndim and not fits:
    _checks.fail(path, f"mask of shape {m.shape} does not fit a leaf of shape {shape}")
  return m


def _is_keep_all(m) -> bool:
  return m.ndim == 0 and _checks.is_concrete(m) and bool(np.asarray(m))


def apply_mask(params, mask):
  """Zero the pruned weights: ``where(mask, w, 0)`` leaf by leaf.

  A 0-d ``True`` mask leaf keeps the leaf as the very same object; a 0-d
  traced or ``False`` one applies to the whole leaf. Array masks must have the
  leaf's rank and broadcast to its shape. A compressed leaf (e.g. a quantized
  array) under an array mask becomes a :class:`MaskedArray` around it.

  Args:
    params: a parameter pytree.
    mask: a ``bool`` pytree with the params' structure (e.g. from
      :func:`magnitude_mask`).

  Returns:
    The masked params, same structure and dtypes.

  Raises:
    ValueError: mask and params trees differ (the first differing leaf is
      named) or a mask does not fit its leaf.
    TypeError: a non-bool mask leaf.
  """
  pairs, m_leaves, treedef = _check_mask_tree(params, mask)
  out = []
  for (p, x), m in zip(pairs, m_leaves):
    m = _leaf_mask(p, x, m)
    if _is_keep_all(m):
      out.append(x)
    elif is_compressed(x):
      out.append(MaskedArray(x, jnp.broadcast_to(m, x.shape), tuple(x.shape),
                             np.dtype(x.dtype)))
    else:
      # A mask in another layout (e.g. built unsharded) must not move x.
      out.append(_sharding.like(jnp.where(m, x, jnp.zeros((), x.dtype)), x))
  return jax.tree_util.tree_unflatten(treedef, out)


def mask_to_nodes(params, mask):
  """Replace each leaf with an array mask by a :class:`MaskedArray` node.

  Leaves whose mask is a 0-d ``True`` pass through unchanged. Pruned values
  are zeroed in the node's ``value`` (a compressed ``value`` is kept as is),
  so saving a node never leaks the pruned weights.

  Args:
    params: a parameter pytree.
    mask: a ``bool`` pytree with the params' structure.

  Returns:
    The params tree with :class:`MaskedArray` at masked leaves.

  Raises:
    ValueError, TypeError: as :func:`apply_mask`.
  """
  pairs, m_leaves, treedef = _check_mask_tree(params, mask)
  out = []
  for (p, x), m in zip(pairs, m_leaves):
    m = _leaf_mask(p, x, m)
    if _is_keep_all(m) or m.ndim == 0:
      out.append(x if _is_keep_all(m) else apply_mask(x, m))
      continue
    full = jnp.broadcast_to(m, x.shape)
    if not is_compressed(x):
      full = _sharding.like(full, x)  # the node's mask: the leaf's sharding
    value = x if is_compressed(x) else jnp.where(full, x, jnp.zeros((), x.dtype))
    out.append(MaskedArray(value, full, tuple(x.shape), np.dtype(x.dtype)))
  return jax.tree_util.tree_unflatten(treedef, out)


def _stats(size: int, kept: int) -> dict:
  return {"size": size, "kept": kept,
          "sparsity": 0.0 if size == 0 else 1.0 - kept / size}


def sparsity_stats(tree, *, where=None) -> dict:
  """Sizes, kept counts and sparsities, per leaf and overall.

  Works on a mask tree (``bool`` leaves: kept = True entries), on params
  (numeric leaves: kept = nonzero entries) and on trees holding
  :class:`MaskedArray` nodes (kept = the node's mask). 0-d mask leaves
  (keep-all markers) carry no size and are left out. Needs concrete values.

  Args:
    tree: a mask or params pytree.
    where: which leaves to count. Default: every ``bool`` leaf of rank >= 1,
      every :class:`MaskedArray`, and the default rule (weight matrices and
      kernels) for numeric leaves.

  Returns:
    ``{"leaves": {path: {"size", "kept", "sparsity"}}, "global": {...}}`` with
    Python ints and floats; paths are ``/``-joined.
  """
  def default(path, x):
    if isinstance(x, MaskedArray):
      return True
    if np.dtype(getattr(x, "dtype", np.float32)) == np.bool_:
      return np.ndim(x) >= 1
    return default_rule(path, x)

  flags = select(tree, default if where is None else where)
  pairs = jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_leaf)
  leaves, size_all, kept_all = {}, 0, 0
  for (p, x), f in zip(pairs, jax.tree_util.tree_leaves(flags, is_leaf=is_leaf)):
    if not f:
      continue
    if isinstance(x, MaskedArray):
      size, kept = x.size, int(np.count_nonzero(np.asarray(x.mask)))
    else:
      size, kept = int(np.size(x)), int(np.count_nonzero(np.asarray(x)))
    leaves[path_str(p)] = _stats(size, kept)
    size_all += size
    kept_all += kept
  return {"leaves": leaves, "global": _stats(size_all, kept_all)}
