"""Exact top-k selection shared by every pruning mask (private).

All masks in :mod:`compressax.prune` reduce to one primitive: keep exactly
``k`` entries of one or more flat arrays of non-negative ``int32`` *keys*
(bit patterns of ``|w|`` as float32, norms, or random bits), largest keys first.

**Tie rule.** Entries are ranked by key, descending; equal keys are ranked by
flat index, ascending, where the flat index runs over the arrays in the order
given (tree order for a global mask). So among equal magnitudes the earlier
weight is kept. The count is exact whatever the ties.

**Algorithm.** Find the threshold ``t`` = the ``k``-th largest key, keep every
key ``> t`` and the first ``k - #{key > t}`` keys equal to ``t``. The threshold
comes from a sort of the keys (small inputs) or from a 32-step bisection on the
key value (large inputs: no sort, no concatenated copy, memory stays near the
size of the keys). Both give the same threshold, hence the same mask. ``k`` may
be traced, so ``jax.vmap`` over sparsities works.
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from compressax import _checks
from compressax import _sharding
from compressax._count import count

_INT_MAX = int(np.iinfo(np.int32).max)
# Above this many keys the threshold is found by bisection instead of a sort.
# For one mask the bisection is faster on CPU from about 16k keys on (235k
# keys: 1.4 ms vs 10 ms), but under `jax.vmap` over sparsities one sort
# serves every sparsity while each bisection is repeated, so the default
# keeps the sort up to here; `method="bisect"` asks for the bisection.
SORT_LIMIT = 1 << 22
# A float32 sparsity s prunes floor(s n 2^24 / (2^24 - 1)): see pruned_count.
_SNAP = 2 ** 24


@jax.jit
def magnitude_keys(x) -> jax.Array:
  """Flat ``int32`` keys ordered like ``|x|``.

  For non-negative floats the IEEE bit pattern, read as a signed integer, is
  monotonic in the value, so comparing keys compares magnitudes exactly.
  Leaves are compared in float32 (bfloat16/float16 upcast exactly; a float64
  leaf is rounded, which can only create ties, never change the count).
  """
  a = jnp.abs(_sharding.ravel(x)).astype(jnp.float32)
  return lax.bitcast_convert_type(a, jnp.int32)


def random_keys(key, n: int) -> jax.Array:
  """``n`` uniformly random non-negative ``int32`` keys from a PRNG key."""
  bits = jax.random.bits(key, (n,), jnp.uint32)
  return (bits >> 1).astype(jnp.int32)


def pruned_count(n: int, sparsity):
  """How many of ``n`` entries a sparsity prunes: ``floor(sparsity * n)``.

  Two exact rules, and eager and traced calls agree for every float32 value:

  * A sparsity whose value is exactly a float32 (every traced sparsity, read
    as float32; a concrete float32, float16 or bfloat16; a Python float such
    as ``0.5`` or ``float(jnp.float32(0.95))``) prunes ``floor(s n)``, or
    ``c = floor(s n) + 1`` when ``s n`` lies less than 1/2 below ``c`` and
    within float32's relative rounding of it: ``c (1 - 2^-24) <= s n``. A
    float32 cannot hold ``0.95``, and ``float32(0.95) * 30000`` is
    ``28499.9996``, yet it prunes 28500. Computed exactly: in rational
    arithmetic eagerly, in 64-bit integer arithmetic on uint32 pairs traced.
  * Any other concrete value (a Python float like ``0.3``) is read as the
    shortest decimal that round-trips to it (``str``) and multiplied in
    exact rational arithmetic, so ``0.29`` of 100 prunes 29 although
    ``0.29 * 100 == 28.999999999999996`` in float64.

  The count is at most ``n - 1`` (for ``n >= 1``): at least one entry is
  kept. So a traced sparsity of 1 or more (which cannot be rejected) keeps
  exactly one; a traced NaN prunes nothing; a negative one is 0.

  Returns:
    A Python ``int`` for a concrete sparsity, else an ``int32`` scalar.
  """
  top = max(int(n) - 1, 0)
  if _checks.is_concrete(sparsity):
    v = np.asarray(sparsity)[()]
    f = float(v)
    if math.isnan(f) or f <= 0:
      return 0
    if f >= 1:
      return top
    if float(np.float32(f)) != f:
      return min(math.floor(Fraction(str(v)) * n), top)
    x = Fraction(f) * n
    c = math.floor(x)
    snap = x - c > Fraction(1, 2) and (c + 1) * (_SNAP - 1) <= x * _SNAP
    return min(c + int(snap), top)
  s = jnp.asarray(sparsity).astype(jnp.float32)
  s = jnp.clip(jnp.where(jnp.isnan(s), 0.0, s), 0.0, 1.0)
  return jnp.minimum(_pruned_float32(n, s), top).astype(jnp.int32)


def _mul64(a, b):
  """``a * b`` of two uint32 scalars as a ``(high, low)`` uint32 pair."""
  mask = jnp.uint32(0xFFFF)
  a0, a1, b0, b1 = a & mask, a >> 16, b & mask, b >> 16
  p00, p01, p10, p11 = a0 * b0, a0 * b1, a1 * b0, a1 * b1
  mid = (p00 >> 16) + (p01 & mask) + (p10 & mask)  # < 3 * 2^16
  lo = (p00 & mask) | (mid << 16)
  hi = p11 + (p01 >> 16) + (p10 >> 16) + (mid >> 16)
  return hi, lo


def _shr64(hi, lo, k):
  """``(hi, lo) >> k`` for ``0 <= k < 64`` (no shift by 32 or more is used)."""
  r = k & jnp.uint32(31)
  low = jnp.where(r == 0, lo, (lo >> r) | (hi << ((32 - r) & 31)))
  big = k >= 32
  return jnp.where(big, jnp.uint32(0), hi >> r), jnp.where(big, hi >> r, low)


def _pruned_float32(n: int, s) -> jax.Array:
  """:func:`pruned_count`'s float32 rule, exactly, for traced ``s`` in [0, 1].

  With ``s = m 2^-k`` (``m`` the 24-bit significand, ``24 <= k <= 55`` for
  ``2^-32 <= s < 1``) and ``P = m n < 2^55``: ``floor(s n) = P >> k``; ``s n``
  lies more than 1/2 above it when bit ``k - 1`` of ``P`` is set and a lower
  one too; and ``c (1 - 2^-24) <= s n`` iff ``c (2^24 - 1) <= P >> (k - 24)``.
  ``s < 2^-32`` prunes 0, ``s = 1`` prunes ``n``.
  """
  bits = lax.bitcast_convert_type(s, jnp.uint32)
  e = (bits >> 23).astype(jnp.int32)
  m = (bits & jnp.uint32(0x7FFFFF)) | jnp.uint32(0x800000)
  k = jnp.clip(150 - e, 24, 55).astype(jnp.uint32)
  ph, pl = _mul64(m, jnp.uint32(n))
  _, floor = _shr64(ph, pl, k)
  _, half = _shr64(ph, pl, k - 1)
  below = k - 1  # the bits under the half: P mod 2^(k-1) != 0
  low_h = ph & ((jnp.uint32(1) << ((below - 32) & 31)) - 1)
  rest = jnp.where(below >= 32, (low_h | pl) != 0,
                   (pl & ((jnp.uint32(1) << (below & 31)) - 1)) != 0)
  over_half = ((half & 1) == 1) & rest
  qh, ql = _shr64(ph, pl, k - 24)
  ch, cl = _mul64(floor + 1, jnp.uint32(_SNAP - 1))
  near = (ch < qh) | ((ch == qh) & (cl <= ql))
  c = floor + (over_half & near).astype(jnp.uint32)
  c = jnp.where(e < 95, jnp.uint32(0), c)  # s < 2^-32: s n < 1/2
  return jnp.where(s >= 1, jnp.uint32(n), c).astype(jnp.int32)


def kept_count(n: int, sparsity):
  """``n - floor(sparsity * n)`` (see :func:`pruned_count`)."""
  return n - pruned_count(n, sparsity)


def check_scalar(path, sparsity) -> None:
  """A sparsity must be one number in ``[0, 1)`` (checked when concrete)."""
  number = isinstance(sparsity, (int, float, np.number)) or (
      hasattr(sparsity, "shape") and hasattr(sparsity, "dtype"))
  if not number or isinstance(sparsity, bool):
    _checks.fail(path, f"sparsity must be a number, got {type(sparsity).__name__}",
                 TypeError)
  if np.ndim(sparsity) != 0:
    _checks.fail(path, f"sparsity must be a scalar, got shape {np.shape(sparsity)}; "
                       "use jax.vmap to sweep several", TypeError)
  _checks.check_sparsity(path, sparsity)


def _compare(v, t, key_fn, op: str) -> jax.Array:
  """``key_fn(v) op t`` elementwise, flat.

  For magnitude keys it is evaluated on the float values against the float
  whose bit pattern is ``t``, ``|v| >= f`` as ``v >= f or v <= -f``: every
  term then depends on ``t``, so XLA cannot hoist a full-size key array out of
  the bisection loop (it would hold one int32 per weight). Same result for
  finite weights; NaN weights (rejected when concrete) compare false here.
  """
  if key_fn is magnitude_keys:
    a = _sharding.ravel(v).astype(jnp.float32)
    f = lax.bitcast_convert_type(t, jnp.float32)
    if op == ">=":
      return (a >= f) | (a <= -f)
    if op == ">":
      return (a > f) | (a < -f)
    return (a == f) | (a == -f)
  keys = key_fn(v)
  return {">=": keys >= t, ">": keys > t, "==": keys == t}[op]


def _bisect_threshold(values, key_fn, k) -> jax.Array:
  """The largest ``t`` with ``#{key >= t} >= k`` (``INT_MAX`` when k == 0)."""
  def count_ge(t):
    return sum(count(_compare(v, t, key_fn, ">=")) for v in values)

  def body(_, lohi):
    lo, hi = lohi
    span = hi - lo
    mid = lo + span // 2 + span % 2  # ceil midpoint, no int32 overflow
    ok = count_ge(mid) >= k
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

  lo, _ = lax.fori_loop(0, 32, body, (jnp.int32(0), jnp.int32(_INT_MAX)))
  return lo


