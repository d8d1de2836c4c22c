"""Unstructured pruning masks: magnitude (layer or global scope) and random."""

from __future__ import annotations

import jax

from compressax import _checks
from compressax import _sharding
from compressax.prune import _leaves
from compressax.prune import _rank

__all__ = ["magnitude_mask", "random_mask"]


def magnitude_mask(params, sparsity, *, scope: str = "layer", where=None,
                   method: str | None = None):
  """Keep the largest-magnitude weights: exactly ``n - floor(s * n)`` of them.

  The pruning step of Deep Compression (Han et al.) and of gradual magnitude
  pruning (Zhu & Gupta). With ``scope="layer"`` each selected leaf of ``n``
  weights keeps exactly ``n - floor(s * n)`` weights; with ``scope="global"``
  all selected weights are ranked together by ``|w|`` and exactly
  ``N - floor(s * N)`` are kept in total (``N`` = selected weights).

  Ties never change the count: weights are ranked by ``|w|`` descending, then
  by flat index ascending (row-major within a leaf, leaves in tree order for
  the global scope), so of equal magnitudes the earlier weight is kept.
  ``floor(s * n)`` is exact: a Python float is read as its shortest decimal
  (so 0.3 of 10 prunes 3), and a float32 value, concrete or traced, as that
  float32 with ``s * n`` just below an integer (within float32 rounding)
  taken as the integer (so ``jnp.float32(0.95)`` of 30000 prunes 28500).
  Eager and traced float32 sparsities give the same count (see
  ``pruned_count`` in ``_rank.py``).

  Args:
    params: a parameter pytree (linen ``{'params': ...}``, ``nnx.State``, dict).
    sparsity: the fraction pruned, in ``[0, 1)``. A scalar (may be traced, so
      ``jax.vmap`` over a vector of sparsities works); for ``scope="layer"``
      also a pytree of per-leaf scalars with the params' structure (see
      :func:`erk_sparsity`) or a mapping from leaf path to scalar. A traced
      value cannot be rejected: one of 1 or more keeps exactly one weight
      (per leaf, or in all for the global scope), a negative one or NaN
      prunes nothing.
    scope: ``"layer"`` or ``"global"``.
    where: which leaves to prune (default: weight matrices and kernels).
    method: how the magnitude threshold is found; every method gives the
      same mask. ``None`` picks by size (a sort up to 4M weights, a 32-step
      bisection on the float bit pattern above, which needs no copy of the
      weights). ``"bisect"`` is several times faster for a single sparsity
      on CPU from about 16k weights on; ``"sort"`` is faster under
      ``jax.vmap`` over sparsities, where one sort serves them all.

  Returns:
    A mask pytree with the params' structure: a ``bool`` array of the leaf's
    shape at each selected leaf (True = kept) and a 0-d ``True`` elsewhere.

  Raises:
    ValueError: sparsity outside ``[0, 1)``, NaN/Inf weights, unknown scope
      or method, or a sparsity mapping that misses a leaf (the leaf path is
      named).
    TypeError: integer/bool leaves selected, or a non-scalar sparsity.

  Example:
    >>> params = {"dense": {"kernel": jnp.arange(1.0, 101.0).reshape(10, 10),
    ...                     "bias": jnp.zeros(10)}}
    >>> mask = cx.prune.magnitude_mask(params, 0.9, scope="global")
    >>> int(mask["dense"]["kernel"].sum()), mask["dense"]["bias"].shape
    (10, ())
    >>> pruned = cx.prune.apply_mask(params, mask)

  References:
    Han, Mao, Dally, *Deep Compression*, ICLR 2016, arXiv:1510.00149.
    Zhu, Gupta, *To prune, or not to prune*, 2017, arXiv:1710.01878.
  """
  if scope not in ("layer", "global"):
    raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
  if method not in (None, "sort", "bisect"):
    raise ValueError(f"method must be None, 'sort' or 'bisect', got {method!r}")
  treedef, pairs, flags = _leaves.flat_selection(params, where)
  selected = [(p, _leaves.dense_value(p, x)) for (p, x), f in zip(pairs, flags) if f]
  key_fn = _rank.magnitude_keys
  if scope == "layer":
    sps = _leaves.per_leaf_sparsity(params, sparsity, pairs, flags)
    flat = [_rank.topk_masks([x], _rank.kept_count(x.size, s), key_fn=key_fn,
                             method=method)[0]
            for (_, x), s in zip(selected, sps)]
  else:
    _rank.check_scalar("params (global scope)", sparsity)
    n_total = sum(int(x.size) for _, x in selected)
    flat = _rank.topk_masks([x for _, x in selected], _rank.kept_count(n_total, sparsity),
                            key_fn=key_fn, method=method)
  masks = [_sharding.unravel(m, x) for m, (_, x) in zip(flat, selected)]
  return _leaves.assemble(treedef, flags, masks)


def random_mask(params, sparsity, key, *, where=None):
  """A uniformly random mask keeping exactly ``n - floor(s * n)`` per leaf.

  The random baseline of pruning studies. Each selected leaf draws its own
  random ranking from ``jax.random.fold_in(key, i)`` (``i`` = the leaf's
  position in tree order), so the same key gives bit-identical masks, jitted
  or not. Counts follow the same exact rule as :func:`magnitude_mask`.

  Args:
    params: a parameter pytree.
    sparsity: fraction pruned per leaf, as for :func:`magnitude_mask` with
      ``scope="layer"`` (scalar, per-leaf pytree or path mapping; may be
      traced).
    key: a JAX PRNG key.
    where: which leaves to prune (default: weight matrices and kernels).

  Returns:
    A mask pytree like :func:`magnitude_mask`'s.

  Raises:
    ValueError: sparsity outside ``[0, 1)``.
    TypeError: integer/bool leaves selected, or a non-scalar sparsity.

  References:
    Liu et al., *The Unreasonable Effectiveness of Random Pruning*, ICLR 2022,
    arXiv:2202.02643.
  """
  treedef, pairs, flags = _leaves.flat_selection(params, where)
  sps = _leaves.per_leaf_sparsity(params, sparsity, pairs, flags)
  masks, j = [], 0
  for i, ((p, x), f) in enumerate(zip(pairs, flags)):
    if not f:
      continue
    _checks.check_floating(p, x)
    n = int(x.size) if hasattr(x, "size") else 1
    keys = _rank.random_keys(jax.random.fold_in(key, i), n)
    # The keys are drawn unsharded (the same bits on any mesh); the mask
    # then takes the leaf's sharding.
    masks.append(_sharding.unravel(
        _rank.topk_masks([keys], _rank.kept_count(n, sps[j]))[0], x))
    j += 1
  return _leaves.assemble(treedef, flags, masks)
