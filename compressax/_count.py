"""``count``: the number of True entries without a full-size int32 temporary.

Private; shared by the pruning thresholds and DiffQ's range gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["count"]


def count(flags) -> jax.Array:
  """``sum(flags)`` as int32 without a full-size int32 temporary.

  XLA CPU rewrites a long reduction into a reduce-window whose input (here
  the int32-converted flags) is materialized: 4 bytes per weight. Summing
  rows of 32 first (short enough to stay a fused reduction) leaves only one
  int32 per 32 weights for the long reduction.
  """
  n = flags.size
  head = n - n % 32
  if n <= 4096:
    return jnp.sum(flags, dtype=jnp.int32)
  rows = jnp.sum(flags[:head].reshape(head // 32, 32), axis=1, dtype=jnp.int32)
  # The barrier stops XLA from merging the two reductions back into one.
  return jnp.sum(lax.optimization_barrier(rows)) + jnp.sum(flags[head:], dtype=jnp.int32)
