"""Magnitude and random masks, per-layer sparsity distributions (cx.prune)."""

import math
from fractions import Fraction

import flax.linen as nn
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

import compressax as cx
from compressax.prune import _rank


# ---------------------------------------------------------------- references
def ref_pruned(n, s):
  """floor(s * n) on the shortest decimal of s, in exact arithmetic."""
  return math.floor(Fraction(str(np.asarray(s)[()])) * n)


def ref_topk(arrays, k):
  """Keep k entries: |w| descending, then global flat index ascending."""
  flat = np.concatenate([np.abs(np.asarray(a, np.float64)).ravel() for a in arrays])
  order = np.lexsort((np.arange(flat.size), -flat))
  keep = np.zeros(flat.size, bool)
  keep[order[:k]] = True
  out, start = [], 0
  for a in arrays:
    out.append(keep[start:start + np.size(a)].reshape(np.shape(a)))
    start += np.size(a)
  return out


def ref_layer(w, s):
  return ref_topk([w], w.size - ref_pruned(w.size, s))[0]


def ref_erk(shapes, s):
  """RigL's procedure: make the densest layer dense, one at a time."""
  n = np.array([np.prod(sh) for sh in shapes], np.float64)
  raw = np.array([np.sum(sh) / np.prod(sh) for sh in shapes], np.float64)
  dense = set()
  while True:
    free = [i for i in range(len(shapes)) if i not in dense]
    eps = ((1 - s) * n.sum() - sum(n[i] for i in dense)) / sum(raw[i] * n[i] for i in free)
    dens = {i: eps * raw[i] for i in free}
    worst = max(dens, key=dens.get)
    if dens[worst] <= 1:
      return np.array([1.0 if i in dense else dens[i] for i in range(len(shapes))])
    dense.add(worst)


def tree(seed=0, ints=False):
  rng = np.random.default_rng(seed)
  mk = (lambda *s: rng.integers(-3, 4, s).astype(np.float32)) if ints else (
      lambda *s: rng.standard_normal(s).astype(np.float32))
  return {"params": {"Dense_0": {"kernel": jnp.asarray(mk(12, 10)), "bias": jnp.asarray(mk(10))},
                     "Conv_0": {"kernel": jnp.asarray(mk(3, 3, 2, 4)), "bias": jnp.asarray(mk(4))},
                     "Dense_1": {"kernel": jnp.asarray(mk(10, 3)), "bias": jnp.asarray(mk(3))}}}


KERNELS = ["params/Conv_0/kernel", "params/Dense_0/kernel", "params/Dense_1/kernel"]


def by_path(t):
  return {cx.path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(t)}


# -------------------------------------------------------------------- layer
@pytest.mark.parametrize("s", [0.0, 0.3, 0.29, 0.5, 0.7, 0.999])
def test_layer_scope_matches_reference(s):
  params = tree(1, ints=True)  # many ties
  mask, w = by_path(cx.prune.magnitude_mask(params, s)), by_path(params)
  for path in KERNELS:
    np.testing.assert_array_equal(mask[path], ref_layer(w[path], s), err_msg=path)
  for path in ("params/Dense_0/bias", "params/Conv_0/bias"):
    assert mask[path].shape == () and mask[path]  # unselected: 0-d True


def test_float_rounding_of_the_count():
  # float64: 0.3 * 10 = 3.0000000000000004 and 0.29 * 100 = 28.999999999999996
  w = {"w": jnp.arange(1.0, 101.0, dtype=jnp.float32).reshape(10, 10)}
  assert int(cx.prune.magnitude_mask(w, 0.29)["w"].sum()) == 71
  assert int(jax.jit(cx.prune.magnitude_mask)(w, 0.29)["w"].sum()) == 71  # traced
  w10 = {"w": jnp.ones((2, 5))}
  assert int(cx.prune.magnitude_mask(w10, 0.3)["w"].sum()) == 7
  assert int(jax.jit(cx.prune.magnitude_mask)(w10, 0.3)["w"].sum()) == 7


def test_all_equal_weights_keep_the_first():
  w = {"w": jnp.full((4, 5), -2.0)}
  m = np.asarray(cx.prune.magnitude_mask(w, 0.35)["w"]).ravel()
  assert m.sum() == 20 - 7 and m[:13].all() and not m[13:].any()


@given(hnp.arrays(np.float32, st.sampled_from([(4, 5), (3, 3, 2), (7, 2), (1, 6)]),
                  elements=st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.5, -2.5, 3.0])),
       st.integers(0, 99))
