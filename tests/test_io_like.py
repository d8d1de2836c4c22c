"""``cx.load(path, like=tree)`` gives the caller's containers back."""

import typing

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.core import FrozenDict

import compressax as cx
from compressax import io


def _params():
  k = jax.random.split(jax.random.key(0), 2)
  return {"params": {"Dense_0": {"kernel": jax.random.normal(k[0], (6, 4)),
                                 "bias": jnp.zeros(4)},
                     "Dense_1": {"kernel": jax.random.normal(k[1], (4, 2)),
                                 "bias": jnp.ones(2)}}}


def _same(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def test_linen_dict_and_frozen_dict(tmp_path):
  params = _params()
  io.save(tmp_path / "p.cx", params)
  back = io.load(tmp_path / "p.cx", like=params)
  assert type(back) is dict
  _same(params, back)
  frozen = FrozenDict(params)
  back = io.load(tmp_path / "p.cx", like=frozen)
  assert isinstance(back, FrozenDict)
  assert isinstance(back["params"]["Dense_0"], FrozenDict)
  _same(frozen, back)


class _Pair(typing.NamedTuple):
  w: typing.Any
  rest: typing.Any


def test_namedtuples_lists_and_optax_state(tmp_path):
  params = _params()
  opt = optax.adam(1e-3).init(params)
  tree = {"opt": opt, "pair": _Pair(jnp.arange(3.0), [jnp.ones(2), None]),
          "t": (jnp.int32(4),)}
  io.save(tmp_path / "o.cx", tree)
  plain = io.load(tmp_path / "o.cx")
  assert type(plain["pair"]) is tuple  # the file itself records plain tuples
  back = io.load(tmp_path / "o.cx", like=tree)
  _same(tree, back)
  assert type(back["pair"]) is _Pair and type(back["pair"].rest) is list
  assert type(back["opt"][0]) is type(opt[0])


def test_nnx_state(tmp_path):
  model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)),
                         nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
  state = nnx.state(model, nnx.Param)
  io.save(tmp_path / "s.cx", state)
  other = nnx.state(nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(7)),
                                   nnx.Linear(4, 2, rngs=nnx.Rngs(8))), nnx.Param)
  before = jax.tree.map(np.asarray, nnx.to_pure_dict(other))
  back = io.load(tmp_path / "s.cx", like=other)
  assert isinstance(back, nnx.State)
  _same(nnx.to_pure_dict(state), nnx.to_pure_dict(back))
  _same(before, nnx.to_pure_dict(other))  # `like` itself is untouched
  fresh = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(9)),
                         nnx.Linear(4, 2, rngs=nnx.Rngs(9)))
  nnx.update(fresh, back)
  x = jnp.ones((1, 3))
  np.testing.assert_array_equal(fresh(x), model(x))


def test_compressed_nodes_stay_nodes(tmp_path):
  params = _params()
  q = cx.quantize.apply(params, lambda x: cx.quantize.quantize(x, 4))
  io.save(tmp_path / "q.cx", q)
  back = io.load(tmp_path / "q.cx", like=params)
  node = back["params"]["Dense_0"]["kernel"]
  assert isinstance(node, cx.quantize.QuantizedArray)
  np.testing.assert_array_equal(node.materialize(),
                                q["params"]["Dense_0"]["kernel"].materialize())


@pytest.mark.parametrize("edit, match", [
    (lambda p: p["params"].pop("Dense_1"),
     r"params: the file and `like` disagree: keys only in `like`: \[\], only "
     r"in the file: \['Dense_1'\]"),
    (lambda p: p["params"]["Dense_0"].__setitem__("bias", jnp.zeros(5)),
     r"params/Dense_0/bias: .*shape \[5\] in `like`, \[4\] in the file"),
    (lambda p: p["params"]["Dense_0"].__setitem__("bias", jnp.zeros(4, jnp.int32)),
     r"params/Dense_0/bias: .*dtype int32 in `like`, float32 in the file"),
    (lambda p: p["params"].__setitem__("Dense_0", [1, 2]),
     r"params/Dense_0: .*`like` has a list, the file a dict"),
])
def test_disagreement_names_the_path(tmp_path, edit, match):
  params = _params()
  io.save(tmp_path / "p.cx", params)
  like = _params()
  edit(like)
  with pytest.raises(ValueError, match=match):
    io.load(tmp_path / "p.cx", like=like)
