"""Quantized training patterns: QAT / quantized distillation, differentiable
quantization points, LSQ step sizes, DiffQ bit logits."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

import compressax as cx


def _params(seed=0):
  k = jax.random.split(jax.random.key(seed), 2)
  return {"h": {"kernel": jax.random.normal(k[0], (64, 32)) * 0.18,
                "bias": jnp.zeros((32,))},
          "o": {"kernel": jax.random.normal(k[1], (32, 10)) * 0.25,
                "bias": jnp.zeros((10,))}}


def _apply(p, x):
  h = jax.nn.relu(x @ p["h"]["kernel"] + p["h"]["bias"][None])
  return h @ p["o"]["kernel"] + p["o"]["bias"][None]


def _digits():
  d = load_digits()
  x = (d.data / 16.0).astype(np.float32)
  y = d.target.astype(np.int32)
  idx = np.random.default_rng(0).permutation(len(x))
  return (x[idx[:1400]], y[idx[:1400]]), (x[idx[1400:]], y[idx[1400:]])


def _ce(p, x, y):
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      _apply(p, x), y))


def _train(loss, params, tx, xtr, ytr, steps, seed=1):
  state = tx.init(params)

  @jax.jit
  def step(p, s, x, y):
    u, s = tx.update(jax.grad(loss)(p, x, y), s, p)
    return optax.apply_updates(p, u), s

  rng = np.random.default_rng(seed)
  for _ in range(steps):
    b = rng.integers(0, len(xtr), 64)
    params, state = step(params, state, xtr[b], ytr[b])
  return params


# -- QAT with shadow weights ---------------------------------------------------

def test_quantized_params_forward_and_straight_through_gradient():
  params = _params()
  q = cx.optim.quantized_params(params, 3, bucket_size=64)
  want = cx.quantize.uniform(params["h"]["kernel"], 3, bucket_size=64)
  np.testing.assert_array_equal(q["h"]["kernel"], want)
  assert q["h"]["bias"] is params["h"]["bias"]
  c = jax.random.normal(jax.random.key(5), (64, 32))
  g = jax.grad(lambda p: jnp.sum(
      cx.optim.quantized_params(p, 3)["h"]["kernel"] * c))(params)
  np.testing.assert_array_equal(g["h"]["kernel"], c)
  nodes = cx.optim.finalize(params, 3, bucket_size=64)
  assert isinstance(nodes["h"]["kernel"], cx.quantize.QuantizedArray)
  np.testing.assert_array_equal(nodes["h"]["kernel"].materialize(), want)
  with pytest.raises(ValueError, match=r"params\['h'\]\['kernel'\].*bits"):
    cx.optim.quantized_params(params, 0)


def test_quantized_distillation_on_digits():
  (xtr, ytr), (xte, yte) = _digits()
  teacher = _train(_ce, _params(1), optax.sgd(0.1, momentum=0.9), xtr, ytr, 150)
  t_logits = jax.jit(_apply)(teacher, xtr)

  def loss(p, idx_x, y):
    x, tl = idx_x
    return cx.optim.quantized_distillation_loss(p, _apply, x, y, tl, bits=4,
                                                bucket_size=64)

  tx = optax.sgd(0.05, momentum=0.9, nesterov=True)
  state = tx.init(student := _params(2))

  @jax.jit
  def step(p, s, x, tl, y):
    u, s = tx.update(jax.grad(loss)(p, (x, tl), y), s, p)
    return optax.apply_updates(p, u), s

  rng = np.random.default_rng(3)
  for _ in range(200):
    b = rng.integers(0, len(xtr), 64)
    student, state = step(student, state, xtr[b], t_logits[b], ytr[b])
  final = cx.materialize(cx.optim.finalize(student, 4, bucket_size=64))
  acc = float(np.mean(np.argmax(_apply(final, xte), -1) == yte))
  assert acc > 0.88


# -- differentiable quantization ----------------------------------------------

def test_points_train_sorted_and_reduce_the_distillation_loss():
  params = _params()
  x = jnp.asarray(_digits()[0][0][:256])
  target = _apply(params, x)
  norms = cx.optim.gradient_norms(jax.grad(lambda p: jnp.sum(
      _apply(p, x) ** 2))(params))
  assert set(norms) == {"h/kernel", "o/kernel"}
  counts = cx.quantize.allocate_points(norms, 8)
  points = cx.optim.init_points(params, counts)
  assert points["h"]["bias"] is None
  assert points["h"]["kernel"].shape == (counts["h/kernel"],)

  def loss(pts, p=params):
    q = cx.optim.points_quantized(p, pts)
    return jnp.mean((_apply(q, x) - target) ** 2)

  q = cx.optim.points_quantized(params, points)
  assert len(np.unique(np.asarray(q["h"]["kernel"]))) <= counts["h/kernel"]
  tx = cx.optim.diff_quant_points(optax.sgd(0.002))
  state = tx.init(points)
  l0 = loss(points)
  # The weights go in as an argument: _checks.check_finite cannot inspect a
  # closed-over constant under jit.
  step = jax.jit(lambda p, s, w: tx.update(jax.grad(loss)(p, w), s, p))
  for _ in range(10):
    u, state = step(points, state, params)
    points = optax.apply_updates(points, u)
    for leaf in jax.tree.leaves(points):
      leaf = np.asarray(leaf)
      assert np.all(np.diff(leaf) >= 0) and leaf.min() >= 0 and leaf.max() <= 1
  assert loss(points) < 0.9 * l0
  with pytest.raises(ValueError, match="needs the current params"):
    tx.update(jax.grad(loss)(points), state)


# -- LSQ ------------------------------------------------------------------------

def test_lsq_steps_init_forward_and_training():
  params = _params()
  bits = 3
  steps = cx.optim.lsq_init_steps(params, bits)
  w = np.asarray(params["h"]["kernel"], np.float64)
  qn, qp = 2 ** (bits - 1), 2 ** (bits - 1) - 1
  s_ref = 2 * np.abs(w).mean() / np.sqrt(qp)
  np.testing.assert_allclose(steps["h"]["kernel"], s_ref, rtol=1e-5)
  assert steps["o"]["bias"] is None
  q = cx.optim.lsq_params(params, steps, bits)
  s = np.float64(steps["h"]["kernel"])
  np.testing.assert_allclose(q["h"]["kernel"],
                             np.round(np.clip(w / s, -qn, qp)) * s, rtol=1e-5,
                             atol=1e-6)
  (xtr, ytr), _ = _digits()
  train = {"params": params, "steps": steps}

  def loss(t, x, y):
    return _ce(cx.optim.lsq_params(t["params"], t["steps"], bits), x, y)

  l0 = loss(train, xtr, ytr)
  trained = _train(loss, train, optax.sgd(0.05, momentum=0.9), xtr, ytr, 60)
  assert loss(trained, xtr, ytr) < 0.7 * l0
  assert float(trained["steps"]["h"]["kernel"]) != float(steps["h"]["kernel"])


# -- DiffQ -------------------------------------------------------------------------

def test_diffq_partitioned_optimizer_penalty_and_final_quantization():
  params = _params()
  train = cx.optim.diffq_init(params, group_size=16, min_size=0)
  assert train["params"] is params
  (xtr, ytr), _ = _digits()
  bits0 = float(jnp.mean(cx.diffq.bits_from_logits(
      train["bit_logits"])["h"]["kernel"]))
  # A frozen model (lr 0) isolates the logits' own Adam.
  tx = cx.optim.diffq_optimizer(optax.sgd(0.0), logit_learning_rate=0.1)
  loss = cx.optim.diffq_loss(_ce, penalty=50.0, group_size=16)
  with jax.numpy_dtype_promotion("standard"):  # optax's Adam is not strict
    state = tx.init(train)
    step = jax.jit(lambda t, s, k, x, y: tx.update(
        jax.grad(loss)(t, k, x, y), s, t))
    for i in range(10):
      u, state = step(train, state, jax.random.key(i), xtr[:128], ytr[:128])
      train = optax.apply_updates(train, u)
  jax.tree.map(np.testing.assert_array_equal, train["params"], params)
  bits = float(jnp.mean(cx.diffq.bits_from_logits(
      train["bit_logits"])["h"]["kernel"]))
  assert bits < bits0
  nodes = cx.optim.diffq_finalize(train, group_size=16)
  assert isinstance(nodes["h"]["kernel"], cx.diffq.DiffQArray)
  err = np.abs(np.asarray(nodes["h"]["kernel"].materialize())
               - np.asarray(params["h"]["kernel"]))
  assert err.max() < 0.1
  with pytest.raises(ValueError, match="penalty"):
    cx.optim.diffq_loss(_ce, penalty=-1.0)
  with pytest.raises(TypeError, match="missing"):
    cx.optim.diffq_optimizer(None)
