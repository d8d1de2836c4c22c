"""The experiments' data loaders, models and training/results utilities."""

import argparse
import contextlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import data as data_lib
from experiments import models as models_lib
from experiments import train as train_lib


# -- models -------------------------------------------------------------------

def _count(name, image_shape=(28, 28, 1)):
  shapes = models_lib.param_shapes(models_lib.get_model(name), image_shape)
  return models_lib.param_count(shapes)


def test_lenet300_param_count_matches_paper():
  # 784*300+300 + 300*100+100 + 100*10+10 (Han et al. 2016, Table 1).
  assert _count("lenet300") == 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
  assert _count("lenet300") == 266_610


def test_lenet5_param_count_matches_paper():
  conv1 = 5 * 5 * 1 * 20 + 20
  conv2 = 5 * 5 * 20 * 50 + 50
  ip1 = 4 * 4 * 50 * 500 + 500
  ip2 = 500 * 10 + 10
  assert _count("lenet5") == conv1 + conv2 + ip1 + ip2 == 431_080


def test_teacher_mlp_dropout_only_in_training():
  model = models_lib.TeacherMLP(width=16)
  v = models_lib.init(model, (8, 8, 1), train_lib.prng_key(0))
  x = jax.random.uniform(jax.random.key(1), (4, 8, 8, 1))
  a = model.apply(v, x)
  np.testing.assert_array_equal(a, model.apply(v, x))
  b = model.apply(v, x, train=True, rngs={"dropout": jax.random.key(2)})
  assert not np.allclose(a, b)


def test_lenet300_flattens_in_nhwc_order():
  model = models_lib.get_model("lenet300")
  v = models_lib.init(model, (2, 2, 3), train_lib.prng_key(0))
  x = np.arange(12, dtype=np.float32).reshape(1, 2, 2, 3) / 12
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), v["params"])
  h = np.maximum(x.reshape(1, -1) @ p["ip1"]["kernel"] + p["ip1"]["bias"], 0)
  h = np.maximum(h @ p["ip2"]["kernel"] + p["ip2"]["bias"], 0)
  ref = h @ p["ip3"]["kernel"] + p["ip3"]["bias"]
  np.testing.assert_allclose(model.apply(v, x), ref, rtol=1e-4, atol=1e-5)


def test_unknown_model_is_an_error():
  with pytest.raises(ValueError, match="unknown model 'vgg'"):
    models_lib.get_model("vgg")


# -- data ---------------------------------------------------------------------

def test_digits_shapes_ranges_and_stratified_split():
  ds = data_lib.load_dataset("digits")
  assert ds.x_train.shape == (1437, 8, 8, 1) and ds.x_test.shape == (360, 8, 8, 1)
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
  assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
  assert ds.num_classes == 10 and ds.image_shape == (8, 8, 1)
  # Stratified: every class's test share is within one image of 20%.
  counts = np.bincount(np.concatenate([ds.y_train, ds.y_test]))
  assert np.all(np.abs(np.bincount(ds.y_test) - 0.2 * counts) <= 1)
  again = data_lib.load_dataset("digits")
  np.testing.assert_array_equal(ds.y_test, again.y_test)


