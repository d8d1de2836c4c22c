"""experiments.quantized_distillation: the five-method comparison at 2 and 4 bits.

One tiny run (one epoch per stage, digits) is shared by the smoke checks:
every run's file agrees with ``results.json`` (bytes, ratio, error
re-measured with NumPy from the loaded weights), each method's file holds
the node it should (per-tensor vs bucketed uniform codes, learned points),
and ``ordering`` follows from the recorded errors. The run turns compressax's
DeprecationWarnings into errors: the experiment uses only the method layer.
"""

import json
import math
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import compressax as cx
from experiments import data as data_lib
from experiments import models as models_lib
from experiments import quantized_distillation as qd


# The message of every compressax DeprecationWarning (compressax._deprecation).
DEPRECATED = r"cx\.\S+ is deprecated"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  out = tmp_path_factory.mktemp("qd")
  with warnings.catch_warnings():
    warnings.filterwarnings("error", message=DEPRECATED, category=DeprecationWarning)
    res = qd.main(["--teacher-epochs", "1", "--epochs", "1", "--dq-epochs", "1",
                   "--batch-size", "128", "--bits", "4", "2", "--quiet",
                   "--no-plot", "--out", str(out)])
  return out, res


def test_smoke_runs_without_deprecated_api(smoke):
  """The smoke run above finished with compressax's deprecations as errors."""
  _, res = smoke
  assert res["model_cx_method"] == "qdistill-4bit"
  with pytest.raises(DeprecationWarning), warnings.catch_warnings():
    warnings.filterwarnings("error", message=DEPRECATED, category=DeprecationWarning)
    cx.optim.quantized_params({"w": np.ones((4, 4), np.float32)}, 4)


def _np_error(dense):
  model = models_lib.get_model("lenet300")
  ds = data_lib.load_dataset("digits")
  pred = np.argmax(np.asarray(model.apply(dense, ds.x_test)), axis=-1)
  return float(np.mean(pred != ds.y_test))


def test_results_agree_with_every_file(smoke):
  out, res = smoke
  with open(out / "results.json") as f:
    saved = json.load(f)
  assert saved["test_error"] == res["test_error"]
  for key in ("model", "dataset", "baseline_test_error", "dense_fp32_bytes",
              "seed", "command"):
    assert key in saved
  assert saved["file_bytes"] == os.path.getsize(out / "model.cx")
  assert saved["model_cx_method"] == "qdistill-4bit"
  assert saved["baseline_test_error"] == saved["baselines"]["student_fp32"]
  assert {(r["method"], r["bits"]) for r in saved["runs"]} == {
      (m, b) for m in qd.METHODS for b in (2, 4)}
  for r in saved["runs"]:
    path = out / "runs" / f"{r['method']}-{r['bits']}bit.cx"
    assert r["file_bytes"] == os.path.getsize(path)
    assert r["ratio"] == pytest.approx(saved["dense_fp32_bytes"] / r["file_bytes"])
    assert _np_error(cx.io.load(str(path))) == r["test_error"]
  qd4 = next(r for r in saved["runs"] if r["method"] == "qdistill" and r["bits"] == 4)
  assert qd4["test_error"] == saved["test_error"]
  assert _np_error(cx.io.load(str(out / "model.cx"))) == saved["test_error"]


def test_each_method_is_really_quantized(smoke):
  out, _ = smoke
  for bits in (2, 4):
    for method in qd.METHODS:
      tree = cx.io.load(str(out / "runs" / f"{method}-{bits}bit.cx"),
                        keep_compressed=True)
      for layer in ("ip1", "ip2", "ip3"):
        node = tree["params"][layer]["kernel"]
        w = np.asarray(node.materialize(), np.float64).reshape(-1)
        if method == "diffquant":
          assert isinstance(node, cx.quantize.PointsArray)
          assert node.points.shape == (2 ** bits,) and node.bucket_size == 256
          assert node.codes.dtype == np.uint8 and int(np.max(node.codes)) < 2 ** bits
          pts = np.asarray(node.points, np.float64)
          assert np.all(np.diff(pts) >= 0) and pts.min() >= 0 and pts.max() <= 1
        else:
          assert isinstance(node, cx.quantize.QuantizedArray) and node.bits == bits
          assert node.bucket_size == (None if method == "ptq" else 256)
        k = w.size if method == "ptq" else 256
        for s in range(0, w.size, k):
          assert len(np.unique(w[s:s + k])) <= 2 ** bits
        # Biases stay float32 in every method.
        assert not cx.is_compressed(tree["params"][layer]["bias"])


