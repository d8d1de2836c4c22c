"""cx.quantize.quantize_points / PointsArray: Polino's points, stored exactly.

Checked against a NumPy float64 reference of the paper's rule (per bucket,
``x' = (x - min) / (max - min)``, nearest point, ``p * alpha + beta``),
bit for bit against ``nearest_point``, by hypothesis properties (nearest
representable value, error bound, code range), jit vs eager, a
save/load round trip and every bad input.
"""

import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import compressax as cx

# Fixed shapes and bucket sizes keep the number of compilations small;
# 37 x 3 = 111 values leave a partial last bucket for k = 5 and k = 16.
SHAPE = (37, 3)
BUCKETS = [None, 1, 5, 16, 256]
N_POINTS = [1, 2, 4, 16]


def _case(seed, n_points, *, with_ends=False):
  rng = np.random.default_rng(seed)
  x = (rng.normal(size=SHAPE) * rng.uniform(0.01, 100.0)
       + rng.uniform(-10.0, 10.0)).astype(np.float32)
  pts = rng.random(n_points).astype(np.float32)
  if with_ends and n_points >= 2:
    pts[:2] = (0.0, 1.0)
  return x, pts


def _ref(x, points, k):
  """Float64 reference: codes, alpha, beta per bucket, and the values."""
  flat = np.asarray(x, np.float64).reshape(-1)
  pts = np.sort(np.asarray(points, np.float64))
  k = flat.size if k is None else k
  codes = np.empty(flat.size, np.int64)
  scaled = np.empty(flat.size)
  alphas, betas = [], []
  for s in range(0, flat.size, k):
    b = flat[s:s + k]
    lo, a = b.min(), b.max() - b.min()
    a = 1.0 if a < 1e-10 else a
    scaled[s:s + k] = (b - lo) / a
    # argmin picks the first (lower) point on an exact tie.
    codes[s:s + k] = np.argmin(np.abs(scaled[s:s + k, None] - pts[None, :]), axis=1)
    alphas.append(a)
    betas.append(lo)
  alpha = np.repeat(alphas, k)[:flat.size]
  beta = np.repeat(betas, k)[:flat.size]
  vals = pts[codes] * alpha + beta
  return codes, np.array(alphas), np.array(betas), vals, scaled


def _near_tie(scaled, points, tol=1e-5):
  """Scaled values within ``tol`` of a midpoint (float32 may break such ties
  the other way than float64)."""
  pts = np.sort(np.asarray(points, np.float64))
  mids = (pts[:-1] + pts[1:]) / 2
  if mids.size == 0:
    return np.zeros(scaled.shape, bool)
  return np.min(np.abs(scaled[:, None] - mids[None, :]), axis=1) < tol


@hypothesis.given(st.integers(0, 2 ** 16), st.sampled_from(BUCKETS),
                  st.sampled_from(N_POINTS))
def test_matches_float64_reference(seed, k, n_points):
  x, pts = _case(seed, n_points)
  node = cx.quantize.quantize_points(x, pts, bucket_size=k)
  codes, alpha, beta, vals, scaled = _ref(x, pts, k)
  got_codes = np.asarray(node.codes).reshape(-1).astype(np.int64)
  ok = (got_codes == codes) | _near_tie(scaled, pts)
  assert ok.all()
  n_buckets = math.ceil(x.size / (x.size if k is None else k))
  assert node.alpha.shape == node.beta.shape == (n_buckets,)
  np.testing.assert_allclose(np.asarray(node.alpha, np.float64), alpha, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(node.beta, np.float64), beta)
  # The materialized values follow value_i = points[code_i] * alpha_b + beta_b.
  bucket = np.arange(x.size) // (x.size if k is None else k)
  formula = (np.asarray(node.points, np.float64)[got_codes]
             * np.asarray(node.alpha, np.float64)[bucket]
             + np.asarray(node.beta, np.float64)[bucket])
  dense = np.asarray(node.materialize(), np.float64).reshape(-1)
  scale = np.abs(formula) + np.asarray(node.alpha, np.float64)[bucket]
  assert np.all(np.abs(dense - formula) <= 2e-7 * scale)
  exact = ~_near_tie(scaled, pts)
  np.testing.assert_allclose(dense[exact], vals[exact], rtol=1e-5,
                             atol=1e-5 * np.max(np.abs(vals)))
  assert node.shape == SHAPE and node.dtype == np.float32
  assert node.bucket_size == k and node.n_points == n_points
  bits = max(0, math.ceil(math.log2(n_points)))
  assert node.storage_bits() == x.size * bits + 32 * (n_points + 2 * n_buckets)


