"""experiments.lm: the tokenizer, the model, evaluation, training and the cache."""

import argparse
import json
import math
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import compressax as cx
from experiments import lm

SHAKESPEARE = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
TINY = lm.LMConfig(vocab=50, width=16, layers=2, heads=2, ffn=32, context=8, dropout=0.0)


def test_words_splits_words_newlines_and_punctuation():
  assert lm.words("First Citizen:\nWe're ALL -- resolved, 'tis") == [
      "first", "citizen", ":", "\n", "we're", "all", "-", "-", "resolved", ",",
      "'", "tis"]


def test_corpus_vocabulary_split_and_unknowns(tmp_path):
  text = "b a b c\n" * 9 + "a d d d d\n" * 1
  path = tmp_path / "t.txt"
  path.write_text(text)
  c = lm.load_corpus(str(path), vocab_size=3)
  cut = int(0.9 * len(text))
  # Ranked by count in the first 90% of the characters (b 18, a 10, then
  # c and the newline 9 each), ties by the word.
  assert c.vocab == ("<unk>", "b", "a")
  assert lm.load_corpus(str(path), vocab_size=4).vocab == ("<unk>", "b", "a", "\n")
  train = lm.words(text[:cut])
  assert len(c.train) == len(train) and len(c.val) == len(lm.words(text[cut:]))
  idx = {w: i for i, w in enumerate(c.vocab)}
  np.testing.assert_array_equal(c.train, [idx.get(w, 0) for w in train])
  chars = lm.load_corpus(str(path), level="char")
  assert "".join(chars.vocab[i] for i in chars.train) == text[:cut]
  with pytest.raises(ValueError, match="vocab_size"):
    lm.load_corpus(str(path), vocab_size=1)
  with pytest.raises(ValueError, match="level"):
    lm.load_corpus(str(path), level="byte")


@pytest.mark.skipif(not SHAKESPEARE.exists(), reason="../shared/data is not beside the checkout")
def test_shakespeare_vocabulary_covers_most_training_tokens():
  c = lm.load_corpus(str(SHAKESPEARE), vocab_size=10_000)
  assert len(c.vocab) == 10_000
  assert np.mean(c.train == 0) < 0.01  # the docstring's 99.4% coverage
  assert len(c.train) > 8 * len(c.val) > 0


def test_model_is_causal_and_tied():
  model = lm.WordLM(TINY)
  params = lm.init(TINY)
  names = {cx.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)}
  assert not any("head" in n or "lm_head" in n for n in names)  # no output kernel
  x = jax.random.randint(jax.random.PRNGKey(1), (2, 8), 0, TINY.vocab)
  y = x.at[:, 5].set((x[:, 5] + 1) % TINY.vocab)
  a, b = model.apply(params, x), model.apply(params, y)
  np.testing.assert_allclose(a[:, :5], b[:, :5], atol=1e-6)
  assert not np.allclose(a[:, 5:], b[:, 5:])
  # The output layer is the embedding: logits = h @ E^T, so zeroing a row of
  # E makes that token's logit 0 everywhere once its input rows are not used.
  p2 = jax.tree_util.tree_map(lambda v: v, params)
  p2["params"]["embed"]["embedding"] = params["params"]["embed"]["embedding"].at[49].set(0)
  z = jnp.where(x == 49, 0, x)
  np.testing.assert_allclose(model.apply(p2, z)[..., 49], 0, atol=1e-6)


def _nll_reference(model, params, ids):
  ctx = model.config.context
  w = lm.windows(ids, ctx)
  logits = np.asarray(model.apply(params, w[:, :-1]), np.float64)
  logz = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
  picked = np.take_along_axis(logits, w[:, 1:, None], -1)[..., 0]
  return float(np.mean(logz - picked))


def test_evaluate_matches_float64_reference_with_a_padded_last_batch():
  model = lm.WordLM(TINY)
  params = lm.init(TINY, seed=3)
  ids = np.random.default_rng(0).integers(0, TINY.vocab, 8 * 7 + 1).astype(np.int32)
  assert len(lm.windows(ids, 8)) == 7
  got = lm.evaluate(model, params, ids, batch=3)  # 3 + 3 + 1 (padded)
  assert got == pytest.approx(_nll_reference(model, params, ids), rel=1e-5)
  # Decoded first: a compressed tree evaluates as its materialized weights.
  q = cx.map_selected(lambda p, w: cx.quantize.quantize(w, 4, path=p), params)
  assert any(cx.is_compressed(v) for v in jax.tree_util.tree_leaves(q, is_leaf=cx.is_compressed))
  assert lm.evaluate(model, q, ids, batch=4) == pytest.approx(
      _nll_reference(model, cx.materialize(q), ids), rel=1e-5)


