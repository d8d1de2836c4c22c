"""Quantization onto a codebook of points.

Two methods store a tensor as small integer codes into a list of values:

* Deep Compression's weight sharing (:func:`compressax.quantize.weight_share`)
  produces a :class:`CodebookArray`, whose codes index float centroids.
* Polino et al.'s *differentiable quantization* keeps, per tensor, a sorted
  list of points in the bucket-scaled [0, 1] domain; each weight takes its
  nearest point (:func:`nearest_point`), and the points are trained by
  gradient descent. :func:`points_init` and :func:`allocate_points` set them up.

References:
  Han, Mao, Dally, *Deep Compression*, ICLR 2016.
  https://arxiv.org/abs/1510.00149
  Polino, Pascanu, Alistarh, *Model compression via distillation and
  quantization*, ICLR 2018. https://arxiv.org/abs/1802.05668
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from compressax import _checks
from compressax import _sharding
from compressax._node import CompressedLeaf
from compressax._node import check_codes
from compressax._node import compressed_leaf

__all__ = ["CodebookArray", "allocate_points", "nearest_point", "points_init"]

_TINY_RANGE = 1e-10


def codes_dtype(n: int):
  """The smallest unsigned dtype that indexes ``n`` entries (at most 2^16)."""
  return jnp.uint8 if n <= 256 else jnp.uint16


@compressed_leaf(name="compressax.CodebookArray", pointwise=("codes",))
@dataclasses.dataclass(frozen=True)
class CodebookArray(CompressedLeaf):
  """A dense array stored as integer codes into a float32 codebook.

  Attributes:
    codes: unsigned integer array of the dense shape; ``codes[i]`` indexes
      ``centroids``.
    centroids: float32 array ``(K,)``.
    shape: the dense shape (static).
    dtype: the dense dtype (static).

  :meth:`storage_bits` is ``numel * ceil(log2 K) + 32 * K``: each code in the
  fewest bits that index K entries (0 bits when K = 1), plus the codebook in
  float32; Huffman coding of the codes is not counted.
  """
  codes: jax.Array
  centroids: jax.Array
  shape: tuple = dataclasses.field(metadata=dict(static=True))
  dtype: np.dtype = dataclasses.field(metadata=dict(static=True))

  @property
  def n_clusters(self) -> int:
    """K, the number of codebook entries."""
    return int(self.centroids.shape[-1])

  @property
  def bits(self) -> int:
    """Bits per code: ``ceil(log2 K)``."""
    return max(0, math.ceil(math.log2(self.n_clusters)))

  def materialize(self) -> jax.Array:
    """``centroids[codes]`` in the dense dtype (gradient to ``centroids``)."""
    idx = self.codes.astype(jnp.int32)
    s = _sharding.explicit(idx)
    # Codes split over explicit mesh axes: the gather's result is laid out
    # like them (the codebook is replicated).
    dense = (jnp.take(self.centroids, idx, axis=0) if s is None
             else self.centroids.at[idx].get(out_sharding=s, mode="fill"))
    return _sharding.like(dense.astype(self.dtype).reshape(self.shape),
                          self.codes)

  def storage_bits(self) -> int:
    return self.size * self.bits + 32 * self.n_clusters

  def validate(self) -> None:
    """Codes of the dense shape, each indexing the 1-D codebook."""
    super().validate()
    cents = np.asarray(self.centroids)
    if cents.ndim != 1 or not cents.size or not np.issubdtype(cents.dtype, np.floating):
      raise ValueError(f"centroids must be a non-empty 1-D float array, got "
                       f"{cents.dtype}{list(cents.shape)}")
    check_codes(self.codes, self.shape, table=cents.size, what="centroids")


def _bucketed(x, bucket_size):
  """``x`` flattened into ``(n_buckets, k)`` float32, padded by edge values.

  The pad repeats the last value, so it changes no bucket's min or max.
  """
  flat = x.reshape(-1).astype(jnp.float32)
  k = flat.shape[0] if bucket_size is None else bucket_size
  pad = -flat.shape[0] % k
  flat = jnp.pad(flat, (0, pad), mode="edge")
  return flat.reshape(-1, k)


def _scale(xb):
  """Polino's per-bucket alpha = max - min (1 if < 1e-10) and beta = min."""
  beta = jnp.min(xb, axis=1, keepdims=True)
  alpha = jnp.max(xb, axis=1, keepdims=True) - beta
  alpha = jnp.where(alpha < _TINY_RANGE, 1.0, alpha)
  return alpha, beta


