"""experiments.sweep (bits x sparsity in one vmapped jit) and experiments.repeat."""

import argparse
import json
import math
from fractions import Fraction
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import compressax as cx
from experiments import models as models_lib
from experiments import repeat
from experiments import sweep
from experiments import train as train_lib


# -- repeat (the seed/flag runner, formerly experiments.sweep) -----------------

def test_repeat_flags_and_table():
  args = repeat.parse_args(["--experiment", "deep_compression", "--flag", "bits",
                            "--values", "ip=4", "ip=5", "--", "--quiet"])
  assert args.values == ["ip=4", "ip=5"] and args.rest == ["--quiet"]
  assert args.out == os.path.join("runs", "repeat", "deep_compression-bits")
  with pytest.raises(SystemExit):
    repeat.parse_args(["--experiment", "deep_compression", "--flag", "bits",
                       "--values", "ip=4", "--", "--seed", "1"])
  rows = [{"value": "ip=4", "seed": 0, "test_error": 0.0125,
           "baseline_test_error": 0.01, "file_bytes": 12345, "ratio": 21.0}]
  lines = repeat.table(rows, "bits").splitlines()
  assert lines[2].split() == ["ip=4", "0", "1.25%", "1.00%", "12,345", "21.0x"]


# -- sweep: the traced pipeline against NumPy and against the stored files ----

@pytest.fixture(scope="module")
def digits_setup():
  p = argparse.ArgumentParser()
  train_lib.add_common_args(p)
  model, ds, params = train_lib.setup(p.parse_args(["--quiet", "--seed", "5"]))
  return model, ds, params


GRID_BITS = [2, 3, 4, 8]
GRID_SPARSITIES = [0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99]


@pytest.fixture(scope="module")
def grid32(digits_setup):
  """The 32-setting grid's weights and masks from one vmapped jit."""
  _, _, params = digits_setup
  bits, sps = sweep.grid(GRID_BITS, GRID_SPARSITIES)
  stacked, masks = jax.jit(jax.vmap(sweep.prune_quantize, in_axes=(None, 0, 0)))(
      params, jnp.asarray(bits), jnp.asarray(sps))
  return bits, sps, stacked, masks


def _np_prune_quantize(w, bits, sparsity):
  """NumPy float64 reference: keep n - floor(s n) largest |w|, then a
  symmetric per-output-channel grid m/Q * round(w Q / m), Q = 2^(b-1) - 1."""
  w = np.asarray(w, np.float64)
  n = w.size
  keep = n - math.floor(Fraction(str(sparsity)) * n)  # exact decimal s
  order = np.argsort(-np.abs(w).reshape(-1), kind="stable")
  mask = np.zeros(n, bool)
  mask[order[:keep]] = True
  pruned = np.where(mask.reshape(w.shape), w, 0.0)
  q = 2 ** (bits - 1) - 1
  m = np.max(np.abs(pruned), axis=0, keepdims=True)
  m = np.where(m < 1e-10, 1.0, m)
  return np.clip(np.round(pruned * q / m), -q, q) * m / q, mask.reshape(w.shape)


def test_vmapped_weights_match_numpy_reference(digits_setup, grid32):
  _, _, params = digits_setup
  bits, sps, stacked, masks = grid32
  for i in range(0, len(bits), 5):
    b, s = int(bits[i]), round(float(sps[i]), 6)  # the grid's decimal
    for layer in ("ip1", "ip2", "ip3"):
      w = params["params"][layer]["kernel"]
      ref, ref_mask = _np_prune_quantize(w, b, s)
      got = np.asarray(stacked["params"][layer]["kernel"][i], np.float64)
      mask = np.asarray(masks["params"][layer]["kernel"][i])
      np.testing.assert_array_equal(mask, ref_mask)
      assert np.all(got[~mask] == 0.0)  # pruned weights stay exactly zero
      # float32 vs float64 may round a value on a half-level differently:
      # never by more than one level, and almost never at all.
      step = np.max(np.abs(ref), axis=0) / (2 ** (b - 1) - 1)
      assert np.all(np.abs(got - ref) <= step * (1 + 1e-5) + 1e-7)
      assert np.mean(np.abs(got - ref) > 0.5 * step) < 1e-3  # level flips
      for col in range(0, got.shape[1], 37):
        assert len(np.unique(got[:, col])) <= 2 ** b - 1
      np.testing.assert_array_equal(
          np.asarray(stacked["params"][layer]["bias"][i]),
          np.asarray(params["params"][layer]["bias"]))


