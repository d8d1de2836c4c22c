"""Polino's differentiable-quantization output, stored exactly.

:func:`compressax.quantize.nearest_point` quantizes a tensor onto a sorted
list of points in the bucket-scaled ``[0, 1]`` domain; after the points are
trained, :func:`quantize_points` stores the result as a
:class:`PointsArray`: integer codes into the tensor's points plus each
bucket's scale ``alpha`` and offset ``beta``.

References:
  Polino, Pascanu, Alistarh, *Model compression via distillation and
  quantization*, ICLR 2018. https://arxiv.org/abs/1802.05668
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from compressax import _checks
from compressax._node import CompressedLeaf
from compressax._node import check_codes
from compressax._node import compressed_leaf
# Shared with `nearest_point`, so that both assign every value to the same
# point and `materialize()` reproduces its forward pass bit for bit.
from compressax.quantize._codebook import _assign
from compressax.quantize._codebook import _check_bucket_size
from compressax.quantize._codebook import codes_dtype

__all__ = ["PointsArray", "quantize_points"]

_MAX_POINTS = 2 ** 16


@compressed_leaf(name="compressax.PointsArray", pointwise=("codes",))
@dataclasses.dataclass(frozen=True)
class PointsArray(CompressedLeaf):
  """Codes into per-tensor points in [0, 1], de-scaled per bucket.

  The flattened dense array is split into buckets of ``bucket_size`` values
  (the last one may be partial; ``None`` = one bucket). Value ``i``, in
  bucket ``b = i // bucket_size``, is ``points[codes[i]] * alpha[b] + beta[b]``.

  Attributes:
    codes: unsigned integer array of the dense shape (uint8 for up to 256
      points, uint16 above); ``codes[i]`` indexes ``points``.
    points: float32 ``(K,)``, sorted, in ``[0, 1]``.
    alpha: float32 ``(n_buckets,)``, each bucket's ``max - min`` (1 when
      below 1e-10).
    beta: float32 ``(n_buckets,)``, each bucket's ``min``.
    bucket_size: values per bucket, or ``None`` for one bucket (static).
    shape: the dense shape (static).
    dtype: the dense dtype (static).

  References:
    Polino, Pascanu, Alistarh, ICLR 2018. https://arxiv.org/abs/1802.05668
  """
  codes: jax.Array
  points: jax.Array
  alpha: jax.Array
  beta: jax.Array
  bucket_size: int | None = dataclasses.field(metadata=dict(static=True))
  shape: tuple = dataclasses.field(metadata=dict(static=True))
  dtype: np.dtype = dataclasses.field(metadata=dict(static=True))

  @property
  def n_points(self) -> int:
    """K, the number of points."""
    return int(self.points.shape[-1])

  @property
  def bits(self) -> int:
    """Bits per code: ``ceil(log2 K)`` (0 for a single point)."""
    return max(0, math.ceil(math.log2(self.n_points)))

  def materialize(self) -> jax.Array:
    """The dense array; equals ``nearest_point(x, points, bucket_size=...)``."""
    k = self.size if self.bucket_size is None else int(self.bucket_size)
    return _materialize_jit(self.codes, self.points, self.alpha, self.beta,
                            k, tuple(self.shape), np.dtype(self.dtype))

  def storage_bits(self) -> int:
    """``numel * ceil(log2 K) + 32 * (K + 2 * n_buckets)``.

    Each code in the fewest bits that index K points, plus the points and
    each bucket's ``alpha`` and ``beta`` in float32. Padding of the last
    bucket is not stored; entropy coding of the codes is not counted.
    """
    floats = int(self.points.size) + int(self.alpha.size) + int(self.beta.size)
    return self.size * self.bits + 32 * floats

  def validate(self) -> None:
    """Codes of the dense shape indexing ``points``; one alpha, beta per bucket."""
    super().validate()
    b = self.bucket_size
    if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 1):
      raise ValueError(f"bucket_size must be None or an int >= 1, got {b!r}")
    codes, pts = np.asarray(self.codes), np.asarray(self.points)
    if pts.ndim != 1 or not pts.size or not np.issubdtype(pts.dtype, np.floating):
      raise ValueError(f"points must be a non-empty 1-D float array, got "
                       f"{pts.dtype}{list(pts.shape)}")
    check_codes(codes, self.shape, table=pts.size, what="points")
    n = 1 if b is None else -(-self.size // b)
    for name in ("alpha", "beta"):
      v = np.asarray(getattr(self, name))
      if v.shape != (n,) or not np.issubdtype(v.dtype, np.floating):
        raise ValueError(f"{name} must be floats of shape ({n},), got "
                         f"{v.dtype}{list(v.shape)}")


# Compiled in both directions: XLA contracts `p * alpha + beta` into a fused
# multiply-add, so op-by-op (eager) execution could differ in the last bit
# from `nearest_point`, which always runs compiled.
@functools.partial(jax.jit, static_argnums=(4, 5, 6))
def _materialize_jit(codes, points, alpha, beta, k, shape, dtype):
  n = math.prod(shape)
  idx = jnp.pad(codes.reshape(-1).astype(jnp.int32), (0, -n % k))
  vals = points[idx.reshape(-1, k)] * alpha[:, None] + beta[:, None]
  return vals.reshape(-1)[:n].reshape(shape).astype(dtype)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _quantize_jit(x, points, bucket_size, code_dtype):
  idx, alpha, beta = _assign(x, points, bucket_size)
  codes = idx.reshape(-1)[:x.size].reshape(x.shape).astype(code_dtype)
  return codes, alpha[:, 0], beta[:, 0]


def _check_points(path, points) -> None:
  dtype = getattr(np.asarray(points) if isinstance(points, (list, tuple)) else points,
                  "dtype", None)
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    _checks.fail(path, f"points must be a floating-point array, got dtype {dtype}",
                 TypeError)
  shape = tuple(np.shape(points))
  if len(shape) != 1 or shape[0] < 1:
    _checks.fail(path, f"points must be a non-empty 1-D array, got shape {shape}")
  if shape[0] > _MAX_POINTS:
    _checks.fail(path, f"at most {_MAX_POINTS} points fit uint16 codes, got "
                       f"{shape[0]}")
  if not _checks.is_concrete(points):
    return
  p = np.asarray(points).astype(np.float64)
  if np.isnan(p).any():
    _checks.fail(path, f"points contain {int(np.isnan(p).sum())} NaN value(s)")
  if p.min() < 0.0 or p.max() > 1.0:
    _checks.fail(path, f"points must lie in [0, 1] (the bucket-scaled domain), "
                       f"got min {p.min()}, max {p.max()}")


def quantize_points(x, points, *, bucket_size: int | None = None,
                    path: Any = "x") -> PointsArray:
  """``x`` on its nearest ``points``, as a :class:`PointsArray` node.

  The same rule as :func:`compressax.quantize.nearest_point`: ``x`` is
  flattened and split into buckets of ``bucket_size`` values (the last one
  padded by repeating its last value, which changes no min or max). Each
  bucket is scaled by ``x' = (x - beta) / alpha`` with ``beta = min`` and
  ``alpha = max - min`` (1 when below 1e-10); each ``x'`` takes its nearest
  point (found through the midpoints of adjacent points; a value exactly
  halfway goes to the lower point). ``node.materialize()`` equals
  ``nearest_point(x, points, bucket_size=bucket_size)`` bit for bit.

  Unlike ``nearest_point``, concrete points must lie in ``[0, 1]`` (the
  domain of the scaled values; points in weight units are a likely mistake).
  Traced ``points`` (under ``jit``) cannot be checked and are used as given,
  after sorting.

  Args:
    x: a non-empty, finite floating-point array (may be traced).
    points: a 1-D float array of 1 to 65536 points in ``[0, 1]``; sorted here
      (the codes index the sorted points, which the node stores as float32).
    bucket_size: values per bucket (Polino uses 256), or ``None`` for one
      bucket over the whole tensor. Must be a Python int (it is static).
    path: the name used in error messages (e.g. the leaf's key path).

  Returns:
    A :class:`PointsArray` with ``x``'s shape and dtype; uint8 codes for up
    to 256 points, uint16 above.

  Raises:
    TypeError: ``x`` or ``points`` is not floating point.
    ValueError: ``x`` is empty or holds NaN/Inf; ``points`` is not a
      non-empty 1-D array, has more than 65536 entries, holds NaN or lies
      outside ``[0, 1]``; ``bucket_size`` is not ``None`` or an int >= 1.

  Example:
    >>> w = jax.random.normal(jax.random.key(0), (64, 32))
    >>> pts = cx.quantize.points_init(w, 16, method="quantiles", bucket_size=256)
    >>> node = cx.quantize.quantize_points(w, pts, bucket_size=256)
    >>> bool(jnp.array_equal(node.materialize(),
    ...                      cx.quantize.nearest_point(w, pts, bucket_size=256)))
    True

  References:
    Polino, Pascanu, Alistarh, *Model compression via distillation and
    quantization*, ICLR 2018. https://arxiv.org/abs/1802.05668
  """
  _checks.check_floating(path, x)
  _check_bucket_size(path, bucket_size)
  _check_points(path, points)
  _checks.check_finite(path, x)
  x = jnp.asarray(x)
  if x.size == 0:
    _checks.fail(path, "cannot quantize an empty array")
  pts = jnp.sort(jnp.asarray(np.asarray(points) if isinstance(points, (list, tuple))
                             else points).astype(jnp.float32))
  code_dtype = np.dtype(codes_dtype(pts.shape[0]))
  k = None if bucket_size is None else int(bucket_size)
  codes, alpha, beta = _quantize_jit(x, pts, k, code_dtype)
  return PointsArray(codes=codes, points=pts, alpha=alpha, beta=beta,
                     bucket_size=k, shape=tuple(x.shape), dtype=np.dtype(x.dtype))
