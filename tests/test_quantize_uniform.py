"""Uniform quantization vs a NumPy float64 reference written from Polino et al."""

import functools

import flax.linen as linen
from flax import nnx
import hypothesis
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import compressax as cx

uniform = cx.quantize.uniform


# ------------------------------------------------------------- the reference

def ref_groups(shape, axis, bucket_size):
  """Flat index arrays of the scale groups, written independently of the code."""
  idx = np.arange(int(np.prod(shape))).reshape(shape)
  rows = ([idx.ravel()] if axis is None else
          [np.take(idx, i, axis=axis).ravel() for i in range(shape[axis])])
  if bucket_size is None:
    return rows
  return [r[s:s + bucket_size] for r in rows
          for s in range(0, len(r), bucket_size)]


def ref_uniform(x, bits, *, symmetric=False, axis=None, bucket_size=None):
  """Float64 fake quantization, per group; returns (values, step, y, mag).

  ``y`` is the unrounded position on the grid, used to spot exact ties;
  ``mag`` is the group's largest magnitude, which sets float32 round-off.
  """
  flat = np.asarray(x, np.float64).ravel()
  out, step, y, mag = (np.empty_like(flat) for _ in range(4))
  for g in ref_groups(np.shape(x), axis, bucket_size):
    b = flat[g]
    mag[g] = np.abs(b).max()
    if symmetric:  # abs-max grid, 2^bits - 1 levels about zero
      m = np.abs(b).max()
      m = 1.0 if m < 1e-10 else m
      q = 2.0 ** (bits - 1) - 1
      y[g] = b / m * q
      out[g] = np.round(y[g]) / q * m
      step[g] = m / q
    else:  # Polino: alpha = max - min, beta = min, s = 2^bits levels
      alpha, beta = b.max() - b.min(), b.min()
      alpha = 1.0 if alpha < 1e-10 else alpha
      s = 2.0 ** bits
      y[g] = (b - beta) / alpha * (s - 1)
      out[g] = np.round(y[g]) / (s - 1) * alpha + beta
      step[g] = alpha / (s - 1)
  shape = np.shape(x)
  return tuple(a.reshape(shape) for a in (out, step, y, mag))


@st.composite
def cases(draw, max_bits=8, symmetric=None):
  shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1,
                                max_side=9))
  x = draw(hnp.arrays(np.float32, shape, elements=st.floats(
      -50, 50, width=32, allow_subnormal=False)))
  sym = draw(st.booleans()) if symmetric is None else symmetric
  bits = draw(st.integers(2 if sym else 1, max_bits))
  axis = draw(st.one_of(st.none(), st.integers(0, len(shape) - 1)))
  bucket = draw(st.one_of(st.none(), st.integers(1, 40)))
  return x, bits, dict(symmetric=sym, axis=axis, bucket_size=bucket)


# -------------------------------------------------------------- properties

@hypothesis.given(cases(max_bits=16))
def test_matches_float64_reference_within_half_a_step(case):
  x, bits, kw = case
  got = np.asarray(uniform(jnp.asarray(x), bits, **kw), np.float64)
  want, step, y, mag = ref_uniform(x, bits, **kw)
  # float32 and float64 may round an (almost) exact tie differently.
  tie = np.abs(np.abs(y - np.floor(y)) - 0.5) < 1e-3 + 1e-5 * np.abs(y)
  tol = 1e-5 * step + 1e-6 * mag
  ok = np.abs(got - want) <= tol
  assert np.all(ok | tie)
  assert np.all(np.abs(got - want)[tie] <= step[tie] * (1 + 1e-5) + tol[tie])
  # Nearest rounding: never more than half a step away.
  assert np.all(np.abs(got - x) <= step / 2 * (1 + 1e-4) + 1e-6 * mag)
  # At most 2^bits distinct values (2^bits - 1 when symmetric) per group.
  limit = 2 ** bits - (1 if kw["symmetric"] else 0)
  for g in ref_groups(x.shape, kw["axis"], kw["bucket_size"]):
    assert len(np.unique(got.ravel()[g])) <= limit


