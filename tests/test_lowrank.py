"""Low-rank factorization, rank selection, BSR vs NumPy float64 references."""

from fractions import Fraction

import flax.linen as nn
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import settings

import compressax as cx

L = cx.lowrank


def _mat(seed, shape, dtype=np.float32):
  return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _sv64(w):
  w = np.asarray(w, np.float64)
  return np.linalg.svd(w.reshape(-1, w.shape[-1]), compute_uv=False)


def _decaying(seed, m, n, decay=0.6):
  """A matrix with a geometric spectrum, so ranks matter."""
  rng = np.random.default_rng(seed)
  p, _ = np.linalg.qr(rng.standard_normal((m, m)))
  q, _ = np.linalg.qr(rng.standard_normal((n, n)))
  k = min(m, n)
  return (p[:, :k] * decay ** np.arange(k)) @ q[:, :k].T


# ---------------------------------------------------------------- factorize


# Few distinct sizes: each new shape costs a compilation, the algebra does not
# depend on the size.
_sizes = st.sampled_from([1, 4, 9])


@given(m=_sizes, n=_sizes, seed=st.integers(0, 99), data=st.data())
def test_reconstruction_error_is_discarded_energy(m, n, seed, data):
  r = data.draw(st.integers(1, min(m, n)))
  w = _mat(seed, (m, n))
  f = L.factorize(jnp.asarray(w), r)
  s = _sv64(w)
  err = np.sum((np.asarray(f.materialize(), np.float64) - w) ** 2)
  np.testing.assert_allclose(err, np.sum(s[r:] ** 2), rtol=1e-3,
                             atol=1e-5 * np.sum(s ** 2))
  assert f.u.shape == (m, r) and f.v.shape == (r, n) and f.rank == r
  assert f.storage_bits() == 32 * r * (m + n)


def test_singular_values_are_split_as_square_roots():
  w = _mat(0, (7, 5))
  f = L.factorize(jnp.asarray(w), 3)
  s = _sv64(w)[:3]
  u, v = np.asarray(f.u, np.float64), np.asarray(f.v, np.float64)
  np.testing.assert_allclose(u.T @ u, np.diag(s), atol=1e-4)
  np.testing.assert_allclose(v @ v.T, np.diag(s), atol=1e-4)


def test_conv_kernel_is_factorized_as_hwcin_by_cout():
  k = _mat(1, (3, 3, 4, 6))
  f = L.factorize(jnp.asarray(k), 2)
  assert f.u.shape == (36, 2) and f.v.shape == (2, 6)
  mat = k.reshape(36, 6).astype(np.float64)
  p, s, qt = np.linalg.svd(mat, full_matrices=False)
  ref = ((p[:, :2] * s[:2]) @ qt[:2]).reshape(k.shape)
  out = f.materialize()
  assert out.shape == k.shape and out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref, atol=1e-4)
  assert f.storage_bits() == 32 * 2 * (36 + 6)


def test_bfloat16_leaf_keeps_dtype_with_float32_factors():
  w = jnp.asarray(_mat(2, (8, 4)), jnp.bfloat16)
  f = L.factorize(w, 4)
  assert f.u.dtype == jnp.float32 and f.v.dtype == jnp.float32
  out = f.materialize()
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32),
                             np.asarray(w, np.float32), atol=2e-2)


def test_vmap_over_ranks_equals_loop():
  w = jnp.asarray(_mat(3, (9, 6)))
  ranks = jnp.arange(1, 7)
  batched = jax.vmap(lambda r: L.factorize(w, r).materialize())(ranks)
  for i, r in enumerate(range(1, 7)):
    np.testing.assert_allclose(batched[i], L.factorize(w, r).materialize(),
                               atol=1e-5)


def test_traced_rank_keeps_full_width_and_compacts():
  w = jnp.asarray(_mat(4, (5, 8)))
  f = jax.jit(L.factorize)(w, 2)
  assert f.rank is None and f.u.shape == (5, 5) and f.v.shape == (5, 8)
  assert f.storage_bits() == 32 * 5 * 13
  c = f.compact()
  assert c.rank == 2 and c.u.shape == (5, 2) and c.storage_bits() == 32 * 2 * 13
  np.testing.assert_allclose(c.materialize(), L.factorize(w, 2).materialize(),
                             atol=1e-5)


def test_new_rank_does_not_recompile():
  w = jnp.asarray(_mat(8, (6, 5)))
  traces = []

  def counted(r):
    traces.append(1)
    return L.factorize(w, r).materialize()

  fn = jax.jit(counted)
  for r in (1, 3, 5):
    np.testing.assert_allclose(fn(r), L.factorize(w, r).materialize(),
                               atol=1e-5)
  assert len(traces) == 1


