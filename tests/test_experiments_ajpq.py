"""Smoke test of experiments.ajpq on the digits: results.json agrees with its files."""

import json
import os

import jax
import numpy as np
import pytest

import compressax as cx
from experiments import data as data_lib
from experiments import models as models_lib

_DS = data_lib.load_dataset("digits")


def _decoded_error(model, path):
  """Test error of the weights decoded from ``path`` by ``cx.load`` alone."""
  logits = np.asarray(model.apply(cx.load(str(path)), _DS.x_test))
  return float(np.mean(np.argmax(logits, axis=-1) != _DS.y_test))


def test_ajpq_smoke_results_agree_with_files(tmp_path):
  from experiments import ajpq
  out = tmp_path / "ajpq"
  with jax.numpy_dtype_promotion("standard"):  # optax.adam's schedule
    res = ajpq.main(["--epochs", "1", "--ajpq-epochs", "1", "--lambdas", "0", "300",
                     "--logit-lr", "0.2", "--bias-bits", "8", "--hard-gate",
                     "--min-bits", "2", "--quiet",
                     "--seed", "3", "--out", str(out)])
  with open(out / "results.json") as f:
    saved = json.load(f)
  assert saved["test_error"] == res["test_error"]
  assert saved["lambda"] == 300 and "--seed 3" in saved["command"]
  assert saved["hard_gate"] is True and saved["min_bits"] == 2
  model = models_lib.get_model("lenet300")
  n = models_lib.param_count(models_lib.param_shapes(model, _DS.image_shape))
  assert saved["dense_fp32_bytes"] == 4 * n
  assert saved["file_bytes"] == os.path.getsize(out / "model.cx")
  assert saved["ratio"] == pytest.approx(4 * n / saved["file_bytes"], rel=1e-12)
  assert _decoded_error(model, out / "model.cx") == saved["test_error"]
  assert [r["lambda"] for r in saved["runs"]] == [0, 300]
  for run in saved["runs"]:
    assert run["file_bytes"] == os.path.getsize(run["file"])
    assert _decoded_error(model, run["file"]) == run["test_error"]
  assert os.path.getsize(saved["plot"]) > 0
  # The larger lambda prunes more and writes a smaller file.
  small, large = saved["runs"]
  assert large["file_bytes"] < small["file_bytes"]

  # The per-layer fields are what the file holds.
  tree = cx.load(str(out / "model.cx"), keep_compressed=True)
  kernels = {k: v for k, v in saved["layers"].items()}
  assert sorted(kernels) == [f"params/ip{i}/kernel" for i in (1, 2, 3)]
  for name, stats in kernels.items():
    _, layer, _ = name.split("/")
    node = tree["params"][layer]["kernel"]
    assert isinstance(node, cx.prune.MaskedArray)
    assert isinstance(node.value, cx.diffq.DiffQArray)
    mask = np.asarray(node.mask).reshape(-1)
    bits = np.repeat(np.asarray(node.value.bits), 16)[:mask.size]
    assert stats["kept_fraction"] == pytest.approx(mask.mean(), rel=1e-12)
    assert stats["mean_kept_bits"] == pytest.approx(bits[mask].mean(), rel=1e-12)
    assert bits[mask].min() >= 2   # --min-bits 2
    assert isinstance(tree["params"][layer]["bias"], cx.quantize.QuantizedArray)
  assert min(s["kept_fraction"] for s in kernels.values()) < 1.0
