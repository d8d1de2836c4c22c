"""A kernel laid out for running: packed integer codes, and how to get one.

:class:`QuantizedKernel` holds the codes of a ``GroupQuantizedArray`` (GPTQ,
RTN, HQQ) as they are kept in memory while a model runs: 4-bit (and smaller)
codes two to a byte, 5- to 8-bit codes one to a byte. Its dense value is
``GroupQuantizedArray``'s, bit for bit (the same dequantization, after
unpacking). A symmetric per-column 8-bit kernel may also be marked for
integer matmuls with int8 activations (``activations=8``: W8A8, see
:func:`compressax.run.matmul`); :func:`w8a8` makes one with SmoothQuant's
per-input-channel smoothing factors, which the kernel keeps (``smooth``).

References:
  Xiao, Lin, Seznec, Wu, Demouth, Han. *SmoothQuant: Accurate and Efficient
  Post-Training Quantization for Large Language Models*. ICML 2023
  (eq. 4: ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``).
  https://arxiv.org/abs/2211.10438
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from compressax import _checks
from compressax import _node
from compressax._select import map_selected
from compressax.oneshot import _grid

__all__ = ["QuantizedKernel", "columns", "decode", "pack", "w8a8"]


def _packed(bits: int) -> bool:
  return bits <= 4


def unpack(codes, bits: int, d_in: int):
  """``(d_in, d_out)`` codes of a packed ``(ceil(d_in/2), d_out)`` byte array.

  Row ``2 i`` is the low nibble of byte row ``i``, row ``2 i + 1`` the high.
  """
  if not _packed(bits):
    return codes
  lo = jnp.bitwise_and(codes, jnp.uint8(15))
  hi = jnp.right_shift(codes, jnp.uint8(4))
  both = jnp.stack([lo, hi], axis=1)
  return both.reshape(2 * codes.shape[0], codes.shape[1])[:d_in]


def pack_codes(codes, bits: int):
  """The inverse of :func:`unpack` (NumPy or JAX ``uint8`` codes)."""
  if not _packed(bits):
    return codes
  d_in = codes.shape[0]
  if d_in % 2:
    codes = jnp.concatenate([codes, jnp.zeros_like(codes[:1])], axis=0)
  pairs = codes.reshape(-1, 2, codes.shape[1])
  return jnp.bitwise_or(pairs[:, 0], jnp.left_shift(pairs[:, 1], jnp.uint8(4)))


def _no_smoothing() -> Any:   # a NumPy array, as the fields of a loaded node
  return np.zeros((0,), np.float32)


@_node.compressed_leaf(name="compressax.QuantizedKernel", version=2)
@dataclasses.dataclass(frozen=True)
class QuantizedKernel(_node.CompressedLeaf):
  """A quantized kernel ``(d_in, d_out)`` in its run-time layout.

  Attributes:
    codes: ``uint8``. ``bits <= 4``: ``(ceil(d_in / 2), d_out)``, two input
      rows per byte (row ``2 i`` in the low nibble); otherwise ``(d_in,
      d_out)``.
    scale: floats ``(n_groups, d_out)``, a group being ``group_size``
      consecutive input rows (all rows when ``group_size`` is None).
    zero: zero points ``(n_groups, d_out)``, integer (``uint8``) or float
      (HQQ); empty ``(0,)`` for a symmetric grid (zero point ``2^(bits-1)``).
    bits, group_size, symmetric, shape, dtype: static, as
      ``cx.oneshot.GroupQuantizedArray``.
    activations: static; ``8`` runs :func:`compressax.run.matmul` as W8A8
      (int8 activations times these codes, int32 accumulation), ``None``
      dequantizes the kernel (weight-only).
    smooth: SmoothQuant's factors ``s (d_in,)``, or empty ``(0,)`` for none
      (the default, and every kernel :func:`pack` makes). The codes are
      those of ``diag(s) @ w``; the layer divides its input by ``s``.
      Added in version 2 of the class; a version-1 file loads with none.

  ``materialize()`` is ``scale[g] * (code - zero[g])``, bit for bit the
  ``GroupQuantizedArray`` it was packed from; with smoothing factors, that
  divided by ``s`` along the input rows.
  """

  codes: jax.Array
  scale: jax.Array
  zero: jax.Array
  bits: int = dataclasses.field(metadata=dict(static=True))
  group_size: int | None = dataclasses.field(metadata=dict(static=True))
  symmetric: bool = dataclasses.field(metadata=dict(static=True))
  activations: int | None = dataclasses.field(metadata=dict(static=True))
  shape: tuple = dataclasses.field(metadata=dict(static=True))
  dtype: np.dtype = dataclasses.field(metadata=dict(static=True))
  smooth: jax.Array = dataclasses.field(default_factory=_no_smoothing)

  def materialize(self) -> jax.Array:
    """The dequantized kernel (unpacked in-graph under ``jit``)."""
    return decode(self)

  def int8(self) -> tuple[jax.Array, jax.Array]:
    """``(q, s)``: int8 weights ``code - 128`` and the per-column scale ``(d_out,)``.

    Only for a symmetric 8-bit kernel with one group per column, where the
    dense value is ``s * q`` exactly (with smoothing factors, ``s * q`` is
    ``diag(smooth) @`` the dense value).
    """
    if not (self.bits == 8 and self.symmetric and self.group_size is None):
      raise ValueError("int8 weights need a symmetric 8-bit kernel with one "
                       f"grid per column, got bits={self.bits}, symmetric="
                       f"{self.symmetric}, group_size={self.group_size}")
    q = jax.lax.bitcast_convert_type(
        jnp.bitwise_xor(self.codes, jnp.uint8(128)), jnp.int8)
    return q, self.scale[0]

  def validate(self) -> None:
    """Codes of the packed shape; scales and zero points one per group."""
    super().validate()
    if self.bits not in range(1, 9) or isinstance(self.bits, bool):
      raise ValueError(f"bits must be an int in [1, 8], got {self.bits!r}")
    if self.activations not in (None, 8):
      raise ValueError(f"activations must be None or 8, got {self.activations!r}")
    shape = tuple(self.shape)
    if len(shape) != 2:
      raise ValueError(f"a kernel (d_in, d_out) is 2-D, got shape {shape}")
    d_in, d_out = shape
    rows = -(-d_in // 2) if _packed(self.bits) else d_in
    codes = np.asarray(self.codes)
    if codes.shape != (rows, d_out) or codes.dtype != np.uint8:
      raise ValueError(f"codes must be uint8 of shape {(rows, d_out)}, got "
                       f"{codes.dtype}{list(codes.shape)}")
    if not _packed(self.bits) and codes.size and int(codes.max()) >> self.bits:
      raise ValueError(f"a code does not fit in {self.bits} bits")
    gs = self.group_size
    n_groups = 1 if gs is None else -(-d_in // gs)
    if tuple(np.shape(self.scale)) != (n_groups, d_out):
      raise ValueError(f"scale must have shape {(n_groups, d_out)}, got "
                       f"{tuple(np.shape(self.scale))}")
    zshape = (0,) if self.symmetric else (n_groups, d_out)
    if tuple(np.shape(self.zero)) != zshape:
      raise ValueError(f"zero must have shape {zshape}, got {tuple(np.shape(self.zero))}")
    smooth = np.asarray(self.smooth)
    if smooth.shape not in ((0,), (d_in,)) or not np.issubdtype(smooth.dtype, np.floating):
      raise ValueError(f"smooth must be floats of shape (0,) or ({d_in},), got "
                       f"{smooth.dtype}{list(smooth.shape)}")
    if smooth.size and not (np.all(np.isfinite(smooth)) and np.all(smooth > 0)):
      raise ValueError("smoothing factors must be finite and positive")

  def storage_bits(self) -> int:
    """The bytes held in memory: 8 bits per code byte (two 4-bit codes) and
    per integer zero point, the float width per scale and float zero point."""
    zdt = np.dtype(self.zero.dtype)
    return 8 * (int(np.size(self.codes)) + int(np.size(self.zero)) * zdt.itemsize
                + int(np.size(self.scale)) * np.dtype(self.scale.dtype).itemsize
                + int(np.size(self.smooth)) * np.dtype(self.smooth.dtype).itemsize)


def decode(node) -> jax.Array:
  """The dense kernel of a compressed node, computed where it is called.

  Under ``jit`` this is part of the caller's graph: a :class:`QuantizedKernel`
  is unpacked and dequantized in one fused elementwise loop next to its
  consumer; any other node runs its own ``materialize()``. A dense array
  passes through.
  """
  if not _node.is_compressed(node):
    return node
  if isinstance(node, QuantizedKernel):
    codes = unpack(node.codes, int(node.bits), int(node.shape[0]))
    return _dequantize(node, codes, node.scale, node.zero, node.smooth)
  return node.materialize()


def _dequantize(node: QuantizedKernel, codes, scale, zero, smooth):
  dense = _grid.dequantize(codes, scale, zero, int(node.bits), bool(node.symmetric),
                           node.group_size, np.zeros((0,), np.int32),
                           np.dtype(scale.dtype))
  if np.size(smooth):
    dense = dense / smooth.astype(dense.dtype).reshape((-1,) + (1,) * (dense.ndim - 1))
  return dense.astype(np.dtype(node.dtype))


def columns(node, ids, *, path: Any = "kernel") -> jax.Array:
  """``decode(node)[:, ids]``, decoding only the columns it takes.

  The lookup of an embedding table kept as its transpose: a tied table
  ``E (vocab, d)`` stored as the kernel ``E.T (d, vocab)`` (so the output
  head is ``cx.run.matmul(x, node)``, groups running along ``d``) gives the
  embeddings of ``tokens`` as ``columns(node, tokens)``, of shape ``(d,
  *tokens.shape)``; move the first axis last for ``(..., d)``. For a
  :class:`QuantizedKernel` only the taken columns' codes, scales and zero
  points are gathered and dequantized, bit for bit the same values as the
  whole decode; any other node (or a dense array) is decoded first.

  Args:
    node: a kernel ``(d_in, d_out)``: a compressed node or an array.
    ids: integer indices into ``d_out``, any shape.
    path: the leaf's name in error messages.

  Returns:
    ``(d_in, *ids.shape)`` in the node's dtype.

  Raises:
    TypeError: naming ``path``, for ids that are not integers.

  Example:
    >>> table = jax.random.normal(jax.random.key(0), (1000, 64))   # (vocab, d)
    >>> node = cx.run.pack(cx.oneshot.rtn(table.T, bits=4, group_size=32))
    >>> cx.run.columns(node, jnp.array([[3, 7]])).shape
    (64, 1, 2)
  """
  ids = jnp.asarray(ids)
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    _checks.fail(path, f"ids must be integers, got {ids.dtype}", TypeError)
  if not isinstance(node, QuantizedKernel):
    return jnp.take(decode(node), ids, axis=1)
  flat = ids.reshape(-1)
  d_in = int(node.shape[0])
  codes = unpack(jnp.take(node.codes, flat, axis=1), int(node.bits), d_in)
  zero = node.zero if node.symmetric else jnp.take(node.zero, flat, axis=1)
  dense = _dequantize(node, codes, jnp.take(node.scale, flat, axis=1), zero, node.smooth)
  return dense.reshape((d_in,) + ids.shape)


def w8a8(w, act_scale=None, *, alpha: float = 0.5, path: Any = "kernel") -> QuantizedKernel:
  """A float kernel as a W8A8 :class:`QuantizedKernel`, smoothed as SmoothQuant.

  SmoothQuant moves the activations' outlier channels into the weights: with
  ``s_j = a_j^alpha / max_k |w_jk|^(1 - alpha)`` for input channel ``j``
  (``a_j`` the channel's activation scale from calibration data), the layer
  computes ``(x / s) @ (diag(s) w)``, the same product, with activations
  that quantize per token with less error. The codes are int8 per output
  column of ``diag(s) w`` (symmetric, ``cx.oneshot.rtn(bits=8,
  symmetric=True)``); the kernel keeps ``s`` and :func:`compressax.run.matmul`
  divides its input by it before quantizing each token.

  Args:
    w: a float kernel ``(d_in, d_out)``.
    act_scale: ``(d_in,)`` non-negative activation scales per input channel:
      SmoothQuant uses ``max |x_j|`` over calibration tokens; the RMS from a
      calibration Hessian, ``sqrt(diag(h) / 2)`` of
      ``cx.oneshot.block_hessians``, works too. ``None``: no smoothing (the
      kernel of ``pack(rtn(w, bits=8, symmetric=True), activations=8)``).
    alpha: the migration strength in ``[0, 1]`` (0: weights keep all the
      range; SmoothQuant's default 0.5).
    path: the leaf's name in error messages.

  Returns:
    A :class:`QuantizedKernel` with ``activations=8`` and ``smooth`` (empty
    when ``act_scale`` is None). A channel whose scale or weights are all
    zero gets ``s_j = 1``.

  Raises:
    ValueError: naming ``path``, for a bad kernel, ``act_scale`` of the wrong
      shape, negative or not finite, or ``alpha`` outside ``[0, 1]``.

  Example:
    >>> w = jax.random.normal(jax.random.key(0), (64, 32))
    >>> act = jnp.ones(64).at[3].set(50.0)        # one outlier channel
    >>> k = cx.run.w8a8(w, act)
    >>> cx.run.matmul(jnp.ones((4, 64)), k).shape
    (4, 32)
  """
  _grid.check_kernel(path, w)
  smooth, scaled = _no_smoothing(), w
  if act_scale is not None:
    _checks.check_range(path, "alpha", alpha, 0.0, 1.0)
    a = jnp.asarray(act_scale, jnp.float32)
    if a.shape != (w.shape[0],):
      _checks.fail(path, f"act_scale must have shape ({w.shape[0]},) (one per "
                         f"input row), got {tuple(a.shape)}")
    _checks.check_finite(path, act_scale)
    _checks.check_range(path, "act_scale", act_scale, 0.0, np.inf)
    wmax = jnp.max(jnp.abs(w.astype(jnp.float32)), axis=1)
    # exp/log rather than pow: XLA rewrites pow with a constant exponent
    # (sqrt for 0.5) under jit, so eager and jitted factors would differ.
    ok = (a > 0) & (wmax > 0)
    la, lw = jnp.log(jnp.where(ok, a, 1.0)), jnp.log(jnp.where(ok, wmax, 1.0))
    s = jnp.exp(alpha * la - (1.0 - alpha) * lw)
    smooth = jnp.where(ok & jnp.isfinite(s) & (s > 0), s, 1.0)
    scaled = w * smooth.astype(w.dtype)[:, None]
  g = _grid.rtn(scaled, bits=8, symmetric=True, path=path)
  return dataclasses.replace(_pack_one(path, g, 8), smooth=smooth)


def _pack_one(path, node, activations):
  if isinstance(node, QuantizedKernel):
    return dataclasses.replace(node, activations=activations)
  if not isinstance(node, _grid.GroupQuantizedArray):
    return node
  if node.bits > 8:
    _checks.fail(path, f"run-time codes are at most 8 bits, got {node.bits}")
  if np.size(node.group_index):
    _checks.fail(path, "a kernel with act-order groups (group_index) has no "
                       "run-time layout; re-run GPTQ without act_order, or "
                       "materialize this leaf")
  if activations == 8 and not (node.bits == 8 and node.symmetric
                               and node.group_size is None):
    _checks.fail(path, "activations=8 (W8A8) needs symmetric 8-bit weights with "
                       f"one grid per column, got bits={node.bits}, symmetric="
                       f"{node.symmetric}, group_size={node.group_size}")
  return QuantizedKernel(
      codes=pack_codes(jnp.asarray(node.codes, jnp.uint8), int(node.bits)),
      scale=node.scale, zero=node.zero, bits=int(node.bits),
      group_size=node.group_size, symmetric=bool(node.symmetric),
      activations=activations, shape=tuple(node.shape), dtype=np.dtype(node.dtype))


def pack(tree, *, activations: int | None = None, where: Any = None):
  """Every ``GroupQuantizedArray`` of ``tree`` in its run-time layout.

  Args:
    tree: a params tree (dict, Flax linen params, ``nnx.State``) holding
      ``cx.oneshot.GroupQuantizedArray`` leaves (from ``gptq``, ``rtn``,
      ``hqq`` or ``cx.load``), at most 8 bits, without act-order groups.
    activations: ``None``: weight-only (the kernel is dequantized at its
      use); ``8``: W8A8, integer matmuls with int8 activations (needs
      ``rtn``/``gptq`` with ``bits=8, symmetric=True`` and no groups).
    where: which leaves to look at (a path regex or predicate, as
      ``cx.select``); default every ``GroupQuantizedArray`` (and
      ``QuantizedKernel``, whose ``activations`` is reset). Other leaves
      are kept as they are.

  Returns:
    The tree with :class:`QuantizedKernel` leaves in place of those nodes;
    other leaves unchanged. Decoding each gives the same array bit for bit.

  Raises:
    ValueError: naming the leaf, for more than 8 bits, act-order groups, or
      ``activations=8`` on a kernel that is not symmetric per-column 8-bit.

  Example:
    >>> w = jax.random.normal(jax.random.key(0), (256, 64))
    >>> node = cx.run.pack({"kernel": cx.oneshot.rtn(w, bits=4, group_size=128)})
    >>> node["kernel"].codes.shape  # two 4-bit codes per byte
    (128, 64)
  """
  if activations not in (None, 8):
    raise ValueError(f"activations must be None or 8, got {activations!r}")
  rule = where if where is not None else (
      lambda p, x: isinstance(x, (_grid.GroupQuantizedArray, QuantizedKernel)))
  return map_selected(lambda p, x: _pack_one(p, x, activations), tree, where=rule)
