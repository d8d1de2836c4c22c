"""Optax conventions every cx.optim transform keeps (issue 11 items 1, 7, 9).

Compressed nodes in the params pass through untouched; eager updates do not
recompile; hyperparameters may be arrays (``optax.inject_hyperparams``); the
state is found inside any wrapper with ``cx.optim.find_state``; a Flax module
given where a pytree of arrays belongs is a clear error.
"""

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import compressax as cx

_W = jax.random.normal(jax.random.key(0), (16, 8))


def _params():
  k = jax.random.split(jax.random.key(3), 2)
  return {"Dense_0": {"kernel": jax.random.normal(k[0], (16, 8)),
                      "bias": jnp.zeros((8,))},
          "Dense_1": {"kernel": jax.random.normal(k[1], (8, 4)),
                      "bias": jnp.zeros((4,))}}


def _grads(params, t):
  return jax.tree.map(
      lambda x: jax.random.normal(jax.random.fold_in(jax.random.key(9), t),
                                  x.shape, x.dtype), params)


def _mask():
  return cx.prune.magnitude_mask(_params(), 0.5)


def _sgd():
  return optax.sgd(0.05, momentum=0.9)


# name -> (factory, kwargs without the inner optimizer, static_args for
# optax.inject_hyperparams: the ones that set array shapes).
BATTERY = {
    "prune_magnitude": (cx.optim.prune_magnitude,
                        dict(final_sparsity=0.7, begin_step=1, end_step=6,
                             frequency=2), ()),
    "prune_fixed": (lambda inner, mask: cx.optim.prune_fixed(inner, mask),
                    dict(mask=_mask()), ()),
    "prune_nm": (cx.optim.prune_nm, dict(n=2, m=4, axis=0),
                 ("n", "m", "axis")),
    "weight_sharing": (cx.optim.weight_sharing, dict(n_clusters=4), ()),
    "adacomp": (lambda inner, bin_size_fc, bin_size_conv=50: optax.chain(
        cx.optim.adacomp(bin_size_fc=bin_size_fc, bin_size_conv=bin_size_conv),
        inner), dict(bin_size_fc=16), ("bin_size_fc", "bin_size_conv")),
}
STATES = {"prune_magnitude": cx.optim.PruneState,
          "prune_fixed": cx.optim.PruneState,
          "prune_nm": cx.optim.PruneState,
          "weight_sharing": cx.optim.WeightSharingState,
          "adacomp": cx.optim.AdaCompState}


def _make(name, inner=None):
  factory, kw, _ = BATTERY[name]
  return factory(inner or _sgd(), **kw)


# --- item 1: compressed nodes in the params --------------------------------


def _node_tree():
  return {"a": {"kernel": cx.lowrank.factorize(_W, 4)}, "b": {"kernel": _W}}


def _node_grads(params):
  def loss(p):
    return (jnp.sum(jnp.sin(cx.materialize(p["a"]["kernel"])))
            + jnp.sum(jnp.sin(p["b"]["kernel"])))
  return jax.grad(loss)(params)


_NODE_TX = {
    "prune_magnitude": lambda: cx.optim.prune_magnitude(
        _sgd(), final_sparsity=0.5, begin_step=0, end_step=0),
    "prune_fixed": lambda: cx.optim.prune_fixed(
        _sgd(), cx.prune.magnitude_mask(_node_tree(), 0.5, where="b/")),
    "prune_nm": lambda: cx.optim.prune_nm(_sgd(), 2, 4, axis=0),
    "weight_sharing": lambda: cx.optim.weight_sharing(_sgd(), n_clusters=4),
    "adacomp": lambda: optax.chain(cx.optim.adacomp(bin_size_fc=16), _sgd()),
}


