"""The leaf-selection mechanism shared by every transform."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import compressax as cx
from compressax import _checks


class _MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Embed(10, 4)(x)
    x = nn.Dense(8)(x)
    x = nn.LayerNorm()(x)
    return nn.Conv(3, (3,))(x)


def _linen_params():
  return _MLP().init(jax.random.key(0), jnp.zeros((2, 5), jnp.int32))


def _true_paths(tree, where=None):
  return [cx.path_str(p) for p, _ in cx.selected_leaves(tree, where)]


def test_default_rule_linen():
  assert _true_paths(_linen_params()) == [
      "params/Conv_0/kernel", "params/Dense_0/kernel"]


def test_default_rule_nnx_state():
  class M(nnx.Module):
    def __init__(self, rngs):
      self.lin = nnx.Linear(4, 3, rngs=rngs)
      self.norm = nnx.LayerNorm(3, rngs=rngs)
      self.emb = nnx.Embed(7, 4, rngs=rngs)
      self.blocks = nnx.List([nnx.Linear(3, 3, rngs=rngs)])

  _, state = nnx.split(M(nnx.Rngs(0)))
  assert _true_paths(state) == ["blocks/0/kernel", "lin/kernel"]
  # map_selected keeps the State type and leaves the rest untouched.
  out = cx.map_selected(lambda p, x: x * 0, state)
  assert isinstance(out, nnx.State)
  flat_in = dict(jax.tree_util.tree_leaves_with_path(state))
  for p, x in jax.tree_util.tree_leaves_with_path(out):
    if cx.path_str(p) in ("blocks/0/kernel", "lin/kernel"):
      assert not np.any(np.asarray(x))
    else:
      assert x is flat_in[p]


def test_plain_nested_and_regex_and_predicate():
  tree = {"a": [np.ones((2, 2), np.float32), np.ones(3, np.float32)],
          "b": (np.ones((2, 2), np.int32), {"c": np.ones((4, 1), np.float32)})}
  assert _true_paths(tree) == ["a/0", "b/1/c"]
  assert _true_paths(tree, r"^a/") == ["a/0", "a/1"]
  assert _true_paths(tree, lambda p, x: x.ndim == 1) == ["a/1"]
  sel = cx.select(tree)
  assert _true_paths(tree, sel) == ["a/0", "b/1/c"]


def test_untouched_leaves_are_same_objects():
  params = _linen_params()
  out = cx.map_selected(lambda p, x: x + 1, params)
  assert out["params"]["Dense_0"]["bias"] is params["params"]["Dense_0"]["bias"]
  assert out["params"]["Embed_0"]["embedding"] is params["params"]["Embed_0"]["embedding"]
  np.testing.assert_array_equal(out["params"]["Dense_0"]["kernel"],
                                params["params"]["Dense_0"]["kernel"] + 1)


def test_mismatched_bool_tree_is_an_error():
  tree = {"a": np.ones((2, 2)), "b": np.ones((2, 2))}
  with pytest.raises(ValueError, match="structure"):
    cx.select(tree, {"a": True})
  with pytest.raises(ValueError, match="structure"):
    cx.map_selected(lambda p, x, m: x, tree, {"a": np.ones(1)})


def test_map_selected_under_jit():
  params = _linen_params()
  f = jax.jit(lambda t: cx.map_selected(lambda p, x: 2 * x, t))
  out = f(params)
  np.testing.assert_array_equal(out["params"]["Conv_0"]["kernel"],
                                2 * params["params"]["Conv_0"]["kernel"])


def test_error_messages_name_the_leaf():
  params = {"Dense_0": {"kernel": jnp.ones((2, 2))}}
  (path, leaf), = cx.selected_leaves(params)
  with pytest.raises(ValueError, match=r"params\['Dense_0'\]\['kernel'\]: sparsity "
                     r"must be in \[0.0, 1.0\), got 1.2"):
    _checks.check_sparsity(path, 1.2)
  with pytest.raises(TypeError, match=r"params\['Dense_0'\]\['kernel'\]"):
    _checks.check_floating(path, jnp.ones((2, 2), jnp.int32))
  with pytest.raises(ValueError, match="NaN/Inf"):
    _checks.check_finite(path, jnp.array([1.0, jnp.nan]))
  with pytest.raises(ValueError, match="bits must be in"):
    _checks.check_bits(path, 17)
  _checks.check_bits(path, jnp.float32(3))  # a concrete array is checked, fine


@cx.compressed_leaf
@dataclasses.dataclass(frozen=True)
class _Halves(cx.CompressedLeaf):
  """A toy node for the protocol test: stores float16 values."""
  values: jax.Array
  shape: tuple = dataclasses.field(metadata=dict(static=True))
  dtype: np.dtype = dataclasses.field(metadata=dict(static=True))

  def materialize(self):
    return self.values.astype(self.dtype).reshape(self.shape)

  def storage_bits(self):
    return 16 * self.size


def test_compressed_leaf_protocol():
  x = jnp.arange(6, dtype=jnp.float32).reshape(2, 3)
  node = _Halves(x.astype(jnp.float16), (2, 3), np.dtype("float32"))
  tree = {"w": node, "b": jnp.ones(3)}
  assert cx.storage_bits(node) == 96 and cx.storage_bits(tree["b"]) == 96
  dense = jax.jit(cx.materialize)(tree)
  np.testing.assert_array_equal(dense["w"], x)
  assert dense["w"].dtype == jnp.float32
  # nodes are leaves for selection; default rule sees their shape and dtype
  assert _true_paths(tree) == ["w"]
  assert node.data().keys() == {"values"} and node.meta()["shape"] == (2, 3)
  with pytest.raises(TypeError):
    cx.compressed_leaf(int)
