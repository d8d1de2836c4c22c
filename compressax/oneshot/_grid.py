"""The zero-point grid of GPTQ's reference code, RTN on it, and its stored node.

One grid serves GPTQ, SparseGPT's joint mode and the round-to-nearest (RTN)
baseline, so their codes are comparable:

* per output column (a column of a Flax kernel ``(d_in, d_out)``), over one
  group of ``group_size`` consecutive input rows, or over all rows;
* asymmetric: ``lo = min(min w, 0)``, ``hi = max(max w, 0)`` (the range is
  widened to contain 0), ``scale = (hi - lo) / (2^b - 1)``, integer
  ``zero = round(-lo / scale)``; a column of zeros takes ``[-1, 1]``;
* symmetric: ``hi = max(|lo|, hi)``, ``lo = -hi``, ``zero = 2^(b-1)``;
* ``code = clip(round(w / scale) + zero, 0, 2^b - 1)`` (round half to even),
  ``w_hat = scale * (code - zero)``. Since ``zero`` is an integer code, 0 is
  exactly on the grid: ``code = zero`` dequantizes to ``0.0``.

Arithmetic is float32 (float64 for float64 weights). The symmetric grid
differs from the reference code in one corner: a column with no negative value
keeps ``lo = 0`` there (its positive half then clips at ``hi / 2``); here
``lo = -hi`` always.

References:
  Frantar, Ashkboos, Hoefler, Alistarh. *GPTQ: Accurate Post-Training
  Quantization for Generative Pre-trained Transformers*. ICLR 2023.
  https://arxiv.org/abs/2210.17323
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Literal, overload

import jax
import jax.numpy as jnp
import numpy as np

from compressax import _checks
from compressax import _node

__all__ = ["GroupQuantizedArray", "rtn"]


def compute_dtype(dtype) -> np.dtype:
  """float64 for float64 weights, float32 for every other float."""
  return np.dtype(np.float64 if np.dtype(dtype) == np.float64 else np.float32)


def code_dtype(bits: int) -> np.dtype:
  return np.dtype(np.uint8 if bits <= 8 else np.uint16)


def find_grid(x, bits: int, symmetric: bool):
  """``(scale, zero)`` per column of ``x`` (rows, cols), both ``x.dtype``."""
  maxq = float(2 ** bits - 1)
  lo = jnp.minimum(jnp.min(x, axis=0), 0.0)
  hi = jnp.maximum(jnp.max(x, axis=0), 0.0)
  if symmetric:
    hi = jnp.maximum(-lo, hi)
    lo = -hi
  empty = (lo == 0) & (hi == 0)
  lo = jnp.where(empty, -1.0, lo)
  hi = jnp.where(empty, 1.0, hi)
  scale = (hi - lo) / maxq
  if symmetric:
    zero = jnp.full_like(scale, float(2 ** (bits - 1)))
  else:
    zero = jnp.clip(jnp.round(-lo / scale), 0.0, maxq)
  return scale, zero


def quantize(x, scale, zero, bits: int):
  """``(codes, x_hat)`` of ``x`` on the grid, codes as floats."""
  maxq = float(2 ** bits - 1)
  code = jnp.clip(jnp.round(x / scale) + zero, 0.0, maxq)
  return code, scale * (code - zero)


def dequantize(codes, scale, zero, bits: int, symmetric: bool, group_size,
               group_index, dtype):
  """The dense array of a :class:`GroupQuantizedArray`'s fields."""
  d_in = codes.shape[0]
  if group_index.size:
    g = group_index
  elif group_size is None:
    g = np.zeros(d_in, np.int32)
  else:
    g = np.arange(d_in, dtype=np.int32) // group_size
  s = scale[g]
  if symmetric:
    z = jnp.full_like(s, float(2 ** (bits - 1)))
  else:
    z = zero[g].astype(scale.dtype)
  return (s * (codes.astype(scale.dtype) - z)).astype(dtype)


_dequantize_jit = jax.jit(dequantize, static_argnums=(3, 4, 5, 7))