@pytest.fixture(autouse=True)
def _standard_promotion():
  """optax's schedules add Python floats to int32 step counts."""
  with jax.numpy_dtype_promotion("standard"):
    yield


def test_train_lowers_the_loss_and_is_deterministic():
  model = lm.WordLM(TINY)
  ids = np.tile(np.arange(20, dtype=np.int32), 50)  # a memorisable sequence
  start = lm.evaluate(model, lm.init(TINY), ids)
  tx = lm.cosine_adamw(1e-2, 60, 5)
  a, hist = lm.train(model, lm.init(TINY), tx, ids, steps=60, batch=8, seed=4,
                     val=ids, eval_every=30, quiet=True)
  b, _ = lm.train(model, lm.init(TINY), tx, ids, steps=60, batch=8, seed=4, quiet=True)
  assert hist["val_step"] == [30, 60] and hist["step"] == [30, 60]
  assert hist["val_loss"][-1] < 0.5 * start
  for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(u, v)


def test_main_trains_once_then_loads_the_cache(tmp_path):
  text = (SHAKESPEARE.read_text()[:20_000] if SHAKESPEARE.exists()
          else "to be or not to be, that is the question:\n" * 400)
  data = tmp_path / "t.txt"
  data.write_text(text)
  flags = ["--data", str(data), "--vocab", "100", "--width", "16", "--layers", "1",
           "--heads", "2", "--ffn", "32", "--context", "16", "--steps", "20",
           "--batch", "4", "--cache", str(tmp_path / "cache"), "--quiet"]
  first = lm.main(flags + ["--out", str(tmp_path / "a")])
  cached = list((tmp_path / "cache").glob("*.cx"))
  assert len(cached) == 1
  mtime = os.path.getmtime(cached[0])
  second = lm.main(flags + ["--out", str(tmp_path / "b")])
  assert os.path.getmtime(cached[0]) == mtime  # loaded, not retrained
  assert second["val_loss"] == first["val_loss"]
  with open(tmp_path / "a" / "results.json") as f:
    saved = json.load(f)
  assert saved["val_perplexity"] == pytest.approx(math.exp(saved["val_loss"]))
  model, corpus, _ = lm.setup(lm.parse_args(flags))
  assert saved["val_loss"] == lm.evaluate(model, cx.load(str(cached[0])), corpus.val)
  assert saved["params"] == lm.param_count(cx.load(str(cached[0])))
  assert (tmp_path / "a" / "loss.png").exists()
  # Another seed is another model.
  lm.main(flags + ["--seed", "1", "--out", str(tmp_path / "c")])
  assert len(list((tmp_path / "cache").glob("*.cx"))) == 2


def test_model_seed_fixes_the_float_model_and_frees_the_fine_tuning(tmp_path):
  data = tmp_path / "t.txt"
  data.write_text("to be or not to be, that is the question:\n" * 50)
  p = argparse.ArgumentParser()
  lm.add_lm_args(p)
  lm.add_model_seed_arg(p)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--quiet", action="store_true")
  base = ["--data", str(data), "--vocab", "20", "--width", "16", "--layers", "1",
          "--heads", "2", "--ffn", "32", "--context", "8", "--steps", "3",
          "--batch", "2", "--cache", str(tmp_path / "cache"), "--quiet"]
  seed0 = p.parse_args(base)
  _, corpus, config = lm.setup(seed0)
  key = lm._cache_key(seed0, config)
  fixed = p.parse_args(base + ["--seed", "2", "--model-seed", "0"])
  free = p.parse_args(base + ["--seed", "2"])
  assert (lm.model_seed(fixed), lm.model_seed(free)) == (0, 2)
  assert lm._cache_key(fixed, config) == key
  assert lm._cache_key(free, config) != key
  model = lm.WordLM(config)
  a, _ = lm.pretrained(seed0, model, corpus)
  b, _ = lm.pretrained(fixed, model, corpus)  # the same cached model
  assert len(list((tmp_path / "cache").glob("*.cx"))) == 1
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
