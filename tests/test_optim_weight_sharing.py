"""Weight sharing (Deep Compression stage 2): segment-sum centroid updates."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import compressax as cx


def _params(seed=0):
  k = jax.random.split(jax.random.key(seed), 2)
  return {"w": jax.random.normal(k[0], (9, 7)), "b": jnp.zeros((7,)),
          "v": jax.random.normal(k[1], (7, 5))}


def _grads(params, i):
  return jax.tree.map(
      lambda x: jax.random.normal(jax.random.key(50 + i), x.shape), params)


def test_centroid_update_is_the_segment_sum_of_gradients():
  lr, k = 0.05, 6
  params = _params()
  tx = cx.optim.weight_sharing(lr, n_clusters=k)
  state = tx.init(params)
  c_ref, codes_ref = cx.quantize.kmeans(params["w"], k)
  np.testing.assert_array_equal(state.codes["w"], codes_ref)
  centroids = np.asarray(c_ref, np.float64)
  bias = np.asarray(params["b"], np.float64)
  step = jax.jit(tx.update)
  for i in range(4):
    g = _grads(params, i)
    u, state = step(g, state, params)
    params = optax.apply_updates(params, u)
    codes = np.asarray(codes_ref).ravel()
    seg = np.zeros(k)
    np.add.at(seg, codes, np.asarray(g["w"], np.float64).ravel())
    centroids = centroids - lr * seg          # Han et al., equation 3
    bias = bias - lr * np.asarray(g["b"], np.float64)
    np.testing.assert_allclose(state.centroids["w"], centroids, rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(params["w"], centroids[codes].reshape(9, 7),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(params["b"], bias, rtol=1e-5, atol=1e-6)


_STEPS = {}


def _ws_step(k, lr):
  # One transform (and one compilation) per (k, lr), shared across examples.
  if (k, lr) not in _STEPS:
    tx = cx.optim.weight_sharing(optax.sgd(lr, momentum=0.9), n_clusters=k)
    _STEPS[k, lr] = tx, jax.jit(tx.update)
  return _STEPS[k, lr]


@hypothesis.settings(max_examples=6)
@hypothesis.given(k=st.sampled_from([1, 3, 8]), seed=st.integers(0, 1000),
                  lr=st.sampled_from([1e-3, 3.0]))
def test_params_stay_exactly_on_the_codebook(k, seed, lr):
  params = _params(seed)
  tx, step = _ws_step(k, lr)
  state = tx.init(params)
  params = cx.optim.snap_to_codebook(params, state)
  for i in range(3):
    u, state = step(_grads(params, i), state, params)
    params = optax.apply_updates(params, u)
    for name in ("w", "v"):
      got = np.asarray(params[name])
      assert len(np.unique(got)) <= k
      np.testing.assert_array_equal(
          got, np.asarray(state.centroids[name])[np.asarray(state.codes[name])])


def test_without_snap_exact_from_the_second_step():
  params = _params()
  tx = cx.optim.weight_sharing(0.01, n_clusters=4)
  state = tx.init(params)
  step = jax.jit(tx.update)
  for i in range(3):
    u, state = step(_grads(params, i), state, params)
    params = optax.apply_updates(params, u)
  np.testing.assert_array_equal(params["w"],
                                cx.optim.shared_params(params, state)["w"])
  assert len(np.unique(np.asarray(params["w"]))) == 4


def test_bits_per_path():
  params = _params()
  tx = cx.optim.weight_sharing(
      0.01, bits=lambda path, leaf: 3 if path == "w" else 2)
  state = tx.init(params)
  assert state.centroids["w"].shape == (8,)
  assert state.centroids["v"].shape == (4,)
  # Trained normally: the one "not here" marker in every side tree.
  assert cx.is_skip(state.codes["b"]) and cx.is_skip(state.centroids["b"])


def test_kmeans_init_per_path():
  params = _params(2)
  seen = []

  def init(path, leaf):
    seen.append((path, leaf.shape))
    return "companding" if path.endswith("w") else "density"

  state = cx.optim.weight_sharing(0.1, n_clusters=4, kmeans_init=init).init(params)
  assert sorted(seen) == [("v", (7, 5)), ("w", (9, 7))]
  for name, how in (("w", "companding"), ("v", "density")):
    c, codes = cx.quantize.kmeans(params[name], 4, init=how)
    np.testing.assert_array_equal(state.centroids[name], c)
    np.testing.assert_array_equal(state.codes[name], codes)
  # The per-leaf choice matters: linear init gives other centroids here.
  c_lin, _ = cx.quantize.kmeans(params["w"], 4, init="linear")
  assert not np.array_equal(state.centroids["w"], c_lin)
  with pytest.raises(ValueError, match=r"^params\['v'\]: .*kmeans_init.*'bogus'"):
    cx.optim.weight_sharing(0.1, n_clusters=4, kmeans_init=lambda p, x: (
        "linear" if p == "w" else "bogus")).init(params)


@pytest.mark.parametrize("kw, match", [
    (dict(bits=0), "bits"),
    (dict(bits=17), "bits"),
    (dict(), "exactly one"),
    (dict(bits=3, n_clusters=8), "exactly one"),
])
def test_bad_configuration(kw, match):
  with pytest.raises(ValueError, match=match):
    cx.optim.weight_sharing(0.1, **kw)


def test_bad_leaf_configuration_names_the_leaf():
  with pytest.raises(ValueError, match=r"params\['v'\].*exceeds the leaf's 35"):
    cx.optim.weight_sharing(0.1, n_clusters=50).init(_params())
  with pytest.raises(ValueError, match=r"params\['v'\].*bits"):
    cx.optim.weight_sharing(
        0.1, bits=lambda p, x: 20 if p == "v" else 2).init(_params())
  with pytest.raises(TypeError, match="GradientTransformation"):
    cx.optim.weight_sharing(object(), n_clusters=4)
  tx = cx.optim.weight_sharing(0.1, n_clusters=4)
  params = _params()
  with pytest.raises(ValueError, match="needs the current params"):
    tx.update(_grads(params, 0), tx.init(params))


def _pruned(seed, sparsity):
  params = _params(seed)
  keep = cx.prune.magnitude_mask(params, sparsity, where=r"w|v")
  return cx.prune.apply_mask(params, keep), keep


@hypothesis.settings(max_examples=5, deadline=None)
@hypothesis.given(seed=st.integers(0, 1000), sparsity=st.sampled_from([0.5, 0.8]),
                  k=st.sampled_from([2, 4]))
def test_mask_clusters_only_kept_weights(seed, sparsity, k):
  params, keep = _pruned(seed, sparsity)
  lr = 0.05
  tx = cx.optim.weight_sharing(lr, n_clusters=k, mask=keep)
  state = tx.init(params)
  m = np.asarray(keep["w"])
  kept = np.asarray(params["w"])[m]
  c_ref, codes_ref = cx.quantize.kmeans(jnp.asarray(kept), k)
  codes = np.asarray(state.codes["w"])
  np.testing.assert_array_equal(codes[m], np.asarray(codes_ref))
  np.testing.assert_array_equal(codes[~m], 0)
  np.testing.assert_array_equal(state.centroids["w"], c_ref)
  # Every cluster holds kept weights: none is spent on the pruned zeros.
  assert len(np.unique(codes[m])) == k
  centroids = np.asarray(c_ref, np.float64)
  step = jax.jit(tx.update)
  for i in range(3):
    g = _grads(params, i)
    u, state = step(g, state, params)
    params = optax.apply_updates(params, u)
    seg = np.zeros(k)                          # Han et al., eq. 3, kept only
    np.add.at(seg, codes[m], np.asarray(g["w"], np.float64)[m])
    centroids = centroids - lr * seg
    np.testing.assert_allclose(state.centroids["w"], centroids, rtol=1e-5,
                               atol=1e-6)
    w = np.asarray(params["w"])
    assert np.all(w[~m] == 0.0)
    np.testing.assert_allclose(w[m], centroids[codes[m]], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(
      cx.optim.shared_params(params, state)["w"], params["w"])


def test_mask_inside_prune_fixed_keeps_zeros_and_uses_all_clusters():
  params, keep = _pruned(3, 0.5)
  tx = cx.optim.prune_fixed(
      cx.optim.weight_sharing(optax.sgd(0.1, momentum=0.9), n_clusters=3,
                              mask=lambda p: keep), keep)
  state = tx.init(params)
  step = jax.jit(tx.update)
  for i in range(4):
    u, state = step(_grads(params, i), state, params)
    params = optax.apply_updates(params, u)
  for name in ("w", "v"):
    m = np.asarray(keep[name])
    w = np.asarray(params[name])
    assert np.all(w[~m] == 0.0)
    assert len(np.unique(w[m])) == 3
  # Still works without a mask (the Deep Compression experiment's call).
  tx = cx.optim.prune_fixed(cx.optim.weight_sharing(0.1, n_clusters=3), keep)
  state = tx.init(params)
  u, _ = jax.jit(tx.update)(_grads(params, 0), state, params)
  assert np.all(np.asarray(optax.apply_updates(params, u)["w"])[
      ~np.asarray(keep["w"])] == 0.0)


def test_mask_errors_name_the_leaf():
  params, keep = _pruned(0, 0.8)             # 'v' keeps 7 of its 35 weights
  with pytest.raises(ValueError, match=r"params\['v'\].*exceeds.*7 kept"):
    cx.optim.weight_sharing(0.1, n_clusters=8, mask=keep).init(params)
  bad = dict(keep, w=np.ones((3, 3), bool))
  with pytest.raises(ValueError, match=r"params\['w'\].*shape"):
    cx.optim.weight_sharing(0.1, n_clusters=2, mask=bad).init(params)

  @jax.jit
  def traced(m):
    return cx.optim.weight_sharing(0.1, n_clusters=2, mask=m).init(params)
  with pytest.raises(ValueError, match=r"concrete"):
    traced(keep)


@pytest.mark.parametrize("k, dtype", [(6, np.uint8), (256, np.uint8),
                                      (257, np.uint16)])
def test_codes_take_the_smallest_unsigned_dtype(k, dtype):
  params = {"w": jax.random.normal(jax.random.key(0), (40, 30))}
  tx = cx.optim.weight_sharing(0.1, n_clusters=k, kmeans_iters=2)
  state = tx.init(params)
  assert state.codes["w"].dtype == dtype
  # Training and reading the shared values work with the narrow codes.
  updates, state = jax.jit(tx.update)(_grads(params, 0), state, params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(
      cx.optim.shared_params(new, state)["w"],
      np.asarray(state.centroids["w"])[np.asarray(state.codes["w"])],
      rtol=1e-6)
