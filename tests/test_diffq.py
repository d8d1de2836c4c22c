"""DiffQ: bit logits, pseudo-quantization noise, model size, final quantization."""

import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import compressax as cx

B_MIN, B_MAX = 2, 15


def _params(seed=0, shape=(33, 5)):
  rng = np.random.default_rng(seed)
  return {"params": {"Dense_0": {"kernel": rng.standard_normal(shape).astype(np.float32),
                                 "bias": np.zeros(shape[-1], np.float32)},
                     "step": np.int32(3)}}


def _np_group_bits(logit, size, group_size):
  """Per-weight bits in float64 from the paper's formula and the grouping."""
  bits = B_MIN + (B_MAX - B_MIN) / (1 + np.exp(-np.asarray(logit, np.float64)))
  if group_size == 0:
    return np.full(size, bits[0])
  return np.repeat(bits, group_size)[:size]


def _random_logits(logits, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda l: jnp.asarray(rng.normal(0, 2, l.shape), jnp.float32),
                      logits)


@pytest.mark.parametrize("group_size", [0, 1, 16])
def test_init_logits_shapes_and_bits(group_size):
  params = _params()
  logits = cx.diffq.init_logits(params, group_size=group_size, init_bits=6.5,
                                min_size=0)
  # The params' structure, with SKIP where a leaf is not quantized.
  assert jax.tree.structure(logits, is_leaf=cx.is_skip) == jax.tree.structure(params)
  want = 1 if group_size == 0 else math.ceil(165 / group_size)
  assert logits["params"]["Dense_0"]["kernel"].shape == (want,)
  assert logits["params"]["Dense_0"]["bias"] is cx.SKIP
  assert logits["params"]["step"] is cx.SKIP
  bits = cx.diffq.bits_from_logits(logits)
  np.testing.assert_allclose(bits["params"]["Dense_0"]["kernel"], 6.5, rtol=1e-6)
  # SKIP markers are harmless to Optax, so one optimizer can take the tree.
  opt = optax.adam(1e-3)
  with jax.numpy_dtype_promotion("standard"):  # optax's bias correction mixes dtypes
    upd, _ = opt.update(logits, opt.init(logits), logits)
  assert upd["params"]["step"] is cx.SKIP
  # The legacy (0,) marker of earlier releases still means "not quantized".
  legacy = jax.tree.map(lambda l: l, logits)
  legacy["params"]["step"] = np.zeros((0,), np.float32)
  np.testing.assert_array_equal(
      cx.diffq.model_size(params, legacy, group_size=group_size),
      cx.diffq.model_size(params, logits, group_size=group_size))


def test_min_size_excludes_tiny_leaves():
  params = {"small": np.ones((50, 50), np.float32),   # 0.0095 MB
            "big": np.ones((52, 52), np.float32)}     # 0.0103 MB
  logits = cx.diffq.init_logits(params)
  assert logits["small"] is cx.SKIP and logits["big"].shape == (169,)


@hypothesis.settings(max_examples=15)
@hypothesis.given(seed=st.integers(0, 2 ** 16),
                  shape=st.sampled_from([(1, 1), (4, 4), (7, 5), (3, 2, 6)]),
                  group_size=st.sampled_from([0, 1, 5, 16]),
                  noise=st.sampled_from(["uniform", "gaussian"]))
def test_noise_scale_matches_formula(seed, shape, group_size, noise):
  params = {"w": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}
  logits = _random_logits(cx.diffq.init_logits(params, group_size=group_size,
                                               min_size=0), seed)
  out = cx.diffq.noisy(params, logits, jax.random.key(seed), group_size=group_size,
                       noise=noise)
  w = params["w"].astype(np.float64).ravel()
  bits = _np_group_bits(logits["w"], w.size, group_size)
  delta = (w.max() - w.min()) / (2 ** bits - 1)
  ratio = (np.asarray(out["w"], np.float64).ravel() - w) / np.where(delta > 0, delta, 1)
  if noise == "uniform":
    assert np.all(np.abs(ratio) <= 0.5 + 1e-3)
  # Same key, same draw; the noise itself is a standard draw times Delta / (2 or 1).
  u = (_np_uniform(jax.random.key(seed), shape)
       if noise == "uniform" else
       jax.random.normal(jax.random.fold_in(jax.random.key(seed), 0), shape) / 2)
  u = np.where(delta > 0, np.asarray(u, np.float64).ravel(), 0.0)  # 1 weight: no range
  np.testing.assert_allclose(ratio, u, atol=2e-3)


