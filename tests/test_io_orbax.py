"""orbax checkpoints of training state with compressed nodes and optax state."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

import compressax as cx
from compressax import io


@cx.compressed_leaf
@dataclasses.dataclass(frozen=True)
class IoCkptNode(cx.CompressedLeaf):
  """A toy node with codes, a codebook, a mask and bit logits."""
  codes: jax.Array
  centroids: jax.Array
  mask: jax.Array
  logits: jax.Array
  shape: tuple = dataclasses.field(metadata=dict(static=True))
  dtype: np.dtype = dataclasses.field(metadata=dict(static=True))
  bits: int = dataclasses.field(default=4, metadata=dict(static=True))

  def materialize(self):
    v = self.centroids[self.codes]
    return jnp.where(self.mask, v, jnp.zeros((), v.dtype)).astype(self.dtype)


def _state():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  node = IoCkptNode(jax.random.randint(k1, (6, 4), 0, 16, jnp.int32),
                    jax.random.normal(k2, (16,), jnp.float32),
                    jax.random.uniform(k3, (6, 4)) < 0.5,
                    jnp.linspace(-1.0, 1.0, 5, dtype=jnp.float32),
                    (6, 4), jnp.dtype(jnp.bfloat16), 5)
  params = {"layer": {"kernel": node, "bias": jnp.arange(4, dtype=jnp.bfloat16)}}
  float_params = {"w": jnp.ones((6, 4), jnp.float32), "b": jnp.zeros(4, jnp.float32)}
  opt = optax.adam(1e-2)
  adam, rest = opt.init(float_params)
  # Non-trivial moments (optax's update itself trips the strict dtype config).
  adam = adam._replace(count=jnp.int32(3),
                       mu=jax.tree.map(lambda x: x + 0.25, adam.mu),
                       nu=jax.tree.map(lambda x: x + 0.125, adam.nu))
  opt_state = (adam, rest)
  return {"params": params, "opt_state": opt_state, "step": jnp.int32(1)}


def test_save_restore_with_target(tmp_path):
  state = _state()
  path = io.save_checkpoint(tmp_path / "ckpt", state)
  restored = io.restore_checkpoint(path, target=state)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  node = restored["params"]["layer"]["kernel"]
  assert type(node) is IoCkptNode and node.bits == 5 and node.dtype == jnp.bfloat16
  assert type(restored["opt_state"][0]) is optax.ScaleByAdamState
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(node.materialize()),
                                np.asarray(state["params"]["layer"]["kernel"].materialize()))


def test_restore_with_abstract_target_and_without(tmp_path):
  state = _state()
  io.save_checkpoint(tmp_path / "ckpt", state)
  abstract = jax.eval_shape(lambda: state)
  restored = io.restore_checkpoint(tmp_path / "ckpt", target=abstract)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  raw = io.restore_checkpoint(tmp_path / "ckpt")  # plain containers
  np.testing.assert_array_equal(
      np.asarray(raw["params"]["layer"]["kernel"]["codes"]),
      np.asarray(state["params"]["layer"]["kernel"].codes))