@pytest.mark.parametrize("name", sorted(_NODE_TX))
@pytest.mark.parametrize("jit", [False, True])
def test_a_compressed_node_passes_through_the_inner_optimizer(name, jit):
  params = _node_tree()
  tx = _NODE_TX[name]()
  ref = _sgd()
  state, ref_state = tx.init(params), ref.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  for _ in range(2):
    g = _node_grads(params)
    u, state = update(g, state, params)
    want, ref_state = ref.update(g, ref_state, params)
    node = u["a"]["kernel"]
    assert type(node) is cx.lowrank.LowRankArray
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5),
                 node, want["a"]["kernel"])  # fused in jit: FMA roundings
    params = optax.apply_updates(params, u)
  b = np.asarray(params["b"]["kernel"])
  if name.startswith("prune"):
    assert np.mean(b == 0) == 0.5          # the dense leaf was pruned
  if name == "weight_sharing":
    assert len(np.unique(b)) <= 4          # ... or shared


@pytest.mark.parametrize("name", ["prune_magnitude", "prune_fixed", "prune_nm",
                                  "weight_sharing"])
def test_a_node_with_integer_parts_is_a_clear_error(name):
  params = {"a": {"kernel": cx.quantize.quantize(_W, 4)}, "b": {"kernel": _W}}
  grads = jax.grad(lambda p: jnp.sum(cx.materialize(p["a"]["kernel"]))
                   + jnp.sum(p["b"]["kernel"] ** 2), allow_int=True)(params)
  tx = _NODE_TX[name]()
  if name == "prune_fixed":
    tx = cx.optim.prune_fixed(_sgd(), cx.prune.magnitude_mask(params, 0.5,
                                                              where="b/"))
  with pytest.raises(TypeError, match=r"params\['a'\]\['kernel'\]: .*"
                     r"QuantizedArray.*non-floating.*optax\.set_to_zero"):
    tx.update(grads, tx.init(params), params)


def test_helpers_read_state_built_on_a_tree_with_a_node():
  params = _node_tree()
  tx = cx.optim.weight_sharing(0.1, n_clusters=4)
  state = tx.init(params)
  shared = cx.optim.shared_params(params, state)
  assert shared["a"]["kernel"] is params["a"]["kernel"]
  assert len(np.unique(shared["b"]["kernel"])) <= 4
  tx = cx.optim.adacomp(bin_size_fc=16)
  state = tx.init(params)
  res = cx.optim.adacomp_residual(state, params)
  assert res["b"]["kernel"].shape == (16, 8)


@pytest.mark.parametrize("name, make", [
    ("prune_magnitude", lambda: cx.optim.prune_magnitude(
        optax.sgd(0.1), final_sparsity=0.5, begin_step=0, end_step=0,
        where="kernel")),
    ("prune_fixed", lambda: cx.optim.prune_fixed(
        optax.sgd(0.1), cx.prune.magnitude_mask(_node_tree(), 0.5))),
    ("prune_nm", lambda: cx.optim.prune_nm(optax.sgd(0.1), 2, 4,
                                           where="a/kernel")),
    ("weight_sharing", lambda: cx.optim.weight_sharing(
        0.1, n_clusters=4, where=lambda p, x: True)),
    ("adacomp", lambda: cx.optim.adacomp(where="kernel")),
])
def test_a_compressed_node_selected_explicitly_is_a_type_error(name, make):
  params = _node_tree()
  with pytest.raises(TypeError, match=r"params\['a'\]\['kernel'\]: .*"
                     r"compressed node \(LowRankArray\)"):
    tx = make()
    tx.update(_node_grads(params), tx.init(params), params)


# --- item 7: eager updates do not recompile -------------------------------


@contextlib.contextmanager
def _count_compiles():
  events = []

  def listener(event, duration, **kw):
    del duration, kw
    if event == "/jax/core/compile/backend_compile_duration":
      events.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield events
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


