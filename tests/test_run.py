"""cx.run: compressed kernels decoded at their use, and integer matmuls.

Running from nodes is compared with running the materialized model: bit for
bit on the weight-only paths (the same decode, the same dot), for linen and
nnx, under jit, vmap and a sharded mesh. W8A8 is compared with a NumPy
float64 reference of the same math (int8 codes from float32 rounding, exact
integer products, scales applied in float64).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import compressax as cx


def _w(shape, seed=0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _gq(w, bits, group_size=None, symmetric=False):
  return cx.oneshot.rtn(w, bits=bits, group_size=group_size, symmetric=symmetric)


@pytest.mark.parametrize("bits,group_size,symmetric,d_in",
                         [(4, 16, False, 37), (4, None, True, 32), (3, 8, False, 20),
                          (2, None, False, 9), (8, None, True, 24), (6, 16, False, 40)])
def test_pack_decodes_to_the_same_kernel(bits, group_size, symmetric, d_in):
  g = _gq(_w((d_in, 12)), bits, group_size, symmetric)
  k = cx.run.pack(g)
  assert isinstance(k, cx.run.QuantizedKernel)
  rows = -(-d_in // 2) if bits <= 4 else d_in
  assert k.codes.shape == (rows, 12) and k.codes.dtype == jnp.uint8
  np.testing.assert_array_equal(np.asarray(k.materialize()), np.asarray(g.materialize()))
  np.testing.assert_array_equal(np.asarray(jax.jit(cx.run.decode)(k)),
                                np.asarray(g.materialize()))
  k.validate()


@pytest.mark.parametrize("bits,group_size,symmetric,d_in",
                         [(4, 16, False, 37), (8, None, True, 24), (3, 8, False, 20)])
def test_columns_equal_the_decoded_columns(bits, group_size, symmetric, d_in):
  k = cx.run.pack(_gq(_w((d_in, 50)), bits, group_size, symmetric))
  ids = jnp.asarray(np.random.default_rng(bits).integers(0, 50, (3, 7)), jnp.int32)
  want = np.asarray(cx.run.decode(k))[:, np.asarray(ids)]
  got = jax.jit(cx.run.columns)(k, ids)
  assert got.shape == (d_in, 3, 7)
  np.testing.assert_array_equal(np.asarray(got), want)
  # Any other node is decoded whole, then taken.
  smoothed = cx.run.w8a8(_w((d_in, 50)), jnp.linspace(0.5, 4.0, d_in))
  np.testing.assert_array_equal(np.asarray(cx.run.columns(smoothed, ids)),
                                np.asarray(cx.run.decode(smoothed))[:, np.asarray(ids)])
  masked = cx.prune.mask_to_nodes(_w((d_in, 50)), _w((d_in, 50)) > 0)
  np.testing.assert_array_equal(np.asarray(cx.run.columns(masked, ids)),
                                np.asarray(masked.materialize())[:, np.asarray(ids)])
  with pytest.raises(TypeError, match="integers"):
    cx.run.columns(k, jnp.zeros((2,)))


def test_pack_hqq_float_zero():
  g = cx.oneshot.hqq(_w((64, 8)), bits=4, group_size=32)
  k = cx.run.pack(g)
  np.testing.assert_array_equal(np.asarray(k.materialize()), np.asarray(g.materialize()))


@pytest.mark.parametrize("d_in,d_out,seed", [(1, 3, 0), (6, 1, 1), (9, 5, 2)])
def test_nibbles_round_trip(d_in, d_out, seed):
  from compressax.run._kernel import pack_codes, unpack
  codes = np.random.default_rng(seed).integers(0, 16, (d_in, d_out)).astype(np.uint8)
  packed = pack_codes(jnp.asarray(codes), 4)
  assert packed.shape == (-(-d_in // 2), d_out)
  np.testing.assert_array_equal(np.asarray(unpack(packed, 4, d_in)), codes)


def test_storage_bits_counts_packed_bytes():
  k = cx.run.pack(_gq(_w((33, 10)), 4, 16))
  assert k.storage_bits() == 8 * (17 * 10 + 3 * 10) + 32 * 3 * 10


def test_pack_errors_name_the_leaf():
  params = {"dense": {"kernel": _gq(_w((16, 8)), 4, 8)}}
  with pytest.raises(ValueError, match=r"dense.*kernel.*W8A8"):
    cx.run.pack(params, activations=8)
  g = params["dense"]["kernel"]   # groups in a processing order (GPTQ act-order)
  act = dataclasses.replace(g, group_index=jnp.arange(16, dtype=jnp.int32)[::-1] // 8)
  with pytest.raises(ValueError, match=r"layer.*act-order"):
    cx.run.pack({"layer": act})
  with pytest.raises(ValueError, match="activations"):
    cx.run.pack(params, activations=4)


def test_save_load_round_trip(tmp_path):
  tree = {"k": cx.run.pack(_gq(_w((15, 6)), 4, 8)),
          "q": cx.run.pack(_gq(_w((8, 6)), 8, symmetric=True), activations=8),
          "s": cx.run.w8a8(_w((8, 6)), jnp.arange(1.0, 9.0))}
  cx.save(tmp_path / "m.cx", tree)
  back = cx.load(tmp_path / "m.cx", keep_compressed=True)
  for name in tree:
    assert back[name].activations == tree[name].activations
    np.testing.assert_array_equal(np.asarray(back[name].codes), np.asarray(tree[name].codes))
    np.testing.assert_array_equal(np.asarray(back[name].smooth), np.asarray(tree[name].smooth))
    np.testing.assert_array_equal(np.asarray(back[name].materialize()),
                                  np.asarray(tree[name].materialize()))


NODES = {
    "packed4": lambda w: cx.run.pack(_gq(w, 4, 16)),
    "gq8": lambda w: _gq(w, 8),
    "smoothed": lambda w: cx.run.pack(cx.run.w8a8(w, jnp.linspace(0.1, 9.0, w.shape[0]))),
    "uniform": lambda w: cx.quantize.quantize(w, 4, axis=-1),
    "masked": lambda w: cx.prune.MaskedArray(value=w, mask=jnp.abs(w) > 0.5,
                                             shape=w.shape, dtype=w.dtype),
}


@pytest.mark.parametrize("kind", sorted(NODES))
def test_matmul_weight_only_is_bit_exact(kind):
  node = NODES[kind](_w((48, 20)))
  x = _w((2, 3, 48), 1)
  got = jax.jit(cx.run.matmul)(x, node)
  want = jax.jit(jnp.matmul)(x, node.materialize())
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  dg = jax.jit(lambda x, w: cx.run.dot_general(x, w, (((2,), (0,)), ((), ()))))
  np.testing.assert_array_equal(np.asarray(dg(x, node)), np.asarray(want))


def _w8a8_reference(x, w_codes, w_scale):
  """NumPy: per-token int8 codes (float32 rounding), exact ints, float64 scales."""
  x = np.asarray(x, np.float32)
  amax = np.max(np.abs(x), axis=-1, keepdims=True)
  s = np.where(amax > 0, amax * np.float32(1 / 127), np.float32(1)).astype(np.float32)
  q = np.clip(np.round(x / s), -127, 127).astype(np.int64)
  acc = q @ (np.asarray(w_codes, np.int64) - 128)
  return acc.astype(np.float64) * s.astype(np.float64) * np.asarray(w_scale, np.float64)[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_w8a8_matches_numpy_float64(seed):
  w = _w((96, 24), seed)
  g = _gq(w, 8, symmetric=True)
  k = cx.run.pack(g, activations=8)
  x = 3.0 * _w((5, 96), seed + 10)
  x = x.at[2].set(0.0)     # a row of zeros takes scale 1
  got = np.asarray(jax.jit(cx.run.matmul)(x, k), np.float64)
  want = _w8a8_reference(x, g.codes, g.scale)
  np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-5)
  # And it approximates the float product (int8 on both sides).
  rel = np.linalg.norm(got - np.asarray(x @ w)) / np.linalg.norm(np.asarray(x @ w))
  assert rel < 0.03


def _smooth_reference(w, act, alpha):
  """SmoothQuant eq. 4 in float64: s_j = a_j^alpha / max_k |w_jk|^(1 - alpha)."""
  wmax = np.max(np.abs(np.asarray(w, np.float64)), axis=1)
  return np.asarray(act, np.float64) ** alpha / wmax ** (1 - alpha)


@pytest.mark.parametrize("seed,alpha", [(0, 0.5), (1, 0.8), (2, 0.0)])
def test_w8a8_smoothed_matches_numpy_float64(seed, alpha):
  w = _w((96, 24), seed)
  x = _w((5, 96), seed + 10) * (1.0 + 40.0 * (jnp.arange(96) % 17 == 0).astype(jnp.float32))[None]
  act = jnp.max(jnp.abs(x), axis=0)
  k = cx.run.w8a8(w, act, alpha=alpha)
  s = np.asarray(k.smooth, np.float64)
  np.testing.assert_allclose(s, _smooth_reference(w, act, alpha), rtol=1e-5)
  # The codes are the 8-bit symmetric codes of diag(s) w ...
  g = _gq(w * k.smooth[:, None], 8, symmetric=True)
  np.testing.assert_array_equal(np.asarray(k.codes), np.asarray(g.codes))
  # ... and the layer quantizes x / s per token.
  got = np.asarray(jax.jit(cx.run.matmul)(x, k), np.float64)
  want = _w8a8_reference(np.asarray(x, np.float32) / np.asarray(k.smooth), g.codes, g.scale)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  # Its dense value is within half a step of w, the step divided by s_j.
  bound = 0.5 * np.asarray(g.scale)[0][None, :] / s[:, None]
  assert np.all(np.abs(np.asarray(k.materialize(), np.float64) - np.asarray(w))
                <= bound * (1 + 1e-4))   # float32 rounding of w * s and of the division


def test_w8a8_smoothing_helps_outlier_channels():
  # SmoothQuant's premise: a few channels 50x larger than the rest ruin
  # per-token int8 codes; moving their range into the weights recovers it.
  w = _w((128, 64))
  x = _w((256, 128), 1).at[:, ::32].multiply(50.0)
  ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  err = {}
  for name, act in [("plain", None), ("smooth", jnp.max(jnp.abs(x), axis=0))]:
    y = np.asarray(cx.run.matmul(x, cx.run.w8a8(w, act)), np.float64)
    err[name] = np.linalg.norm(y - ref) / np.linalg.norm(ref)
  assert err["smooth"] < 0.5 * err["plain"], err
  # Without scales it is the kernel that pack() makes.
  plain = cx.run.w8a8(w)
  packed = cx.run.pack(_gq(w, 8, symmetric=True), activations=8)
  assert plain.smooth.shape == (0,)
  np.testing.assert_array_equal(np.asarray(plain.codes), np.asarray(packed.codes))
  np.testing.assert_array_equal(np.asarray(plain.scale), np.asarray(packed.scale))


def test_w8a8_smoothing_errors_name_the_leaf():
  w = _w((16, 4))
  with pytest.raises(ValueError, match=r"blk/kernel.*shape \(16,\)"):
    cx.run.w8a8(w, jnp.ones(15), path="blk/kernel")
  with pytest.raises(ValueError, match=r"blk/kernel.*act_scale"):
    cx.run.w8a8(w, -jnp.ones(16), path="blk/kernel")
  with pytest.raises(ValueError, match=r"blk/kernel.*NaN"):
    cx.run.w8a8(w, jnp.ones(16).at[2].set(jnp.nan), path="blk/kernel")
  with pytest.raises(ValueError, match=r"blk/kernel.*alpha"):
    cx.run.w8a8(w, jnp.ones(16), alpha=1.5, path="blk/kernel")
  # A zero channel keeps s = 1; the jitted builder gives the same kernel.
  act = jnp.ones(16).at[0].set(0.0)
  k = cx.run.w8a8(w, act)
  assert float(k.smooth[0]) == 1.0
  kj = jax.jit(cx.run.w8a8)(w, act)
  np.testing.assert_array_equal(np.asarray(kj.codes), np.asarray(k.codes))
  np.testing.assert_array_equal(np.asarray(kj.smooth), np.asarray(k.smooth))
  bad = dataclasses.replace(k, smooth=-k.smooth)
  with pytest.raises(ValueError, match="positive"):
    bad.validate()


def test_quantize_tokens_reference():
  x = _w((4, 7, 33), 3)
  q, s = jax.jit(cx.run.quantize_tokens)(x)
  xn = np.asarray(x)
  sn = np.max(np.abs(xn), axis=-1, keepdims=True) * np.float32(1 / 127)
  np.testing.assert_array_equal(np.asarray(s), sn)
  np.testing.assert_array_equal(np.asarray(q), np.clip(np.round(xn / sn), -127, 127))
  assert q.dtype == jnp.int8 and int(jnp.max(jnp.abs(q.astype(jnp.int32)))) == 127


def test_weight_only_int8_from_w8a8_node_is_bit_exact():
  g = _gq(_w((32, 16)), 8, symmetric=True)
  x = _w((3, 32), 1)
  got = jax.jit(cx.run.matmul)(x, cx.run.pack(g))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(jax.jit(jnp.matmul)(
      x, g.materialize())))


# ------------------------------------------------------------------- linen

class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(32, name="a")(x))
    x = nn.LayerNorm(name="ln")(x)
    return nn.Dense(8, use_bias=False, name="b")(x)


def _linen_params(fn):
  params = MLP().init(jax.random.key(0), jnp.ones((1, 40)))["params"]
  return cx.map_selected(lambda p, w: fn(w), params)


def _apply(params, x):
  return MLP().apply({"params": params}, x)


@pytest.mark.parametrize("kind", ["packed4", "uniform", "masked"])
def test_linen_intercept_equals_materialized(kind):
  params = _linen_params(NODES[kind])
  x = _w((3, 40), 2)
  want = jax.jit(_apply)(cx.materialize(params), x)
  with cx.run.intercept():
    got = jax.jit(_apply)(params, x)
    got_vmap = jax.jit(jax.vmap(_apply, in_axes=(None, 0)))(params, x[:, None])
    dense_too = jax.jit(_apply)(cx.materialize(params), x)   # dense kernels: unchanged
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  np.testing.assert_array_equal(np.asarray(dense_too), np.asarray(want))
  np.testing.assert_array_equal(np.asarray(got_vmap[:, 0]), np.asarray(want))


def test_linen_intercept_compressed_bias():
  m = nn.Dense(8)
  params = m.init(jax.random.key(0), jnp.ones((1, 16)))["params"]
  params = {"kernel": _gq(params["kernel"], 4),
            "bias": cx.quantize.quantize(jnp.linspace(-1.0, 1.0, 8), 4)}
  x = _w((2, 16), 3)
  want = jax.jit(m.apply)({"params": cx.materialize(params)}, x)
  with cx.run.intercept():
    got = jax.jit(m.apply)({"params": params}, x)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_linen_without_intercept_is_an_error():
  params = _linen_params(NODES["packed4"])
  with pytest.raises(Exception):
    jax.jit(_apply)(params, jnp.ones((1, 40)))


def test_linen_w8a8_vmap_over_stacked_kernels():
  ws = _w((3, 40, 16))
  nodes = [cx.run.pack(_gq(w, 8, symmetric=True), activations=8) for w in ws]
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *nodes)
  x = _w((5, 40), 1)
  got = jax.jit(jax.vmap(cx.run.matmul, in_axes=(None, 0)))(x, stacked)
  for i, n in enumerate(nodes):
    np.testing.assert_array_equal(np.asarray(got[i]), np.asarray(jax.jit(cx.run.matmul)(x, n)))


def test_sharded_mesh_equals_unsharded():
  mesh = jax.make_mesh((4,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
  params = _linen_params(NODES["packed4"])

  def put(path, a):  # split every kernel's codes and scales over output columns
    spec = P(None, "model") if a.ndim == 2 and a.shape[1] % 4 == 0 else P()
    return jax.device_put(a, NamedSharding(mesh, spec))

  sharded = jax.tree_util.tree_map_with_path(put, params)
  assert len(sharded["a"]["kernel"].codes.sharding.device_set) == 4
  x = _w((4, 40), 3)
  with cx.run.intercept():
    got = jax.jit(_apply)(sharded, x)
  want = jax.jit(_apply)(cx.materialize(params), x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_decode_waits_for_its_layer():
  """Compiled temp memory holds about one layer's float kernel, not all of them."""
  d, layers = 256, 6
  nodes = [cx.run.pack(_gq(_w((d, d), i), 4, 64)) for i in range(layers)]

  def f(ws, x):
    for w in ws:
      x = jnp.tanh(cx.run.matmul(x, w))
    return x

  x = jnp.ones((8, d))
  mem = jax.jit(f).lower(nodes, x).compile().memory_analysis()
  one_kernel = d * d * 4
  assert mem.temp_size_in_bytes < 2 * one_kernel
  batched = jax.jit(jax.vmap(f, in_axes=(None, 0))).lower(nodes, x[None]).compile()
  assert batched.memory_analysis().temp_size_in_bytes < 2 * one_kernel


