"""The code passes the linter the project configures (``[tool.ruff]``).

pyflakes-class errors (undefined names, unused imports and variables) and
pycodestyle's non-layout errors, over the library, experiments, benchmarks,
tests and docs scripts.
"""

import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ruff_is_clean():
  ruff = shutil.which("ruff") or shutil.which("ruff", path=str(
      pathlib.Path(sys.executable).parent))
  if ruff is None:
    pytest.fail("ruff is not installed: it is part of the test extra "
                "(pip install -e '.[test]')")
  proc = subprocess.run(
      [ruff, "check", "--output-format", "concise", "compressax",
       "experiments", "benchmarks", "tests", "colab", "docs"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
