"""Trained quantization by weight sharing (Deep Compression, stage 2).

Each selected leaf is clustered once (1-D k-means, linear initialization) into
``K`` shared values; from then on the cluster assignment (the codes) is fixed
and only the centroids train. The gradient of a centroid is the sum of the
gradients of the weights that share it (a segment sum over the codes), and the
centroids go through any inner Optax optimizer. The updates move every weight
onto its new centroid.

Exactness: a centroid's step is taken as ``d = fl(c_new - c_old)`` and the
stored centroid is ``fl(c_old + d)``, the value that ``optax.apply_updates``
produces for a weight sitting exactly on ``c_old``. So once the params are on
the codebook they stay exactly on it: after each update a leaf takes exactly
``K`` (or fewer) distinct values, equal to ``centroids[codes]`` bit for bit.
On the first update the raw weights are snapped with ``c_new[codes] - p``,
which lands on the codebook up to one rounding; :func:`shared_params` (or
:func:`snap_to_codebook` before training) gives the exact values at any time.

Pruned layers: with ``mask=`` (a bool tree as from ``cx.prune.magnitude_mask``)
only the kept weights are clustered, as in the paper (pruning comes first).
Pruned positions get code 0 but belong to no cluster: they add nothing to the
centroid gradients, their update is ``-p``, so they are exactly zero after
every step, and :func:`shared_params` writes zero there.

References:
  Han, Mao, Dally, *Deep Compression: Compressing Deep Neural Networks with
  Pruning, Trained Quantization and Huffman Coding*, ICLR 2016.
  https://arxiv.org/abs/1510.00149
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from compressax import _checks
from compressax import _sharding
from compressax import _rules
from compressax import _select
from compressax import quantize as _quantize
from compressax.optim import _base

__all__ = ["WeightSharingState", "shared_params", "snap_to_codebook",
           "weight_sharing"]

Clusters = Union[int, Callable[[str, Any], int]]


class WeightSharingState(NamedTuple):
  """State of :func:`weight_sharing`.

  Attributes:
    codes: per selected leaf, the cluster index of every weight (the leaf's
      shape), in the smallest unsigned dtype that holds it (``uint8`` up to
      256 clusters, ``uint16`` up to 65536, else ``int32``: the codes are
      read twice per step, so their width is part of the step's cost);
      :data:`cx.SKIP <compressax.SKIP>` on leaves trained normally.
    centroids: per selected leaf, the ``K`` shared values (float, the leaf's
      dtype); ``cx.SKIP`` on leaves trained normally.
    inner_state: the inner optimizer's state over the centroids (selected
      leaves) and the params (other leaves).
    mask: ``None`` without a mask; otherwise per leaf the bool array of kept
      weights (selected, pruned leaves), or ``cx.SKIP`` (no mask there).
  """
  codes: Any
  centroids: Any
  inner_state: Any
  mask: Any = None


_INITS = ("linear", "density", "companding", "kmeans++")


def _code_dtype(n_clusters: int):
  for dtype in (jnp.uint8, jnp.uint16):
    if n_clusters <= jnp.iinfo(dtype).max + 1:
      return dtype
  return jnp.int32


def _clusters_for(spec, bits, keypath, leaf, n_kept=None) -> int:
  if bits is not None:
    b = _rules.lookup(bits, keypath, leaf, name="bits")
    _checks.check_bits(keypath, b, 1, 16)
    k = 2 ** int(b)
  else:
    k = _rules.lookup(spec, keypath, leaf, name="n_clusters")
    if (_checks.is_concrete(k) and np.ndim(k) == 0
        and np.issubdtype(getattr(k, "dtype", object), np.integer)):
      k = int(k)  # an integer array, e.g. from optax.inject_hyperparams
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
      _checks.fail(keypath, f"n_clusters must be a positive int, got {k!r}")
  n = leaf.size if n_kept is None else n_kept
  if k > n:
    what = "weights" if n_kept is None else "kept (unpruned) weights"
    _checks.fail(keypath, f"n_clusters ({k}) exceeds the leaf's {n} {what}")
  return k


def _leaf_mask(kp, x, m):
  """A concrete bool mask of ``x``'s shape, or ``None`` when all is kept."""
  try:
    m = np.asarray(m)
  except (jax.errors.ConcretizationTypeError,
          jax.errors.TracerArrayConversionError):
    _checks.fail(kp, "weight_sharing's mask must be concrete at init "
                     "(not traced): k-means runs on the kept weights only")
  if m.dtype != np.bool_:
    _checks.fail(kp, f"mask must be bool, got {m.dtype}")
  if m.ndim == 0:
    return None if bool(m) else np.zeros(x.shape, bool)
  if m.shape != x.shape:
    _checks.fail(kp, f"mask shape {m.shape} does not match the leaf's "
                     f"{x.shape}")
  return None if m.all() else m


