"""docs/oneshot.md stays true to cx.oneshot (the checks of test_docs.py)."""

from __future__ import annotations

import re

import test_docs

import compressax as cx


def test_every_public_name_is_documented_and_listed():
  text = test_docs._page("oneshot.md")
  public = cx.oneshot.__all__
  missing = [n for n in public if not re.search(rf"\boneshot\.{n}\b", text)]
  assert not missing, f"docs/oneshot.md does not mention: {missing}"
  tables = test_docs.TABLE.findall(text)
  assert [t[0] for t in tables] == ["oneshot"]
  listed = re.findall(r"^\| `cx\.oneshot\.(\w+)` \|", tables[0][1], re.M)
  assert sorted(listed) == sorted(public)


def test_page_has_references_and_no_unsourced_numbers():
  text = test_docs._page("oneshot.md")
  assert "## References" in text and "arxiv.org" in text
  prose = test_docs.CODE_BLOCK.sub("", text)
  assert not re.findall(r"\b\d+(?:\.\d+)?\s*(?:%\s*(?:top-1|accuracy)|x faster|ms\b)",
                        prose)
  assert "(oneshot.md)" in test_docs._page("index.md")


def test_page_examples_run(tmp_path, monkeypatch):
  test_docs._run_blocks("oneshot.md", tmp_path, monkeypatch)
