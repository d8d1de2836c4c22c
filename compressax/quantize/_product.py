"""Product quantization of the rows of a matrix (Jégou et al. 2011).

A matrix ``x`` of shape ``(rows, d)`` is cut into ``m`` column chunks of
``d / m`` columns. In each chunk the rows are clustered by k-means into
``K = 2**bits`` codewords, and row ``r`` is stored as ``m`` codes, one per
chunk: the index of its nearest codeword there. A row is rebuilt by
concatenating its ``m`` codewords. The table then costs ``rows * m * bits``
bits of codes plus ``m * K * d / m`` floats of codebooks, instead of
``rows * d`` floats.

References:
  Jégou, Douze, Schmid, *Product quantization for nearest neighbor search*,
  IEEE TPAMI 33(1), 2011. https://doi.org/10.1109/TPAMI.2010.57
  Lloyd, *Least squares quantization in PCM*, IEEE Trans. Inf. Theory 28(2),
  1982. https://doi.org/10.1109/TIT.1982.1056489
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from compressax import _checks
from compressax._node import CompressedLeaf
from compressax._node import check_codes
from compressax._node import compressed_leaf
from compressax.quantize._codebook import codes_dtype

__all__ = ["ProductQuantizedArray", "product"]

_HIGHEST = jax.lax.Precision.HIGHEST


def gather_rows(codes, codebooks):
  """Row ``r`` = concat over ``j`` of ``codebooks[j, codes[r, j]]``.

  ``codes`` ``(rows, m)`` (any int or float holding ints), ``codebooks``
  ``(m, K, d / m)``; returns ``(rows, d)`` in the codebooks' dtype, with a
  gradient to ``codebooks`` (the sum of the gradients of the rows that use
  each codeword) and none to ``codes``.
  """
  idx = jax.lax.stop_gradient(codes).astype(jnp.int32)
  m = codebooks.shape[0]
  rows = idx.shape[0]
  out = codebooks[jnp.arange(m)[None, :], idx]  # (rows, m, d / m)
  return out.reshape(rows, m * codebooks.shape[2])


@compressed_leaf(name="compressax.ProductQuantizedArray")
@dataclasses.dataclass(frozen=True)
class ProductQuantizedArray(CompressedLeaf):
  """A 2-D array stored by product quantization of its rows.

  Attributes:
    codes: unsigned integers ``(rows, m)`` (uint8 when ``bits <= 8``, else
      uint16); ``codes[r, j]`` indexes ``codebooks[j]``.
    codebooks: floats ``(m, K, d / m)`` with ``K = 2**bits``.
    shape: the dense shape ``(rows, d)`` (static).
    dtype: the dense dtype (static).
    bits: bits per code, ``K = 2**bits`` codewords per chunk (static).

  :meth:`storage_bits` is ``rows * m * bits`` plus the codebooks at their
  dtype's width (``32 * m * K * d / m`` for float32); entropy coding of the
  codes is not counted.

  References:
    Jégou, Douze, Schmid, *Product quantization for nearest neighbor
    search*, IEEE TPAMI 2011. https://doi.org/10.1109/TPAMI.2010.57
  """
  codes: jax.Array
  codebooks: jax.Array
  shape: tuple = dataclasses.field(metadata=dict(static=True))
  dtype: np.dtype = dataclasses.field(metadata=dict(static=True))
  bits: int = dataclasses.field(metadata=dict(static=True))

  @property
  def subvectors(self) -> int:
    """m, the number of column chunks (codes per row)."""
    return int(self.codebooks.shape[0])

  @property
  def n_codewords(self) -> int:
    """K = 2**bits, the codewords per chunk."""
    return 1 << int(self.bits)

  def materialize(self) -> jax.Array:
    """The gathered rows in the dense dtype (gradient to ``codebooks``)."""
    return gather_rows(self.codes, self.codebooks).astype(self.dtype).reshape(self.shape)

  def storage_bits(self) -> int:
    cb = int(np.prod(self.codebooks.shape, dtype=np.int64))
    return (int(np.prod(self.codes.shape, dtype=np.int64)) * int(self.bits)
            + cb * np.dtype(self.codebooks.dtype).itemsize * 8)

  def validate(self) -> None:
    """Codes ``(rows, m)`` below ``2**bits``; codebooks ``(m, 2**bits, d / m)``."""
    super().validate()
    bits = self.bits
    if (isinstance(bits, bool) or not isinstance(bits, (int, np.integer))
        or not 1 <= bits <= 16):
      raise ValueError(f"bits must be an int in [1, 16], got {bits!r}")
    if len(self.shape) != 2:
      raise ValueError(f"shape must be 2-D (rows, d), got {self.shape!r}")
    rows, d = self.shape
    # Shapes only: nothing is allocated before they agree with the meta.
    cshape = tuple(np.shape(self.codebooks))
    cdtype = np.dtype(getattr(self.codebooks, "dtype", np.float64))
    k = 1 << int(bits)
    if (len(cshape) != 3 or cshape[0] < 1 or cshape[1] != k
        or cshape[0] * cshape[2] != d or not np.issubdtype(cdtype, np.floating)):
      raise ValueError(f"codebooks must be floats of shape (m, {k}, {d} / m) "
                       f"with m >= 1, got {cdtype}{list(cshape)}")
    check_codes(self.codes, (rows, cshape[0]), bits=int(bits))


def _check_int(path, name, value, lo, hi=None):
  if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
      or value < lo or (hi is not None and value > hi)):
    rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
    _checks.fail(path, f"{name} must be a Python int {rng}, got {value!r}")


def _assign(sub, cents):
  """Nearest codeword per row (ties to the lowest index)."""
  # ||x - c||^2 less the row's own ||x||^2, which does not change the argmin.
  d2 = (jnp.sum(cents * cents, axis=1)[None, :]
        - 2.0 * jnp.matmul(sub, cents.T, precision=_HIGHEST))
  return jnp.argmin(d2, axis=1).astype(jnp.int32)


def _lloyd(sub, cents, iters):
  """``iters`` Lloyd steps on one chunk; then the final assignment."""
  k = cents.shape[0]

  def step(_, c):
    # One-hot sums, not a scatter-add: deterministic on every backend, and
    # no larger than the (rows, K) distance matrix already is.
    onehot = jax.nn.one_hot(_assign(sub, c), k, dtype=jnp.float32)
    sums = jnp.matmul(onehot.T, sub, precision=_HIGHEST)
    counts = jnp.sum(onehot, axis=0)[:, None]
    # An empty cluster keeps its codeword.
    return jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), c)

  cents = jax.lax.fori_loop(0, iters, step, cents)
  return cents, _assign(sub, cents)


def init_rows(key, rows, k, m):
  """The rows that start each chunk's k-means: ``(m, K)`` distinct indices.

  Chunk ``j`` starts from the rows of the ``K`` smallest of
  ``jax.random.bits(key, (m, rows))[j]`` (a stable argsort: a random
  permutation of the rows, ties in row order).
  """
  return jnp.argsort(jax.random.bits(key, (m, rows)), axis=1, stable=True)[:, :k]


@functools.partial(jax.jit, static_argnames=("m", "bits", "iters"))
def _product_impl(x, key, *, m, bits, iters):
  rows, d = x.shape
  k = 1 << bits
  chunks = x.astype(jnp.float32).reshape(rows, m, d // m).transpose(1, 0, 2)
  starts = init_rows(key, rows, k, m)

  def one(args):
    sub, idx = args
    return _lloyd(sub, sub[idx], iters)

  # One chunk at a time: the (rows, K) work arrays exist once, not m times.
  books, codes = jax.lax.map(one, (chunks, starts))
  return codes.T.astype(codes_dtype(k)), books


def product(x, *, subvectors: int, bits: int, key, iters: int = 25,
            path="x") -> ProductQuantizedArray:
  """Product quantization of the rows of ``x`` (Jégou et al. 2011).

  The ``d`` columns are cut into ``subvectors`` (m) consecutive chunks of
  ``d / m`` columns. In each chunk, Lloyd's k-means clusters the ``rows``
  points into ``K = 2**bits`` codewords: it starts from ``K`` distinct rows
  drawn with ``key`` (see :func:`init_rows`), then runs ``iters`` steps of
  (assign every row to its nearest codeword, ties to the lowest index; move
  each codeword to the mean of its rows, an empty cluster keeping its
  codeword), and the codes are a last assignment to the final codewords.
  The work runs in float32, one chunk at a time, with a ``(rows, K)``
  distance matrix; it is jitted (eager and jitted calls give the same bits)
  and may itself be called under ``jax.jit`` with a traced ``key``.

  Args:
    x: a 2-D floating-point array ``(rows, d)``, finite.
    subvectors: m, a Python int dividing ``d``.
    bits: a Python int in [1, 16]; ``K = 2**bits`` must not exceed ``rows``.
    key: a PRNG key choosing the starting rows.
    iters: Lloyd steps (a Python int >= 0).
    path: the name used in error messages.

  Returns:
    A :class:`ProductQuantizedArray` of ``x``'s shape and dtype, with
    float32 codebooks.

  Raises:
    TypeError: for a non-float ``x``.
    ValueError: for ``x`` not 2-D or not finite, ``subvectors`` not dividing
      ``d``, ``bits`` outside [1, 16], more codewords than rows, or a
      negative ``iters``.

  Example:
    >>> import jax, jax.numpy as jnp, compressax as cx
    >>> x = jnp.array([[0., 0., 5., 5.], [0., 1., 5., 6.], [9., 9., 0., 1.]])
    >>> pq = cx.quantize.product(x, subvectors=2, bits=1,
    ...                          key=jax.random.key(0))
    >>> pq.codes.shape, pq.codebooks.shape, pq.storage_bits()
    ((3, 2), (2, 2, 2), 262)

  References:
    Jégou, Douze, Schmid, *Product quantization for nearest neighbor
    search*, IEEE TPAMI 33(1), 2011. https://doi.org/10.1109/TPAMI.2010.57
    Lloyd, *Least squares quantization in PCM*, 1982.
    https://doi.org/10.1109/TIT.1982.1056489
  """
  _checks.check_floating(path, x)
  if np.ndim(x) != 2:
    _checks.fail(path, f"product quantization needs a 2-D (rows, d) array, "
                       f"got shape {tuple(np.shape(x))}")
  _checks.check_finite(path, x)
  rows, d = np.shape(x)
  _check_int(path, "subvectors", subvectors, 1)
  if d % subvectors:
    _checks.fail(path, f"subvectors ({subvectors}) must divide the {d} columns")
  _check_int(path, "bits", bits, 1, 16)
  _check_int(path, "iters", iters, 0)
  if (1 << bits) > rows:
    _checks.fail(path, f"2**bits = {1 << bits} codewords need at least as many "
                       f"rows, got {rows}")
  if key is None:
    _checks.fail(path, "product quantization needs a PRNG `key` (its k-means start)")
  codes, books = _product_impl(jnp.asarray(x), key, m=int(subvectors),
                               bits=int(bits), iters=int(iters))
  return ProductQuantizedArray(codes, books, (int(rows), int(d)),
                               np.dtype(x.dtype), int(bits))
