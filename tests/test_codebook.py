"""Polino's quantization onto points: forward, gradients, init, bit allocation."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import compressax as cx


def _np_buckets(x, bucket_size):
  """Per-value alpha, beta of Polino's bucket scaling (float64)."""
  flat = np.asarray(x, np.float64).ravel()
  k = flat.size if bucket_size is None else bucket_size
  alpha = np.empty_like(flat)
  beta = np.empty_like(flat)
  for s in range(0, flat.size, k):
    b = flat[s:s + k]
    beta[s:s + k] = b.min()
    a = b.max() - b.min()
    alpha[s:s + k] = 1.0 if a < 1e-10 else a
  return flat, alpha, beta


def _np_nearest(x, points, bucket_size):
  flat, alpha, beta = _np_buckets(x, bucket_size)
  p = np.sort(np.asarray(points, np.float64))
  scaled = (flat - beta) / alpha
  idx = np.argmin(np.abs(scaled[:, None] - p[None, :]), axis=1)  # lowest on ties
  return (p[idx] * alpha + beta).reshape(np.shape(x)), idx, alpha, scaled


@hypothesis.settings(max_examples=15)
@hypothesis.given(seed=st.integers(0, 2 ** 16),
                  shape=st.sampled_from([(1,), (5,), (4, 6), (3, 3, 3)]),
                  bucket=st.sampled_from([None, 1, 4, 7]),
                  n_points=st.integers(1, 9))
def test_forward_and_point_gradient_match_numpy(seed, shape, bucket, n_points):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape).astype(np.float32)
  points = rng.uniform(0, 1, n_points).astype(np.float32)  # unsorted on purpose
  c = rng.standard_normal(shape).astype(np.float32)
  loss = lambda p: jnp.sum(cx.quantize.nearest_point(x, p, bucket_size=bucket) * c)
  out = cx.quantize.nearest_point(x, points, bucket_size=bucket)
  ref, idx, alpha, scaled = _np_nearest(x, points, bucket)
  # Values within float32 rounding of a midpoint may legitimately flip.
  p = np.sort(points.astype(np.float64))
  mids = (p[:-1] + p[1:]) / 2
  clear = np.all(np.abs(scaled[:, None] - mids[None, :]) > 1e-5, axis=1)
  hypothesis.assume(clear.all())
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  assert out.dtype == jnp.float32 and out.shape == shape
  # d loss / d p_j = sum over weights assigned to j of alpha * dL/dw_hat.
  order = np.argsort(points, kind="stable")
  g_sorted = np.array([np.sum((alpha * c.ravel())[idx == j]) for j in range(n_points)])
  g_ref = np.empty(n_points)
  g_ref[order] = g_sorted
  np.testing.assert_allclose(jax.grad(loss)(points), g_ref, rtol=1e-5, atol=1e-5)


def test_gradient_for_x_zero_or_straight_through():
  x = jnp.linspace(-1, 1, 12, dtype=jnp.float32).reshape(3, 4)
  pts = jnp.array([0.0, 0.3, 1.0])
  c = jnp.arange(12, dtype=jnp.float32).reshape(3, 4)
  f = lambda x, st: jnp.sum(cx.quantize.nearest_point(x, pts, bucket_size=5,
                                                      straight_through=st) * c)
  np.testing.assert_array_equal(jax.grad(f)(x, False), np.zeros((3, 4)))
  np.testing.assert_array_equal(jax.grad(f)(x, True), c)


def test_jit_bf16_and_constant_bucket():
  x = jnp.array([[0.5, 0.5, 0.5, 0.5], [0.0, 1.0, 2.0, 3.0]], jnp.bfloat16)
  pts = jnp.array([0.0, 0.4, 1.0])
  out = jax.jit(lambda x, p: cx.quantize.nearest_point(x, p, bucket_size=4))(x, pts)
  np.testing.assert_array_equal(out, cx.quantize.nearest_point(x, pts, bucket_size=4))
  assert out.dtype == jnp.bfloat16
  ref, _, _, _ = _np_nearest(np.asarray(x, np.float32), pts, 4)
  # constant bucket: alpha = 1, x' = 0 -> point 0 -> the value itself
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=1e-2)


@pytest.mark.parametrize("bucket", [None, 3])
def test_points_init(bucket):
  x = np.random.default_rng(0).standard_normal((5, 7)).astype(np.float32)
  np.testing.assert_allclose(cx.quantize.points_init(x, 5), np.linspace(0, 1, 5))
  q = cx.quantize.points_init(x, 4, method="quantiles", bucket_size=bucket)
  flat, alpha, beta = _np_buckets(x, bucket)
  ref = np.quantile((flat - beta) / alpha, np.linspace(0, 1, 4))
  np.testing.assert_allclose(q, ref, rtol=1e-5, atol=1e-6)
  assert cx.quantize.points_init(x, 1).tolist() == [0.5]


@hypothesis.given(norms=st.lists(st.floats(0, 100), min_size=1, max_size=8),
                  extra=st.integers(0, 200))
def test_allocate_points_properties(norms, extra):
  names = [f"layer{i}" for i in range(len(norms))]
  t = len(norms)
  total = 2 * t + extra
  alloc = cx.quantize.allocate_points(dict(zip(names, norms)), total)
  got = np.array([alloc[n] for n in names])
  assert list(alloc) == names and got.sum() == total
  base = total // (2 * t)
  rest = total - base * t
  w = np.array(norms) / sum(norms) if sum(norms) > 0 else np.full(t, 1 / t)
  assert np.all(np.abs(got - (base + rest * w)) < 1)  # within one point
  # more gradient norm never means fewer points
  n = np.array(norms)
  assert np.all((n[:, None] > n[None, :]) <= (got[:, None] >= got[None, :]))


def test_codebook_storage_formula():
  node = cx.quantize.CodebookArray(codes=jnp.zeros((3, 5), jnp.uint8),
                                   centroids=jnp.arange(5, dtype=jnp.float32),
                                   shape=(3, 5), dtype=np.dtype("float32"))
  assert node.storage_bits() == 15 * 3 + 32 * 5 and node.bits == 3


def test_bad_input():
  x = np.ones((4,), np.float32)
  with pytest.raises(ValueError, match="points: must be a non-empty 1-D"):
    cx.quantize.nearest_point(x, jnp.ones((2, 2)))
  with pytest.raises(ValueError, match="bucket_size"):
    cx.quantize.nearest_point(x, jnp.ones(2), bucket_size=0)
  with pytest.raises(TypeError, match="floating-point"):
    cx.quantize.nearest_point(np.arange(4), jnp.ones(2))
  with pytest.raises(ValueError, match="NaN/Inf"):
    cx.quantize.nearest_point(np.array([np.inf], np.float32), jnp.ones(2))
  with pytest.raises(ValueError, match="method"):
    cx.quantize.points_init(x, 3, method="kmeans")
  with pytest.raises(ValueError, match="n_points"):
    cx.quantize.points_init(x, 0)
  with pytest.raises(ValueError, match="total_points"):
    cx.quantize.allocate_points({"a": 1.0, "b": 2.0}, 3)
  with pytest.raises(ValueError, match="b: gradient norm"):
    cx.quantize.allocate_points({"a": 1.0, "b": float("nan")}, 8)