def test_32_settings_in_one_vmapped_call_equal_stored_weights(digits_setup, grid32,
                                                              tmp_path):
  model, ds, params = digits_setup
  bits, sps, stacked, _ = grid32
  assert len(bits) == 32
  xb, yb = sweep.batched_test_set(ds.x_test, ds.y_test, 100)  # 360: padded
  eval_one = sweep.make_eval_one(model, len(ds.y_test))
  wrong = jax.jit(jax.vmap(eval_one, in_axes=(None, None, None, 0, 0)))(
      params, jnp.asarray(xb), jnp.asarray(yb), jnp.asarray(bits), jnp.asarray(sps))
  wrong = np.asarray(wrong)
  assert wrong.shape == (32,) and np.all((wrong >= 0) & (wrong <= len(ds.y_test)))
  for i, (b, s) in enumerate(zip(bits.tolist(), sps.tolist())):
    tree = sweep.compressed_tree(params, b, float(np.float32(s)))
    kernel = tree["params"]["ip1"]["kernel"]
    if s == 0:
      assert isinstance(kernel, cx.quantize.QuantizedArray)
    else:
      assert isinstance(kernel, cx.prune.MaskedArray)
      assert isinstance(kernel.value, cx.quantize.QuantizedArray)
    q = kernel if s == 0 else kernel.value
    assert q.bits == b and q.symmetric and q.codes.dtype == np.uint8
    if i % 8 in (0, 5):  # a few through the file format too
      path = str(tmp_path / f"{i}.cx")
      cx.io.save(path, tree)
      dense = cx.io.load(path)
    else:
      dense = cx.materialize(tree)
    jax.tree_util.tree_map(
        lambda a, st: np.testing.assert_array_equal(np.asarray(a), np.asarray(st[i])),
        dense, stacked)
    err = train_lib.evaluate(model, dense, ds.x_test, ds.y_test, 100)
    assert err == wrong[i] / len(ds.y_test)


def test_settings_are_stored_through_the_method_layer(digits_setup, grid32,
                                                     tmp_path):
  _, _, params = digits_setup
  bits, sps, stacked, masks = grid32
  plan = sweep.setting_plan(3, 0.8)
  method = plan.methods(params)["params"]["ip1"]["kernel"]
  assert method == (cx.methods.Magnitude(0.8)
                    >> cx.methods.Uniform(3, symmetric=True, axis=-1))
  assert cx.is_skip(plan.methods(params)["params"]["ip1"]["bias"])
  assert sweep.setting_plan(3, 0.0).methods(params)["params"]["ip1"][
      "kernel"] == cx.methods.Uniform(3, symmetric=True, axis=-1)
  # The vmapped call's own mask gives the file of the recomputed mask.
  i = list(zip(bits.tolist(), sps.tolist())).index((3, np.float32(0.8)))
  path = str(tmp_path / "a.cx")
  cx.io.save(path, sweep.compressed_tree(params, 3, float(np.float32(0.8)),
                                         mask=sweep._take(masks, i)))
  sweep.check_decodes_to(path, sweep._take(stacked, i), "b3 s0.8")
  with pytest.raises(AssertionError, match=r"b3 s0.8.*params/ip\d/kernel"):
    sweep.check_decodes_to(path, sweep._take(stacked, i + 1), "b3 s0.8")