def test_hypothesis_layer_counts_and_reference(w, pct):
  s = pct / 100
  m = np.asarray(cx.prune.magnitude_mask({"w": jnp.asarray(w)}, s)["w"])
  assert m.sum() == w.size - ref_pruned(w.size, s)
  np.testing.assert_array_equal(m, ref_layer(w, s))
  # every kept weight is at least as large as every pruned one
  if m.any() and (~m).any():
    assert np.abs(w[m]).min() >= np.abs(w[~m]).max()


# ------------------------------------------------------------------- global
@pytest.mark.parametrize("ints", [False, True])
@pytest.mark.parametrize("s", [0.1, 0.5, 0.93])
def test_global_scope_matches_reference(ints, s):
  params = tree(2, ints=ints)
  mask = cx.prune.magnitude_mask(params, s, scope="global")
  leaves = [x for _, x in cx.selected_leaves(params)]
  n = sum(x.size for x in leaves)
  ref = ref_topk([np.asarray(x) for x in leaves], n - ref_pruned(n, s))
  got = [np.asarray(m) for _, m in cx.selected_leaves(mask, cx.select(params))]
  for g, r in zip(got, ref):
    np.testing.assert_array_equal(g, r)
  assert sum(g.sum() for g in got) == n - ref_pruned(n, s)


@given(st.integers(0, 99), st.integers(0, 2**31 - 1), st.booleans())
def test_hypothesis_global_sort_and_bisect_agree(pct, seed, ties):
  shapes = [(3, 4), (1, 1), (5, 2), (2, 7)]  # fixed: one compile per method
  rng = np.random.default_rng(seed)
  arrays = [(rng.integers(-2, 3, s) if ties else rng.standard_normal(s)).astype(np.float32)
            for s in shapes]
  keys = [_rank.magnitude_keys(jnp.asarray(a)) for a in arrays]
  n = sum(a.size for a in arrays)
  k = n - ref_pruned(n, pct / 100)
  ref = ref_topk(arrays, k)
  for method in ("sort", "bisect"):
    got = _rank.topk_masks(keys, k, method=method)
    for g, r, a in zip(got, ref, arrays):
      np.testing.assert_array_equal(np.asarray(g).reshape(a.shape), r, err_msg=method)


def test_large_leaf_path_is_identical(monkeypatch):
  params = tree(3, ints=True)
  for scope in ("layer", "global"):
    a = cx.prune.magnitude_mask(params, 0.6, scope=scope)
    monkeypatch.setattr(_rank, "SORT_LIMIT", 0)  # force the bisection
    b = cx.prune.magnitude_mask(params, 0.6, scope=scope)
    monkeypatch.undo()
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_method_argument_gives_the_same_mask_and_rejects_unknown():
  params = tree(5, ints=True)  # many ties
  for scope in ("layer", "global"):
    want = cx.prune.magnitude_mask(params, 0.55, scope=scope)
    for method in ("sort", "bisect"):
      got = jax.jit(lambda p, m=method: cx.prune.magnitude_mask(
          p, 0.55, scope=scope, method=m))(params)
      jax.tree.map(np.testing.assert_array_equal, got, want)
  with pytest.raises(ValueError, match="method"):
    cx.prune.magnitude_mask(params, 0.5, method="heap")


def test_bisection_on_long_leaves_with_ties(monkeypatch):
  # > 4096 weights and not a multiple of 32: the chunked count and its tail.
  rng = np.random.default_rng(9)
  params = {"a": jnp.asarray(rng.integers(-3, 4, (70, 75)).astype(np.float32)),
            "b": jnp.asarray(rng.integers(-3, 4, (33, 129)).astype(np.float32))}
  monkeypatch.setattr(_rank, "SORT_LIMIT", 0)
  n = 70 * 75 + 33 * 129
  for s in (0.37, 0.9):
    got = cx.prune.magnitude_mask(params, s, scope="global")
    ref = ref_topk([params["a"], params["b"]], n - ref_pruned(n, s))
    np.testing.assert_array_equal(got["a"], ref[0])
    np.testing.assert_array_equal(got["b"], ref[1])
  swept = jax.jit(jax.vmap(lambda s: cx.prune.magnitude_mask(params, s)))(
      jnp.array([0.25, 0.5], jnp.float32))
  np.testing.assert_array_equal(swept["a"][1], ref_layer(np.asarray(params["a"]), 0.5))
  np.testing.assert_array_equal(swept["b"][0], ref_layer(np.asarray(params["b"]), 0.25))


