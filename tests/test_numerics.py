"""Extreme values and traced NaN: defined results, never silent garbage.

The traced-value rules these tests pin down are written in docs/index.md
("Numerics"): a NaN hyperparameter means "compress least" (most bits, full
rank, DiffQ's ``b_max``, no pruning), a traced sparsity always keeps at least
one weight, and eager and traced sparsities give the same counts.
"""

import functools

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import compressax as cx

NAN = jnp.float32(jnp.nan)


# ------------------------------------------- uniform: ranges that overflow

@pytest.mark.parametrize("kw", [{}, {"axis": 0}, {"bucket_size": 2},
                                {"symmetric": True}])
def test_uniform_range_wider_than_float32_max(kw):
  w = jnp.array([[-2e38, 2e38], [0.0, 1.0]], jnp.float32)
  q = cx.quantize.uniform(w, 8, **kw)
  assert bool(jnp.all(jnp.isfinite(q))), q
  node = cx.quantize.quantize(w, 8, **kw)
  np.testing.assert_array_equal(node.materialize(), q)
  np.testing.assert_array_equal(jax.jit(lambda x: cx.quantize.uniform(x, 8, **kw))(w), q)
  # Within half a step of the float64 reference.
  ref = np.asarray(w, np.float64)
  step = (ref.max() - ref.min()) / 255 if not kw else None
  if step is not None:
    assert np.max(np.abs(np.asarray(q, np.float64) - ref)) <= 0.5 * step * (1 + 1e-5)


def test_uniform_full_float32_range_hits_both_ends():
  big = float(np.finfo(np.float32).max)
  w = jnp.array([-big, 0.0, big], jnp.float32)
  q = cx.quantize.uniform(w, 4)
  assert bool(jnp.all(jnp.isfinite(q)))
  assert float(q[0]) == -big and float(q[2]) == big


@jax.jit
def _plain_range_uniform(x, bits):
  """The affine quantizer with the plain ``max - min`` range (no overflow guard)."""
  levels = (jnp.left_shift(1, bits) - 1).astype(jnp.float32)
  lo, hi = jnp.min(x), jnp.max(x)
  alpha = hi - lo
  alpha = jnp.where(alpha < 1e-10, jnp.ones_like(alpha), alpha)
  scale, inv = alpha * (1 / levels), levels / alpha
  codes = jnp.clip(jnp.round((x - lo) * inv), 0, levels)
  return codes * scale + lo


@hypothesis.given(st.integers(0, 2 ** 31 - 1), st.integers(1, 16),
                  st.floats(1e-6, 1e30))
def test_uniform_unchanged_for_normal_ranges(seed, bits, scale):
  """The overflow-safe range gives the same bits as ``max - min`` did."""
  w = jax.random.normal(jax.random.key(seed), (64,), jnp.float32) * scale
  np.testing.assert_array_equal(cx.quantize.uniform(w, bits),
                                _plain_range_uniform(w, jnp.int32(bits)))


# ----------------------------------------------------- LSQ on a zero kernel

def test_lsq_init_of_zero_kernel_is_positive_and_trains():
  w = jnp.zeros((8, 4), jnp.float32)
  s = cx.quantize.lsq_init(w, 4)
  assert float(s) > 0 and np.isfinite(float(s))
  assert float(s) == pytest.approx(1 / 7)  # 1 / Q_P: the grid spans [-1, 1]
  steps = cx.optim.lsq_init_steps({"k": w}, bits=4)
  q = cx.optim.lsq_params({"k": w}, steps, bits=4)  # eager: accepted
  np.testing.assert_array_equal(q["k"], w)
  x = jnp.ones((2, 8), jnp.float32)

  @jax.jit
  def loss(w, s):
    return jnp.sum((x @ cx.quantize.lsq(w, s, 4) - 1.0) ** 2)

  gw, gs = jax.grad(loss, argnums=(0, 1))(w, jax.jit(cx.quantize.lsq_init,
                                                       static_argnums=1)(w, 4))
  assert float(jnp.max(jnp.abs(gw))) > 0.1


def test_lsq_init_nonzero_kernel_unchanged():
  w = jnp.linspace(-1.0, 1.0, 32).reshape(8, 4)
  want = 2 * jnp.mean(jnp.abs(w)) / jnp.sqrt(7.0)
  assert float(cx.quantize.lsq_init(w, 4)) == pytest.approx(float(want), rel=1e-6)


