"""Weightless: a sparse, clustered layer stored in a Bloomier filter.

A Bloomier filter (Chazelle et al. 2004) stores a function from a set of keys
to ``t``-bit values in a table of ``m`` cells of ``t`` bits, ``m`` a little
above the number of keys ``n``, without storing the keys. Reagen et al. store
a pruned, clustered layer in one: the keys are the flat positions of the
kept weights, the values their cluster index plus one. Decoding a position
``x`` XORs ``k`` cells and a mask::

  v(x) = M(x) ^ T[h_0(x)] ^ ... ^ T[h_{k-1}(x)]   (t bits)

and reads ``centroids[v - 1]`` for ``1 <= v <= K`` and ``0`` otherwise (``K``
clusters). A kept position decodes exactly. A pruned position is not a key:
its ``v`` is a pseudo-random ``t``-bit value, so it decodes to a random
centroid with probability ``K / 2^t`` (a *false positive*) and to 0 otherwise.
The filter never stores positions: its size, ``m * t`` bits, depends on the
number of kept weights only. False positives are the lossy part, and the
paper retrains the rest of the network around them
(:func:`compressax.weightless.freeze_and_retrain`).

Construction here: the ``k`` cells of a key lie one in each of ``k`` equal
segments of the table (the XOR filter layout, Graf & Lemire 2020), found by
peeling the key/cell hypergraph (a cell holding one unpeeled key peels that
key; a whole round of such cells at a time, in NumPy), then cells are
assigned in the reverse peeling order. Peeling fails with small probability
when ``m / n`` is near the threshold (about 1.222 for ``k = 3``); the build
then retries with the next seed and records the seed that worked. Cells no
key is peeled onto stay 0 (the mask hash alone randomizes what non-keys
read there), which the file's entropy coder can use.

The hashes are 32-bit integer mixes of the flat position and the seed
(Wellons' ``lowbias32``), computed by the same code in NumPy (to build) and
in ``jax.numpy`` (:meth:`BloomierArray.materialize` decodes every position
in one vectorized pass), so the false positives at decode time are exactly
those the filter implies.

References:
  Reagen, Gupta, Adolf, Mitzenmacher, Rush, Wei, Brooks, *Weightless: Lossy
  weight encoding for deep neural network compression*, ICML 2018.
  https://arxiv.org/abs/1711.04686
  Chazelle, Kilian, Rubinfeld, Tal, *The Bloomier filter*, SODA 2004.
  Graf, Lemire, *Xor filters: faster and smaller than Bloom and cuckoo
  filters*, JEA 2020. https://arxiv.org/abs/1912.08258
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from compressax import _checks
from compressax._node import CompressedLeaf
from compressax._node import check_codes
from compressax._node import compressed_leaf
from compressax._node import is_compressed

__all__ = ["BloomierArray", "encode", "false_positive_rate"]

# Header fields counted by storage_bits: seed (32), m (32), k (8), t (8).
HEADER_BITS = 80
MAX_HASHES = 8
MAX_BITS = 16
_MAX_POSITIONS = 1 << 32
_GOLDEN = 0x9E3779B9
# Cells per key (before the 32 extra cells) a little above the threshold
# where peeling k-uniform random hypergraphs stops succeeding (k = 2: the
# graph must be a forest, m > 2n; k = 3: 1.222; k = 4: 1.295; ...).
OVERHEAD = {2: 2.1, 3: 1.23, 4: 1.3, 5: 1.43, 6: 1.58, 7: 1.73, 8: 1.88}


def _mix(x, xp):
  """Wellons' lowbias32 on uint32 (wrapping multiplies), NumPy or jnp."""
  u = xp.uint32
  x = x ^ (x >> u(16))
  x = x * u(0x7FEB352D)
  x = x ^ (x >> u(15))
  x = x * u(0x846CA68B)
  return x ^ (x >> u(16))


def _salts(seed: int, k: int) -> np.ndarray:
  """The ``k + 1`` uint32 salts of a seed (the last one is the mask hash's)."""
  x = (seed + np.arange(1, k + 2, dtype=np.uint64) * _GOLDEN) & 0xFFFFFFFF
  return _mix(x.astype(np.uint32), np)


def _hashes(pos, salts, k: int, m: int, bits: int, xp):
  """``(cells, mask)`` of uint32 positions: ``k`` cell indices and the mask.

  Cell ``j`` lies in segment ``j`` of ``m // k`` cells. Works on NumPy and
  ``jax.numpy`` arrays alike (``xp``), bit for bit.
  """
  u = xp.uint32
  seg = m // k
  out = []
  for j in range(k + 1):
    s = salts[j]
    h = _mix(_mix(pos ^ s, xp) + s, xp)
    out.append(u(j * seg) + h % u(seg) if j < k
               else h & u((1 << bits) - 1))
  return out[:k], out[k]


