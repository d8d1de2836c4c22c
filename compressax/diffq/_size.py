"""DiffQ's differentiable model size, the penalty that trades bits for loss.

References:
  Défossez, Adi, Synnaeve, *Differentiable Model Compression via
  Pseudo Quantization Noise*, 2021. https://arxiv.org/abs/2104.09987
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from compressax import _node
from compressax.diffq import _bits

__all__ = ["model_size"]

# Per quantized tensor: its min and max as float32.
RANGE_BITS = 64
# Per group: its bit width, an integer in [1, 15], in a fixed 4-bit code.
WIDTH_BITS = 4
_UNITS = {"bits": 1, "bytes": 8, "MB": 8 * 2 ** 20}


def model_size(params, logits, *, group_size: int = 16, b_min: float = 2,
               b_max: float = 15, exact: bool = False, unit: str = "MB") -> jax.Array:
  """DiffQ's model size, differentiable with respect to the bit logits.

  Accounting, per quantized leaf (non-empty logits): for each group, its
  number of weights times its bits (``group_size * bits``; the last group
  counts only the weights it has), plus ``4 * n_groups`` bits for the groups'
  bit widths (a fixed 4-bit code, since widths lie in [1, 15]; the reference
  code sizes this code from the data) plus 64 bits for the tensor's min and
  max. Every other leaf (excluded, or under ``min_size``) counts at its dense
  size, i.e. fp32 for float32 leaves; a compressed node counts its own
  ``storage_bits()``. With ``exact=True`` the bits are rounded and clamped
  to [1, 15] as :func:`~compressax.diffq.quantize` does, and the result
  equals the sum of the nodes' ``storage_bits()`` (no longer differentiable).

  Args:
    params: the parameter pytree.
    logits: bit logits from :func:`init_logits`.
    group_size, b_min, b_max: as given to :func:`init_logits`.
    exact: use the final integer bit widths.
    unit: ``"MB"`` (2^20 bytes; DiffQ's penalty is ``lambda * MB``),
      ``"bytes"`` or ``"bits"``.

  Returns:
    A float32 scalar.

  Raises:
    ValueError: mismatched trees or logit counts, or a concrete NaN logit
      (naming the leaf path), a bad ``unit``, ``group_size`` or bounds. A
      traced NaN logit counts as ``b_max`` bits.

  References:
    Défossez et al., *DiffQ*, 2021. https://arxiv.org/abs/2104.09987
  """
  group_size = _bits.check_group_size(group_size)
  _bits.check_bounds(b_min, b_max)
  if unit not in _UNITS:
    raise ValueError(f"unit must be one of {tuple(_UNITS)}, got {unit!r}")
  _, triples = _bits.zip_logits(params, logits)
  fixed = 0
  total = jnp.zeros((), jnp.float32)
  for path, x, logit in triples:
    if not _bits.is_quantized(path, x, logit, group_size):
      fixed += _node.storage_bits(x if hasattr(x, "dtype") else np.asarray(x))
      continue
    bits = _bits.logit_bits(logit, b_min, b_max)
    if exact:
      bits = jnp.clip(jnp.round(bits), 1, _bits.MAX_BITS)
    counts = _bits.group_counts(int(np.size(x)), group_size)
    total = total + jnp.sum(jnp.asarray(counts, jnp.float32) * bits)
    fixed += RANGE_BITS + WIDTH_BITS * counts.shape[0]
  return (total + float(fixed)) / _UNITS[unit]
