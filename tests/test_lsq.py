"""LSQ vs a NumPy float64 reference of Esser et al.'s formulas (arXiv:1902.08153)."""

import hypothesis
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import compressax as cx

lsq, lsq_init = cx.quantize.lsq, cx.quantize.lsq_init


def ref_levels(bits, signed):
  if signed:
    return 2.0 ** (bits - 1), 2.0 ** (bits - 1) - 1
  return 0.0, 2.0 ** bits - 1


def ref_lsq(v, s, cot, bits, signed):
  """Forward value and per-element gradients of sum(cot * v_hat), in float64.

  Returns (v_hat, dv, ds_elem, v/s); ``ds_elem`` is summed over the values
  sharing a step and scaled by g = 1/sqrt(N Q_P) in :func:`reduce_ds`.
  """
  v, cot = np.asarray(v, np.float64), np.asarray(cot, np.float64)
  s = np.broadcast_to(np.asarray(s, np.float64), v.shape)
  qn, qp = ref_levels(bits, signed)
  r = v / s
  v_hat = np.round(np.clip(r, -qn, qp)) * s
  inside = (r > -qn) & (r < qp)
  dv = np.where(inside, cot, 0.0)
  dvhat_ds = np.where(r <= -qn, -qn, np.where(r >= qp, qp, np.round(r) - r))
  return v_hat, dv, cot * dvhat_ds, r


def reduce_ds(elem, s_shape, bits, signed, n_total):
  _, qp = ref_levels(bits, signed)
  axes = tuple(i for i, d in enumerate(s_shape) if d == 1) if s_shape else None
  summed = elem.sum(axis=axes, keepdims=True) if axes is not None else elem.sum()
  n = n_total // max(int(np.prod(s_shape)), 1)
  return np.reshape(summed, s_shape) / np.sqrt(n * qp)


@st.composite
def cases(draw):
  shape = draw(hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=8))
  v = draw(hnp.arrays(np.float32, shape, elements=st.floats(
      -10, 10, width=32, allow_subnormal=False)))
  cot = draw(hnp.arrays(np.float32, shape, elements=st.floats(
      -2, 2, width=32, allow_subnormal=False)))
  signed = draw(st.booleans())
  bits = draw(st.integers(2 if signed else 1, 8))
  per_channel = draw(st.booleans())
  s_shape = (1, shape[1]) if per_channel else ()
  s = draw(hnp.arrays(np.float32, s_shape, elements=st.floats(
      0.0625, 3, width=32)))
  return v, s, cot, bits, signed


@hypothesis.given(cases())
def test_forward_and_gradients_match_float64_reference(case):
  v, s, cot, bits, signed = case
  loss = lambda v, s: jnp.sum(lsq(v, s, bits, signed=signed) * cot)
  out, (dv, ds) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(
      jnp.asarray(v), jnp.asarray(s))
  out = lsq(jnp.asarray(v), jnp.asarray(s), bits, signed=signed)
  want, want_dv, ds_elem, r = ref_lsq(v, s, cot, bits, signed)
  qn, qp = ref_levels(bits, signed)
  # Elements on a rounding tie or a clip boundary may branch differently.
  edge = ((np.abs(np.abs(r - np.floor(r)) - 0.5) < 1e-4)
          | (np.abs(r + qn) < 1e-4) | (np.abs(r - qp) < 1e-4))
  s64 = np.broadcast_to(np.asarray(s, np.float64), v.shape)
  ok = np.abs(np.asarray(out, np.float64) - want) <= 1e-5 * s64 * (1 + np.abs(r))
  assert np.all(ok | edge)
  np.testing.assert_array_equal(np.asarray(dv)[~edge], want_dv[~edge])
  assert ds.shape == np.shape(s) and ds.dtype == jnp.float32
  want_ds = reduce_ds(ds_elem, np.shape(s), bits, signed, v.size)
  slack = reduce_ds(np.where(edge, np.abs(cot) * (1 + qn + qp), 0.0)
                    + 1e-5 * np.abs(cot) * (1 + np.abs(r)),
                    np.shape(s), bits, signed, v.size)
  assert np.all(np.abs(np.asarray(ds, np.float64) - want_ds) <= slack + 1e-7)


