"""Distillation losses vs NumPy float64 references written from the papers."""

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

import compressax as cx

D = cx.distill


# ------------------------------------------------------ float64 references


def _log_softmax64(z, t=1.0):
  z = np.asarray(z, np.float64) / t
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _kl64(p_logits, q_logits, t=1.0):
  lp, lq = _log_softmax64(p_logits, t), _log_softmax64(q_logits, t)
  p = np.exp(lp)
  safe = p > 0
  return np.sum(np.where(safe, p * (np.where(safe, lp, 0.0) - lq), 0.0), -1)


def _kd64(s, t_logits, temp):
  return temp ** 2 * _kl64(t_logits, s, temp)


def _ce64(logits, labels):
  lp = _log_softmax64(logits)
  return -np.take_along_axis(lp, labels[..., None], -1)[..., 0]


def _alpha64(s, t_logits, a, temp=1.0):
  p = np.exp(_log_softmax64(t_logits, temp))
  q = np.exp(_log_softmax64(s, temp))
  return (1 - np.sum(p ** a * q ** (1 - a), -1)) / (a * (1 - a))


def _logits(seed, shape, scale=1.0):
  return (scale * np.random.default_rng(seed).standard_normal(shape)
          ).astype(np.float32)


# A few fixed shapes (scalar batch, vector batch, 2-D batch): each new shape
# costs a compilation, and the algebra does not depend on the size.
_shapes = st.sampled_from([(5,), (3, 4), (2, 3, 6)])

# Hypothesis tests call the jitted losses (one compilation per shape); the
# eager path and its value checks are covered by the other tests.
_kd = jax.jit(D.kd_loss)
_kl = jax.jit(D.kl_divergence, static_argnames="direction")
_alpha = jax.jit(D.alpha_divergence)
_polino = jax.jit(D.polino_loss)
_hint = jax.jit(D.hint_loss)
_ens = jax.jit(D.ensemble_teacher)


# ------------------------------------------------------------------ kd_loss


@given(shape=_shapes, seed=st.integers(0, 99), temp=st.floats(0.5, 8.0),
       scale=st.floats(0.1, 20.0))
def test_kd_loss_matches_numpy(shape, seed, temp, scale):
  s, t = _logits(seed, shape, scale), _logits(seed + 1, shape, scale)
  out = _kd(s, t, temperature=temp)
  assert out.shape == shape[:-1] and out.dtype == jnp.float32
  np.testing.assert_allclose(out, _kd64(s, t, temp), rtol=2e-4, atol=1e-5)
  assert np.all(np.asarray(out) >= -1e-6)


@given(shape=_shapes, seed=st.integers(0, 99), temp=st.floats(0.1, 10.0),
       scale=st.floats(0.0, 1e4))
def test_kd_loss_zero_for_identical_logits(shape, seed, temp, scale):
  s = _logits(seed, shape, scale)
  np.testing.assert_allclose(_kd(s, s, temperature=temp), 0.0, atol=1e-6)


def test_large_logits_finite_with_finite_gradients():
  s, t = _logits(0, (4, 10), 1e4), _logits(1, (4, 10), 1e4)
  out = D.kd_loss(s, t, temperature=1.0)
  np.testing.assert_allclose(out, _kd64(s, t, 1.0), rtol=1e-4)
  for fn in (lambda x: D.kd_loss(x, t, 2.0),
             lambda x: D.polino_loss(x, t, jnp.arange(4)),
             lambda x: D.kl_divergence(x, t, direction="symmetric"),
             lambda x: D.alpha_divergence(x, t, 0.5),
             lambda x: D.alpha_divergence(x, t, 0.0),
             lambda x: D.alpha_divergence(x, t, 1.0),
             lambda x: D.hint_loss(x, t),
             lambda x: D.ensemble_teacher([x, t])):
    v, g = jax.value_and_grad(lambda x: jnp.sum(fn(x)))(jnp.asarray(s))
    assert np.isfinite(v) and np.all(np.isfinite(g))