@functools.partial(jax.jit, static_argnames=("k", "bits", "size"))
def _decode(table, salts, *, k: int, bits: int, size: int):
  pos = jnp.arange(size, dtype=jnp.uint32)
  cells, value = _hashes(pos, salts, k, table.shape[0], bits, jnp)
  table = table.astype(jnp.uint32)
  for c in cells:
    value = value ^ jnp.take(table, c.astype(jnp.int32), axis=0)
  return value


@functools.partial(jax.jit, static_argnames=("k", "bits", "shape", "dtype"))
def _dense(table, centroids, salts, *, k: int, bits: int, shape, dtype):
  v = _decode(table, salts, k=k, bits=bits,
              size=int(np.prod(shape, dtype=np.int64))).astype(jnp.int32)
  n = centroids.shape[0]
  hit = (v >= 1) & (v <= n)
  vals = jnp.take(centroids, jnp.clip(v - 1, 0, n - 1), axis=0)
  dense = jnp.where(hit, vals, jnp.zeros((), vals.dtype))
  return dense.astype(dtype).reshape(shape)


def false_positive_rate(n_clusters: int, bits: int) -> float:
  """``K / 2^t``: the chance that a pruned position decodes to a centroid.

  Args:
    n_clusters: ``K``, the number of centroids (values ``1..K`` decode).
    bits: ``t``, the cell width.

  References:
    Reagen et al., ICML 2018. https://arxiv.org/abs/1711.04686
  """
  return n_clusters / float(1 << bits)


@compressed_leaf(name="compressax.BloomierArray")
@dataclasses.dataclass(frozen=True)
class BloomierArray(CompressedLeaf):
  """A pruned, clustered array stored as a Bloomier filter (Weightless).

  Build one with :func:`compressax.weightless.encode`.

  Attributes:
    table: unsigned ints ``(m,)``, each below ``2^bits``; ``m`` a multiple
      of ``hashes``.
    centroids: float32 ``(K,)``, ``K <= 2^bits - 1``; value ``v`` in
      ``1..K`` decodes to ``centroids[v - 1]``, any other value to 0.
    shape: the dense shape (static).
    dtype: the dense dtype (static).
    seed: the hash seed the filter was built with (static).
    hashes: ``k``, cells XORed per position (static).
    bits: ``t``, bits per cell (static).

  :meth:`storage_bits` is ``m * t + 32 K + 80``: the cells, the float32
  codebook, and a header of the seed and ``m`` (32 bits each), ``k`` and
  ``t`` (8 bits each). Entropy coding of the cells (the file writer's) is not
  counted.
  """
  table: jax.Array
  centroids: jax.Array
  shape: tuple = dataclasses.field(metadata=dict(static=True))
  dtype: np.dtype = dataclasses.field(metadata=dict(static=True))
  seed: int = dataclasses.field(default=0, metadata=dict(static=True))
  hashes: int = dataclasses.field(default=3, metadata=dict(static=True))
  bits: int = dataclasses.field(default=8, metadata=dict(static=True))

  @property
  def n_clusters(self) -> int:
    """K, the number of centroids."""
    return int(self.centroids.shape[-1])

  @property
  def n_cells(self) -> int:
    """m, the number of cells."""
    return int(self.table.shape[-1])

  def decode_values(self) -> jax.Array:
    """The ``t``-bit value of every position, flat, uint32 (0 = pruned)."""
    salts = jnp.asarray(_salts(self.seed, self.hashes))
    return _decode(self.table, salts, k=self.hashes, bits=self.bits,
                   size=self.size)

  def materialize(self) -> jax.Array:
    """Decodes every position: ``centroids[v - 1]`` for ``1 <= v <= K``, else 0.

    Pruned positions that decode to ``1..K`` are the filter's false
    positives; they appear here exactly where the filter puts them.
    """
    return _dense(self.table, self.centroids,
                  jnp.asarray(_salts(self.seed, self.hashes)), k=self.hashes,
                  bits=self.bits, shape=tuple(self.shape),
                  dtype=np.dtype(self.dtype))

  def storage_bits(self) -> int:
    return self.n_cells * self.bits + 32 * self.n_clusters + HEADER_BITS

  def validate(self) -> None:
    """Cells that fit ``bits``, ``m`` a multiple of ``hashes``, a codebook ``K < 2^t``."""
    super().validate()
    for name, v, lo, hi in (("hashes", self.hashes, 2, MAX_HASHES),
                            ("bits", self.bits, 1, MAX_BITS),
                            ("seed", self.seed, 0, _MAX_POSITIONS - 1)):
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or \
          not lo <= v <= hi:
        raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {v!r}")
    if self.size >= _MAX_POSITIONS:
      raise ValueError(f"a Bloomier filter hashes 32-bit positions; shape "
                       f"{self.shape} has {self.size} (at most 2^32 - 1)")
    table = np.asarray(self.table)
    if table.ndim != 1:
      raise ValueError(f"table must be 1-D, got shape {list(table.shape)}")
    m = table.shape[0]
    if m < self.hashes or m % self.hashes:
      raise ValueError(f"table of {m} cells is not a positive multiple of "
                       f"hashes={self.hashes}")
    check_codes(table, (m,), bits=self.bits)
    cents = np.asarray(self.centroids)
    if cents.ndim != 1 or not cents.size or \
        not np.issubdtype(cents.dtype, np.floating):
      raise ValueError(f"centroids must be a non-empty 1-D float array, got "
                       f"{cents.dtype}{list(cents.shape)}")
    if cents.size > (1 << self.bits) - 1:
      raise ValueError(f"{cents.size} centroids need values 1..{cents.size}, "
                       f"more than {self.bits}-bit cells hold")


