"""DiffQ's pseudo-quantization noise: the training-time stand-in for rounding.

Uniform noise comes from a counter-based hash, not from one threefry draw per
weight: the noise is recomputed for every weight at every step, and threefry
(20 rounds per 32-bit word) made the DiffQ step about 2.7x the plain step on
CPU. One threefry draw per call gives two 32-bit seeds ``(s0, s1) =
jax.random.bits(key, (2,), uint32)``; the quantized leaves, in tree order,
share one stream of words: word ``j`` is ``h_j = fmix32((j * 0x9E3779B9 +
s0) ^ s1)`` (MurmurHash3's finalizer, all arithmetic mod 2^32), a leaf of
``n`` weights takes the next ``ceil(n / 2)`` words, and word ``o + j`` of a
leaf starting at word ``o`` gives the codes of its flattened weights ``2j``
(low 16 bits) and ``2j + 1`` (high 16 bits); the stream repeats after 2^32
words (2^33 weights in one tree). A code ``c`` becomes ``u = (c + 1/2) /
2^16 - 1/2``: the 16-bit midpoint grid of ``[-1/2, 1/2]``, symmetric, mean
exactly 0, variance ``(1 - 2^-32) / 12``, ``|u| <= 1/2 - 2^-17``. The noise
is ``Delta * u``, so its resolution is 2^-16 of one quantization step.

References:
  Défossez, Adi, Synnaeve, *Differentiable Model Compression via
  Pseudo Quantization Noise*, 2021. https://arxiv.org/abs/2104.09987
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from compressax._count import count_pair
from compressax.diffq import _bits

__all__ = ["noise_scale", "noisy"]

_NOISES = ("uniform", "gaussian")
_LANE_BITS = 16
_GOLDEN = 0x9E3779B9


def _fmix32(h):
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _word(j, seeds):
  """Word ``j`` of the stream: ``fmix32((j * golden + s0) ^ s1)``."""
  return _fmix32((j * jnp.uint32(_GOLDEN) + seeds[0]) ^ seeds[1])


def _unit(codes):
  """16-bit codes to the midpoint grid of ``[-1/2, 1/2]``, float32."""
  return (codes.astype(jnp.float32) + 0.5) * (2.0 ** -_LANE_BITS) - 0.5


def _n_words(shape) -> int:
  return -(-math.prod(shape) // (32 // _LANE_BITS))


def _uniform(seeds, shape, offset: int = 0) -> jax.Array:
  """U[-1/2, 1/2] on the 2^-16 midpoint grid, float32 (see module docstring).

  ``seeds`` is the uint32 pair ``(s0, s1)``; ``offset`` (static) is the index
  of the leaf's first word in the stream.
  """
  n = math.prod(shape)
  per = 32 // _LANE_BITS
  j = jax.lax.iota(jnp.uint32, _n_words(shape))
  if offset % 2 ** 32:
    j = j + jnp.uint32(offset % 2 ** 32)
  h = _word(j, seeds)
  shifts = (jnp.arange(per, dtype=jnp.uint32) * jnp.uint32(_LANE_BITS))[None, :]
  codes = (h[:, None] >> shifts) & jnp.uint32((1 << _LANE_BITS) - 1)
  codes = codes.reshape(-1)[:n].reshape(shape)
  return _unit(codes)


def _noise_dot(g, seeds, offset: int = 0) -> jax.Array:
  """``sum(g * u, axis=1)`` for ``g`` of shape ``(G, gs)``, ``u`` the noise.

  ``u`` is :func:`_uniform`'s for the ``G * gs`` weights from word
  ``offset`` on (past the leaf's end, ``g`` is zero), recomputed here. For
  short groups the sum is written column by column, each column's noise
  hashed from its own index: one elementwise expression over ``G`` that XLA
  fuses into a single pass reading ``g`` once. (A reduce goes to a library
  kernel that needs ``g * u`` written out first, and a halving tree shares
  each level between two slices, so XLA writes a level out rather than
  recompute it.)
  """
  n_groups, gs = g.shape
  if gs > 64:
    u = _uniform(seeds, (n_groups * gs,), offset).reshape(n_groups, gs)
    return jnp.sum(g * u, axis=1)
  first = jax.lax.iota(jnp.uint32, n_groups) * jnp.uint32(gs)

  def term(c: int) -> jax.Array:
    k = first + jnp.uint32(c)
    j = k >> 1
    if offset % 2 ** 32:
      j = j + jnp.uint32(offset % 2 ** 32)
    lane = (k & 1) * jnp.uint32(_LANE_BITS)
    codes = (_word(j, seeds) >> lane) & jnp.uint32((1 << _LANE_BITS) - 1)
    return g[:, c] * _unit(codes)

  total = term(0)  # gs >= 1: a group holds at least one weight
  for c in range(1, gs):
    total = total + term(c)
  return total


@jax.custom_vjp
def _value_range(x):
  return jnp.max(x) - jnp.min(x)


def _value_range_fwd(x):
  hi, lo = jnp.max(x), jnp.min(x)
  return hi - lo, (x, hi, lo)


def _value_range_bwd(res, g):
  # The gradient of max/min, shared equally among tied entries, as
  # `jnp.max`'s own rule. Written by hand because that rule builds the float
  # tie indicators in the forward pass and keeps them for the backward: two
  # full-size arrays written per tensor, which cost more than the noise.
  x, hi, lo = res
  at_hi, at_lo = x == hi, x == lo
  n_hi, n_lo = (c.astype(jnp.float32) for c in count_pair(at_hi, at_lo))
  zero = jnp.zeros_like(x)
  return (jnp.where(at_hi, g / n_hi, zero) - jnp.where(at_lo, g / n_lo, zero),)


_value_range.defvjp(_value_range_fwd, _value_range_bwd)


def noise_scale(x, bits) -> jax.Array:
  """DiffQ's step ``Delta = (max W - min W) / (2^bits - 1)``, float32.

  The range is taken over the whole tensor ``x``; ``bits`` broadcasts against
  it (e.g. per-weight bits from the groups). Differentiable in ``x`` as
  ``jnp.max - jnp.min`` (ties share the gradient equally) and in ``bits``.
  """
  x = jnp.asarray(x).astype(jnp.float32)
  return _value_range(x) / (jnp.exp2(bits) - 1.0)


def noisy(params, logits, key, *, group_size: int = 16, b_min: float = 2,
          b_max: float = 15, noise: str = "uniform") -> Any:
  """Adds DiffQ's pseudo-quantization noise to every quantized leaf.

  ``W_noisy = W + Delta * u`` with ``Delta = (max W - min W) / (2^bits - 1)``
  over the whole tensor and each group's bits broadcast to its weights;
  ``u ~ U[-1/2, 1/2]`` for ``noise="uniform"`` (the paper; drawn on a 2^-16
  grid by a seeded counter hash, see the module docstring) or ``N(0, 1) / 2``
  for ``"gaussian"`` (the reference code's default; threefry normals). The result is
  differentiable with respect to ``params`` (identity, plus the dependence of
  ``Delta`` on the tensor's min and max, as in the reference code) and to
  ``logits`` (through ``Delta``).

  Args:
    params: the parameter pytree.
    logits: bit logits from :func:`init_logits` (empty leaves pass through).
    key: a PRNG key; results are deterministic per key. Uniform noise: one
      stream for the whole tree (module docstring); Gaussian noise: the
      ``i``-th leaf (in tree order) uses ``jax.random.fold_in(key, i)``.
    group_size, b_min, b_max: as given to :func:`init_logits`.
    noise: ``"uniform"`` or ``"gaussian"``.

  Returns:
    A pytree like ``params``: noisy quantized leaves in their own dtype; the
    other leaves are the same objects.

  Raises:
    ValueError: for mismatched trees or logit counts, or a concrete NaN
      logit (naming the leaf path), a bad ``noise``, ``group_size`` or
      bounds. A traced NaN logit gives its group ``b_max`` bits.

  References:
    Défossez et al., *DiffQ*, 2021. https://arxiv.org/abs/2104.09987
  """
  group_size = _bits.check_group_size(group_size)
  _bits.check_bounds(b_min, b_max)
  if noise not in _NOISES:
    raise ValueError(f"noise must be one of {_NOISES}, got {noise!r}")
  treedef, triples = _bits.zip_logits(params, logits)
  out = []
  seeds, offset = None, 0
  for i, (path, x, logit) in enumerate(triples):
    if not _bits.is_quantized(path, x, logit, group_size):
      out.append(x)
      continue
    x = jnp.asarray(x)
    if noise == "uniform":
      if seeds is None:   # one threefry draw for the whole tree
        seeds = jax.random.bits(key, (2,), jnp.uint32)
      rand, off = seeds, offset
      offset += _n_words(x.shape)
    else:
      rand, off = jax.random.fold_in(key, i), 0
    out.append(_noisy_leaf(x, logit, rand, b_min, b_max, group_size=group_size,
                           noise=noise, offset=off))
  return jax.tree_util.tree_unflatten(treedef, out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _uniform_noisy(x, bits, seeds, group_size: int, offset: int):
  return _uniform_noisy_fwd(x, bits, seeds, group_size, offset)[0]


def _uniform_noisy_fwd(x, bits, seeds, group_size, offset):
  xf = x.astype(jnp.float32)
  hi, lo = jnp.max(xf), jnp.min(xf)
  delta = (hi - lo) / (jnp.exp2(bits) - 1.0)
  u = _uniform(seeds, x.shape, offset)
  out = (xf + _bits.expand(delta, x.shape, group_size) * u).astype(x.dtype)
  return out, (x, hi, lo, bits, seeds)


def _uniform_noisy_bwd(group_size, offset, res, g):
  # The same gradients as differentiating the forward pass (tested against
  # it), in two passes over the leaf plus the update of `x`, which XLA fuses
  # into the optimizer's: the noise is recomputed inside the per-group
  # reduction instead of being written out for it, and both tie counts of
  # the range rule come from one pass.
  x, hi, lo, bits, seeds = res
  g = g.astype(jnp.float32)
  # The barrier keeps XLA from merging this hash with the forward one (which
  # would write the noise out again).
  seeds, g = jax.lax.optimization_barrier((seeds, g))
  n = x.size
  gs = group_size if group_size else n
  n_groups = -(-n // gs)
  flat = g.reshape(-1)
  if n_groups * gs != n:
    flat = jnp.pad(flat, (0, n_groups * gs - n))
  # s_g = sum over the group of dL/dout * u = dL/dDelta_g.
  s = _noise_dot(flat.reshape(n_groups, gs), seeds, offset)
  s = s.reshape(bits.shape)
  levels = jnp.exp2(bits)
  r = hi - lo
  d_bits = s * r * (-math.log(2.0)) * levels / jnp.square(levels - 1.0)
  d_range = jnp.sum(s / (levels - 1.0))
  xf = x.astype(jnp.float32)
  n_hi, n_lo = (c.astype(jnp.float32) for c in count_pair(xf == hi, xf == lo))
  zero = jnp.zeros_like(g)
  dx = (g + jnp.where(xf == hi, d_range / n_hi, zero)
        - jnp.where(xf == lo, d_range / n_lo, zero))
  return dx.astype(x.dtype), d_bits, None


_uniform_noisy.defvjp(_uniform_noisy_fwd, _uniform_noisy_bwd)


# Jitted so that eager and jitted callers run the same compiled arithmetic
# (XLA's fusion may round differently from op-by-op execution).
@functools.partial(jax.jit, static_argnames=("group_size", "noise", "offset"))
def _noisy_leaf(x, logit, rand, b_min, b_max, *, group_size, noise, offset):
  # `rand`: the uint32 seed pair (uniform) or the leaf's PRNG key (gaussian).
  if noise == "uniform":
    bits = _bits.logit_bits(logit, b_min, b_max)
    return _uniform_noisy(x, bits, rand, group_size, offset)
  u = jax.random.normal(rand, x.shape, jnp.float32) / 2
  # Delta per group (one exp2 per group, not per weight), then broadcast.
  delta = noise_scale(x, _bits.logit_bits(logit, b_min, b_max))
  delta = _bits.expand(delta, x.shape, group_size)
  return (x.astype(jnp.float32) + delta * u).astype(x.dtype)