def test_bfloat16_inputs_compute_in_float32():
  s = jnp.asarray(_logits(2, (3, 6), 3.0), jnp.bfloat16)
  t = jnp.asarray(_logits(3, (3, 6), 3.0), jnp.bfloat16)
  labels = jnp.array([0, 5, 2])
  s32, t32 = np.asarray(s, np.float32), np.asarray(t, np.float32)
  for fn, ref in (
      (lambda a, b: D.kd_loss(a, b, 2.0), _kd64(s32, t32, 2.0)),
      (lambda a, b: D.polino_loss(a, b, labels),
       0.7 * _kd64(s32, t32, 2.0) + 0.3 * _ce64(s32, np.asarray(labels))),
      (lambda a, b: D.alpha_divergence(a, b, 0.3), _alpha64(s32, t32, 0.3)),
      (lambda a, b: D.hint_loss(a, b), np.mean((s32 - t32) ** 2, -1))):
    out = fn(s, t)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-6)


def test_jit_matches_eager_and_traced_temperature():
  s, t = _logits(4, (5, 7)), _logits(5, (5, 7))
  eager = D.kd_loss(s, t, 3.0)
  jitted = jax.jit(D.kd_loss)(s, t, 3.0)
  np.testing.assert_allclose(jitted, eager, rtol=1e-6)
  # A traced non-positive temperature is clamped (documented), never NaN.
  assert np.all(np.isfinite(jax.jit(D.kd_loss)(s, t, 0.0)))
  traces = []

  def counted(a, b, tt):
    traces.append(1)
    return D.kd_loss(a, b, tt)

  once = jax.jit(counted)
  once(s, t, 1.0)
  once(s, t, 2.0)
  assert len(traces) == 1  # a new temperature does not recompile
  temps = jnp.array([0.5, 1.0, 4.0])
  batched = jax.vmap(lambda tt: D.kd_loss(s, t, tt))(temps)
  for i, tt in enumerate([0.5, 1.0, 4.0]):
    np.testing.assert_allclose(batched[i], _kd64(s, t, tt), rtol=1e-4,
                               atol=1e-6)


# ---------------------------------------------------------- polino / CE


@given(batch=st.sampled_from([1, 4]), c=st.sampled_from([2, 7]),
       seed=st.integers(0, 99),
       alpha=st.floats(0.0, 1.0), temp=st.floats(0.5, 5.0))
def test_polino_loss_matches_numpy(batch, c, seed, alpha, temp):
  s, t = _logits(seed, (batch, c), 3.0), _logits(seed + 7, (batch, c), 3.0)
  labels = np.random.default_rng(seed).integers(0, c, batch)
  out = _polino(s, t, labels, alpha=alpha, temperature=temp)
  ref = alpha * _kd64(s, t, temp) + (1 - alpha) * _ce64(s, labels)
  np.testing.assert_allclose(out, ref, rtol=2e-4, atol=1e-5)


def test_polino_default_is_paper_setting():
  s, t = _logits(8, (4, 10)), _logits(9, (4, 10))
  labels = np.array([1, 2, 3, 9])
  np.testing.assert_allclose(
      D.polino_loss(s, t, labels),
      0.7 * 4.0 * _kl64(t, s, 2.0) + 0.3 * _ce64(s, labels), rtol=1e-4)


# ------------------------------------------------------ KL and alpha-div


@given(shape=_shapes, seed=st.integers(0, 99), temp=st.floats(0.5, 4.0))
def test_kl_directions(shape, seed, temp):
  p, q = _logits(seed, shape, 2.0), _logits(seed + 3, shape, 2.0)
  fwd = _kl(p, q, temperature=temp)
  rev = _kl(p, q, direction="reverse", temperature=temp)
  sym = _kl(p, q, direction="symmetric", temperature=temp)
  np.testing.assert_allclose(fwd, _kl64(p, q, temp), rtol=2e-4, atol=1e-6)
  np.testing.assert_allclose(rev, _kl64(q, p, temp), rtol=2e-4, atol=1e-6)
  np.testing.assert_allclose(
      sym, 0.5 * (_kl64(p, q, temp) + _kl64(q, p, temp)), rtol=2e-4, atol=1e-6)
  np.testing.assert_allclose(
      sym, _kl(q, p, direction="symmetric", temperature=temp),
      rtol=1e-5, atol=1e-7)


def test_kl_with_masked_teacher_logits():
  p = np.array([[0.0, -np.inf, 1.0]], np.float32)
  q = np.array([[0.5, 0.2, 0.1]], np.float32)
  out = D.kl_divergence(p, q)
  np.testing.assert_allclose(out, _kl64(p, q), rtol=1e-5)
  g = jax.grad(lambda x: D.kl_divergence(p, x).sum())(q)
  assert np.all(np.isfinite(g))


