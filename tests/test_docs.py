"""The docs and notebooks stay true to the code.

* every public name of every module (its ``__all__``) appears in its page,
  and every name a page's API table lists is public (no documented vapour);
* the ```python blocks of each page run, in order, in one fresh namespace
  (under the conftest's ``rank_promotion="raise"``, with the default dtype
  promotion users have);
* each Colab notebook is valid nbformat 4 JSON and its code cells compile
  (tests/test_notebooks.py runs them).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import pytest

import compressax as cx

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
COLAB = ROOT / "colab"

MODULES = ["quantize", "prune", "lowrank", "distill", "diffq", "optim", "io",
           "methods", "weightless", "run"]
NOTEBOOKS = ["quickstart.ipynb", "compression_aware_training.ipynb"]
CODE_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
TABLE = re.compile(r"<!-- api-table: (\w+) -->\n(.*?)<!-- /api-table -->", re.S)


def _page(name: str) -> str:
  path = DOCS / name
  assert path.exists(), f"missing docs page {path}"
  return path.read_text()


def _modules_present() -> list[str]:
  # Every module, present or not: a missing one must fail its tests, never
  # drop out of the parametrization (tests/test_public_api.py checks it too).
  return list(MODULES)


def _blocks(text: str) -> list[str]:
  return CODE_BLOCK.findall(text)


@pytest.mark.parametrize("module", _modules_present())
def test_every_public_name_is_documented(module):
  text = _page(f"{module}.md")
  public = getattr(cx, module).__all__
  assert public, f"cx.{module}.__all__ is empty"
  missing = [n for n in public
             if not re.search(rf"\b{re.escape(module)}\.{re.escape(n)}\b", text)
             and not re.search(rf"`{re.escape(n)}`", text)]
  assert not missing, f"docs/{module}.md does not mention: {missing}"


@pytest.mark.parametrize("module", _modules_present())
def test_api_table_lists_only_public_names(module):
  text = _page(f"{module}.md")
  tables = TABLE.findall(text)
  assert [t[0] for t in tables] == [module], (
      f"docs/{module}.md needs exactly one api-table block for {module}")
  listed = re.findall(rf"^\| `cx\.{module}\.(\w+)` \|", tables[0][1], re.M)
  public = getattr(cx, module).__all__
  assert sorted(listed) == sorted(public), (
      f"docs/{module}.md table is stale; run python docs/gen_api_tables.py\n"
      f"  not public: {sorted(set(listed) - set(public))}\n"
      f"  not listed: {sorted(set(public) - set(listed))}")


def test_api_tables_are_generated():
  # The summaries too, not only the names: a table is the generator's output.
  r = subprocess.run([sys.executable, str(DOCS / "gen_api_tables.py"), "--check"],
                     capture_output=True, text=True, cwd=ROOT)
  assert r.returncode == 0, (r.stdout + r.stderr)[-2000:]


def test_index_lists_top_level_names_and_links_pages():
  text = _page("index.md")
  missing = [n for n in cx.__all__ if f"cx.{n}" not in text]
  assert not missing, f"docs/index.md does not mention: {missing}"
  for module in MODULES:
    assert f"({module}.md)" in text, f"docs/index.md does not link {module}.md"


def test_pages_have_references_and_no_unsourced_numbers():
  for module in MODULES:
    text = _page(f"{module}.md")
    assert "## References" in text, f"docs/{module}.md has no References"
    assert "arxiv.org" in text, f"docs/{module}.md cites no paper"
    # Accuracy/speed claims belong in docs/results.md next to their command.
    prose = CODE_BLOCK.sub("", text)
    claims = re.findall(r"\b\d+(?:\.\d+)?\s*(?:%\s*(?:top-1|accuracy)|x faster|ms\b)",
                        prose)
    assert not claims, f"docs/{module}.md states numbers {claims}"


def _run_blocks(name: str, tmp_path, monkeypatch):
  blocks = _blocks(_page(name))
  assert blocks, f"docs/{name} has no python examples"
  monkeypatch.chdir(tmp_path)  # examples that write files write them here
  namespace = {"__name__": f"docs_{name}"}
  for i, block in enumerate(blocks):
    try:
      # Rank promotion stays "raise" (conftest); dtype promotion is the
      # default users run with, since optax's Adam is not strict-clean.
      with jax.numpy_dtype_promotion("standard"):
        exec(compile(block, f"docs/{name}[block {i}]", "exec",
                     dont_inherit=True), namespace)
    except Exception as e:  # name the block that failed
      raise AssertionError(f"docs/{name}, python block {i} failed: {e!r}\n"
                           f"{block}") from e


@pytest.mark.parametrize("module", _modules_present())
def test_page_examples_run(module, tmp_path, monkeypatch):
  _run_blocks(f"{module}.md", tmp_path, monkeypatch)


def test_index_examples_run(tmp_path, monkeypatch):
  _run_blocks("index.md", tmp_path, monkeypatch)


def test_design_examples_run(tmp_path, monkeypatch):
  _run_blocks("design.md", tmp_path, monkeypatch)


def test_readme_example_runs_and_writes_a_real_file(tmp_path, monkeypatch):
  (block,) = _blocks((ROOT / "README.md").read_text())[:1]
  monkeypatch.chdir(tmp_path)
  namespace = {"__name__": "readme"}
  exec(compile(block, "README.md", "exec", dont_inherit=True), namespace)
  report = cx.size_report(str(tmp_path / "model.cx"))
  assert report.ratio == pytest.approx(
      4 * (784 * 300 + 300) / os.path.getsize(tmp_path / "model.cx"))


def _notebook(name: str) -> dict:
  path = COLAB / name
  assert path.exists(), f"missing notebook {path}"
  nb = json.loads(path.read_text())
  assert nb["nbformat"] == 4 and isinstance(nb["nbformat_minor"], int)
  assert isinstance(nb["metadata"], dict) and isinstance(nb["cells"], list)
  for i, cell in enumerate(nb["cells"]):
    assert cell["cell_type"] in ("code", "markdown", "raw"), (name, i)
    assert isinstance(cell["source"], (str, list)), (name, i)
    assert isinstance(cell.get("metadata"), dict), (name, i)
    if cell["cell_type"] == "code":
      assert "outputs" in cell and "execution_count" in cell, (name, i)
  return nb


def _source(cell) -> str:
  src = cell["source"]
  return src if isinstance(src, str) else "".join(src)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_valid_nbformat4(name):
  nb = _notebook(name)
  try:
    import nbformat  # optional: the strict schema check, when installed
  except ImportError:
    nbformat = None
  if nbformat is not None:
    nbformat.validate(nbformat.reads(json.dumps(nb), as_version=4))
  code = [_source(c) for c in nb["cells"] if c["cell_type"] == "code"]
  assert code, f"{name} has no code cells"
  for i, src in enumerate(code):
    compile(_script([src]), f"{name}[cell {i}]", "exec")


def _script(sources: list[str]) -> str:
  lines = []
  for src in sources:
    for line in src.splitlines():
      if line.lstrip().startswith(("%", "!")):
        line = line[:len(line) - len(line.lstrip())] + "pass  # " + line.lstrip()
      lines.append(line)
    lines.append("")
  return "\n".join(lines)


# The notebooks are executed top to bottom (install cell included) by
# tests/test_notebooks.py.
