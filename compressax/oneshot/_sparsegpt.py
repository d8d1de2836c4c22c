"""SparseGPT: one-shot pruning (and joint quantization) with error compensation."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from compressax import _checks
from compressax.oneshot import _grid
from compressax.oneshot import _gptq
from compressax.oneshot import _sweep
from compressax.prune import MaskedArray
# The exact floor(s * n) rule every compressax mask follows.
from compressax.prune._rank import pruned_count

__all__ = ["sparsegpt"]


def check_pattern(path, sparsity, n_m, d_in: int):
  """Exactly one of ``sparsity`` / ``n_m``; returns ``(n, m)`` or None."""
  if (sparsity is None) == (n_m is None):
    _checks.fail(path, "give exactly one of `sparsity` (unstructured) and "
                       f"`n_m` (N:M), got sparsity={sparsity!r}, n_m={n_m!r}")
  if sparsity is not None:
    if np.ndim(sparsity) != 0:
      _checks.fail(path, f"sparsity must be a scalar, got shape "
                         f"{np.shape(sparsity)}", TypeError)
    _checks.check_sparsity(path, sparsity)
    return None
  if not (isinstance(n_m, (tuple, list)) and len(n_m) == 2 and all(
      isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in n_m)):
    _checks.fail(path, f"n_m must be a pair of Python ints (n kept, m), got {n_m!r}")
  n, m = int(n_m[0]), int(n_m[1])
  if m < 1 or not 0 <= n <= m:
    _checks.fail(path, f"n_m = (n, m) keeps n of every m: need 0 <= n <= m and "
                       f"m >= 1, got n={n}, m={m}")
  if d_in % m:
    _checks.fail(path, f"m = {m} does not divide d_in = {d_in}; N:M groups run "
                       "along the input rows and must tile them")
  return n, m


def sparsegpt(w, h, *, sparsity=None, n_m: tuple[int, int] | None = None,
              bits: int | None = None, group_size: int | None = None, damp=0.01,
              block_size: int = 128, path: Any = "w") -> MaskedArray:
  """Prune a kernel with SparseGPT (Frantar & Alistarh 2023), optionally
  quantizing the kept weights in the same sweep.

  The sweep of :func:`gptq` (dead inputs, dampening, ``U`` = upper Cholesky
  factor of ``H^-1``, lazy batches of ``block_size`` rows), where a row's
  compressed value sets its pruned entries to exactly 0 (and, with ``bits``,
  rounds the kept ones on GPTQ's zero-point grid) and the error is spread
  over the later rows. The mask is chosen as the sweep goes, from the score
  ``w_ij^2 / U_ii^2`` of the weights as updated so far:

  * ``sparsity``: per block of ``block_size`` rows, when the block starts,
    the lowest ``floor(sparsity * rows * d_out)`` scores of the block are
    pruned (exact counts; ties: the later entry is pruned).
  * ``n_m=(n, m)``: **keep** ``n`` of every ``m`` consecutive input rows, per
    output column (the largest scores; ties: the earlier row), chosen when
    the window starts. This is ``cx.prune.nm_mask``'s convention; the
    reference code's ``prune_n`` counts *pruned* entries (its 2:4 is
    ``n_m=(2, 4)`` here, its 1:4 is ``n_m=(3, 4)``). ``m`` must divide
    ``d_in``.

  With ``bits`` (the paper's joint mode, Sec. 4), the grid is one per output
  column from the given weights (as the reference code), or, with
  ``group_size``, per group of rows from the weights when the group starts.
  The lazy block is rounded down to a multiple of ``m`` and ``group_size``.

  ``w``, ``h`` and ``sparsity`` may be traced; ``n_m``, ``bits``,
  ``group_size``, ``damp`` and ``block_size`` are static.

  Args:
    w: kernel ``(d_in, d_out)``.
    h: Hessian ``(d_in, d_in)``.
    sparsity: pruned fraction in ``[0, 1)`` (unstructured).
    n_m: ``(n, m)``: keep ``n`` of every ``m`` input rows (N:M).
    bits: with a Python int in ``[1, 16]``, also quantize the kept weights.
    group_size: grid group size for the joint mode.
    damp: relative dampening, a Python float ``>= 0``.
    block_size: rows per lazy batch and per unstructured mask choice.
    path: the layer's path, for error messages.

  Returns:
    A ``cx.prune.MaskedArray`` whose ``value`` is the updated dense kernel
    (pruned entries exactly 0), or with ``bits`` a
    :class:`GroupQuantizedArray` (pruned entries hold the zero point's code,
    which dequantizes to exactly 0), and whose ``mask`` is the kept set.
    ``cx.save`` stores only the kept positions.

  Raises:
    ValueError: both or neither of ``sparsity``/``n_m``, sparsity outside
      ``[0, 1)``, ``n > m``, ``m`` not dividing ``d_in``, and everything
      :func:`gptq` rejects, each naming ``path``.

  Example:
    >>> w = jax.random.normal(jax.random.key(0), (128, 64))  # (d_in, d_out)
    >>> x = jax.random.normal(jax.random.key(1), (4, 32, 128))  # calibration
    >>> h = cx.oneshot.hessian(x)
    >>> pruned = cx.oneshot.sparsegpt(w, h, n_m=(2, 4))
    >>> joint = cx.oneshot.sparsegpt(w, h, sparsity=0.5, bits=4)

  References:
    Frantar & Alistarh. *SparseGPT: Massive Language Models Can Be Accurately
    Pruned in One-Shot*. ICML 2023. https://arxiv.org/abs/2301.00774
  """
  _grid.check_kernel(path, w)
  d_in, d_out = w.shape
  nm = check_pattern(path, sparsity, n_m, d_in)
  if bits is not None:
    bits = _grid.check_bits(path, bits)
  group_size = _grid.check_positive(path, "group_size", group_size, optional=True)
  if group_size is not None and bits is None:
    _checks.fail(path, "group_size is for the joint mode: give `bits` too")
  block_size = _grid.check_positive(path, "block_size", block_size)
  _sweep.check_hessian(path, h, d_in)
  damp = _sweep.check_damp(path, damp)
  block = _sweep.effective_block(block_size, group_size, nm and nm[1])
  cfg = _sweep.Config(block=block, group=group_size, bits=bits,
                      symmetric=False, nm=nm, unstructured=nm is None,
                      act_order=False, damp=damp)
  if nm is None:
    rows = [min(block, d_in - i) for i in range(0, d_in, block)]
    counts = jnp.stack([jnp.asarray(pruned_count(r * d_out, sparsity), jnp.int32)
                        for r in rows])
  else:
    counts = jnp.zeros((1,), jnp.int32)
  res = _sweep.sweep(w, h, counts, cfg=cfg)
  _sweep.check_ok(path, res)
  if bits is None:
    value = res.q.astype(w.dtype)
  else:
    value = _gptq.node_of(res, w, cfg)
  return MaskedArray(value=value, mask=res.keep, shape=tuple(w.shape),
                     dtype=np.dtype(w.dtype))
