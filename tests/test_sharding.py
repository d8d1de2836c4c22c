"""Every transform keeps its input's sharding, and its values bit for bit.

Four meshes over the 8 host devices of ``conftest.py``: a classic ``Mesh``
(automatic axes, ``NamedSharding`` inputs) and an explicit-axes
``jax.make_mesh``, each 1-D ``('data',)`` and 2-D ``('data', 'model')``.
Each result is compared with the same call on unsharded inputs
(``assert_array_equal``: bit for bit) and its sharding with the input's.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import compressax as cx

MESHES = ["classic-1d", "classic-2d", "explicit-1d", "explicit-2d"]
TWO_D = ["classic-2d", "explicit-2d"]


def _on(meshes, name, values):
  """Parametrize ``env`` (indirect) and ``name``: each value on ``meshes``.

  The full grid of meshes and options compiles too much for a 2-core CI
  machine; every option runs on both 2-D meshes (classic and explicit), the
  first one also on the 1-D meshes.
  """
  combos = [(m, v) for i, v in enumerate(values)
            for m in (meshes if i == 0 else TWO_D)]
  return pytest.mark.parametrize(
      f"env,{name}", combos, indirect=["env"],
      ids=[f"{m}-{v}" for m, v in combos])


def _mesh(kind):
  shape, names = ((8,), ("data",)) if kind.endswith("1d") else (
      (2, 4), ("data", "model"))
  if kind.startswith("explicit"):
    return jax.make_mesh(shape, names, axis_types=(AxisType.Explicit,) * len(shape))
  return Mesh(np.array(jax.devices()[:8]).reshape(shape), names)


def _specs(kind):
  """(kernel spec, bias spec): both mesh axes used on the 2-D mesh."""
  if kind.endswith("1d"):
    return P(None, "data"), P("data")
  return P("data", "model"), P("model")


def _params():
  k = jax.random.split(jax.random.key(0), 4)
  return {"dense": {"kernel": jax.random.normal(k[0], (16, 32)),
                    "bias": 0.1 * jax.random.normal(k[1], (32,))},
          "out": {"kernel": jax.random.normal(k[2], (32, 8)),
                  "bias": 0.1 * jax.random.normal(k[3], (8,))}}


@pytest.fixture(params=MESHES)
def env(request):
  """(mesh, sharded params, unsharded params); the mesh is set for the test."""
  kind = request.param
  mesh = _mesh(kind)
  kspec, bspec = _specs(kind)
  plain = _params()
  sharded = jax.tree.map(
      lambda x: jax.device_put(x, NamedSharding(mesh, kspec if x.ndim == 2 else bspec)),
      plain)
  with jax.set_mesh(mesh):
    yield mesh, sharded, plain


def _assert_same(got, want, ref):
  """``got`` equals ``want`` bit for bit and is sharded like ``ref``."""
  assert got.dtype == want.dtype and got.shape == want.shape
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  _assert_sharded_like(got, ref)


def _assert_sharded_like(got, ref):
  assert got.sharding.is_equivalent_to(ref.sharding, ref.ndim), (
      f"sharding {got.sharding} != input's {ref.sharding}")
  assert jax.typeof(got).sharding.spec == jax.typeof(ref).sharding.spec


def _assert_tree_same(got, want, ref):
  for g, w, r in zip(jax.tree.leaves(got), jax.tree.leaves(want),
                     jax.tree.leaves(ref)):
    if np.ndim(g) == np.ndim(r) and np.ndim(g):
      _assert_same(g, w, r)
    else:  # a 0-d keep-all marker
      np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def _replicated(mesh):
  return NamedSharding(mesh, P())


@_on(MESHES, "scope_method", [("layer", "bisect"), ("layer", "sort"),
                               ("global", None)])
def test_magnitude_mask(env, scope_method):
  scope, method = scope_method
  _, params, plain = env
  got = cx.prune.magnitude_mask(params, 0.6, scope=scope, method=method)
  want = cx.prune.magnitude_mask(plain, 0.6, scope=scope, method=method)
  _assert_tree_same(got, want, params)


def test_magnitude_mask_ties_bisect(env):
  # Many equal magnitudes: the tie rule (earlier index first) needs the
  # running count of ties in row-major order across the shards.
  _, params, plain = env
  tie = jax.tree.map(lambda x: jnp.round(x * 2) / 2, params)
  tie_plain = jax.tree.map(lambda x: jnp.round(x * 2) / 2, plain)
  got = cx.prune.magnitude_mask(tie, 0.5, method="bisect")
  want = cx.prune.magnitude_mask(tie_plain, 0.5, method="bisect")
  _assert_tree_same(got, want, tie)


def test_apply_mask_and_mask_to_nodes(env):
  mesh, params, plain = env
  mask = cx.prune.magnitude_mask(plain, 0.5)
  # A mask built elsewhere (replicated) still gives the params' sharding.
  rep = jax.tree.map(lambda m: jax.device_put(m, _replicated(mesh)), mask)
  _assert_tree_same(cx.prune.apply_mask(params, rep),
                    cx.prune.apply_mask(plain, mask), params)
  nodes = cx.prune.mask_to_nodes(params, rep)
  want = cx.prune.mask_to_nodes(plain, mask)
  node, ref = nodes["dense"]["kernel"], params["dense"]["kernel"]
  _assert_same(node.value, want["dense"]["kernel"].value, ref)
  _assert_same(node.mask, want["dense"]["kernel"].mask, ref)
  _assert_same(node.materialize(), want["dense"]["kernel"].materialize(), ref)


def test_random_mask(env):
  _, params, plain = env
  key = jax.random.key(3)
  _assert_tree_same(cx.prune.random_mask(params, 0.7, key),
                    cx.prune.random_mask(plain, 0.7, key), params)


@_on(MESHES, "axis", [-1, 0])
def test_nm_mask(env, axis):
  _, params, plain = env
  w, w0 = params["dense"]["kernel"], plain["dense"]["kernel"]
  _assert_same(cx.prune.nm_mask(w, 2, 4, axis=axis),
               cx.prune.nm_mask(w0, 2, 4, axis=axis), w)


@_on(MESHES, "norm", ["l1", "l2"])
def test_channel_mask(env, norm):
  _, params, plain = env
  got = cx.prune.channel_mask(params, 0.5, norm=norm)
  want = cx.prune.channel_mask(plain, 0.5, norm=norm)
  _assert_tree_same(got, want, params)


UNIFORM = [dict(bucket_size=8, axis=-1), dict(bucket_size=64),
           dict(bucket_size=24), dict(), dict(axis=-1),
           dict(axis=0, symmetric=True)]


@_on(MESHES, "kw", UNIFORM)
def test_uniform(env, kw):
  _, params, plain = env
  w, w0 = params["dense"]["kernel"], plain["dense"]["kernel"]
  _assert_same(cx.quantize.uniform(w, 3, **kw), cx.quantize.uniform(w0, 3, **kw), w)
  _assert_same(cx.quantize.uniform_ste(w, 3, **kw),
               cx.quantize.uniform_ste(w0, 3, **kw), w)


@_on(MESHES, "kw", [dict(bucket_size=24), dict(), dict(axis=-1)])
def test_quantize_node(env, kw):
  mesh, params, plain = env
  w, w0 = params["dense"]["kernel"], plain["dense"]["kernel"]
  q, q0 = cx.quantize.quantize(w, 4, **kw), cx.quantize.quantize(w0, 4, **kw)
  _assert_same(q.codes, q0.codes, w)  # codes: the input's sharding
  rep = jax.device_put(jnp.zeros(q0.scale.shape), _replicated(mesh))
  _assert_same(q.scale, q0.scale, rep)  # scales and offsets: replicated
  np.testing.assert_array_equal(np.asarray(q.offset), np.asarray(q0.offset))
  _assert_same(q.materialize(), q0.materialize(), w)
  _assert_same(q.materialize(), cx.quantize.uniform(w, 4, **kw), w)
  tree = cx.quantize.apply(params, functools.partial(cx.quantize.quantize, bits=4))
  _assert_same(tree["out"]["kernel"].codes,
               cx.quantize.quantize(plain["out"]["kernel"], 4).codes,
               params["out"]["kernel"])


def test_kmeans_and_weight_share(env):
  mesh, params, plain = env
  w, w0 = params["dense"]["kernel"], plain["dense"]["kernel"]
  c, codes = cx.quantize.kmeans(w, 8)
  c0, codes0 = cx.quantize.kmeans(w0, 8)
  _assert_same(codes, codes0, w)
  _assert_same(c, c0, jax.device_put(c0, _replicated(mesh)))
  node, node0 = cx.quantize.weight_share(w, 8), cx.quantize.weight_share(w0, 8)
  _assert_same(node.codes, node0.codes, w)
  _assert_same(node.materialize(), node0.materialize(), w)


def test_factorize(env):
  mesh, params, plain = env
  w, w0 = params["dense"]["kernel"], plain["dense"]["kernel"]
  f, f0 = cx.lowrank.factorize(w, 4), cx.lowrank.factorize(w0, 4)
  rows, cols = (tuple(w.sharding.spec) + (None, None))[:2]
  # u keeps the rows' sharding, v the columns'; the rank axis is replicated.
  _assert_same(f.u, f0.u, jax.device_put(f0.u, NamedSharding(mesh, P(rows, None))))
  _assert_same(f.v, f0.v, jax.device_put(f0.v, NamedSharding(mesh, P(None, cols))))
  _assert_same(f.materialize(), f0.materialize(), w)
  g = cx.lowrank.factorize(w, 3, max_rank=8)  # a masked (traced-style) width
  g0 = cx.lowrank.factorize(w0, 3, max_rank=8)
  _assert_same(g.materialize(), g0.materialize(), w)


def _dyadic(params):
  """Params on a grid of 1/8 (many equal magnitudes: the tie rules count)."""
  return jax.tree.map(lambda x: jnp.round(x * 8) / 8, params)


def _train(tx, params, steps=3, loss_params=None):
  """A jitted train step on a quadratic loss; returns params and state.

  The tests feed dyadic params and the loss's own arithmetic (2 (p - 1/4),
  then SGD's 1/8 times it) is exact, so whether XLA contracts it into fused
  multiply-adds (which depends on how the step is partitioned) cannot change
  a bit: any difference is the library's.
  """
  loss_params = loss_params or (lambda p: p)

  def loss(p):
    q = loss_params(p)
    return sum(jnp.sum(jnp.square(x - 0.25)) for x in jax.tree.leaves(q))

  @jax.jit
  def step(p, s):
    g = jax.grad(loss)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  state = tx.init(params)
  for _ in range(steps):
    params, state = step(params, state)
  return params, state


@_on(MESHES, "scope", ["layer", "global"])
def test_prune_magnitude_step(env, scope):
  params, plain = (_dyadic(t) for t in env[1:])

  def tx():
    return cx.optim.prune_magnitude(optax.sgd(0.125), final_sparsity=0.5,
                                    begin_step=0, end_step=2, frequency=1,
                                    scope=scope)
  got, state = _train(tx(), params)
  want, state0 = _train(tx(), plain)
  _assert_tree_same(got, want, params)
  _assert_tree_same(state.masks, state0.masks, params)


def test_prune_nm_and_fixed_step(env):
  params, plain = (_dyadic(t) for t in env[1:])
  got, _ = _train(cx.optim.prune_nm(optax.sgd(0.125), 2, 4, axis=-1), params)
  want, _ = _train(cx.optim.prune_nm(optax.sgd(0.125), 2, 4, axis=-1), plain)
  _assert_tree_same(got, want, params)
  mask = cx.prune.magnitude_mask(plain, 0.5)  # unsharded mask, sharded params
  got, _ = _train(cx.optim.prune_fixed(optax.sgd(0.125), mask), params)
  want, _ = _train(cx.optim.prune_fixed(optax.sgd(0.125), mask), plain)
  _assert_tree_same(got, want, params)


@_on(MESHES, "masked", [True, False])
def test_weight_sharing_step(env, masked):
  params, plain = (_dyadic(t) for t in env[1:])
  mask = cx.prune.magnitude_mask(plain, 0.5) if masked else None

  def tx():
    return cx.optim.weight_sharing(optax.sgd(0.01), n_clusters=4, mask=mask)
  got, state = _train(tx(), params)
  want, state0 = _train(tx(), plain)
  _assert_tree_same(got, want, params)
  _assert_tree_same(state.codes, state0.codes, params)
  np.testing.assert_array_equal(np.asarray(state.centroids["dense"]["kernel"]),
                                np.asarray(state0.centroids["dense"]["kernel"]))
  _assert_tree_same(cx.optim.shared_params(got, state),
                    cx.optim.shared_params(want, state0), params)


@pytest.mark.filterwarnings("ignore:cx.optim.quantized_params:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:cx.optim.finalize:DeprecationWarning")
@_on(MESHES, "bucket_size", [64, None])
def test_quantized_params_step(env, bucket_size):
  params, plain = (_dyadic(t) for t in env[1:])
  qp = functools.partial(cx.optim.quantized_params, bits=4, bucket_size=bucket_size)
  got, _ = _train(optax.sgd(0.125), params, loss_params=qp)
  want, _ = _train(optax.sgd(0.125), plain, loss_params=qp)
  _assert_tree_same(got, want, params)
  final = cx.optim.finalize(got, 4, bucket_size=bucket_size)
  _assert_same(final["dense"]["kernel"].codes,
               cx.optim.finalize(want, 4, bucket_size=bucket_size)["dense"]["kernel"].codes,
               params["dense"]["kernel"])
