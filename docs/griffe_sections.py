"""Griffe extension for the docs site (mkdocs.yml): read ``Example:`` as ``Examples:``.

compressax's Google-style docstrings title their doctests ``Example:``, which
the Google style accepts; griffe knows only ``Examples:`` and would render the
``>>>`` lines as Markdown block quotes.
"""

from __future__ import annotations

import re

import griffe

_SINGULAR = re.compile(r"^(\s*)Example:\s*$", re.M)


class ExampleSections(griffe.Extension):
  """Renames each docstring's ``Example:`` section to ``Examples:``."""

  def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
    if obj.docstring is not None:
      obj.docstring.value = _SINGULAR.sub(r"\1Examples:", obj.docstring.value)
