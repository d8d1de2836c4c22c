"""N:M masks, channel masks and physical shrinking (cx.prune)."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import compressax as cx


def ref_nm(x, n, m, axis):
  """Per group of m along axis: keep the n largest |w|, earlier first on ties."""
  moved = np.moveaxis(np.asarray(x, np.float64), axis, -1)
  groups = np.abs(moved.reshape(-1, m))
  keep = np.zeros(groups.shape, bool)
  for g, row in enumerate(groups):
    keep[g, np.lexsort((np.arange(m), -row))[:n]] = True
  return np.moveaxis(keep.reshape(moved.shape), -1, axis)


# ---------------------------------------------------------------------- N:M
@given(st.sampled_from([(1, 4), (2, 4), (0, 2), (3, 8), (4, 4), (1, 1)]),
       st.sampled_from([(4, 8), (8, 3, 2), (2, 16)]),
       st.sampled_from([0, -1]), st.integers(0, 2**31 - 1), st.booleans())
def test_nm_every_group_valid_and_matches_reference(nm, shape, axis, seed, ties):
  n, m = nm
  if shape[axis] % m:
    return
  rng = np.random.default_rng(seed)
  x = (rng.integers(-2, 3, shape) if ties else rng.standard_normal(shape)).astype(np.float32)
  mask = np.asarray(cx.prune.nm_mask(jnp.asarray(x), n, m, axis=axis))
  assert mask.shape == x.shape
  groups = np.moveaxis(mask, axis, -1).reshape(-1, m)
  assert (groups.sum(axis=1) == n).all()
  np.testing.assert_array_equal(mask, ref_nm(x, n, m, axis))


def test_nm_ties_and_jit():
  x = jnp.ones((3, 8))
  mask = np.asarray(cx.prune.nm_mask(x, 2, 4))
  np.testing.assert_array_equal(mask[0], [1, 1, 0, 0, 1, 1, 0, 0])
  x = jax.random.normal(jax.random.key(0), (8, 6))
  np.testing.assert_array_equal(cx.prune.nm_mask(x, 2, 4, axis=0),
                                jax.jit(lambda a: cx.prune.nm_mask(a, 2, 4, axis=0))(x))


def test_nm_tree_default_axis_is_input_features():
  params = {"Dense_0": {"kernel": jax.random.normal(jax.random.key(1), (8, 6)),
                        "bias": jnp.ones(6)},
            "Conv_0": {"kernel": jax.random.normal(jax.random.key(2), (3, 3, 4, 2))}}
  mask = cx.prune.nm_mask_tree(params, 2, 4)
  np.testing.assert_array_equal(mask["Dense_0"]["kernel"],
                                ref_nm(params["Dense_0"]["kernel"], 2, 4, 0))
  np.testing.assert_array_equal(mask["Conv_0"]["kernel"],
                                ref_nm(params["Conv_0"]["kernel"], 2, 4, -2))
  assert mask["Dense_0"]["bias"].shape == ()


def test_nm_errors():
  x = jnp.ones((4, 6))
  with pytest.raises(ValueError, match=r"n must be in \[0, m\]"):
    cx.prune.nm_mask(x, 3, 2)
  with pytest.raises(ValueError, match=r"n must be in"):
    cx.prune.nm_mask(x, -1, 2)
  with pytest.raises(ValueError, match="m must be >= 1"):
    cx.prune.nm_mask(x, 0, 0)
  with pytest.raises(ValueError, match="m=4 does not divide"):
    cx.prune.nm_mask(x, 2, 4)
  with pytest.raises(TypeError, match="n must be a Python int"):
    cx.prune.nm_mask(x, 1.5, 2)
  with pytest.raises(ValueError, match="axis 2 is out of range"):
    cx.prune.nm_mask(x, 1, 2, axis=2)
  with pytest.raises(TypeError, match="floating"):
    cx.prune.nm_mask(jnp.ones((4, 4), jnp.int32), 2, 4)
  with pytest.raises(ValueError, match=r"params\['b'\]: the axis has length 6"):
    cx.prune.nm_mask_tree({"a": jnp.ones((4, 4)), "b": jnp.ones((6, 4))}, 2, 4)


# ------------------------------------------------------------------ channel
@pytest.mark.parametrize("norm", ["l1", "l2"])
@pytest.mark.parametrize("s", [0.0, 0.25, 0.5, 0.9])
def test_channel_mask_matches_reference(norm, s):
  rng = np.random.default_rng(3)
  w = rng.standard_normal((3, 3, 4, 10)).astype(np.float32)
  w[..., 7] = w[..., 2]  # a tie between channels 2 and 7
  params = {"conv": {"kernel": jnp.asarray(w), "bias": jnp.ones(10)}}
  mask = cx.prune.channel_mask(params, s, norm=norm)
  flat = np.abs(w.astype(np.float64)).reshape(-1, 10)
  score = flat.sum(0) if norm == "l1" else np.sqrt((flat ** 2).sum(0))
  k = 10 - math.floor(s * 10)
  keep = np.zeros(10, bool)
  keep[np.lexsort((np.arange(10), -score))[:k]] = True
  km = np.asarray(mask["conv"]["kernel"])
  assert km.shape == w.shape
  np.testing.assert_array_equal(km, np.broadcast_to(keep, w.shape))
  np.testing.assert_array_equal(mask["conv"]["bias"], keep)


def test_channel_mask_traced_sparsity_and_axis():
  w = jax.random.normal(jax.random.key(4), (6, 5))
  f = jax.jit(lambda s: cx.prune.channel_mask({"w": w}, s, axis=0)["w"])
  m = np.asarray(f(0.5))
  assert (m.all(axis=1) | ~m.any(axis=1)).all() and m.all(axis=1).sum() == 3
  swept = jax.vmap(f)(jnp.array([0.0, 0.5], jnp.float32))
  np.testing.assert_array_equal(swept[1], m)


class MLP(nn.Module):
  widths: tuple

  @nn.compact
  def __call__(self, x):
    for w in self.widths[:-1]:
      x = nn.relu(nn.Dense(w)(x))
    return nn.Dense(self.widths[-1])(x)


class CNN(nn.Module):
  channels: tuple
  out: int

  @nn.compact
  def __call__(self, x):
    for c in self.channels:
      x = nn.relu(nn.Conv(c, (3, 3))(x))
    x = x.reshape(x.shape[0], -1)  # channels-last flatten
    return nn.Dense(self.out)(x)


def _widths(params):
  return [params["params"][k]["kernel"].shape[-1] for k in sorted(params["params"])]


def test_shrink_mlp_computes_the_masked_function():
  # 12 layers, so natural order matters (Dense_10 after Dense_9, not Dense_1);
  # equal widths keep compiles few, random weights make a wrong order visible.
  widths = (6,) * 11 + (3,)
  x = jax.random.normal(jax.random.key(5), (4, 6))
  params = jax.jit(MLP(widths).init)(jax.random.key(6), x)
  mask = cx.prune.channel_mask(params, 0.5)
  small = cx.prune.shrink(params, mask)
  kept = (3,) * 11 + (3,)
  dense = [small["params"][f"Dense_{i}"]["kernel"].shape for i in range(len(widths))]
  assert dense == [(6, 3)] + [(3, 3)] * 11
  masked_out = MLP(widths).apply(cx.prune.apply_mask(params, mask), x)
  np.testing.assert_allclose(MLP(kept).apply(small, x), masked_out, rtol=1e-5, atol=1e-6)
  assert np.abs(masked_out).max() > 0  # the comparison is not between zeros


def test_shrink_cnn_with_flatten():
  x = jax.random.normal(jax.random.key(7), (2, 5, 5, 3))
  model = CNN((8, 6), 4)
  params = jax.jit(model.init)(jax.random.key(8), x)
  mask = cx.prune.channel_mask(params, 0.5, where=r"Conv_\d/kernel")
  small = cx.prune.shrink(params, mask, layers=["params/Conv_0", "params/Conv_1", "params/Dense_0"])
  assert small["params"]["Dense_0"]["kernel"].shape == (5 * 5 * 3, 4)
  np.testing.assert_allclose(jax.jit(CNN((4, 3), 4).apply)(small, x),
                             jax.jit(model.apply)(cx.prune.apply_mask(params, mask), x),
                             rtol=1e-5, atol=1e-6)


def test_shrink_errors():
  params = {"a": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)},
            "b": {"kernel": jnp.ones((5, 2)), "bias": jnp.ones(2)}}
  mask = jax.tree.map(lambda x: np.ones((), bool), params)
  with pytest.raises(ValueError, match=r"params\['b'\]\['kernel'\]: input width 5"):
    cx.prune.shrink(params, mask)
  with pytest.raises(ValueError, match="no leaf 'c/kernel'"):
    cx.prune.shrink(params, mask, layers=["a", "c"])
  with pytest.raises(TypeError, match="concrete masks"):
    jax.jit(lambda m: cx.prune.shrink(params, m))(mask)
