"""AdaComp: adaptive residual gradient compression for data-parallel training.

Each learner keeps a residual of the gradient mass it has not sent yet. Per
layer, ``G = residual + grad`` is split into bins of ``L_T`` elements; inside a
bin an element is sent when the "self-adjusting" value ``H = G + grad`` reaches
the bin's largest ``|G|``. Sent elements are ternarized to ``sign(G) * scale``
with one scale per layer, and whatever is not sent stays in the residual, so no
gradient mass is ever dropped.

References:
  Chen, Choi, Brand, Agrawal, Zhang, Gopalakrishnan, *AdaComp: Adaptive
  Residual Gradient Compression for Data-Parallel Distributed Training*,
  AAAI 2018. https://arxiv.org/abs/1712.02679
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from compressax import _checks
from compressax import _select
from compressax.optim import _base

__all__ = ["AdaCompState", "adacomp", "adacomp_compress", "adacomp_residual",
           "compression_stats"]


class AdaCompState(NamedTuple):
  """State of :func:`adacomp`.

  Attributes:
    residual: per selected leaf, the gradient mass not sent yet, in the
      gradient's dtype, flattened and zero-padded to whole bins: shape
      ``(n_bins, L_T)`` (:func:`adacomp_residual` gives it back in the
      leaf's shape); :data:`cx.SKIP <compressax.SKIP>` for leaves sent
      densely.
    sent: int32 ``(n_leaves,)``, per leaf in tree order: the elements sent
      at the last step (a leaf sent densely counts all of them).
    bits: float32 ``(2, n_leaves)``: row 0 the bits each leaf sent at the
      last step (see :func:`adacomp` for the accounting), row 1 the bits of
      its dense 32-bit gradient.

  The counters are two arrays, not trees of scalars: every state leaf is a
  buffer that each step hands over (per device under ``shard_map``), and
  tiny ones cost as much as the compression of a small layer. The trees are
  the properties :attr:`sent_elements`, :attr:`sent_bits` and
  :attr:`dense_bits` (their leaves keep any leading axes of the arrays, e.g.
  the device axis of a stacked state).
  """
  residual: Any
  sent: jax.Array
  bits: jax.Array

  def _per_leaf(self, rows) -> Any:
    treedef = jax.tree_util.tree_structure(self.residual,
                                           is_leaf=_select.is_skip)
    return treedef.unflatten([rows[..., i] for i in range(rows.shape[-1])])

  @property
  def sent_elements(self) -> Any:
    """Per leaf, int32 number of elements sent at the last step."""
    return self._per_leaf(self.sent)

  @property
  def sent_bits(self) -> Any:
    """Per leaf, float32 bits sent at the last step."""
    return self._per_leaf(self.bits[..., 0, :])

  @property
  def dense_bits(self) -> Any:
    """Per leaf, float32 bits of the dense 32-bit gradient."""
    return self._per_leaf(self.bits[..., 1, :])


def _index_bits(size: int) -> int:
  return max(1, math.ceil(math.log2(max(size, 2))))


def _binned(x, bin_size: int) -> jax.Array:
  """``x`` flattened, zero-padded to whole bins: ``(n_bins, bin_size)``."""
  n = x.size
  n_bins = -(-n // bin_size)
  flat = x.reshape(-1)
  if n_bins * bin_size != n:
    flat = jnp.pad(flat, (0, n_bins * bin_size - n))
  return flat.reshape(n_bins, bin_size)


def _unbinned(bins, shape) -> jax.Array:
  return bins.reshape(-1)[:math.prod(shape)].reshape(shape)


def _compress_binned(residual, grad, bin_size: int):
  """AdaComp on a binned residual: ``(sent, new_residual, n_sent)``.

  ``residual`` is ``(n_bins, bin_size)`` (see :func:`_binned`), ``sent`` has
  ``grad``'s shape, ``new_residual`` the residual's. Working in the bin layout
  keeps every pass a plain row-wise one (the bin of an element is its row),
  and a bin's ``max |G|`` is ``max(max G, -min G)``: two reductions that read
  ``G`` directly, cheaper on CPU than writing ``|G|`` out for one. Padding is
  zero, so ``G != 0`` never selects it and it stays zero.
  """
  g = _binned(grad, bin_size)
  g_acc = residual + g
  gmax = jnp.maximum(jnp.max(g_acc, axis=1), -jnp.min(g_acc, axis=1))
  chosen = (jnp.abs(g_acc + g) >= gmax[:, None]) & (g_acc != 0)
  a = jnp.abs(g_acc)
  zero = jnp.zeros_like(a)
  # Count and magnitude in one variadic reduction: one pass, not two.
  mag, n_sent = jax.lax.reduce(
      (jnp.where(chosen, a, zero), chosen.astype(jnp.int32)),
      (jnp.zeros((), a.dtype), jnp.zeros((), jnp.int32)),
      lambda x, y: (x[0] + y[0], x[1] + y[1]), (0, 1))
  scale = mag / jnp.maximum(n_sent, 1).astype(g_acc.dtype)
  sent = jnp.where(chosen, jnp.sign(g_acc) * scale, zero)
  return _unbinned(sent, grad.shape), g_acc - sent, n_sent


def adacomp_compress(residual: jax.Array, grad: jax.Array, bin_size: int):
  """Compress one layer's gradient with AdaComp's local selection.

  Args:
    residual: the learner's residual for this layer (same shape as ``grad``).
    grad: this step's local gradient.
    bin_size: ``L_T``, the number of consecutive (flattened) elements per bin.

  Returns:
    ``(sent, new_residual, n_sent)``: ``sent`` is the dense, dequantized
    tensor of sent values (zero where nothing is sent), ``new_residual`` is
    exactly ``(residual + grad) - sent`` as computed in the gradient's dtype,
    and ``n_sent`` (int32) counts the sent elements.

  Raises:
    ValueError: ``bin_size`` is not a positive int.

  References:
    Chen et al., AAAI 2018, Algorithm 1. https://arxiv.org/abs/1712.02679
  """
  if isinstance(bin_size, (bool, np.bool_)) or not isinstance(
      bin_size, (int, np.integer)) or bin_size < 1:
    raise ValueError(f"adacomp_compress: bin_size must be a positive int, got "
                     f"{bin_size!r}")
  hint = ("; it compresses one layer, for a tree of gradients use "
          "cx.optim.adacomp")
  _checks.check_leaf("adacomp_compress: residual", residual, hint)
  _checks.check_leaf("adacomp_compress: grad", grad, hint)
  sent, new_res, n_sent = _compress_binned(_binned(residual, bin_size), grad,
                                           bin_size)
  return sent, _unbinned(new_res, grad.shape), n_sent


def adacomp_residual(state: "AdaCompState", params) -> Any:
  """The residuals of an :class:`AdaCompState` in the shapes of ``params``.

  The state keeps each residual flattened and zero-padded to whole bins; this
  undoes that. Leaves sent densely (no residual) come back as zeros.

  Args:
    state: an :class:`AdaCompState` (for one learner, not stacked).
    params: the parameter (or gradient) pytree the state was built for.

  Raises:
    ValueError: if the trees differ, or a residual cannot hold its leaf
      (naming the leaf path).

  References:
    Chen et al., *AdaComp*, AAAI 2018. https://arxiv.org/abs/1712.02679
  """
  _checks.check_same_structure("adacomp_residual", params, state.residual,
                               what="residual")
  def one(kp, x, r):
    if _select.is_skip(r):
      return jnp.zeros(np.shape(x), _dtype(x))
    if r.ndim != 2 or r.size < np.size(x):
      _checks.fail(kp, f"adacomp_residual: a residual of shape {r.shape} "
                       f"cannot hold a leaf of shape {np.shape(x)} (a state "
                       f"stacked over devices? pass one learner's state)")
    return _unbinned(r, np.shape(x))
  return jax.tree_util.tree_map_with_path(one, params, state.residual,
                                          is_leaf=_select.is_leaf)


def adacomp(*, bin_size_conv: int = 50, bin_size_fc: int = 500,
            axis_name: Any = None, where: _select.Where = None
            ) -> optax.GradientTransformation:
  """AdaComp gradient compression with a per-learner residual.

  Put it first in a chain, before the optimizer:
  ``optax.chain(cx.optim.adacomp(axis_name="data"), optax.sgd(0.1))``. Inside
  ``shard_map`` (or ``pmap``) each device holds its own state (its residual)
  and compresses its local gradient; with ``axis_name`` the sent values are
  then averaged across devices with ``lax.pmean``, which is the only
  cross-device traffic. Without ``axis_name`` the compressed gradient is
  returned as is (single learner, or reduce it yourself).

  Variant implemented (the paper's Algorithm 1 as we read it): per layer
  ``G = residual + grad`` and ``H = G + grad``; the flattened layer is cut
  into bins of ``L_T`` elements; an element is sent when ``|H| >=
  max_bin |G|`` (and ``G != 0``). Sent values are ternary: ``sign(G) *
  scale`` with ``scale`` the mean ``|G|`` of the layer's sent elements; the
  new residual is ``G - sent``. ``L_T`` is ``bin_size_conv`` for leaves with
  ``ndim >= 3`` (conv kernels) and ``bin_size_fc`` otherwise. Leaves not
  selected by ``where`` (biases, norm scales by default) are sent densely.

  Bit accounting in the state (per leaf, last step): each sent element costs
  its position (``ceil(log2(size))`` bits) plus one sign bit, and a layer
  that sends anything adds its 32-bit scale. Dense leaves cost 32 bits per
  element. :func:`compression_stats` turns this into ratios.

  Args:
    bin_size_conv: ``L_T`` for convolution kernels (paper: about 50).
    bin_size_fc: ``L_T`` for fully connected / recurrent weights (paper:
      about 500).
    axis_name: a mapped axis name (``shard_map``/``pmap``) to ``pmean`` the
      sent values over, or ``None``.
    where: which leaves to compress (see :mod:`compressax._select`).

  Returns:
    An ``optax.GradientTransformation``; its state is :class:`AdaCompState`.

  Raises:
    ValueError: if a bin size is not a positive int.

  References:
    Chen et al., *AdaComp*, AAAI 2018. https://arxiv.org/abs/1712.02679
  """
  for name, v in (("bin_size_conv", bin_size_conv), ("bin_size_fc", bin_size_fc)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer, jax.Array)):
      raise ValueError(f"adacomp: {name} must be a positive int, got {v!r}")
  bin_size_conv, bin_size_fc = (
      _base.static_int("adacomp", name, v, "'bin_size_conv', 'bin_size_fc'")
      for name, v in (("bin_size_conv", bin_size_conv),
                      ("bin_size_fc", bin_size_fc)))
  for name, v in (("bin_size_conv", bin_size_conv), ("bin_size_fc", bin_size_fc)):
    if v < 1:
      raise ValueError(f"adacomp: {name} must be a positive int, got {v!r}")
  config = _Config(bin_size_conv, bin_size_fc, _base.Static(axis_name),
                   _base.Static(where))

  def init(params):
    _checks.check_tree(params, "adacomp.init")
    sel = _base.selection(params, where, "adacomp", "compressed")
    def residual(x, s):
      if not s:
        return _select.SKIP
      return jnp.zeros((-(-x.size // config.bin_size(x)), config.bin_size(x)),
                       x.dtype)
    leaves = jax.tree_util.tree_leaves(params, is_leaf=_select.is_leaf)
    dense = np.array([32.0 * _size(x) for x in leaves], np.float32)
    return AdaCompState(
        residual=jax.tree_util.tree_map(residual, params, sel,
                                        is_leaf=_select.is_leaf),
        sent=jnp.zeros((len(leaves),), jnp.int32),
        bits=jnp.asarray(np.stack([np.zeros_like(dense), dense])))

  def update(updates, state, params=None):
    del params
    _checks.check_tree(updates, "adacomp.update")
    return _update(config, updates, state)

  return optax.GradientTransformation(init, update)


def _size(x) -> int:
  """Elements of a leaf (a compressed node: of all its arrays)."""
  return sum(int(np.size(a)) for a in jax.tree_util.tree_leaves(x))


def _dtype(x):
  leaves = jax.tree_util.tree_leaves(x)
  return leaves[0].dtype if leaves else jnp.float32


class _Config(NamedTuple):
  """:func:`adacomp`'s construction-time config (a static kernel argument)."""
  bin_size_conv: int
  bin_size_fc: int
  axis_name: Any
  where: Any

  def bin_size(self, leaf) -> int:
    return self.bin_size_conv if leaf.ndim >= 3 else self.bin_size_fc


@functools.partial(jax.jit, static_argnums=0)
def _update(config, updates, state):
  """:func:`adacomp`'s update, one jitted kernel for every instance.

  The config is static, so eager calls reuse one compiled program; inside an
  outer ``jit`` (or ``shard_map``) the call is inlined.
  """
  sel = _base.selection(updates, config.where.value, "adacomp", "compressed")
  paths, treedef = jax.tree_util.tree_flatten_with_path(
      updates, is_leaf=_select.is_leaf)
  flags = treedef.flatten_up_to(sel)
  res = treedef.flatten_up_to(state.residual)
  out, new_res, counts, bits = [], [], [], []
  for (path, g), r, s in zip(paths, res, flags):
    if s:
      size = config.bin_size(g)
      want = (-(-g.size // size), size)
      if r.shape != want:
        raise ValueError(
            f"adacomp: the residual of {_select.path_str(path)} has shape "
            f"{r.shape}, expected {want} (the gradient flattened into bins "
            f"of {size}); build the state with this transform's init")
      sent, r_new, k = _compress_binned(r, g, size)
      b = (k.astype(jnp.float32) * float(_index_bits(g.size) + 1)
           + jnp.where(k > 0, 32.0, 0.0).astype(jnp.float32))
    else:
      # Sent densely (a compressed node's gradient too: all its arrays).
      sent, r_new = g, r
      k = jnp.asarray(_size(g), jnp.int32)
      b = jnp.asarray(32.0 * _size(g), jnp.float32)
    out.append(sent)
    new_res.append(r_new)
    counts.append(k)
    bits.append(b)
  if config.axis_name.value is not None:
    # One collective over all leaves: per-leaf pmeans are separate
    # all-reduces, each a cross-device rendezvous.
    out = jax.lax.pmean(out, config.axis_name.value)
  unflat = treedef.unflatten
  return unflat(out), AdaCompState(
      unflat(new_res), jnp.stack(counts),
      jnp.stack([jnp.stack(bits), state.bits[1]]))


def compression_stats(state: AdaCompState, where: _select.Where = None
                      ) -> dict[str, dict[str, float]]:
  """Per-leaf and total compression figures of the last AdaComp step.

  Args:
    state: an :class:`AdaCompState` (e.g. ``opt_state[0]`` of a chain).
    where: restrict the ``"total"`` entry to these leaves (a path regex or
      predicate over ``(path, dense_bits)``); all leaves by default.

  Returns:
    ``{path: {"sent": n, "bits": b, "dense_bits": d, "ratio": d / b}, ...,
    "total": {...}}`` with Python floats (``ratio`` is ``inf`` when nothing
    was sent).
  """
  rows = {}
  flat = jax.tree_util.tree_leaves_with_path(state.dense_bits)
  sent = jax.tree_util.tree_leaves(state.sent_elements)
  bits = jax.tree_util.tree_leaves(state.sent_bits)
  chosen = _select.select(state.dense_bits, where if where is not None
                          else (lambda p, x: True))
  tot = {"sent": 0.0, "bits": 0.0, "dense_bits": 0.0}
  for (kp, d), k, b, s in zip(flat, sent, bits,
                              jax.tree_util.tree_leaves(chosen)):
    row = {"sent": float(k), "bits": float(b), "dense_bits": float(d)}
    row["ratio"] = row["dense_bits"] / row["bits"] if row["bits"] else math.inf
    rows[_select.path_str(kp)] = row
    if s:
      for key in tot:
        tot[key] += row[key]
  tot["ratio"] = tot["dense_bits"] / tot["bits"] if tot["bits"] else math.inf
  rows["total"] = tot
  return rows
