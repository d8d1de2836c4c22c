"""Smoke test of experiments.diffq_lm: results.json agrees with its files."""

import json
import os
import pathlib

import jax
import pytest

import compressax as cx
from experiments import diffq_lm
from experiments import lm

SHAKESPEARE = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture(autouse=True)
def _standard_promotion():
  with jax.numpy_dtype_promotion("standard"):  # optax's schedules
    yield


def test_quantized_leaf_takes_every_matrix_and_no_vector():
  params = lm.init(lm.LMConfig(vocab=20, width=8, layers=1, heads=2, ffn=16, context=4))
  chosen = {cx.path_str(p) for p, _ in cx.selected_leaves(params, diffq_lm.quantized_leaf)}
  assert chosen == {"params/embed/embedding", "params/pos_embedding",
                    *(f"params/block0/{n}/kernel" for n in
                      ("query", "key", "value", "out", "fc1", "fc2"))}


def test_diffq_lm_smoke_results_agree_with_files(tmp_path):
  text = (SHAKESPEARE.read_text()[:30_000] if SHAKESPEARE.exists()
          else "to be or not to be, that is the question:\n" * 600)
  data = tmp_path / "t.txt"
  data.write_text(text)
  out = tmp_path / "run"
  flags = ["--data", str(data), "--vocab", "200", "--width", "32", "--layers", "1",
           "--heads", "2", "--ffn", "64", "--context", "16", "--steps", "40",
           "--batch", "8", "--cache", str(tmp_path / "cache")]
  res = diffq_lm.main(flags + ["--finetune-steps", "8", "--lambdas", "0", "3",
                               "--qat-bits", "4", "--quiet", "--out", str(out)])
  with open(out / "results.json") as f:
    saved = json.load(f)
  assert saved["val_loss"] == res["val_loss"] and saved["lambda"] == 3
  model, corpus, _ = lm.setup(lm.parse_args(flags))
  runs = {(r["method"], r.get("lambda", r.get("bits"))): r for r in saved["runs"]}
  assert set(runs) == {("diffq", 0), ("diffq", 3), ("qat", 4)}
  n = lm.param_count(lm.init(model.config))
  for r in saved["runs"]:
    tree = cx.load(r["file"])
    assert r["file_bytes"] == os.path.getsize(r["file"])
    assert r["dense_fp32_bytes"] == 4 * n
    assert r["ratio"] == pytest.approx(4 * n / r["file_bytes"], rel=1e-12)
    assert r["val_loss"] == lm.evaluate(model, tree, corpus.val)
    assert r["rel_increase"] == pytest.approx(r["val_loss"] / saved["float_val_loss"] - 1)
    nodes = jax.tree_util.tree_leaves(cx.load(r["file"], keep_compressed=True),
                                      is_leaf=cx.is_compressed)
    kind = cx.diffq.DiffQArray if r["method"] == "diffq" else cx.quantize.QuantizedArray
    assert sum(isinstance(x, kind) for x in nodes) == 8  # two embeddings, six kernels
  assert runs[("qat", 4)]["mean_bits"] == 4
  # The penalty buys a smaller file; the saved model is the lambda-3 run.
  assert runs[("diffq", 3)]["mean_bits"] < runs[("diffq", 0)]["mean_bits"]
  assert saved["file_bytes"] == runs[("diffq", 3)]["file_bytes"]
  assert (out / "pareto.png").exists()
  float_tree = cx.load(str(out / "runs" / "float32.cx"))
  assert saved["float_val_loss"] == lm.evaluate(model, float_tree, corpus.val)


def test_diffq_lm_rejects_bad_flags(capsys):
  for bad in (["--lambdas", "-1"], ["--qat-bits", "0"], ["--finetune-steps", "0"],
              ["--save-lambda", "5"]):
    with pytest.raises(SystemExit):
      diffq_lm.parse_args(bad)
  assert "--save-lambda 5.0 is not one of" in capsys.readouterr().err