@hypothesis.given(cases(max_bits=12))
def test_node_round_trip_and_idempotence(case):
  x, bits, kw = case
  node = cx.quantize.quantize(jnp.asarray(x), bits, **kw)
  assert node.codes.shape == x.shape
  assert node.codes.dtype == (np.uint8 if bits <= 8 else np.uint16)
  dense = node.materialize()
  np.testing.assert_array_equal(dense, uniform(jnp.asarray(x), bits, **kw))
  np.testing.assert_array_equal(cx.quantize.dequantize(node), dense)
  n_groups = len(ref_groups(x.shape, kw["axis"], kw["bucket_size"]))
  floats = n_groups * (1 if kw["symmetric"] else 2)
  assert node.storage_bits() == x.size * bits + 32 * floats
  assert cx.storage_bits(node) == node.storage_bits()
  # Quantizing the dequantized values again gives the same codes.
  again = cx.quantize.quantize(dense, bits, **kw)
  np.testing.assert_array_equal(again.codes, node.codes)
  _, step, _, mag = ref_uniform(x, bits, **kw)
  np.testing.assert_allclose(again.materialize(), dense, rtol=0,
                             atol=1e-5 * step.max() + 1e-6 * mag.max())


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bucket_size", [None, 3])
def test_tuple_axis_is_one_group_per_index_pair(symmetric, bucket_size):
  x = np.asarray(jax.random.normal(jax.random.key(17), (3, 5, 4)))
  got = uniform(jnp.asarray(x), 3, symmetric=symmetric, axis=(2, 0),
                bucket_size=bucket_size)
  # Groups over axes (0, 2) are rows of the (0, 2, 1)-transposed matrix.
  rows = x.transpose(0, 2, 1).reshape(12, 5)
  want, step, _, _ = ref_uniform(rows, 3, symmetric=symmetric, axis=0,
                                 bucket_size=bucket_size)
  want = want.reshape(3, 4, 5).transpose(0, 2, 1)
  step = step.reshape(3, 4, 5).transpose(0, 2, 1)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * step.max())
  node = cx.quantize.quantize(jnp.asarray(x), 3, symmetric=symmetric,
                              axis=(2, 0), bucket_size=bucket_size)
  assert node.axis == (0, 2)
  np.testing.assert_array_equal(node.materialize(), got)


@pytest.mark.parametrize("k,bits", [(256, 4), (64, 2), (128, 8)])
def test_polino_size_ratio(k, bits):
  w = jax.random.normal(jax.random.key(0), (k * 3, 5))
  node = cx.quantize.quantize(w, bits, bucket_size=k)
  assert w.size * 32 / node.storage_bits() == pytest.approx(
      k * 32 / (k * bits + 2 * 32), rel=1e-12)


def test_stochastic_unbiased_and_between_neighbours():
  x = jax.random.normal(jax.random.key(1), (6, 7))
  keys = jax.random.split(jax.random.key(2), 4000)
  qs = np.asarray(jax.vmap(lambda k: uniform(
      x, 3, bucket_size=16, stochastic=True, key=k))(keys), np.float64)
  _, step, y, _ = ref_uniform(np.asarray(x), 3, bucket_size=16)
  xs = np.asarray(x, np.float64)
  lo_level = xs - (y - np.floor(y)) * step  # the grid level just below x
  near_lo = np.abs(qs - lo_level) <= 1e-5 * (1 + np.abs(xs))
  near_hi = np.abs(qs - (lo_level + step)) <= 1e-5 * (1 + np.abs(xs))
  assert np.all(near_lo | near_hi)
  # Each draw has variance <= step^2 / 4; allow 5 standard errors.
  se = step / 2 / np.sqrt(len(keys))
  assert np.all(np.abs(qs.mean(0) - xs) <= 5 * se + 1e-6)
  # Not secretly nearest rounding: both neighbours occur somewhere.
  assert near_lo.any(axis=0).any() and (~near_lo).any()


