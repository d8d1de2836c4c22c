"""``x @ w`` for a compressed ``w``: decoded at its use, or integer (W8A8).

* Weight-only (any compressed node, and a :class:`QuantizedKernel` without
  ``activations``): the kernel is decoded inside the caller's graph and
  multiplied in the activations' dtype; under ``jit`` only this layer's float
  kernel is alive, and the result equals ``x @ node.materialize()`` bit for
  bit (the same decode, the same dot).
* W8A8 (a :class:`QuantizedKernel` with ``activations=8``): each token (a row
  of ``x`` over its last axis) is quantized to int8 on a symmetric abs-max
  grid, ``s_x = max|x| / 127`` (1 for a row of zeros), ``x_q = clip(round(x /
  s_x), -127, 127)``; the weights are the kernel's int8 ``q = code - 128``
  with per-column ``s_w``; ``y = (x_q @ q)_int32 * s_x * s_w``, the product
  accumulated exactly in int32 by ``lax.dot_general(...,
  preferred_element_type=int32)``. A kernel with SmoothQuant factors ``s``
  (:func:`compressax.run.w8a8`) quantizes ``x / s`` instead of ``x``.

References:
  Dettmers, Lewis, Belkada, Zettlemoyer. *LLM.int8(): 8-bit Matrix
  Multiplication for Transformers at Scale*. NeurIPS 2022 (vector-wise
  quantization: per-token and per-column scales).
  https://arxiv.org/abs/2208.07339
  Xiao et al. *SmoothQuant: Accurate and Efficient Post-Training
  Quantization for Large Language Models*. ICML 2023 (W8A8, per-token
  activation scales). https://arxiv.org/abs/2211.10438
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from compressax import _node
from compressax.run._kernel import QuantizedKernel
from compressax.run._kernel import decode

__all__ = ["dot_general", "matmul", "promote_dtype", "quantize_tokens"]


def _dn(x):
  return (((x.ndim - 1,), (0,)), ((), ()))


def quantize_tokens(x) -> tuple[jax.Array, jax.Array]:
  """``(x_q, s_x)``: int8 per-token codes of ``x`` and its ``(..., 1)`` scales.

  Symmetric abs-max over the last axis: ``s_x = max|x| * fl(1/127)`` (1 where the
  row is all zeros), ``x_q = clip(round(x / s_x), -127, 127)`` (round half to
  even), so ``x ~ x_q * s_x``. Computed in float32 (float64 for float64 ``x``).
  """
  cdt = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
  xf = x.astype(cdt)
  amax = jnp.max(jnp.abs(xf), axis=-1, keepdims=True)
  # A multiply by the rounded reciprocal, as XLA would rewrite a division by
  # the constant anyway (so NumPy can reproduce it).
  s = jnp.where(amax > 0, amax * jnp.asarray(1 / 127, cdt), jnp.ones_like(amax))
  q = jnp.clip(jnp.round(xf / s), -127, 127).astype(jnp.int8)
  return q, s


def _zero_of(x) -> jax.Array:
  """An int32 zero that XLA cannot tell from a value of ``x``."""
  first = x[(0,) * x.ndim].astype(jnp.float32)
  i = lax.bitcast_convert_type(first, jnp.int32)
  return jnp.maximum(jnp.minimum(i, 0), 0)


def _tie_leaf(a, z):
  if a.dtype == jnp.bool_:
    return jnp.logical_or(a, z != 0)
  return a + z.astype(a.dtype)


@jax.custom_batching.custom_vmap
def _tie(arrays, x):
  z = _zero_of(x)
  return [_tie_leaf(a, z) for a in arrays]


@_tie.def_vmap
def _tie_vmap(axis_size, in_batched, arrays, x):
  del axis_size
  # The codes stay as batched as they were: a batch of inputs does not make
  # a batch of kernels.
  return _tie(arrays, x), in_batched[0]


@jax.custom_jvp
def _tie_ad(arrays, x):
  return _tie(arrays, x)


@_tie_ad.defjvp
def _tie_jvp(primals, tangents):
  # Differentiable as the identity in the arrays, constant in x.
  return _tie_ad(*primals), tangents[0]


def after(w, x):
  """``w`` with every array made to depend on ``x`` (values unchanged).

  A compressed kernel's decode depends only on its codes, so XLA is free to
  run every layer's decode at the start of the forward, with every float
  kernel alive at once (XLA:CPU's default scheduler does). Adding an exact
  zero computed from one element of ``x`` makes each decode wait for its
  layer's input; a float ``-0.0`` may become ``+0.0``, nothing else changes.
  """
  if x.size == 0:
    return w
  leaves, tree = jax.tree_util.tree_flatten(w)
  return jax.tree_util.tree_unflatten(tree, _tie_ad(leaves, x))


def _w8a8(x, w: QuantizedKernel):
  q_w, s_w = w.int8()
  xs = x
  if w.smooth.size:   # SmoothQuant: (x / s) @ (diag(s) w)
    cdt = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
    xs = x.astype(cdt) / w.smooth.astype(cdt).reshape((1,) * (x.ndim - 1) + (-1,))
  q_x, s_x = quantize_tokens(xs)
  acc = lax.dot_general(q_x, q_w, _dn(q_x), preferred_element_type=jnp.int32)
  y = acc.astype(s_x.dtype) * s_x * s_w.astype(s_x.dtype).reshape(
      (1,) * (acc.ndim - 1) + (-1,))
  return y.astype(x.dtype)


def matmul(x, w, *, precision=None, out_sharding=None) -> jax.Array:
  """``x @ w`` over ``x``'s last axis and ``w``'s first, for a compressed ``w``.

  The contraction of a Flax ``Dense``: ``x (..., d_in)``, ``w (d_in, d_out)``
  dense or a compressed node. See the module notes for the two paths.

  Args:
    x: activations, a floating array ``(..., d_in)``.
    w: a kernel ``(d_in, d_out)``: an array, a :class:`QuantizedKernel`, or
      any compressed node (decoded with its own ``materialize()``).
    precision: passed to ``lax.dot_general`` on the float paths.
    out_sharding: passed to ``lax.dot_general`` on the float paths (Flax
      nnx's ``Linear`` gives one).

  Returns:
    ``(..., d_out)`` in ``x``'s dtype.

  Example:
    >>> w = jax.random.normal(jax.random.key(0), (64, 32))
    >>> k = cx.run.pack(cx.oneshot.rtn(w, bits=8, symmetric=True), activations=8)
    >>> cx.run.matmul(jnp.ones((4, 64)), k).shape
    (4, 32)
  """
  kw = {} if out_sharding is None else {"out_sharding": out_sharding}
  if _node.is_compressed(w):
    w = after(w, x)
  if isinstance(w, QuantizedKernel) and w.activations == 8:
    return _w8a8(x, w)
  k = decode(w)
  if _node.is_compressed(w) and jnp.issubdtype(x.dtype, jnp.inexact):
    k = k.astype(x.dtype)
  return lax.dot_general(x, k, _dn(x), precision=precision, **kw)


def dot_general(lhs, rhs, dimension_numbers, precision=None,
                preferred_element_type=None, **kwargs) -> jax.Array:
  """``lax.dot_general`` whose ``rhs`` may be a compressed kernel.

  A drop-in for the ``dot_general`` of Flax's ``nn.Dense`` and
  ``nnx.Linear`` (with :func:`promote_dtype`, which lets the node through):
  a Dense contraction (``lhs``'s last axis with ``rhs``'s first, no batch
  axes) of a compressed ``rhs`` runs :func:`matmul`; any other contraction
  decodes ``rhs`` first. A dense ``rhs`` is plain ``lax.dot_general``.
  """
  if not _node.is_compressed(rhs):
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type, **kwargs)
  (lc, rc), (lb, rb) = dimension_numbers
  if (tuple(lc) == (lhs.ndim - 1,) and tuple(rc) == (0,) and not lb and not rb
      and rhs.ndim == 2 and preferred_element_type is None):
    return matmul(lhs, rhs, precision=precision, out_sharding=kwargs.get("out_sharding"))
  return lax.dot_general(lhs, decode(rhs).astype(lhs.dtype), dimension_numbers,
                         precision=precision,
                         preferred_element_type=preferred_element_type, **kwargs)


def promote_dtype(*args, dtype=None, inexact: bool = True) -> tuple[Any, ...] | list[Any]:
  """Flax's ``promote_dtype`` that passes compressed nodes through unchanged.

  Both calling conventions: linen's ``promote_dtype(x, kernel, bias,
  dtype=...)`` and nnx's ``promote_dtype((x, kernel, bias), dtype=...)``.
  Arrays are cast to ``dtype`` (default: the result type of the arrays and
  the nodes' dense dtypes; a float type when ``inexact``); ``None`` stays.
  """
  nnx_style = len(args) == 1 and isinstance(args[0], (tuple, list))
  xs = tuple(args[0]) if nnx_style else args
  if dtype is None:
    dts = [x.dtype for x in xs if x is not None]
    dtype = jnp.result_type(*dts) if dts else jnp.float32
  if inexact and not jnp.issubdtype(dtype, jnp.inexact):
    dtype = jnp.promote_types(jnp.float32, dtype)
  out = tuple(x if x is None or _node.is_compressed(x) else jnp.asarray(x, dtype)
              for x in xs)
  return out if nnx_style else list(out)