@pytest.mark.parametrize("name", sorted(BATTERY))
@pytest.mark.parametrize("inject", [False, True])
def test_eager_updates_compile_once_and_match_jit(name, inject):
  """Also under inject_hyperparams, which rebuilds the transform each step."""
  if inject:
    factory, kw, static = BATTERY[name]
    tx = optax.inject_hyperparams(factory, static_args=static)(_sgd(), **kw)
  else:
    tx = _make(name)
  params = _params()
  grads = [_grads(params, t) for t in range(5)]
  eager_p, eager_s = params, tx.init(params)
  jit_p, jit_s = params, tx.init(params)
  jitted = jax.jit(tx.update)
  compiles = []
  for t in range(5):
    # inject_hyperparams mixes int and float internally: not strict-clean.
    with _count_compiles() as events, jax.numpy_dtype_promotion("standard"):
      u, eager_s = tx.update(grads[t], eager_s, eager_p)
      jax.block_until_ready(u)
    compiles.append(len(events))
    eager_p = optax.apply_updates(eager_p, u)
    with jax.numpy_dtype_promotion("standard"):
      v, jit_s = jitted(grads[t], jit_s, jit_p)
    jit_p = optax.apply_updates(jit_p, v)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6,
                                                         atol=1e-7), u, v)
  assert compiles[1:] == [0, 0, 0, 0], compiles


# --- item 9: array hyperparameters, inject_hyperparams, chains, find_state -


def test_schedule_accepts_arrays_and_still_checks_concrete_values():
  params = _params()
  kw = dict(final_sparsity=0.7, begin_step=1, end_step=6, frequency=2)
  want = cx.optim.prune_magnitude(optax.sgd(0.1), **kw)
  for conv in (jnp.asarray, np.asarray, lambda v: np.array(v)[()]):
    got = cx.optim.prune_magnitude(optax.sgd(0.1),
                                   **{k: conv(v) for k, v in kw.items()})
    p1 = p2 = params
    s1, s2 = want.init(params), got.init(params)
    for t in range(4):
      u1, s1 = want.update(_grads(p1, t), s1, p1)
      u2, s2 = got.update(_grads(p2, t), s2, p2)
      p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    jax.tree.map(np.testing.assert_array_equal, p2, p1)
  with pytest.raises(ValueError, match="end_step"):
    cx.optim.prune_magnitude(optax.sgd(0.1), final_sparsity=0.5,
                             begin_step=jnp.asarray(5), end_step=2)
  with pytest.raises(TypeError, match="begin_step must be an integer"):
    cx.optim.prune_magnitude(optax.sgd(0.1), final_sparsity=0.5,
                             begin_step=jnp.asarray(0.5), end_step=2)


@pytest.mark.parametrize("name", sorted(BATTERY))
@pytest.mark.parametrize("jit", [False, True])
def test_inject_hyperparams_of_the_transform_itself(name, jit):
  factory, kw, static = BATTERY[name]
  tx = optax.inject_hyperparams(factory, static_args=static)(_sgd(), **kw)
  plain = _make(name)
  params = p_ref = _params()
  state, ref_state = tx.init(params), plain.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  for t in range(4):
    with jax.numpy_dtype_promotion("standard"):
      u, state = update(_grads(params, t), state, params)
    v, ref_state = plain.update(_grads(p_ref, t), ref_state, p_ref)
    params, p_ref = optax.apply_updates(params, u), optax.apply_updates(p_ref, v)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6,
                                                       atol=1e-7),
               params, p_ref)
  found = cx.optim.find_state(state, STATES[name])
  want = cx.optim.find_state(ref_state, STATES[name])
  jax.tree.map(np.testing.assert_array_equal, found, want)


def test_a_traced_shape_setting_names_the_static_args():
  params = _params()
  for tx, args in [
      (optax.inject_hyperparams(cx.optim.adacomp)(bin_size_fc=16),
       "'bin_size_conv', 'bin_size_fc'"),
      (optax.inject_hyperparams(cx.optim.prune_nm)(_sgd(), 2, 4, axis=0),
       "'n', 'm', 'axis'")]:
    state = tx.init(params)
    with pytest.raises(TypeError, match=r"sets array shapes.*static_args=\("
                       + args + r"\)"):
      jax.jit(tx.update)(_grads(params, 0), state, params)