def test_deterministic_per_key_and_jit_equals_eager():
  x = jax.random.normal(jax.random.key(3), (33, 10))
  k1, k2 = jax.random.key(4), jax.random.key(5)
  f = functools.partial(uniform, bits=3, axis=1, bucket_size=8,
                        stochastic=True)
  a, b, c = f(x, key=k1), f(x, key=k1), f(x, key=k2)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  np.testing.assert_array_equal(jax.jit(lambda x, k: f(x, key=k))(x, k1), a)
  g = functools.partial(uniform, bits=5, symmetric=True, bucket_size=32)
  np.testing.assert_array_equal(jax.jit(g)(x), g(x))
  # Weights closed over by a jitted function are concrete: still checked.
  np.testing.assert_array_equal(jax.jit(lambda: g(x))(), g(x))
  bad = x.at[0, 0].set(jnp.nan)
  with pytest.raises(ValueError, match="NaN/Inf"):
    jax.jit(lambda: g(bad))()


@pytest.mark.parametrize("kw", [{}, dict(symmetric=True), dict(axis=-1),
                                dict(bucket_size=50), dict(axis=0, bucket_size=7)])
def test_vmap_over_bits_equals_loop(kw):
  w = jax.random.normal(jax.random.key(6), (40, 12))
  lo = 2 if kw.get("symmetric") else 1
  bits = jnp.arange(lo, 9)
  batched = jax.vmap(lambda b: uniform(w, b, **kw))(bits)
  for i, b in enumerate(range(lo, 9)):
    np.testing.assert_array_equal(batched[i], uniform(w, b, **kw))


def test_traced_bits_do_not_recompile_and_are_clipped():
  traces = []

  @jax.jit
  def f(w, b):
    traces.append(1)
    return uniform(w, b, bucket_size=16)

  w = jax.random.normal(jax.random.key(7), (8, 8))
  for b in range(1, 9):
    np.testing.assert_array_equal(f(w, jnp.int32(b)), uniform(w, b, bucket_size=16))
  assert len(traces) == 1
  np.testing.assert_array_equal(f(w, jnp.int32(40)), uniform(w, 16, bucket_size=16))
  np.testing.assert_array_equal(f(w, jnp.int32(0)), uniform(w, 1, bucket_size=16))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("kw", [{}, dict(symmetric=True, axis=0),
                                dict(bucket_size=10)])
def test_dtype_preserved(dtype, kw):
  x = jax.random.normal(jax.random.key(8), (12, 9)).astype(dtype)
  got = uniform(x, 4, **kw)
  assert got.dtype == dtype and got.shape == x.shape
  want = uniform(x.astype(jnp.float32), 4, **kw).astype(dtype)
  np.testing.assert_array_equal(got, want)
  node = cx.quantize.quantize(x, 4, **kw)
  assert node.dtype == np.dtype(dtype)
  np.testing.assert_array_equal(node.materialize(), got)
  ste = uniform_ste = cx.quantize.uniform_ste(x, 4, **kw)
  assert uniform_ste.dtype == dtype
  np.testing.assert_array_equal(ste, got)


def test_constant_and_tiny_range_groups():
  x = jnp.full((4, 5), 3.25)
  np.testing.assert_array_equal(uniform(x, 2), x)
  np.testing.assert_array_equal(uniform(jnp.zeros((3, 3)), 4, symmetric=True),
                                jnp.zeros((3, 3)))
  # A Polino bucket of one value is reproduced exactly.
  y = jax.random.normal(jax.random.key(9), (5, 3))
  np.testing.assert_array_equal(uniform(y, 1, bucket_size=1), y)


def test_symmetric_grid_is_symmetric_with_exact_zero():
  v = jnp.linspace(0.0, 2.0, 51)  # includes exact ties at +-1
  x = jnp.concatenate([-v[:0:-1], v])
  q = uniform(x, 3, symmetric=True)
  np.testing.assert_array_equal(q, -q[::-1])
  assert float(q[50]) == 0.0
  assert len(np.unique(np.asarray(q))) == 2 ** 3 - 1


# ------------------------------------------------------------ straight-through

def test_ste_forward_and_identity_gradient():
  w = jax.random.normal(jax.random.key(10), (16, 8))
  kws = [dict(bucket_size=32), dict(symmetric=True, axis=-1),
         dict(stochastic=True, key=jax.random.key(0))]
  for kw in kws:
    np.testing.assert_array_equal(cx.quantize.uniform_ste(w, 3, **kw),
                                  uniform(w, 3, **kw))
    cot = jax.random.normal(jax.random.key(11), w.shape)
    g = jax.jit(jax.grad(lambda w: jnp.sum(
        cx.quantize.uniform_ste(w, 3, **kw) * cot)))(w)
    np.testing.assert_array_equal(g, cot)


