"""Uniform quantization: affine or symmetric grids per tensor, channel or bucket.

Fake quantization, its straight-through twin and the stored
:class:`QuantizedArray` share one compiled pipeline and agree bit for bit:

1. *Scale groups.* The whole tensor (default), or one group per index of the
   channel ``axis``; with ``bucket_size=k`` each group is flattened and cut
   into buckets of ``k`` values (Polino et al.). The last bucket is padded by
   repeating its own last value, so padding never moves its min or max.
2. *Scales.* Affine: ``alpha = max - min`` (``1`` when ``alpha < 1e-10``),
   ``beta = min``, ``L = 2^bits - 1`` intervals, ``scale = alpha / L``,
   ``offset = beta``, zero point 0. Symmetric: ``m = max|x|`` (``1`` when
   ``m < 1e-10``), ``Q = 2^(bits-1) - 1``, ``scale = m / Q``, ``offset = 0``,
   zero point ``Q``: a grid of ``2 Q + 1 = 2^bits - 1`` levels centred on an
   exact zero (one code of ``2^bits`` is unused).
3. *Codes.* ``c = round(y)`` (round half to even) or, stochastically,
   ``floor(y) + Bernoulli(y - floor(y))``, with ``y = (x - offset) / scale``;
   stored as ``c + zero point``, clipped to ``[0, 2 zero point or L]``.
4. *Dequantization.* ``(c - zero point) * scale + offset``.

With ``scale_dtype`` (float16 or bfloat16, as GPTQ checkpoints store them)
the scales and offsets are rounded to that dtype in step 2 (clamped into its
finite range; a scale to at least its smallest subnormal), the codes are
computed against the rounded values, and the node stores them in that dtype:
half the bytes per group, and fake quantization still equals the stored node
bit for bit.

Arithmetic runs in float32 (float64 for float64 inputs) and the result is cast
back to ``x.dtype``.

References:
  Polino, Pascanu, Alistarh. *Model compression via distillation and
  quantization*. ICLR 2018. https://arxiv.org/abs/1802.05668
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from compressax import _checks
from compressax import _node
from compressax import _sharding


__all__ = ["QuantizedArray", "dequantize", "quantize", "uniform",
           "uniform_ste"]


_TINY = 1e-10


def _norm_axis(path, axis, ndim) -> tuple[int, ...] | None:
  if axis is None:
    return None
  axes = axis if isinstance(axis, (tuple, list)) else (axis,)
  if not axes:
    _checks.fail(path, "axis must be an int, a non-empty tuple of ints or None")
  out = []
  for a in axes:
    if isinstance(a, (bool, np.bool_)) or not isinstance(a, (int, np.integer)):
      _checks.fail(path, f"axis must be an int or a tuple of ints, got {axis!r}",
                   TypeError)
    out.append(_checks.check_axis(path, int(a), ndim))
  if len(set(out)) != len(out):
    _checks.fail(path, f"axis {axis!r} repeats an axis")
  return tuple(sorted(out))


def _check_bits(path, bits, symmetric) -> None:
  if isinstance(bits, (bool, np.bool_)):
    _checks.fail(path, f"bits must be an integer, got {bits!r}", TypeError)
  if _checks.is_concrete(bits):
    if np.ndim(bits) != 0:
      _checks.fail(path, f"bits must be a scalar, got shape {np.shape(bits)}")
    _checks.check_bits(path, bits, lo=2 if symmetric else 1)
  elif jnp.ndim(bits) != 0:
    _checks.fail(path, f"bits must be a scalar, got shape {jnp.shape(bits)}")


def as_array(path, x, fn: str):
  """``x`` as an array; a pytree (dict, node, ...) is a ``TypeError``."""
  node = isinstance(x, _node.CompressedLeaf)
  if hasattr(x, "dtype") and hasattr(x, "shape") and not node:
    return x
  if not node and not isinstance(x, dict) and not hasattr(x, "items"):
    try:
      return jnp.asarray(x)
    except (TypeError, ValueError):
      pass
  _checks.fail(path, f"cx.quantize.{fn} takes one array, got a "
                     f"{type(x).__name__}; for a params tree use "
                     f"cx.quantize.apply(params, functools.partial("
                     f"cx.quantize.{fn}, bits=...)) or cx.map_selected",
               TypeError)


_SCALE_DTYPES = ("float16", "bfloat16", "float32")


def _scale_dtype(path, scale_dtype, x) -> str | None:
  """``scale_dtype`` as a name (``None``: the compute dtype); checks ``x`` fits."""
  if scale_dtype is None:
    return None
  try:
    name = jnp.dtype(scale_dtype).name
  except TypeError:
    name = None
  if name not in _SCALE_DTYPES:
    _checks.fail(path, f"scale_dtype must be None or one of {_SCALE_DTYPES}, got "
                       f"{scale_dtype!r}", TypeError)
  if name == "float32" and jnp.dtype(_compute_dtype(x.dtype)).name == "float32":
    return None  # the compute dtype already
  big = float(jnp.finfo(name).max)
  if _checks.is_concrete(x) and x.size:
    with jax.ensure_compile_time_eval():
      peak = float(jnp.max(jnp.abs(x)))
    if peak > big:
      _checks.fail(path, f"|x| reaches {peak:.4g}, beyond the {name} scales' "
                         f"range ({big:.4g})")
  return name


def _validate(path, x, bits, symmetric, axis, bucket_size, stochastic, key,
              fn="uniform"):
  """Checks shared by every entry point; returns the normalised axes."""
  x = as_array(path, x, fn)
  _checks.check_floating(path, x)
  _check_bits(path, bits, symmetric)
  axes = _norm_axis(path, axis, x.ndim)
  if bucket_size is not None:
    if isinstance(bucket_size, bool) or not isinstance(bucket_size,
                                                       (int, np.integer)):
      _checks.fail(path, f"bucket_size must be an int or None, got "
                         f"{bucket_size!r}", TypeError)
    if bucket_size < 1:
      _checks.fail(path, f"bucket_size must be >= 1, got {bucket_size}")
  if stochastic and key is None:
    _checks.fail(path, "stochastic=True needs a PRNG `key`")
  # A concrete array closed over by a jitted function is still checked.
  with jax.ensure_compile_time_eval():
    _checks.check_finite(path, x)
  return x, axes


def _bits_int(bits, symmetric) -> jax.Array:
  # Traced bits cannot be checked: they are rounded and clipped into range,
  # and NaN means the most bits (the least compression), never NaN output.
  b = jnp.round(jnp.asarray(bits, jnp.float32))
  b = jnp.where(jnp.isnan(b), 16.0, b)
  return jnp.clip(b, 2 if symmetric else 1, 16).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Where the scale groups of an array of ``shape`` lie.

  Without buckets the array is used in place: a group is everything that
  shares the indices along ``axes`` and the scales keep ``x``'s rank (size 1
  on the reduced axes), so no transpose is needed. With buckets the array
  becomes a ``(groups, bucket_size)`` matrix, channel by channel.
  """
  shape: tuple[int, ...]
  axes: tuple[int, ...] | None
  bucket_size: int | None

  @property
  def perm(self) -> tuple[int, ...]:  # kept axes first, then the others
    kept = self.axes or ()
    return kept + tuple(i for i in range(len(self.shape)) if i not in kept)

  @property
  def rows(self) -> int:
    return math.prod(self.shape[a] for a in (self.axes or ()))

  @property
  def row_len(self) -> int:
    return math.prod(self.shape) // max(self.rows, 1)

  @property
  def reduce_axes(self) -> tuple[int, ...]:
    return (1,) if self.bucket_size else self.perm[len(self.axes or ()):]

  @property
  def scale_shape(self) -> tuple[int, ...]:
    if self.bucket_size:
      return (self.rows * -(-self.row_len // self.bucket_size), 1)
    return tuple(1 if i in self.reduce_axes else d
                 for i, d in enumerate(self.shape))

  def view(self, x):
    if self.bucket_size is None:
      return x
    whole = not self.row_len % self.bucket_size
    target = _sharding.rows_sharding(
        x, math.prod(self.shape) // self.bucket_size) if whole else None
    if target is not None:
      # x split over explicit mesh axes, no padding: the buckets are split
      # over the same devices (a relayout; no value changes).
      return jnp.reshape(jnp.transpose(x, self.perm), (-1, self.bucket_size),
                         out_sharding=target)
    # Otherwise a bucket may straddle shards: work on a gathered copy (a
    # classic mesh's partitioner copes by itself).
    if _sharding.explicit(x) is not None:
      x = _sharding.replicated(x)
    m = jnp.transpose(x, self.perm).reshape(self.rows, self.row_len)
    pad = -self.row_len % self.bucket_size
    # Edge padding repeats a value of the last bucket, so min/max are exact.
    m = jnp.pad(m, ((0, 0), (0, pad)), mode="edge")
    return m.reshape(-1, self.bucket_size)

  def unview(self, m, like=None):
    """The inverse of :meth:`view`, in the sharding of ``like`` if given."""
    if self.bucket_size is None:
      return m
    moved = tuple(self.shape[i] for i in self.perm)
    back = tuple(np.argsort(self.perm).tolist())  # the inverse permutation
    s = _sharding.explicit(like)
    if s is not None and not self.row_len % self.bucket_size:
      spec = tuple(s.spec) + (None,) * (len(self.shape) - len(s.spec))
      out = jnp.reshape(m, moved, out_sharding=NamedSharding(
          s.mesh, P(*(spec[i] for i in self.perm))))
      return jnp.transpose(out, back)
    if _sharding.explicit(m) is not None:
      m = _sharding.replicated(m)
    m = m.reshape(self.rows, -1)[:, :self.row_len]
    out = jnp.transpose(m.reshape(moved), back)
    return out if like is None else _sharding.like(out, like)


def _compute_dtype(dtype):
  return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def _zero_point(b, symmetric, dtype):
  if symmetric:
    return (jnp.left_shift(1, b - 1) - 1).astype(dtype)
  return jnp.zeros((), dtype)


def _scales(g, b, symmetric, layout):
  """Per group: ``scale``, ``1/scale``, ``offset``; the zero point, top code.

  XLA rewrites a division by a compile-time constant into a multiplication
  by its reciprocal, so ``alpha / levels`` would round differently when
  ``bits`` is a constant than when it is traced. Multiplying by an explicit
  reciprocal gives the same bits either way.
  """
  zero = _zero_point(b, symmetric, g.dtype)
  axes = layout.reduce_axes
  if symmetric:
    m = jnp.max(jnp.abs(g), axis=axes, keepdims=True)
    m = jnp.where(m < _TINY, jnp.ones_like(m), m)
    return m * (1 / zero), zero / m, jnp.zeros_like(m), zero, 2 * zero
  levels = (jnp.left_shift(1, b) - 1).astype(g.dtype)
  lo = jnp.min(g, axis=axes, keepdims=True)
  hi = jnp.max(g, axis=axes, keepdims=True)
  # Half the range, so that max - min cannot overflow (a span of +-2e38).
  # Halving is exact, hence alpha * r == half * (2 r) and levels / alpha ==
  # (levels / 2) / half bit for bit: finite ranges give the same grid.
  half = hi * 0.5 - lo * 0.5
  half = jnp.where(half < _TINY / 2, jnp.full_like(half, 0.5), half)
  return half * (2 / levels), (levels * 0.5) / half, lo, zero, levels


def _round_scales(scale, offset, scale_dtype):
  """Scales and offsets rounded to ``scale_dtype`` (clamped into its finite
  range, a scale to at least its smallest subnormal so it is never 0 or inf),
  back in the compute dtype."""
  info = jnp.finfo(scale_dtype)
  big, tiny = float(info.max), float(info.smallest_subnormal)
  scale = jnp.clip(scale, tiny, big).astype(scale_dtype).astype(scale.dtype)
  offset = jnp.clip(offset, -big, big).astype(scale_dtype).astype(offset.dtype)
  return scale, 1 / scale, offset


def _dequant(codes, scale, offset, zero):
  return (codes - zero) * scale + offset


def _encode(x, bits, symmetric, layout, stochastic, key, scale_dtype=None):
  """Float-valued codes (viewed) and the scales (of ``layout.scale_shape``)."""
  cdt = _compute_dtype(x.dtype)
  g = layout.view(x.astype(cdt))
  scale, inv, offset, zero, top = _scales(g, _bits_int(bits, symmetric),
                                          symmetric, layout)
  if scale_dtype is not None:
    scale, inv, offset = _round_scales(scale, offset, scale_dtype)
  # Round before adding the zero point so that ties break symmetrically.
  # Halved like the range, so that x - min cannot overflow either.
  y = (g * 0.5 - offset * 0.5) * (inv * 2)
  if stochastic:
    lo = jnp.floor(y)
    u = jax.random.uniform(key, y.shape, cdt)
    codes = lo + (u < y - lo).astype(cdt)
  else:
    codes = jnp.round(y)
  return jnp.clip(codes + zero, 0, top), scale, offset, zero


# Every entry point runs compiled: XLA contracts `c * scale + offset` into a
# fused multiply-add, so op-by-op (eager) execution would differ in the last
# bit from the same code under a user's jit.
@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6))
def _fake(x, bits, key, symmetric, layout, stochastic, scale_dtype=None):
  codes, scale, offset, zero = _encode(x, bits, symmetric, layout, stochastic,
                                       key, scale_dtype)
  return layout.unview(_dequant(codes, scale, offset, zero), x).astype(x.dtype)


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6, 7))
def _quantize_jit(x, bits, key, symmetric, layout, stochastic, code_dtype,
                  scale_dtype=None):
  codes, scale, offset, _ = _encode(x, bits, symmetric, layout, stochastic, key,
                                    scale_dtype)
  if scale_dtype is not None:  # exact: they were rounded to it
    scale, offset = scale.astype(scale_dtype), offset.astype(scale_dtype)
  # A symmetric grid's offset is identically zero: store none.
  offset = offset[:0] if symmetric else offset
  # Codes in x's sharding; the (small) scales and offsets replicated.
  return (layout.unview(codes, x).astype(code_dtype),
          _sharding.replicated(scale.reshape(-1)),
          _sharding.replicated(offset.reshape(-1)))


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6))
def _materialize_jit(codes, scale, offset, bits, symmetric, layout, dtype):
  # Narrow (float16/bfloat16) scales widen exactly to the compute dtype.
  cdt = _compute_dtype(scale.dtype)
  scale, offset = scale.astype(cdt), offset.astype(cdt)
  zero = _zero_point(_bits_int(bits, symmetric), symmetric, cdt)
  g = layout.view(codes.astype(cdt))
  scale = scale.reshape(layout.scale_shape)
  offset = (jnp.zeros_like(scale) if symmetric
            else offset.reshape(layout.scale_shape))
  return layout.unview(_dequant(g, scale, offset, zero), codes).astype(dtype)


