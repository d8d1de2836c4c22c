"""cx.oneshot.calibrate_sequential: block-by-block calibration on tiny blocks."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

import compressax as cx

D = 16


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = jax.nn.relu(nn.Dense(2 * D, name="up")(x))
    return x + nn.Dense(D, use_bias=False, name="down")(h)


BLOCK = Block()


def apply(p, x):
  return BLOCK.apply({"params": p}, x)


@pytest.fixture(scope="module")
def setup():
  xs = [jax.random.normal(jax.random.key(i), (8, 4, D)) for i in range(2)]
  ps = [BLOCK.init(jax.random.key(10 + i), xs[0])["params"] for i in range(3)]
  return ps, xs


def test_hessians_are_of_the_block_inputs(setup):
  ps, xs = setup
  hs = cx.oneshot.block_hessians(apply, ps[0], xs, ["up/kernel", "down/kernel"])
  x = jnp.concatenate(xs)
  np.testing.assert_allclose(hs["up/kernel"][0], cx.oneshot.hessian(x) / 64,
                             rtol=1e-5, atol=1e-5)
  mid = jax.nn.relu(x @ ps[0]["up"]["kernel"] + ps[0]["up"]["bias"][None, None])
  np.testing.assert_allclose(hs["down/kernel"][0], cx.oneshot.hessian(mid) / 64,
                             rtol=1e-4, atol=1e-4)
  assert float(hs["down/kernel"][1]) == 64


def test_sharded_hessians_equal_single_device(setup):
  ps, xs = setup
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  one = cx.oneshot.block_hessians(apply, ps[0], xs, ["up/kernel", "down/kernel"])
  many = cx.oneshot.block_hessians(apply, ps[0], xs, ["up/kernel", "down/kernel"],
                                   mesh=mesh)
  for k in one:
    np.testing.assert_allclose(many[k][0], one[k][0], rtol=1e-5, atol=1e-5)
    assert float(many[k][1]) == float(one[k][1])


def test_sequential_feeds_compressed_outputs(setup):
  ps, xs = setup
  rules = {"up/kernel": cx.oneshot.GPTQ(bits=2), "down": cx.oneshot.SparseGPT(0.5)}
  seq, info = cx.oneshot.calibrate_sequential(apply, ps, xs, rules, progress=False)
  assert isinstance(seq[0]["up"]["kernel"], cx.oneshot.GroupQuantizedArray)
  assert isinstance(seq[2]["down"]["kernel"], cx.prune.MaskedArray)
  assert seq[1]["up"]["bias"] is ps[1]["up"]["bias"]     # biases untouched
  # Block 1 was calibrated on block 0's *compressed* outputs.
  x1 = [apply(cx.materialize(seq[0]), x) for x in xs]
  want = cx.oneshot.gptq(ps[1]["up"]["kernel"],
                         cx.oneshot.block_hessians(apply, ps[1], x1, ["up/kernel"])
                         ["up/kernel"][0], bits=2)
  np.testing.assert_array_equal(seq[1]["up"]["kernel"].codes, want.codes)
  one, _ = cx.oneshot.calibrate_sequential(apply, ps, xs, rules, sequential=False,
                                           progress=False)
  np.testing.assert_array_equal(one[0]["up"]["kernel"].codes, seq[0]["up"]["kernel"].codes)
  assert not np.array_equal(one[1]["up"]["kernel"].codes, seq[1]["up"]["kernel"].codes)
  assert 0 <= info["block_1/up/kernel"] < 1 and info["seconds"] > 0


def test_sharded_pipeline_matches(setup):
  ps, xs = setup
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  rules = cx.oneshot.GPTQ(bits=3)
  a, _ = cx.oneshot.calibrate_sequential(apply, ps[:2], xs, rules, progress=False)
  b, _ = cx.oneshot.calibrate_sequential(apply, ps[:2], xs, rules, mesh=mesh,
                                         progress=False)
  np.testing.assert_array_equal(a[1]["down"]["kernel"].codes, b[1]["down"]["kernel"].codes)


@pytest.mark.parametrize("method", [
    cx.oneshot.RTN(bits=4), cx.oneshot.Wanda(sparsity=0.5),
    cx.oneshot.Magnitude(n_m=(2, 4)), cx.oneshot.SparseGPT(n_m=(2, 4))])
def test_methods(setup, method):
  ps, xs = setup
  out, _ = cx.oneshot.calibrate_sequential(apply, ps[:1], xs, {"down": method},
                                           progress=False)
  w = out[0]["down"]["kernel"].materialize()
  assert w.shape == (2 * D, D)
  assert out[0]["up"]["kernel"] is ps[0]["up"]["kernel"]
  if not isinstance(method, cx.oneshot.RTN):
    assert int(jnp.sum(w == 0)) >= w.size // 2


def test_calibration_free_methods_equal_their_functions(setup):
  # RTN and HQQ need no Hessian: the pipeline's node is the function's, bit for bit.
  ps, xs = setup
  w = ps[0]["down"]["kernel"]
  for method, direct in [(cx.oneshot.HQQ(bits=3, group_size=8),
                          cx.oneshot.hqq(w, bits=3, group_size=8)),
                         (cx.oneshot.RTN(bits=3, group_size=8),
                          cx.oneshot.rtn(w, bits=3, group_size=8))]:
    out, _ = cx.oneshot.calibrate_sequential(apply, ps[:1], xs, {"down": method},
                                             progress=False)
    got = out[0]["down"]["kernel"]
    np.testing.assert_array_equal(np.asarray(got.codes), np.asarray(direct.codes))
    np.testing.assert_array_equal(np.asarray(got.zero), np.asarray(direct.zero))


def test_rule_matching_nothing_is_an_error(setup):
  ps, xs = setup
  with pytest.raises(ValueError, match="attn"):
    cx.oneshot.calibrate_sequential(apply, ps[:1], xs, {"attn": cx.oneshot.RTN(4)},
                                    progress=False)