def test_ste_under_vmap_over_bits_with_grad():
  w = jax.random.normal(jax.random.key(12), (10, 6))
  loss = lambda w, b: jnp.sum(cx.quantize.uniform_ste(w, b) ** 2)
  vals, grads = jax.jit(jax.vmap(jax.value_and_grad(loss), (None, 0)))(
      w, jnp.arange(2, 6))
  for i, b in enumerate(range(2, 6)):
    q = uniform(w, b)
    np.testing.assert_allclose(vals[i], jnp.sum(q ** 2), rtol=1e-6)
    np.testing.assert_allclose(grads[i], 2 * q, rtol=1e-6)


# ------------------------------------------------------------------ trees

class _MLP(linen.Module):

  @linen.compact
  def __call__(self, x):
    return linen.Dense(3)(jax.nn.relu(linen.Dense(5)(x)))


def test_apply_on_linen_params():
  params = _MLP().init(jax.random.key(13), jnp.ones((1, 4)))
  q = cx.quantize.apply(params, functools.partial(uniform, bits=4))
  p, out = params["params"], q["params"]
  for name in ("Dense_0", "Dense_1"):
    np.testing.assert_array_equal(out[name]["kernel"],
                                  uniform(p[name]["kernel"], 4))
    assert out[name]["bias"] is p[name]["bias"]
  nodes = cx.quantize.apply(params, functools.partial(
      cx.quantize.quantize, bits=4, axis=-1))
  assert isinstance(nodes["params"]["Dense_0"]["kernel"], cx.quantize.QuantizedArray)
  dense = cx.materialize(nodes)
  np.testing.assert_array_equal(dense["params"]["Dense_1"]["kernel"],
                                uniform(p["Dense_1"]["kernel"], 4, axis=-1))
  # The model runs on the fake-quantized params.
  assert _MLP().apply(q, jnp.ones((2, 4))).shape == (2, 3)


def test_apply_with_key_splits_per_leaf_in_order():
  params = _MLP().init(jax.random.key(14), jnp.ones((1, 4)))
  f = functools.partial(uniform, bits=2, stochastic=True)
  key = jax.random.key(15)
  a = cx.quantize.apply(params, f, key=key)
  b = cx.quantize.apply(params, f, key=key)
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
  k0, k1 = jax.random.split(key, 2)
  p = params["params"]
  np.testing.assert_array_equal(a["params"]["Dense_0"]["kernel"],
                                f(p["Dense_0"]["kernel"], key=k0))
  np.testing.assert_array_equal(a["params"]["Dense_1"]["kernel"],
                                f(p["Dense_1"]["kernel"], key=k1))


def test_apply_on_nnx_state():
  model = nnx.Linear(6, 4, rngs=nnx.Rngs(0))
  _, state = nnx.split(model)
  q = cx.quantize.apply(state, functools.partial(uniform, bits=3))
  np.testing.assert_array_equal(q["kernel"][...], uniform(state["kernel"][...], 3))
  np.testing.assert_array_equal(q["bias"][...], state["bias"][...])
  nodes = cx.quantize.apply(state, functools.partial(cx.quantize.quantize, bits=3),
                            where="kernel")
  np.testing.assert_array_equal(cx.materialize(nodes)["kernel"][...],
                                q["kernel"][...])


def test_apply_errors_name_the_leaf_path():
  params = _MLP().init(jax.random.key(16), jnp.ones((1, 4)))
  with pytest.raises(ValueError,
                     match=r"\['Dense_0'\]\['kernel'\]: bits must be in \[1, 16\], got 17"):
    cx.quantize.apply(params, functools.partial(uniform, bits=17))

  def no_path(x, bits):  # a quantizer without `path`: errors get prefixed
    return uniform(x, bits)

  with pytest.raises(ValueError, match=r"\['Dense_0'\]\['kernel'\]: x: bits"):
    cx.quantize.apply(params, functools.partial(no_path, bits=0))


# ------------------------------------------------------------- bad inputs

W = jnp.ones((4, 3))