@hypothesis.given(st.integers(0, 2 ** 16), st.sampled_from(BUCKETS),
                  st.sampled_from(N_POINTS))
def test_materialize_equals_nearest_point_bitwise(seed, k, n_points):
  x, pts = _case(seed, n_points)
  node = cx.quantize.quantize_points(x, pts, bucket_size=k)
  want = cx.quantize.nearest_point(jnp.asarray(x), jnp.asarray(pts), bucket_size=k)
  np.testing.assert_array_equal(np.asarray(node.materialize()), np.asarray(want))
  # Also when materialized inside a user's jit.
  got_jit = jax.jit(lambda n: n.materialize())(node)
  np.testing.assert_array_equal(np.asarray(got_jit), np.asarray(want))


@hypothesis.given(st.integers(0, 2 ** 16), st.sampled_from(BUCKETS),
                  st.sampled_from(N_POINTS), st.booleans())
def test_every_value_is_the_nearest_representable_one(seed, k, n_points, ends):
  x, pts = _case(seed, n_points, with_ends=ends)
  node = cx.quantize.quantize_points(x, pts, bucket_size=k)
  codes = np.asarray(node.codes)
  assert codes.shape == SHAPE and codes.dtype == np.uint8
  assert codes.max() < n_points
  flat = x.reshape(-1).astype(np.float64)
  dense = np.asarray(node.materialize(), np.float64).reshape(-1)
  bucket = np.arange(x.size) // (x.size if k is None else k)
  alpha = np.asarray(node.alpha, np.float64)[bucket]
  beta = np.asarray(node.beta, np.float64)[bucket]
  p = np.sort(pts.astype(np.float64))
  representable = p[None, :] * alpha[:, None] + beta[:, None]
  best = np.min(np.abs(representable - flat[:, None]), axis=1)
  err = np.abs(dense - flat)
  # float32 rounding of the scaled value and of the de-scaling.
  slack = 1e-6 * (np.abs(flat) + alpha)
  assert np.all(err <= best + slack)
  # Error bound: half the largest gap, or the distance to the end points.
  gaps = np.diff(p)
  reach = max(p[0], 1.0 - p[-1], gaps.max() / 2 if gaps.size else 0.0)
  assert np.all(err <= reach * alpha + slack)
  if ends and n_points >= 2:  # points include 0 and 1: half the largest gap
    assert np.all(err <= gaps.max() / 2 * alpha + slack)


def test_ties_go_to_the_lower_point_and_flat_buckets_use_alpha_one():
  x = np.array([0.0, 0.5, 1.0, 0.25], np.float32)
  node = cx.quantize.quantize_points(x, np.array([0.25, 0.75], np.float32))
  np.testing.assert_array_equal(np.asarray(node.codes), [0, 0, 1, 0])
  flat = np.full((2, 3), 3.0, np.float32)
  node = cx.quantize.quantize_points(flat, np.array([0.0, 1.0], np.float32))
  assert float(node.alpha[0]) == 1.0 and float(node.beta[0]) == 3.0
  np.testing.assert_array_equal(np.asarray(node.materialize()), flat)


def test_unsorted_points_are_sorted_and_codes_widen_past_256():
  x, pts = _case(0, 16)
  a = cx.quantize.quantize_points(x, pts[::-1].copy(), bucket_size=5)
  b = cx.quantize.quantize_points(x, np.sort(pts), bucket_size=5)
  np.testing.assert_array_equal(np.asarray(a.points), np.sort(pts))
  np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(b.codes))
  assert cx.quantize.quantize_points(x, np.linspace(0, 1, 256, dtype=np.float32)
                                     ).codes.dtype == np.uint8
  wide = cx.quantize.quantize_points(x, np.linspace(0, 1, 257, dtype=np.float32))
  assert wide.codes.dtype == np.uint16 and wide.bits == 9
  many = cx.quantize.quantize_points(x, np.linspace(0, 1, 2 ** 16, dtype=np.float32))
  assert many.codes.dtype == np.uint16 and int(np.asarray(many.codes).max()) < 2 ** 16


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_dtype_is_kept(dtype):
  x, pts = _case(1, 4)
  xl = jnp.asarray(x).astype(dtype)
  node = cx.quantize.quantize_points(xl, pts, bucket_size=16)
  out = node.materialize()
  assert out.dtype == dtype and node.dtype == np.dtype(dtype)
  want = cx.quantize.nearest_point(xl, jnp.asarray(pts), bucket_size=16)
  np.testing.assert_array_equal(np.asarray(out.astype(jnp.float32)),
                                np.asarray(want.astype(jnp.float32)))


