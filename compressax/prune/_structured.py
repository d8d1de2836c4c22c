"""Structured pruning: whole output channels by norm, and physical shrinking."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from compressax import _checks
from compressax import _sharding
from compressax._select import is_leaf
from compressax._select import is_skip
from compressax._select import path_str
from compressax.prune import _leaves
from compressax.prune import _rank
from compressax.prune._mask import apply_mask

__all__ = ["channel_mask", "shrink"]


def _channel_keep(path, x, sparsity, norm: str, axis: int):
  x = _leaves.dense_value(path, x)
  ax = _checks.check_axis(path, axis, x.ndim)
  # The norms are float sums: on a gathered copy they add in the unsharded
  # order, so the mask is the same on every mesh.
  keep, full = _channel_core(_sharding.replicated(x), jnp.asarray(
      _rank.kept_count(x.shape[ax], sparsity), jnp.int32), norm, ax)
  return keep, _sharding.like(full, x)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _channel_core(x, k, norm: str, ax: int):
  moved = jnp.moveaxis(x, ax, -1).astype(jnp.float32)
  flat = moved.reshape(-1, x.shape[ax])
  if norm == "l1":
    score = jnp.sum(jnp.abs(flat), axis=0)
  else:
    score = jnp.sqrt(jnp.sum(jnp.square(flat), axis=0))
  keys = lax.bitcast_convert_type(score, jnp.int32)
  c = x.shape[ax]
  keep = _rank.topk_masks([keys], k)[0]
  shape = [1] * x.ndim
  shape[ax] = c
  return keep, jnp.broadcast_to(keep.reshape(shape), x.shape)


def channel_mask(params, sparsity, *, norm: str = "l1", axis: int = -1,
                 where=None, include_bias: bool = True):
  """Keep whole output channels (neurons, filters) with the largest norm.

  For each selected leaf, the slices along ``axis`` (the output channels of
  linen/nnx Dense ``(in, out)`` and Conv ``(..., in, out)`` kernels for the
  default ``-1``) are scored by their L1 or L2 norm, and exactly
  ``c - floor(s * c)`` of the ``c`` channels are kept (ties: the lower channel
  index is kept). The mask has the leaf's full shape (constant along the other
  axes), so :func:`apply_mask`, :func:`mask_to_nodes` and
  :func:`sparsity_stats` treat it like any mask.

  With ``include_bias`` (and ``axis=-1``), an unselected sibling ``bias`` of
  shape ``(c,)`` (``.../kernel`` -> ``.../bias``) gets the channel mask too, so
  a pruned channel outputs exactly ``act(0)`` and :func:`shrink` can remove it.

  Args:
    params: a parameter pytree.
    sparsity: fraction of channels pruned, in ``[0, 1)``: scalar (may be
      traced), per-leaf pytree or path mapping, as for :func:`magnitude_mask`.
    norm: ``"l1"`` (Li et al. 2017) or ``"l2"``.
    axis: the output-channel axis of each selected leaf.
    where: which leaves (default: weight matrices and kernels).
    include_bias: also mask the matching biases.

  Returns:
    A mask pytree with full-shape ``bool`` arrays at the selected leaves (and
    their biases), 0-d ``True`` elsewhere.

  Raises:
    ValueError: sparsity outside ``[0, 1)``, bad axis, unknown norm, NaN/Inf.
    TypeError: integer leaves selected.

  References:
    Li, Kadav, Durdanovic, Samet, Graf, *Pruning Filters for Efficient
    ConvNets*, ICLR 2017, arXiv:1608.08710.
  """
  if norm not in ("l1", "l2"):
    raise ValueError(f"norm must be 'l1' or 'l2', got {norm!r}")
  treedef, pairs, flags = _leaves.flat_selection(params, where)
  sps = _leaves.per_leaf_sparsity(params, sparsity, pairs, flags)
  index = {path_str(p): i for i, (p, _) in enumerate(pairs)}
  leaves = [x if is_skip(x) else _leaves.keep_all() for _, x in pairs]
  j = 0
  for i, ((p, x), f) in enumerate(zip(pairs, flags)):
    if not f:
      continue
    keep, leaves[i] = _channel_keep(p, x, sps[j], norm, axis)
    j += 1
    path = path_str(p)
    if include_bias and axis in (-1, np.ndim(x) - 1) and path.endswith("kernel"):
      b = index.get(path[:-len("kernel")] + "bias")
      if b is not None and not flags[b] and np.shape(pairs[b][1]) == keep.shape:
        leaves[b] = _sharding.like(keep, pairs[b][1])
  return jax.tree_util.tree_unflatten(treedef, leaves)


def _natural_key(path: str):
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def _concrete(path, m) -> np.ndarray:
  if not _checks.is_concrete(m):
    _checks.fail(path, "shrink changes array shapes, so it needs concrete masks; "
                       "call it outside jit", TypeError)
  return np.asarray(m, bool)


def shrink(params, mask, *, layers=None):
  """Physically remove pruned output channels from a chain of Dense/Conv layers.

  For layer ``i`` of an MLP/CNN (kernel ``(..., in, out)``, optional bias
  ``(out,)``), an output channel is removed when its kernel column and its
  bias entry are all masked. The kernel's columns and the bias entries go, and
  so do the matching input rows (axis ``-2``) of layer ``i + 1``. When layer
  ``i + 1``'s input is a channels-last flatten of layer ``i``'s output
  (``in = k * out``, as after ``x.reshape(len(x), -1)`` on NHWC), the rows
  are removed at every spatial position. The last layer's outputs are never
  removed (the model's output shape is kept; masked entries stay zero).
  All other leaves get :func:`apply_mask`.

  The shrunk model computes the same function as ``apply_mask(params, mask)``
  for activations with ``act(0) = 0`` (ReLU, GELU, tanh, SiLU), since a removed
  channel outputs ``act(0)`` in the masked model.

  Args:
    params: a parameter pytree.
    mask: a mask pytree, typically from :func:`channel_mask`.
    layers: ordered ``/``-joined paths of the layers (the parents of
      ``kernel``/``bias``), e.g. ``["params/Dense_0", "params/Dense_1"]``.
      Default: every parent of a leaf named ``kernel``, in natural order
      (``Dense_2`` before ``Dense_10``).

  Returns:
    A params tree with the same structure and smaller arrays. Not jittable.

  Raises:
    ValueError: mask/params mismatch, a missing layer, or widths that do not
      chain.
    TypeError: traced masks.
  """
  masked = apply_mask(params, mask)
  pairs, treedef = jax.tree_util.tree_flatten_with_path(masked, is_leaf=is_leaf)
  m_leaves = jax.tree_util.tree_leaves(mask, is_leaf=is_leaf)
  index = {path_str(p): i for i, (p, _) in enumerate(pairs)}
  if layers is None:
    layers = sorted({path_str(p)[:-len("/kernel")] for p, _ in pairs
                     if path_str(p).endswith("/kernel")}, key=_natural_key)
  out = [x for _, x in pairs]
  prev_keep = None
  for li, layer in enumerate(layers):
    ki, bi = index.get(layer + "/kernel"), index.get(layer + "/bias")
    if ki is None:
      raise ValueError(f"shrink: no leaf {layer + '/kernel'!r} in the params")
    kpath, kernel = pairs[ki]
    kmask = np.broadcast_to(_concrete(kpath, m_leaves[ki]), np.shape(kernel))
    keep = kmask.reshape(-1, np.shape(kernel)[-1]).any(axis=0)
    if bi is not None:
      keep = keep | np.broadcast_to(_concrete(pairs[bi][0], m_leaves[bi]),
                                    keep.shape)
    if li == len(layers) - 1:
      keep = np.ones_like(keep)
    kernel = jnp.asarray(kernel)
    if prev_keep is not None:
      width = kernel.shape[-2]
      if width % prev_keep.size:
        _checks.fail(kpath, f"input width {width} does not chain with the "
                            f"previous layer's {prev_keep.size} outputs")
      rows = np.flatnonzero(np.tile(prev_keep, width // prev_keep.size))
      kernel = jnp.take(kernel, rows, axis=-2)
    out[ki] = jnp.take(kernel, np.flatnonzero(keep), axis=-1)
    if bi is not None:
      out[bi] = jnp.take(jnp.asarray(pairs[bi][1]), np.flatnonzero(keep), axis=-1)
    prev_keep = keep
  return jax.tree_util.tree_unflatten(treedef, out)