@given(shape=_shapes, seed=st.integers(0, 99),
       alpha=st.floats(-1.0, 2.0).filter(
           lambda a: min(abs(a), abs(1 - a)) > 0.05),
       temp=st.floats(0.5, 3.0))
def test_alpha_divergence_matches_amari_formula(shape, seed, alpha, temp):
  s, t = _logits(seed, shape), _logits(seed + 5, shape)
  out = _alpha(s, t, alpha, temperature=temp)
  np.testing.assert_allclose(out, _alpha64(s, t, alpha, temp), rtol=1e-3,
                             atol=1e-5)


@given(seed=st.integers(0, 99), temp=st.floats(0.5, 3.0),
       eps=st.sampled_from([0.0, 1e-6, 1e-4, 1e-3]))
def test_alpha_divergence_limits_are_kl(seed, temp, eps):
  s, t = _logits(seed, (3, 6), 2.0), _logits(seed + 1, (3, 6), 2.0)
  tol = dict(rtol=1e-4 + 5 * eps, atol=1e-5 + 5 * eps)
  np.testing.assert_allclose(_alpha(s, t, 1.0 - eps, temp),
                             _kl64(t, s, temp), **tol)
  np.testing.assert_allclose(_alpha(s, t, eps, temp),
                             _kl64(s, t, temp), **tol)


def test_alpha_divergence_gradients_in_alpha_and_vmap():
  s, t = _logits(10, (2, 5)), _logits(11, (2, 5))
  alphas = jnp.array([-0.5, 0.0, 0.25, 0.5, 1.0, 1.5])
  batched = jax.vmap(lambda a: D.alpha_divergence(s, t, a))(alphas)
  for i, a in enumerate(np.asarray(alphas)):
    np.testing.assert_allclose(batched[i], D.alpha_divergence(s, t, float(a)),
                               rtol=1e-5)
  for a in (0.0, 0.5, 1.0):
    g = jax.grad(lambda a: D.alpha_divergence(s, t, a).sum())(a)
    assert np.isfinite(g)
  np.testing.assert_allclose(D.alpha_divergence(s, s, 0.3), 0.0, atol=1e-6)


# ------------------------------------------------------- hints, ensembles