# ------------------------------------------------------------ DiffQ NaN logits

def _diffq_tree():
  params = {"w": jnp.linspace(-1.0, 1.0, 64).reshape(8, 8)}
  logits = cx.diffq.init_logits(params, group_size=16, min_size=0)
  bad = {"w": logits["w"].at[1].set(jnp.nan)}
  return params, logits, bad


@pytest.mark.parametrize("call", [
    lambda p, l: cx.diffq.quantize(p, l),
    lambda p, l: cx.diffq.noisy(p, l, jax.random.key(0)),
    lambda p, l: cx.diffq.model_size(p, l),
    lambda p, l: cx.diffq.model_size(p, l, exact=True),
])
def test_diffq_concrete_nan_logit_names_the_leaf(call):
  params, _, bad = _diffq_tree()
  with pytest.raises(ValueError, match=r"params\['w'\].*NaN"):
    call(params, bad)


def test_diffq_traced_nan_logit_means_b_max():
  params, logits, bad = _diffq_tree()
  top = {"w": logits["w"].at[1].set(jnp.inf)}  # sigmoid(inf) = 1: b_max
  node = jax.jit(cx.diffq.quantize)(params, bad)["w"]
  assert int(np.asarray(node.bits).min()) >= 1
  assert int(node.bits[1]) == 15
  assert bool(jnp.all(jnp.isfinite(node.materialize())))
  want = cx.diffq.quantize(params, top)["w"]
  np.testing.assert_array_equal(node.codes, want.codes)
  size = jax.jit(cx.diffq.model_size)(params, bad)
  assert float(size) == pytest.approx(float(cx.diffq.model_size(params, top)))
  noisy = jax.jit(cx.diffq.noisy)(params, bad, jax.random.key(0))
  assert bool(jnp.all(jnp.isfinite(noisy["w"])))
  g = jax.grad(lambda l: cx.diffq.model_size(params, l))(bad)
  assert bool(jnp.all(jnp.isfinite(g["w"])))
  bits = jax.jit(cx.diffq.bits_from_logits)(bad)
  assert float(bits["w"][1]) == 15.0


# ---------------------------------------------------- traced NaN clipping

def test_uniform_traced_nan_bits_is_sixteen_bits():
  w = jnp.linspace(-1.0, 1.0, 64)
  f = jax.jit(lambda b: cx.quantize.uniform(w, b))
  np.testing.assert_array_equal(f(NAN), cx.quantize.uniform(w, 16))
  got = jax.vmap(lambda b: cx.quantize.uniform(w, b))(jnp.array([4.0, jnp.nan]))
  np.testing.assert_array_equal(got[0], cx.quantize.uniform(w, 4))
  np.testing.assert_array_equal(got[1], cx.quantize.uniform(w, 16))
  ste = jax.jit(lambda b: cx.quantize.uniform_ste(w, b, symmetric=True))(NAN)
  np.testing.assert_array_equal(ste, cx.quantize.uniform(w, 16, symmetric=True))
  lsq = jax.jit(lambda b: cx.quantize.lsq(w, 0.01, b))(NAN)
  np.testing.assert_array_equal(lsq, cx.quantize.lsq(w, 0.01, 16))


def test_lowrank_traced_nan_rank_is_full_rank():
  w = jax.random.normal(jax.random.key(0), (6, 4))
  f = jax.jit(lambda r: cx.lowrank.factorize(w, r).materialize())
  np.testing.assert_allclose(f(NAN), w, atol=1e-5)
  got = jax.vmap(lambda r: cx.lowrank.factorize(w, r).materialize())(
      jnp.array([2.0, jnp.nan]))
  np.testing.assert_allclose(got[1], w, atol=1e-5)
  np.testing.assert_allclose(got[0], cx.lowrank.factorize(w, 2).materialize(),
                             atol=1e-5)
  r = jax.jit(lambda e: cx.lowrank.rank_for_energy(w, e))(NAN)
  assert int(r) == 4


def _kernel(shape=(30, 10), seed=0):
  return {"k": jax.random.normal(jax.random.key(seed), shape)}


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_prune_traced_nan_sparsity_prunes_nothing(scope):
  params = _kernel()
  f = jax.jit(lambda s: cx.prune.magnitude_mask(params, s, scope=scope)["k"])
  assert int(f(NAN).sum()) == 300
  got = jax.vmap(lambda s: cx.prune.magnitude_mask(params, s, scope=scope)["k"])(
      jnp.array([0.5, jnp.nan]))
  assert [int(m.sum()) for m in got] == [150, 300]


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("s", [1.0, 1.5, float(np.nextafter(np.float32(1), 0)),
                               np.inf])