def _np_uniform(key, shape, offset=0):
  """The documented uniform noise, in NumPy uint64 arithmetic mod 2^32."""
  s0, s1 = (int(v) for v in np.asarray(jax.random.bits(key, (2,), jnp.uint32)))
  n = int(np.prod(shape))
  m = np.uint64(0xFFFFFFFF)
  j = (np.arange((n + 1) // 2, dtype=np.uint64) + np.uint64(offset)) & m
  h = ((j * np.uint64(0x9E3779B9)
        + np.uint64(s0)) & m) ^ np.uint64(s1)
  for shift, mult in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):
    h = ((h ^ (h >> np.uint64(shift))) * np.uint64(mult)) & m
  h = h ^ (h >> np.uint64(16))
  codes = np.stack([h & np.uint64(0xFFFF), h >> np.uint64(16)], 1).ravel()[:n]
  return ((codes.astype(np.float64) + 0.5) / 2 ** 16 - 0.5).reshape(shape)


@hypothesis.settings(max_examples=10)
@hypothesis.given(seed=st.integers(0, 2 ** 16),
                  shape=st.sampled_from([(1, 2), (1, 3), (4, 4), (7, 5), (2, 3, 5)]))
def test_uniform_noise_is_the_documented_hash_exactly(seed, shape):
  # Two quantized leaves and an unquantized one between them: the second
  # leaf continues the stream where the first left off.
  params = {"a": np.linspace(-1, 1, int(np.prod(shape)) + 1,
                             dtype=np.float32).reshape(1, -1),
            "b": np.zeros((3,), np.float32),
            "c": np.linspace(-2, 3, int(np.prod(shape)),
                             dtype=np.float32).reshape(shape)}
  logits = cx.diffq.init_logits(params, group_size=0, init_bits=4.0,
                                min_size=0)
  logits["b"] = np.zeros((0,), np.float32)
  key = jax.random.key(seed)
  out = cx.diffq.noisy(params, logits, key, group_size=0)
  jitted = jax.jit(cx.diffq.noisy, static_argnames="group_size")(
      params, logits, key, group_size=0)
  na = params["a"].size
  for name, offset, rng in (("a", 0, 2.0), ("c", (na + 1) // 2, 5.0)):
    w = params[name].astype(np.float64)
    u = (np.asarray(out[name], np.float64) - w) / (rng / 15)
    ref = _np_uniform(key, w.shape, offset)
    np.testing.assert_allclose(u, ref, atol=2e-5)
    np.testing.assert_array_equal(out[name], jitted[name])
  assert out["b"] is params["b"]


def test_uniform_noise_statistics():
  from compressax.diffq import _noise
  n = 1 << 18
  seeds = [jax.random.bits(jax.random.key(k), (2,), jnp.uint32) for k in (7, 8)]
  u = np.asarray(_noise._uniform(seeds[0], (n,)), np.float64)
  v = np.asarray(_noise._uniform(seeds[1], (n,)), np.float64)
  np.testing.assert_array_equal(u, _np_uniform(jax.random.key(7), (n,)))
  half = 0.5 - 2.0 ** -17
  assert u.min() >= -half and u.max() <= half
  grid = (u + 0.5) * 2 ** 16 - 0.5                  # integer codes
  np.testing.assert_array_equal(grid, np.round(grid))
  se_mean = np.sqrt(1 / 12 / n)
  assert abs(u.mean()) < 5 * se_mean
  assert abs(u.var() - 1 / 12) < 5 * np.sqrt(1 / 180 / n)   # Var(u^2) = 1/180
  # 64 equal bins: chi-square with 63 dof (mean 63, sd ~11.2).
  counts = np.histogram(u, bins=64, range=(-0.5, 0.5))[0]
  chi2 = ((counts - n / 64) ** 2 / (n / 64)).sum()
  assert chi2 < 63 + 6 * np.sqrt(2 * 63)
  # Neighbours (the two halves of one hash word, and adjacent words) and
  # two keys are uncorrelated.
  for a, b in ((u[0::2], u[1::2]), (u[:-2], u[2:]), (u, v)):
    assert abs(np.corrcoef(a, b)[0, 1]) < 5 / np.sqrt(a.size)


def test_gaussian_noise_statistics():
  params = {"w": np.linspace(-1, 1, 40000, dtype=np.float32).reshape(200, 200)}
  logits = cx.diffq.init_logits(params, group_size=0, init_bits=4.0, min_size=0)
  out = cx.diffq.noisy(params, logits, jax.random.key(0), group_size=0,
                       noise="gaussian")
  ratio = (np.asarray(out["w"], np.float64) - params["w"]) / (2.0 / 15)
  assert abs(ratio.mean()) < 0.01 and abs(ratio.std() - 0.5) < 0.01


def test_noisy_deterministic_jit_and_untouched_leaves():
  params = _params(1)
  logits = cx.diffq.init_logits(params, min_size=0)
  key = jax.random.key(3)
  a = cx.diffq.noisy(params, logits, key)
  b = jax.jit(cx.diffq.noisy)(params, logits, key)
  c = cx.diffq.noisy(params, logits, jax.random.key(4))
  np.testing.assert_array_equal(a["params"]["Dense_0"]["kernel"],
                                b["params"]["Dense_0"]["kernel"])
  assert not np.array_equal(a["params"]["Dense_0"]["kernel"],
                            c["params"]["Dense_0"]["kernel"])
  assert a["params"]["Dense_0"]["bias"] is params["params"]["Dense_0"]["bias"]


def _np_model_bits(params, logits, group_size, exact=False):
  total = 0.0
  for (_, x), l in zip(jax.tree_util.tree_leaves_with_path(params),
                       jax.tree_util.tree_leaves(logits, is_leaf=cx.is_skip)):
    x = np.asarray(x)
    if cx.is_skip(l):
      total += x.size * x.dtype.itemsize * 8
      continue
    bits = _np_group_bits(l, x.size, group_size)
    if exact:
      bits = np.clip(np.round(bits), 1, 15)
    total += bits.sum() + 64 + 4 * np.size(l)
  return total


@pytest.mark.parametrize("group_size", [0, 1, 16])
def test_model_size_and_its_gradient_match_formula(group_size):
  params = _params(2)
  logits = _random_logits(cx.diffq.init_logits(params, group_size=group_size,
                                               min_size=0), 5)
  mb = cx.diffq.model_size(params, logits, group_size=group_size)
  ref = _np_model_bits(params, logits, group_size)
  np.testing.assert_allclose(mb, ref / 8 / 2 ** 20, rtol=1e-6)
  np.testing.assert_allclose(cx.diffq.model_size(params, logits, group_size=group_size,
                                                 unit="bits"), ref, rtol=1e-6)
  np.testing.assert_allclose(
      cx.diffq.model_size(params, logits, group_size=group_size, exact=True,
                          unit="bytes"),
      _np_model_bits(params, logits, group_size, exact=True) / 8, rtol=1e-6)
  # d bits / d logit = (b_max - b_min) s (1 - s), times the group's weights.
  g = jax.grad(lambda l: cx.diffq.model_size(params, l, group_size=group_size,
                                             unit="bits"))(logits)
  l = np.asarray(logits["params"]["Dense_0"]["kernel"], np.float64)
  s = 1 / (1 + np.exp(-l))
  counts = np.bincount(np.arange(165) // (group_size or 165))
  np.testing.assert_allclose(g["params"]["Dense_0"]["kernel"],
                             counts * (B_MAX - B_MIN) * s * (1 - s), rtol=1e-5)


def test_gradients_flow_to_logits_and_params():
  params = _params(3)
  logits = cx.diffq.init_logits(params, min_size=0)

  def loss(p, l):
    noisy = cx.diffq.noisy(p, l, jax.random.key(0))
    task = jnp.sum(noisy["params"]["Dense_0"]["kernel"] ** 2)
    return task + 1e-3 * cx.diffq.model_size(p, l)

  gp, gl = jax.grad(loss, argnums=(0, 1), allow_int=True)(
      jax.tree.map(jnp.asarray, params), logits)
  gk = np.asarray(gl["params"]["Dense_0"]["kernel"])
  assert np.all(np.isfinite(gk)) and np.all(gk != 0)
  # d noisy / d W is the identity except through the range (argmin, argmax).
  w = params["params"]["Dense_0"]["kernel"]
  noisy = cx.diffq.noisy(params, logits, jax.random.key(0))["params"]["Dense_0"]["kernel"]
  inner = (w != w.max()) & (w != w.min())
  np.testing.assert_allclose(np.asarray(gp["params"]["Dense_0"]["kernel"])[inner],
                             2 * np.asarray(noisy)[inner], rtol=1e-5)


@hypothesis.settings(max_examples=20)
@hypothesis.given(seed=st.integers(0, 2 ** 16), ties=st.integers(0, 3),
                  shape=st.sampled_from([(1,), (5, 7), (40, 50), (3, 2, 6)]))
def test_noise_scale_gradient_is_max_minus_min_rule_with_ties(seed, ties, shape):
  # The hand-written backward pass must equal JAX's own max/min rule, which
  # shares the gradient equally among tied extremes.
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape).astype(np.float32).reshape(-1)
  for _ in range(ties):  # copy the extremes elsewhere
    x[rng.integers(x.size)] = x.max()
    x[rng.integers(x.size)] = x.min()
  x = jnp.asarray(x.reshape(shape))
  bits = jnp.full(shape, 3.5, jnp.float32)

  def ours(x):
    return jnp.sum(jnp.cos(x) * cx.diffq.noise_scale(x, bits))

  def reference(x):
    return jnp.sum(jnp.cos(x) * (jnp.max(x) - jnp.min(x))
                   / (jnp.exp2(bits) - 1.0))

  np.testing.assert_allclose(jax.jit(jax.grad(ours))(x),
                             jax.grad(reference)(x), rtol=2e-6, atol=1e-6)


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(seed=st.integers(0, 2 ** 16), ties=st.integers(0, 3),
                  shape=st.sampled_from([(1, 1), (7, 5), (3, 2, 6), (70, 70),
                                         (129, 40)]),
                  group_size=st.sampled_from([0, 1, 5, 16]))
def test_uniform_noise_gradients_equal_autodiff_of_the_formula(seed, ties,
                                                               shape,
                                                               group_size):
  # The uniform path has a hand-written backward pass (noise recomputed in
  # the group reduction, tie counts in one pass). It must give what JAX's
  # autodiff gives for W + expand((max W - min W) / (2^bits - 1)) * u, ties
  # in the extremes included (70 x 70 and 129 x 40 take the packed count).
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape).astype(np.float32).reshape(-1)
  for _ in range(ties):
    x[rng.integers(x.size)] = x.max()
    x[rng.integers(x.size)] = x.min()
  x = jnp.asarray(x.reshape(shape))
  logits = _random_logits(cx.diffq.init_logits({"w": x}, group_size=group_size,
                                               min_size=0), seed)["w"]
  key = jax.random.key(seed)
  weight = jnp.asarray(rng.standard_normal(shape).astype(np.float32))

  # A leaf before "w" in tree order moves w's noise to word offset 10.
  a = jnp.ones((5, 4))
  a_logits = cx.diffq.init_logits({"a": a}, group_size=group_size,
                                  min_size=0)["a"]

  def ours(x, logit):
    noisy = cx.diffq.noisy({"a": a, "w": x}, {"a": a_logits, "w": logit}, key,
                           group_size=group_size)
    return jnp.sum(jnp.sin(noisy["w"]) * weight)

  def reference(x, logit):
    u = jnp.asarray(_np_uniform(key, shape, offset=10), jnp.float32)  # exact
    bits = B_MIN + jax.nn.sigmoid(logit) * (B_MAX - B_MIN)
    delta = (jnp.max(x) - jnp.min(x)) / (jnp.exp2(bits) - 1.0)
    n = x.size
    per_weight = (jnp.broadcast_to(delta.reshape(()), (n,)) if group_size == 0
                  else jnp.repeat(delta, group_size)[:n])
    return jnp.sum(jnp.sin(x + per_weight.reshape(shape) * u) * weight)

  got = jax.jit(jax.grad(ours, argnums=(0, 1)))(x, logits)
  want = jax.grad(reference, argnums=(0, 1))(x, logits)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)


@hypothesis.settings(max_examples=15)
@hypothesis.given(seed=st.integers(0, 2 ** 16),
                  shape=st.sampled_from([(1, 1), (4, 4), (7, 5), (3, 2, 6)]),
                  group_size=st.sampled_from([0, 1, 5, 16]))
def test_quantize_error_bound_levels_and_storage(seed, shape, group_size):
  params = {"w": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}
  logits = _random_logits(cx.diffq.init_logits(params, group_size=group_size,
                                               min_size=0), seed)
  q = cx.diffq.quantize(params, logits, group_size=group_size)["w"]
  assert isinstance(q, cx.diffq.DiffQArray)
  w = params["w"].astype(np.float64).ravel()
  bits = np.clip(np.round(_np_group_bits(logits["w"], w.size, group_size)), 1, 15)
  np.testing.assert_array_equal(np.repeat(q.bits, group_size or w.size)[:w.size], bits)
  delta = (w.max() - w.min()) / (2 ** bits - 1)
  err = np.abs(np.asarray(q.materialize(), np.float64).ravel() - w)
  assert np.all(err <= delta / 2 + 1e-6 * (1 + np.abs(w)))
  codes = np.asarray(q.codes, np.int64).ravel()
  assert q.codes.dtype == np.uint16 and np.all(codes <= 2 ** bits - 1)
  ref_levels = np.round((w - w.min()) / max(w.max() - w.min(), 1e-300) * (2 ** bits - 1))
  assert np.mean(codes == ref_levels) > 0.99  # float32 ties may differ by one
  assert q.storage_bits() == _np_model_bits(params, logits, group_size, exact=True)
  np.testing.assert_allclose(
      cx.diffq.model_size(params, logits, group_size=group_size, exact=True,
                          unit="bits"), q.storage_bits(), rtol=1e-6)


def test_quantize_jit_and_levels_count():
  w = np.linspace(-2, 2, 1000, dtype=np.float32).reshape(50, 20)
  params = {"w": w, "b": np.ones(3, np.float32)}
  logits = cx.diffq.init_logits(params, group_size=0, init_bits=3.0, min_size=0)
  q = cx.diffq.quantize(params, logits, group_size=0)
  qj = jax.jit(lambda p, l: cx.diffq.quantize(p, l, group_size=0))(params, logits)
  np.testing.assert_array_equal(q["w"].codes, qj["w"].codes)
  np.testing.assert_array_equal(cx.materialize(q)["w"], cx.materialize(qj)["w"])
  assert q["b"] is params["b"]
  assert len(np.unique(np.asarray(q["w"].codes))) == 8  # 3 bits, evenly spread data
  const = cx.diffq.quantize({"w": np.full((4, 4), 0.5, np.float32)},
                            {"w": jnp.zeros(1)}, group_size=0)
  np.testing.assert_array_equal(const["w"].materialize(), np.full((4, 4), 0.5))


def test_bad_input_names_the_leaf():
  params = _params()
  with pytest.raises(ValueError, match="group_size"):
    cx.diffq.init_logits(params, group_size=-1)
  with pytest.raises(ValueError, match="b_min must be < b_max"):
    cx.diffq.init_logits(params, b_min=8, b_max=8)
  with pytest.raises(ValueError, match="b_max must be in"):
    cx.diffq.init_logits(params, b_max=16)
  with pytest.raises(ValueError, match="init_bits"):
    cx.diffq.init_logits(params, init_bits=15)
  with pytest.raises(TypeError, match=r"params\['step'\]: expected a floating"):
    cx.diffq.init_logits(params, where="step")
  bad = _params()
  bad["params"]["Dense_0"]["kernel"][0, 0] = np.nan
  with pytest.raises(ValueError, match=r"\['Dense_0'\]\['kernel'\]: contains 1 NaN"):
    cx.diffq.init_logits(bad, min_size=0)
  logits = cx.diffq.init_logits(params, group_size=16, min_size=0)
  with pytest.raises(ValueError, match=r"\['Dense_0'\]\['kernel'\]: has logits of shape"):
    cx.diffq.noisy(params, logits, jax.random.key(0), group_size=8)
  with pytest.raises(ValueError, match="does not match"):
    cx.diffq.model_size(params, {"params": logits["params"]["Dense_0"]})
  with pytest.raises(ValueError, match="noise must be"):
    cx.diffq.noisy(params, logits, jax.random.key(0), noise="laplace")
  with pytest.raises(ValueError, match="b_min must be < b_max"):
    cx.diffq.quantize(params, logits, b_min=9, b_max=3)


def test_nnx_state_round_trip():
  from flax import nnx

  class M(nnx.Module):
    def __init__(self, rngs):
      self.lin = nnx.Linear(16, 12, rngs=rngs)
      self.norm = nnx.LayerNorm(12, rngs=rngs)

  _, state = nnx.split(M(nnx.Rngs(0)))
  logits = cx.diffq.init_logits(state, min_size=0)
  assert jax.tree.structure(logits, is_leaf=cx.is_skip) == jax.tree.structure(state)
  noisy = cx.diffq.noisy(state, logits, jax.random.key(0))
  assert isinstance(noisy, nnx.State)
  q = cx.diffq.quantize(state, logits)
  dense = cx.materialize(q)
  w = np.asarray(state["lin"]["kernel"][...], np.float64)
  err = np.abs(np.asarray(dense["lin"]["kernel"][...], np.float64) - w)
  assert err.max() <= (w.max() - w.min()) / 255 / 2 + 1e-6  # 8 bits everywhere
  kernel_bits = 16 * 12 * 8 + 4 * 12 + 64
  dense_bits = (12 + 12 + 12) * 32  # lin bias, norm scale and bias
  np.testing.assert_allclose(cx.diffq.model_size(state, logits, unit="bits"),
                             kernel_bits + dense_bits, rtol=1e-6)