def weight_sharing(inner: Union[optax.GradientTransformation, float, jax.Array], *,
                   n_clusters: Clusters | None = None,
                   bits: Clusters | None = None, kmeans_iters: int = 30,
                   kmeans_init: Union[str, Callable[[str, Any], str]] = "linear",
                   where: _select.Where = None, mask: Any = None
                   ) -> optax.GradientTransformationExtraArgs:
  """Train shared weights: fixed codes, centroids updated by segment sums.

  Args:
    inner: the optimizer applied to the centroids (and, unchanged, to the
      leaves not selected), or a learning rate for plain SGD, as in the paper.
    n_clusters: ``K`` per leaf: an int, or ``(path, leaf) -> int``.
    bits: alternatively ``log2 K``: an int in ``[1, 16]`` or
      ``(path, leaf) -> int`` (Deep Compression uses 8 for conv, 5 for FC).
    kmeans_iters: Lloyd iterations of the initial clustering.
    kmeans_init: its initialization (``cx.quantize.kmeans``'s ``init``):
      ``"linear"`` (the paper's), ``"density"`` or ``"companding"``, or
      ``(path, leaf) -> init`` to choose per leaf. On magnitude-pruned
      layers the kept weights leave a gap around zero, and linear-init
      centroids that start in it stay empty; ``"companding"`` places no
      centroid where there are no weights.
    where: which leaves share weights (default: weight matrices, kernels).
    mask: the pruning mask: a bool tree with the params' structure
      (``True`` = kept; 0-d ``True`` keeps a whole leaf), as returned by
      ``cx.prune.magnitude_mask``, or ``params -> mask tree`` called at
      ``init``, or ``None`` (nothing pruned). It must be concrete at
      ``init``. Only kept weights are clustered and trained; pruned ones get
      code 0, join no cluster and are held at exactly zero.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``init(params)`` clusters
    the params (``cx.quantize.kmeans`` with ``kmeans_init``).

  Raises:
    ValueError: if neither or both of ``n_clusters`` and ``bits`` are given,
      ``bits`` is out of range, ``K`` exceeds a leaf's (kept) size, the
      mask does not fit the params, or ``kmeans_init`` names no known init
      (naming the leaf).
    TypeError: if ``inner`` is neither an Optax transform nor a number.

  Example:
    >>> params = {"dense": {"kernel": jnp.linspace(-1.0, 1.0, 512).reshape(32, 16),
    ...                     "bias": jnp.zeros(16)}}
    >>> tx = cx.optim.weight_sharing(1e-3, bits=5)
    >>> keep = cx.prune.magnitude_mask(params, 0.9)
    >>> tx = cx.optim.prune_fixed(cx.optim.weight_sharing(
    ...     1e-3, bits=5, mask=keep), keep)
    >>> state = tx.init(params)

  References:
    Han, Mao, Dally, ICLR 2016, section 3. https://arxiv.org/abs/1510.00149
  """
  name = "weight_sharing"
  # `opt` the transform updates use (None: SGD at the rate `lr`, built in
  # the update), `init_opt` the one init makes the state with.
  lr = opt = None
  if _base.is_python_number(inner):
    init_opt = opt = optax.with_extra_args_support(optax.sgd(float(inner)))
  elif isinstance(inner, (jax.Array, np.ndarray)) and np.ndim(inner) == 0:
    # A learning rate as an array (optax.inject_hyperparams makes one): an
    # argument of the kernel, so a new value does not recompile.
    lr = inner
    init_opt = optax.sgd(lr)  # SGD's state does not depend on the rate
  else:
    init_opt = opt = optax.with_extra_args_support(_base.check_inner(inner, name))
  static_inner = _base.Static(opt)
  static_where = _base.Static(where)
  if (n_clusters is None) == (bits is None):
    raise ValueError(f"{name}: give exactly one of n_clusters and bits")
  _base.check_int(name, "kmeans_iters", kmeans_iters)
  if bits is not None and not callable(bits) and _rules.as_rules(bits) is None:
    _checks.check_bits(name, bits, 1, 16)

  def init(params):
    _checks.check_tree(params, name + ".init")
    iters = _base.static_int(name, "kmeans_iters", kmeans_iters,
                             "'kmeans_iters'")
    sel = _base.selection(params, where, name, "shared")
    _rules.check_used(params, n_clusters if bits is None else bits,
                      where=where, name="n_clusters" if bits is None else "bits")
    leaves, treedef = jax.tree_util.tree_flatten_with_path(
        params, is_leaf=_select.is_leaf)
    flags = treedef.flatten_up_to(sel)
    given = mask(params) if callable(mask) else mask
    if given is None:
      masks = [None] * len(leaves)
    else:
      _checks.check_same_structure(name, params, given)
      masks = treedef.flatten_up_to(given)

    def cluster(kp, x, s, m):
      if _select.is_skip(x):  # a marker (a Plan's side state) stays one
        return x, x, None
      if not s:
        return _select.SKIP, _select.SKIP, None
      _checks.check_floating(kp, x)
      init_name = (kmeans_init(_select.path_str(kp), x) if callable(kmeans_init)
                   else kmeans_init)
      if init_name not in _INITS:
        _checks.fail(kp, f"{name}: kmeans_init must give one of {_INITS}, "
                         f"got {init_name!r}")
      m = None if m is None or _select.is_skip(m) else _leaf_mask(kp, x, m)
      if m is None:
        _checks.check_finite(kp, x)
        k = _clusters_for(n_clusters, bits, kp, x)
        c, codes = _quantize.kmeans(x, k, init=init_name, iters=iters)
        return (jnp.asarray(codes, _code_dtype(k)).reshape(x.shape),
                jnp.asarray(c, x.dtype).reshape(k), None)
      # Cluster exactly the kept values (a one-time gather with a concrete
      # index), then scatter their codes back; pruned positions get code 0.
      idx = np.flatnonzero(m)
      kept = _sharding.replicated(jnp.asarray(x)).reshape(-1)[idx]
      _checks.check_finite(kp, kept)
      k = _clusters_for(n_clusters, bits, kp, x, n_kept=idx.size)
      c, codes = _quantize.kmeans(kept, k, init=init_name, iters=iters)
      full = jnp.zeros((x.size,), _code_dtype(k)).at[idx].set(
          jnp.asarray(codes, _code_dtype(k)).reshape(-1))
      return (_sharding.like(full.reshape(x.shape), x),
              jnp.asarray(c, x.dtype).reshape(k),
              _sharding.like(jnp.asarray(m), x))

    triples = [cluster(kp, x, s, m)
               for (kp, x), s, m in zip(leaves, flags, masks)]
    codes = treedef.unflatten([c for c, _, _ in triples])
    cents = treedef.unflatten([c for _, c, _ in triples])
    kept = None
    if given is not None:
      kept = treedef.unflatten([_select.SKIP if m is None else m
                                for _, _, m in triples])
    shadow = _shadow(params, cents, sel)
    return WeightSharingState(codes, cents, init_opt.init(shadow), kept)

  def update(updates, state, params=None, **extra_args):
    _checks.check_tree(updates, name + ".update")
    _base.require_params(params, name)
    _checks.check_tree(params, name + ".update")
    extra_static, extra_args = _base.split_extra_args(extra_args)
    return _update(static_inner, static_where, extra_static, updates, state,
                   params, lr, extra_args)

  return optax.GradientTransformationExtraArgs(init, update)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _update(inner, where, extra_static, updates, state, params, lr,
            extra_args):
  """:func:`weight_sharing`'s update, one jitted kernel for every instance.

  The construction-time config is static, so eager calls reuse one compiled
  program; inside an outer ``jit`` the call is inlined.
  """
  inner = optax.sgd(lr) if inner.value is None else inner.value
  inner = optax.with_extra_args_support(inner)
  extra_args = _base.join_extra_args(extra_static, extra_args)
  sel = _base.selection(params, where.value, "weight_sharing", "shared")
  _base.check_node_updates(updates, "weight_sharing")
  leaf = _select.is_leaf

  masks = (jax.tree_util.tree_map(lambda _: _select.SKIP, state.codes)
           if state.mask is None else state.mask)

  def cgrad(g, codes, c, s, m):
    if not s:
      return g
    if not _select.is_skip(m):
      g = jnp.where(m, g, jnp.zeros_like(g))
    # Summed on gathered copies, in the unsharded order: the centroids stay
    # bit-identical on any mesh (a sharded scatter-add would add the
    # per-device partial sums in another order).
    return jax.ops.segment_sum(
        _sharding.replicated(g).reshape(-1),
        _sharding.replicated(codes).reshape(-1),
        num_segments=c.shape[0]).astype(c.dtype)

  leaves, treedef = jax.tree_util.tree_flatten(params, is_leaf=leaf)
  grads = treedef.flatten_up_to(updates)
  codes, cents, flags, kept = (treedef.flatten_up_to(t) for t in
                               (state.codes, state.centroids, sel, masks))
  cgrads = treedef.unflatten([cgrad(*a) for a in
                              zip(grads, codes, cents, flags, kept)])
  shadow = _shadow(params, state.centroids, sel)
  u, inner_state = inner.update(cgrads, state.inner_state, shadow,
                                **extra_args)

  def step(p, codes, c, du, s, m):
    if not s:
      return du, c
    d = (c + du.astype(c.dtype)) - c
    new_c = c + d
    # One row gather; `old_c + step_c` is the very float op that made
    # `new_c`, so it equals `new_c[codes]` without a third column.
    rows = _sharding.take(jnp.stack([c, d], axis=1), codes, mode="clip")
    old_c, step_c = rows[..., 0], rows[..., 1]
    out = jnp.where(p == old_c, step_c, (old_c + step_c) - p)
    if not _select.is_skip(m):
      # `p + (-p)` is exactly zero: pruned weights land on, and stay at, 0.
      out = jnp.where(m, out, -p)
    return out.astype(p.dtype), new_c

  pairs = [step(p, *rest) for p, *rest in
           zip(leaves, codes, cents, treedef.flatten_up_to(u), flags, kept)]
  outs = treedef.unflatten([o for o, _ in pairs])
  new_cents = treedef.unflatten([c for _, c in pairs])
  return outs, WeightSharingState(state.codes, new_cents, inner_state,
                                  state.mask)


