"""How a global sparsity target is spread over layers: uniform, ERK, patterns.

Each function returns a pytree with the params' structure holding one
sparsity per leaf (0.0 at unselected leaves), which
:func:`magnitude_mask` (``scope="layer"``) and :func:`random_mask` accept.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from compressax import _checks
from compressax import _rules
from compressax._select import is_skip
from compressax.prune import _leaves
from compressax.prune import _rank

__all__ = ["erk_sparsity", "layer_sparsities", "sparsity_from_patterns",
           "uniform_sparsity"]


def _tree(treedef, flags, values):
  it = iter(values)
  return jax.tree_util.tree_unflatten(
      treedef, [next(it) if f else (f if is_skip(f) else 0.0) for f in flags])


def uniform_sparsity(params, sparsity, *, where=None):
  """The same sparsity for every selected leaf.

  Args:
    params: a parameter pytree.
    sparsity: a scalar in ``[0, 1)`` (may be traced).
    where: which leaves (default: weight matrices and kernels).

  Returns:
    A pytree of per-leaf sparsities (0.0 at unselected leaves).

  Raises:
    ValueError: sparsity outside ``[0, 1)``.
  """
  _rank.check_scalar("sparsity", sparsity)
  treedef, _, flags = _leaves.flat_selection(params, where)
  return _tree(treedef, flags, [sparsity] * sum(flags))


def erk_sparsity(params, sparsity, *, where=None):
  """Erdos-Renyi-Kernel per-layer sparsities meeting a global target.

  A leaf of shape ``(d_1, ..., d_r)`` gets density ``eps * (d_1 + ... + d_r)
  / (d_1 * ... * d_r)``, with one ``eps`` chosen so that the selected weights
  keep ``(1 - sparsity)`` of their total. A leaf whose density would exceed 1
  is made dense and ``eps`` is solved again over the rest; raising ``eps``
  only pushes more leaves over 1, so at most as many rounds as leaves are
  needed. With a concrete sparsity the computation runs in float64 on the
  host and returns Python floats; a traced one runs in float32 with a fixed
  number of rounds, so ``jax.vmap`` over targets works.

  The realised density after :func:`magnitude_mask` rounds each leaf's kept
  count up (``n - floor(s * n)``), so it exceeds the target by less than one
  weight per leaf.

  Args:
    params: a parameter pytree.
    sparsity: the global target in ``[0, 1)`` (may be traced).
    where: which leaves (default: weight matrices and kernels).

  Returns:
    A pytree of per-leaf sparsities (0.0 at unselected leaves).

  Raises:
    ValueError: sparsity outside ``[0, 1)``.

  References:
    Evci, Gale, Menick, Castro, Elsen, *Rigging the Lottery: Making All
    Tickets Winners* (RigL), ICML 2020, arXiv:1911.11134 (ERK);
    Mocanu et al. 2018, arXiv:1707.04780 (Erdos-Renyi).
  """
  _rank.check_scalar("sparsity", sparsity)
  treedef, pairs, flags = _leaves.flat_selection(params, where)
  shapes = [tuple(np.shape(x)) for (_, x), f in zip(pairs, flags) if f]
  if not shapes:
    return _tree(treedef, flags, [])
  n = np.array([float(np.prod(s)) for s in shapes])
  r = np.array([float(sum(s)) / max(float(np.prod(s)), 1.0) for s in shapes])
  if _checks.is_concrete(sparsity):
    dens = _erk_densities(np, n, r, float(sparsity), np.float64)
    values = [float(1.0 - d) for d in dens]
  else:
    dens = _erk_densities(jnp, n, r, sparsity, jnp.float32)
    values = list(1.0 - dens)
  return _tree(treedef, flags, values)


def _erk_densities(xp, n, r, sparsity, dtype):
  n = xp.asarray(n, dtype)
  r = xp.asarray(r, dtype)
  budget = (1.0 - xp.asarray(sparsity).astype(dtype)) * xp.sum(n)

  def scale(dense):  # eps: what the leaves not yet dense share of the budget left
    free = xp.sum(xp.where(dense, 0.0, r * n))
    left = budget - xp.sum(xp.where(dense, n, 0.0))
    return left / xp.maximum(free, xp.asarray(1e-30, dtype))

  # len(n) rounds (callers have >= 1 leaf): each makes dense the leaves that
  # eps * r would push past density 1.
  eps = scale(xp.zeros(n.shape, bool))
  dense = eps * r > 1.0
  for _ in range(len(n) - 1):
    eps = scale(dense)
    dense = dense | (eps * r > 1.0)
  return xp.clip(xp.where(dense, 1.0, eps * r), 0.0, 1.0)


def layer_sparsities(params, sparsity, *, distribution: str = "uniform", where=None):
  """Per-leaf sparsities for a global target by a named distribution.

  Args:
    params: a parameter pytree.
    sparsity: the global target in ``[0, 1)`` (may be traced).
    distribution: ``"uniform"`` (:func:`uniform_sparsity`) or ``"erk"``
      (:func:`erk_sparsity`).
    where: which leaves (default: weight matrices and kernels).

  Returns:
    A pytree of per-leaf sparsities for :func:`magnitude_mask`.

  Raises:
    ValueError: unknown distribution or sparsity outside ``[0, 1)``.
  """
  fns = {"uniform": uniform_sparsity, "erk": erk_sparsity}
  if distribution not in fns:
    raise ValueError(f"distribution must be one of {sorted(fns)}, got {distribution!r}")
  return fns[distribution](params, sparsity, where=where)


def sparsity_from_patterns(params, patterns: Mapping, *, default=0.0, where=None):
  """Per-leaf sparsities from ``{path regex: sparsity}`` (Deep Compression style).

  Deep Compression prunes each layer to its own target (LeNet-5: conv1 34%,
  conv2 88%, ip1 92%, ip2 81% pruned). Each selected leaf takes the sparsity
  of the first pattern (in mapping order) that ``re.search``-es its
  ``/``-joined path, else ``default``.

  Args:
    params: a parameter pytree.
    patterns: mapping from regular expression to sparsity in ``[0, 1)``.
    default: sparsity of selected leaves no pattern matches.
    where: which leaves (default: weight matrices and kernels).

  Returns:
    A pytree of per-leaf sparsities (0.0 at unselected leaves).

  Raises:
    ValueError: a sparsity outside ``[0, 1)`` (the pattern is named).

  References:
    Han, Mao, Dally, *Deep Compression*, ICLR 2016, arXiv:1510.00149.
  """
  for pat, s in patterns.items():
    _rank.check_scalar(f"pattern {pat!r}", s)
  _rank.check_scalar("default", default)
  _rules.check_used(params, patterns, where=where, name="patterns")
  treedef, pairs, flags = _leaves.flat_selection(params, where)
  values = [_rules.lookup(patterns, p, x, name="sparsity", default=default)
            for (p, x), f in zip(pairs, flags) if f]
  return _tree(treedef, flags, values)
