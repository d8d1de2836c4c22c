"""cx.methods.AJPQ: pruning as 0-bit quantization, against NumPy references."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import compressax as cx

AJPQ = cx.methods.AJPQ
_MB_BITS = 8 * 2 ** 20


def _np_uniform(key, shape):
  """DiffQ's documented uniform noise (cx.diffq._noise), NumPy mod 2^32."""
  s0, s1 = (int(v) for v in np.asarray(jax.random.bits(key, (2,), jnp.uint32)))
  n = int(np.prod(shape))
  m = np.uint64(0xFFFFFFFF)
  j = np.arange((n + 1) // 2, dtype=np.uint64)
  h = ((j * np.uint64(0x9E3779B9) + np.uint64(s0)) & m) ^ np.uint64(s1)
  for shift, mult in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):
    h = ((h ^ (h >> np.uint64(shift))) * np.uint64(mult)) & m
  h = h ^ (h >> np.uint64(16))
  codes = np.stack([h & np.uint64(0xFFFF), h >> np.uint64(16)], 1).ravel()[:n]
  return ((codes.astype(np.float64) + 0.5) / 2 ** 16 - 0.5).reshape(shape)


def _np_bits(logits, b_max):
  return b_max / (1 + np.exp(-np.asarray(logits, np.float64)))


def _per_weight(per_group, size, group_size):
  return np.repeat(per_group, group_size)[:size]


def _logits_for(bits, b_max):
  """Logits whose bits are ``bits`` (float64 in, float32 out)."""
  t = np.asarray(bits, np.float64) / b_max
  return jnp.asarray(np.log(t / (1 - t)), jnp.float32)


def _away_from_half(rng, n, b_max):
  """Bits drawn in [0.1, b_max - 0.1], never within 0.05 of a rounding tie."""
  whole = rng.integers(0, int(b_max) + 1, n).astype(np.float64)
  bits = np.clip(whole + rng.uniform(-0.45, 0.45, n), 0.1, b_max - 0.1)
  frac = bits - np.floor(bits)
  return np.where(np.abs(frac - 0.5) < 0.05, np.floor(bits) + 0.3, bits)


# -- the training view ----------------------------------------------------------


@hypothesis.settings(max_examples=10, deadline=None)
@hypothesis.given(seed=st.integers(0, 2 ** 16),
                  shape=st.sampled_from([(3, 5), (8, 8), (2, 3, 7)]),
                  group_size=st.sampled_from([1, 4, 16]),
                  b_max=st.sampled_from([2.0, 8.0, 12.0]),
                  min_bits=st.sampled_from([1, 3]), hard=st.booleans())
