"""DiffQ's final, true quantization into :class:`DiffQArray` nodes.

References:
  Défossez, Adi, Synnaeve, *Differentiable Model Compression via
  Pseudo Quantization Noise*, 2021. https://arxiv.org/abs/2104.09987
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from compressax import _checks
from compressax._node import CompressedLeaf
from compressax._node import compressed_leaf
from compressax.diffq import _bits
from compressax.diffq import _size

__all__ = ["DiffQArray", "quantize"]


@compressed_leaf(name="compressax.DiffQArray", pointwise=("codes",))
@dataclasses.dataclass(frozen=True)
class DiffQArray(CompressedLeaf):
  """A tensor quantized by DiffQ: per-group bit widths, one range per tensor.

  Weight ``w`` in a group of ``b`` bits is stored as the level
  ``round((w - lo) / (hi - lo) * (2^b - 1))`` and read back as
  ``lo + level * (hi - lo) / (2^b - 1)``.

  Attributes:
    codes: uint16 levels, the dense shape.
    bits: uint8 ``(n_groups,)`` bit widths in [1, 15].
    lo, hi: float32 scalars, the tensor's min and max.
    shape, dtype: the dense array's (static).
    group_size: weights per group in flattened order, 0 = one group (static).

  :meth:`storage_bits`: the sum over groups of (weights in the group) x
  (its bits), plus 4 bits per group for its width, plus 64 for ``lo``/``hi``;
  the same accounting as ``model_size(..., exact=True)``.
  """
  codes: jax.Array
  bits: jax.Array
  lo: jax.Array
  hi: jax.Array
  shape: tuple = dataclasses.field(metadata=dict(static=True))
  dtype: np.dtype = dataclasses.field(metadata=dict(static=True))
  group_size: int = dataclasses.field(metadata=dict(static=True))

  def step(self) -> jax.Array:
    """Per-weight step ``(hi - lo) / (2^b - 1)``, float32, the dense shape."""
    return (self.hi - self.lo) / _top(self.bits, self.shape, self.group_size)

  def materialize(self) -> jax.Array:
    dense = self.lo + self.codes.astype(jnp.float32) * self.step()
    return dense.astype(self.dtype)

  def _cx_groups(self):
    """For ``cx.io``: pack each group of ``codes`` at its own width in ``bits``."""
    return {"codes": (self.group_size, "bits")}

  def validate(self) -> None:
    """Codes of the dense shape within their group's width in [1, 15]."""
    super().validate()
    g = self.group_size
    if isinstance(g, bool) or not isinstance(g, int) or g < 0:
      raise ValueError(f"group_size must be an int >= 0, got {g!r}")
    codes, bits = np.asarray(self.codes), np.asarray(self.bits)
    if codes.shape != tuple(self.shape) or not np.issubdtype(codes.dtype, np.unsignedinteger):
      raise ValueError(f"codes must be unsigned ints of shape {tuple(self.shape)}, "
                       f"got {codes.dtype}{list(codes.shape)}")
    counts = _bits.group_counts(self.size, g) if self.size or not g \
        else np.zeros(0, np.int64)
    if bits.shape != counts.shape or not np.issubdtype(bits.dtype, np.integer):
      raise ValueError(f"bits must be ints of shape {counts.shape}, got "
                       f"{bits.dtype}{list(bits.shape)}")
    if bits.size and (int(bits.min()) < 1 or int(bits.max()) > _bits.MAX_BITS):
      raise ValueError(f"bits must be in [1, {_bits.MAX_BITS}]")
    top = np.repeat((1 << bits.astype(np.int64)) - 1, counts)
    if codes.size and (codes.reshape(-1).astype(np.int64) > top).any():
      raise ValueError("a code does not fit its group's bit width")
    for name in ("lo", "hi"):
      v = np.asarray(getattr(self, name))
      if v.shape != () or not np.issubdtype(v.dtype, np.floating):
        raise ValueError(f"{name} must be a float scalar, got {v.dtype}{list(v.shape)}")

  def storage_bits(self) -> int:
    counts = _bits.group_counts(self.size, self.group_size)
    payload = int(np.sum(counts * np.asarray(self.bits, np.int64)))
    return payload + _size.WIDTH_BITS * counts.shape[0] + _size.RANGE_BITS


def _top(bits, shape, group_size) -> jax.Array:
  """Per-weight ``2^b - 1`` as exact float32 (``exp2`` may be off by an ulp)."""
  top = jnp.left_shift(jnp.int32(1), bits.astype(jnp.int32)) - 1
  return _bits.expand(top, shape, group_size).astype(jnp.float32)


# Jitted so that eager and jitted callers run the same compiled arithmetic.
@functools.partial(jax.jit, static_argnames=("group_size",))
def _quantize_leaf(x, logit, b_min, b_max, *, group_size) -> DiffQArray:
  bits = jnp.clip(jnp.round(_bits.logit_bits(logit, b_min, b_max)), 1, _bits.MAX_BITS)
  w = x.astype(jnp.float32)
  lo, hi = jnp.min(w), jnp.max(w)
  # A constant tensor has no range: every level is 0 and reads back as lo.
  span = jnp.where(hi > lo, hi - lo, 1.0)
  top = _top(bits, x.shape, group_size)
  levels = jnp.clip(jnp.round((w - lo) / span * top), 0.0, top)
  return DiffQArray(codes=levels.astype(jnp.uint16), bits=bits.astype(jnp.uint8),
                    lo=lo, hi=hi, shape=tuple(x.shape), dtype=np.dtype(x.dtype),
                    group_size=group_size)


def quantize(params, logits, *, group_size: int = 16, b_min: float = 2,
             b_max: float = 15) -> Any:
  """DiffQ's final quantization: each quantized leaf -> a :class:`DiffQArray`.

  Bits are ``round(b_min + sigmoid(logit) * (b_max - b_min))`` clamped to
  [1, 15]; levels are ``round((w - min) / (max - min) * (2^bits - 1))`` with
  the min and max of the whole tensor and each group's own bit width. The
  reconstruction error of a weight is at most half its group's step.

  Args:
    params: the parameter pytree.
    logits: bit logits from :func:`init_logits` (empty leaves pass through).
    group_size, b_min, b_max: as given to :func:`init_logits`.

  Returns:
    A pytree like ``params`` with :class:`DiffQArray` nodes at quantized
    leaves and the other leaves as the same objects. Jit-able.

  Raises:
    ValueError: mismatched trees or logit counts, NaN/Inf weights or a
      concrete NaN logit (naming the leaf path), a bad ``group_size`` or
      bounds. A traced NaN logit gives its group ``b_max`` bits (never 0).

  References:
    Défossez et al., *DiffQ*, 2021. https://arxiv.org/abs/2104.09987
  """
  group_size = _bits.check_group_size(group_size)
  _bits.check_bounds(b_min, b_max)
  treedef, triples = _bits.zip_logits(params, logits)
  out = []
  for path, x, logit in triples:
    if not _bits.is_quantized(path, x, logit, group_size):
      out.append(x)
      continue
    _checks.check_finite(path, x)
    out.append(_quantize_leaf(jnp.asarray(x), logit, b_min, b_max,
                              group_size=group_size))
  return jax.tree_util.tree_unflatten(treedef, out)