def _shadow(params, centroids, sel):
  """The tree the inner optimizer sees: centroids, or the params themselves."""
  return jax.tree_util.tree_map(lambda p, c, s: c if s else p,
                                params, centroids, sel,
                                is_leaf=_select.is_leaf)


def shared_params(params, state: WeightSharingState, where: _select.Where = None):
  """The params with every shared leaf replaced by ``centroids[codes]``.

  Args:
    params: the params the state was built for.
    state: a :class:`WeightSharingState` (the first element of a chain's
      state if chained).
    where: the selection used to build the transform.

  Returns:
    A params tree whose shared leaves equal the codebook exactly (and zero
    at pruned positions when the state has a mask).
  """
  # A compressed node was not shared (weight_sharing leaves it out).
  where = _base.selection(params, where, "shared_params", "shared")
  if state.mask is None:
    return _select.map_selected(
        lambda kp, p, codes, c: _sharding.take(c, codes).astype(p.dtype),
        params, state.codes,
        state.centroids, where=where)

  def get(kp, p, codes, c, m):
    v = _sharding.take(c, codes).astype(p.dtype)
    return v if _select.is_skip(m) else jnp.where(m, v, jnp.zeros_like(v))

  return _select.map_selected(get, params, state.codes, state.centroids,
                              state.mask, where=where)


snap_to_codebook = shared_params
