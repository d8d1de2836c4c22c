"""Pruning transforms: a NumPy reference loop, exact zeros, schedule, digits."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

import compressax as cx


def _params(seed=0):
  k = jax.random.split(jax.random.key(seed), 2)
  return {"a": {"kernel": jax.random.normal(k[0], (12, 10)),
                "bias": jnp.zeros((10,))},
          "b": {"kernel": jax.random.normal(k[1], (10, 6))}}


def _grads(params, i):
  return jax.tree.map(
      lambda x: jax.random.normal(jax.random.key(100 + i), x.shape), params)


def _schedule(t, s_i, s_f, t0, t1, dt, power=3):
  """Zhu and Gupta, equation 1 (float64)."""
  if t < t0:
    return s_i
  t = min(t0 + (t - t0) // dt * dt, t1)
  return s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** power


def _topk_mask(w, sparsity):
  n = w.size
  keep = n - math.floor(sparsity * n + 1e-9)
  order = np.argsort(-np.abs(w).ravel(), kind="stable")
  m = np.zeros(n, bool)
  m[order[:keep]] = True
  return m.reshape(w.shape)


def test_matches_numpy_reference_loop():
  lr, s_f, t0, t1, dt = 0.1, 0.75, 2, 8, 2
  tx = cx.optim.prune_magnitude(optax.sgd(lr), final_sparsity=s_f,
                                begin_step=t0, end_step=t1, frequency=dt)
  params = _params()
  state = tx.init(params)
  step = jax.jit(tx.update)
  ref = jax.tree.map(np.asarray, params)
  masks = {k: np.ones(v["kernel"].shape, bool) for k, v in ref.items()}
  for t in range(12):
    g = _grads(params, t)
    u, state = step(g, state, params)
    params = optax.apply_updates(params, u)
    for name in ("a", "b"):
      w, gw = ref[name]["kernel"], np.asarray(g[name]["kernel"])
      # A mask update ranks the weights as the step begins, then applies to
      # this step's gradient and update.
      if t0 <= t <= t1 and (t - t0) % dt == 0:
        masks[name] = _topk_mask(np.where(masks[name], w, 0),
                                 _schedule(t, 0.0, s_f, t0, t1, dt))
      after = w - np.float32(lr) * np.where(masks[name], gw, 0)
      ref[name]["kernel"] = np.where(masks[name], after, 0).astype(np.float32)
      got = np.asarray(params[name]["kernel"])
      np.testing.assert_array_equal(state.masks[name]["kernel"], masks[name])
      np.testing.assert_allclose(got, ref[name]["kernel"], rtol=1e-6, atol=1e-7)
      # Exactly zero where masked, after one apply_updates, every step.
      assert np.all(got[~masks[name]] == 0)
      kept = n_kept = masks[name].sum()
      s = _schedule(t, 0.0, s_f, t0, t1, dt) if t >= t0 else 0.0
      assert kept == masks[name].size - math.floor(s * masks[name].size + 1e-6)
      del n_kept
    ref["a"]["bias"] = ref["a"]["bias"] - np.float32(lr) * np.asarray(
        g["a"]["bias"])
    np.testing.assert_allclose(params["a"]["bias"], ref["a"]["bias"], rtol=1e-6)
  assert int(state.count) == 12


def test_global_scope_and_erk_reach_the_target_overall():
  params = _params()
  for kw in (dict(scope="global"), dict(distribution="erk")):
    tx = cx.optim.prune_magnitude(optax.sgd(0.01), final_sparsity=0.6,
                                  begin_step=0, end_step=0, **kw)
    state = tx.init(params)
    u, state = tx.update(_grads(params, 0), state, params)
    new = optax.apply_updates(params, u)
    zeros = sum(int(jnp.sum(new[k]["kernel"] == 0)) for k in ("a", "b"))
    assert abs(zeros / (120 + 60) - 0.6) < 0.03, kw


def test_prune_fixed_zeroes_on_first_step_and_keeps_sgd_elsewhere():
  params = _params()
  mask = cx.prune.magnitude_mask(params, 0.5)
  tx = cx.optim.prune_fixed(optax.sgd(0.1), mask)
  state = tx.init(params)
  g = _grads(params, 0)
  u, state = tx.update(g, state, params)
  new = optax.apply_updates(params, u)
  for k in ("a", "b"):
    m = np.asarray(mask[k]["kernel"])
    want = np.asarray(params[k]["kernel"]) - np.float32(0.1) * np.asarray(
        g[k]["kernel"])
    np.testing.assert_array_equal(np.asarray(new[k]["kernel"])[~m], 0.0)
    np.testing.assert_allclose(np.asarray(new[k]["kernel"])[m], want[m],
                               rtol=1e-6)


def test_prune_nm_groups_hold_exactly_n():
  params = _params()
  with pytest.raises(ValueError, match=r"params\['b'\]\['kernel'\].*m=4"):
    cx.optim.prune_nm(optax.sgd(0.1), 2, 4, axis=0).init(params)
  tx = cx.optim.prune_nm(optax.sgd(0.1), 2, 4, axis=0, begin_step=1,
                         where="a/kernel")
  state = tx.init(params)
  for t in range(3):
    u, state = tx.update(_grads(params, t), state, params)
    params = optax.apply_updates(params, u)
    nz = np.asarray(params["a"]["kernel"]) != 0
    if t == 0:
      assert nz.all()
    else:
      np.testing.assert_array_equal(nz.reshape(3, 4, 10).sum(axis=1), 2)


def _digits():
  d = load_digits()
  x = (d.data / 16.0).astype(np.float32)
  y = d.target.astype(np.int32)
  idx = np.random.default_rng(0).permutation(len(x))
  x, y = x[idx], y[idx]
  return (x[:1400], y[:1400]), (x[1400:], y[1400:])


def test_digits_mlp_at_80_percent_sparsity_beats_90_percent_accuracy():
  (xtr, ytr), (xte, yte) = _digits()
  k = jax.random.split(jax.random.key(0), 2)
  params = {"h": {"kernel": jax.random.normal(k[0], (64, 128)) * 0.125,
                  "bias": jnp.zeros((128,))},
            "o": {"kernel": jax.random.normal(k[1], (128, 10)) * 0.09,
                  "bias": jnp.zeros((10,))}}

  def logits(p, x):
    h = jax.nn.relu(x @ p["h"]["kernel"] + p["h"]["bias"][None])
    return h @ p["o"]["kernel"] + p["o"]["bias"][None]

  def loss(p, x, y):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        logits(p, x), y))

  tx = cx.optim.prune_magnitude(optax.sgd(0.1, momentum=0.9),
                                final_sparsity=0.8, begin_step=20,
                                end_step=150, frequency=10)
  state = tx.init(params)

  @jax.jit
  def step(p, s, x, y):
    u, s = tx.update(jax.grad(loss)(p, x, y), s, p)
    return optax.apply_updates(p, u), s

  rng = np.random.default_rng(1)
  for _ in range(300):
    b = rng.integers(0, len(xtr), 64)
    params, state = step(params, state, xtr[b], ytr[b])
  acc = float(np.mean(np.argmax(logits(params, xte), -1) == yte))
  sparsity = [float(jnp.mean(params[k]["kernel"] == 0)) for k in ("h", "o")]
  assert sparsity == pytest.approx([0.8, 0.8], abs=0.01)
  assert acc > 0.9


@pytest.mark.parametrize("kw, exc, match", [
    (dict(begin_step=10, end_step=5), ValueError, "end_step"),
    (dict(final_sparsity=1.0), ValueError, "sparsity"),
    (dict(final_sparsity=-0.1), ValueError, "sparsity"),
    (dict(frequency=0), ValueError, "frequency"),
    (dict(scope="row"), ValueError, "scope"),
    (dict(distribution="erk", scope="global"), ValueError, "erk"),
    (dict(inner=None), TypeError, "missing"),
    (dict(inner="sgd"), TypeError, "GradientTransformation"),
])
def test_bad_configuration(kw, exc, match):
  args = dict(inner=optax.sgd(0.1), final_sparsity=0.5, begin_step=0,
              end_step=10)
  args.update(kw)
  inner = args.pop("inner")
  with pytest.raises(exc, match=match):
    cx.optim.prune_magnitude(inner, **args)


def test_update_without_params_is_a_clear_error():
  params = _params()
  for tx in (cx.optim.prune_magnitude(optax.sgd(0.1), final_sparsity=0.5,
                                      begin_step=0, end_step=1),
             cx.optim.prune_nm(optax.sgd(0.1), 1, 2)):
    with pytest.raises(ValueError, match="needs the current params"):
      tx.update(_grads(params, 0), tx.init(params))
  with pytest.raises(ValueError, match="n <= m"):
    cx.optim.prune_nm(optax.sgd(0.1), 5, 4)
  with pytest.raises(ValueError, match="mask"):
    cx.optim.prune_fixed(optax.sgd(0.1), {"a": True}).init(params)


def test_works_on_an_nnx_state_and_keeps_its_type():
  from flax import nnx
  model = nnx.Sequential(nnx.Linear(8, 16, rngs=nnx.Rngs(0)),
                         nnx.Linear(16, 4, rngs=nnx.Rngs(1)))
  graphdef, state = nnx.split(model, nnx.Param)
  x = jnp.ones((4, 8))
  loss = lambda s: jnp.mean(nnx.merge(graphdef, s)(x) ** 2)
  tx = cx.optim.prune_magnitude(optax.sgd(0.1), final_sparsity=0.5,
                                begin_step=0, end_step=0)
  u, _ = tx.update(jax.grad(loss)(state), tx.init(state), state)
  new = optax.apply_updates(state, u)
  assert type(new) is type(state)
  for kp, leaf in jax.tree_util.tree_leaves_with_path(new):
    frac = float(jnp.mean(leaf == 0))
    assert frac == (0.5 if "kernel" in cx.path_str(kp) else 0.0)


def test_final_sparsity_as_an_injected_hyperparameter():
  tx = optax.inject_hyperparams(
      cx.optim.prune_magnitude,
      static_args=("begin_step", "end_step", "frequency", "power"))(
          optax.sgd(0.1), final_sparsity=0.5, begin_step=0, end_step=1,
          frequency=1)
  params = _params()
  state = tx.init(params)
  step = jax.jit(tx.update)
  state.hyperparams["final_sparsity"] = jnp.asarray(0.8)
  for t in range(2):
    u, state = step(_grads(params, t), state, params)
    params = optax.apply_updates(params, u)
  zeros = int(jnp.sum(params["a"]["kernel"] == 0))
  assert zeros == math.floor(0.8 * 120)