def test_prune_traced_sparsity_at_or_above_one_keeps_one_weight(scope, s):
  params = _kernel()
  m = jax.jit(lambda s: cx.prune.magnitude_mask(params, s, scope=scope)["k"])(
      jnp.float32(s))
  assert int(m.sum()) == 1
  assert bool(m.reshape(-1)[jnp.argmax(jnp.abs(params["k"]))])
  got = jax.vmap(lambda s: cx.prune.magnitude_mask(params, s, scope=scope)["k"])(
      jnp.array([s, 0.0], jnp.float32))
  assert [int(x.sum()) for x in got] == [1, 300]


def test_random_mask_traced_sparsity_one_keeps_one():
  params = _kernel()
  m = jax.jit(lambda s: cx.prune.random_mask(params, s, jax.random.key(0))["k"])(
      jnp.float32(1.0))
  assert int(m.sum()) == 1


# ------------------------------------------- eager and traced counts agree

def test_prune_eager_float_and_traced_float32_agree_on_095():
  params = _kernel((300, 100))
  s32 = jnp.float32(0.95)
  eager = cx.prune.magnitude_mask(params, float(s32))["k"]
  traced = jax.jit(lambda s: cx.prune.magnitude_mask(params, s)["k"])(s32)
  assert int(eager.sum()) == int(traced.sum()) == 1500
  np.testing.assert_array_equal(eager, traced)


_F32 = st.floats(0.0, 1.0, width=32, exclude_max=True)


@functools.lru_cache(maxsize=None)
def _traced_count(n):
  from compressax.prune import _rank
  return jax.jit(jax.vmap(lambda v: _rank.pruned_count(n, v)))


_SIZES = [1, 2, 3, 7, 100, 1000, 30000, 99991, 2 ** 24 + 1, 50331645,
          2 ** 31 - 2]


@hypothesis.given(st.lists(_F32, min_size=1, max_size=32),
                  st.sampled_from(_SIZES))
def test_pruned_count_eager_equals_traced(ss, n):
  from compressax.prune import _rank
  s32 = np.array(ss, np.float32)
  # Decimals (float32(k / n)) and values near them are the interesting cases.
  s32 = np.concatenate([s32, np.float32(np.floor(s32 * n) / n),
                        np.nextafter(np.float32(np.floor(s32 * n) / n), 0)])
  traced = _traced_count(n)(s32)
  for v, t in zip(s32, np.asarray(traced).tolist()):
    eager = [_rank.pruned_count(n, x) for x in (v, float(v), jnp.float32(v))]
    assert eager == [t] * 3, (v, n)
    assert 0 <= t <= n - 1
    # The rule: floor(s n), or the integer just above within float32 rounding.
    exact = int(np.floor(np.float64(v) * n))
    assert exact <= t <= exact + 1, (v, n)


def test_pruned_count_decimals_stay_exact():
  from compressax.prune import _rank
  for s, n, want in [(0.3, 10, 3), (0.29, 100, 29), (0.95, 30000, 28500),
                     (0.9, 784 * 300, 211680), (0.5, 7, 3)]:
    traced = int(jax.jit(lambda v: _rank.pruned_count(n, v))(jnp.float32(s)))
    assert _rank.pruned_count(n, s) == want
    assert _rank.pruned_count(n, np.float32(s)) == want
    assert traced == want, (s, n)


@jax.jit
def _mask_jit(params, s):
  return cx.prune.magnitude_mask(params, s)["k"]


@hypothesis.given(_F32, st.sampled_from([(300, 100), (7, 13), (1, 1), (64, 3)]))
def test_magnitude_mask_eager_equals_jit_and_vmap(s, shape):
  params = _kernel(shape, seed=shape[0])
  eager = cx.prune.magnitude_mask(params, float(np.float32(s)))["k"]
  jitted = _mask_jit(params, jnp.float32(s))
  vm = jax.vmap(_mask_jit, in_axes=(None, 0))(params,
                                              jnp.array([s, 0.0], jnp.float32))
  np.testing.assert_array_equal(eager, jitted)
  np.testing.assert_array_equal(eager, vm[0])
