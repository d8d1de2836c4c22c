"""The Colab notebooks run top to bottom, their install cell included.

* Each notebook's code cells run in order, in one namespace, in a fresh
  interpreter outside the checkout (as in Colab), with fewer training steps
  (``COMPRESSAX_NOTEBOOK_STEPS``) and ``MPLBACKEND=Agg``. No cell is skipped:
  the install cell is plain Python and installs nothing where compressax and
  its dependencies are importable, as they are here.
* What the install cell would install is checked separately: the checkout,
  editable, when the notebook runs inside one, and the published package
  otherwise.
* The committed notebooks are what ``colab/build_notebooks.py`` writes, and
  each has its Open-in-Colab badge.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
COLAB = ROOT / "colab"
NOTEBOOKS = ["quickstart.ipynb", "compression_aware_training.ipynb"]

# Runs the code cells of the notebook argv[1] in order, naming a failing cell.
RUNNER = """\
import json, sys, traceback
nb = json.load(open(sys.argv[1]))
ns = {"__name__": "__main__"}
cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
for i, cell in enumerate(cells):
    src = "".join(cell["source"])
    try:
        exec(compile(src, f"{sys.argv[1]}[code cell {i}]", "exec"), ns)
    except BaseException:
        traceback.print_exc()
        sys.exit(f"code cell {i} failed:\\n{src}")
print(f"ran {len(cells)} code cells")
"""


def _cells(name: str, kind: str = "code") -> list[str]:
  nb = json.loads((COLAB / name).read_text())
  return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == kind]


def _install_cell(name: str) -> str:
  (cell,) = [c for c in _cells(name) if "pip" in c]
  return cell


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom(name, tmp_path):
  for i, src in enumerate(_cells(name)):
    shell = [ln for ln in src.splitlines() if ln.lstrip().startswith(("%", "!"))]
    assert not shell, f"{name} code cell {i} has shell lines, which only IPython runs: {shell}"
  env = dict(os.environ, MPLBACKEND="Agg", COMPRESSAX_NOTEBOOK_STEPS="64")
  proc = subprocess.run([sys.executable, "-c", RUNNER, str(COLAB / name)],
                        cwd=tmp_path, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, (f"{name} (rc {proc.returncode}):\n"
                                f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
  assert "compressax and its dependencies are installed" in proc.stdout
  assert "ran " in proc.stdout


def _run_install_cell(name, monkeypatch, cwd, missing=()):
  """Execs the install cell in ``cwd`` with ``missing`` modules; returns pip calls."""
  calls = []
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda m, *a: None if m in missing else real(m, *a))
  monkeypatch.setattr(subprocess, "check_call", lambda cmd, **kw: calls.append(cmd))
  monkeypatch.setattr(sys, "path", list(sys.path))
  monkeypatch.chdir(cwd)
  ns = {"__name__": "__main__"}
  exec(compile(_install_cell(name), f"{name}[install]", "exec"), ns)
  return calls, ns


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_install_cell_installs_the_checkout_editable_inside_it(name, monkeypatch):
  calls, ns = _run_install_cell(name, monkeypatch, COLAB)
  assert calls == [] and ns["root"] == ROOT  # everything importable: a no-op
  calls, ns = _run_install_cell(name, monkeypatch, COLAB, missing=("compressax",))
  assert calls == [[sys.executable, "-m", "pip", "install", "-q", "-e",
                    f"{ROOT}[experiments]"]]
  assert sys.path[0] == str(ROOT)  # importable before a kernel restart


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_install_cell_installs_the_published_package_elsewhere(name, monkeypatch, tmp_path):
  calls, ns = _run_install_cell(name, monkeypatch, tmp_path, missing=("sklearn",))
  assert ns["root"] is None
  assert calls == [[sys.executable, "-m", "pip", "install", "-q",
                    "compressax[experiments]"]]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_has_colab_badge_and_runtime_steps(name):
  text = "\n".join(_cells(name, "markdown"))
  assert "colab.research.google.com/github/" in text and f"/blob/main/colab/{name})" in text
  assert "Change runtime type" in text and "TPU" in text


def test_notebooks_are_what_the_builder_writes(tmp_path, monkeypatch):
  spec = importlib.util.spec_from_file_location("build_notebooks", COLAB / "build_notebooks.py")
  builder = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(builder)
  monkeypatch.setattr(builder, "HERE", tmp_path)
  builder.main()
  for name in NOTEBOOKS:
    assert (tmp_path / name).read_text() == (COLAB / name).read_text(), (
        f"colab/{name} is stale: run python colab/build_notebooks.py")
