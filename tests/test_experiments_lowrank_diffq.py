"""Smoke tests of experiments.lowrank and experiments.diffq on the digits.

Each run is tiny (one epoch, one or two settings); the checks are that
results.json agrees with the files it describes (sizes, ratios, and the test
error of the weights decoded from each file) and that the files hold the
structure the method promises (factor ranks, bit widths, levels).
"""

import json
import os
import warnings

import jax
import numpy as np
import pytest

import compressax as cx
from experiments import data as data_lib
from experiments import models as models_lib
from experiments import train as train_lib

# The input images' geometry of lenet300 on digits (8x8, flattened to 64).
_DS = data_lib.load_dataset("digits")


def _decoded_error(model, path):
  """Test error of the weights decoded from ``path``, by plain NumPy argmax."""
  loaded = cx.io.load(str(path))
  logits = np.asarray(model.apply(loaded, _DS.x_test))
  return float(np.mean(np.argmax(logits, axis=-1) != _DS.y_test))


def _check_contract(out, model_name, res):
  with open(out / "results.json") as f:
    saved = json.load(f)
  assert saved["test_error"] == res["test_error"]
  for key in ("model", "dataset", "test_error", "baseline_test_error",
              "file_bytes", "dense_fp32_bytes", "ratio", "seed", "command"):
    assert key in saved
  assert saved["model"] == model_name and saved["dataset"] == "digits"
  path = out / "model.cx"
  assert saved["file_bytes"] == os.path.getsize(path)
  model = models_lib.get_model(model_name)
  n = models_lib.param_count(models_lib.param_shapes(model, _DS.image_shape))
  assert saved["dense_fp32_bytes"] == 4 * n
  assert saved["ratio"] == pytest.approx(saved["dense_fp32_bytes"] / saved["file_bytes"],
                                         rel=1e-12)
  assert _decoded_error(model, path) == saved["test_error"]
  # Every run's own file agrees with its entry too.
  for run in saved["runs"]:
    assert run["file_bytes"] == os.path.getsize(run["file"])
    assert run["ratio"] == pytest.approx(4 * n / run["file_bytes"], rel=1e-12)
    assert _decoded_error(model, run["file"]) == run["test_error"]
  assert os.path.getsize(saved["plot"]) > 0
  return saved


# -- low rank -------------------------------------------------------------------

_LOWRANK_ARGV = ["--epochs", "1", "--budgets", "0.3", "--finetune-epochs", "1",
                 "--bsr-objective", "proxy", "--quiet", "--seed", "2"]


def test_lowrank_smoke_results_agree_with_files(tmp_path):
  from experiments import lowrank
  out = tmp_path / "lr"
  # compressax's DeprecationWarnings are errors: only the method layer is used.
  with warnings.catch_warnings():
    warnings.filterwarnings("error", message=r"cx\.\S+ is deprecated",
                            category=DeprecationWarning)
    res = lowrank.main(_LOWRANK_ARGV + ["--out", str(out)])
  saved = _check_contract(out, "lenet300", res)
  assert [(r["method"], r["budget"]) for r in saved["runs"]] == [
      ("bsr", 0.3), ("uniform", 0.3)]
  assert saved["method"] == "bsr" and saved["budget"] == 0.3
  assert "--seed 2" in saved["command"]

  tree = cx.io.load(str(out / "model.cx"), keep_compressed=True)
  bsr = saved["runs"][0]
  kept = dense = payload = 0
  for layer, p in tree["params"].items():
    node = p["kernel"]
    assert isinstance(node, cx.lowrank.LowRankArray)
    m, n = cx.lowrank.matrix_shape(node.shape)
    r = bsr["ranks"][f"params/{layer}/kernel"]
    assert node.u.shape == (m, r) and node.v.shape == (r, n) and node.rank == r
    kept += r * (m + n)
    dense += m * n
    payload += 4 * (r * (m + n) + p["bias"].size)
  assert kept <= 0.3 * dense
  assert bsr["kept_fraction"] == pytest.approx(kept / dense)
  # The file is the float32 factors and biases plus a small header.
  assert payload <= saved["file_bytes"] <= payload + 4096
  # The headline file is the BSR run's file, byte for byte.
  with open(out / "model.cx", "rb") as a, open(bsr["file"], "rb") as b:
    assert a.read() == b.read()


def test_plan_finetuning_equals_training_the_nodes_factors():
  # The experiment trains the factors as a plan's side state (LowRank rules);
  # training LowRankArray nodes' u and v directly is the same math: the same
  # factors and biases bit for bit. The ranks stay and the factors move.
  from experiments import lowrank
  args = lowrank.parse_args(["--finetune-epochs", "2", "--batch-size", "256",
                             "--quiet"])
  model = models_lib.get_model("lenet300")
  v = models_lib.init(model, _DS.image_shape, train_lib.prng_key(0))
  ranks = {"params/ip1/kernel": 6, "params/ip2/kernel": 5, "params/ip3/kernel": 4}
  plan = lowrank.rank_plan(ranks)
  methods = plan.methods(v)["params"]
  assert methods["ip2"]["kernel"] == cx.methods.LowRank(rank=5)
  assert cx.is_skip(methods["ip2"]["bias"])
  got, before = lowrank.finetune(model, plan, v, _DS, args)

  tree = cx.lowrank.factorize_tree(v, rank=ranks)
  assert before == train_lib.evaluate(model, cx.materialize(tree), _DS.x_test,
                                      _DS.y_test)
  steps = train_lib.steps_per_epoch(_DS, 256)
  want, _, _ = train_lib.fit(
      model, tree, train_lib.sgd(args.finetune_lr, decay_steps=2 * steps), _DS,
      epochs=2, batch_size=256, seed=args.seed + 1, quiet=True,
      eval_every_epoch=False)
  jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)
  for layer, r in (("ip1", 6), ("ip2", 5), ("ip3", 4)):
    a, b = tree["params"][layer]["kernel"], got["params"][layer]["kernel"]
    assert isinstance(b, cx.lowrank.LowRankArray) and b.rank == r
    assert b.u.shape == a.u.shape and b.v.shape == a.v.shape
    assert not np.array_equal(a.u, b.u) and not np.array_equal(a.v, b.v)