def test_view_is_gate_times_noisy_weight_in_float64(seed, shape, group_size, b_max,
                                                    min_bits, hard):
  rng = np.random.default_rng(seed)
  w = rng.standard_normal(shape).astype(np.float32)
  method = AJPQ(group_size=group_size, b_max=b_max, init_bits=1.0,
                min_bits=min_bits, hard_gate=hard)
  g = -(-w.size // group_size)
  logits = jnp.asarray(rng.normal(0, 3, g), jnp.float32)
  key = jax.random.key(seed)
  out = np.asarray(method.view(w, {"logits": logits}, key), np.float64)
  b = _per_weight(_np_bits(logits, b_max), w.size, group_size).reshape(shape)
  gate = np.clip(b, 0, 1)
  if hard:
    gate = np.round(gate)
  w64 = w.astype(np.float64)
  delta = (w64.max() - w64.min()) / (2 ** (np.maximum(b, 1) + min_bits - 1) - 1)
  ref = gate * (w64 + delta * _np_uniform(key, shape))
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_view_is_deterministic_per_key_eager_and_jitted():
  w = jax.random.normal(jax.random.key(0), (20, 12))
  plan = cx.Plan(AJPQ(group_size=8, init_bits=2.0))
  train = plan.init({"w": w, "b": jnp.zeros(12)}, jax.random.key(0))
  a = plan.view(train, jax.random.key(3))
  jitted = jax.jit(plan.view)(train, jax.random.key(3))
  np.testing.assert_array_equal(np.asarray(a["w"]), np.asarray(plan.view(
      train, jax.random.key(3))["w"]))
  np.testing.assert_array_equal(np.asarray(a["w"]), np.asarray(jitted["w"]))
  assert not np.array_equal(np.asarray(a["w"]),
                            np.asarray(plan.view(train, jax.random.key(4))["w"]))
  assert a["b"] is train["params"]["b"]


@pytest.mark.parametrize("seed,min_bits,hard", [(0, 1, False), (1, 3, True)])
def test_view_gradients_equal_autodiff_of_the_formula(seed, min_bits, hard):
  rng = np.random.default_rng(seed)
  shape, gs, b_max = (9, 7), 4, 8.0
  w = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  g = -(-w.size // gs)
  # Bits on both sides of 1: the gate's gradient below, the noise's above.
  logits = _logits_for(np.linspace(0.2, 7.5, g), b_max)
  key = jax.random.key(seed)
  u = jnp.asarray(_np_uniform(key, shape), jnp.float32)
  c = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  method = AJPQ(group_size=gs, b_max=b_max, min_bits=min_bits, hard_gate=hard)

  def ours(x, lg):
    return jnp.sum(c * method.view(x, {"logits": lg}, key))

  def reference(x, lg):
    b = b_max * jax.nn.sigmoid(lg)
    bw = jnp.repeat(b, gs)[:x.size].reshape(shape)
    delta = (jnp.max(x) - jnp.min(x)) / (
        jnp.exp2(jnp.maximum(bw, 1.0) + min_bits - 1) - 1.0)
    gate = jnp.clip(bw, 0.0, 1.0)
    if hard:  # straight through
      gate = gate + jax.lax.stop_gradient(jnp.round(gate) - gate)
    return jnp.sum(c * gate * (x + delta * u))

  got = jax.grad(ours, argnums=(0, 1))(w, logits)
  want = jax.grad(reference, argnums=(0, 1))(w, logits)
  for a, b in zip(got, want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)
  assert np.all(np.asarray(got[1]) != 0)


def test_view_needs_a_key():
  with pytest.raises(ValueError, match="PRNG key"):
    AJPQ().view(jnp.ones((4, 4)), AJPQ().init("w", jnp.ones((4, 4)), None), None)


# -- the size penalty -------------------------------------------------------------


@pytest.mark.parametrize("group_size,index_bits,min_bits",
                         [(1, 0.0, 1), (5, 1.0, 1), (16, 2.5, 1), (5, 1.0, 4)])
def test_size_penalty_and_its_gradient_match_numpy(group_size, index_bits, min_bits):
  rng = np.random.default_rng(group_size)
  w = jnp.asarray(rng.standard_normal((11, 6)), jnp.float32)
  n_g = -(-w.size // group_size)
  logits = jnp.asarray(rng.normal(-1, 3, n_g), jnp.float32)
  method = AJPQ(size_penalty=0.3, group_size=group_size, b_max=6.0,
                index_bits=index_bits, min_bits=min_bits)
  counts = np.minimum(group_size, w.size - group_size * np.arange(n_g))
  b = _np_bits(logits, 6.0)
  gate = np.clip(b, 0, 1)
  payload = np.where(b < 1, b * min_bits, b + min_bits - 1)
  bits = np.sum(counts * payload) + np.sum(gate) * (4 + index_bits) + 64
  aux = {"logits": logits}
  np.testing.assert_allclose(float(method.size_mb(w, aux)), bits / _MB_BITS, rtol=1e-5)
  np.testing.assert_allclose(float(method.penalty(w, aux)), 0.3 * bits / _MB_BITS,
                             rtol=1e-5)
  s = 1 / (1 + np.exp(-np.asarray(logits, np.float64)))
  d_payload = np.where(b < 1, min_bits, 1.0)
  d = (counts * d_payload + (b < 1) * (4 + index_bits)) * 6.0 * s * (1 - s) * 0.3 / _MB_BITS
  grad = jax.grad(lambda lg: method.penalty(w, {"logits": lg}))(logits)
  np.testing.assert_allclose(np.asarray(grad, np.float64), d, rtol=1e-4, atol=1e-14)


@jax.numpy_dtype_promotion("standard")  # optax.adam
def test_penalty_alone_drives_groups_to_zero_bits():
  w = jax.random.normal(jax.random.key(0), (32, 16))
  method = AJPQ(size_penalty=1e4, group_size=16, init_bits=4.0,
                logit_learning_rate=0.5)
  plan = cx.Plan(method)
  train = plan.init({"w": w})
  loss = plan.loss(lambda p: jnp.zeros((), jnp.float32))
  tx = plan.optimizer(optax.sgd(0.0))
  state = tx.init(train)
  before = plan.finalize(train)["w"]
  assert np.all(before.mask)

  @jax.jit
  def step(train, state, key):
    updates, state = tx.update(jax.grad(loss)(train, key), state, train)
    return optax.apply_updates(train, updates), state

  for i in range(12):
    train, state = step(train, state, jax.random.key(i))
  assert np.all(np.asarray(method.bits(train["aux"]["w"])) < 0.5)
  after = plan.finalize(train)["w"]
  assert not np.any(after.mask)
  np.testing.assert_array_equal(after.materialize(), np.zeros_like(w))


# -- finalize, materialize and the file --------------------------------------------


@hypothesis.settings(max_examples=10, deadline=None)
@hypothesis.given(seed=st.integers(0, 2 ** 16),
                  shape=st.sampled_from([(5, 7), (16, 8), (3, 4, 5)]),
                  group_size=st.sampled_from([1, 3, 16]),
                  b_max=st.sampled_from([3.0, 8.0, 15.0]),
                  min_bits=st.sampled_from([1, 2]))
def test_finalize_matches_numpy_codes_mask_and_reading(seed, shape, group_size, b_max,
                                                        min_bits):
  b_max = min(b_max, 16.0 - min_bits)
  rng = np.random.default_rng(seed)
  w = rng.standard_normal(shape).astype(np.float32)
  n_g = -(-w.size // group_size)
  bits_f = _away_from_half(rng, n_g, b_max)
  logits = _logits_for(bits_f, b_max)
  node = AJPQ(group_size=group_size, b_max=b_max, min_bits=min_bits).finalize(
      "w", w, {"logits": logits})
  assert isinstance(node, cx.prune.MaskedArray)
  q = node.value
  assert isinstance(q, cx.diffq.DiffQArray) and q.group_size == group_size
  bits = np.round(_np_bits(logits, b_max))
  keep = _per_weight(bits >= 1, w.size, group_size)
  bits = np.where(bits >= 1, bits + min_bits - 1, 0)
  np.testing.assert_array_equal(np.asarray(node.mask).ravel(), keep)
  np.testing.assert_array_equal(np.asarray(q.bits), np.where(bits >= 1, bits, 1))
  flat = w.ravel().astype(np.float64)
  codes = np.asarray(q.codes, np.int64).ravel()
  assert not np.any(codes[~keep])
  if keep.any():
    lo, hi = flat[keep].min(), flat[keep].max()
    assert (float(q.lo), float(q.hi)) == (lo, hi)   # the kept weights' range
    top = 2 ** _per_weight(bits, w.size, group_size)[keep] - 1
    ref = np.round((flat[keep] - lo) / max(hi - lo, 1e-300) * top)
    assert np.all(np.abs(codes[keep] - ref) <= 1)
    assert np.mean(codes[keep] == ref) > 0.99  # float32 ties may differ by one
    err = np.abs(np.asarray(node.materialize(), np.float64).ravel()[keep] - flat[keep])
    assert np.all(err <= (hi - lo) / top / 2 * (1 + 1e-5) + 1e-7)
  # materialize() is the view's deterministic reading (no noise, gate
  # rounded), in float32 as the node reads it: bit for bit.
  lo32, hi32 = np.float32(q.lo), np.float32(q.hi)
  top32 = (2 ** _per_weight(np.where(bits >= 1, bits, 1), w.size, group_size)
           - 1).astype(np.float32)
  step = (hi32 - lo32) / top32
  reading = np.where(keep, lo32 + codes.astype(np.float32) * step, np.float32(0))
  np.testing.assert_array_equal(np.asarray(node.materialize()).ravel(),
                                reading.astype(np.float32))


def _half_pruned(w, group_size, b_max, prune):
  n_g = -(-w.size // group_size)
  bits = np.full(n_g, 4.2)
  if prune:
    bits[::2] = 0.2
  return AJPQ(group_size=group_size, b_max=b_max).finalize(
      "w", w, {"logits": _logits_for(bits, b_max)})


def test_save_load_bit_exact_and_pruned_groups_shrink_the_file(tmp_path):
  w = np.asarray(jax.random.normal(jax.random.key(1), (256, 64)))
  full = _half_pruned(w, 16, 8.0, prune=False)
  half = _half_pruned(w, 16, 8.0, prune=True)
  sizes = {}
  for name, node in (("full", full), ("half", half)):
    path = str(tmp_path / f"{name}.cx")
    sizes[name] = cx.save(path, {"w": node, "b": np.zeros(3, np.float32)})
    loaded = cx.load(path)
    np.testing.assert_array_equal(loaded["w"], np.asarray(node.materialize()))
    again = cx.load(path, keep_compressed=True)["w"]
    assert isinstance(again, cx.prune.MaskedArray)
    assert isinstance(again.value, cx.diffq.DiffQArray)
    np.testing.assert_array_equal(np.asarray(again.mask), np.asarray(node.mask))
  assert np.mean(half.mask) == 0.5
  # Only the kept codes are written (plus the group mask): half the groups
  # at 0 bits writes a clearly smaller file, not the same one with zeros.
  assert sizes["half"] < 0.7 * sizes["full"]


def test_plan_finalize_leaves_biases_and_saves(tmp_path):
  params = {"dense": {"kernel": jax.random.normal(jax.random.key(2), (24, 10)),
                      "bias": jnp.ones(10)}}
  plan = cx.Plan(AJPQ(group_size=8))
  final = plan.finalize(plan.init(params))
  assert isinstance(final["dense"]["kernel"], cx.prune.MaskedArray)
  assert final["dense"]["bias"] is params["dense"]["bias"]
  cx.save(str(tmp_path / "p.cx"), final)
  loaded = cx.load(str(tmp_path / "p.cx"))
  np.testing.assert_array_equal(loaded["dense"]["kernel"],
                                np.asarray(final["dense"]["kernel"].materialize()))


# -- bad input ----------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    (dict(b_max=0.5), "b_max"), (dict(b_max=16), "b_max"),
    (dict(group_size=0), "group_size"), (dict(group_size=True), "group_size"),
    (dict(group_size=2.0), "group_size"),
    (dict(size_penalty=-1.0), "size_penalty"),
    (dict(size_penalty=float("nan")), "size_penalty"),
    (dict(init_bits=8.0, b_max=8.0), "init_bits"), (dict(init_bits=0.0), "init_bits"),
    (dict(index_bits=-1.0), "index_bits"),
    (dict(logit_learning_rate=0.0), "logit_learning_rate"),
    (dict(min_bits=0), "min_bits"), (dict(min_bits=9, b_max=8.0), "min_bits"),
    (dict(hard_gate=1), "hard_gate")])
def test_bad_config_is_a_value_error_naming_the_setting(kwargs, match):
  with pytest.raises(ValueError, match=f"AJPQ: {match} must be"):
    AJPQ(**kwargs)


def test_bad_leaves_name_their_path():
  plan = cx.Plan(AJPQ())
  bad = np.ones((4, 4), np.float32)
  bad[1, 2] = np.nan
  with pytest.raises(ValueError, match=r"\['dense'\]\['kernel'\].*NaN/Inf"):
    plan.init({"dense": {"kernel": bad}})
  path = (jax.tree_util.DictKey("w"),)
  with pytest.raises(ValueError, match=r"\['w'\].*NaN/Inf"):
    AJPQ().finalize(path, bad, {"logits": jnp.zeros(1)})
  with pytest.raises(TypeError, match=r"\['w'\].*floating-point"):
    AJPQ().init(path, np.ones((4, 4), np.int32), None)
  with pytest.raises(TypeError, match=r"\['w'\].*floating-point"):
    AJPQ().finalize(path, np.ones((4, 4), np.int32), {"logits": jnp.zeros(1)})


def test_kept_codes_are_written_at_their_groups_widths(tmp_path):
  # Incompressible codes at 1 and 15 bits in the kept groups: the file's code
  # payload is the sum of n_g b_g over the kept groups (each kept code at its
  # own group's width), not a stream coded at one width or one distribution.
  rng = np.random.default_rng(0)
  shape, gs = (128, 64), 16
  n_g = shape[0] * shape[1] // gs
  kind = rng.integers(0, 8, n_g)               # 0-3: pruned, 4-6: 1 bit, 7: 15 bits
  widths = np.where(kind == 7, 15, 1).astype(np.uint8)
  kept = kind >= 4
  top = (1 << widths.astype(np.int64)) - 1
  codes = (rng.integers(0, 2 ** 16, shape[0] * shape[1]) % (np.repeat(top, gs) + 1))
  mask = np.repeat(kept, gs).reshape(shape)

  def node(c):
    q = cx.diffq.DiffQArray(jnp.asarray(c.reshape(shape).astype(np.uint16)),
                            jnp.asarray(widths), jnp.float32(-1), jnp.float32(1),
                            shape, np.dtype(np.float32), gs)
    return cx.prune.MaskedArray(q, mask, shape, np.dtype(np.float32))

  full = cx.save(str(tmp_path / "codes.cx"), {"w": node(codes)})
  empty = cx.save(str(tmp_path / "zeros.cx"), {"w": node(np.zeros_like(codes))})
  payload = int(np.sum(gs * widths.astype(np.int64)[kept])) // 8
  assert payload <= full - empty <= payload * 1.01 + 64
  loaded = cx.load(str(tmp_path / "codes.cx"), keep_compressed=True)["w"]
  np.testing.assert_array_equal(np.asarray(loaded.value.codes)[mask],
                                codes.reshape(shape)[mask])
