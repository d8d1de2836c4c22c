"""PQK (Kim, Chang, Kwak 2021): the in-network teacher and its joint loss."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import compressax as cx

from tests.test_distill import _ce64
from tests.test_distill import _kd64


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {"Dense_0": {"kernel": rng.standard_normal((6, 5)).astype(np.float32),
                      "bias": rng.standard_normal(5).astype(np.float32)},
          "Dense_1": {"kernel": rng.standard_normal((5, 3)).astype(np.float32),
                      "bias": rng.standard_normal(3).astype(np.float32)}}


def _mask(params, seed=1):
  rng = np.random.default_rng(seed)
  return {k: {"kernel": rng.random(v["kernel"].shape) < 0.4, "bias": np.ones((), bool)}
          for k, v in params.items()}


def test_teacher_matches_numpy_and_routes_gradients():
  dense = _params(0)
  mask = _mask(dense)
  student = cx.prune.apply_mask(_params(2), mask)
  teacher = cx.distill.pqk_teacher(student, dense, mask)
  for layer in dense:
    m = mask[layer]["kernel"]
    want = np.where(m, np.asarray(student[layer]["kernel"]), dense[layer]["kernel"])
    np.testing.assert_array_equal(np.asarray(teacher[layer]["kernel"]), want)
    assert teacher[layer]["bias"] is student[layer]["bias"]  # unpruned: the student's

  def loss(s, d):
    t = cx.distill.pqk_teacher(s, d, mask)
    return sum(jnp.sum(jnp.sin(x)) for x in jax.tree_util.tree_leaves(t))

  gs, gd = jax.grad(loss, argnums=(0, 1))(student, dense)
  for layer in dense:
    m = mask[layer]["kernel"]
    t = np.asarray(teacher[layer]["kernel"], np.float64)
    np.testing.assert_allclose(np.asarray(gs[layer]["kernel"]), np.where(m, np.cos(t), 0),
                               rtol=1e-6)
    np.testing.assert_allclose(np.asarray(gd[layer]["kernel"]), np.where(m, 0, np.cos(t)),
                               rtol=1e-6)
    assert not np.any(np.asarray(gd[layer]["bias"]))  # the teacher's bias is the student's


def test_teacher_jit_equals_eager():
  dense, mask = _params(0), _mask(_params(0))
  student = _params(3)
  eager = cx.distill.pqk_teacher(student, dense, mask)
  jitted = jax.jit(cx.distill.pqk_teacher)(student, dense, mask)
  for a, b in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_loss_matches_numpy_and_stops_teacher_gradient_in_kd():
  rng = np.random.default_rng(0)
  s = rng.standard_normal((4, 7)).astype(np.float32)
  t = rng.standard_normal((4, 7)).astype(np.float32)
  y = rng.integers(0, 7, 4)
  alpha, temp = 0.3, 3.0
  got = cx.distill.pqk_loss(s, t, y, alpha=alpha, temperature=temp)
  want = (_ce64(t, y) + alpha * _kd64(s, t, temp) + (1 - alpha) * _ce64(s, y))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
  # d/dt is the teacher's cross-entropy gradient alone: softmax(t) - onehot.
  gt = jax.grad(lambda t: cx.distill.pqk_loss(s, t, y, alpha=alpha,
                                              temperature=temp).sum())(t)
  p = np.exp(t - t.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(gt), p - np.eye(7)[y], atol=1e-6)


def test_bad_trees_name_the_leaf():
  dense, mask = _params(0), _mask(_params(0))
  student = _params(3)
  bad = jax.tree_util.tree_map(lambda x: x, dense)
  bad["Dense_1"]["kernel"] = np.zeros((3, 5), np.float32)
  with pytest.raises(ValueError, match=r"Dense_1.*kernel"):
    cx.distill.pqk_teacher(student, bad, mask)
  bad = {"Dense_0": dense["Dense_0"]}
  with pytest.raises(ValueError, match="Dense_1"):
    cx.distill.pqk_teacher(student, bad, mask)
  wrong = jax.tree_util.tree_map(lambda m: np.asarray(m, np.float32), mask)
  with pytest.raises(TypeError, match="bool"):
    cx.distill.pqk_teacher(student, dense, wrong)
  node = dict(student, Dense_0=dict(student["Dense_0"],
                                    kernel=cx.quantize.quantize(student["Dense_0"]["kernel"], 4)))
  with pytest.raises(TypeError, match=r"Dense_0.*kernel"):
    cx.distill.pqk_teacher(node, dense, mask)


class _MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.relu(nn.Dense(16)(x)))


def test_training_both_improves_student_and_trains_unimportant_weights():
  """The two networks train jointly: the student's loss falls, the teacher's
  unimportant weights move, and the student's pruned weights stay zero."""
  key = jax.random.PRNGKey(0)
  x = jax.random.normal(key, (128, 6))
  y = (x[:, 0] > 0).astype(jnp.int32) + (x[:, 1] > 0.5).astype(jnp.int32)
  model = _MLP()
  dense = model.init(jax.random.PRNGKey(1), x)["params"]
  mask = jax.tree_util.tree_map(
      lambda w: np.ones((), bool) if w.ndim == 1 else np.abs(np.asarray(w)) > 0.3, dense)
  student = cx.prune.apply_mask(dense, mask)
  tree = {"s": student, "u": dense}

  def loss(tree):
    s = cx.prune.apply_mask(tree["s"], mask)
    t = cx.distill.pqk_teacher(s, tree["u"], mask)
    return cx.distill.pqk_loss(model.apply({"params": s}, x),
                               model.apply({"params": t}, x), y).mean()

  def student_ce(tree):
    s = cx.prune.apply_mask(tree["s"], mask)
    return float(cx.distill.cross_entropy(model.apply({"params": s}, x), y).mean())

  tx = optax.sgd(0.1)
  state = tx.init(tree)
  before = student_ce(tree)
  for _ in range(50):
    g = jax.grad(loss)(tree)
    updates, state = tx.update(g, state)
    tree = optax.apply_updates(tree, updates)
  assert student_ce(tree) < 0.8 * before
  k0 = mask["Dense_0"]["kernel"]
  moved = np.asarray(tree["u"]["Dense_0"]["kernel"] - dense["Dense_0"]["kernel"])
  assert np.abs(moved[~k0]).max() > 1e-3 and not np.any(moved[k0])
