"""A kernel laid out for running: packed integer codes, and how to get one.

:class:`QuantizedKernel` holds the codes of a ``GroupQuantizedArray`` (GPTQ,
RTN, HQQ) as they are kept in memory while a model runs: 4-bit (and smaller)
codes two to a byte, 5- to 8-bit codes one to a byte. Its dense value is
``GroupQuantizedArray``'s, bit for bit (the same dequantization, after
unpacking). A symmetric per-column 8-bit kernel may also be marked for
integer matmuls with int8 activations (``activations=8``: W8A8, see
:func:`compressax.run.matmul`).
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

__all__ = ["QuantizedKernel", "columns", "decode", "pack"]


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


@_node.compressed_leaf(name="compressax.QuantizedKernel")
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

  ``materialize()`` is ``scale[g] * (code - zero[g])``, bit for bit the
  ``GroupQuantizedArray`` it was packed from.
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

  def materialize(self) -> jax.Array:
    """The dequantized kernel (unpacked in-graph under ``jit``)."""
    return decode(self)

  def int8(self) -> tuple[jax.Array, jax.Array]:
    """``(q, s)``: int8 weights ``code - 128`` and the per-column scale ``(d_out,)``.

    Only for a symmetric 8-bit kernel with one group per column, where the
    dense value is ``s * q`` exactly.
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

  def storage_bits(self) -> int:
    """The bytes held in memory: 8 bits per code byte (two 4-bit codes) and
    per integer zero point, the float width per scale and float zero point."""
    zdt = np.dtype(self.zero.dtype)
    return 8 * (int(np.size(self.codes)) + int(np.size(self.zero)) * zdt.itemsize
                + int(np.size(self.scale)) * np.dtype(self.scale.dtype).itemsize)


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
    return _grid.dequantize(codes, node.scale, node.zero, int(node.bits),
                            bool(node.symmetric), node.group_size,
                            np.zeros((0,), np.int32), np.dtype(node.dtype))
  return node.materialize()


def columns(node, ids) -> jax.Array:
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

  Returns:
    ``(d_in, *ids.shape)`` in the node's dtype.

  Example:
    >>> table = jax.random.normal(jax.random.key(0), (1000, 64))   # (vocab, d)
    >>> node = cx.run.pack(cx.oneshot.rtn(table.T, bits=4, group_size=32))
    >>> cx.run.columns(node, jnp.array([[3, 7]])).shape
    (64, 1, 2)
  """
  ids = jnp.asarray(ids)
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise TypeError(f"ids must be integers, got {ids.dtype}")
  if not isinstance(node, QuantizedKernel):
    return jnp.take(decode(node), ids, axis=1)
  flat = ids.reshape(-1)
  d_in = int(node.shape[0])
  codes = unpack(jnp.take(node.codes, flat, axis=1), int(node.bits), d_in)
  zero = node.zero if node.symmetric else jnp.take(node.zero, flat, axis=1)
  dense = _grid.dequantize(codes, jnp.take(node.scale, flat, axis=1), zero,
                           int(node.bits), bool(node.symmetric), node.group_size,
                           np.zeros((0,), np.int32), np.dtype(node.dtype))
  return dense.reshape((d_in,) + ids.shape)


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