def uniform(x, bits, *, symmetric: bool = False, axis=None,
            bucket_size: int | None = None, stochastic: bool = False, key=None,
            scale_dtype=None, path: Any = "x") -> jax.Array:
  """Fake-quantize ``x`` on a uniform grid (quantize, then dequantize).

  Args:
    x: a floating-point array (float32, bfloat16, float16, ...).
    bits: bits per value, an integer in ``[1, 16]`` (``[2, 16]`` when
      ``symmetric``). May be a traced scalar (so ``jax.vmap`` over bits
      works); a traced value is rounded and clipped into that range, and a
      traced NaN means 16 bits.
    symmetric: ``False``: affine min/max grid of ``2^bits`` levels (Polino et
      al.). ``True``: abs-max grid of ``2^bits - 1`` levels symmetric about an
      exact zero.
    axis: ``None`` for one scale per tensor, or the channel axis (an int or a
      tuple of ints): one scale per index along it, e.g. ``axis=-1`` for a
      Dense kernel's output features.
    bucket_size: if set, each scale group (the tensor, or each channel's
      values when ``axis`` is also set) is flattened and cut into buckets of
      this many values with one scale each; the last bucket is padded without
      changing its min/max.
    stochastic: round down or up with probability equal to the remainder
      (unbiased) instead of to the nearest level (round half to even).
    key: a PRNG key, required when ``stochastic``.
    scale_dtype: ``None`` (scales in the compute dtype, float32), or
      ``"float16"``/``"bfloat16"``: scales and offsets rounded to that dtype
      before the codes are chosen, and stored in it by :func:`quantize`
      (2 bytes per group instead of 4).
    path: the name used in error messages (the tree form passes the leaf's
      path).

  Returns:
    The dequantized array, same shape and dtype as ``x``.

  Raises:
    TypeError: ``x`` is not floating point or not an array (a params tree
      goes through :func:`~compressax.quantize.apply`), or
      ``axis``/``bucket_size`` has the wrong type.
    ValueError: concrete ``bits`` out of range or not an integer, bad
      ``axis`` or ``bucket_size``, NaN/Inf in a concrete ``x`` (or values
      beyond ``scale_dtype``'s range), or ``stochastic`` without ``key``.

  Example:
    >>> w = jnp.linspace(-1.0, 1.0, 512).reshape(32, 16)
    >>> q = uniform(w, 4, bucket_size=256)
    >>> qs = jax.vmap(lambda b: uniform(w, b))(jnp.arange(2, 9))

  References:
    Polino, Pascanu, Alistarh. *Model compression via distillation and
    quantization*. ICLR 2018. https://arxiv.org/abs/1802.05668
  """
  x, axes = _validate(path, x, bits, symmetric, axis, bucket_size, stochastic,
                      key)
  sd = _scale_dtype(path, scale_dtype, x)
  if x.size == 0:
    return x
  layout = _Layout(tuple(x.shape), axes, bucket_size)
  return _sharding.like(_fake(x, jnp.asarray(bits), key if stochastic else None,
                              bool(symmetric), layout, bool(stochastic), sd), x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _ste_core(x, bits, key, config):
  return _fake(x, bits, key, *config)


def _ste_fwd(x, bits, key, config):
  return _ste_core(x, bits, key, config), None


def _ste_bwd(config, res, g):
  del config, res
  return g, None, None


_ste_core.defvjp(_ste_fwd, _ste_bwd)


def uniform_ste(x, bits, *, symmetric: bool = False, axis=None,
                bucket_size: int | None = None, stochastic: bool = False,
                key=None, scale_dtype=None, path: Any = "x") -> jax.Array:
  """:func:`uniform` with a straight-through gradient, for quantization-aware training.

  The forward value is exactly ``uniform(x, bits, ...)``; the backward pass
  treats quantization as the identity, ``d out / d x = 1`` everywhere: both
  grids span their group's own range (min/max, or +-abs-max), so no value is
  clipped and there is no out-of-range region to zero. ``bits`` and ``key``
  get no gradient. Arguments, return value and errors as :func:`uniform`.

  References:
    Bengio, Leonard, Courville. *Estimating or propagating gradients through
    stochastic neurons*. 2013. https://arxiv.org/abs/1308.3432
    Polino et al. ICLR 2018. https://arxiv.org/abs/1802.05668
  """
  x, axes = _validate(path, x, bits, symmetric, axis, bucket_size, stochastic,
                      key, "uniform_ste")
  sd = _scale_dtype(path, scale_dtype, x)
  if x.size == 0:
    return x
  config = (bool(symmetric), _Layout(tuple(x.shape), axes, bucket_size),
            bool(stochastic), sd)
  return _sharding.like(
      _ste_core(x, jnp.asarray(bits), key if stochastic else None, config), x)


@_node.compressed_leaf(name="compressax.QuantizedArray", pointwise=("codes",))
@dataclasses.dataclass(frozen=True)
class QuantizedArray(_node.CompressedLeaf):
  """Uniformly quantized array: integer codes plus per-group scale and offset.

  ``codes`` has the dense array's shape (uint8 for ``bits <= 8``, uint16
  above); ``scale`` and ``offset`` are float32 (float64 for float64 arrays,
  or the ``scale_dtype`` they were quantized with) of shape ``(groups,)`` in
  group order (channels in ``axis`` order, then buckets); a symmetric grid's
  ``offset`` is empty (it is zero). A value dequantizes to
  ``(code - zero) * scale + offset`` with ``zero = 2^(bits-1) - 1`` when
  ``symmetric`` and ``0`` otherwise.
  """

  codes: jax.Array
  scale: jax.Array
  offset: jax.Array
  bits: int = dataclasses.field(metadata=dict(static=True))
  shape: tuple = dataclasses.field(metadata=dict(static=True))
  dtype: np.dtype = dataclasses.field(metadata=dict(static=True))
  symmetric: bool = dataclasses.field(default=False, metadata=dict(static=True))
  axis: tuple | None = dataclasses.field(default=None,
                                         metadata=dict(static=True))
  bucket_size: int | None = dataclasses.field(default=None,
                                              metadata=dict(static=True))

  def materialize(self) -> jax.Array:
    """The dequantized array; equals :func:`uniform` with the same options."""
    axes = None if self.axis is None else tuple(self.axis)
    layout = _Layout(tuple(self.shape), axes, self.bucket_size)
    return _sharding.like(_materialize_jit(
        self.codes, self.scale, self.offset, int(self.bits),
        bool(self.symmetric), layout, np.dtype(self.dtype)), self.codes)

  def validate(self) -> None:
    """Codes of the dense shape within ``bits``; one scale (offset) per group."""
    super().validate()
    bits, lo = self.bits, 2 if self.symmetric else 1
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) \
        or not lo <= bits <= 16:
      raise ValueError(f"bits must be an int in [{lo}, 16], got {bits!r}")
    if not isinstance(self.symmetric, bool):
      raise ValueError(f"symmetric must be a bool, got {self.symmetric!r}")
    shape = tuple(self.shape)
    axes = self.axis
    if axes is not None:
      axes = tuple(axes)
      if not all(isinstance(a, int) and not isinstance(a, bool)
                 and 0 <= a < len(shape) for a in axes) or \
          len(set(axes)) != len(axes):
        raise ValueError(f"axis {self.axis!r} does not fit shape {shape}")
    b = self.bucket_size
    if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 1):
      raise ValueError(f"bucket_size must be None or an int >= 1, got {b!r}")
    _node.check_codes(self.codes, shape, bits=bits)
    n = math.prod(_Layout(shape, axes, b).scale_shape) if math.prod(shape) else None
    for name, want in (("scale", n), ("offset", 0 if self.symmetric else n)):
      v = np.asarray(getattr(self, name))
      if v.ndim != 1 or (want is not None and v.shape[0] != want) or \
          not jnp.issubdtype(v.dtype, jnp.floating):
        raise ValueError(f"{name} must be floats of shape ({want},), got "
                         f"{v.dtype}{list(v.shape)}")

  def storage_bits(self) -> int:
    """``codes.size * bits`` plus the scales' and offsets' own bits.

    Affine groups store a scale and an offset (two float32s, or two float16s
    with ``scale_dtype``), symmetric groups only the scale. Padding of the last
    bucket is not stored. For affine float32 buckets of ``k`` values this is
    Polino's ratio ``k*32 / (k*bits + 2*32)`` against float32.
    """
    floats = sum(8 * np.dtype(v.dtype).itemsize * int(np.size(v))
                 for v in (self.scale, self.offset))
    return int(np.size(self.codes)) * int(self.bits) + floats