def _assign(x, points, bucket_size):
  xb = _bucketed(x, bucket_size)
  alpha, beta = _scale(xb)
  # Nearest point among sorted points = count of midpoints below the value;
  # a value exactly halfway goes to the lower point.
  mids = (points[:-1] + points[1:]) / 2
  idx = jnp.searchsorted(mids, (xb - beta) / alpha, side="left")
  return idx, alpha, beta


def _unbucket(yb, x):
  return yb.reshape(-1)[:x.size].reshape(x.shape).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _nearest(x, points, bucket_size, straight_through):
  idx, alpha, beta = _assign(x, points, bucket_size)
  return _unbucket(points[idx] * alpha + beta, x)


def _nearest_fwd(x, points, bucket_size, straight_through):
  idx, alpha, beta = _assign(x, points, bucket_size)
  return _unbucket(points[idx] * alpha + beta, x), (idx, alpha, x, points)


def _nearest_bwd(bucket_size, straight_through, res, g):
  idx, alpha, x, points = res
  # Padding gets a zero gradient, so it adds nothing to any point.
  gb = jnp.pad(g.reshape(-1).astype(jnp.float32), (0, idx.size - g.size))
  gb = gb.reshape(idx.shape) * alpha
  g_points = jax.ops.segment_sum(gb.reshape(-1), idx.reshape(-1),
                                 num_segments=points.shape[0])
  g_x = g if straight_through else jnp.zeros_like(x)
  return g_x, g_points


_nearest.defvjp(_nearest_fwd, _nearest_bwd)
# Jitted so that eager and jitted callers run the same compiled arithmetic.
_nearest_jit = jax.jit(_nearest, static_argnums=(2, 3))


def _check_bucket_size(path, bucket_size):
  if bucket_size is not None and (
      isinstance(bucket_size, bool) or not isinstance(bucket_size, (int, np.integer))
      or bucket_size < 1):
    _checks.fail(path, f"bucket_size must be None or a positive int, got {bucket_size!r}")


def nearest_point(x, points, *, bucket_size: int | None = None,
                  straight_through: bool = False) -> jax.Array:
  """Polino's quantization onto points, differentiable w.r.t. the points.

  ``x`` is flattened and split into buckets of ``bucket_size`` values (the
  last one padded; ``None`` = one bucket for the whole tensor). Each bucket
  is scaled to [0, 1] by ``x' = (x - beta) / alpha`` with ``beta = min`` and
  ``alpha = max - min`` (1 when below 1e-10). Each ``x'`` takes its nearest
  point ``p`` (ties go to the lower point), and the output is
  ``p * alpha + beta``.

  Gradients (custom VJP): for ``points[j]``, the sum over the weights
  assigned to ``j`` of ``alpha(bucket) * dL/dw_hat`` (the paper's rule). For
  ``x``: zero by default, since differentiable quantization trains the points
  and keeps the weights fixed; ``straight_through=True`` passes ``dL/dw_hat``
  through unchanged instead.

  Args:
    x: a floating-point array.
    points: a 1-D float array of points in [0, 1]; it is sorted here, so the
      caller need not re-sort after an update (the gradient follows each
      point to its original position).
    bucket_size: values per bucket (Polino uses 256), or ``None``.
    straight_through: the gradient for ``x`` (see above).

  Returns:
    The quantized array, ``x``'s shape and dtype.

  Raises:
    TypeError: if ``x`` or ``points`` is not floating point.
    ValueError: for non-finite ``x``, empty or non-1-D ``points``, or a bad
      ``bucket_size``.

  References:
    Polino et al., *Model compression via distillation and quantization*,
    ICLR 2018. https://arxiv.org/abs/1802.05668
  """
  _checks.check_floating("x", x)
  _checks.check_floating("points", points)
  _check_bucket_size("x", bucket_size)
  if np.ndim(points) != 1 or np.shape(points)[0] < 1:
    _checks.fail("points", f"must be a non-empty 1-D array, got shape {np.shape(points)}")
  _checks.check_finite("x", x)
  x = jnp.asarray(x)
  if x.size == 0:
    return x
  pts = jnp.sort(jnp.asarray(points).astype(jnp.float32))
  return _nearest_jit(x, pts, bucket_size, bool(straight_through))