def test_jit_and_eager_agree_bitwise():
  x, pts = _case(2, 16)
  eager = cx.quantize.quantize_points(x, pts, bucket_size=16)
  jitted = jax.jit(lambda x, p: cx.quantize.quantize_points(x, p, bucket_size=16))(
      jnp.asarray(x), jnp.asarray(pts))
  assert isinstance(jitted, cx.quantize.PointsArray)
  for f in ("codes", "points", "alpha", "beta"):
    a, b = np.asarray(getattr(eager, f)), np.asarray(getattr(jitted, f))
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(np.asarray(eager.materialize()),
                                np.asarray(jitted.materialize()))
  again = cx.quantize.quantize_points(x, pts, bucket_size=16)
  np.testing.assert_array_equal(np.asarray(again.codes), np.asarray(eager.codes))


@pytest.mark.parametrize("k", [None, 256])
def test_save_load_round_trip_is_bit_exact(tmp_path, k):
  x = np.random.default_rng(3).normal(size=(300, 7)).astype(np.float32)
  pts = cx.quantize.points_init(x, 8, method="quantiles", bucket_size=k)
  tree = {"w": cx.quantize.quantize_points(x, pts, bucket_size=k),
          "b": np.zeros(7, np.float32)}
  path = str(tmp_path / "p.cx")
  cx.io.save(path, tree)
  back = cx.io.load(path, keep_compressed=True)
  node = back["w"]
  assert isinstance(node, cx.quantize.PointsArray)
  assert node.meta() == tree["w"].meta()
  for f in ("codes", "points", "alpha", "beta"):
    a, b = np.asarray(getattr(tree["w"], f)), np.asarray(getattr(node, f))
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))
  np.testing.assert_array_equal(np.asarray(node.materialize()),
                                np.asarray(tree["w"].materialize()))
  dense = cx.io.load(path)
  np.testing.assert_array_equal(np.asarray(dense["w"]),
                                np.asarray(tree["w"].materialize()))


_PTS = np.array([0.0, 0.5, 1.0], np.float32)


@pytest.mark.parametrize("x, points, kwargs, exc, match", [
    (np.ones((3, 3), np.int32), _PTS, {}, TypeError, "floating"),
    (np.array([1.0, np.nan], np.float32), _PTS, {}, ValueError, "NaN/Inf"),
    (np.array([1.0, np.inf], np.float32), _PTS, {}, ValueError, "NaN/Inf"),
    (np.zeros((0, 3), np.float32), _PTS, {}, ValueError, "empty"),
    (np.ones(4, np.float32), np.array([0.1, np.nan], np.float32), {}, ValueError, "NaN"),
    (np.ones(4, np.float32), np.array([-0.1, 0.5], np.float32), {}, ValueError, r"\[0, 1\]"),
    (np.ones(4, np.float32), np.array([0.5, 1.5], np.float32), {}, ValueError, r"\[0, 1\]"),
    (np.ones(4, np.float32), np.array([0, 1], np.int32), {}, TypeError, "points"),
    (np.ones(4, np.float32), np.zeros(0, np.float32), {}, ValueError, "non-empty 1-D"),
    (np.ones(4, np.float32), np.zeros((2, 2), np.float32), {}, ValueError, "non-empty 1-D"),
    (np.ones(4, np.float32), np.linspace(0, 1, 2 ** 16 + 1, dtype=np.float32), {},
     ValueError, "65536"),
    (np.ones(4, np.float32), _PTS, {"bucket_size": 0}, ValueError, "bucket_size"),
    (np.ones(4, np.float32), _PTS, {"bucket_size": -3}, ValueError, "bucket_size"),
    (np.ones(4, np.float32), _PTS, {"bucket_size": 2.5}, ValueError, "bucket_size"),
    (np.ones(4, np.float32), _PTS, {"bucket_size": True}, ValueError, "bucket_size"),
])
def test_bad_input_names_the_path(x, points, kwargs, exc, match):
  with pytest.raises(exc, match=match) as info:
    cx.quantize.quantize_points(x, points, path="params['w']", **kwargs)
  assert str(info.value).startswith("params['w']: ")
  with pytest.raises(exc, match=match) as info:
    cx.quantize.quantize_points(x, points, **kwargs)
  assert str(info.value).startswith("x: ")
