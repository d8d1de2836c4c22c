"""apply_mask, MaskedArray nodes, sparsity statistics and the schedule (cx.prune)."""

import dataclasses

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import compressax as cx


@cx.compressed_leaf
@dataclasses.dataclass(frozen=True)
class _PruneTestHalves(cx.CompressedLeaf):
  """A toy compressed value: float16 storage of a float32 array."""
  values: jax.Array
  shape: tuple = dataclasses.field(metadata=dict(static=True))
  dtype: np.dtype = dataclasses.field(metadata=dict(static=True))

  def materialize(self):
    return self.values.astype(self.dtype)

  def storage_bits(self):
    return 16 * self.size


def params():
  k = jax.random.split(jax.random.key(0), 2)
  return {"a": {"kernel": jax.random.normal(k[0], (6, 4)), "bias": jnp.arange(4.0)},
          "b": {"kernel": jax.random.normal(k[1], (4, 2))}}


# --------------------------------------------------------------- apply_mask
def test_apply_mask_zeroes_exactly_the_pruned():
  p = params()
  mask = cx.prune.magnitude_mask(p, 0.5)
  out = cx.prune.apply_mask(p, mask)
  assert out["a"]["bias"] is p["a"]["bias"]  # 0-d True: same object
  for name in ("a", "b"):
    w, m, o = (np.asarray(t[name]["kernel"], np.float32) for t in (p, mask, out))
    np.testing.assert_array_equal(o, np.where(m, w, 0))
    assert out[name]["kernel"].dtype == p[name]["kernel"].dtype
  jitted = jax.jit(cx.prune.apply_mask)(p, mask)
  jax.tree.map(np.testing.assert_array_equal, jitted, out)
  # bfloat16 keeps its dtype (selected explicitly: see the report on default_rule)
  half = {"w": p["a"]["kernel"].astype(jnp.bfloat16)}
  hm = cx.prune.magnitude_mask(half, 0.5, where="w")
  hout = cx.prune.apply_mask(half, hm)["w"]
  assert hout.dtype == jnp.bfloat16 and int((hout != 0).sum()) == 12


def test_apply_mask_broadcast_and_scalar_false():
  w = jnp.arange(6.0).reshape(2, 3)
  out = cx.prune.apply_mask({"w": w}, {"w": np.array([[True, False, True]])})
  np.testing.assert_array_equal(out["w"], [[0, 0, 2], [3, 0, 5]])
  out = cx.prune.apply_mask({"w": w}, {"w": np.zeros((), bool)})
  np.testing.assert_array_equal(out["w"], np.zeros((2, 3)))


def test_apply_mask_errors_name_the_leaf():
  p = {"a": {"kernel": jnp.ones((2, 2))}, "b": jnp.ones(3)}
  with pytest.raises(ValueError, match=r"params\['b'\]: the mask tree has no entry"):
    cx.prune.apply_mask(p, {"a": {"kernel": np.ones((2, 2), bool)}})
  with pytest.raises(ValueError, match=r"mask\['c'\]: no such leaf"):
    cx.prune.apply_mask(p, {"a": {"kernel": np.ones((2, 2), bool)}, "b": True, "c": True})
  with pytest.raises(TypeError, match=r"params\['b'\]: mask must be bool"):
    cx.prune.apply_mask(p, {"a": {"kernel": True}, "b": np.ones(3, np.float32)})
  with pytest.raises(ValueError, match=r"params\['a'\]\['kernel'\]: mask of shape \(3,\)"):
    cx.prune.apply_mask(p, {"a": {"kernel": np.ones(3, bool)}, "b": True})
  with pytest.raises(ValueError, match=r"mask of shape \(2, 3\)"):
    cx.prune.apply_mask(p, {"a": {"kernel": np.ones((2, 3), bool)}, "b": True})


# -------------------------------------------------------------- MaskedArray
@given(hnp.arrays(np.float32, st.sampled_from([(3, 4), (5,), (2, 2, 2)]),
                  elements=st.floats(-4, 4, width=32)),
       st.integers(0, 2**31 - 1))
def test_masked_array_round_trip_and_bits(w, seed):
  m = np.random.default_rng(seed).random(w.shape) < 0.5
  node = cx.prune.mask_to_nodes({"w": jnp.asarray(w)}, {"w": m})["w"]
  assert isinstance(node, cx.prune.MaskedArray)
  assert node.shape == w.shape and node.dtype == np.float32
  np.testing.assert_array_equal(node.materialize(), np.where(m, w, 0))
  np.testing.assert_array_equal(np.asarray(node.value)[~m], 0)  # nothing leaks
  assert node.storage_bits() == 32 * m.sum() + w.size
  assert cx.storage_bits(node) == node.storage_bits()


