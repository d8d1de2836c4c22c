"""DiffQ's pseudo-quantization noise: the training-time stand-in for rounding.

References:
  Défossez, Adi, Synnaeve, *Differentiable Model Compression via
  Pseudo Quantization Noise*, 2021. https://arxiv.org/abs/2104.09987
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from compressax.diffq import _bits

__all__ = ["noise_scale", "noisy"]

_NOISES = ("uniform", "gaussian")


def noise_scale(x, bits) -> jax.Array:
  """DiffQ's step ``Delta = (max W - min W) / (2^bits - 1)``, float32.

  The range is taken over the whole tensor ``x``; ``bits`` broadcasts against
  it (e.g. per-weight bits from the groups).
  """
  x = jnp.asarray(x).astype(jnp.float32)
  return (jnp.max(x) - jnp.min(x)) / (jnp.exp2(bits) - 1.0)


def noisy(params, logits, key, *, group_size: int = 16, b_min: float = 2,
          b_max: float = 15, noise: str = "uniform") -> Any:
  """Adds DiffQ's pseudo-quantization noise to every quantized leaf.

  ``W_noisy = W + Delta * u`` with ``Delta = (max W - min W) / (2^bits - 1)``
  over the whole tensor and each group's bits broadcast to its weights;
  ``u ~ U[-1/2, 1/2]`` for ``noise="uniform"`` (the paper) or ``N(0, 1) / 2``
  for ``"gaussian"`` (the reference code's default). The result is
  differentiable with respect to ``params`` (identity, plus the dependence of
  ``Delta`` on the tensor's min and max, as in the reference code) and to
  ``logits`` (through ``Delta``).

  Args:
    params: the parameter pytree.
    logits: bit logits from :func:`init_logits` (empty leaves pass through).
    key: a PRNG key; the ``i``-th leaf (in tree order) uses
      ``jax.random.fold_in(key, i)``, so results are deterministic per key.
    group_size, b_min, b_max: as given to :func:`init_logits`.
    noise: ``"uniform"`` or ``"gaussian"``.

  Returns:
    A pytree like ``params``: noisy quantized leaves in their own dtype; the
    other leaves are the same objects.

  Raises:
    ValueError: for mismatched trees or logit counts (naming the leaf path),
      a bad ``noise``, ``group_size`` or bounds.

  References:
    Défossez et al., *DiffQ*, 2021. https://arxiv.org/abs/2104.09987
  """
  group_size = _bits.check_group_size(group_size)
  _bits.check_bounds(b_min, b_max)
  if noise not in _NOISES:
    raise ValueError(f"noise must be one of {_NOISES}, got {noise!r}")
  treedef, triples = _bits.zip_logits(params, logits)
  out = []
  for i, (path, x, logit) in enumerate(triples):
    if not _bits.is_quantized(path, x, logit, group_size):
      out.append(x)
      continue
    out.append(_noisy_leaf(jnp.asarray(x), logit, jax.random.fold_in(key, i),
                           b_min, b_max, group_size=group_size, noise=noise))
  return jax.tree_util.tree_unflatten(treedef, out)


# Jitted so that eager and jitted callers run the same compiled arithmetic
# (XLA's fusion may round differently from op-by-op execution).
@functools.partial(jax.jit, static_argnames=("group_size", "noise"))
def _noisy_leaf(x, logit, key, b_min, b_max, *, group_size, noise):
  bits = _bits.expand(_bits.logit_bits(logit, b_min, b_max), x.shape, group_size)
  if noise == "uniform":
    u = jax.random.uniform(key, x.shape, jnp.float32, -0.5, 0.5)
  else:
    u = jax.random.normal(key, x.shape, jnp.float32) / 2
  return (x.astype(jnp.float32) + noise_scale(x, bits) * u).astype(x.dtype)