def _sort_threshold(keys_list, k, n_total: int) -> jax.Array:
  # A sort needs its axis whole: keys split over explicit mesh axes are
  # gathered (the bisection below works on the shards).
  keys_list = [_sharding.replicated(kk) for kk in keys_list]
  allk = keys_list[0] if len(keys_list) == 1 else jnp.concatenate(keys_list)
  srt = jnp.sort(allk)
  kth = srt[jnp.clip(n_total - k, 0, n_total - 1)]
  return jnp.where(k > 0, kth, _INT_MAX)


def _identity(x):
  return x


def topk_masks(values, k, *, key_fn=None, method: str | None = None) -> list[jax.Array]:
  """Keep exactly ``k`` of the keys of ``values`` taken together.

  Args:
    values: arrays whose ``key_fn`` are flat non-negative ``int32`` keys.
    k: how many to keep in total (Python int or ``int32`` scalar, may be
      traced); clipped to ``[0, total]``.
    key_fn: maps one array of ``values`` to its flat keys (default: the values
      are the keys). A module-level function, so jit caches by it.
    method: ``"sort"`` or ``"bisect"`` to find the threshold; ``None`` picks by
      size. Both give identical masks.

  Returns:
    Flat ``bool`` arrays, one per array of ``values`` (True = kept).
  """
  n_total = sum(int(np.size(v)) for v in values)
  if n_total >= _INT_MAX:
    raise ValueError(f"cannot rank {n_total} weights at once (int32 counts); "
                     "use scope='layer'")
  if n_total == 0:
    return [jnp.zeros((0,), bool) for _ in values]
  if method is None:
    method = "sort" if n_total <= SORT_LIMIT else "bisect"
  if method not in ("sort", "bisect"):
    raise ValueError(f"method must be 'sort' or 'bisect', got {method!r}")
  # Jitted (and inlined under an outer jit) so eager calls are one dispatch
  # and a concrete k does not recompile.
  return _topk_jit(list(values), jnp.asarray(k, jnp.int32), method,
                   key_fn or _identity)