def quantize(x, bits: int, *, symmetric: bool = False, axis=None,
             bucket_size: int | None = None, stochastic: bool = False,
             key=None, scale_dtype=None, path: Any = "x") -> QuantizedArray:
  """Quantize ``x`` into a :class:`QuantizedArray` (integer codes + scales).

  Same options as :func:`uniform`; ``node.materialize()`` equals
  ``uniform(x, bits, ...)`` bit for bit. ``bits`` must be a concrete Python
  int here (it decides the codes' dtype); ``x`` may be traced.

  Raises:
    TypeError: ``bits`` is traced, or as :func:`uniform`.
    ValueError: as :func:`uniform`, or ``x`` is empty.

  References:
    Polino et al. ICLR 2018. https://arxiv.org/abs/1802.05668
  """
  if not _checks.is_concrete(bits):
    _checks.fail(path, "quantize needs a concrete (Python int) `bits`: it "
                       "decides the codes' dtype; use `uniform` for traced bits",
                 TypeError)
  x, axes = _validate(path, x, bits, symmetric, axis, bucket_size, stochastic,
                      key, "quantize")
  sd = _scale_dtype(path, scale_dtype, x)
  if x.size == 0:
    _checks.fail(path, "cannot quantize an empty array")
  bits = int(bits)
  layout = _Layout(tuple(x.shape), axes, bucket_size)
  dtype = np.dtype(np.uint8 if bits <= 8 else np.uint16)
  codes, scale, offset = _quantize_jit(
      x, jnp.asarray(bits), key if stochastic else None, bool(symmetric),
      layout, bool(stochastic), dtype, sd)
  return QuantizedArray(
      codes=_sharding.like(codes, x), scale=_sharding.replicate_like(scale, x),
      offset=_sharding.replicate_like(offset, x), bits=bits, shape=tuple(x.shape),
      dtype=np.dtype(x.dtype), symmetric=bool(symmetric), axis=axes,
      bucket_size=None if bucket_size is None else int(bucket_size))


def dequantize(node: QuantizedArray) -> jax.Array:
  """The dense array a :class:`QuantizedArray` stands for."""
  return node.materialize()
