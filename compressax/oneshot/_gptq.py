"""GPTQ: one-shot quantization with second-order error compensation."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from compressax.oneshot import _grid
from compressax.oneshot import _sweep

__all__ = ["gptq"]


def gptq(w, h, *, bits: int, group_size: int | None = None,
         act_order: bool = False, symmetric: bool = False, damp=0.01,
         block_size: int = 128, path: Any = "w") -> _grid.GroupQuantizedArray:
  """Quantize a kernel with GPTQ (Frantar et al. 2023).

  Flax layout: ``w`` is ``(d_in, d_out)``, ``y = x @ w``, and ``h`` is the
  Hessian over ``d_in`` (:func:`hessian`). The algorithm:

  1. Dead inputs (``H_ii = 0``): ``H_ii = 1`` and ``w_i = 0``.
  2. With ``act_order``, rows are processed in descending ``diag H`` (a
     stable sort) and put back in their order at the end.
  3. ``H += damp * mean(diag H) * I``; ``U`` = upper Cholesky factor of
     ``H^-1``.
  4. Row by row: round ``w_i`` on the zero-point grid (see
     :func:`rtn`), ``err = (w_i - q_i) / U_ii``, ``w_j -= U_ij err`` for every
     later row ``j``; in lazy batches of ``block_size`` rows.

  Grids: without ``group_size``, one per output column from the given weights
  (as the reference code). With ``group_size``, one per column and group of
  ``group_size`` consecutive rows *in processing order*, taken from the
  weights as updated when the group starts (the reference code's
  non-static groups; with ``act_order`` a group then gathers rows of similar
  ``diag H``, and the node records each row's group in ``group_index``).
  The lazy block is rounded down to a multiple of ``group_size`` (at least
  one group) so that a group's grid sees all earlier updates, exactly as the
  row-by-row algorithm; the reference code's lazy batching differs when a
  group starts inside a block (see ``_sweep``).

  Arithmetic is float32 (float64 for float64 kernels). ``w`` and ``h`` may be
  traced (the function jits); ``bits``, ``group_size``, ``act_order``,
  ``symmetric``, ``damp`` and ``block_size`` are static (Python values).

  Args:
    w: kernel ``(d_in, d_out)``.
    h: Hessian ``(d_in, d_in)``, e.g. ``cx.oneshot.hessian(x)``.
    bits: bits per weight, a Python int in ``[1, 16]``.
    group_size: input rows per grid (None: one grid per output column).
    act_order: process rows in descending ``diag H`` (the paper's
      "act-order" heuristic).
    symmetric: symmetric grid around an exact zero.
    damp: relative dampening, a Python float ``>= 0`` (``0.01`` in the
      paper).
    block_size: rows per lazy batch (memory traffic only, not the result,
      up to float rounding).
    path: the layer's path, for error messages.

  Returns:
    A :class:`GroupQuantizedArray` whose ``materialize()`` is the quantized
    kernel GPTQ computed, bit for bit.

  Raises:
    ValueError: a Hessian of the wrong shape, bits outside ``[1, 16]``, bad
      group or block size, negative damp, NaN/Inf in ``w`` or ``h``
      (concrete values), or a Hessian that is not positive definite after
      dampening (concrete values), each naming ``path``.
    TypeError: non-floating ``w``/``h``, non-int ``bits`` or a traced ``damp``.

  Example:
    >>> w = jax.random.normal(jax.random.key(0), (128, 64))  # (d_in, d_out)
    >>> x = jax.random.normal(jax.random.key(1), (4, 32, 128))  # calibration
    >>> node = cx.oneshot.gptq(w, cx.oneshot.hessian(x), bits=4, group_size=128)
    >>> w_hat = node.materialize()

  References:
    Frantar, Ashkboos, Hoefler, Alistarh. *GPTQ: Accurate Post-Training
    Quantization for Generative Pre-trained Transformers*. ICLR 2023.
    https://arxiv.org/abs/2210.17323
  """
  _grid.check_kernel(path, w)
  bits = _grid.check_bits(path, bits)
  group_size = _grid.check_positive(path, "group_size", group_size, optional=True)
  block_size = _grid.check_positive(path, "block_size", block_size)
  _sweep.check_hessian(path, h, w.shape[0])
  damp = _sweep.check_damp(path, damp)
  cfg = _sweep.Config(
      block=_sweep.effective_block(block_size, group_size), group=group_size,
      bits=bits, symmetric=bool(symmetric), nm=None, unstructured=False,
      act_order=bool(act_order), damp=damp)
  res = _sweep.sweep(w, h, jnp.zeros((1,), jnp.int32), cfg=cfg)
  _sweep.check_ok(path, res)
  return node_of(res, w, cfg)


def node_of(res: _sweep.Result, w, cfg: _sweep.Config) -> _grid.GroupQuantizedArray:
  """The stored form of a sweep's grid codes."""
  if cfg.bits is None:
    raise ValueError("node_of needs a quantizing sweep, got cfg.bits = None")
  dt = _grid.code_dtype(cfg.bits)
  d_in = w.shape[0]
  if cfg.act_order and cfg.group is not None:
    # Row perm[j] was the j-th processed: its group is j // group_size.
    index = jnp.zeros((d_in,), jnp.int32).at[res.perm].set(
        jnp.arange(d_in, dtype=jnp.int32) // cfg.group)
  else:
    index = jnp.zeros((0,), jnp.int32)
  return _grid.GroupQuantizedArray(
      codes=res.codes.astype(dt), scale=res.scale,
      zero=jnp.zeros((0,), dt) if cfg.symmetric else res.zero.astype(dt),
      group_index=index, bits=cfg.bits, group_size=cfg.group,
      symmetric=cfg.symmetric, shape=tuple(w.shape), dtype=np.dtype(w.dtype))