def test_pareto_front_and_choice_rule():
  rows = [{"file_bytes": f, "test_error": e, "id": k} for k, (f, e) in enumerate(
      [(100, 0.5), (120, 0.5), (150, 0.2), (150, 0.1), (300, 0.05), (400, 0.06),
       (500, 0.04)])]
  front = sweep.pareto_front(rows)
  assert [r["id"] for r in front] == [0, 3, 4, 6]
  # Brute force: on the front iff no other row has <= bytes and < error.
  for r in rows:
    dominated = any(o["file_bytes"] <= r["file_bytes"] and o["test_error"] < r["test_error"]
                    for o in rows)
    assert (r in front) == (not dominated and r["id"] != 1)  # 1 ties 0, larger
  assert sweep.choose(front, 0.035, 0.01)["id"] == 6  # 0.05 is 1.5 points over
  assert sweep.choose(front, 0.04, 0.01)["id"] == 4  # exactly 1 point: within
  assert sweep.choose(front, 0.045, 0.01)["id"] == 4
  assert sweep.choose(front, 0.0, 0.01)["id"] == 6  # none within: lowest error


def test_flags_are_checked():
  with pytest.raises(SystemExit):
    sweep.parse_args(["--bits", "1"])
  with pytest.raises(SystemExit):
    sweep.parse_args(["--sparsities", "1.0"])
  args = sweep.parse_args([])
  assert len(args.bits) * len(args.sparsities) >= 32


# -- sweep end to end (tiny) ----------------------------------------------------

def test_sweep_smoke_results_agree_with_files(tmp_path, capsys):
  out = tmp_path / "sw"
  # compressax's DeprecationWarnings are errors: only current API is used.
  with warnings.catch_warnings():
    warnings.filterwarnings("error", message=r"cx\.\S+ is deprecated",
                            category=DeprecationWarning)
    res = sweep.main(["--epochs", "1", "--bits", "3", "8", "--sparsities", "0",
                      "0.8", "--verify", "4", "--seed", "2", "--quiet",
                      "--eval-batch-size", "360",
                      "--out", str(out)])
  printed = capsys.readouterr().out
  assert "Pareto front" in printed and "loop" in printed
  with open(out / "results.json") as f:
    saved = json.load(f)
  assert saved["test_error"] == res["test_error"]
  for key in ("model", "dataset", "baseline_test_error", "file_bytes",
              "dense_fp32_bytes", "ratio", "seed", "command"):
    assert key in saved
  assert saved["seed"] == 2 and "--seed 2" in saved["command"]
  assert saved["file_bytes"] == os.path.getsize(out / "model.cx")
  model = models_lib.get_model("lenet300")
  n_params = models_lib.param_count(models_lib.param_shapes(model, (8, 8, 1)))
  assert saved["dense_fp32_bytes"] == 4 * n_params
  assert saved["ratio"] == pytest.approx(saved["dense_fp32_bytes"] / saved["file_bytes"])

  settings = saved["settings"]
  assert sorted((r["bits"], r["sparsity"]) for r in settings) == [
      (3, 0.0), (3, 0.8), (8, 0.0), (8, 0.8)]
  ds = train_lib.data_lib.load_dataset("digits")
  for r in settings:
    assert r["file_bytes"] == os.path.getsize(r["file"])
    assert r["ratio"] == pytest.approx(saved["dense_fp32_bytes"] / r["file_bytes"])
    loaded = cx.io.load(r["file"])
    pred = np.argmax(np.asarray(model.apply(loaded, ds.x_test)), axis=-1)
    assert np.mean(pred != ds.y_test) == pytest.approx(r["test_error"], abs=1e-12)
  assert len(saved["verified"]) == 4 and all(v["equal"] for v in saved["verified"])
  assert saved["timing"]["loop_equals_vmap"]

  # model.cx is the chosen setting, by the documented rule.
  front = sweep.pareto_front(settings)
  assert [{"bits": r["bits"], "sparsity": r["sparsity"]} for r in front] == saved["pareto"]
  want = sweep.choose(front, saved["baseline_test_error"], 0.01)
  assert (saved["chosen"]["bits"], saved["chosen"]["sparsity"]) == (want["bits"], want["sparsity"])
  assert saved["test_error"] == want["test_error"]
  with open(out / "pareto.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