@pytest.mark.parametrize("call,exc,msg", [
    (lambda: uniform(W, 17), ValueError, r"x: bits must be in \[1, 16\], got 17"),
    (lambda: uniform(W, 0), ValueError, r"bits must be in \[1, 16\]"),
    (lambda: uniform(W, 2.5), ValueError, "bits must be an integer"),
    (lambda: uniform(W, True), TypeError, "bits must be an integer"),
    (lambda: uniform(W, 1, symmetric=True), ValueError, r"bits must be in \[2, 16\]"),
    (lambda: uniform(W, jnp.array([2, 3])), ValueError, "bits must be a scalar"),
    (lambda: uniform(W, 4, bucket_size=0), ValueError, "bucket_size must be >= 1"),
    (lambda: uniform(W, 4, bucket_size=2.0), TypeError, "bucket_size"),
    (lambda: uniform(W, 4, axis=2), ValueError, "axis 2 is out of range"),
    (lambda: uniform(W, 4, axis=(0, 0)), ValueError, "repeats"),
    (lambda: uniform(W, 4, axis=1.0), TypeError, "axis must be an int"),
    (lambda: uniform(jnp.ones((3,), jnp.int32), 4), TypeError, "x: expected a floating"),
    (lambda: uniform(jnp.ones((3,), bool), 4), TypeError, "floating"),
    (lambda: uniform(jnp.array([1.0, jnp.nan]), 4), ValueError, "x: contains 1 NaN/Inf"),
    (lambda: uniform(jnp.array([1.0, jnp.inf]), 4), ValueError, "NaN/Inf"),
    (lambda: uniform(W, 4, stochastic=True), ValueError, "needs a PRNG `key`"),
    (lambda: cx.quantize.uniform_ste(W, 20), ValueError, "bits must be in"),
    (lambda: cx.quantize.quantize(W, 9.5), ValueError, "bits must be an integer"),
    (lambda: cx.quantize.quantize(jnp.ones((0, 3)), 4), ValueError, "empty"),
])
def test_bad_inputs(call, exc, msg):
  with pytest.raises(exc, match=msg):
    call()


def test_quantize_rejects_traced_bits():
  with pytest.raises(TypeError, match="concrete"):
    jax.jit(lambda b: cx.quantize.quantize(W, b))(4)


def test_empty_array_passes_through_uniform():
  e = jnp.ones((0, 3))
  assert uniform(e, 4).shape == (0, 3)


# ------------------------------------------------- float16 / bfloat16 scales

@pytest.mark.parametrize("scale_dtype", ["float16", "bfloat16"])
@hypothesis.given(case=cases(max_bits=8))
def test_narrow_scales_are_stored_and_codes_are_nearest_to_them(scale_dtype, case):
  x, bits, kw = case
  node = cx.quantize.quantize(jnp.asarray(x), bits, scale_dtype=scale_dtype, **kw)
  assert node.scale.dtype == jnp.dtype(scale_dtype)
  assert node.offset.dtype == jnp.dtype(scale_dtype)
  dense = node.materialize()
  # Fake quantization, its straight-through twin and jit agree with the node.
  np.testing.assert_array_equal(
      dense, uniform(jnp.asarray(x), bits, scale_dtype=scale_dtype, **kw))
  np.testing.assert_array_equal(
      dense, cx.quantize.uniform_ste(jnp.asarray(x), bits, scale_dtype=scale_dtype, **kw))
  np.testing.assert_array_equal(dense, jax.jit(functools.partial(
      uniform, bits=bits, scale_dtype=scale_dtype, **kw))(jnp.asarray(x)))
  # Float64 reference from the stored (rounded) scales: the codes are the
  # nearest grid points to x, clipped into range, and dequantize exactly.
  groups = ref_groups(x.shape, kw["axis"], kw["bucket_size"])
  scale = np.asarray(node.scale, np.float64)
  offset = (np.zeros(len(groups)) if kw["symmetric"]
            else np.asarray(node.offset, np.float64))
  zero = 2 ** (bits - 1) - 1 if kw["symmetric"] else 0
  top = 2 * zero if kw["symmetric"] else 2 ** bits - 1
  flat = np.asarray(x, np.float64).ravel()
  codes = np.asarray(node.codes).ravel().astype(np.int64)
  want = np.empty_like(flat)
  for i, g in enumerate(groups):
    y = (flat[g] - offset[i]) / scale[i]
    c = np.clip(np.round(y) + zero, 0, top)
    tie = np.abs(np.abs(y - np.floor(y)) - 0.5) < 1e-3 + 1e-5 * np.abs(y)
    assert np.all((codes[g] == c) | tie)
    want[g] = (codes[g] - zero) * scale[i] + offset[i]
  np.testing.assert_allclose(np.asarray(dense, np.float64).ravel(), want,
                             rtol=1e-6, atol=1e-6 * np.abs(want).max())
  floats = len(groups) * (1 if kw["symmetric"] else 2)
  assert node.storage_bits() == x.size * bits + 16 * floats


