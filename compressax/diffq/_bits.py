"""DiffQ's learned bit widths: one logit per group of weights.

``bits = b_min + sigmoid(logit) * (b_max - b_min)``. :func:`init_logits`
builds a logits pytree with the params' structure: a selected leaf gets a
float32 vector with one logit per group of ``group_size`` consecutive
(flattened) weights, the last group possibly shorter; every other leaf gets
``cx.SKIP``, the library's one "not here" marker: a pytree node with no
children, so an Optax optimizer such as ``optax.adam`` holds state for the
whole logits tree at no cost, orbax checkpoints it, and
:func:`~compressax.diffq.noisy`, :func:`~compressax.diffq.model_size` and
:func:`~compressax.diffq.quantize` leave the leaf unquantized. (The empty
``(0,)`` arrays of earlier releases, and ``None``, still mean the same.)

References:
  Défossez, Adi, Synnaeve, *Differentiable Model Compression via
  Pseudo Quantization Noise*, 2021. https://arxiv.org/abs/2104.09987
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from compressax import _checks
from compressax import _select

__all__ = ["bits_from_logits", "init_logits"]

MAX_BITS = 15  # final codes are uint16 and bit widths fit a 4-bit code
_MB = 2 ** 20  # bytes


def check_group_size(group_size) -> int:
  if (isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer))
      or group_size < 0):
    raise ValueError(f"group_size must be an int >= 0 (0 = one group per tensor), "
                     f"got {group_size!r}")
  return int(group_size)


def check_bounds(b_min, b_max) -> None:
  for name, v in (("b_min", b_min), ("b_max", b_max)):
    if _checks.is_concrete(v) and not 1 <= float(v) <= MAX_BITS:
      raise ValueError(f"{name} must be in [1, {MAX_BITS}], got {v}")
  if _checks.is_concrete(b_min) and _checks.is_concrete(b_max) and \
      not float(b_min) < float(b_max):
    raise ValueError(f"b_min must be < b_max, got b_min={b_min}, b_max={b_max}")


def n_groups(size: int, group_size: int) -> int:
  """Groups of a tensor of ``size`` weights (0 = one group)."""
  return 1 if group_size == 0 else -(-size // group_size)


def group_counts(size: int, group_size: int) -> np.ndarray:
  """Weights in each group (the last one may be short), as int64."""
  g = n_groups(size, group_size)
  if group_size == 0:
    return np.array([size], np.int64)
  counts = np.full(g, group_size, np.int64)
  counts[-1] = size - (g - 1) * group_size
  return counts


def expand(per_group: jax.Array, shape: tuple, group_size: int) -> jax.Array:
  """Broadcast per-group values to every weight of a tensor of ``shape``."""
  size = math.prod(shape)
  if group_size == 0:
    return jnp.broadcast_to(per_group.reshape(()), shape)
  return jnp.repeat(per_group, group_size)[:size].reshape(shape)


def zip_logits(params, logits):
  """``(treedef, [(keypath, param, logit), ...])`` after a structure check."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(
      params, is_leaf=_select.is_leaf)
  l_leaves, l_def = jax.tree_util.tree_flatten(logits, is_leaf=_select.is_leaf)
  if l_def != treedef:
    raise ValueError(f"the logits tree does not match the params tree:\n"
                     f"  params: {treedef}\n  logits: {l_def}")
  return treedef, [(p, x, l) for (p, x), l in zip(leaves, l_leaves)]


def is_quantized(path, x, logit, group_size: int) -> bool:
  """Whether a leaf has bit logits; checks their count against ``group_size``."""
  if _select.is_skip(logit) or np.size(logit) == 0:
    return False
  _checks.check_floating(path, x)
  want = n_groups(int(np.size(x)), group_size)
  if np.shape(logit) != (want,):
    _checks.fail(path, f"has logits of shape {np.shape(logit)}, but "
                       f"group_size={group_size} gives {want} group(s) for "
                       f"{np.size(x)} weights; use the group_size of init_logits")
  if _checks.is_concrete(logit):
    nan = np.isnan(np.asarray(logit, np.float32))
    if nan.any():
      _checks.fail(path, f"bit logits contain {int(nan.sum())} NaN value(s) "
                         f"(groups {np.flatnonzero(nan)[:8].tolist()}); a NaN "
                         "has no bit width")
  return True


