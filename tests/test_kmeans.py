"""1-D k-means weight sharing (Deep Compression) against NumPy and scikit-learn."""

import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.cluster import KMeans

import compressax as cx


def _np_companding(x, k):
  """Panter-Dite point density p^(1/3), p on equal-mass bins of the data.

  A bin of width h holding a fraction 1/B of the points has p = 1/(B h), so
  its part of the integral of p^(1/3) is proportional to h^(2/3).
  """
  x = np.sort(np.asarray(x, np.float64).ravel())
  bins = min(2 ** 16, max(1, x.size // 8))
  edges = x[np.round(np.linspace(0, x.size - 1, bins + 1)).astype(np.int64)]
  cum = np.concatenate([[0.0], np.cumsum(np.diff(edges) ** (2 / 3))])
  return np.interp((np.arange(k) + 0.5) / k * cum[-1], cum, edges)


def _np_init(x, k, init):
  x = np.sort(np.asarray(x, np.float64).ravel())
  if init == "linear":
    t = np.arange(k) / (k - 1) if k > 1 else np.array([0.5])
    return x[0] + (x[-1] - x[0]) * t
  if init == "companding":
    return _np_companding(x, k)
  return np.quantile(x, (np.arange(k) + 0.5) / k)  # density


def _np_lloyd(x, cents, iters):
  """Lloyd's algorithm in float64 (Han et al., sec. 3.1), nearest = lowest on ties."""
  x = np.asarray(x, np.float64).ravel()
  c = np.sort(np.asarray(cents, np.float64))
  for _ in range(iters):
    codes = np.argmin(np.abs(x[:, None] - c[None, :]), axis=1)
    for j in range(c.size):
      if np.any(codes == j):  # an empty cluster keeps its centroid
        c[j] = x[codes == j].mean()
    c = np.sort(c)
  return c, np.argmin(np.abs(x[:, None] - c[None, :]), axis=1)


def _np_lloyd_tol(x, cents, iters, tol):
  """Float64 Lloyd that stops once no centroid moves more than tol * range."""
  x = np.asarray(x, np.float64).ravel()
  c = np.sort(np.asarray(cents, np.float64))
  for i in range(iters):
    new, _ = _np_lloyd(x, c, 1)
    move = np.max(np.abs(new - c))
    c = new
    if move <= tol * np.ptp(x):
      return c, i + 1
  return c, iters


def _inertia(x, cents):
  x = np.asarray(x, np.float64).ravel()
  c = np.sort(np.asarray(cents, np.float64))
  return float(np.sum((x - c[np.searchsorted((c[:-1] + c[1:]) / 2, x)]) ** 2))


def _data(seed, shape):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal(shape) * rng.uniform(0.01, 2.0)).astype(np.float32)


@hypothesis.settings(max_examples=10)
@hypothesis.given(seed=st.integers(0, 2 ** 16), n=st.sampled_from([1, 7, 300]),
                  k=st.sampled_from([1, 2, 5, 12]),
                  init=st.sampled_from(["linear", "density", "companding"]))
def test_matches_numpy_float64_lloyd(seed, n, k, init):
  x = _data(seed, (n,))
  cents, codes = cx.quantize.kmeans(x, k, init=init, iters=8)
  ref_c, _ = _np_lloyd(x, _np_init(x, k, init), 8)
  scale = float(np.ptp(x)) + 1e-6
  np.testing.assert_allclose(np.asarray(cents), ref_c, atol=2e-5 * scale)
  # Codes: every value's nearest of our centroids (lowest on ties).
  c64 = np.asarray(cents, np.float64)
  dist = np.abs(x.astype(np.float64)[:, None] - c64[None, :])
  assert np.all(dist[np.arange(n), np.asarray(codes, np.int64)] <= dist.min(1) + 1e-6 * scale)
  assert codes.dtype == np.uint8 and codes.shape == x.shape


@pytest.mark.parametrize("k", [2, 5, 16])
def test_inertia_not_worse_than_sklearn(k):
  # Uniform data, so that no cluster empties: scikit-learn relocates empty
  # clusters, a different rule from ours (keep the centroid), checked above.
  x = np.random.default_rng(k).uniform(-1, 1, 400).astype(np.float32)
  cents, codes = cx.quantize.kmeans(x, k, iters=50)
  assert np.all(np.bincount(np.asarray(codes), minlength=k) > 0)
  x64 = x.astype(np.float64)
  ours = np.sum((x64 - np.asarray(cents, np.float64)[codes]) ** 2)
  sk = KMeans(k, init=_np_init(x, k, "linear")[:, None], n_init=1, max_iter=50,
              tol=0.0, algorithm="lloyd").fit(x64[:, None])
  assert ours <= sk.inertia_ * (1 + 1e-5) + 1e-9


@pytest.mark.parametrize("init,tol", [("linear", 0.0), ("companding", 1e-3)])
def test_traced_n_clusters_under_vmap_equals_loop(init, tol):
  x = _data(1, (7, 9))
  ns = [1, 2, 5, 8]
  kw = dict(init=init, iters=10, tol=tol)
  cents, codes = jax.vmap(
      lambda n: cx.quantize.kmeans(x, n, max_clusters=8, **kw))(jnp.array(ns))
  for i, n in enumerate(ns):
    c_ref, codes_ref = cx.quantize.kmeans(x, n, **kw)
    np.testing.assert_allclose(cents[i, :n], c_ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(codes[i], codes_ref)
    assert int(codes[i].max()) < n
    # unused slots repeat the largest active centroid
    np.testing.assert_array_equal(cents[i, n:], np.full(8 - n, c_ref[-1]))


@pytest.mark.parametrize("init", ["density", "companding"])
def test_jit_equals_eager(init):
  x = _data(2, (9, 11))
  a = cx.quantize.kmeans(x, 7, init=init, iters=100, tol=1e-4)
  b = jax.jit(lambda x: cx.quantize.kmeans(x, 7, init=init, iters=100, tol=1e-4))(x)
  for u, v in zip(a, b):
    np.testing.assert_array_equal(u, v)


@hypothesis.settings(max_examples=8)
@hypothesis.given(seed=st.integers(0, 2 ** 16), n=st.sampled_from([1, 7, 300, 3000]),
                  k=st.sampled_from([1, 3, 16, 64]))
def test_companding_init_matches_numpy(seed, n, k):
  x = _data(seed, (n,))
  cents, _ = cx.quantize.kmeans(x, k, init="companding", iters=0)
  scale = float(np.ptp(x)) + 1e-6
  np.testing.assert_allclose(np.asarray(cents), _np_companding(x, k), atol=1e-5 * scale)


def test_companding_not_worse_than_sklearn_kmeanspp():
  x = np.random.default_rng(2026).standard_normal(200_000).astype(np.float32)
  cents, _ = cx.quantize.kmeans(x, 64, init="companding", iters=300, tol=1e-6)
  sk = KMeans(64, init="k-means++", n_init=1, random_state=0).fit(
      x.astype(np.float64)[:, None])
  assert _inertia(x, cents) <= sk.inertia_ * 1.01


@pytest.mark.parametrize("init", ["linear", "companding"])
def test_tol_stops_like_float64_reference(init):
  x = np.random.default_rng(11).standard_normal(2000).astype(np.float32)
  k, tol, iters = 16, 1e-3, 400
  scale = float(np.ptp(x))
  start = cx.quantize.kmeans(x, k, init=init, iters=0)[0]
  ref, its = _np_lloyd_tol(x, start, iters, tol)
  ref_all, _ = _np_lloyd(x, start, iters)
  # On this data the early stop matters: far more than the tolerance below.
  assert its < iters and np.max(np.abs(ref - ref_all)) > 10 * 2e-5 * scale
  cents, _ = cx.quantize.kmeans(x, k, init=init, iters=iters, tol=tol)
  np.testing.assert_allclose(np.asarray(cents), ref, atol=2e-5 * scale)
  # Run with tol=0 to a fixed point: one more float64 step changes nothing.
  fixed, _ = cx.quantize.kmeans(x, k, init=init, iters=5000)
  step, _ = _np_lloyd(x, fixed, 1)
  np.testing.assert_allclose(np.asarray(fixed, np.float64), step, atol=1e-5 * scale)


def test_kmeanspp_seeds_on_strided_subsample():
  size = cx.quantize._kmeans.SEED_POINTS + 4321
  x = _data(12, (size,))
  key = jax.random.key(3)
  cents, _ = cx.quantize.kmeans(x, 8, init="kmeans++", key=key, iters=0)
  strided = np.sort(x)[np.round(np.linspace(0, size - 1, 2 ** 16)).astype(np.int64)]
  assert np.all(np.isin(np.asarray(cents), strided))
  jitted, _ = jax.jit(lambda x: cx.quantize.kmeans(x, 8, init="kmeans++", key=key,
                                                  iters=0))(x)
  np.testing.assert_array_equal(jitted, cents)


def test_empty_cluster_keeps_its_centroid():
  x = np.array([0, 0, 0, 10, 10, 10], np.float32)
  cents, codes = cx.quantize.kmeans(x, 3)
  np.testing.assert_array_equal(cents, [0, 5, 10])
  np.testing.assert_array_equal(codes, [0, 0, 0, 2, 2, 2])


def test_codes_dtype_and_range():
  x = _data(3, (1000,))
  cents, codes = cx.quantize.kmeans(x, 300, iters=3)
  assert codes.dtype == np.uint16 and cents.shape == (300,)
  assert int(codes.max()) < 300
  assert np.all(np.diff(np.asarray(cents)) >= 0)


def test_kmeanspp_deterministic_and_jit():
  x = _data(4, (50, 4))
  key = jax.random.key(7)
  a = cx.quantize.kmeans(x, 6, init="kmeans++", key=key)
  b = jax.jit(lambda x, k: cx.quantize.kmeans(x, 6, init="kmeans++", key=k))(x, key)
  c = cx.quantize.kmeans(x, 6, init="kmeans++", key=jax.random.key(8))
  for u, v in zip(a, b):
    np.testing.assert_array_equal(u, v)
  assert not np.array_equal(a[0], c[0])
  ref_c, _ = _np_lloyd(x, cx.quantize.kmeans(x, 6, init="kmeans++", key=key, iters=0)[0], 30)
  np.testing.assert_allclose(a[0], ref_c, atol=1e-5 * float(np.ptp(x)))


def test_weight_share_round_trip_and_storage():
  x = jnp.asarray(_data(5, (6, 10))).astype(jnp.bfloat16)
  for k in (1, 3, 257):
    node = cx.quantize.weight_share(x, k, iters=5)
    assert isinstance(node, cx.quantize.CodebookArray)
    dense = jax.jit(cx.materialize)({"w": node})["w"]
    assert dense.dtype == jnp.bfloat16 and dense.shape == (6, 10)
    ref = np.asarray(node.centroids)[np.asarray(node.codes, np.int64)]
    np.testing.assert_array_equal(np.asarray(dense, np.float32),
                                  ref.astype(jnp.bfloat16).astype(np.float32))
    bits_per_code = math.ceil(math.log2(k)) if k > 1 else 0
    assert cx.storage_bits(node) == 60 * bits_per_code + 32 * k


def test_centroid_gradient_is_sum_of_cluster_gradients():
  x = _data(6, (5, 8))
  node = cx.quantize.weight_share(x, 4)
  c = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
  g = jax.grad(lambda n: jnp.sum(n.materialize() ** 2 * c), allow_int=True)(node)
  dense = np.asarray(node.materialize(), np.float64)
  dw = 2 * dense * c  # dL/dw_hat
  ref = np.array([dw[np.asarray(node.codes) == j].sum() for j in range(4)])
  np.testing.assert_allclose(g.centroids, ref, rtol=1e-5, atol=1e-6)


def test_weight_share_tree_per_layer_bits():
  params = {"params": {"Conv_0": {"kernel": _data(7, (3, 3, 2, 4)),
                                  "bias": np.zeros(4, np.float32)},
                       "Dense_0": {"kernel": _data(8, (8, 5))}}}
  out = cx.quantize.weight_share_tree(params, {"Conv": 256, "Dense": 32})
  assert out["params"]["Conv_0"]["kernel"].n_clusters == 256
  assert out["params"]["Dense_0"]["kernel"].n_clusters == 32
  assert out["params"]["Conv_0"]["bias"] is params["params"]["Conv_0"]["bias"]
  with pytest.raises(ValueError, match=r"params\['Dense_0'\]\['kernel'\]: "
                     r"no n_clusters given for this leaf: no rule matches"):
    cx.quantize.weight_share_tree(params, {"Conv": 8})
  with pytest.raises(ValueError, match=r"\['Conv_0'\]\['kernel'\]: n_clusters must be in"):
    cx.quantize.weight_share_tree(params, 0)


def test_bad_input():
  x = _data(9, (10,))
  for k in (0, 2 ** 16 + 1):
    with pytest.raises(ValueError, match="n_clusters must be in"):
      cx.quantize.kmeans(x, k)
  with pytest.raises(ValueError, match="n_clusters must be an integer"):
    cx.quantize.kmeans(x, 2.5)
  with pytest.raises(TypeError, match="floating-point"):
    cx.quantize.kmeans(np.arange(10), 2)
  with pytest.raises(ValueError, match="NaN/Inf"):
    cx.quantize.kmeans(np.array([1.0, np.nan], np.float32), 2)
  with pytest.raises(ValueError, match="needs a PRNG"):
    cx.quantize.kmeans(x, 2, init="kmeans++")
  with pytest.raises(ValueError, match="tol must be"):
    cx.quantize.kmeans(x, 2, tol=-1e-3)
  with pytest.raises(ValueError, match="init must be"):
    cx.quantize.kmeans(x, 2, init="random")
  with pytest.raises(ValueError, match="exceeds max_clusters"):
    cx.quantize.kmeans(x, 9, max_clusters=8)
  with pytest.raises(ValueError, match="traced n_clusters needs"):
    jax.vmap(lambda n: cx.quantize.kmeans(x, n))(jnp.arange(1, 3))
  with pytest.raises(ValueError, match="empty"):
    cx.quantize.kmeans(np.zeros((0,), np.float32), 2)
