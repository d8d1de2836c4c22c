"""experiments.weightless: the file is what results.json says it is."""

import json
import os

import numpy as np
import pytest

import compressax as cx
from experiments import data as data_lib
from experiments import models as models_lib
from experiments import weightless


def _error(path):
  model = models_lib.get_model("lenet300")
  ds = data_lib.load_dataset("digits")
  pred = np.argmax(np.asarray(model.apply(cx.load(str(path)), ds.x_test)), -1)
  return float(np.mean(pred != ds.y_test))


def test_weightless_smoke_results_agree_with_the_files(tmp_path):
  out = tmp_path / "wl"
  res = weightless.main([
      "--epochs", "2", "--prune-iters", "1", "--prune-epochs", "1",
      "--share-epochs", "1", "--retrain-epochs", "1", "--layers", "ip1,ip2",
      "--recluster-bits", "2", "--cell-bits", "5", "--quiet", "--out", str(out)])
  with open(out / "results.json") as f:
    saved = json.load(f)
  assert saved["test_error"] == res["test_error"] == _error(out / "model.cx")
  assert saved["deep_compression"]["test_error"] == _error(out / "dc.cx")
  assert saved["file_bytes"] == os.path.getsize(out / "model.cx")
  assert saved["order"] == ["params/ip1/kernel", "params/ip2/kernel"]
  assert saved["pipeline"]["test_error"] == _error(out / "pipeline.cx")
  pipe = {s.path: s for s in cx.size_report(out / "pipeline.cx").leaves}
  leaf = pipe["params/ip1/kernel"]
  assert saved["layers"]["params/ip1/kernel"]["pipeline_bytes"] == \
      leaf.value_bytes + leaf.index_bytes

  wl = cx.load(out / "model.cx", keep_compressed=True)["params"]
  before = cx.load(out / "dc.cx", keep_compressed=True)["params"]
  report = {s.path: s for s in cx.size_report(out / "model.cx").leaves}
  dc_report = {s.path: s for s in cx.size_report(out / "dc.cx").leaves}
  for layer in ("ip1", "ip2"):
    node, stats = wl[layer]["kernel"], saved["layers"][f"params/{layer}/kernel"]
    assert isinstance(node, cx.weightless.BloomierArray)
    assert node.bits == 5 and node.n_clusters <= 4 and stats["seed"] == node.seed
    leaf = report[f"params/{layer}/kernel"]
    assert stats["weightless_bytes"] == leaf.value_bytes + leaf.index_bytes
    dc_leaf = dc_report[f"params/{layer}/kernel"]
    assert stats["dc_bytes"] == dc_leaf.value_bytes + dc_leaf.index_bytes
    # The false positives are the decoded nonzeros outside Deep Compression's mask.
    mask = np.asarray(before[layer]["kernel"].mask)
    decoded = np.asarray(node.materialize())
    assert stats["kept"] == int(mask.sum())
    assert stats["false_positives"] == int(np.count_nonzero(decoded[~mask]))
  # ip1 was encoded as Deep Compression stored it (reclustered, before any
  # retraining): the kept weights decode to its values exactly.
  ip1 = before["ip1"]["kernel"]
  mask = np.asarray(ip1.mask)
  np.testing.assert_array_equal(
      np.asarray(wl["ip1"]["kernel"].materialize())[mask],
      np.asarray(ip1.materialize())[mask])
  # The last layer stays in Deep Compression's encoding, and no stage undid
  # the pruning of a layer it retrained.
  assert isinstance(wl["ip3"]["kernel"], cx.prune.MaskedArray)
  ip3 = np.asarray(wl["ip3"]["kernel"].mask)
  assert not (ip3 & ~np.asarray(before["ip3"]["kernel"].mask)).any()
  assert ip3.mean() <= 0.26

  # From a written file, with the other kernels' kept weights retrained
  # freely (masks held), then shared again.
  again = weightless.main([
      "--from", str(out / "dc.cx"), "--retrain-mode", "free", "--retrain-epochs",
      "1", "--reshare-epochs", "1", "--cell-bits", "5", "--quiet", "--out",
      str(tmp_path / "from")])
  layer = again["layers"]["params/ip1/kernel"]
  assert layer["from_bytes"] == saved["layers"]["params/ip1/kernel"]["dc_bytes"]
  assert again["deep_compression"]["pipeline_test_error"] == _error(out / "dc.cx")
  assert again["test_error"] == _error(tmp_path / "from" / "model.cx")
  final = cx.load(tmp_path / "from" / "model.cx", keep_compressed=True)["params"]
  for name in ("ip2", "ip3"):
    kept = np.asarray(final[name]["kernel"].mask)
    assert not (kept & ~np.asarray(before[name]["kernel"].mask)).any()
    assert len(np.unique(np.asarray(final[name]["kernel"].materialize()))) <= 65


def test_weightless_flag_errors():
  with pytest.raises(SystemExit):
    weightless.parse_args(["--recluster-bits", "5", "--cell-bits", "5"])
  with pytest.raises(SystemExit):
    weightless.parse_args(["--from", "x.cx", "--distill-alpha", "0.5"])
  with pytest.raises(SystemExit):
    weightless.parse_args(["--layers", ","])