@_node.compressed_leaf(name="compressax.GroupQuantizedArray", pointwise=("codes",))
@dataclasses.dataclass(frozen=True)
class GroupQuantizedArray(_node.CompressedLeaf):
  """A kernel on GPTQ's zero-point grid: integer codes, per-group scale and zero.

  Flax layout: the dense array is a kernel ``(d_in, d_out)``; a group is
  ``group_size`` input rows of one output column (all rows when
  ``group_size`` is None).

  Attributes:
    codes: ``uint8`` (``uint16`` above 8 bits), the kernel's shape, in its
      row order.
    scale: float32 (float64 for float64 kernels), ``(n_groups, d_out)``.
    zero: integer zero points, ``codes.dtype``, ``(n_groups, d_out)``, or
      float zero points of ``scale``'s dtype (HQQ); empty ``(0,)`` for a
      symmetric grid (the zero point is ``2^(bits-1)``).
    group_index: ``int32 (d_in,)``, the group of each input row, when the
      groups are not consecutive rows (GPTQ with act-order and groups, where
      groups follow the processing order); empty ``(0,)`` otherwise.
    bits, group_size, symmetric, shape, dtype: static.

  ``materialize()`` is ``scale[g] * (codes - zero[g])`` with ``g`` the row's
  group, bit for bit the weights GPTQ/RTN computed.
  """

  codes: jax.Array
  scale: jax.Array
  zero: jax.Array
  group_index: jax.Array
  bits: int = dataclasses.field(metadata=dict(static=True))
  group_size: int | None = dataclasses.field(metadata=dict(static=True))
  symmetric: bool = dataclasses.field(metadata=dict(static=True))
  shape: tuple = dataclasses.field(metadata=dict(static=True))
  dtype: np.dtype = dataclasses.field(metadata=dict(static=True))

  def materialize(self) -> jax.Array:
    """The dequantized kernel, in its original row order and dtype."""
    return _dequantize_jit(self.codes, self.scale, self.zero, int(self.bits),
                           bool(self.symmetric), self.group_size,
                           self.group_index, np.dtype(self.dtype))

  def validate(self) -> None:
    """Codes of the kernel's shape within ``bits``; groups that fit the rows."""
    super().validate()
    bits, gs = self.bits, self.group_size
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) \
        or not 1 <= bits <= 16:
      raise ValueError(f"bits must be an int in [1, 16], got {bits!r}")
    if gs is not None and (isinstance(gs, bool) or not isinstance(gs, int) or gs < 1):
      raise ValueError(f"group_size must be None or an int >= 1, got {gs!r}")
    shape = tuple(self.shape)
    if len(shape) != 2:
      raise ValueError(f"a kernel (d_in, d_out) is 2-D, got shape {shape}")
    d_in, d_out = shape
    _node.check_codes(self.codes, shape, bits=bits)
    index = np.asarray(self.group_index)
    n_groups = 1 if gs is None else -(-d_in // gs)
    if index.size:
      n_groups = int(index.max()) + 1 if index.shape == (d_in,) else -1
      if n_groups < 1 or int(index.min()) < 0:
        raise ValueError(f"group_index must hold a group >= 0 per input row "
                         f"({d_in}), got shape {index.shape}")
    if tuple(np.shape(self.scale)) != (n_groups, d_out):
      raise ValueError(f"scale must have shape {(n_groups, d_out)}, got "
                       f"{tuple(np.shape(self.scale))}")
    zshape = (0,) if self.symmetric else (n_groups, d_out)
    if tuple(np.shape(self.zero)) != zshape:
      raise ValueError(f"zero must have shape {zshape}, got "
                       f"{tuple(np.shape(self.zero))}")

  def storage_bits(self) -> int:
    """``bits`` per code and per integer zero point, 32 (or 64) per scale
    and float zero point, ``ceil(log2 n_groups)`` per ``group_index`` entry."""
    n_groups = int(np.shape(self.scale)[0])
    index_bits = max(1, (n_groups - 1).bit_length())
    zdt = np.dtype(self.zero.dtype)
    zero_bits = int(self.bits) if np.issubdtype(zdt, np.integer) else 8 * zdt.itemsize
    return (int(np.size(self.codes)) * int(self.bits)
            + int(np.size(self.zero)) * zero_bits
            + int(np.size(self.scale)) * 8 * np.dtype(self.scale.dtype).itemsize
            + int(np.size(self.group_index)) * index_bits)


def check_bits(path, bits) -> int:
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
    _checks.fail(path, f"bits must be a Python int in [1, 16] (it decides the "
                       f"codes' dtype), got {bits!r}", TypeError)
  _checks.check_bits(path, bits)
  return int(bits)


@overload
def check_positive(path, name: str, v, *, optional: Literal[False] = ...) -> int: ...


@overload
def check_positive(path, name: str, v, *, optional: bool) -> int | None: ...


def check_positive(path, name: str, v, *, optional: bool = False) -> int | None:
  if v is None and optional:
    return None
  if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
    _checks.fail(path, f"{name} must be a positive Python int"
                       f"{' or None' if optional else ''}, got {v!r}")
  return int(v)


def check_kernel(path, w):
  """A finite floating 2-D kernel ``(d_in, d_out)``."""
  _checks.check_floating(path, w)
  if np.ndim(w) != 2:
    _checks.fail(path, f"expected a 2-D kernel (d_in, d_out), got shape "
                       f"{tuple(np.shape(w))}; reshape conv kernels to "
                       "(prod(spatial) * d_in, d_out) first")
  if 0 in np.shape(w):
    _checks.fail(path, f"cannot compress an empty kernel of shape {np.shape(w)}")
  _checks.check_finite(path, w)


def rtn(w, *, bits: int, group_size: int | None = None, symmetric: bool = False,
        path: Any = "w") -> GroupQuantizedArray:
  """Round-to-nearest on GPTQ's grid: the calibration-free baseline.

  Each weight is rounded on its own, on the same per-column (or per-group)
  zero-point grid GPTQ uses, so ``rtn`` and :func:`gptq` differ only in the
  error compensation.

  Args:
    w: a kernel ``(d_in, d_out)`` (Flax layout, ``y = x @ w``).
    bits: bits per weight, a Python int in ``[1, 16]``.
    group_size: input rows per grid (None: one grid per output column).
    symmetric: symmetric grid around an exact zero (see the module notes).
    path: the leaf's path, for error messages.

  Returns:
    A :class:`GroupQuantizedArray`.

  Raises:
    ValueError: bad bits or group size, a non-2-D kernel, NaN/Inf weights.

  Example:
    >>> w = jax.random.normal(jax.random.key(0), (128, 64))  # (d_in, d_out)
    >>> node = cx.oneshot.rtn(w, bits=4, group_size=64)

  References:
    Frantar et al. 2023 (the RTN baseline of Table 3).
    https://arxiv.org/abs/2210.17323
  """
  check_kernel(path, w)
  bits = check_bits(path, bits)
  group_size = check_positive(path, "group_size", group_size, optional=True)
  codes, scale, zero = _rtn_jit(w, bits, group_size, bool(symmetric))
  return GroupQuantizedArray(
      codes=codes, scale=scale,
      zero=jnp.zeros((0,), codes.dtype) if symmetric else zero,
      group_index=jnp.zeros((0,), jnp.int32), bits=bits, group_size=group_size,
      symmetric=bool(symmetric), shape=tuple(w.shape), dtype=np.dtype(w.dtype))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _rtn_jit(w, bits, group_size, symmetric):
  d_in, d_out = w.shape
  x = w.astype(compute_dtype(w.dtype))
  gs = d_in if group_size is None else group_size
  n_groups = math.ceil(d_in / gs)
  # Zero rows cannot move a range that always contains 0.
  padded = jnp.pad(x, ((0, n_groups * gs - d_in), (0, 0))).reshape(n_groups, gs, d_out)
  scale, zero = jax.vmap(lambda g: find_grid(g, bits, symmetric))(padded)
  code, _ = quantize(padded, scale[:, None, :], zero[:, None, :], bits)
  dt = code_dtype(bits)
  codes = code.reshape(n_groups * gs, d_out)[:d_in].astype(dt)
  return codes, scale, zero.astype(dt)
