"""``count``: the number of True entries without a full-size int32 temporary.

Private; shared by the pruning thresholds and DiffQ's range gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from compressax import _sharding

__all__ = ["count", "count_pair"]


def count(flags) -> jax.Array:
  """``sum(flags)`` as int32 without a full-size int32 temporary.

  XLA CPU rewrites a long reduction into a reduce-window whose input (here
  the int32-converted flags) is materialized: 4 bytes per weight. Summing
  rows of 32 first (short enough to stay a fused reduction) leaves only one
  int32 per 32 weights for the long reduction.
  """
  n = flags.size
  head = n - n % 32
  if n <= 4096 or _sharding.explicit(flags) is not None:
    # Split over explicit mesh axes, each device sums its own shard.
    return jnp.sum(flags, dtype=jnp.int32)
  rows = jnp.sum(flags[:head].reshape(head // 32, 32), axis=1, dtype=jnp.int32)
  # The barrier stops XLA from merging the two reductions back into one.
  return jnp.sum(lax.optimization_barrier(rows)) + jnp.sum(flags[head:], dtype=jnp.int32)


def count_pair(a, b) -> tuple[jax.Array, jax.Array]:
  """``(sum(a), sum(b))`` for two flag arrays of one shape, in one pass.

  A row of 32 holds at most 32 True entries of each, so both row counts fit
  one int32 (``a``'s in the low 6 bits): one fused pass instead of two.
  """
  a, b = a.reshape(-1), b.reshape(-1)
  n = a.size
  head = n - n % 32
  if n <= 4096:
    return count(a), count(b)
  rows = (a[:head].astype(jnp.int32)
          + 64 * b[:head].astype(jnp.int32)).reshape(head // 32, 32)
  both = lax.optimization_barrier(jnp.sum(rows, axis=1))
  return (jnp.sum(both & 63) + count(a[head:]),
          jnp.sum(both >> 6) + count(b[head:]))