def _peel(cells: np.ndarray, m: int):
  """Peeling order of the key/cell hypergraph, round by round, or None.

  ``cells``: ``(k, n)`` int64 cell indices of the keys. Returns a list of
  ``(keys, cells)`` per round: in round ``r`` every listed key is the only
  unpeeled key of its listed cell, so the keys of one round can be assigned
  at once (none touches another's cell).
  """
  k, n = cells.shape
  alive = np.arange(n)
  rounds = []
  while alive.size:
    c = cells[:, alive]
    count = np.bincount(c.reshape(-1), minlength=m)
    single = count[c] == 1
    peel = single.any(axis=0)
    if not peel.any():
      return None
    j = np.argmax(single[:, peel], axis=0)
    rounds.append((alive[peel], c[:, peel][j, np.arange(j.size)]))
    alive = alive[~peel]
  return rounds


def _build(keys: np.ndarray, values: np.ndarray, m: int, k: int, bits: int,
           seed: int):
  """The table of a filter mapping ``keys`` to ``values``, or None (no peel)."""
  cells, mask = _hashes(keys.astype(np.uint32), _salts(seed, k), k, m, bits, np)
  cells = np.stack(cells).astype(np.int64)
  rounds = _peel(cells, m)
  if rounds is None:
    return None
  table = np.zeros(m, np.uint32)
  target = mask ^ values.astype(np.uint32)
  for ks, own in reversed(rounds):
    acc = target[ks]
    for j in range(k):  # the key's own cell still holds 0 here
      acc = acc ^ table[cells[j, ks]]
    table[own] = acc
  return table


def _check_int(path, name, v, lo, hi):
  if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or \
      not lo <= v <= hi:
    _checks.fail(path, f"{name} must be an int in [{lo}, {hi}], got {v!r}")


def _clustered(x, path):
  """``(codes, keep, centroids, dtype)`` of a pruned, clustered leaf.

  A ``MaskedArray`` over a ``CodebookArray`` gives its own; a dense array
  its distinct nonzero values (sorted) as the codebook.
  """
  from compressax.prune import MaskedArray
  from compressax.quantize import CodebookArray
  if isinstance(x, MaskedArray) and isinstance(x.value, CodebookArray):
    keep = np.broadcast_to(np.asarray(x.mask, bool), x.shape)
    codes = np.asarray(x.value.codes).astype(np.int64)
    return codes, keep, np.asarray(x.value.centroids, np.float32), np.dtype(x.dtype)
  if isinstance(x, CodebookArray):
    codes = np.asarray(x.codes).astype(np.int64)
    return codes, np.ones(x.shape, bool), np.asarray(x.centroids, np.float32), \
        np.dtype(x.dtype)
  if is_compressed(x):
    _checks.fail(path, f"encode takes a MaskedArray over a CodebookArray, a "
                       f"CodebookArray or a dense array, got {type(x).__name__}",
                 TypeError)
  _checks.check_floating(path, x)
  _checks.check_finite(path, x)
  w = np.asarray(x)
  keep = w != 0
  cents, codes = np.unique(w[keep], return_inverse=True)
  full = np.zeros(w.shape, np.int64)
  full[keep] = codes.reshape(-1)
  return full, keep, cents.astype(np.float32), np.dtype(w.dtype)