def test_matmul_grad_wrt_inputs():
  k = cx.run.pack(_gq(_w((24, 8)), 4))
  x = _w((3, 24), 1)
  got = jax.grad(lambda x: jnp.sum(jnp.sin(cx.run.matmul(x, k))))(x)
  want = jax.grad(lambda x: jnp.sum(jnp.sin(x @ k.materialize())))(x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)


# --------------------------------------------------------------------- nnx

class Net(nnx.Module):
  def __init__(self, rngs, **linear):
    self.a = nnx.Linear(40, 32, rngs=rngs, **linear)
    self.b = nnx.Linear(32, 8, use_bias=False, rngs=rngs, **linear)

  def __call__(self, x):
    return self.b(nnx.relu(self.a(x)))


def _nnx_run(model, x, vmap=False):
  graphdef, state = nnx.split(model)
  f = lambda s, x: nnx.merge(graphdef, s)(x)
  f = jax.vmap(f, in_axes=(None, 0)) if vmap else f
  return jax.jit(f)(state, x)


@pytest.mark.parametrize("kind", ["packed4", "gq8"])
def test_nnx_decode_at_use_equals_materialized(kind):
  model = Net(nnx.Rngs(0))
  tree = cx.map_selected(lambda p, w: NODES[kind](w), nnx.state(model, nnx.Param))
  dense = Net(nnx.Rngs(0))
  nnx.update(dense, cx.materialize(tree))
  cx.run.set_compressed(model, tree)
  assert isinstance(model.a.kernel, cx.run.CompressedParam)
  assert cx.is_compressed(model.a.kernel.get_raw_value())
  x = _w((3, 40), 4)
  want = _nnx_run(dense, x)
  np.testing.assert_array_equal(np.asarray(_nnx_run(model, x)), np.asarray(want))
  np.testing.assert_array_equal(np.asarray(_nnx_run(model, x[:, None], vmap=True)[:, 0]),
                                np.asarray(want))


def test_nnx_hooks_run_w8a8():
  hooks = dict(dot_general=cx.run.dot_general, promote_dtype=cx.run.promote_dtype)
  model = Net(nnx.Rngs(0), **hooks)
  w8 = lambda w: cx.run.pack(_gq(w, 8, symmetric=True), activations=8)
  tree = cx.map_selected(lambda p, w: w8(w), nnx.state(model, nnx.Param))
  cx.run.set_compressed(model, tree, decode=False)
  x = _w((3, 40), 4)
  a, b = tree["a"]["kernel"].get_value(), tree["b"]["kernel"].get_value()
  h = jax.nn.relu(cx.run.matmul(x, a) + tree["a"]["bias"].get_value()[None])
  want = cx.run.matmul(h, b)
  np.testing.assert_allclose(np.asarray(_nnx_run(model, x)), np.asarray(want),
                             rtol=1e-6, atol=1e-6)


def test_set_compressed_unknown_path():
  model = Net(nnx.Rngs(0))
  with pytest.raises(ValueError, match="no such parameter"):
    cx.run.set_compressed(model, {"c": {"kernel": NODES["gq8"](_w((4, 4)))}})
