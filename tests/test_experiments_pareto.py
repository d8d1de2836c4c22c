"""experiments.pareto: points from results.json files and their Pareto front."""

import json

import pytest

from experiments import pareto


def _write(tmp_path, name, **res):
  d = tmp_path / name
  d.mkdir()
  (d / "results.json").write_text(json.dumps(res))
  return str(d / "results.json")


def test_points_front_and_plot(tmp_path, capsys):
  base = dict(dataset="npz:mnist.npz", model="lenet300", dense_fp32_bytes=1000)
  _write(tmp_path, "a", experiment="pqk", file_bytes=100, test_error=0.02, **base)
  _write(tmp_path, "b", experiment="pqk", file_bytes=50, test_error=0.03, **base)
  _write(tmp_path, "c", experiment="diffq", file_bytes=80, test_error=0.5, **base,
         runs=[{"method": "qat", "file_bytes": 200, "test_error": 0.01},
               {"method": "diffq", "file_bytes": 120, "test_error": 0.025}])
  _write(tmp_path, "d", experiment="pqk", file_bytes=10, test_error=0.0,
         dataset="digits", model="lenet300", dense_fp32_bytes=1000)
  out = tmp_path / "fig" / "p.png"
  pts = pareto.main([f"PQK={tmp_path}/[ab]/results.json", f"{tmp_path}/c/results.json",
                     "--out", str(out)])
  # digits run filtered out; a multi-file experiment gives one point per file.
  got = sorted((p["label"], p["file_bytes"], p["test_error"]) for p in pts)
  assert got == [("PQK", 50, 0.03), ("PQK", 100, 0.02), ("diffq: diffq", 120, 0.025),
                 ("diffq: qat", 200, 0.01)]
  assert [p["file_bytes"] for p in pareto.front(pts)] == [50, 100, 200]
  assert pts[0]["ratio"] == pytest.approx(1000 / pts[0]["file_bytes"])
  assert out.exists() and out.stat().st_size > 1000
  assert json.loads((tmp_path / "fig" / "p.json").read_text()) == pts
  assert "plot:" in capsys.readouterr().out
  with pytest.raises(SystemExit, match="no file matches"):
    pareto.main([f"{tmp_path}/nothing*/results.json", "--out", str(out)])