@given(shape=_shapes, seed=st.integers(0, 99), dt=st.sampled_from([1, 4]))
def test_hint_loss_with_projection(shape, seed, dt):
  s = _logits(seed, shape)
  t = _logits(seed + 1, (*shape[:-1], dt))
  proj = _logits(seed + 2, (shape[-1], dt))
  ref = np.mean((s.astype(np.float64) @ proj - t) ** 2, -1)
  np.testing.assert_allclose(_hint(s, t, proj), ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(D.hint_loss(s, t, lambda x: x @ proj), ref,
                             rtol=1e-4, atol=1e-5)


def test_hint_loss_projection_is_learnable():
  s, t = _logits(0, (8, 4)), _logits(1, (8, 3))
  proj = jnp.zeros((4, 3))
  loss = lambda p: D.hint_loss(s, t, p).mean()
  stepped = proj - 0.1 * jax.grad(loss)(proj)
  assert float(loss(stepped)) < float(loss(proj))


@given(e=st.sampled_from([1, 3]), shape=_shapes, seed=st.integers(0, 99),
       temp=st.floats(0.5, 4.0), scale=st.sampled_from([1.0, 100.0, 1e4]))
def test_ensemble_teacher_averages_probabilities(e, shape, seed, temp, scale):
  ls = [_logits(seed + i, shape, scale) for i in range(e)]
  z = _ens(ls, temperature=temp)
  ref = np.mean([np.exp(_log_softmax64(l, temp)) for l in ls], axis=0)
  np.testing.assert_allclose(np.exp(_log_softmax64(np.asarray(z), temp)), ref,
                             atol=1e-5)
  np.testing.assert_allclose(_ens(np.stack(ls), temperature=temp), z,
                             rtol=1e-6, atol=1e-6)
  # KD against the ensemble is the KL from the average distribution.
  s = _logits(seed + 50, shape, scale)
  lq = _log_softmax64(s, temp)
  log_ref = np.log(np.where(ref > 0, ref, 1.0))
  ref_kd = temp ** 2 * np.sum(np.where(ref > 0, ref * (log_ref - lq), 0.0), -1)
  np.testing.assert_allclose(_kd(s, z, temp), ref_kd,
                             rtol=1e-3, atol=1e-3 * max(1.0, scale / 100))


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("temp", [0.0, -1.0, float("nan")])
def test_bad_temperature(temp):
  s = np.zeros((2, 3), np.float32)
  for fn in (lambda: D.kd_loss(s, s, temp),
             lambda: D.polino_loss(s, s, np.array([0, 1]), temperature=temp),
             lambda: D.kl_divergence(s, s, temperature=temp),
             lambda: D.alpha_divergence(s, s, 0.5, temperature=temp),
             lambda: D.ensemble_teacher([s], temperature=temp)):
    with pytest.raises(ValueError, match="temperature must be in"):
      fn()


def test_shape_and_dtype_errors():
  a, b = np.zeros((2, 3), np.float32), np.zeros((2, 4), np.float32)
  with pytest.raises(ValueError, match="same shape"):
    D.kd_loss(a, b)
  with pytest.raises(ValueError, match="same shape"):
    D.alpha_divergence(a, b, 0.5)
  with pytest.raises(ValueError, match="same shape"):
    D.hint_loss(a, b)
  with pytest.raises(ValueError, match=r"\(3, D_t\) matrix"):
    D.hint_loss(a, b, np.zeros((4, 4), np.float32))
  with pytest.raises(TypeError, match="floating"):
    D.kd_loss(a.astype(np.int32), a)
  with pytest.raises(TypeError, match="integer class ids"):
    D.polino_loss(a, a, np.array([0.0, 1.0]))
  with pytest.raises(ValueError, match=r"labels must have shape"):
    D.polino_loss(a, a, np.array([0, 1, 2]))
  with pytest.raises(ValueError,
                     match=r"labels: class ids must be in \[0, 3\)"):
    D.polino_loss(a, a, np.array([0, 3]))
  with pytest.raises(ValueError, match="alpha must be in"):
    D.polino_loss(a, a, np.array([0, 1]), alpha=1.5)
  with pytest.raises(ValueError, match="direction"):
    D.kl_divergence(a, a, direction="both")
  with pytest.raises(ValueError, match="NaN"):
    D.alpha_divergence(a, a, float("nan"))
  with pytest.raises(ValueError, match="scalar"):
    D.alpha_divergence(a, a, np.array([0.1, 0.2]))
  with pytest.raises(ValueError, match="at least one"):
    D.ensemble_teacher([])
  with pytest.raises(ValueError, match="same shape"):
    D.ensemble_teacher([a, b])


# ---------------------------------------------------------------- cosine loss

_cosine = jax.jit(D.cosine_loss)


@given(shape=_shapes, seed=st.integers(0, 2 ** 16), scale=st.floats(1e-3, 1e3))
def test_cosine_loss_matches_float64_and_ignores_length(shape, seed, scale):
  s, t = _logits(seed, shape), _logits(seed + 1, shape)
  s64, t64 = s.astype(np.float64), t.astype(np.float64)
  ref = 1 - np.sum(s64 * t64, -1) / (np.linalg.norm(s64, axis=-1) * np.linalg.norm(t64, axis=-1))
  got = _cosine(s, t)
  assert got.shape == shape[:-1] and got.dtype == jnp.float32
  np.testing.assert_allclose(got, ref, atol=2e-6)
  np.testing.assert_allclose(_cosine(np.float32(scale) * s, t), ref, atol=2e-5)
  np.testing.assert_allclose(_cosine(s, s), 0, atol=2e-6)
  np.testing.assert_allclose(_cosine(s, -s), 2, atol=2e-6)


def test_cosine_loss_zero_vector_bad_shapes_and_gradient():
  z = np.zeros((2, 3), np.float32)
  t = _logits(0, (2, 3))
  np.testing.assert_allclose(D.cosine_loss(z, t), 1.0)
  assert np.all(np.isfinite(jax.grad(lambda a: D.cosine_loss(a, t).sum())(z)))
  with pytest.raises(ValueError, match="same shape"):
    D.cosine_loss(t, t[:, :2])
  with pytest.raises(TypeError):
    D.cosine_loss(np.ones((2, 3), np.int32), t)
  # The gradient is orthogonal to the student's own direction (length is free).
  s = _logits(1, (4, 5))
  u = _logits(2, (4, 5))
  g = np.asarray(jax.grad(lambda a: D.cosine_loss(a, u).sum())(s))
  np.testing.assert_allclose(np.sum(g * s, -1), 0, atol=1e-5)
