"""experiments.bert_nm on a tiny random BERT of the MiniLM class (no download)."""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import compressax as cx
from experiments import bert_nm
from experiments import oneshot
from experiments.llm import models as models_lm


@pytest.fixture(autouse=True)
def _standard_promotion():
  with jax.numpy_dtype_promotion("standard"):  # optax's schedules
    yield


CFG = models_lm.BertConfig(vocab=60, width=16, layers=2, heads=2, ffn=32, positions=16)


def _setup(seed=0):
  model = models_lm.Bert(CFG)
  params = model.init(jax.random.PRNGKey(seed))
  rng = np.random.default_rng(seed)
  batches = []
  for _ in range(4):
    tokens = rng.integers(1, CFG.vocab, (8, 12)).astype(np.int32)
    mask = (np.arange(12)[None, :] < rng.integers(3, 13, (8, 1))).astype(np.float32)
    batches.append((tokens, mask))
  return model, params, batches


def _args(**kw):
  base = dict(steps=40, lr=3e-3, emb_weight=1.0, seed=0, quiet=True)
  return argparse.Namespace(**{**base, **kw})


def test_distillation_keeps_2of4_zeros_and_4bit_codes_and_recovers():
  model, params, batches = _setup()
  plan = bert_nm.plan_of(2, 4, 4)
  start = plan.finalize(plan.init(oneshot.to_tree(params)))
  tree, losses = bert_nm.distill(model, params, params, batches, _args(), plan)
  assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
  nodes = {cx.path_str(p): v for p, v in
           jax.tree_util.tree_leaves_with_path(tree, is_leaf=cx.is_compressed)}
  kernels = [p for p in nodes if p.endswith("kernel")]
  assert len(kernels) == 12  # q k v o up down in 2 blocks
  for p in kernels:
    node = nodes[p]
    assert isinstance(node, cx.prune.MaskedArray), p
    w = np.asarray(node.materialize())
    # Exactly 2 kept of every 4 along the input axis, and the kept weights on
    # a symmetric 4-bit grid per output channel: at most 15 distinct values.
    g = w.reshape(w.shape[0] // 4, 4, w.shape[1])
    assert np.all(np.sum(g != 0, axis=1) <= 2), p
    assert np.all(np.asarray(node.mask).reshape(g.shape).sum(1) == 2), p
    for col in w.T:
      assert len(np.unique(col)) <= 16, p
  # Distillation moves the student toward the teacher's embeddings.
  evals = batches[:2]
  ref = bert_nm.embed_all(model, params, evals)
  cos = lambda t: float(np.mean(np.sum(  # noqa: E731
      bert_nm.embed_all(model, oneshot.from_tree(cx.materialize(t)), evals) * ref, -1)))
  assert cos(tree) > cos(start)


def test_measure_reads_the_file(tmp_path):
  model, params, batches = _setup(1)
  plan = bert_nm.plan_of(2, 4, 4)
  tree = plan.finalize(plan.init(oneshot.to_tree(params)))
  path = str(tmp_path / "m.cx")
  cx.save(path, tree)
  ref = bert_nm.embed_all(model, params, batches)
  r = bert_nm.measure(model, params, path, batches, ref, 3)
  decoded = oneshot.from_tree(cx.load(path))
  emb = bert_nm.embed_all(model, decoded, batches)
  assert r["mean_cosine_to_float"] == pytest.approx(float(np.mean(np.sum(emb * ref, -1))))
  assert r["neighbour_recall"] == oneshot.neighbour_recall(ref, emb, 3)
  rows = [s for s in cx.size_report(path).leaves if s.path.endswith("kernel")]
  assert r["kernel_bytes"] == sum(s.value_bytes + s.index_bytes for s in rows)
  assert r["kernel_fp32_bytes"] == 4 * 2 * (4 * 16 * 16 + 2 * 16 * 32)
  assert r["kernel_ratio"] > 4  # 2 of 4 kept at 4 bits, before index costs


def test_hidden_states_match_the_model():
  model, params, batches = _setup(2)
  tokens, mask = batches[0]
  hs, emb = bert_nm.hidden_states(model, params, jnp.asarray(tokens), jnp.asarray(mask))
  assert len(hs) == CFG.layers and hs[-1].shape == (8, 12, CFG.width)
  np.testing.assert_allclose(emb, model(params, tokens, mask), atol=1e-6)


def test_bad_flags(capsys):
  for bad in (["--n-m", "4:2"], ["--n-m", "x"], ["--bits", "1"], ["--steps", "0"],
              ["--init", "oneshot", "--no-oneshot"]):
    with pytest.raises(SystemExit):
      bert_nm.parse_args(bad)
  assert "--n-m must be N:M" in capsys.readouterr().err


def test_float16_scales_shrink_the_kernels_and_keep_the_model(tmp_path):
  model, params, batches = _setup(1)
  ref = bert_nm.embed_all(model, params, batches)
  out = {}
  for dt in ("float32", "float16"):
    plan = bert_nm.plan_of(2, 4, 4, dt)
    tree = plan.finalize(plan.init(oneshot.to_tree(params)))
    path = str(tmp_path / f"{dt}.cx")
    cx.save(path, tree)
    out[dt] = bert_nm.measure(model, params, path, batches, ref, 3)
    masked = lambda x: isinstance(x, cx.prune.MaskedArray)  # noqa: E731
    scales = [n.value.scale for n in jax.tree_util.tree_leaves(tree, is_leaf=masked)
              if masked(n)]
    assert scales and all(s.dtype == jnp.dtype(dt) for s in scales)
  # 2 bytes saved per output channel of every kernel: 2 blocks of q, k, v, o
  # (16 channels each), up (32) and down (16).
  saved = out["float32"]["kernel_bytes"] - out["float16"]["kernel_bytes"]
  assert saved >= 2 * 2 * (4 * 16 + 32 + 16) - 64
  assert out["float16"]["mean_cosine_to_float"] == pytest.approx(
      out["float32"]["mean_cosine_to_float"], abs=1e-3)
  assert bert_nm.parse_args(["--scale-dtype", "float16"]).out.endswith("4b-float16-magnitude")