# ------------------------------------------------------------- jit and vmap
def test_jit_equals_no_jit_and_vmap_equals_loop():
  params = tree(4)
  for scope in ("layer", "global"):
    eager = cx.prune.magnitude_mask(params, 0.75, scope=scope)
    jitted = jax.jit(lambda p: cx.prune.magnitude_mask(p, 0.75, scope=scope))(params)
    jax.tree.map(np.testing.assert_array_equal, eager, jitted)
    sps = jnp.array([0.0, 0.37, 0.9, 0.95], jnp.float32)
    f = jax.jit(lambda s: cx.prune.magnitude_mask(params, s, scope=scope))
    swept = jax.vmap(f)(sps)
    for i, s in enumerate(sps):
      jax.tree.map(lambda v, l: np.testing.assert_array_equal(v[i], l), swept, f(s))
  # binary fractions: traced float32 counts equal the exact host ones
  sps = jnp.arange(32, dtype=jnp.float32) / 32
  swept = jax.vmap(lambda s: cx.prune.magnitude_mask(params, s))(sps)
  for i in range(0, 32, 5):
    host = cx.prune.magnitude_mask(params, float(sps[i]))
    jax.tree.map(lambda v, l: np.testing.assert_array_equal(v[i], l), swept, host)


def test_per_leaf_sparsity_tree_and_mapping_under_vmap():
  params = tree(5)
  per = {"params/Dense_0/kernel": 0.5, "params/Conv_0/kernel": 0.25, "params/Dense_1/kernel": 0.1}
  m = by_path(cx.prune.magnitude_mask(params, per))
  w = by_path(params)
  for path, s in per.items():
    np.testing.assert_array_equal(m[path], ref_layer(w[path], s))
  st_tree = cx.prune.sparsity_from_patterns(params, {"Dense_0": 0.5, "Conv": 0.25}, default=0.1)
  jax.tree.map(np.testing.assert_array_equal, cx.prune.magnitude_mask(params, st_tree),
               cx.prune.magnitude_mask(params, per))
  # vmap over a pytree of per-leaf sparsities
  batch = jax.tree.map(lambda s: jnp.array([s, s / 2], jnp.float32), st_tree)
  swept = jax.vmap(lambda t: cx.prune.magnitude_mask(params, t))(batch)
  assert by_path(swept)["params/Dense_0/kernel"].sum(axis=(1, 2)).tolist() == [60, 90]


# ------------------------------------------------------------ linen and nnx
def test_linen_and_nnx_state():
  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3)(nn.relu(nn.Dense(6)(x)))

  params = MLP().init(jax.random.key(0), jnp.ones((1, 5)))
  mask = cx.prune.magnitude_mask(params, 0.5, scope="global")
  out = cx.prune.apply_mask(params, mask)
  assert out["params"]["Dense_0"]["bias"] is params["params"]["Dense_0"]["bias"]
  assert cx.prune.sparsity_stats(mask)["global"]["kept"] == (30 + 18) // 2

  class M(nnx.Module):
    def __init__(self, rngs):
      self.a = nnx.Linear(5, 6, rngs=rngs)
      self.b = nnx.Linear(6, 3, rngs=rngs)

  _, state = nnx.split(M(nnx.Rngs(0)))
  mask = cx.prune.magnitude_mask(state, 0.5)
  pruned = cx.prune.apply_mask(state, mask)
  assert isinstance(pruned, nnx.State)
  stats = cx.prune.sparsity_stats(pruned)
  assert stats["leaves"]["a/kernel"]["kept"] == 15
  assert stats["leaves"]["b/kernel"]["kept"] == 9


# ------------------------------------------------------------------- random
def test_random_mask_exact_and_deterministic():
  params = tree(6)
  key = jax.random.key(42)
  a = cx.prune.random_mask(params, 0.6, key)
  b = jax.jit(lambda p, k: cx.prune.random_mask(p, 0.6, k))(params, key)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  for path, m in by_path(a).items():
    if path in KERNELS:
      assert m.sum() == m.size - ref_pruned(m.size, 0.6)
  c = by_path(cx.prune.random_mask(params, 0.6, jax.random.key(43)))
  assert any((c[p] != by_path(a)[p]).any() for p in KERNELS)


