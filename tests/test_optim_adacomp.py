"""AdaComp: reference check, exact residual identity, stats, data parallelism."""

import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import compressax as cx


def _reference(residual, grad, bin_size):
  """Chen et al. Algorithm 1 in NumPy (selection in float32, scale in float64)."""
  g = (residual + grad).astype(np.float32)
  h = (g + grad).astype(np.float32)
  n = g.size
  nb = -(-n // bin_size)
  gb = np.zeros(nb * bin_size, np.float32)
  hb = np.zeros(nb * bin_size, np.float32)
  gb[:n], hb[:n] = g.ravel(), h.ravel()
  gb, hb = gb.reshape(nb, bin_size), hb.reshape(nb, bin_size)
  chosen = (np.abs(hb) >= np.abs(gb).max(axis=1, keepdims=True)) & (gb != 0)
  k = int(chosen.sum())
  scale = np.abs(gb[chosen]).astype(np.float64).mean() if k else 0.0
  sent = np.where(chosen, np.sign(gb) * scale, 0.0).ravel()[:n]
  return sent.reshape(g.shape), chosen.ravel()[:n].reshape(g.shape), k


_compress = jax.jit(cx.optim.adacomp_compress, static_argnums=2)


@hypothesis.given(
    shape=st.sampled_from([(1, 9), (12, 12)]),
    bin_size=st.sampled_from([1, 5, 16, 200]), seed=st.integers(0, 2**16),
    scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_compress_matches_reference_and_identity_is_exact(shape, bin_size, seed,
                                                          scale):
  rng = np.random.default_rng(seed)
  residual = (scale * rng.normal(size=shape)).astype(np.float32)
  grad = rng.normal(size=shape).astype(np.float32)
  sent, new_res, k = _compress(residual, grad, bin_size)
  sent, new_res = np.asarray(sent), np.asarray(new_res)
  ref, chosen, k_ref = _reference(residual, grad, bin_size)
  assert int(k) == k_ref == int((sent != 0).sum())
  np.testing.assert_array_equal(sent != 0, chosen)
  np.testing.assert_allclose(sent, ref, rtol=2e-6, atol=0)
  # The residual is defined as G - sent, and an unsent element keeps G exactly.
  g = residual + grad
  np.testing.assert_array_equal(new_res, g - sent)
  np.testing.assert_array_equal(new_res[~chosen], g[~chosen])
  # Mass is conserved up to the one rounding of G - sent (half an ulp).
  total = sent.astype(np.float64) + new_res.astype(np.float64)
  half_ulp = 0.5 * np.spacing(np.abs(new_res)).astype(np.float64)
  assert np.all(np.abs(total - g.astype(np.float64)) <= half_ulp)
  # Ternary: one magnitude per layer.
  assert len(np.unique(np.abs(sent[chosen]))) <= 1


def test_transform_conserves_gradient_mass_over_steps():
  params = {"w": jnp.zeros((20, 30)), "b": jnp.zeros((30,))}
  tx = cx.optim.adacomp(bin_size_fc=25)
  state = tx.init(params)
  step = jax.jit(tx.update)
  total_sent = jax.tree.map(lambda x: np.zeros(x.shape), params)
  total_grad = jax.tree.map(lambda x: np.zeros(x.shape), params)
  for i in range(6):
    grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(i), x.shape),
                         params)
    sent, state = step(grads, state)
    total_sent = jax.tree.map(lambda a, b: a + np.asarray(b, np.float64),
                              total_sent, sent)
    total_grad = jax.tree.map(lambda a, b: a + np.asarray(b, np.float64),
                              total_grad, grads)
  residual = cx.optim.adacomp_residual(state, params)
  np.testing.assert_allclose(
      total_sent["w"] + np.asarray(residual["w"]), total_grad["w"], atol=1e-5)
  # The bias is not selected: sent densely, no residual.
  np.testing.assert_allclose(total_sent["b"], total_grad["b"], atol=1e-5)
  assert cx.is_skip(state.residual["b"])  # sent densely: no residual
  np.testing.assert_array_equal(residual["b"], np.zeros(30))
  # Stored in bins of L_T = 25 (600 -> 24 bins); the padding stays zero.
  assert state.residual["w"].shape == (24, 25)


def test_transform_step_equals_adacomp_compress_per_leaf():
  """The transform's binned residual gives adacomp_compress's results."""
  shape, bin_size = (7, 13), 10       # 91 elements: a short last bin
  tx = cx.optim.adacomp(bin_size_fc=bin_size)
  state = tx.init({"w": jnp.zeros(shape)})
  residual = np.zeros(shape, np.float32)
  for i in range(4):
    grad = jax.random.normal(jax.random.key(i), shape)
    sent, state = jax.jit(tx.update)({"w": grad}, state)
    ref_sent, residual, k = _compress(residual, grad, bin_size)
    np.testing.assert_array_equal(sent["w"], ref_sent)
    np.testing.assert_array_equal(
        cx.optim.adacomp_residual(state, {"w": grad})["w"], residual)
    assert int(state.sent_elements["w"]) == int(k)
    assert not np.any(np.asarray(state.residual["w"]).reshape(-1)[91:])


def test_a_residual_of_the_wrong_layout_names_the_leaf():
  tx = cx.optim.adacomp(bin_size_fc=10)
  params = {"layer": {"w": jnp.zeros((7, 13))}}
  state = tx.init(params)
  bad = state._replace(residual={"layer": {"w": jnp.zeros((7, 13))}})
  with pytest.raises(ValueError, match=r"layer.*w.*\(10, 10\)"):
    tx.update(params, bad)