@pytest.mark.parametrize("scale_dtype", ["float16", "bfloat16"])
def test_narrow_scales_round_trip_the_file_and_shrink_it(scale_dtype, tmp_path):
  x = jax.random.normal(jax.random.PRNGKey(0), (256, 64))
  wide = cx.quantize.quantize(x, 4, axis=-1)
  narrow = cx.quantize.quantize(x, 4, axis=-1, scale_dtype=scale_dtype)
  cx.save(tmp_path / "wide.cx", {"w": wide})
  cx.save(tmp_path / "narrow.cx", {"w": narrow})
  back = cx.load(tmp_path / "narrow.cx", keep_compressed=True)["w"]
  assert back.scale.dtype == jnp.dtype(scale_dtype)
  np.testing.assert_array_equal(back.materialize(), narrow.materialize())
  # 64 scales and 64 offsets, 2 bytes each instead of 4.
  saved = (tmp_path / "wide.cx").stat().st_size - (tmp_path / "narrow.cx").stat().st_size
  assert saved >= 2 * 128 - 16
  # The rounded grid costs little accuracy: within 1% of the step.
  step = float(jnp.max(wide.scale))
  assert float(jnp.max(jnp.abs(narrow.materialize() - x))) <= 0.51 * step


def test_narrow_scales_edge_cases():
  x = jnp.linspace(-1.0, 1.0, 64).reshape(8, 8)
  # float32 scales of a float32 array are the default, bit for bit.
  np.testing.assert_array_equal(uniform(x, 4, scale_dtype="float32"), uniform(x, 4))
  # Tiny groups keep a positive, finite float16 scale: no 0/0.
  tiny = cx.quantize.quantize(x * 1e-9, 8, axis=0, scale_dtype="float16")
  assert np.all(np.asarray(tiny.scale, np.float32) > 0)
  assert np.all(np.isfinite(tiny.materialize()))
  # Under jit a value beyond float16 is clamped, never inf or NaN.
  big = jax.jit(lambda v: uniform(v, 4, scale_dtype="float16"))(x * 1e6)
  assert np.all(np.isfinite(big))
  # A Method composes it: N:M then float16-scaled codes, view == file.
  plan = cx.Plan([("w", cx.methods.NM(2, 4) >> cx.methods.Uniform(
      4, symmetric=True, axis=-1, scale_dtype="float16"))])
  train = plan.init({"w": x})
  out = plan.finalize(train)
  assert out["w"].value.scale.dtype == jnp.float16
  np.testing.assert_array_equal(cx.materialize(out)["w"], plan.view(train)["w"])


@pytest.mark.parametrize("scale_dtype,exc,msg", [
    ("int8", TypeError, "scale_dtype must be None or one of"),
    ("float64", TypeError, "scale_dtype must be None or one of"),
    (3, TypeError, "scale_dtype must be None or one of"),
])
def test_bad_scale_dtype_names_the_path(scale_dtype, exc, msg):
  with pytest.raises(exc, match=f"layer/kernel: {msg}"):
    cx.quantize.quantize(jnp.ones((4, 4)), 4, scale_dtype=scale_dtype,
                         path="layer/kernel")


def test_values_beyond_float16_scales_are_a_value_error():
  x = jnp.ones((4, 4)).at[1, 2].set(1e6)
  with pytest.raises(ValueError, match=r"layer/kernel: \|x\| reaches .* float16"):
    cx.quantize.quantize(x, 4, scale_dtype="float16", path="layer/kernel")
  assert cx.quantize.quantize(x, 4, scale_dtype="bfloat16").scale.dtype == jnp.bfloat16