def logit_bits(logit, b_min, b_max) -> jax.Array:
  """``b_min + sigmoid(logit) (b_max - b_min)``; a NaN logit gives ``b_max``.

  A traced NaN cannot be rejected; reading it as ``+inf`` keeps every group
  at a valid width (never 0 bits, never NaN sizes or noise), at the most
  bits, and gives the NaN logit a zero gradient.
  """
  logit = jnp.asarray(logit).astype(jnp.float32)
  t = jax.nn.sigmoid(jnp.where(jnp.isnan(logit), jnp.inf, logit))
  return b_min + t * (b_max - b_min)


def bits_from_logits(logits, *, b_min: float = 2, b_max: float = 15) -> Any:
  """Bit widths from bit logits: ``b_min + sigmoid(logit) * (b_max - b_min)``.

  Args:
    logits: a logits pytree from :func:`init_logits` (or a single array).
    b_min, b_max: the bit range, ``1 <= b_min < b_max <= 15``.

  Returns:
    A pytree like ``logits`` of float32 (fractional) bit widths; ``cx.SKIP``
    (and empty) leaves stay as they are. A NaN logit gives ``b_max``.

  Raises:
    ValueError: for bad bounds.

  References:
    Défossez et al., *DiffQ*, 2021. https://arxiv.org/abs/2104.09987
  """
  check_bounds(b_min, b_max)
  return jax.tree_util.tree_map(
      lambda l: l if _select.is_skip(l) else logit_bits(l, b_min, b_max),
      logits, is_leaf=_select.is_leaf)


def init_logits(params, *, group_size: int = 16, init_bits: float = 8.0,
                b_min: float = 2, b_max: float = 15, min_size: float = 0.01,
                where=None) -> Any:
  """Bit logits for DiffQ, initialized so that every group has ``init_bits``.

  Args:
    params: a parameter pytree (linen dict, ``nnx.State``, plain dict).
    group_size: weights per logit, in flattened order (the last group may be
      shorter); 0 = one logit per tensor. DiffQ uses 16 in its experiments.
    init_bits: the initial bit width, strictly inside ``(b_min, b_max)``.
    b_min, b_max: the bit range, ``1 <= b_min < b_max <= 15``.
    min_size: selected leaves under this many MB (2^20 bytes) at fp32 are
      not quantized (DiffQ's 0.01 MB rule); 0 quantizes all selected leaves.
    where: the selection rule (default: weight matrices and kernels).

  Returns:
    A pytree with ``params``' structure: float32 ``(n_groups,)`` for each
    quantized leaf, ``cx.SKIP`` for every other leaf.

  Raises:
    TypeError: a selected leaf is not floating point (names its path).
    ValueError: a selected leaf has NaN/Inf (names its path), or
      ``group_size``, the bit bounds or ``init_bits`` are invalid.

  Example:
    >>> import jax.numpy as jnp, compressax as cx
    >>> logits = cx.diffq.init_logits({"w": jnp.ones((4, 8))}, min_size=0)
    >>> logits["w"].shape, cx.diffq.bits_from_logits(logits)["w"][0].round(3)
    ((2,), Array(8., dtype=float32))

  References:
    Défossez et al., *DiffQ*, 2021. https://arxiv.org/abs/2104.09987
  """
  group_size = check_group_size(group_size)
  check_bounds(b_min, b_max)
  if not float(b_min) < float(init_bits) < float(b_max):
    raise ValueError(f"init_bits must be in ({b_min}, {b_max}), got {init_bits}")
  t = (float(init_bits) - float(b_min)) / (float(b_max) - float(b_min))
  logit0 = math.log(t / (1.0 - t))
  sel = jax.tree_util.tree_leaves(_select.select(params, where),
                                  is_leaf=_select.is_leaf)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(
      params, is_leaf=_select.is_leaf)
  out = []
  for (path, x), s in zip(leaves, sel):
    if s:
      _checks.check_floating(path, x)
      _checks.check_finite(path, x)
    if s and np.size(x) and np.size(x) * 4 >= min_size * _MB:
      g = n_groups(int(np.size(x)), group_size)
      out.append(jnp.full((g,), logit0, jnp.float32))
    else:
      out.append(_select.SKIP)
  return jax.tree_util.tree_unflatten(treedef, out)
