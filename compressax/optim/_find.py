"""Reach a transform's state inside any Optax wrapper."""

from __future__ import annotations

from typing import Any

import jax
import optax

__all__ = ["find_state"]


def find_state(opt_state: Any, state_type: type) -> Any:
  """The unique state of type ``state_type`` anywhere inside ``opt_state``.

  Optax wrappers nest states: ``optax.chain`` a tuple, ``optax.MultiSteps``
  its ``inner_opt_state``, ``optax.inject_hyperparams`` its ``inner_state``,
  ``optax.masked`` its ``inner_state``, and the pruning wrappers their inner
  optimizer's. This finds the one you mean without spelling the path::

    masks = cx.optim.find_state(opt_state, cx.optim.PruneState).masks

  Args:
    opt_state: the state of any Optax transform.
    state_type: the state class, e.g. ``cx.optim.PruneState``,
      ``cx.optim.WeightSharingState`` or ``cx.optim.AdaCompState``.

  Returns:
    The state of that type.

  Raises:
    TypeError: if ``state_type`` is not a class.
    ValueError: if there is no such state (the message lists the state
      types present) or more than one (the message lists their paths).
  """
  if not isinstance(state_type, type):
    raise TypeError(f"find_state: state_type must be a state class such as "
                    f"cx.optim.PruneState, got {state_type!r}")
  found = optax.tree_utils.tree_get_all_with_path(
      opt_state, state_type.__name__,
      filtering=lambda _, v: isinstance(v, state_type))
  if len(found) == 1:
    return found[0][1]
  name = state_type.__name__
  if not found:
    present = sorted({type(x).__name__ for x in _nodes(opt_state)
                      if hasattr(type(x), "_fields")})
    raise ValueError(f"find_state: no {name} in the optimizer state; the "
                     f"state types present are {present or 'none'}")
  paths = ", ".join("opt_state" + jax.tree_util.keystr(p) for p, _ in found)
  raise ValueError(f"find_state: {len(found)} {name} in the optimizer state, "
                   f"at {paths}; pick one of these paths")


def _nodes(tree: Any):
  """Every NamedTuple (or other container) node of ``tree``, depth first."""
  stack = [tree]
  while stack:
    x = stack.pop()
    yield x
    if isinstance(x, (tuple, list)):
      stack.extend(x)
    elif isinstance(x, dict):
      stack.extend(x.values())