def test_traced_rank_out_of_range_is_clipped():
  w = jnp.asarray(_mat(5, (6, 4)))
  fn = jax.jit(lambda r: L.factorize(w, r).materialize())
  np.testing.assert_allclose(fn(0), L.factorize(w, 1).materialize(), atol=1e-5)
  np.testing.assert_allclose(fn(99), w, atol=1e-5)


def test_max_rank_caps_storage():
  w = jnp.asarray(_mat(6, (10, 7)))
  f = L.factorize(w, 2, max_rank=4)
  assert f.u.shape == (10, 4) and f.rank == 2
  assert f.storage_bits() == 32 * 2 * 17
  np.testing.assert_allclose(f.materialize(), L.factorize(w, 2).materialize(),
                             atol=1e-5)
  with pytest.raises(ValueError, match=r"rank must be in \[1, 4\]"):
    L.factorize(w, 5, max_rank=4)


def test_deterministic_and_jit_matches_eager():
  w = jnp.asarray(_mat(7, (6, 6)))
  a = L.factorize(w, 3)
  b = L.factorize(w, 3)
  np.testing.assert_array_equal(a.u, b.u)
  np.testing.assert_array_equal(a.v, b.v)
  j = jax.jit(lambda x: L.factorize(x, 3))(w)
  np.testing.assert_allclose(j.materialize(), a.materialize(), atol=1e-5)


# ----------------------------------------------------------- rank selection


@given(m=_sizes, n=_sizes, seed=st.integers(0, 99),
       energy=st.floats(0.01, 1.0))
def test_rank_for_energy_meets_target_minimally(m, n, seed, energy):
  w = _mat(seed, (m, n))
  r = L.rank_for_energy(jnp.asarray(w), energy)
  assert isinstance(r, int) and 1 <= r <= min(m, n)
  s2 = _sv64(w) ** 2
  kept = np.concatenate([[0.0], np.cumsum(s2)]) / s2.sum()
  assert kept[r] >= energy - 1e-5
  assert kept[r - 1] < energy + 1e-5


def test_rank_for_energy_vmaps_over_energies():
  w = jnp.asarray(_decaying(0, 8, 6))
  energies = jnp.array([0.3, 0.6, 0.9, 0.99, 1.0])
  batched = jax.vmap(lambda e: L.rank_for_energy(w, e))(energies)
  assert batched.tolist() == [L.rank_for_energy(w, float(e)) for e in energies]


def _ratio_reference(dims, ratio):
  """Brute force over every fraction j/k: the largest feasible one."""
  budget = ratio * sum(m * n for m, n in dims)
  best = [1] * len(dims)
  for f in sorted({Fraction(j, min(d)) for d in dims
                   for j in range(1, min(d) + 1)}):
    ranks = [max(1, int(np.floor(f * min(d)))) for d in dims]
    if sum(r * (m + n) for r, (m, n) in zip(ranks, dims)) <= budget:
      best = ranks
  return best


@given(dims=st.lists(st.tuples(st.integers(2, 16), st.integers(2, 16)),
                     min_size=1, max_size=4),
       ratio=st.floats(0.3, 1.0))
def test_ranks_for_ratio_meets_budget_exactly(dims, ratio):
  params = {f"l{i}": {"kernel": np.zeros(d, np.float32)}
            for i, d in enumerate(dims)}
  budget = ratio * sum(m * n for m, n in dims)
  if sum(m + n for m, n in dims) > budget:
    with pytest.raises(ValueError, match="too small"):
      L.ranks_for_ratio(params, ratio)
    return
  ranks = L.ranks_for_ratio(params, ratio)
  got = [ranks[f"l{i}/kernel"] for i in range(len(dims))]
  assert sum(r * (m + n) for r, (m, n) in zip(got, dims)) <= budget
  assert got == _ratio_reference(dims, ratio)


@given(m=_sizes, n=_sizes, seed=st.integers(0, 99))
def test_stable_rank_matches_numpy(m, n, seed):
  w = _mat(seed, (m, n))
  w64 = w.astype(np.float64)
  ref = np.linalg.norm(w64, "fro") ** 2 / np.linalg.norm(w64, 2) ** 2
  np.testing.assert_allclose(L.stable_rank(jnp.asarray(w)), ref, rtol=1e-4)
  r = L.rank_for_stable_rank(jnp.asarray(w), scale=1.5)
  assert r == min(min(m, n), max(1, int(np.ceil(1.5 * ref - 1e-4))))


def test_stable_rank_of_identity_and_zero():
  assert L.rank_for_stable_rank(jnp.eye(5)) == 5
  np.testing.assert_allclose(L.stable_rank(jnp.eye(5)), 5.0, rtol=1e-6)
  assert float(L.stable_rank(jnp.zeros((3, 4)))) == 0.0