@functools.partial(jax.jit, static_argnames=("method", "key_fn"))
def _topk_jit(values, k, method, key_fn):
  n_total = sum(int(v.size) for v in values)
  k = jnp.clip(k, 0, n_total)
  if method == "sort":
    t = _sort_threshold([key_fn(v) for v in values], k, n_total)
  else:
    t = _bisect_threshold(values, key_fn, k)
  # Per-leaf counts first (fused reductions), then each leaf's mask in one
  # pass, so no full-size intermediate outlives its leaf.
  n_gt = [count(_compare(v, t, key_fn, ">")) for v in values]
  n_eq = [count(_compare(v, t, key_fn, "==")) for v in values]
  need = k - sum(n_gt)
  out, offset = [], jnp.int32(0)
  for v, ne in zip(values, n_eq):
    take = need - offset

    def some_ties(v, tk):
      eq = _compare(v, t, key_fn, "==")
      # The running count runs in row-major order over the whole leaf, so a
      # leaf split over explicit mesh axes counts on a gathered copy of the
      # (bool) ties.
      run = jnp.cumsum(_sharding.replicated(eq), dtype=jnp.int32)
      return _compare(v, t, key_fn, ">") | (eq & (run <= tk))

    def all_or_no_ties(v, tk, ne=ne):
      return _compare(v, t, key_fn, ">") | (_compare(v, t, key_fn, "==") & (tk >= ne))

    # The running count of ties is only needed when some, not all, of this
    # leaf's ties are kept; skipping the cumsum keeps the common case cheap.
    out.append(lax.cond((take > 0) & (take < ne), some_ties, all_or_no_ties, v, take))
    offset = offset + ne
  return out