def test_ordering_follows_recorded_errors(smoke):
  _, res = smoke
  order = res["ordering"]
  for bits in (2, 4):
    o = order[f"{bits}bit"]
    err = {r["method"]: r["test_error"] for r in res["runs"] if r["bits"] == bits}
    assert [m for m, _ in o["by_error"]] == sorted(
        err, key=lambda m: (err[m], qd.METHODS.index(m)))
    assert all(err[m] == e for m, e in o["by_error"])
    assert o["claims"]["qdistill_beats_diffquant"] == (err["qdistill"] < err["diffquant"])
    assert o["claims"]["qdistill_beats_qat"] == (err["qdistill"] < err["qat"])
    gap = abs(err["qdistill"] - err["diffquant"])
    assert o["claims"]["qdistill_diffquant_comparable"] == (gap <= o["comparable_margin"])
  assert order["2bit"]["paper_claim"] == "qdistill_beats_diffquant"
  assert order["4bit"]["paper_claim"] == "qdistill_diffquant_comparable"
  for bits in (2, 4):
    o = order[f"{bits}bit"]
    assert o["paper_claim_holds"] == o["claims"][o["paper_claim"]]
  b = res["baselines"]
  assert order["distilled_fp32_beats_fp32"] == (
      b["student_distilled_fp32"] < b["student_fp32"])


def test_summary_table_lists_every_run(smoke):
  _, res = smoke
  table = qd.summary_table(res)
  for r in res["runs"]:
    assert f"{r['test_error']:.4f}" in table and str(r["file_bytes"]) in table
  assert "paper:" in table


def test_ordering_claims_on_synthetic_errors():
  runs = [{"method": m, "bits": b, "test_error": e}
          for b, errs in ((2, (0.5, 0.4, 0.3, 0.1, 0.2)), (4, (0.2, 0.2, 0.1, 0.1, 0.1)))
          for m, e in zip(qd.METHODS, errs)]
  o = qd.ordering(runs, {"student_fp32": 0.1, "student_distilled_fp32": 0.05}, 1000)
  assert [m for m, _ in o["2bit"]["by_error"]] == [
      "qdistill", "diffquant", "qat", "ptq_bucket", "ptq"]
  assert o["2bit"]["paper_claim_holds"] is True
  assert o["4bit"]["paper_claim_holds"] is True
  # Ties keep the METHODS order.
  assert [m for m, _ in o["4bit"]["by_error"]][:3] == ["qat", "qdistill", "diffquant"]
  assert o["4bit"]["claims"]["qdistill_beats_qat"] is False
  assert o["distilled_fp32_beats_fp32"] is True
  # Two standard errors at p = 0.1 on 1000 examples.
  assert qd.comparable_margin(0.1, 0.1, 1000) == pytest.approx(2 * math.sqrt(0.09 / 1000))


def test_points_train_like_diff_quant_points():
  """``Points(learning_rate=...)`` in a plan takes the steps the experiment
  took before (``cx.optim.diff_quant_points`` over SGD, Nesterov 0.9): the
  points re-sorted and clipped to [0, 1], the fixed weights untouched."""
  w = jax.random.normal(jax.random.key(0), (64, 8))
  params = {"k": {"kernel": w, "bias": jnp.zeros(8)}}
  schedule = qd._cosine(0.01, 4)  # large: points cross and hit the bounds
  plan = cx.Plan(cx.methods.Points(4, bucket_size=None, init_method="quantiles",
                                   straight_through=False, learning_rate=schedule))
  train = plan.init(params)
  tx = plan.optimizer(optax.set_to_zero())
  state = tx.init(train)
  ref = cx.optim.diff_quant_points(optax.sgd(schedule, momentum=0.9, nesterov=True))
  points = train["aux"]["k"]["kernel"]["points"]
  ref_state = ref.init(points)

  c = jax.random.normal(jax.random.key(1), w.shape)

  def loss(t):  # pushes the points both ways
    return jnp.sum(c * plan.view(t)["k"]["kernel"])

  for _ in range(4):
    g = jax.grad(loss)(train)
    u, state = tx.update(g, state, train)
    train = optax.apply_updates(train, u)
    u, ref_state = ref.update(g["aux"]["k"]["kernel"]["points"], ref_state, points)
    points = optax.apply_updates(points, u)
    np.testing.assert_array_equal(train["aux"]["k"]["kernel"]["points"], points)
  assert np.all(np.diff(np.asarray(points)) >= 0)
  assert float(points.min()) >= 0.0 and float(points.max()) <= 1.0
  assert train["params"]["k"]["kernel"] is w or np.array_equal(
      train["params"]["k"]["kernel"], w)


def test_flag_errors():
  with pytest.raises(SystemExit):
    qd.parse_args(["--bits", "0"])
  with pytest.raises(SystemExit):
    qd.parse_args(["--bucket-size", "0"])
  args = qd.parse_args(["--bits", "4", "2", "4", "--epochs", "3"])
  assert args.bits == [2, 4] and args.dq_epochs == 3