def test_gradient_cases_by_hand_region():
  # v/s = -5 (below -Q_N=-4), 1.3 (inside), 9 (above Q_P=3), for 3 signed bits.
  s = jnp.float32(0.5)
  v = jnp.array([-2.5, 0.65, 4.5], jnp.float32)
  dv, ds = jax.grad(lambda v, s: jnp.sum(lsq(v, s, 3)), argnums=(0, 1))(v, s)
  np.testing.assert_array_equal(dv, [0.0, 1.0, 0.0])
  r = np.float64(np.float32(0.65) / np.float32(0.5))
  want = (-4 + (np.round(r) - r) + 3) / np.sqrt(3 * 3)
  np.testing.assert_allclose(ds, want, rtol=1e-5)


@pytest.mark.parametrize("bits,signed", [(2, True), (4, True), (8, True),
                                         (1, False), (4, False)])
def test_lsq_init_matches_reference(bits, signed):
  w = jax.random.normal(jax.random.key(0), (30, 7))
  _, qp = ref_levels(bits, signed)
  want = 2 * np.abs(np.asarray(w, np.float64)).mean() / np.sqrt(qp)
  np.testing.assert_allclose(lsq_init(w, bits, signed=signed), want, rtol=1e-6)


def test_values_on_grid_and_clipped():
  w = jax.random.normal(jax.random.key(1), (64,)) * 3
  s = jnp.float32(0.25)
  out = np.asarray(lsq(w, s, 4), np.float64)
  k = out / 0.25
  np.testing.assert_array_equal(k, np.round(k))
  assert k.min() >= -8 and k.max() <= 7
  out_u = np.asarray(lsq(jnp.abs(w), s, 3, signed=False), np.float64) / 0.25
  assert out_u.min() >= 0 and out_u.max() <= 7


def test_jit_vmap_over_bits_and_dtypes():
  w = jax.random.normal(jax.random.key(2), (16, 4))
  s = lsq_init(w, 4)
  f = lambda w, s, b: lsq(w, s, b)
  np.testing.assert_array_equal(jax.jit(f)(w, s, 4), f(w, s, 4))
  batched = jax.vmap(f, (None, None, 0))(w, s, jnp.arange(2, 7))
  for i, b in enumerate(range(2, 7)):
    np.testing.assert_array_equal(batched[i], f(w, s, b))
  gs = jax.vmap(jax.grad(lambda s, b: jnp.sum(lsq(w, s, b) ** 2)), (None, 0))(
      s, jnp.arange(2, 7))
  assert gs.shape == (5,) and bool(jnp.all(jnp.isfinite(gs)))
  for dtype in (jnp.bfloat16, jnp.float16):
    out = lsq(w.astype(dtype), s, 4)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, f(w.astype(dtype).astype(jnp.float32),
                                         s, 4).astype(dtype))


def test_traced_nonpositive_step_is_clamped_not_nan():
  w = jax.random.normal(jax.random.key(3), (5, 5))
  out = jax.jit(lambda s: lsq(w, s, 4))(jnp.float32(-1.0))
  assert bool(jnp.all(jnp.isfinite(out)))


W = jnp.ones((4, 3))


@pytest.mark.parametrize("call,exc,msg", [
    (lambda: lsq(W, 0.1, 17), ValueError, r"x: bits must be in \[2, 16\], got 17"),
    (lambda: lsq(W, 0.1, 1), ValueError, r"bits must be in \[2, 16\]"),
    (lambda: lsq(W, 0.1, 0, signed=False), ValueError, r"bits must be in \[1, 16\]"),
    (lambda: lsq(W, 0.1, 3.5), ValueError, "integer"),
    (lambda: lsq(W, 0.0, 4), ValueError, "step must be positive"),
    (lambda: lsq(W, jnp.float32(jnp.nan), 4), ValueError, "step must be positive"),
    (lambda: lsq(W, jnp.ones((3,)), 4), ValueError, "does not broadcast"),
    (lambda: lsq(W, jnp.ones((1, 4)), 4), ValueError, "does not broadcast"),
    (lambda: lsq(W, jnp.int32(1), 4), TypeError, "step must be floating"),
    (lambda: lsq(jnp.ones((3,), jnp.int32), 0.1, 4), TypeError, "floating"),
    (lambda: lsq(jnp.array([jnp.inf]), 0.1, 4), ValueError, "NaN/Inf"),
    (lambda: lsq_init(W, 1), ValueError, r"bits must be in \[2, 16\]"),
    (lambda: lsq_init(jnp.ones((0,)), 4), ValueError, "non-empty"),
])
def test_bad_inputs(call, exc, msg):
  with pytest.raises(exc, match=msg):
    call()