@pytest.mark.parametrize("name", sorted(BATTERY))
def test_find_state_inside_chain_multisteps_inject_and_masked(name):
  params = _params()
  inner = optax.inject_hyperparams(optax.sgd)(learning_rate=0.05)
  tx = optax.MultiSteps(
      optax.chain(optax.clip_by_global_norm(10.0), _make(name, inner)),
      every_k_schedule=2)
  state = tx.init(params)
  step = jax.jit(tx.update)
  with jax.numpy_dtype_promotion("standard"):
    for t in range(4):
      u, state = step(_grads(params, t), state, params)
      params = optax.apply_updates(params, u)
  found = cx.optim.find_state(state, STATES[name])
  assert isinstance(found, STATES[name])
  if name.startswith("prune"):
    masks = found.masks
    np.testing.assert_array_equal(
        masks["Dense_0"]["kernel"], np.asarray(params["Dense_0"]["kernel"]) != 0)

  masked = optax.masked(_make(name), lambda p: jax.tree.map(lambda _: True, p))
  found = cx.optim.find_state(masked.init(params), STATES[name])
  assert isinstance(found, STATES[name])


def test_find_state_errors_when_absent_or_ambiguous():
  params = _params()
  state = optax.adam(0.1).init(params)
  with pytest.raises(ValueError, match="no PruneState.*ScaleByAdamState"):
    cx.optim.find_state(state, cx.optim.PruneState)
  keep = jax.tree.map(lambda _: jnp.asarray(True), params)
  tx = cx.optim.prune_fixed(cx.optim.prune_fixed(optax.sgd(0.1), keep), keep)
  with pytest.raises(ValueError, match=r"2 PruneState.*inner_state"):
    cx.optim.find_state(tx.init(params), cx.optim.PruneState)
  with pytest.raises(TypeError, match="a state class"):
    cx.optim.find_state(state, "PruneState")


# --- guards: a Flax module where a pytree of arrays belongs ----------------


def _nnx_model():
  return nnx.Linear(8, 4, rngs=nnx.Rngs(0))


_MODULE_MSG = r"Flax .*Module.*nnx\.state\(model\).*nnx\.split\(model\)"


@pytest.mark.parametrize("model", [_nnx_model, lambda: nn.Dense(4)],
                         ids=["nnx", "linen"])
def test_a_flax_module_is_a_clear_type_error_everywhere(model):
  model = model()
  state = nnx.state(_nnx_model())
  entry_points = {
      "select": lambda: cx.select(model),
      "map_selected": lambda: cx.map_selected(lambda kp, x: x, model),
      "magnitude_mask": lambda: cx.prune.magnitude_mask(model, 0.5),
      "quantize.apply": lambda: cx.quantize.apply(
          model, lambda x: cx.quantize.quantize(x, 4)),
  }
  for name in BATTERY:
    entry_points[name + ".init"] = lambda name=name: _make(name).init(model)
    entry_points[name + ".update"] = lambda name=name: _make(name).update(
        model, _make(name).init(state), state)
  for name, call in entry_points.items():
    if name == "prune_fixed.update":
      continue  # its mask is built for _params(); init is the check
    with pytest.raises(TypeError, match=_MODULE_MSG):
      call()
      pytest.fail(f"{name} accepted a Flax module")


@pytest.mark.parametrize("model", [_nnx_model, lambda: nn.Dense(4)],
                         ids=["nnx", "linen"])
def test_save_rejects_a_flax_module(model, tmp_path):
  with pytest.raises(TypeError, match=_MODULE_MSG):
    cx.save(tmp_path / "m.cx", model())


def test_a_tree_where_one_layer_belongs_says_so():
  tree = {"w": jnp.zeros((4,))}
  with pytest.raises(TypeError, match=r"adacomp_compress: .*one layer.*"
                     r"cx\.optim\.adacomp"):
    cx.optim.adacomp_compress(tree, tree, 2)
