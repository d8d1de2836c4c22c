"""One battery for every cx.optim transform: jit without retracing, chain,
MultiSteps, inject_hyperparams, sharded params, checkpoint resume."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import compressax as cx


def _params():
  k = jax.random.split(jax.random.key(0), 2)
  return {"Dense_0": {"kernel": jax.random.normal(k[0], (16, 8)),
                      "bias": jnp.zeros((8,))},
          "Dense_1": {"kernel": jax.random.normal(k[1], (8, 4)),
                      "bias": jnp.zeros((4,))}}


_X = jax.random.normal(jax.random.key(1), (32, 16))
_Y = jax.random.normal(jax.random.key(2), (32, 4))


def _loss(p):
  h = jnp.tanh(_X @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"][None])
  return jnp.mean((h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"][None] - _Y) ** 2)


def _mask():
  return cx.prune.magnitude_mask(_params(), 0.5)


def _sgd():
  return optax.sgd(0.05, momentum=0.9)


FACTORIES = {
    "prune_magnitude": lambda inner: cx.optim.prune_magnitude(
        inner, final_sparsity=0.7, begin_step=1, end_step=6, frequency=2),
    "prune_fixed": lambda inner: cx.optim.prune_fixed(inner, _mask()),
    "prune_nm": lambda inner: cx.optim.prune_nm(inner, 2, 4, axis=0),
    "weight_sharing": lambda inner: cx.optim.weight_sharing(inner, n_clusters=4),
    "adacomp": lambda inner: optax.chain(cx.optim.adacomp(bin_size_fc=16),
                                         inner),
}


def _run(tx, params, state, n, step=None):
  step = step or jax.jit(_step_fn(tx))
  for _ in range(n):
    params, state = step(params, state)
  return params, state


def _step_fn(tx):
  def step(params, state):
    u, state = tx.update(jax.grad(_loss)(params), state, params)
    return optax.apply_updates(params, u), state
  return step


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_chain_multisteps_inject_hyperparams(name):
  inner = optax.inject_hyperparams(optax.sgd)(learning_rate=0.05)
  tx = optax.MultiSteps(
      optax.chain(optax.clip_by_global_norm(10.0), FACTORIES[name](inner)),
      every_k_schedule=2)
  params = _params()
  # optax's MultiSteps mixes int and float internally: not strict-clean.
  with jax.numpy_dtype_promotion("standard"):
    params, state = _run(tx, params, tx.init(params), 6)
  assert int(state.gradient_step) == 3
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))
  assert _loss(params) < _loss(_params())


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_sharded_params_match_unsharded(name):
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
  params = _params()
  spec = {"Dense_0": {"kernel": P("data", "model"), "bias": P("model")},
          "Dense_1": {"kernel": P("model", None), "bias": P()}}
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), spec)
  sharded = jax.device_put(params, shardings)
  tx = FACTORIES[name](_sgd())
  got, _ = _run(tx, sharded, tx.init(sharded), 1)
  want, _ = _run(tx, params, tx.init(params), 1)
  assert got["Dense_0"]["kernel"].sharding.is_equivalent_to(
      shardings["Dense_0"]["kernel"], 2)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6), got, want)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_one_trace_and_checkpoint_resume_is_bit_identical(name, tmp_path):
  """10 steps straight == 5 steps, save, restore, 5 more; one trace in all."""
  tx = FACTORIES[name](_sgd())
  traces = []

  def counted(params, state):
    traces.append(1)
    return _step_fn(tx)(params, state)

  step = jax.jit(counted)
  params = _params()
  straight, _ = _run(tx, params, tx.init(params), 10, step)
  assert _loss(straight) < _loss(params)

  half, state = _run(tx, params, tx.init(params), 5, step)
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "ckpt", {"params": half, "opt_state": state})
  ckpt.wait_until_finished()
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                        {"params": half, "opt_state": state})
  restored = ckpt.restore(tmp_path / "ckpt", target)
  ckpt.close()
  resumed, _ = _run(tx, restored["params"], restored["opt_state"], 5, step)
  jax.tree.map(np.testing.assert_array_equal, resumed, straight)
  assert len(traces) == 1
