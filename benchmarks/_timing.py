"""Paired step timing shared by the benchmarks: variants interleaved per round."""

from __future__ import annotations

import time

import jax
import numpy as np


def _timeit(fns: dict, n_steps: int, rounds: int) -> dict:
  """Per-round seconds per step of each ``fn()``: ``{name: [t_round, ...]}``.

  Each round times every variant once, one after the other, so a burst of
  load from other processes hits all variants of a round alike.
  """
  times = {k: [] for k in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      out = fn()  # one untimed call: keeps caches warm after the others ran
      jax.block_until_ready(out)
      t0 = time.perf_counter()
      for _ in range(n_steps):
        out = fn()
      jax.block_until_ready(out)
      times[name].append((time.perf_counter() - t0) / n_steps)
  return times


def _ratio(times: dict, name: str, base: str) -> tuple[float, float, float]:
  """Median and quartiles over rounds of ``name``'s time / ``base``'s.

  Pairing the two times of one round cancels the machine's drift between
  rounds, which a ratio of two medians keeps.
  """
  r = np.asarray(times[name]) / np.asarray(times[base])
  q1, med, q3 = np.percentile(r, [25, 50, 75])
  return float(med), float(q1), float(q3)
