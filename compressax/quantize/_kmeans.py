"""1-D k-means weight sharing (Deep Compression, stage 2).

Han et al. share weights by clustering each layer's values with 1-D k-means:
every weight is replaced by the index of its cluster, and the layer stores a
small codebook of centroids. In one dimension Lloyd's algorithm is cheap: sort
the values once, and with sorted centroids each cluster is a contiguous run of
the sorted values between two midpoints. Cluster sums then come from a prefix
sum, so an iteration costs O(K log N) after the O(N log N) sort, and one can
afford to run Lloyd to convergence (``tol``) from a good start.

The best start for the mean squared error is ``init="companding"``: at high
resolution the MSE-optimal quantizer places its levels with density
proportional to p(x)^(1/3) (Panter & Dite; Gersho), so the initial centroids
sit at evenly spaced levels of the normalized cumulative of p^(1/3), with p
estimated from the spacing of the sorted values' quantiles. Deep
Compression's ``"linear"`` start (the default) has a larger error but keeps
centroids out at the large weights, which matters more for accuracy after
fine-tuning.

References:
  Han, Mao, Dally, *Deep Compression: Compressing Deep Neural Networks with
  Pruning, Trained Quantization and Huffman Coding*, ICLR 2016.
  https://arxiv.org/abs/1510.00149
  Panter, Dite, *Quantization Distortion in Pulse-Count Modulation with
  Nonuniform Spacing of Levels*, Proc. IRE 39(1), 1951.
  https://doi.org/10.1109/JRPROC.1951.230419
  Gersho, *Asymptotically Optimal Block Quantization*, IEEE Trans. Inf.
  Theory 25(4), 1979. https://doi.org/10.1109/TIT.1979.1056067
  Arthur, Vassilvitskii, *k-means++: The Advantages of Careful Seeding*,
  SODA 2007. https://dl.acm.org/doi/10.5555/1283383.1283494
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Union

import jax
import jax.numpy as jnp
import numpy as np

from compressax import _checks
from compressax import _rules
from compressax import _select
from compressax import _sharding
from compressax.quantize._codebook import CodebookArray
from compressax.quantize._codebook import codes_dtype

__all__ = ["kmeans", "weight_share", "weight_share_tree"]

MAX_CLUSTERS = 2 ** 16
_INITS = ("linear", "density", "companding", "kmeans++")
# k-means++ seeds on at most this many points (evenly strided through the
# sorted values, i.e. the empirical quantiles): its O(K N) seeding would
# otherwise dominate on large tensors. Lloyd then runs on all points.
SEED_POINTS = 2 ** 16
# The companding init estimates the density on up to _MAX_BINS equal-mass
# bins of at least _BIN_POINTS points each.
_MAX_BINS = 2 ** 16
_BIN_POINTS = 8


def _check_args(path, x, n_clusters, init, iters, tol, key, max_clusters) -> int:
  """Validates the arguments; returns the static number of centroid slots."""
  _checks.check_floating(path, x)
  if np.size(x) == 0:
    _checks.fail(path, "cannot cluster an empty array")
  _checks.check_finite(path, x)
  if init not in _INITS:
    _checks.fail(path, f"init must be one of {_INITS}, got {init!r}")
  if init == "kmeans++" and key is None:
    _checks.fail(path, "init='kmeans++' needs a PRNG `key`")
  if isinstance(iters, bool) or not isinstance(iters, (int, np.integer)) or iters < 0:
    _checks.fail(path, f"iters must be a non-negative int, got {iters!r}")
  if (isinstance(tol, bool) or not isinstance(tol, (int, float, np.integer, np.floating))
      or not tol >= 0):
    _checks.fail(path, f"tol must be a non-negative float, got {tol!r}")
  _checks.check_range(path, "n_clusters", n_clusters, 1, MAX_CLUSTERS, integer=True)
  if max_clusters is None:
    if not _checks.is_concrete(n_clusters):
      _checks.fail(path, "a traced n_clusters needs a static `max_clusters`")
    max_clusters = int(np.asarray(n_clusters))
  if (isinstance(max_clusters, bool) or not isinstance(max_clusters, (int, np.integer))
      or not 1 <= max_clusters <= MAX_CLUSTERS):
    _checks.fail(path, f"max_clusters must be an int in [1, {MAX_CLUSTERS}], "
                       f"got {max_clusters!r}")
  if _checks.is_concrete(n_clusters) and int(np.asarray(n_clusters)) > max_clusters:
    _checks.fail(path, f"n_clusters ({int(np.asarray(n_clusters))}) exceeds "
                       f"max_clusters ({max_clusters})")
  return int(max_clusters)


def _init_centroids(xs, n, m, init, key):
  """``m`` initial centroid slots, sorted, the first ``n`` of them active."""
  size = xs.shape[0]
  k = jnp.arange(m, dtype=jnp.float32)
  nf = n.astype(jnp.float32)
  lo, hi = xs[0], xs[-1]
  if init == "linear":
    # Evenly over [min, max]; a single centroid starts at the midpoint.
    t = jnp.where(n > 1, k / jnp.maximum(nf - 1.0, 1.0), 0.5)
    return lo + (hi - lo) * t
  if init == "density":
    # Evenly spaced levels (k + 1/2) / n of the empirical CDF, interpolated.
    pos = (k + 0.5) / nf * (size - 1)
    i0 = jnp.clip(jnp.floor(pos).astype(jnp.int32), 0, size - 1)
    i1 = jnp.minimum(i0 + 1, size - 1)
    frac = pos - i0.astype(jnp.float32)
    return xs[i0] + (xs[i1] - xs[i0]) * frac
  if init == "companding":
    return _companding_init(xs, nf, k)
  if size > SEED_POINTS:
    xs = xs[np.round(np.linspace(0, size - 1, SEED_POINTS)).astype(np.int32)]
    size = SEED_POINTS
  # kmeans++: each next centroid is drawn with probability proportional to the
  # squared distance to the nearest centroid chosen so far.
  keys = jax.random.split(key, m)
  first = xs[jax.random.randint(keys[0], (), 0, size)]
  cents = jnp.full((m,), first)
  d2 = jnp.square(xs - first)

  def body(j, carry):
    cents, d2 = carry
    cdf = jnp.cumsum(d2)
    u = jax.random.uniform(keys[j], (), jnp.float32) * cdf[-1]
    idx = jnp.minimum(jnp.searchsorted(cdf, u, side="right"), size - 1)
    # All distances zero (fewer distinct values than clusters): repeat one.
    c = jnp.where(cdf[-1] > 0, xs[idx], first)
    c = jnp.where(j < n, c, cents[0])
    return cents.at[j].set(c), jnp.where(j < n, jnp.minimum(d2, jnp.square(xs - c)), d2)

  cents, _ = jax.lax.fori_loop(1, m, body, (cents, d2))
  return jnp.sort(jnp.where(k < nf, cents, jnp.inf))


def _companding_init(xs, nf, k):
  """Centroids at the levels (k + 1/2) / n of the cumulative of p^(1/3).

  p is estimated on equal-mass bins of the sorted values ``xs``: a bin of
  width h between two empirical quantiles holds a fraction 1/B of the
  points, so p = 1 / (B h) there and its share of the integral of p^(1/3)
  is proportional to h^(2/3). Unlike equal-width bins, no bin is empty or
  holds a lone outlier, whose cube-rooted count would pull centroids into
  the tails. Within a bin the cumulative is linear, so levels interpolate.
  """
  size = xs.shape[0]
  bins = int(min(_MAX_BINS, max(1, size // _BIN_POINTS)))
  edges = xs[np.round(np.linspace(0, size - 1, bins + 1)).astype(np.int32)]
  width = edges[1:] - edges[:-1]
  w = jnp.power(width, 2.0 / 3.0)
  cum = jnp.concatenate([jnp.zeros((1,), jnp.float32), jnp.cumsum(w)])
  level = (k + 0.5) / nf * cum[-1]
  b = jnp.clip(jnp.searchsorted(cum, level, side="right") - 1, 0, bins - 1)
  # All values equal: zero widths, and every centroid lands on that value.
  frac = jnp.clip((level - cum[b]) / jnp.maximum(w[b], 1e-30), 0.0, 1.0)
  return jnp.minimum(edges[b] + width[b] * frac, edges[-1])


def _sort_floats(x):
  """Sorts float32 values as int32 keys (order-preserving bit map).

  XLA's CPU sort is several times faster on integers than on floats, and the
  sort dominates k-means on large tensors. Flipping the magnitude bits of
  negative floats makes their int32 order match the float order.
  """
  flip = jnp.int32(0x7FFFFFFF)
  i = jax.lax.bitcast_convert_type(x, jnp.int32)
  i = jnp.sort(jnp.where(i < 0, i ^ flip, i))
  return jax.lax.bitcast_convert_type(jnp.where(i < 0, i ^ flip, i), jnp.float32)


@functools.partial(jax.jit, static_argnames=("m", "init", "iters"))
def _kmeans_impl(x, n, key, tol, *, m, init, iters):
  flat = x.reshape(-1).astype(jnp.float32)
  size = flat.shape[0]
  n = jnp.clip(jnp.asarray(n).astype(jnp.int32), 1, m)
  active = jnp.arange(m) < n
  xs = _sort_floats(flat)
  # Prefix sums of the *centred* sorted values: the running sum stays small
  # at both tails, where clusters hold few points and rounding hurts most.
  shift = jnp.mean(xs)
  prefix = jnp.concatenate([jnp.zeros((1,), jnp.float32), jnp.cumsum(xs - shift)])
  cents = jnp.where(active, _init_centroids(xs, n, m, init, key), jnp.inf)

  def bounds(c):
    # Inactive slots sit at +inf, so their midpoints are +inf and they get
    # no points; the last active cluster runs to the end.
    return jnp.searchsorted(xs, (c[:-1] + c[1:]) / 2, side="right")

  def step(_, c):
    b = bounds(c)
    starts = jnp.concatenate([jnp.zeros((1,), b.dtype), b])
    ends = jnp.concatenate([b, jnp.full((1,), size, b.dtype)])
    count = ends - starts
    mean = (prefix[ends] - prefix[starts]) / jnp.maximum(count, 1).astype(jnp.float32)
    # An empty cluster keeps its previous centroid.
    return jnp.sort(jnp.where(count > 0, mean + shift, c))

  # Stop once no active centroid moves more than tol * range. Past a fixed
  # point a step changes nothing, so tol=0 gives the same result as running
  # all `iters` steps.
  limit = tol * (xs[-1] - xs[0])

  def cond(carry):
    i, _, move = carry
    return (i < iters) & (move > limit)

  def body(carry):
    i, c, _ = carry
    new = step(i, c)
    move = jnp.max(jnp.where(active, jnp.abs(new - c), 0.0))
    return i + 1, new, move

  _, cents, _ = jax.lax.while_loop(
      cond, body, (jnp.int32(0), cents, jnp.float32(jnp.inf)))
  mids = (cents[:-1] + cents[1:]) / 2
  # Ties (a value exactly on a midpoint) go to the lower centroid.
  codes = jnp.searchsorted(mids, flat, side="left").astype(codes_dtype(m))
  # Unused slots repeat the largest centroid: sorted and finite, never coded.
  last = cents[n - 1]
  cents = jnp.where(active, cents, last)
  return cents, codes.reshape(x.shape)


def _kmeans(path, x, n_clusters, *, init, iters, tol, key, max_clusters):
  m = _check_args(path, x, n_clusters, init, iters, tol, key, max_clusters)
  if key is None:
    key = jax.random.key(0)  # unused by the deterministic inits
  # The values are sorted as one array: a sharded x is clustered on a
  # gathered copy (the same centroids as unsharded, replicated); the codes
  # come back in x's sharding.
  cents, codes = _kmeans_impl(_sharding.replicated(jnp.asarray(x)), n_clusters,
                              key, jnp.float32(tol), m=m, init=init, iters=iters)
  return cents, _sharding.like(codes, x)


def kmeans(x, n_clusters, *, init: str = "linear", iters: int = 30,
           tol: float = 0.0, key=None, max_clusters: int | None = None):
  """1-D Lloyd's k-means over all of ``x``'s values.

  Every value of ``x`` (any shape) is one point. Centroids are kept sorted; a
  value goes to its nearest centroid, and a value exactly halfway between two
  goes to the lower one. A cluster that loses all its points keeps its
  previous centroid. Lloyd's iterations run until no centroid moves more
  than ``tol`` times the range of ``x``, or ``iters`` of them have run. An
  iteration costs only O(K log N) after one sort, so a converged run (e.g.
  ``iters=300, tol=1e-6``) costs little more than a short one.

  For the lowest squared error use ``init="companding"`` and run to
  convergence: Lloyd's algorithm in 1-D moves centroids across the range
  very slowly, so the start decides the result. The default ``"linear"``
  start is Deep Compression's choice: it leaves more centroids at the rare
  large weights, which the paper found matters for accuracy, at the cost of
  a larger squared error (and some clusters may stay empty).

  Args:
    x: a floating-point array (computed in float32).
    n_clusters: the number of clusters K, in [1, 65536]. May be a traced int
      (e.g. under ``jax.vmap``) if ``max_clusters`` is given; a traced value is
      clipped into [1, max_clusters].
    init: ``"linear"`` (evenly spaced over [min, max], the paper's best for
      accuracy), ``"density"`` (at the CDF levels (k + 1/2) / K),
      ``"companding"`` (at the levels (k + 1/2) / K of the normalized
      cumulative of p^(1/3), the MSE-optimal high-resolution point density,
      with p estimated on up to 65536 equal-mass bins of at least 8 sorted
      values each; the lowest error) or ``"kmeans++"`` (needs ``key``;
      seeded on at most ``SEED_POINTS`` = 65536 of the sorted values,
      evenly strided, then Lloyd on all of them).
    iters: the maximum number of Lloyd iterations (static).
    tol: stop once no centroid moves more than ``tol * (max(x) - min(x))``
      in an iteration; 0 stops only at an exact fixed point.
    key: a PRNG key, used only by ``"kmeans++"``.
    max_clusters: the static number of centroid slots; defaults to
      ``n_clusters`` when that is concrete.

  Returns:
    ``(centroids, codes)``: ``centroids`` is float32 of shape
    ``(max_clusters,)``, sorted; slots beyond ``n_clusters`` repeat the
    largest active centroid and are never used by a code. ``codes`` has
    ``x``'s shape with dtype uint8 if ``max_clusters <= 256`` else uint16.

  Raises:
    TypeError: if ``x`` is not floating point.
    ValueError: for an empty or non-finite ``x``, ``n_clusters`` outside
      [1, 65536] or above ``max_clusters``, an unknown ``init``, a negative
      ``tol``, or ``"kmeans++"`` without ``key``.

  Example:
    >>> import jax.numpy as jnp, compressax as cx
    >>> c, codes = cx.quantize.kmeans(jnp.array([0., .1, 1., 1.1]), 2)
    >>> [round(float(v), 4) for v in c], codes.tolist()
    ([0.05, 1.05], [0, 0, 1, 1])

  References:
    Han et al., *Deep Compression*, ICLR 2016. https://arxiv.org/abs/1510.00149
    Panter & Dite, Proc. IRE 1951. https://doi.org/10.1109/JRPROC.1951.230419
    Arthur & Vassilvitskii, *k-means++*, SODA 2007.
    https://dl.acm.org/doi/10.5555/1283383.1283494
  """
  return _kmeans("x", x, n_clusters, init=init, iters=iters, tol=tol, key=key,
                 max_clusters=max_clusters)


def weight_share(x, n_clusters, *, init: str = "linear", iters: int = 30,
                 tol: float = 0.0, key=None,
                 max_clusters: int | None = None) -> CodebookArray:
  """Weight sharing: ``x`` as a :class:`CodebookArray` from 1-D k-means.

  The node's gradient with respect to ``centroids`` (through
  :meth:`CodebookArray.materialize`) is the sum of the weight gradients of
  each cluster, which is the paper's centroid fine-tuning rule.

  Args:
    x: a floating-point array.
    n_clusters: as in :func:`kmeans`. With a traced value and a static
      ``max_clusters``, the node stores all ``max_clusters`` slots and its
      :meth:`~CodebookArray.storage_bits` counts them.
    init, iters, tol, key, max_clusters: as in :func:`kmeans`.

  Returns:
    A :class:`CodebookArray` with ``x``'s shape and dtype.

  Raises:
    TypeError, ValueError: as :func:`kmeans`.

  References:
    Han et al., *Deep Compression*, ICLR 2016. https://arxiv.org/abs/1510.00149
  """
  return _weight_share("x", x, n_clusters, init=init, iters=iters, tol=tol,
                       key=key, max_clusters=max_clusters)


def _weight_share(path, x, n_clusters, **kw) -> CodebookArray:
  cents, codes = _kmeans(path, x, n_clusters, **kw)
  return CodebookArray(codes=codes, centroids=cents, shape=tuple(np.shape(x)),
                       dtype=np.dtype(x.dtype))


def weight_share_tree(params, n_clusters: Union[int, Mapping[str, int]], *,
                      where=None, init: str = "linear", iters: int = 30,
                      tol: float = 0.0, key=None) -> Any:
  """Replace each selected leaf of ``params`` with a :class:`CodebookArray`.

  Args:
    params: a parameter pytree (linen dict, ``nnx.State``, plain dict).
    n_clusters: one int for every selected leaf, or a mapping from a path
      regex to an int, e.g. ``{"conv": 256, "dense": 32}`` for the paper's 8
      bits on conv layers and 5 bits on fully connected ones. The first
      pattern (in the mapping's order) that ``re.search`` finds in the leaf's
      ``/``-joined path applies; a selected leaf that matches none is an error.
    where: the selection rule (default: weight matrices and kernels).
    init, iters, tol: as in :func:`kmeans`.
    key: a PRNG key for ``init="kmeans++"``; the ``i``-th selected leaf (in
      tree order) uses ``jax.random.fold_in(key, i)``.

  Returns:
    ``params`` with selected leaves replaced; the others are the same objects.

  Raises:
    ValueError, TypeError: naming the leaf path, as in :func:`kmeans`, or for
      a leaf that no pattern of ``n_clusters`` matches.

  References:
    Han et al., *Deep Compression*, ICLR 2016. https://arxiv.org/abs/1510.00149
  """
  _rules.check_used(params, n_clusters, where=where, name="n_clusters")
  counter = iter(range(1 << 62))

  def share(path, leaf):
    k = _rules.lookup(n_clusters, path, leaf, name="n_clusters")
    i = next(counter)
    leaf_key = None if key is None else jax.random.fold_in(key, i)
    return _weight_share(path, leaf, k, init=init, iters=iters, tol=tol,
                         key=leaf_key, max_clusters=None)

  return _select.map_selected(share, params, where=where)