def points_init(x, n_points: int, *, method: str = "uniform",
                bucket_size: int | None = None, path="x") -> jax.Array:
  """Initial points for :func:`nearest_point`, in the scaled [0, 1] domain.

  Args:
    x: the floating-point tensor the points will quantize.
    n_points: the number of points (e.g. ``2 ** bits``), in [1, 65536].
    method: ``"uniform"``: ``k / (n - 1)``, k = 0..n-1 (0.5 when n = 1);
      ``"quantiles"``: the same levels as quantiles of the bucket-scaled
      values of ``x`` (padding excluded), so 0 and 1 are the extremes.
    bucket_size: as in :func:`nearest_point`.
    path: the name used in error messages (the tree form passes the leaf's
      path).

  Returns:
    float32 ``(n_points,)``, sorted.

  Raises:
    TypeError, ValueError: for a non-float or non-finite ``x``, a bad
      ``n_points``, ``method`` or ``bucket_size``.

  References:
    Polino et al., ICLR 2018. https://arxiv.org/abs/1802.05668
  """
  _checks.check_floating(path, x)
  _checks.check_finite(path, x)
  _check_bucket_size(path, bucket_size)
  if (isinstance(n_points, bool) or not isinstance(n_points, (int, np.integer))
      or not 1 <= n_points <= 2 ** 16):
    _checks.fail(path, f"n_points must be an int in [1, 65536], got {n_points!r}")
  if method not in ("uniform", "quantiles"):
    _checks.fail(path, f"method must be 'uniform' or 'quantiles', got {method!r}")
  levels = (jnp.linspace(0.0, 1.0, n_points, dtype=jnp.float32) if n_points > 1
            else jnp.full((1,), 0.5, jnp.float32))
  if method == "uniform":
    return levels
  x = jnp.asarray(x)
  xb = _bucketed(x, bucket_size)
  alpha, beta = _scale(xb)
  scaled = ((xb - beta) / alpha).reshape(-1)[:x.size]
  return jnp.sort(jnp.quantile(scaled, levels))


def allocate_points(grad_norms: Mapping[str, float], total_points: int) -> dict:
  """Polino's split of a budget of quantization points among tensors.

  Our reading of the paper's rule: with T tensors and a total budget of
  ``B = total_points``, the average tensor has ``P = B / T`` points. Each
  tensor first gets ``floor(P / 2)``; the remaining points are split in
  proportion to the tensors' gradient norms (largest remainders get the
  leftover single points, so the counts sum to exactly ``B``). If every norm
  is zero, the rest is split evenly.

  Args:
    grad_norms: tensor name -> gradient norm (averaged over a few
      minibatches), finite and >= 0.
    total_points: the total budget B, at least ``2 * T`` so that each tensor
      gets at least one point.

  Returns:
    ``dict`` name -> number of points (Python ints), in the input's order.

  Raises:
    ValueError: for an empty mapping, a negative or non-finite norm, or too
      small a budget.

  References:
    Polino et al., ICLR 2018. https://arxiv.org/abs/1802.05668
  """
  names = list(grad_norms)
  if not names:
    raise ValueError("allocate_points: grad_norms is empty")
  norms = np.array([float(grad_norms[n]) for n in names], np.float64)
  for n, v in zip(names, norms):
    if not np.isfinite(v) or v < 0:
      raise ValueError(f"{n}: gradient norm must be finite and >= 0, got {v}")
  t = len(names)
  if isinstance(total_points, bool) or int(total_points) != total_points \
      or total_points < 2 * t:
    raise ValueError(f"allocate_points: total_points must be an int >= 2 * "
                     f"{t} (two per tensor), got {total_points}")
  total_points = int(total_points)
  base = total_points // (2 * t)
  rest = total_points - base * t
  w = norms / norms.sum() if norms.sum() > 0 else np.full(t, 1.0 / t)
  share = w * rest
  extra = np.floor(share).astype(np.int64)
  left = rest - int(extra.sum())
  # Largest remainders first; ties broken by input order (stable sort).
  order = np.argsort(-(share - extra), kind="stable")
  extra[order[:left]] += 1
  return {n: int(base + e) for n, e in zip(names, extra)}