def test_rank_plan_rules_are_exact_paths():
  from experiments import lowrank
  key = jax.random.split(jax.random.key(0), 2)
  tree = {"Dense_1": {"kernel": jax.random.normal(key[0], (8, 6))},
          "Dense_10": {"kernel": jax.random.normal(key[1], (8, 6))}}
  plan = lowrank.rank_plan({"Dense_1/kernel": 2, "Dense_10/kernel": 3})
  assert plan.methods(tree)["Dense_10"]["kernel"].rank == 3
  final = plan.finalize(plan.init(tree))
  assert [final[k]["kernel"].rank for k in ("Dense_1", "Dense_10")] == [2, 3]


def test_lowrank_flag_errors():
  from experiments import lowrank
  with pytest.raises(SystemExit):
    lowrank.parse_args(["--budgets", "0.2", "1.5"])
  with pytest.raises(SystemExit):
    lowrank.parse_args(["--budgets", "0.2", "--save-budget", "0.3"])
  assert lowrank.parse_args(["--budgets", "0.4", "0.2"]).save_budget == 0.2


# -- DiffQ ------------------------------------------------------------------------

def test_diffq_smoke_results_agree_with_files(tmp_path):
  from experiments import diffq
  out = tmp_path / "dq"
  # lenet300 on 8x8 digits is the smallest setting (LeNet-5 needs 28x28).
  # compressax's DeprecationWarnings are errors: only the method layer is used.
  with jax.numpy_dtype_promotion("standard"), warnings.catch_warnings():  # Adam
    warnings.filterwarnings("error", message=r"cx\.\S+ is deprecated",
                            category=DeprecationWarning)
    res = diffq.main(["--model", "lenet300", "--epochs", "1", "--qat-epochs", "1",
                      "--batch-size", "256", "--lambdas", "0", "10",
                      "--qat-bits", "3", "--quiet", "--out", str(out)])
  saved = _check_contract(out, "lenet300", res)
  runs = saved["runs"]
  assert [(r["method"], r.get("lambda", r.get("bits"))) for r in runs] == [
      ("diffq", 0), ("diffq", 10), ("qat", 3)]
  assert saved["lambda"] == 10

  # DiffQ file: ip1/ip2 kernels are DiffQArray (ip3's 4 KB kernel is under
  # DiffQ's 0.01 MB rule and stays fp32, as do the biases).
  tree = cx.io.load(str(out / "model.cx"), keep_compressed=True)
  dense_bits = 0
  total = count = 0
  for layer, p in tree["params"].items():
    node = p["kernel"]
    if layer == "ip3":
      assert not cx.is_compressed(node) and node.dtype == np.float32
      dense_bits += 32 * node.size
    else:
      assert isinstance(node, cx.diffq.DiffQArray) and node.group_size == 16
      bits = np.asarray(node.bits, np.int64)
      assert bits.shape == (-(-node.size // 16),)
      assert np.all((bits >= 2) & (bits <= 15))
      per_weight = np.repeat(bits, 16)[:node.size]
      codes = np.asarray(node.codes, np.int64).reshape(-1)
      assert np.all(codes < 2 ** per_weight)
      total += per_weight.sum()
      count += node.size
    dense_bits += 32 * p["bias"].size
  assert saved["mean_bits"] == pytest.approx(total / count)
  # model_size(exact=True) counts what the nodes store.
  nodes_bits = sum(cx.storage_bits(leaf) for leaf in jax.tree_util.tree_leaves(
      tree, is_leaf=cx.is_compressed))
  assert runs[1]["model_size_mb"] == pytest.approx(nodes_bits / 8 / 2 ** 20, rel=1e-6)
  assert nodes_bits > dense_bits  # the quantized kernels add their bits
  assert saved["ratio"] > 3  # ~8 bits for 98% of the weights

  # The QAT file: 3-bit uniform codes with one range per tensor.
  qat = cx.io.load(runs[2]["file"], keep_compressed=True)
  for layer in ("ip1", "ip2"):
    node = qat["params"][layer]["kernel"]
    assert isinstance(node, cx.quantize.QuantizedArray) and node.bits == 3
    assert len(np.unique(np.asarray(node.materialize()))) <= 2 ** 3
  assert runs[2]["mean_bits"] == 3
  assert runs[2]["file_bytes"] < runs[0]["file_bytes"]


def test_diffq_flag_errors():
  from experiments import diffq
  with pytest.raises(SystemExit):
    diffq.parse_args(["--lambdas", "-1"])
  with pytest.raises(SystemExit):
    diffq.parse_args(["--lambdas", "0", "1", "--save-lambda", "2"])
  with pytest.raises(SystemExit):
    diffq.parse_args(["--init-bits", "1"])
  args = diffq.parse_args([])
  assert args.model == "lenet5" and args.group_size == 16
  assert args.logit_lr == 0.05 and args.save_lambda == max(args.lambdas)
