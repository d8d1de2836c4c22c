"""Training checkpoints with orbax-checkpoint, compressed nodes included.

Compressed nodes are pytrees whose data fields are arrays and whose static
fields live in the tree structure, and optax states are NamedTuples of arrays,
so orbax's ``StandardCheckpointer`` saves them as they are. To get the node
classes (and NamedTuples) back, restore against a *target*: a concrete state
or its abstract form (``jax.ShapeDtypeStruct`` leaves, e.g. from
``jax.eval_shape``); its structure supplies the static fields. Without a
target orbax returns plain nested dicts/lists of arrays.

The recipe these helpers wrap::

  ckpt = ocp.StandardCheckpointer()
  ckpt.save(directory, state)
  ckpt.wait_until_finished()      # saving is asynchronous
  state = ckpt.restore(directory, jax.tree.map(
      ocp.utils.to_shape_dtype_struct, target))
  ckpt.close()

For a deployable artifact (entropy-coded, a fraction of the size) use
:func:`compressax.io.save` instead; checkpoints keep masks, codebooks, bit
logits and optimizer state at full width for resuming training.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

__all__ = ["save_checkpoint", "restore_checkpoint"]


def _abstract(x):
  import orbax.checkpoint as ocp
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    x = np.asarray(x)
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  return ocp.utils.to_shape_dtype_struct(x)


def save_checkpoint(directory, state: Any, *, force: bool = False) -> str:
  """Saves a training state (params, compressed nodes, optax state) with orbax.

  Blocks until the asynchronous write has finished.

  Args:
    directory: the checkpoint directory to create (made absolute).
    state: any pytree of arrays: dicts, NamedTuples, compressed nodes.
    force: overwrite an existing checkpoint directory.

  Returns:
    The absolute checkpoint directory.
  """
  import orbax.checkpoint as ocp
  directory = os.path.abspath(os.fspath(directory))
  ckpt = ocp.StandardCheckpointer()
  try:
    ckpt.save(directory, state, force=force)
    ckpt.wait_until_finished()
  finally:
    ckpt.close()
  return directory


def restore_checkpoint(directory, target: Any = None) -> Any:
  """Restores a state saved by :func:`save_checkpoint`.

  Args:
    directory: the checkpoint directory.
    target: a state of the same structure (concrete arrays or
      ``jax.ShapeDtypeStruct`` leaves) giving node classes, static fields and
      NamedTuple types; ``None`` returns orbax's plain nested containers.

  Returns:
    The restored state, with the target's structure when one is given.
  """
  import orbax.checkpoint as ocp
  directory = os.path.abspath(os.fspath(directory))
  ckpt = ocp.StandardCheckpointer()
  try:
    if target is None:
      return ckpt.restore(directory)
    return ckpt.restore(directory, jax.tree.map(_abstract, target))
  finally:
    ckpt.close()