def test_upsample_digits_nearest_then_pad():
  x = np.random.default_rng(0).random((2, 8, 8, 1)).astype(np.float32)
  up = data_lib.upsample_digits(x)
  assert up.shape == (2, 28, 28, 1)
  for i in range(24):
    for j in range(24):
      assert up[0, 2 + i, 2 + j, 0] == x[0, i // 3, j // 3, 0]
  assert up[:, :2].sum() == 0 and up[:, 26:].sum() == 0
  assert up[:, :, :2].sum() == 0 and up[:, :, 26:].sum() == 0


def _write_npz(path, **overrides):
  rng = np.random.default_rng(0)
  arrays = dict(x_train=rng.integers(0, 256, (6, 5, 4), dtype=np.uint8),
                y_train=np.array([0, 1, 2, 0, 1, 2], np.uint8),
                x_test=rng.integers(0, 256, (3, 5, 4), dtype=np.uint8),
                y_test=np.array([2, 1, 0], np.uint8))
  arrays.update(overrides)
  arrays = {k: v for k, v in arrays.items() if v is not None}
  np.savez(path, **arrays)
  return arrays


def test_npz_loader_keras_layout(tmp_path):
  path = tmp_path / "tiny.npz"
  raw = _write_npz(path)
  ds = data_lib.load_dataset(f"npz:{path}")
  assert ds.x_train.shape == (6, 5, 4, 1) and ds.image_shape == (5, 4, 1)
  assert ds.x_train.dtype == np.float32 and ds.y_test.dtype == np.int32
  np.testing.assert_allclose(ds.x_test[..., 0], raw["x_test"] / 255.0, rtol=1e-6)
  np.testing.assert_array_equal(ds.y_train, raw["y_train"])
  assert ds.num_classes == 3


def test_npz_missing_file_names_the_file(tmp_path):
  path = tmp_path / "nope.npz"
  with pytest.raises(FileNotFoundError, match="nope.npz.*x_train"):
    data_lib.load_dataset(f"npz:{path}")


def test_npz_missing_key_is_an_error(tmp_path):
  path = tmp_path / "bad.npz"
  _write_npz(path, y_test=None)
  with pytest.raises(ValueError, match=r"bad.npz.*missing.*y_test"):
    data_lib.load_dataset(f"npz:{path}")


def test_npz_not_a_zip_is_an_error(tmp_path):
  path = tmp_path / "garbage.npz"
  path.write_bytes(b"this is not an npz file")
  with pytest.raises(ValueError, match="garbage.npz.*cannot be read"):
    data_lib.load_dataset(f"npz:{path}")


def test_npz_bad_labels_are_an_error(tmp_path):
  path = tmp_path / "labels.npz"
  _write_npz(path, y_train=np.zeros(5, np.uint8))
  with pytest.raises(ValueError, match="labels.npz: y_train.*6 integer labels"):
    data_lib.load_dataset(f"npz:{path}")


def test_unknown_spec_and_missing_tfds():
  with pytest.raises(ValueError, match="unknown dataset spec"):
    data_lib.load_dataset("mnist")
  try:
    import tensorflow_datasets  # noqa: F401
  except ImportError:
    with pytest.raises(ImportError, match="tensorflow-datasets"):
      data_lib.load_dataset("tfds:mnist")


def test_batches_seeded_shuffle_covers_each_example_once():
  x = np.arange(10, dtype=np.float32)[:, None]
  y = np.arange(10, dtype=np.int32)
  a = [np.asarray(yb) for _, yb in data_lib.batches(x, y, 3, seed=1)]
  b = [np.asarray(yb) for _, yb in data_lib.batches(x, y, 3, seed=1)]
  c = [np.asarray(yb) for _, yb in data_lib.batches(x, y, 3, seed=2)]
  assert all(isinstance(xb, jax.Array) for xb, _ in data_lib.batches(x, y, 3))
  assert [len(t) for t in a] == [3, 3, 3]  # remainder dropped
  np.testing.assert_array_equal(np.concatenate(a), np.concatenate(b))
  assert not np.array_equal(np.concatenate(a), np.concatenate(c))
  assert len(set(np.concatenate(a).tolist())) == 9
  full = np.concatenate([np.asarray(t) for _, t in
                         data_lib.batches(x, y, 3, seed=1, drop_remainder=False)])
  np.testing.assert_array_equal(np.sort(full), y)


# -- training utilities -------------------------------------------------------

def test_evaluate_matches_numpy_argmax_with_padding():
  model = models_lib.get_model("lenet300")
  ds = data_lib.load_dataset("digits")
  v = models_lib.init(model, ds.image_shape, train_lib.prng_key(3))
  logits = np.asarray(model.apply(v, ds.x_test))
  ref = np.mean(np.argmax(logits, -1) != ds.y_test)
  # 360 test images in batches of 100: the last batch is padded.
  assert train_lib.evaluate(model, v, ds.x_test, ds.y_test, 100) == pytest.approx(ref)


def test_fit_is_deterministic_and_learns():
  p = argparse.ArgumentParser()
  train_lib.add_common_args(p)
  args = p.parse_args(["--quiet"])
  model, ds, v = train_lib.setup(args)
  err0 = train_lib.evaluate(model, v, ds.x_test, ds.y_test)
  runs = [train_lib.fit(model, v, optax.sgd(0.05, momentum=0.9, nesterov=True), ds, epochs=2, batch_size=64,
                        seed=0, quiet=True)[0] for _ in range(2)]
  jax.tree_util.tree_map(np.testing.assert_array_equal, *runs)
  assert train_lib.evaluate(model, runs[0], ds.x_test, ds.y_test) < min(err0, 0.5)


# -- Deep Compression end to end (tiny) -----------------------------------------

@contextlib.contextmanager
def _no_deprecated_api():
  """compressax's DeprecationWarnings (attributed to the caller) as errors."""
  with warnings.catch_warnings():
    warnings.filterwarnings("error", category=DeprecationWarning,
                            module=r"(compressax|experiments)(\.|$)")
    yield


def test_deep_compression_smoke_results_agree_with_file(tmp_path, capsys):
  import json
  import os

  import compressax as cx
  from experiments import deep_compression

  out = tmp_path / "dc"
  # The experiment runs on the method layer only: no deprecated names.
  with _no_deprecated_api():
    res = deep_compression.main([
        "--epochs", "2", "--prune-iters", "1", "--prune-epochs", "1",
        "--share-epochs", "1", "--seed", "3", "--quiet", "--out", str(out)])
  assert str(out / "model.cx") in capsys.readouterr().out
  with open(out / "results.json") as f:
    saved = json.load(f)
  assert saved["test_error"] == res["test_error"]
  path = out / "model.cx"
  assert saved["file_bytes"] == os.path.getsize(path)
  model = models_lib.get_model("lenet300")
  ds = data_lib.load_dataset("digits")
  n_params = models_lib.param_count(models_lib.param_shapes(model, ds.image_shape))
  assert saved["dense_fp32_bytes"] == 4 * n_params
  assert saved["ratio"] == pytest.approx(saved["dense_fp32_bytes"] / saved["file_bytes"])
  assert saved["ratio"] > 5  # 8-26% kept at 6 bits cannot be near fp32 size
  for key in ("model", "dataset", "baseline_test_error", "seed", "command",
              "wall_time_s"):
    assert key in saved
  assert saved["seed"] == 3 and "--seed 3" in saved["command"]

  # Re-evaluate the weights exactly as decoded from the file.
  loaded = cx.io.load(str(path))
  pred = np.argmax(np.asarray(model.apply(loaded, ds.x_test)), axis=-1)
  assert np.mean(pred != ds.y_test) == pytest.approx(saved["test_error"], abs=0)
  # The file holds the paper's structure: per-layer kept fractions, and at
  # most 2**6 distinct nonzero values per layer.
  for layer, keep in deep_compression.KEEP["lenet300"].items():
    w = np.asarray(loaded["params"][layer]["kernel"])
    assert np.count_nonzero(w) <= w.size - int((1 - keep) * w.size)
    assert np.count_nonzero(w) >= 0.5 * keep * w.size
    assert len(np.unique(w[w != 0])) <= 2 ** 6
  # plan.finalize's nodes: the kept weights' codes over a codebook.
  raw = cx.io.load(str(path), keep_compressed=True)
  for layer in ("ip1", "ip2", "ip3"):
    node = raw["params"][layer]["kernel"]
    assert isinstance(node, cx.prune.MaskedArray)
    assert isinstance(node.value, cx.quantize.CodebookArray)
    assert node.value.centroids.shape[0] <= 2 ** 6


def test_deep_compression_plans_are_per_layer_rules():
  import compressax as cx
  from experiments import deep_compression
  model = models_lib.get_model("lenet300")
  ds = data_lib.load_dataset("digits")
  params = models_lib.param_shapes(model, ds.image_shape)
  params = jax.tree_util.tree_map(lambda s: jnp.ones(s.shape, s.dtype), params)
  args = deep_compression.parse_args(["--prune-iters", "2"])
  methods = deep_compression.prune_plan(args, 2).methods(params)["params"]
  for layer, keep in deep_compression.KEEP["lenet300"].items():
    assert methods[layer]["kernel"] == cx.methods.Magnitude(1.0 - keep)
    assert cx.is_skip(methods[layer]["bias"])
  half = deep_compression.prune_plan(args, 1).methods(params)["params"]
  assert half["ip1"]["kernel"].sparsity == pytest.approx(1 - 0.08 ** 0.5)
  args = deep_compression.parse_args(["--share-init", "ip1=companding,ip=linear"])
  methods = deep_compression.share_plan(params, args).methods(params)["params"]
  assert methods["ip1"]["kernel"] == cx.methods.KMeans(
      bits=6, kmeans_init="companding", pruned=True)
  assert methods["ip2"]["kernel"] == cx.methods.KMeans(bits=6, pruned=True)
  assert cx.is_skip(methods["ip3"]["bias"])
  with pytest.raises(ValueError, match="ip3/kernel: no --bits entry"):
    deep_compression.share_plan(
        params, deep_compression.parse_args(["--bits", "ip1=5,ip2=5"]))


def test_deep_compression_distill_and_bias_bits(tmp_path):
  import compressax as cx
  from experiments import deep_compression

  out = tmp_path / "dcd"
  with _no_deprecated_api():
    res = deep_compression.main([
        "--epochs", "2", "--prune-iters", "1", "--prune-epochs", "1",
        "--share-epochs", "1", "--distill-alpha", "0.7", "--bias-bits", "6",
        "--share-init", "ip1=companding,ip=linear",
        "--quiet", "--no-plot", "--out", str(out)])
  assert res["distill"] == {"alpha": 0.7, "temperature": 4.0}
  assert res["share_init"] == {"ip1": "companding", "ip": "linear"}
  assert res["bias_bits"] == 6
  raw = cx.io.load(str(out / "model.cx"), keep_compressed=True)
  dense = cx.io.load(str(out / "model.cx"))
  for layer in ("ip1", "ip2", "ip3"):
    node = raw["params"][layer]["bias"]
    assert isinstance(node, cx.quantize.QuantizedArray) and node.bits == 6
    b = np.asarray(dense["params"][layer]["bias"], np.float64)
    # Affine 6-bit codes: at most 64 levels, error at most half a step.
    assert len(np.unique(b)) <= 2 ** 6
  model = models_lib.get_model("lenet300")
  ds = data_lib.load_dataset("digits")
  assert train_lib.evaluate(model, dense, ds.x_test, ds.y_test) == res["test_error"]


def test_deep_compression_distill_loss_is_polino_loss_against_baseline():
  from experiments import deep_compression
  import compressax as cx
  model = models_lib.get_model("lenet300")
  ds = data_lib.load_dataset("digits")
  t = models_lib.init(model, ds.image_shape, jax.random.key(0))
  s = models_lib.init(model, ds.image_shape, jax.random.key(1))
  args = deep_compression.parse_args(["--distill-alpha", "0.5",
                                      "--distill-temperature", "3"])
  loss_fn = deep_compression.distill_loss(model, t, args)
  x, y = ds.x_train[:16], ds.y_train[:16]
  want = cx.distill.polino_loss(model.apply(s, x), model.apply(t, x), y,
                                alpha=0.5, temperature=3.0).mean()
  got = loss_fn(s, x, y, jax.random.key(2))
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
  assert deep_compression.distill_loss(
      model, t, deep_compression.parse_args([])) is None


def test_deep_compression_flag_errors():
  from experiments import deep_compression
  with pytest.raises(argparse.ArgumentTypeError, match="--keep.*LAYER=VALUE"):
    deep_compression.parse_args(["--keep", "ip1"])
  with pytest.raises(SystemExit):
    deep_compression.parse_args(["--keep", "ip1=1.5"])
  for bad in (["--distill-alpha", "1.5"], ["--distill-temperature", "0"],
              ["--bias-bits", "1"], ["--bias-bits", "17"],
              ["--share-init", "kmeans"], ["--share-init", "ip1=kmeans"]):
    with pytest.raises(SystemExit):
      deep_compression.parse_args(bad)
  args = deep_compression.parse_args(["--model", "lenet5", "--bits", "conv=7,ip=4"])
  assert args.bits == {"conv": 7, "ip": 4} and args.keep["conv1"] == 0.66
  args = deep_compression.parse_args(["--share-init", "ip1=companding,ip=linear"])
  assert args.share_init == {"ip1": "companding", "ip": "linear"}


def test_sgd_cosine_schedule_matches_formula_under_strict_promotion():
  lr, total = 0.1, 8
  tx = train_lib.sgd(lr, momentum=0.0, decay_steps=total)
  params = {"w": jnp.zeros((3,), jnp.float32)}
  state = tx.init(params)
  grads = {"w": jnp.ones((3,), jnp.float32)}
  update = jax.jit(tx.update)
  for step in range(total + 2):
    u, state = update(grads, state, params)
    want = lr * 0.5 * (1 + np.cos(np.pi * min(step / total, 1.0)))
    np.testing.assert_allclose(np.asarray(u["w"]), -want, rtol=1e-6, atol=1e-9)


def test_sgd_weight_decay_adds_l2_gradient():
  tx = train_lib.sgd(0.5, momentum=0.0, weight_decay=0.1)
  params = {"w": jnp.array([2.0, -4.0], jnp.float32)}
  u, _ = tx.update({"w": jnp.zeros((2,), jnp.float32)}, tx.init(params), params)
  np.testing.assert_allclose(np.asarray(u["w"]), -0.5 * 0.1 * np.array([2.0, -4.0]))


def test_summarize_mean_and_spread(tmp_path):
  import json
  from experiments import summarize
  paths = []
  for seed, err in enumerate([0.01, 0.02, 0.03]):
    p = tmp_path / f"r{seed}.json"
    p.write_text(json.dumps({"seed": seed, "test_error": err, "ratio": 40.0 + seed,
                             "baseline_test_error": 0.015, "file_bytes": 100 + seed,
                             "wall_time_s": 1.0, "model": "m", "dataset": "d"}))
    paths.append(str(p))
  out = summarize.main(paths)
  last = out.splitlines()[-1]
  # mean 2.00%, sample std 1.00%, range 1.00%-3.00%
  assert "2.00% ± 1.00% (1.00%-3.00%)" in last
  assert "41.0x ± 1.0x (40.0x-42.0x)" in last
  assert "3 seeds" in last
