"""Product quantization of rows (issue 14): cx.quantize.product, its node and
cx.methods.ProductQuantize, against a NumPy float64 Lloyd reference."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import compressax as cx
from compressax import io


def _starts(key, rows, k, m):
  """The documented k-means start: per chunk, the rows of the K smallest of
  m x rows random 32-bit draws (NumPy's stable sort)."""
  draws = np.asarray(jax.random.bits(key, (m, rows)))
  return np.argsort(draws, axis=1, kind="stable")[:, :k]


def _np_assign(sub, c):
  d2 = ((sub[:, None, :] - c[None, :, :]) ** 2).sum(-1)
  return d2.argmin(1)  # ties: the lowest index, as the library


def _np_product(x, m, bits, iters, key):
  """Lloyd's k-means per column chunk in float64 from the same start."""
  x = np.asarray(x, np.float64)
  rows, d = x.shape
  k = 1 << bits
  books, codes = [], []
  for j, idx in enumerate(_starts(key, rows, k, m)):
    sub = x[:, j * (d // m):(j + 1) * (d // m)]
    c = sub[idx].copy()
    for _ in range(iters):
      a = _np_assign(sub, c)
      for i in range(k):
        if (a == i).any():  # an empty cluster keeps its codeword
          c[i] = sub[a == i].mean(0)
    books.append(c)
    codes.append(_np_assign(sub, c))
  return np.stack(codes, 1), np.stack(books)


def _blobs(seed, rows, d, centers=12):
  """Rows around a few centers: k-means assignments have clear margins."""
  rng = np.random.default_rng(seed)
  mu = rng.normal(size=(centers, d)) * 3
  return (mu[rng.integers(0, centers, rows)]
          + 0.3 * rng.normal(size=(rows, d))).astype(np.float32)


@pytest.mark.parametrize("seed, m, bits, iters", [(1, 3, 3, 25), (2, 6, 1, 5)])
def test_kmeans_matches_numpy_reference(seed, m, bits, iters):
  x = _blobs(seed, 150, 12)
  key = jax.random.key(seed)
  node = cx.quantize.product(jnp.asarray(x), subvectors=m, bits=bits, key=key,
                             iters=iters)
  codes, books = _np_product(x, m, bits, iters, key)
  np.testing.assert_array_equal(np.asarray(node.codes), codes)
  np.testing.assert_allclose(np.asarray(node.codebooks), books, rtol=1e-5, atol=1e-5)
  # The dense rows are the concatenated codewords.
  want = np.concatenate([books[j][codes[:, j]] for j in range(m)], axis=1)
  np.testing.assert_allclose(np.asarray(node.materialize()), want, rtol=1e-5, atol=1e-5)


def _mse(x, node):
  return float(np.mean((np.asarray(node.materialize(), np.float64) - np.asarray(x)) ** 2))


def test_error_falls_as_bits_grow_and_is_zero_at_k_equal_rows():
  x = jax.random.normal(jax.random.key(0), (16, 8), jnp.float32)
  errs = [_mse(x, cx.quantize.product(x, subvectors=2, bits=b, key=jax.random.key(1)))
          for b in range(1, 5)]
  assert all(b < a for a, b in zip(errs, errs[1:])), errs
  assert errs[-1] == 0.0  # K = 16 = rows: every row is its own codeword
  node = cx.quantize.product(x, subvectors=2, bits=4, key=jax.random.key(1))
  np.testing.assert_array_equal(np.asarray(node.materialize()), np.asarray(x))


@pytest.mark.parametrize("dtype, bits, codes", [(jnp.bfloat16, 8, np.uint8),
                                                (jnp.float16, 9, np.uint16)])
def test_materialize_shape_dtype_and_storage_bits(dtype, bits, codes):
  rows, d, m = 1 << bits, 12, 3
  x = jax.random.normal(jax.random.key(2), (rows, d), jnp.float32).astype(dtype)
  node = cx.quantize.product(x, subvectors=m, bits=bits, key=jax.random.key(0), iters=2)
  assert isinstance(node, cx.quantize.ProductQuantizedArray)
  dense = node.materialize()
  assert dense.shape == (rows, d) and dense.dtype == dtype
  assert node.codes.shape == (rows, m) and node.codes.dtype == codes
  assert node.codebooks.shape == (m, 1 << bits, d // m)
  assert node.codebooks.dtype == jnp.float32
  assert node.subvectors == m and node.n_codewords == 1 << bits
  assert node.storage_bits() == rows * m * bits + 32 * m * (1 << bits) * (d // m)
  assert cx.storage_bits(node) == node.storage_bits()


def test_jit_equals_eager_bit_for_bit():
  x = jax.random.normal(jax.random.key(3), (200, 16), jnp.float32)
  key = jax.random.key(4)
  eager = cx.quantize.product(x, subvectors=4, bits=4, key=key)
  jitted = jax.jit(lambda x, k: cx.quantize.product(x, subvectors=4, bits=4, key=k))(x, key)
  assert eager.codes.tobytes() == jitted.codes.tobytes()
  assert np.asarray(eager.codebooks).tobytes() == np.asarray(jitted.codebooks).tobytes()
  again = cx.quantize.product(x, subvectors=4, bits=4, key=key)
  assert np.asarray(again.codebooks).tobytes() == np.asarray(eager.codebooks).tobytes()
  other = cx.quantize.product(x, subvectors=4, bits=4, key=jax.random.key(5))
  assert np.asarray(other.codebooks).tobytes() != np.asarray(eager.codebooks).tobytes()


def test_save_load_round_trip_and_file_size(tmp_path):
  rows, d, m, bits = 512, 32, 8, 4
  x = jax.random.normal(jax.random.key(6), (rows, d), jnp.float32)
  node = cx.quantize.product(x, subvectors=m, bits=bits, key=jax.random.key(0), iters=5)
  path = tmp_path / "pq.cx"
  cx.save(path, {"emb": node})
  dense = cx.load(path)["emb"]
  assert dense.dtype == np.float32
  assert np.asarray(dense).tobytes() == np.asarray(node.materialize()).tobytes()
  back = cx.load(path, keep_compressed=True)["emb"]
  assert type(back) is cx.quantize.ProductQuantizedArray and back.bits == bits
  np.testing.assert_array_equal(np.asarray(back.codes), np.asarray(node.codes))
  assert np.asarray(back.codebooks).tobytes() == np.asarray(node.codebooks).tobytes()
  payload = node.storage_bits() / 8
  size = path.stat().st_size
  # Codes near-uniform over 16 codewords and raw float32 codebooks: the file
  # is the payload (entropy coding may save a little) plus a small manifest.
  assert 0.9 * payload < size < payload + 1024, (size, payload)


def _forged(tmp_path, node):
  path = tmp_path / "bad.cx"
  cx.save(path, {"emb": node})  # save trusts its caller; load must not
  return path


def test_forged_files_are_refused(tmp_path):
  # The configuration of test_error_falls' bits=2 case: no new compile.
  x = jax.random.normal(jax.random.key(7), (16, 8), jnp.float32)
  node = cx.quantize.product(x, subvectors=2, bits=2, key=jax.random.key(0))
  f32 = np.dtype(np.float32)
  codes = np.asarray(node.codes).copy()
  codes[3, 1] = 4  # K - 1 = 3
  cases = [
      (cx.quantize.ProductQuantizedArray(jnp.asarray(codes), node.codebooks, (16, 8), f32, 2),
       r"emb: ValueError: a code does not fit in 2 bits"),
      (cx.quantize.ProductQuantizedArray(node.codes, node.codebooks[:, :3], (16, 8), f32, 2),
       r"emb: ValueError: codebooks must be floats of shape \(m, 4, 8 / m\)"),
      (cx.quantize.ProductQuantizedArray(node.codes, node.codebooks, (16, 6), f32, 2),
       r"emb: ValueError: codebooks must be floats of shape"),
      (cx.quantize.ProductQuantizedArray(node.codes, node.codebooks, (15, 8), f32, 2),
       r"emb: ValueError: codes must be unsigned ints of shape \(15, 2\)"),
      (cx.quantize.ProductQuantizedArray(node.codes.astype(jnp.int32), node.codebooks,
                                         (16, 8), f32, 2),
       r"emb: ValueError: codes must be unsigned ints"),
      (cx.quantize.ProductQuantizedArray(node.codes, node.codebooks, (16, 8), f32, 17),
       r"emb: ValueError: bits must be an int in \[1, 16\], got 17"),
      (cx.quantize.ProductQuantizedArray(node.codes, node.codebooks, (64,), f32, 2),
       r"emb: ValueError: shape must be 2-D"),
  ]
  for bad, match in cases:
    path = _forged(tmp_path, bad)
    for keep in (False, True):
      with pytest.raises(io.CorruptFileError, match=match):
        cx.load(path, keep_compressed=keep)


_X = jnp.ones((8, 4), jnp.float32)


@pytest.mark.parametrize("x, kw, exc, match", [
    (jnp.ones((8,), jnp.float32), {}, ValueError, "needs a 2-D"),
    (jnp.ones((2, 4, 4), jnp.float32), {}, ValueError, "needs a 2-D"),
    (jnp.ones((8, 4), jnp.int32), {}, TypeError, "floating-point"),
    (_X.at[1, 2].set(jnp.nan), {}, ValueError, "NaN/Inf"),
    (_X.at[0, 0].set(jnp.inf), {}, ValueError, "NaN/Inf"),
    (_X, dict(subvectors=3), ValueError, r"subvectors \(3\) must divide the 4 columns"),
    (_X, dict(subvectors=0), ValueError, "subvectors must be a Python int >= 1"),
    (_X, dict(subvectors=2.0), ValueError, "subvectors must be a Python int"),
    (_X, dict(bits=0), ValueError, r"bits must be a Python int \[1, 16\], got 0"),
    (_X, dict(bits=17), ValueError, r"bits must be a Python int \[1, 16\], got 17"),
    (_X, dict(bits=4), ValueError, r"2\*\*bits = 16 codewords need at least as many rows, got 8"),
    (_X, dict(iters=-1), ValueError, "iters must be a Python int >= 0"),
    (_X, dict(key=None), ValueError, "needs a PRNG `key`"),
])
def test_bad_inputs_name_the_path(x, kw, exc, match):
  args = dict(subvectors=2, bits=2, key=jax.random.key(0)) | kw
  with pytest.raises(exc, match=r"params\['emb'\]: .*" + match):
    cx.quantize.product(x, path="params['emb']", **args)


@hypothesis.settings(max_examples=10)
@hypothesis.given(seed=st.integers(0, 2 ** 16), bits=st.integers(1, 2),
                  scale=st.floats(1e-2, 1e2))
def test_codes_are_the_nearest_codewords(seed, bits, scale):
  """After a few steps (not converged), each row's code per chunk is its nearest
  codeword (the assignment step is optimal for the returned codebooks), and
  every codeword stays within the range of its chunk's rows."""
  rng = np.random.default_rng(seed)
  x = (scale * rng.standard_t(3, size=(40, 6))).astype(np.float32)
  node = cx.quantize.product(jnp.asarray(x), subvectors=3, bits=bits,
                             key=jax.random.key(seed), iters=3)
  codes = np.asarray(node.codes).astype(np.int64)
  books = np.asarray(node.codebooks, np.float64)
  for j in range(3):
    sub = x[:, 2 * j:2 * j + 2].astype(np.float64)
    d2 = ((sub[:, None, :] - books[j][None]) ** 2).sum(-1)
    chosen = d2[np.arange(40), codes[:, j]]
    # float32 distances: optimal up to rounding at the data's scale.
    assert np.all(chosen <= d2.min(1) + 1e-5 * (sub ** 2).sum(1).max())
    assert np.all(books[j] >= sub.min(0) - 1e-5 * scale)
    assert np.all(books[j] <= sub.max(0) + 1e-5 * scale)


# ------------------------------------------------------------- the Plan method

def _plan_setup():
  params = {"emb": jax.random.normal(jax.random.key(8), (64, 16), jnp.float32),
            "b": jnp.zeros((16,), jnp.float32)}
  plan = cx.Plan([(r"emb", cx.methods.ProductQuantize(subvectors=4, bits=3, iters=10))])
  return params, plan


def test_method_init_is_product_of_the_init_key():
  params, plan = _plan_setup()
  train = plan.init(params, jax.random.key(0))
  aux = train["aux"]["emb"]
  # Plan.init folds the leaf's index into its key (emb is leaf 1 after b).
  node = cx.quantize.product(params["emb"], subvectors=4, bits=3, iters=10,
                             key=jax.random.fold_in(jax.random.key(0), 1))
  np.testing.assert_array_equal(np.asarray(aux["codes"]), np.asarray(node.codes))
  np.testing.assert_array_equal(np.asarray(aux["codebooks"]), np.asarray(node.codebooks))
  with pytest.raises(ValueError, match=r"emb.*pass a PRNG key to Plan.init"):
    plan.init(params)


def test_method_gradient_reaches_the_codebooks():
  params, plan = _plan_setup()
  train = plan.init(params, jax.random.key(0))
  c = jax.random.normal(jax.random.key(9), (64, 16), jnp.float32)
  g = jax.grad(lambda t: jnp.sum(plan.view(t)["emb"] * c))(train)
  codes = np.asarray(train["aux"]["emb"]["codes"]).astype(np.int64)
  want = np.zeros((4, 8, 4))
  for r in range(64):  # each codeword: the summed gradient of its rows
    for j in range(4):
      want[j, codes[r, j]] += np.asarray(c)[r, 4 * j:4 * j + 4]
  np.testing.assert_allclose(np.asarray(g["aux"]["emb"]["codebooks"]), want,
                             rtol=1e-5, atol=1e-5)
  assert not np.asarray(g["aux"]["emb"]["codes"]).any()
  assert not np.asarray(g["params"]["emb"]).any()  # the dense leaf is unused


@jax.numpy_dtype_promotion("standard")  # optax.adam's bias correction
def test_method_trains_codebooks_holds_codes_and_finalizes(tmp_path):
  params, plan = _plan_setup()
  train = plan.init(params, jax.random.key(0))
  target = jax.random.normal(jax.random.key(10), (64, 16), jnp.float32)
  loss = plan.loss(lambda p: jnp.mean((p["emb"] + p["b"][None, :] - target) ** 2))
  # Weight decay would move the codes if the wrapper did not hold them.
  tx = plan.optimizer(optax.adamw(1e-2, weight_decay=0.5))
  state = tx.init(train)
  codes0 = np.asarray(train["aux"]["emb"]["codes"])
  books0 = np.asarray(train["aux"]["emb"]["codebooks"])

  @jax.jit
  def step(train, state):
    val, g = jax.value_and_grad(loss)(train, None)
    u, state = tx.update(g, state, train)
    return optax.apply_updates(train, u), state, val

  losses = []
  for _ in range(5):
    train, state, val = step(train, state)
    losses.append(float(val))
  assert losses[-1] < losses[0], losses
  np.testing.assert_array_equal(np.asarray(train["aux"]["emb"]["codes"]), codes0)
  assert not np.array_equal(np.asarray(train["aux"]["emb"]["codebooks"]), books0)
  out = plan.finalize(train)
  node = out["emb"]
  assert isinstance(node, cx.quantize.ProductQuantizedArray)
  np.testing.assert_array_equal(np.asarray(node.codes), codes0.astype(np.uint8))
  view = plan.view(train)["emb"]
  assert np.asarray(node.materialize()).tobytes() == np.asarray(view).tobytes()
  cx.save(tmp_path / "m.cx", out)
  back = cx.load(tmp_path / "m.cx")
  assert np.asarray(back["emb"]).tobytes() == np.asarray(view).tobytes()
  np.testing.assert_array_equal(np.asarray(back["b"]), np.asarray(train["params"]["b"]))


@pytest.mark.parametrize("kw, exc", [(dict(subvectors=0, bits=2), ValueError),
                                     (dict(subvectors=2, bits=17), ValueError),
                                     (dict(subvectors=2, bits=2.0), TypeError),
                                     (dict(subvectors=2, bits=2, iters=-1), ValueError)])
def test_method_config_is_checked(kw, exc):
  with pytest.raises(exc, match="ProductQuantize: "):
    cx.methods.ProductQuantize(**kw)