def test_stats_follow_the_documented_accounting():
  params = {"w": jnp.zeros((40, 50)), "b": jnp.zeros((50,))}
  tx = cx.optim.adacomp(bin_size_fc=100)
  state = tx.init(params)
  grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(3), x.shape),
                       params)
  _, state = tx.update(grads, state)
  stats = cx.optim.compression_stats(state)
  k = stats["w"]["sent"]
  assert 0 < k < 2000
  assert stats["w"]["bits"] == k * (math.ceil(math.log2(2000)) + 1) + 32
  assert stats["w"]["dense_bits"] == 32 * 2000
  assert stats["b"]["bits"] == stats["b"]["dense_bits"] == 32 * 50
  fc = cx.optim.compression_stats(state, where="^w$")["total"]
  assert fc["ratio"] == pytest.approx(32 * 2000 / stats["w"]["bits"])
  # Two counter arrays, leaves in tree order ("b", "w"); the trees are views.
  assert state.sent.shape == (2,) and state.bits.shape == (2, 2)
  np.testing.assert_array_equal(state.sent, [50, k])
  np.testing.assert_array_equal(state.bits[1], [32 * 50, 32 * 2000])
  assert int(state.sent_elements["w"]) == k
  assert float(state.sent_bits["w"]) == stats["w"]["bits"]


def test_conv_kernels_use_the_conv_bin_size():
  residual = np.zeros((3, 3, 4, 5), np.float32)
  grad = np.random.default_rng(0).normal(size=residual.shape).astype(np.float32)
  tx = cx.optim.adacomp(bin_size_conv=9, bin_size_fc=1000)
  state = tx.init({"k": jnp.asarray(residual)})
  sent, _ = tx.update({"k": jnp.asarray(grad)}, state)
  _, chosen, _ = _reference(residual, grad, 9)
  np.testing.assert_array_equal(np.asarray(sent["k"]) != 0, chosen)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_bin_size(bad):
  with pytest.raises(ValueError, match="bin_size_fc"):
    cx.optim.adacomp(bin_size_fc=bad)


def test_data_parallel_shard_map_matches_per_device_loop():
  """Each device compresses its own gradient with its own residual; pmean."""
  n = 8
  mesh = Mesh(np.array(jax.devices()[:n]), ("data",))
  params = {"w": jnp.zeros((16, 10)), "b": jnp.zeros((10,))}
  tx = cx.optim.adacomp(bin_size_fc=20, axis_name="data")
  local_tx = cx.optim.adacomp(bin_size_fc=20)
  stacked = jax.tree.map(lambda x: jnp.stack([x] * n), tx.init(params))
  grads = jax.tree.map(
      lambda x: jax.random.normal(jax.random.key(7), (n,) + x.shape), params)

  def body(g, s):
    g, s = jax.tree.map(lambda x: x[0], (g, s))
    sent, s = tx.update(g, s)
    return sent, jax.tree.map(lambda x: x[None], s)

  step = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("data"), P("data")),
                               out_specs=(P(), P("data"))))
  # The reference: every learner on its own (vmap over the device axis), then
  # the mean of what they sent.
  per_device = jax.jit(jax.vmap(local_tx.update))
  ref_state = stacked
  state = jax.device_put(stacked, NamedSharding(mesh, P("data")))
  for i in range(3):
    g_i = jax.tree.map(lambda x: x * (i + 1), grads)
    sent, state = step(g_i, state)
    ref_sent, ref_state = per_device(g_i, ref_state)
    np.testing.assert_allclose(sent["w"], np.mean(ref_sent["w"], 0), rtol=1e-5,
                               atol=1e-7)
    np.testing.assert_array_equal(state.residual["w"], ref_state.residual["w"])
  # Residuals are per device: they differ across the mesh.
  r = np.asarray(state.residual["w"])
  assert r.shape == (n, 8, 20)
  # The per-leaf views of a stacked state keep the device axis.
  np.testing.assert_array_equal(state.sent_elements["w"], state.sent[:, 1])
  assert state.dense_bits["b"].shape == (n,)
  assert not np.array_equal(r[0], r[1])


def test_chained_with_sgd_reduces_a_quadratic():
  target = jax.random.normal(jax.random.key(0), (30, 40))
  params = {"w": jnp.zeros((30, 40))}
  tx = optax.chain(cx.optim.adacomp(bin_size_fc=50), optax.sgd(0.5))
  state = tx.init(params)
  loss = lambda p: jnp.mean((p["w"] - target) ** 2) * 1e3

  @jax.jit
  def step(p, s):
    u, s = tx.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, u), s

  l0 = loss(params)
  for _ in range(60):
    params, state = step(params, state)
  assert loss(params) < 0.05 * l0


def test_adacomp_residual_bad_input_names_the_leaf():
  params = {"layer": {"w": jnp.zeros((7, 13))}, "b": jnp.zeros((13,))}
  state = cx.optim.adacomp(bin_size_fc=10).init(params)
  with pytest.raises(ValueError, match="residual tree does not match"):
    cx.optim.adacomp_residual(state, {"w": jnp.zeros((7, 13))})
  stacked = jax.tree.map(lambda a: jnp.stack([a] * 2), state)
  with pytest.raises(ValueError, match=r"\['layer'\]\['w'\].*stacked over devices"):
    cx.optim.adacomp_residual(stacked, params)
