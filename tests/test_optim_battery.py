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
    "diffq_optimizer": lambda inner: cx.optim.diffq_optimizer(
        inner, logit_learning_rate=1e-2),
    # Point gradients sum over a tensor's weights: a smaller step.
    "diff_quant_points": lambda inner: cx.optim.diff_quant_points(
        optax.chain(optax.scale(1e-2), inner)),
}

_DIFFQ = dict(group_size=8)


def _diffq_loss(train):
  # A fixed noise key: the loss is a deterministic function of the tree.
  return cx.optim.diffq_loss(_loss, penalty=1e-3, **_DIFFQ)(
      train, jax.random.key(3))


def _points_loss(points):
  return _loss(cx.optim.points_quantized(_params(), points))


# name -> (the tree the transform trains, its loss); default: params, _loss.
TREES = {
    "diffq_optimizer": (lambda: cx.optim.diffq_init(_params(), min_size=0,
                                                    **_DIFFQ), _diffq_loss),
    "diff_quant_points": (lambda: cx.optim.init_points(_params(), 16,
                                                       method="quantiles"),
                          _points_loss),
}


def _case(name):
  """``(transform factory, initial tree, loss)`` for one battery entry."""
  init, loss = TREES.get(name, (_params, _loss))
  return FACTORIES[name], init(), loss


def _promotion(name):
  # optax's Adam (the logits' optimizer) is not strict-dtype clean.
  return jax.numpy_dtype_promotion(
      "standard" if name == "diffq_optimizer" else "strict")


def _run(tx, params, state, n, step=None, loss=_loss):
  step = step or jax.jit(_step_fn(tx, loss))
  for _ in range(n):
    params, state = step(params, state)
  return params, state


def _step_fn(tx, loss=_loss):
  def step(params, state):
    u, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, u), state
  return step


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_chain_multisteps_inject_hyperparams(name):
  factory, params0, loss = _case(name)
  inner = optax.inject_hyperparams(optax.sgd)(learning_rate=0.05)
  tx = optax.MultiSteps(
      optax.chain(optax.clip_by_global_norm(10.0), factory(inner)),
      every_k_schedule=2)
  # optax's MultiSteps mixes int and float internally: not strict-clean.
  with jax.numpy_dtype_promotion("standard"):
    params, state = _run(tx, params0, tx.init(params0), 6, loss=loss)
  assert int(state.gradient_step) == 3
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))
  assert loss(params) < loss(params0)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_sharded_params_match_unsharded(name):
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
  factory, params, loss = _case(name)
  if name in TREES:  # shard what divides: rows over "data", vectors "model"
    spec = jax.tree.map(
        lambda x: P("data", "model") if x.ndim == 2 else
        P("model") if x.ndim == 1 and x.size and x.size % 2 == 0 else P(),
        params)
  else:
    spec = {"Dense_0": {"kernel": P("data", "model"), "bias": P("model")},
            "Dense_1": {"kernel": P("model", None), "bias": P()}}
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), spec)
  sharded = jax.device_put(params, shardings)
  tx = factory(_sgd())
  with _promotion(name):
    got, _ = _run(tx, sharded, tx.init(sharded), 1, loss=loss)
    want, _ = _run(tx, params, tx.init(params), 1, loss=loss)
  jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim) or
               pytest.fail(f"{name}: sharding lost"), got, shardings)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6), got, want)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_one_trace_and_checkpoint_resume_is_bit_identical(name, tmp_path):
  """10 steps straight == 5 steps, save, restore, 5 more; one trace in all."""
  factory, params, loss = _case(name)
  tx = factory(_sgd())
  traces = []

  def counted(params, state):
    traces.append(1)
    return _step_fn(tx, loss)(params, state)

  step = jax.jit(counted)
  with _promotion(name):
    straight, _ = _run(tx, params, tx.init(params), 10, step)
    half, state = _run(tx, params, tx.init(params), 5, step)
  assert loss(straight) < loss(params)

  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "ckpt", {"params": half, "opt_state": state})
  ckpt.wait_until_finished()
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                        {"params": half, "opt_state": state})
  restored = ckpt.restore(tmp_path / "ckpt", target)
  ckpt.close()
  with _promotion(name):
    resumed, _ = _run(tx, restored["params"], restored["opt_state"], 5, step)
  jax.tree.map(np.testing.assert_array_equal, resumed, straight)
  assert len(traces) == 1