# ---------------------------------------------------------------------- BSR


def _tree(seed):
  return {"a": {"kernel": _decaying(seed, 12, 8, 0.3).astype(np.float32),
                "bias": np.ones(8, np.float32)},
          "b": {"kernel": _mat(seed + 1, (3, 3, 2, 8))},
          "c": {"kernel": _decaying(seed + 2, 8, 10, 0.9).astype(np.float32)}}


def _cost(params, ranks):
  return sum(r * sum(L.matrix_shape(np.shape(x)))
             for p, x in cx.selected_leaves(params)
             for r in [ranks[cx.path_str(p)]])


def _dense(params):
  return sum(np.size(x) for _, x in cx.selected_leaves(params))


@settings(max_examples=10)
@given(seed=st.integers(0, 50), ratio=st.floats(0.4, 1.0),
       beam=st.integers(1, 4))
def test_bsr_meets_budget_and_beats_uniform(seed, ratio, beam):
  params = _tree(seed)
  ranks = L.bsr_ranks(params, ratio, beam_width=beam)
  assert _cost(params, ranks) <= ratio * _dense(params)
  uniform = L.ranks_for_ratio(params, ratio)
  assert L.proxy_loss(params, ranks) <= L.proxy_loss(params, uniform) + 1e-12


def test_bsr_proxy_loss_matches_numpy_formula():
  params = _tree(0)
  ranks = {"a/kernel": 2, "b/kernel": 5, "c/kernel": 3}
  ref, dense = 0.0, _dense(params)
  for p, x in cx.selected_leaves(params):
    s2 = _sv64(x) ** 2
    r = ranks[cx.path_str(p)]
    ref += np.size(x) / dense * s2[r:].sum() / s2.sum()
  np.testing.assert_allclose(L.proxy_loss(params, ranks), ref, rtol=1e-10)


def test_bsr_strictly_better_on_uneven_spectra():
  rng = np.random.default_rng(0)
  low = (rng.standard_normal((16, 2)) @ rng.standard_normal((2, 16)))
  params = {"low": low.astype(np.float32),
            "full": _mat(1, (16, 16))}
  ranks = L.bsr_ranks(params, 0.5, where=".*")
  uniform = L.ranks_for_ratio(params, 0.5, where=".*")
  assert ranks["low"] == 2  # exactly what the low-rank layer needs
  assert L.proxy_loss(params, ranks, where=".*") < (
      L.proxy_loss(params, uniform, where=".*") - 0.05)


