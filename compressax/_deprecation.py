"""Superseded public names keep working for a release, with a warning."""

from __future__ import annotations

import functools
import warnings
from typing import Callable


def deprecated(name: str, replacement: str) -> Callable:
  """Wrap a superseded function: a ``DeprecationWarning`` naming ``replacement``.

  Args:
    name: the public name, e.g. ``"cx.optim.quantized_params"``.
    replacement: what to use instead, e.g. ``"cx.methods.Uniform in a cx.Plan"``.
  """
  def wrap(fn):
    @functools.wraps(fn)
    def inner(*args, **kwargs):
      warnings.warn(f"{name} is deprecated and will be removed in the next "
                    f"release; use {replacement} (see docs/design.md)",
                    DeprecationWarning, stacklevel=2)
      return fn(*args, **kwargs)
    setattr(inner, "__deprecated__", replacement)  # PEP 702's marker
    inner.__doc__ = (f"Deprecated: use {replacement}.\n\n" + (fn.__doc__ or ""))
    return inner
  return wrap
