"""Weightless (Reagen et al. 2018): Bloomier-filter layers and the freeze loop.

References: the paper's decoding formula ``v = M(x) ^ T[h_0(x)] ^ ... ``
re-implemented here with Python integers, and its false-positive rate
``K / 2^t`` checked against a binomial bound that an off-by-one decoder fails.
"""

from __future__ import annotations

import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import compressax as cx
from compressax.weightless import _bloomier
from test_io_hostile import _forge
from compressax.io import _load

W = cx.weightless


def _layer(shape, keep_frac, n_clusters, seed=0):
  """A pruned, clustered float32 layer and its keep mask."""
  rng = np.random.default_rng(seed)
  keep = rng.random(shape) < keep_frac
  cents = np.sort(rng.normal(size=n_clusters)).astype(np.float32)
  cents[cents == 0] = 1.0
  w = np.where(keep, cents[rng.integers(0, n_clusters, shape)], 0)
  return w.astype(np.float32), keep


# ------------------------------------------------------------ the reference

_M32 = 0xFFFFFFFF


def _py_mix(x: int) -> int:
  x ^= x >> 16
  x = (x * 0x7FEB352D) & _M32
  x ^= x >> 15
  x = (x * 0x846CA68B) & _M32
  return x ^ (x >> 16)


def _py_value(node, x: int) -> int:
  """The paper's formula in Python ints: M(x) ^ T[h_0(x)] ^ ... ^ T[h_{k-1}(x)]."""
  k, m, t = node.hashes, node.n_cells, node.bits
  table = np.asarray(node.table)
  v = 0
  for j in range(k + 1):
    salt = _py_mix((node.seed + (j + 1) * 0x9E3779B9) & _M32)
    h = _py_mix((_py_mix(x ^ salt) + salt) & _M32)
    v ^= int(table[j * (m // k) + h % (m // k)]) if j < k else h & ((1 << t) - 1)
  return v


def test_decoder_matches_the_formula_in_python_ints():
  w, _ = _layer((40, 30), 0.2, 5)
  node = W.encode(w, bits=6, seed=7)
  values = np.asarray(node.decode_values())
  ref = [_py_value(node, x) for x in range(w.size)]
  np.testing.assert_array_equal(values, ref)
  cents = np.asarray(node.centroids)
  expect = np.array([cents[v - 1] if 1 <= v <= cents.size else 0 for v in ref],
                    np.float32).reshape(w.shape)
  np.testing.assert_array_equal(np.asarray(node.materialize()), expect)


# ------------------------------------------------------------ exact keys

@hypothesis.given(
    rows=st.sampled_from([1, 7, 60]), cols=st.sampled_from([1, 13, 60]),
    keep=st.floats(0.0, 1.0), clusters=st.integers(1, 15),
    extra_bits=st.integers(0, 4), hashes=st.integers(2, 5),
    seed=st.integers(0, 2 ** 32 - 1))
def test_every_kept_weight_decodes_exactly(rows, cols, keep, clusters,
                                           extra_bits, hashes, seed):
  w, mask = _layer((rows, cols), keep, clusters, seed % 1000)
  bits = max(1, math.ceil(math.log2(clusters + 1))) + extra_bits
  node = W.encode(w, bits=bits, hashes=hashes, seed=seed)
  dense = np.asarray(node.materialize())
  assert dense.shape == w.shape and dense.dtype == w.dtype
  np.testing.assert_array_equal(dense[mask], w[mask])
  # Every decoded value is 0 or a centroid (false positives included).
  assert np.isin(dense[~mask], np.append(np.asarray(node.centroids), 0)).all()
  m = node.n_cells
  overhead = _bloomier.OVERHEAD[hashes]
  assert m % hashes == 0 and m >= math.ceil(overhead * mask.sum()) + 32
  assert node.storage_bits() == m * bits + 32 * node.n_clusters + 80


def test_deep_compression_node_is_encoded_as_stored():
  w, mask = _layer((30, 20), 0.3, 6)
  dc = cx.methods.KMeans(bits=3, pruned=True).finalize("w", jnp.asarray(w), {})
  node = W.encode(dc, bits=5)
  dense = np.asarray(node.materialize())
  np.testing.assert_array_equal(dense[mask], w[mask])
  np.testing.assert_array_equal(np.asarray(node.centroids),
                                np.asarray(dc.value.centroids))


# ------------------------------------------------------- false positives

@pytest.mark.parametrize("clusters, bits, hashes", [(15, 6, 3), (3, 5, 4), (1, 3, 2)])
def test_false_positive_rate_is_binomial(clusters, bits, hashes):
  """``K / 2^t`` of the pruned positions decode to a centroid, each equally.

  The bound (5 standard deviations of the binomial) is tight enough to fail:
  an off-by-one decoder ((K+1)/2^t or (K-1)/2^t) is more than 5 of them
  away, which is asserted too.
  """
  w, mask = _layer((1000, 400), 0.05, clusters, seed=3)
  node = W.encode(w, bits=bits, hashes=hashes)
  dense = np.asarray(node.materialize())
  zeros = ~mask
  n = int(zeros.sum())
  fp = int(np.count_nonzero(dense[zeros]))
  p = W.false_positive_rate(clusters, bits)
  assert p == clusters / 2 ** bits

  def z(q):
    return abs(fp - n * q) / math.sqrt(n * q * (1 - q))

  assert z(p) < 5, (fp, n * p)
  assert z((clusters + 1) / 2 ** bits) > 5
  if clusters > 1:
    assert z((clusters - 1) / 2 ** bits) > 5
  # Each centroid takes 1/2^t of the pruned positions.
  q = 1 / 2 ** bits
  for c in np.asarray(node.centroids):
    count = int(np.count_nonzero(dense[zeros] == c))
    assert abs(count - n * q) < 5 * math.sqrt(n * q * (1 - q)), (c, count)


# ----------------------------------------------------- seeds and retries

def test_same_seed_gives_identical_bytes(tmp_path):
  w, _ = _layer((50, 40), 0.1, 7)
  for name in ("a", "b"):
    cx.save(tmp_path / f"{name}.cx", {"w": W.encode(w, bits=5, seed=11)})
  assert (tmp_path / "a.cx").read_bytes() == (tmp_path / "b.cx").read_bytes()
  other = W.encode(w, bits=5, seed=12)
  assert not np.array_equal(np.asarray(other.table),
                            np.asarray(W.encode(w, bits=5, seed=11).table))


def test_failed_peel_retries_with_the_next_seed_and_records_it():
  rng = np.random.default_rng(0)
  n = 3000
  keys = np.sort(rng.choice(100_000, n, replace=False))
  w = np.zeros(100_000, np.float32)
  w[keys] = rng.integers(1, 8, n).astype(np.float32)
  vals = w[keys].astype(np.int64)  # the codes are values - 1 (sorted 1..7)
  overhead = 1.21  # just under k = 3's peeling threshold: some seeds fail
  m = 3 * -(-(math.ceil(overhead * n) + 32) // 3)
  ok = [_bloomier._build(keys, vals, m, 3, 4, s) is not None for s in range(30)]
  first_fail = ok.index(False)
  next_ok = ok.index(True, first_fail)
  node = W.encode(w, bits=4, seed=first_fail, overhead=overhead)
  assert node.seed == next_ok
  np.testing.assert_array_equal(np.asarray(node.materialize())[keys], w[keys])
  with pytest.raises(ValueError, match=r"layer: no peelable filter .* raise overhead"):
    W.encode(w, bits=4, seed=first_fail, overhead=overhead,
             max_tries=next_ok - first_fail, path="layer")


def test_encoder_is_fast_on_a_lenet_sized_layer():
  import time
  w, mask = _layer((266_610,), 1.0, 31)
  start = time.perf_counter()
  node = W.encode(w, bits=8)
  assert time.perf_counter() - start < 20
  np.testing.assert_array_equal(np.asarray(node.materialize()), w)


# ------------------------------------------------------------ bad input

@pytest.mark.parametrize("kwargs, match", [
    (dict(bits=3), r"w: 8 clusters do not fit 3-bit cells"),
    (dict(bits=0), r"w: bits must be an int in \[1, 16\]"),
    (dict(bits=8, hashes=1), r"w: hashes must be an int in \[2, 8\]"),
    (dict(bits=8, overhead=0.5), r"w: overhead must be a finite number >= 1"),
    (dict(bits=8, seed=-1), r"w: seed must be an int"),
])
def test_bad_settings_name_the_leaf(kwargs, match):
  w, _ = _layer((20, 20), 0.5, 8)
  with pytest.raises(ValueError, match=match):
    W.encode(w, path="w", **kwargs)


def test_wrong_input_types():
  with pytest.raises(TypeError, match="w: expected a floating-point array"):
    W.encode(np.ones((3, 3), np.int32), path="w")
  q = cx.quantize.quantize(jnp.ones((4, 4)), 4)
  with pytest.raises(TypeError, match="w: encode takes a MaskedArray"):
    W.encode(q, path="w")


def test_empty_layer():
  node = W.encode(np.zeros((10, 10), np.float32), bits=4)
  assert node.n_cells == 33
  assert np.asarray(node.materialize()).shape == (10, 10)


# ------------------------------------------------------------ files

def test_save_load_round_trip_is_bit_exact(tmp_path):
  w, _ = _layer((64, 48), 0.1, 5)
  node = W.encode(w, bits=6, hashes=4, seed=3)
  cx.save(tmp_path / "m.cx", {"w": node, "b": np.arange(3, dtype=np.float32)})
  back = cx.load(tmp_path / "m.cx", keep_compressed=True)["w"]
  assert isinstance(back, W.BloomierArray)
  assert (back.seed, back.hashes, back.bits) == (3, 4, 6)
  np.testing.assert_array_equal(np.asarray(back.table), np.asarray(node.table))
  assert np.asarray(back.table).dtype == np.asarray(node.table).dtype
  np.testing.assert_array_equal(np.asarray(back.centroids), np.asarray(node.centroids))
  dense = cx.load(tmp_path / "m.cx")["w"]
  np.testing.assert_array_equal(dense, np.asarray(node.materialize()))
  # The file stores m * t bits of cells (less once entropy coded), the
  # float32 codebook and no positions.
  leaf = {s.path: s for s in cx.size_report(tmp_path / "m.cx").leaves}["w"]
  assert leaf.kind == "BloomierArray" and leaf.index_bytes == 0
  raw = math.ceil(node.n_cells * 6 / 8) + 4 * node.n_clusters
  assert leaf.value_bytes_raw == raw and leaf.value_bytes <= raw


def test_materialize_under_jit():
  w, _ = _layer((30, 30), 0.2, 3)
  node = W.encode(w, bits=4)
  np.testing.assert_array_equal(np.asarray(jax.jit(lambda n: n.materialize())(node)),
                                np.asarray(node.materialize()))


def _meta(**kw):
  def edit(tree):
    dict(tree["items"])["w"]["meta"].update(kw)
  return edit


@pytest.mark.parametrize("edit, match", [
    (_meta(bits=2), r"w: ValueError: a code does not fit in 2 bits"),
    (_meta(bits=40), r"w: ValueError: bits must be an int in \[1, 16\]"),
    (_meta(hashes=4), r"w: ValueError: table of \d+ cells is not a positive multiple"),
    (_meta(hashes=1), r"w: ValueError: hashes must be an int in \[2, 8\]"),
    (_meta(seed=-5), r"w: ValueError: seed must be an int"),
    (_meta(shape=[1 << 16, 1 << 16]), r"w: ValueError: a Bloomier filter hashes 32-bit"),
])
def test_forged_files_are_refused(tmp_path, edit, match):
  w, _ = _layer((30, 30), 0.2, 7)
  cx.save(tmp_path / "n.cx", {"w": W.encode(w, bits=5)})
  bad = _forge((tmp_path / "n.cx").read_bytes(), edit)
  for keep in (True, False):
    with pytest.raises(cx.CorruptFileError, match="n.cx: " + match):
      _load.loads(bad, "n.cx", keep_compressed=keep)


def test_huge_shape_is_refused_before_allocating(tmp_path):
  """A valid-looking 2^31-position layer: the element limit stops the decode."""
  w, _ = _layer((30, 30), 0.2, 7)
  cx.save(tmp_path / "n.cx", {"w": W.encode(w, bits=5)})
  bad = _forge((tmp_path / "n.cx").read_bytes(), _meta(shape=[1 << 16, 1 << 15]))
  with pytest.raises(cx.io.LimitExceededError, match="w: materializing the node"):
    _load.loads(bad, "n.cx")


def test_corrupted_payload_is_refused(tmp_path):
  w, _ = _layer((30, 30), 0.2, 7)
  cx.save(tmp_path / "n.cx", {"w": W.encode(w, bits=5)})
  data = bytearray((tmp_path / "n.cx").read_bytes())
  data[-3] ^= 0x10
  with pytest.raises(cx.CorruptFileError):
    _load.loads(bytes(data), "n.cx")


# ------------------------------------------------ freezing and the loop

def test_freeze_zeroes_only_the_frozen_updates():
  params = {"a": jnp.ones((3, 2)), "b": jnp.full((2,), 2.0)}
  grads = {"a": jnp.full((3, 2), 0.5), "b": jnp.full((2,), -1.0)}
  inner = optax.chain(optax.add_decayed_weights(0.1),
                      optax.sgd(1e-2, momentum=0.9))
  tx = W.freeze(inner, r"^a$")
  ref_u, _ = inner.update(grads, inner.init(params), params)
  u, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_array_equal(np.asarray(u["a"]), np.zeros((3, 2)))
  np.testing.assert_array_equal(np.asarray(u["b"]), np.asarray(ref_u["b"]))
  with pytest.raises(ValueError, match="freeze: say which leaves"):
    W.freeze(inner, None)


def _net():
  rng = np.random.default_rng(1)
  a, _ = _layer((20, 16), 0.3, 3, seed=1)
  b, _ = _layer((16, 8), 0.3, 3, seed=2)
  c = rng.normal(size=(8, 4)).astype(np.float32)
  return {"a": jnp.asarray(a), "b": jnp.asarray(b), "c": jnp.asarray(c)}


def test_freeze_and_retrain_encodes_in_rule_order_and_freezes():
  params = _net()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(32, 20)), jnp.float32)

  def loss(p):
    return jnp.mean((jnp.tanh(jnp.tanh(x @ p["a"]) @ p["b"]) @ p["c"]) ** 2)

  calls = []

  def retrain(p, frozen):
    calls.append({k: bool(v) for k, v in frozen.items()})
    # b stays clustered: only c trains; frozen leaves through cx.weightless.freeze.
    trainable = {"a": False, "b": False, "c": not frozen["c"]}
    tx = W.freeze(optax.sgd(0.1), jax.tree_util.tree_map(lambda t: not t, trainable))
    state = tx.init(p)
    for _ in range(3):
      u, state = tx.update(jax.grad(loss)(p), state, p)
      p = optax.apply_updates(p, u)
    return p

  plan = cx.Plan([("b", cx.methods.Weightless(bits=4)),
                  ("a", cx.methods.Weightless(bits=5))])
  before_c = np.asarray(params["c"])
  out = W.freeze_and_retrain(params, plan, retrain)
  assert calls == [{"a": False, "b": True, "c": False},
                   {"a": True, "b": True, "c": False}]
  assert isinstance(out["a"], W.BloomierArray) and isinstance(out["b"], W.BloomierArray)
  assert out["a"].bits == 5 and out["b"].bits == 4
  assert not np.array_equal(np.asarray(out["c"]), before_c)
  for k in ("a", "b"):
    keep = np.asarray(params[k]) != 0
    np.testing.assert_array_equal(np.asarray(out[k].materialize())[keep],
                                  np.asarray(params[k])[keep])


def test_freeze_and_retrain_refuses_a_changed_frozen_layer():
  plan = cx.Plan({"a": cx.methods.Weightless(bits=5)})

  def retrain(p, frozen):
    return {**p, "a": p["a"] + 1.0}

  with pytest.raises(ValueError, match=r"\['a'\]: freeze_and_retrain: retrain changed"):
    W.freeze_and_retrain(_net(), plan, retrain)
  with pytest.raises(TypeError, match="must give cx.methods.Weightless"):
    W.freeze_and_retrain(_net(), cx.Plan({"a": cx.methods.Uniform(4)}),
                         lambda p, f: p)


def test_weightless_method_in_a_plan_is_frozen_and_finalizes_to_a_filter():
  params = _net()
  plan = cx.Plan({"a": cx.methods.Weightless(bits=5), "c": cx.methods.Uniform(4)})
  train = plan.init(params)
  tx = plan.optimizer(optax.sgd(0.1))
  state = tx.init(train)
  grads = jax.tree_util.tree_map(jnp.ones_like, train)
  u, _ = tx.update(grads, state, train)
  np.testing.assert_array_equal(np.asarray(u["params"]["a"]), 0)
  assert np.all(np.asarray(u["params"]["c"]) != 0)
  node = plan.finalize(train)["a"]
  assert isinstance(node, W.BloomierArray)
  with pytest.raises(TypeError, match="bits must be a Python int"):
    cx.methods.Weightless(bits=5.0)