def test_bsr_with_eval_fn_gets_lowrank_nodes():
  params = _tree(3)
  seen = []

  def eval_fn(p):
    seen.append(p)
    # Only layer c's error counts: the search should give c the most rank.
    c = p["c"]["kernel"]
    assert isinstance(c, L.LowRankArray)
    return float(jnp.sum((c.materialize() - params["c"]["kernel"]) ** 2))

  ranks = L.bsr_ranks(params, 0.5, eval_fn=eval_fn, beam_width=2, grid=8)
  assert seen and _cost(params, ranks) <= 0.5 * _dense(params)
  assert seen[0]["a"]["bias"] is params["a"]["bias"]
  other = {"a/kernel": 1, "b/kernel": 1}
  budget_c = (0.5 * _dense(params) - _cost(params, {**other, "c/kernel": 0}))
  assert ranks["c/kernel"] == min(8, int(budget_c // 18))


def test_stable_rank_penalty_and_modified_form():
  params = _tree(1)
  leaves = [x for _, x in cx.selected_leaves(params)]
  ref = sum(np.sum(_sv64(x) ** 2) / _sv64(x)[0] ** 2 for x in leaves)
  np.testing.assert_allclose(L.stable_rank_penalty(params), ref, rtol=1e-4)
  ranks = {"a/kernel": 2, "b/kernel": 3, "c/kernel": 4}
  ref_mod = sum(np.sum(_sv64(x)[ranks[cx.path_str(p)]:] ** 2) / _sv64(x)[0] ** 2
                for p, x in cx.selected_leaves(params))
  np.testing.assert_allclose(L.stable_rank_penalty(params, ranks=ranks),
                             ref_mod, rtol=1e-4)
  # Exactly rank-r leaves have zero modified penalty.
  lr = cx.materialize(L.factorize_tree(params, rank=ranks))
  assert float(L.stable_rank_penalty(lr, ranks=ranks)) < 1e-8
  # A gradient step lowers the penalty, and the gradient is finite.
  g = jax.grad(L.stable_rank_penalty)(params)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(g))
  stepped = jax.tree.map(lambda x, d: x - 1e-2 * d, params, g)
  assert float(L.stable_rank_penalty(stepped)) < float(
      L.stable_rank_penalty(params))


def test_penalty_gradient_finite_for_repeated_singular_values():
  g = jax.grad(lambda w: L.stable_rank_penalty({"w": w}))(jnp.eye(4))
  assert np.all(np.isfinite(g))


# -------------------------------------------------------------- tree level


class _Net(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(6, (3, 3))(x)
    return nn.Dense(5)(x.reshape(x.shape[0], -1))


def test_factorize_tree_linen_and_nnx():
  params = _Net().init(jax.random.key(0), jnp.zeros((1, 4, 4, 2)))
  out = L.factorize_tree(params, rank=2)
  dense = out["params"]["Dense_0"]["kernel"]
  assert isinstance(dense, L.LowRankArray) and dense.rank == 2
  assert out["params"]["Dense_0"]["bias"] is params["params"]["Dense_0"]["bias"]
  assert isinstance(out["params"]["Conv_0"]["kernel"], L.LowRankArray)
  mat = cx.materialize(out)
  y = _Net().apply(mat, jnp.ones((1, 4, 4, 2)))
  assert y.shape == (1, 5)
  assert cx.storage_bits(dense) == 32 * 2 * (96 + 5)

  _, state = nnx.split(nnx.Linear(6, 4, rngs=nnx.Rngs(0)))
  out = L.factorize_tree(state, energy=0.9)
  assert isinstance(out, nnx.State)
  leaf = [x for x in jax.tree.leaves(out, is_leaf=cx.is_compressed)
          if cx.is_compressed(x)]
  assert len(leaf) == 1
  assert leaf[0].rank == L.rank_for_energy(state["kernel"][...], 0.9)


def test_factorize_tree_ratio_mapping_and_callable():
  params = _tree(2)
  out = L.factorize_tree(params, ratio=0.5)
  ranks = L.ranks_for_ratio(params, 0.5)
  assert {cx.path_str(p): x.rank for p, x in
          jax.tree_util.tree_leaves_with_path(out, is_leaf=cx.is_compressed)
          if cx.is_compressed(x)} == ranks
  out2 = L.factorize_tree(params, rank=lambda p, x: 1)
  assert out2["c"]["kernel"].rank == 1


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("rank", [0, 5, 1.5, -1])
def test_bad_rank_names_leaf(rank):
  params = {"layer": {"kernel": _mat(0, (4, 6))}}
  with pytest.raises(ValueError, match=r"params\['layer'\]\['kernel'\]: rank"):
    L.factorize_tree(params, rank=rank)


@pytest.mark.parametrize("energy", [0.0, -0.1, 1.5, float("nan")])
def test_bad_energy(energy):
  with pytest.raises(ValueError, match="energy must be in"):
    L.rank_for_energy(jnp.eye(3), energy)


@pytest.mark.parametrize("ratio", [0.0, 1.5, -1.0])
def test_bad_ratio(ratio):
  params = _tree(0)
  with pytest.raises(ValueError, match="ratio must be in"):
    L.ranks_for_ratio(params, ratio)
  with pytest.raises(ValueError, match="ratio must be in"):
    L.bsr_ranks(params, ratio)


def test_ratio_too_small_and_bad_bsr_options():
  params = _tree(0)
  with pytest.raises(ValueError, match="too small"):
    L.bsr_ranks(params, 0.01)
  with pytest.raises(ValueError, match="beam_width"):
    L.bsr_ranks(params, 0.5, beam_width=0)
  with pytest.raises(ValueError, match="matches no leaf"):
    L.ranks_for_ratio(params, 0.5, where="nothing")


def test_one_d_int_and_nan_leaves_name_their_path():
  params = {"a": {"bias": np.ones(4, np.float32),
                  "ids": np.ones((3, 3), np.int32),
                  "w": np.full((3, 3), np.nan, np.float32)}}
  with pytest.raises(ValueError, match=r"params\['a'\]\['bias'\]: .*ndim >= 2"):
    L.factorize_tree(params, rank=1, where="bias")
  with pytest.raises(TypeError, match=r"params\['a'\]\['ids'\]: .*floating"):
    L.factorize_tree(params, rank=1, where="ids")
  with pytest.raises(ValueError, match=r"params\['a'\]\['w'\]: .*NaN"):
    L.factorize_tree(params, rank=1, where="w$")
  with pytest.raises(ValueError, match=r"params\['a'\]\['w'\]: .*NaN"):
    L.bsr_ranks(params, 0.9, where="w$")


def test_factorize_tree_argument_errors():
  params = _tree(0)
  with pytest.raises(ValueError, match="exactly one"):
    L.factorize_tree(params)
  with pytest.raises(ValueError, match="exactly one"):
    L.factorize_tree(params, rank=1, energy=0.5)
  with pytest.raises(KeyError, match="no rank given"):
    L.factorize_tree(params, rank={"a/kernel": 1})