def test_masked_array_wraps_compressed_value_and_jits():
  w = jax.random.normal(jax.random.key(1), (4, 4))
  inner = _PruneTestHalves(w.astype(jnp.float16), (4, 4), np.dtype("float32"))
  mask = np.arange(16).reshape(4, 4) % 3 == 0
  node = cx.prune.apply_mask({"w": inner}, {"w": mask})["w"]
  assert isinstance(node, cx.prune.MaskedArray) and node.value is inner
  expect = np.where(mask, np.asarray(w.astype(jnp.float16), np.float32), 0)
  np.testing.assert_array_equal(node.materialize(), expect)
  assert node.storage_bits() == 16 * 16 + 16
  tree = {"w": node, "b": jnp.ones(2)}
  dense = jax.jit(cx.materialize)(tree)
  np.testing.assert_array_equal(dense["w"], expect)
  # selection treats nodes as leaves: a mask over a tree of nodes
  again = cx.prune.magnitude_mask(tree, 0.5)
  assert again["w"].shape == (4, 4) and int(again["w"].sum()) == 8


# -------------------------------------------------------------------- stats
def test_sparsity_stats_on_masks_params_and_nodes():
  p = params()
  mask = cx.prune.magnitude_mask(p, 0.75)
  ref = {"a/kernel": (24, 6), "b/kernel": (8, 2)}
  for t in (mask, cx.prune.apply_mask(p, mask), cx.prune.mask_to_nodes(p, mask)):
    st_ = cx.prune.sparsity_stats(t)
    assert {k: (v["size"], v["kept"]) for k, v in st_["leaves"].items()} == ref
    assert st_["global"] == {"size": 32, "kept": 8, "sparsity": 1 - 8 / 32}
  assert cx.prune.sparsity_stats(p, where="bias")["leaves"]["a/bias"]["kept"] == 3


# ----------------------------------------------------------------- schedule
def ref_schedule(t, si, sf, t0, t1, dt, power):
  if t < t0:
    return si
  if t >= t1:
    return sf
  te = t0 + ((t - t0) // dt) * dt
  return sf + (si - sf) * (1 - (te - t0) / (t1 - t0)) ** power


@pytest.mark.parametrize("si,sf,t0,t1,dt,power", [
    (0.0, 0.9, 10, 110, 1, 3), (0.2, 0.95, 0, 50, 5, 3), (0.5, 0.5, 3, 9, 2, 2),
    (0.0, 0.8, 20, 20, 1, 3)])
def test_schedule_matches_formula(si, sf, t0, t1, dt, power):
  steps = np.arange(0, t1 + 15)
  got = jax.jit(jax.vmap(lambda t: cx.prune.polynomial_schedule(
      t, initial_sparsity=si, final_sparsity=sf, begin_step=t0, end_step=t1,
      frequency=dt, power=power)))(jnp.asarray(steps))
  ref = [ref_schedule(t, si, sf, t0, t1, dt, power) for t in steps]
  np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
  assert got.dtype == jnp.float32
  eager = cx.prune.polynomial_schedule(
      int(steps[len(steps) // 2]), initial_sparsity=si, final_sparsity=sf,
      begin_step=t0, end_step=t1, frequency=dt, power=power)
  np.testing.assert_allclose(eager, ref[len(steps) // 2], rtol=1e-6, atol=1e-6)


def test_schedule_errors():
  kw = dict(final_sparsity=0.9, begin_step=0, end_step=10)
  with pytest.raises(ValueError, match="end_step"):
    cx.prune.polynomial_schedule(0, final_sparsity=0.9, begin_step=10, end_step=5)
  with pytest.raises(ValueError, match=r"final_sparsity: sparsity must be in"):
    cx.prune.polynomial_schedule(0, final_sparsity=1.0, begin_step=0, end_step=5)
  with pytest.raises(ValueError, match=r"initial_sparsity: sparsity must be in"):
    cx.prune.polynomial_schedule(0, initial_sparsity=-0.1, **kw)
  with pytest.raises(ValueError, match="frequency"):
    cx.prune.polynomial_schedule(0, frequency=0, **kw)
  with pytest.raises(ValueError, match="power"):
    cx.prune.polynomial_schedule(0, power=0, **kw)
