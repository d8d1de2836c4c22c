"""experiments.pqk: smoke run on the bundled digits, results against the file."""

import json
import os

import jax
import numpy as np
import optax
import pytest

import compressax as cx
from experiments import data as data_lib
from experiments import deep_compression as dc
from experiments import models as models_lib
from experiments import pqk
from experiments import train as train_lib


@pytest.mark.parametrize("stage", ["shared", "pruned"])
def test_pqk_smoke_results_agree_with_file(tmp_path, stage):
  out = tmp_path / "pqk"
  res = pqk.main(["--epochs", "2", "--prune-iters", "2", "--prune-epochs", "2",
                  "--share-epochs", "1", "--pqk-epochs", "1", "--seed", "1",
                  "--pqk-stage", stage, "--quiet", "--no-plot", "--out", str(out)])
  with open(out / "results.json") as f:
    saved = json.load(f)
  assert saved["test_error"] == res["test_error"]
  assert saved["file_bytes"] == os.path.getsize(out / "model.cx")
  assert saved["experiment"] == "pqk" and saved["epochs"]["pqk"] == 1
  assert saved["pqk"]["stage"] == stage
  for key in ("teacher_error", "teacher_error_before", "phase1_test_error"):
    assert 0.0 <= saved[key] <= 1.0
  model = models_lib.get_model("lenet300")
  ds = data_lib.load_dataset("digits")
  loaded = cx.load(str(out / "model.cx"))
  pred = np.argmax(np.asarray(model.apply(loaded, ds.x_test)), axis=-1)
  assert np.mean(pred != ds.y_test) == pytest.approx(saved["test_error"], abs=0)
  for layer, keep in dc.KEEP["lenet300"].items():  # the student is the pruned net
    w = np.asarray(loaded["params"][layer]["kernel"])
    assert np.count_nonzero(w) <= w.size - int((1 - keep) * w.size)


def test_prune_tracks_each_weight_before_its_pruning_round():
  args = dc.parse_args(["--epochs", "1", "--prune-iters", "2", "--prune-epochs", "2",
                        "--quiet"])
  model, ds, params = train_lib.setup(args)
  dense = jax.tree_util.tree_map(np.asarray, params)
  pruned, before = dc.prune_and_retrain(model, params, ds, args, {},
                                        track_pruned=True)
  # Round 1 prunes from the initial weights: those pruned then keep that value.
  r1 = dc.prune_plan(args, 1)
  train = r1.init(params)
  tx = r1.optimizer(optax.set_to_zero())
  first = dc._zero_step(tx, tx.init(train), train)["params"]
  for layer in dc.KEEP["lenet300"]:
    w0, p = dense["params"][layer]["kernel"], np.asarray(pruned["params"][layer]["kernel"])
    b = np.asarray(before["params"][layer]["kernel"])
    np.testing.assert_array_equal(b[p != 0], p[p != 0])  # kept: the trained value
    gone1 = np.asarray(first["params"][layer]["kernel"]) == 0
    np.testing.assert_array_equal(b[gone1], w0[gone1])  # pruned in round 1
    later = (p == 0) & ~gone1  # pruned in round 2: a retrained value, not the init
    assert later.any() and np.all(b[later] != 0)