def encode(x, *, bits: int = 8, hashes: int = 3, seed: int = 0,
           overhead: float | None = None, max_tries: int = 32,
           path="x") -> BloomierArray:
  """Encodes a pruned, clustered layer as a Bloomier filter (Weightless).

  The keys are the kept positions (C-order flat indices), the values their
  cluster index plus one. The table has ``m = k * ceil((ceil(overhead * n)
  + 32) / k)`` cells for ``n`` kept weights (the XOR filter's sizing). A
  failed peel retries with ``seed + 1``, ``seed + 2``, ...; the node records
  the seed that worked, so the same arguments always give the same node.

  Args:
    x: a ``cx.prune.MaskedArray`` over a ``cx.quantize.CodebookArray`` (Deep
      Compression's stored layer), a ``CodebookArray`` (every position
      kept), or a dense float array whose zeros are pruned and whose distinct
      nonzero values are the clusters.
    bits: ``t``, bits per cell, in ``[1, 16]``; the clusters must number at
      most ``2^t - 1``. Pruned positions decode to a centroid with
      probability ``K / 2^t`` (:func:`false_positive_rate`).
    hashes: ``k``, cells per position, in ``[2, 8]`` (3: peels at
      ``m / n >= 1.222``).
    seed: the first hash seed tried, in ``[0, 2^32)``.
    overhead: ``m / n`` before the constant 32 cells, at least 1; default
      just above ``k``'s peeling threshold (``OVERHEAD``: 1.23 for ``k = 3``,
      2.1 for ``k = 2``).
    max_tries: seeds tried before giving up.
    path: the leaf's name in errors.

  Returns:
    A :class:`BloomierArray` whose kept positions decode exactly.

  Raises:
    ValueError: naming ``path``, for a bad setting, more clusters than
      ``2^t - 1``, more than 2^32 - 1 positions, or no peel in ``max_tries``
      seeds (raise ``overhead``).
    TypeError: for a compressed leaf of another kind, or a non-float array.

  References:
    Reagen et al., *Weightless*, ICML 2018. https://arxiv.org/abs/1711.04686
  """
  _check_int(path, "bits", bits, 1, MAX_BITS)
  _check_int(path, "hashes", hashes, 2, MAX_HASHES)
  _check_int(path, "seed", seed, 0, _MAX_POSITIONS - 1)
  _check_int(path, "max_tries", max_tries, 1, 1 << 16)
  if overhead is None:
    overhead = OVERHEAD[hashes]
  if not (isinstance(overhead, (int, float)) and math.isfinite(overhead)
          and overhead >= 1.0):
    _checks.fail(path, f"overhead must be a finite number >= 1, got {overhead!r}")
  codes, keep, cents, dtype = _clustered(x, path)
  shape = tuple(int(d) for d in keep.shape)
  size = int(np.prod(shape, dtype=np.int64))
  if size >= _MAX_POSITIONS:
    _checks.fail(path, f"{size} positions; a Bloomier filter hashes 32-bit "
                       "positions (at most 2^32 - 1)")
  n_clusters = int(cents.size)
  if n_clusters > (1 << bits) - 1:
    _checks.fail(path, f"{n_clusters} clusters do not fit {bits}-bit cells "
                       f"(at most {(1 << bits) - 1}: value 0 means pruned)")
  if n_clusters == 0:  # nothing kept: one unused centroid keeps K >= 1
    cents = np.zeros(1, np.float32)
  keys = np.flatnonzero(keep.reshape(-1))
  values = codes.reshape(-1)[keys] + 1
  if values.size and (values.min() < 1 or values.max() > cents.size):
    _checks.fail(path, f"codes must index the {cents.size} centroids")
  n = keys.size
  m = hashes * -(-(math.ceil(overhead * n) + 32) // hashes)
  for s in range(seed, seed + max_tries):
    s %= _MAX_POSITIONS
    table = _build(keys, values, m, hashes, bits, s)
    if table is not None:
      cell_dtype = np.uint8 if bits <= 8 else np.uint16
      return BloomierArray(jnp.asarray(table.astype(cell_dtype)),
                           jnp.asarray(cents), shape, dtype, seed=s,
                           hashes=hashes, bits=bits)
  _checks.fail(path, f"no peelable filter for {n} keys in {m} cells after "
                     f"{max_tries} seeds from {seed}; raise overhead "
                     f"(now {overhead})")