# ------------------------------------------------------------ distributions
@pytest.mark.parametrize("s", [0.5, 0.8, 0.95])
def test_erk_against_reference_and_target(s):
  params = {"c": jnp.zeros((3, 3, 1, 8)), "d1": jnp.zeros((392, 300)),
            "d2": jnp.zeros((300, 100)), "d3": jnp.zeros((100, 10))}
  shapes = [(3, 3, 1, 8), (392, 300), (300, 100), (100, 10)]
  ref = ref_erk(shapes, s)
  got = cx.prune.erk_sparsity(params, s)
  np.testing.assert_allclose([1 - got[k] for k in ("c", "d1", "d2", "d3")], ref, rtol=1e-12)
  traced = jax.jit(cx.prune.erk_sparsity)(params, s)
  np.testing.assert_allclose([1 - float(traced[k]) for k in ("c", "d1", "d2", "d3")],
                             ref, rtol=1e-5, atol=1e-6)
  n = np.array([np.prod(x) for x in shapes])
  np.testing.assert_allclose((ref * n).sum() / n.sum(), 1 - s, rtol=1e-12)
  kept = cx.prune.sparsity_stats(cx.prune.magnitude_mask(params, got))["global"]
  target = n.sum() - math.floor(s * n.sum())
  assert target - 1 <= kept["kept"] <= target + len(shapes)


def test_uniform_sparsity_and_patterns():
  params = tree(7)
  u = by_path(cx.prune.uniform_sparsity(params, 0.4))
  assert [u[p] for p in KERNELS] == [0.4] * 3 and u["params/Dense_0/bias"] == 0.0
  assert by_path(cx.prune.layer_sparsities(params, 0.4)) == u
  erk = cx.prune.layer_sparsities(params, 0.4, distribution="erk")
  assert erk == cx.prune.erk_sparsity(params, 0.4)
  with pytest.raises(ValueError, match="distribution"):
    cx.prune.layer_sparsities(params, 0.4, distribution="snip")
  pat = by_path(cx.prune.sparsity_from_patterns(params, {"Conv": 0.34, "Dense": 0.92}))
  assert pat["params/Conv_0/kernel"] == 0.34 and pat["params/Dense_1/kernel"] == 0.92


# ------------------------------------------------------------------- errors
@pytest.mark.parametrize("bad", [1.0, -0.1, float("nan"), 1.2])
def test_bad_sparsity(bad):
  with pytest.raises(ValueError, match=r"\['Conv_0'\]\['kernel'\]: sparsity must be in"):
    cx.prune.magnitude_mask(tree(), bad)
  with pytest.raises(ValueError, match="sparsity must be in"):
    cx.prune.magnitude_mask(tree(), bad, scope="global")
  with pytest.raises(ValueError, match="sparsity must be in"):
    cx.prune.erk_sparsity(tree(), bad)
  with pytest.raises(ValueError, match="'Dense'"):
    cx.prune.sparsity_from_patterns(tree(), {"Dense": bad})


def test_bad_leaves_and_arguments():
  params = {"w": jnp.ones((2, 3), jnp.int32), "v": jnp.ones((2, 3))}
  with pytest.raises(TypeError, match=r"params\['w'\]: expected a floating"):
    cx.prune.magnitude_mask(params, 0.5, where="w")
  with pytest.raises(TypeError, match=r"params\['w'\]"):
    cx.prune.random_mask(params, 0.5, jax.random.key(0), where="w")
  nan = {"v": jnp.array([[1.0, jnp.nan]])}
  with pytest.raises(ValueError, match=r"params\['v'\]: contains 1 NaN"):
    cx.prune.magnitude_mask(nan, 0.5)
  with pytest.raises(ValueError, match=r"params\['v'\]: contains 1 NaN"):
    jax.jit(lambda s: cx.prune.magnitude_mask(nan, s))(0.5)  # closed-over leaf
  with pytest.raises(ValueError, match="scope"):
    cx.prune.magnitude_mask(params, 0.5, scope="model")
  with pytest.raises(TypeError, match="global scope"):
    cx.prune.magnitude_mask({"v": jnp.ones((2, 2))}, {"v": 0.5}, scope="global")
  with pytest.raises(TypeError, match="scalar"):
    cx.prune.magnitude_mask({"v": jnp.ones((2, 2))}, jnp.array([0.1, 0.2]))
  with pytest.raises(ValueError, match=r"params\['v'\]: no sparsity given"):
    cx.prune.magnitude_mask({"v": jnp.ones((2, 2))}, {"other": 0.5})
