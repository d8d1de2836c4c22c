"""The private fused True-counts shared by pruning and DiffQ."""

import hypothesis
import hypothesis.strategies as st
import jax
import numpy as np

from compressax._count import count, count_pair


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(n=st.sampled_from([1, 31, 4096, 4097, 6400, 10_015]),
                  p=st.sampled_from([0.0, 0.01, 0.5, 1.0]),
                  seed=st.integers(0, 2 ** 16))
def test_counts_equal_numpy(n, p, seed):
  # Sizes on both sides of the 4096 switch, with and without a tail of 32;
  # p = 1 fills every row of 32, the most the packed row count must hold.
  rng = np.random.default_rng(seed)
  a = rng.random(n) < p
  b = rng.random(n) < 1 - p
  assert int(jax.jit(count)(a)) == a.sum()
  got = jax.jit(count_pair)(a.reshape(-1, 1), b.reshape(-1, 1))
  assert (int(got[0]), int(got[1])) == (a.sum(), b.sum())
