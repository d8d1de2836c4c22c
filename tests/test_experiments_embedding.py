"""experiments.embedding: the settings fit their budgets; results agree with files."""

import json
import os
import pathlib

import jax
import numpy as np
import pytest

import compressax as cx
from experiments import embedding
from experiments import lm

SHAKESPEARE = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture(autouse=True)
def _standard_promotion():
  with jax.numpy_dtype_promotion("standard"):  # optax's schedules
    yield


def _bytes(method, s, rows, cols):
  if method == "lowrank":
    return s["rank"] * (rows + cols) * 4
  if method == "pq":
    return rows * s["subvectors"] * s["bits"] / 8 + 2 ** s["bits"] * cols * 4
  return rows * cols * s["bits"] / 8


@pytest.mark.parametrize("ratio", [4, 10, 20, 38, 50])
def test_setting_is_the_largest_that_fits(ratio):
  rows, cols = 10_000, 256
  budget = rows * cols * 4 / ratio
  low = embedding.setting("lowrank", ratio, rows, cols)
  assert _bytes("lowrank", low, rows, cols) <= budget
  assert _bytes("lowrank", {"rank": low["rank"] + 1}, rows, cols) > budget
  pq = embedding.setting("pq", ratio, rows, cols)
  best = max(_bytes("pq", {"subvectors": m, "bits": b}, rows, cols)
             for m in (1, 2, 4, 8, 16, 32, 64, 128, 256) for b in range(1, 13)
             if _bytes("pq", {"subvectors": m, "bits": b}, rows, cols) <= budget)
  assert _bytes("pq", pq, rows, cols) == best
  dq = embedding.setting("diffq", ratio, rows, cols)
  assert dq is None if ratio > 32 else dq == {"bits": int(32 // ratio)}


def test_setting_none_when_nothing_fits():
  assert embedding.setting("lowrank", 1000, 100, 16) is None
  assert embedding.setting("pq", 1000, 100, 16) is None


def test_embedding_smoke_results_agree_with_files(tmp_path):
  text = (SHAKESPEARE.read_text()[:30_000] if SHAKESPEARE.exists()
          else "to be or not to be, that is the question:\n" * 600)
  data = tmp_path / "t.txt"
  data.write_text(text)
  out = tmp_path / "run"
  flags = ["--data", str(data), "--vocab", "200", "--width", "32", "--layers", "1",
           "--heads", "2", "--ffn", "64", "--context", "16", "--steps", "40",
           "--batch", "8", "--cache", str(tmp_path / "cache")]
  embedding.main(flags + ["--finetune-steps", "6", "--ratios", "12", "--quiet",
                          "--out", str(out)])
  with open(out / "results.json") as f:
    saved = json.load(f)
  model, corpus, _ = lm.setup(lm.parse_args(flags))
  runs = {(r["method"], r["how"]): r for r in saved["runs"]}
  assert set(runs) == {(m, h) for m in embedding.METHODS for h in ("post-hoc", "task-aware")}
  for r in saved["runs"]:
    assert r["file_bytes"] == os.path.getsize(r["file"])
    assert r["val_loss"] == lm.evaluate(model, cx.load(r["file"]), corpus.val)
    leaf = {s.path: s for s in cx.size_report(r["file"]).leaves}[embedding.TABLE]
    assert r["table_bytes"] == leaf.value_bytes + leaf.index_bytes
    assert r["table_ratio"] == pytest.approx(saved["float_table_bytes"] / r["table_bytes"])
  tables = {k: cx.load(r["file"], keep_compressed=True)["params"]["embed"]["embedding"]
            for k, r in runs.items()}
  assert tables[("lowrank", "task-aware")].rank == runs[("lowrank", "post-hoc")]["setting"]["rank"]
  # Task-aware PQ trains the codebooks and holds the post-hoc assignment.
  post, aware = tables[("pq", "post-hoc")], tables[("pq", "task-aware")]
  np.testing.assert_array_equal(post.codes, aware.codes)
  assert not np.array_equal(post.codebooks, aware.codebooks)
  assert isinstance(tables[("diffq", "task-aware")], cx.diffq.DiffQArray)
  assert isinstance(tables[("diffq", "post-hoc")], cx.quantize.QuantizedArray)
  assert (out / "embedding.png").exists()
