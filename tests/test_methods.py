"""The method layer: rules pick a method per leaf, one lifecycle for all."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import compressax as cx

M = cx.methods


class _Net(nn.Module):
  """Embedding, conv and three Dense layers: one method each."""

  @nn.compact
  def __call__(self, tok):
    x = nn.Embed(64, 16)(tok)
    x = nn.relu(nn.Conv(16, (3,))(x)).mean(1)
    x = nn.relu(nn.Dense(32)(x))
    x = nn.relu(nn.Dense(32)(x))
    return nn.Dense(4)(x)


def _data():
  tok = jax.random.randint(jax.random.key(1), (64, 8), 0, 64)
  return tok, tok.sum(1) % 4


def _mixed_plan():
  return cx.Plan([
      (r"Conv_0/kernel", M.KMeans(bits=4)),
      (r"Dense_0/kernel", M.DiffQ(size_penalty=1e-3, group_size=8)),
      (r"Dense_1/kernel", M.NM(2, 4) >> M.Uniform(4, symmetric=True)),
      (r"Dense_2/kernel", M.LSQ(bits=4)),
      (r"Embed_0/embedding", M.LowRank(rank=4) >> M.Uniform(8)),
  ])


@jax.numpy_dtype_promotion("standard")  # optax's Adam bias correction mixes dtypes
def test_mixed_method_model_end_to_end(tmp_path):
  """One model, five methods, one optax chain, one file (issue 11)."""
  model = _Net()
  tok, y = _data()
  params = model.init(jax.random.key(0), tok)
  plan = _mixed_plan()

  def task(p, tok, y):
    return optax.softmax_cross_entropy_with_integer_labels(
        model.apply(p, tok), y).mean()

  train = plan.init(params, jax.random.key(2))
  loss_fn = plan.loss(task)
  tx = optax.chain(optax.clip_by_global_norm(10.0),
                   plan.optimizer(optax.adam(1e-2)))
  state = tx.init(train)

  @jax.jit
  def step(train, state, key):
    loss, g = jax.value_and_grad(loss_fn)(train, key, tok, y)
    u, state = tx.update(g, state, train)
    return optax.apply_updates(train, u), state, loss

  losses = []
  for i in range(40):
    train, state, loss = step(train, state, jax.random.key(i))
    losses.append(float(loss))
  assert losses[-1] < losses[0] - 0.1

  w1 = np.asarray(train["params"]["params"]["Dense_1"]["kernel"])
  assert ((w1 != 0).reshape(8, 4, 32).sum(1) <= 2).all()  # 2:4 held in training

  final = plan.finalize(train)
  kinds = {cx.path_str(p): type(x).__name__ for p, x in
           jax.tree_util.tree_leaves_with_path(final, is_leaf=cx.is_compressed)
           if cx.is_compressed(x)}
  assert kinds == {
      "params/Conv_0/kernel": "CodebookArray",
      "params/Dense_0/kernel": "DiffQArray",
      "params/Dense_1/kernel": "MaskedArray",
      "params/Dense_2/kernel": "LSQArray",
      "params/Embed_0/embedding": "LowRankArray"}
  path = tmp_path / "mixed.cx"
  cx.save(path, final)
  back = cx.load(path)
  dense = cx.materialize(final)
  np.testing.assert_array_equal(task(back, tok, y), task(dense, tok, y))
  # The deterministic methods' views are what the file stores, bit for bit.
  view = plan.view(train, jax.random.key(0))
  for name in ("Conv_0", "Dense_1", "Dense_2"):
    np.testing.assert_array_equal(
        np.asarray(back["params"][name]["kernel"]),
        np.asarray(view["params"][name]["kernel"]), err_msg=name)
  np.testing.assert_allclose(back["params"]["Embed_0"]["embedding"],
                             view["params"]["Embed_0"]["embedding"], atol=1e-6)
  assert path.stat().st_size < 0.35 * sum(
      x.size * 4 for x in jax.tree_util.tree_leaves(params))


@pytest.mark.parametrize("method", [
    M.Uniform(4), M.Uniform(3, bucket_size=16), M.Uniform(4, symmetric=True, axis=1),
    M.LSQ(3), M.Points(8, bucket_size=32), M.NM(2, 4) >> M.Uniform(4, symmetric=True),
    M.Magnitude(0.5) >> M.LSQ(4), M.LowRank(rank=3) >> M.Uniform(8),
    M.LowRank(energy=0.9)],
    ids=lambda m: repr(m)[:40])
def test_view_equals_stored_node(method):
  """``finalize(...).materialize()`` is what ``view`` fed the model."""
  w = jax.random.normal(jax.random.key(3), (16, 8))
  if method.prunes or (isinstance(method, M.Chain) and method.first.prunes):
    w = jnp.where(jnp.abs(w) > 0.5, w, 0.0)  # as the pruning wrapper leaves it
  params = {"layer": {"kernel": w}}
  plan = cx.Plan(method)
  train = plan.init(params, jax.random.key(0))
  view = plan.view(train)["layer"]["kernel"]
  node = plan.finalize(train)["layer"]["kernel"]
  assert cx.is_compressed(node)
  np.testing.assert_array_equal(np.asarray(node.materialize()), np.asarray(view))
  jitted = jax.jit(plan.view)(train)["layer"]["kernel"]
  np.testing.assert_array_equal(np.asarray(jitted), np.asarray(view))


def test_diffq_settings_given_once():
  """Issue 11 item 4: logits, noise, size and codes share one config."""
  w = jax.random.normal(jax.random.key(0), (32, 16))
  method = M.DiffQ(size_penalty=1.0, group_size=8, b_max=8, init_bits=7.5)
  plan = cx.Plan(method)
  train = plan.init({"w": w}, jax.random.key(0))
  node = plan.finalize(train)["w"]
  assert int(np.max(node.bits)) <= 8
  exact = cx.diffq.model_size({"w": w}, {"w": train["aux"]["w"]["logits"]},
                              group_size=8, b_max=8, exact=True, unit="bits")
  assert int(exact) == node.storage_bits()
  assert float(plan.penalty(train)) == pytest.approx(
      float(cx.diffq.model_size({"w": w}, {"w": train["aux"]["w"]["logits"]},
                                group_size=8, b_max=8)), rel=1e-6)


def test_same_key_bit_identical_eager_and_jit():
  model = _Net()
  tok, _ = _data()
  params = model.init(jax.random.key(0), tok)
  plan = _mixed_plan()
  a = plan.init(params, jax.random.key(5))
  b = plan.init(params, jax.random.key(5))
  chex_equal = jax.tree_util.tree_map(
      lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b)
  assert all(jax.tree_util.tree_leaves(chex_equal))
  eager = plan.view(a, jax.random.key(1))
  jitted = jax.jit(plan.view)(a, jax.random.key(1))
  for x, y in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_plan_on_nnx_state():
  class Mlp(nnx.Module):
    def __init__(self, rngs):
      self.a = nnx.Linear(8, 8, rngs=rngs)
      self.b = nnx.Linear(8, 4, rngs=rngs)

  _, state = nnx.split(Mlp(nnx.Rngs(0)))
  plan = cx.Plan({"a/kernel": M.Uniform(4), "b/kernel": M.NM(2, 4)})
  train = plan.init(state)
  view = plan.view(train)
  assert isinstance(view, nnx.State)
  final = plan.finalize(train)
  assert isinstance(final, nnx.State)
  assert type(final["a"]["kernel"].value).__name__ == "QuantizedArray"


def test_rules_first_match_wins_and_unused_rule_is_an_error():
  params = {"enc": {"kernel": jnp.ones((4, 4))}, "dec": {"kernel": jnp.ones((4, 4))}}
  plan = cx.Plan([("kernel", M.Uniform(4)), ("dec", M.Uniform(8))])
  with pytest.raises(ValueError, match="rule 'dec' matches no selected leaf"):
    plan.methods(params)
  plan = cx.Plan([("dec", M.Uniform(8)), ("kernel", M.Uniform(4))])
  methods = plan.methods(params)
  assert methods["dec"]["kernel"].bits == 8 and methods["enc"]["kernel"].bits == 4
  with pytest.raises(ValueError, match="rule 'decoder'"):
    cx.Plan({"decoder": M.Uniform(4)}).methods(params)
  with pytest.raises(TypeError, match="not a compression method"):
    cx.Plan({"dec": 4})


def test_chain_is_checked():
  with pytest.raises(ValueError, match="starts with a pruning method"):
    M.Uniform(4) >> M.Uniform(8)
  with pytest.raises(ValueError, match="second method must be a quantizer"):
    M.NM(2, 4) >> M.Magnitude(0.5)
  with pytest.raises(ValueError, match="two phases"):
    M.Magnitude(0.5) >> M.KMeans(4)
  with pytest.raises(ValueError, match=r"bits must be in \[1, 16\]"):
    M.Uniform(17)
  with pytest.raises(ValueError, match="sparsity"):
    M.Magnitude(1.0)
  with pytest.raises(ValueError, match="n <= m"):
    M.NM(5, 4)


# -- one form for per-leaf settings (issue 11 item 2) ---------------------------

def _two_layer():
  k = jax.random.split(jax.random.key(0), 2)
  return {"conv": {"kernel": jax.random.normal(k[0], (3, 3, 4, 8))},
          "dense": {"kernel": jax.random.normal(k[1], (32, 16))}}


def test_per_leaf_forms_agree():
  p = _two_layer()
  want = {"conv": {"kernel": 0.5}, "dense": {"kernel": 0.9}}
  assert cx.per_leaf(p, {"conv": 0.5, "dense": 0.9}) == want
  assert cx.per_leaf(p, [("conv", 0.5), (lambda path, x: True, 0.9)]) == want
  assert cx.per_leaf(p, [cx.Rule("conv/kernel", 0.5), cx.Rule("dense", 0.9)]) == want
  assert cx.per_leaf(p, want) == want
  assert cx.per_leaf(p, lambda path, x: 0.5 if x.ndim == 4 else 0.9) == want


@pytest.mark.parametrize("call", [
    lambda p, s: cx.prune.magnitude_mask(p, s),
    lambda p, s: cx.prune.sparsity_from_patterns(p, s),
    lambda p, s: cx.quantize.weight_share_tree(p, {k: 4 for k in s}),
    lambda p, s: cx.lowrank.factorize_tree(p, rank={k: 2 for k in s}),
    lambda p, s: cx.optim.init_points(p, {k: 4 for k in s}),
    lambda p, s: cx.optim.weight_sharing(optax.sgd(0.1), bits={k: 2 for k in s}).init(p),
], ids=["magnitude_mask", "sparsity_from_patterns", "weight_share_tree",
        "factorize_tree", "init_points", "weight_sharing"])
def test_every_per_leaf_setting_takes_rules(call):
  """Regex rules work everywhere, and a rule matching nothing is an error."""
  p = _two_layer()
  call(p, {"conv": 0.5, r"dense/kernel$": 0.75})           # regexes
  call(p, {"conv/kernel": 0.5, "dense/kernel": 0.75})       # exact paths
  with pytest.raises(ValueError, match="'denser' matches no selected leaf"):
    call(p, {"conv": 0.5, "dense": 0.75, "denser": 0.1})


def test_skip_marker_walks_with_params():
  """Issue 11 item 3: one marker, and map_selected serves side trees."""
  p = _two_layer()
  p["dense"]["bias"] = jnp.zeros(16)
  side = cx.per_leaf(p, {"dense": 2.0}, default=cx.SKIP)
  assert side["conv"]["kernel"] is cx.SKIP and side["dense"]["bias"] is cx.SKIP
  out = cx.map_selected(lambda kp, x, s: x * s, p, side,
                        where=lambda path, x: True)
  np.testing.assert_array_equal(out["dense"]["kernel"], p["dense"]["kernel"] * 2)
  assert out["conv"]["kernel"] is p["conv"]["kernel"]
  assert out["dense"]["bias"] is p["dense"]["bias"]
  # A side tree with markers goes through jit and plain tree_maps unchanged.
  back = jax.jit(lambda t: jax.tree_util.tree_map(lambda v: v + 1, t))(side)
  assert back["conv"]["kernel"] is cx.SKIP and float(back["dense"]["kernel"]) == 3.0
  assert cx.Plan({"dense/kernel": M.Uniform(4)}).init(p)["aux"]["conv"]["kernel"] is cx.SKIP


def test_where_regex_that_matches_nothing_is_an_error():
  """Issue 11 item 8: a typo in ``where`` no longer compresses nothing."""
  p = _two_layer()
  with pytest.raises(ValueError, match="'Dense_0' matches no leaf"):
    cx.prune.magnitude_mask(p, 0.5, where="Dense_0")
  with pytest.raises(ValueError, match="matches no leaf"):
    cx.quantize.apply(p, lambda x: x, where="kernal")


# -- adding a method (the worked example of docs/design.md) ---------------------

@cx.compressed_leaf
@dataclasses.dataclass(frozen=True)
class SignArray(cx.CompressedLeaf):
  """Sign bits and one scale: ``w ~= scale * sign(w)`` (XNOR-Net style)."""
  signs: jax.Array  # bool
  scale: jax.Array  # float32 scalar
  shape: tuple = dataclasses.field(metadata=dict(static=True))
  dtype: np.dtype = dataclasses.field(metadata=dict(static=True))

  def materialize(self):
    return jnp.where(self.signs, self.scale, -self.scale).astype(self.dtype)

  def storage_bits(self):
    return int(np.size(self.signs)) + 32


@jax.custom_vjp
def _sign_ste(w):
  return jnp.where(w >= 0, 1.0, -1.0).astype(w.dtype) * jnp.mean(jnp.abs(w))


_sign_ste.defvjp(lambda w: (_sign_ste(w), None), lambda _, g: (g,))


@dataclasses.dataclass(frozen=True)
class Sign(cx.methods.Method):
  """1-bit weights: the view and the node agree bit for bit."""

  def view(self, w, aux, key):
    return _sign_ste(w)

  def finalize(self, path, w, aux):
    return SignArray(w >= 0, jnp.mean(jnp.abs(w)).astype(jnp.float32),
                     tuple(w.shape), np.dtype(w.dtype))


def test_a_new_method_in_a_few_dozen_lines(tmp_path):
  w = jax.random.normal(jax.random.key(0), (64, 32))
  params = {"a": {"kernel": w}, "b": {"kernel": w + 1}}
  plan = cx.Plan({"a/kernel": Sign(), "b/kernel": M.Uniform(4)})
  train = plan.init(params)
  tx = plan.optimizer(optax.sgd(0.1))
  state = tx.init(train)
  g = jax.grad(lambda t: jnp.sum(plan.view(t)["a"]["kernel"] ** 2))(train)
  u, state = tx.update(g, state, train)
  train = optax.apply_updates(train, u)
  final = plan.finalize(train)
  cx.save(tmp_path / "s.cx", final)
  back = cx.load(tmp_path / "s.cx")
  np.testing.assert_array_equal(back["a"]["kernel"],
                                np.asarray(plan.view(train)["a"]["kernel"]))
  assert final["a"]["kernel"].storage_bits() == 64 * 32 + 32


def test_plan_errors_name_the_leaf():
  params = {"a": {"kernel": jnp.array([[1.0, jnp.nan], [0.0, 1.0]])}}
  with pytest.raises(ValueError, match=r"\['a'\]\['kernel'\].*NaN"):
    cx.Plan(M.DiffQ()).init(params)
  with pytest.raises(TypeError, match="Plan.init"):
    cx.Plan(M.Uniform(4)).view(params)


ALL_METHODS = [M.Uniform(4), M.LSQ(4), M.KMeans(3), M.KMeans(3, pruned=True),
               M.Points(8, bucket_size=None), M.DiffQ(group_size=4),
               M.Magnitude(0.5), M.NM(2, 4), M.Channel(0.5), M.LowRank(rank=2),
               M.NM(2, 4) >> M.Uniform(4, symmetric=True)]


@pytest.mark.parametrize("method", ALL_METHODS, ids=lambda m: repr(m)[:32])
@jax.numpy_dtype_promotion("standard")  # optax.adam (DiffQ's logits)
def test_every_method_trains_eagerly_and_jitted_and_saves(method, tmp_path):
  """Each method's lifecycle over a tree with untouched leaves (SKIP in aux)."""
  k = jax.random.split(jax.random.key(0), 2)
  w = jax.random.normal(k[0], (16, 8))
  w = jnp.where(jnp.abs(w) > 0.3, w, 0.0)  # KMeans(pruned=True) reads zeros
  params = {"a": {"kernel": w, "bias": jnp.zeros(8)},
            "b": {"kernel": jax.random.normal(k[1], (8, 4))}}
  plan = cx.Plan({"a/kernel": method})
  tx = plan.optimizer(optax.sgd(0.05))

  def task(p):
    return jnp.sum(jnp.tanh(jnp.ones((2, 16)) @ p["a"]["kernel"] @ p["b"]["kernel"]))

  loss_fn = plan.loss(task)

  def step(train, state, key):
    g = jax.grad(loss_fn)(train, key)
    u, state = tx.update(g, state, train)
    return optax.apply_updates(train, u), state

  results = []
  for run in (step, jax.jit(step)):
    train = plan.init(params, jax.random.key(1))
    assert train["aux"]["a"]["bias"] is cx.SKIP
    state = tx.init(train)
    for i in range(3):
      train, state = run(train, state, jax.random.key(i))
    results.append(train)
  for x, y in zip(jax.tree_util.tree_leaves(results[0]),
                  jax.tree_util.tree_leaves(results[1])):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
  final = plan.finalize(results[1])
  assert cx.is_compressed(final["a"]["kernel"])
  cx.save(tmp_path / "m.cx", final)
  back = cx.load(tmp_path / "m.cx")
  np.testing.assert_array_equal(back["a"]["kernel"],
                                np.asarray(final["a"]["kernel"].materialize()))
  assert back["b"]["kernel"].shape == (8, 4)
