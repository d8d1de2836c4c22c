"""Construction-time checks shared by the compression-aware Optax transforms."""

from __future__ import annotations

from typing import Any

import optax

__all__: list[str] = []


def check_inner(inner: Any, transform: str) -> optax.GradientTransformation:
  """``inner`` must be an Optax transform (anything with ``init``/``update``).

  Raises:
    TypeError: naming ``transform`` when ``inner`` is missing or not a
      ``GradientTransformation``.
  """
  if inner is None:
    raise TypeError(f"{transform}: the inner optimizer is missing; pass an "
                    "optax.GradientTransformation, e.g. optax.sgd(0.1)")
  if isinstance(inner, optax.GradientTransformation):
    return inner
  if callable(getattr(inner, "init", None)) and callable(
      getattr(inner, "update", None)):
    return inner
  raise TypeError(f"{transform}: the inner optimizer must be an "
                  f"optax.GradientTransformation, got {type(inner).__name__}")


def require_params(params: Any, transform: str) -> None:
  """Transforms that look at the weights need ``update(..., params)``."""
  if params is None:
    raise ValueError(f"{transform} needs the current params: call "
                     "`tx.update(grads, state, params)`")


def check_steps(transform: str, begin_step: int, end_step: int,
                frequency: int) -> None:
  """A schedule ``[begin_step, end_step]`` updated every ``frequency`` steps."""
  for name, v in (("begin_step", begin_step), ("end_step", end_step),
                  ("frequency", frequency)):
    if not isinstance(v, int) or isinstance(v, bool):
      raise TypeError(f"{transform}: {name} must be a Python int, got {v!r}")
  if begin_step < 0:
    raise ValueError(f"{transform}: begin_step must be >= 0, got {begin_step}")
  if end_step < begin_step:
    raise ValueError(f"{transform}: end_step ({end_step}) must be >= "
                     f"begin_step ({begin_step})")
  if frequency < 1:
    raise ValueError(f"{transform}: frequency must be >= 1, got {frequency}")
