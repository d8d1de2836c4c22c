"""Regenerate the "Public names" tables of the docs pages from ``__all__``.

Each page holds a block::

  <!-- api-table: quantize -->
  ...
  <!-- /api-table -->

and this script replaces what lies between the markers with a table of every
name in ``compressax.<module>.__all__`` (``compressax.__all__`` for ``cx``)
and the first line of its docstring. Run it after a module's API changes:

  python docs/gen_api_tables.py          # rewrite the pages
  python docs/gen_api_tables.py --check  # exit 1 if a table is stale
"""

from __future__ import annotations

import inspect
import pathlib
import re
import sys

import compressax as cx

DOCS = pathlib.Path(__file__).resolve().parent
BLOCK = re.compile(r"(<!-- api-table: (\w+) -->\n)(.*?)(<!-- /api-table -->)", re.S)

# Names without a docstring of their own (a constant's is its type's).
CONSTANTS = {
    ("cx", "is_compressed"): "`True` for a compressed leaf node (an instance of "
                             "`cx.CompressedLeaf`).",
    ("io", "FORMAT_VERSION"): "The file format version this library writes "
                              "(newer versions are refused on load).",
    ("io", "MAGIC"): "The 8 magic bytes every compressax file starts with.",
}


def _markdown(text: str) -> str:
  text = re.sub(r":[a-z]+:`~?([^`]+)`", r"`\1`", text)  # Sphinx roles
  text = text.replace("``", "`")
  return text.replace("|", "\\|")


def summary(module: str, name: str) -> str:
  """The first line of a public name's docstring, as Markdown."""
  if (module, name) in CONSTANTS:
    return CONSTANTS[(module, name)]
  mod = cx if module == "cx" else getattr(cx, module)
  obj = getattr(mod, name)
  if inspect.ismodule(obj):
    return f"The `cx.{name}` module ([{name}.md]({name}.md))."
  doc = inspect.getdoc(obj) or ""
  first = doc.strip().split("\n\n")[0].replace("\n", " ").strip()
  return _markdown(first) or "(no docstring)"


def table(module: str) -> str:
  mod = cx if module == "cx" else getattr(cx, module)
  prefix = "cx" if module == "cx" else f"cx.{module}"
  rows = ["| name | what it is |", "|---|---|"]
  for name in mod.__all__:
    rows.append(f"| `{prefix}.{name}` | {summary(module, name)} |")
  return "\n".join(rows) + "\n"


def render(text: str) -> str:
  return BLOCK.sub(lambda m: m.group(1) + table(m.group(2)) + m.group(4), text)


def main(argv: list[str]) -> int:
  stale = []
  for page in sorted(DOCS.glob("*.md")):
    old = page.read_text()
    new = render(old)
    if new != old:
      stale.append(page.name)
      if "--check" not in argv:
        page.write_text(new)
  if "--check" in argv and stale:
    print("stale API tables:", ", ".join(stale))
    return 1
  print(("rewrote: " if stale else "up to date") + ", ".join(stale))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
