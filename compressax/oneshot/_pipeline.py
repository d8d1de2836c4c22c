"""Sequential calibration: compress a model block by block from calibration data.

A model is a sequence of blocks, each ``apply(block_params, hidden) -> hidden``
written with Flax linen ``nn.Dense`` layers. For every block, in order:

1. run the block on every calibration batch, recording each Dense layer's
   input (``nn.intercept_methods``) only long enough to fold it into that
   kernel's running Hessian (:func:`hessian_update`): no activation is kept
   beyond one batch inside one block;
2. compress each kernel a rule selects with its method (:class:`GPTQ`,
   :class:`RTN`, :class:`SparseGPT`, :class:`Wanda`, :class:`Magnitude`);
3. run the *compressed* block on the same inputs: its outputs are the next
   block's calibration inputs ("true sequential", Frantar et al. 2023). With
   ``sequential=False`` the next inputs are the float block's outputs instead
   (the one-pass mode, every block calibrated on the float model).

Peak memory is one block's inputs and outputs over the calibration set. With
a ``mesh``, each batch is sharded over its leading axis and the Hessians are
``psum``-ed across devices inside ``shard_map``.

References:
  Frantar et al., GPTQ, ICLR 2023. https://arxiv.org/abs/2210.17323
  Frantar & Alistarh, SparseGPT, ICML 2023. https://arxiv.org/abs/2301.00774
  Sun et al., Wanda, ICLR 2024. https://arxiv.org/abs/2306.11695
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from compressax import _node
from compressax import _rules
from compressax import _select
from compressax import prune as _prune
from compressax.oneshot import _gptq
from compressax.oneshot import _grid
from compressax.oneshot import _hessian
from compressax.oneshot import _hqq
from compressax.oneshot import _sparsegpt
from compressax.oneshot import _wanda

__all__ = ["GPTQ", "HQQ", "RTN", "SparseGPT", "Wanda", "Magnitude",
           "block_hessians", "calibrate_sequential"]


@dataclasses.dataclass(frozen=True)
class GPTQ:
  """:func:`gptq` with these settings, from the kernel's calibration Hessian."""
  bits: int
  group_size: int | None = None
  act_order: bool = False
  symmetric: bool = False
  damp: float = 0.01
  block_size: int = 128
  needs_hessian = True

  def compress(self, w, h, path):
    return _gptq.gptq(w, h, bits=self.bits, group_size=self.group_size,
                      act_order=self.act_order, symmetric=self.symmetric,
                      damp=self.damp, block_size=self.block_size, path=path)


@dataclasses.dataclass(frozen=True)
class RTN:
  """:func:`rtn`: round to nearest on GPTQ's grid (no calibration)."""
  bits: int
  group_size: int | None = None
  symmetric: bool = False
  needs_hessian = False

  def compress(self, w, h, path):
    del h
    return _grid.rtn(w, bits=self.bits, group_size=self.group_size,
                     symmetric=self.symmetric, path=path)


@dataclasses.dataclass(frozen=True)
class HQQ:
  """:func:`hqq`: half-quadratic zero points, no calibration data."""
  bits: int
  group_size: int | None = 64
  iters: int = 20
  needs_hessian = False

  def compress(self, w, h, path):
    del h
    return _hqq.hqq(w, bits=self.bits, group_size=self.group_size, iters=self.iters,
                    path=path)


@dataclasses.dataclass(frozen=True)
class SparseGPT:
  """:func:`sparsegpt`: ``sparsity`` or ``n_m``, with ``bits`` the joint mode."""
  sparsity: float | None = None
  n_m: tuple[int, int] | None = None
  bits: int | None = None
  damp: float = 0.01
  block_size: int = 128
  needs_hessian = True

  def compress(self, w, h, path):
    return _sparsegpt.sparsegpt(w, h, sparsity=self.sparsity, n_m=self.n_m,
                                bits=self.bits, damp=self.damp,
                                block_size=self.block_size, path=path)


def _masked(w, keep):
  return _prune.MaskedArray(value=jnp.where(keep, w, 0).astype(w.dtype),
                            mask=keep, shape=tuple(w.shape),
                            dtype=np.dtype(w.dtype))


@dataclasses.dataclass(frozen=True)
class Wanda:
  """:func:`wanda_mask` with ``||x_i|| ∝ sqrt(H_ii)``; no weight update."""
  sparsity: float | None = None
  n_m: tuple[int, int] | None = None
  needs_hessian = True

  def compress(self, w, h, path):
    norm = jnp.sqrt(jnp.maximum(jnp.diag(h), 0))   # the scale is irrelevant
    keep = _wanda.wanda_mask(w, norm, sparsity=self.sparsity, n_m=self.n_m,
                             path=path)
    return _masked(w, keep)


@dataclasses.dataclass(frozen=True)
class Magnitude:
  """The calibration-free baseline: smallest ``|w|`` per kernel, or N:M."""
  sparsity: float | None = None
  n_m: tuple[int, int] | None = None
  needs_hessian = False

  def compress(self, w, h, path):
    del h
    if self.n_m is not None:
      keep = _prune.nm_mask(w, self.n_m[0], self.n_m[1], axis=0)
    else:
      keep = _prune.magnitude_mask({"w": w}, self.sparsity)["w"]
    return _masked(w, keep)


def _dense_inputs(apply: Callable, params, hidden):
  """``apply(params, hidden)`` and each ``nn.Dense`` call's input, by path."""
  seen: dict[tuple[str, ...], list] = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
      seen.setdefault(tuple(context.module.path), []).append(args[0])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    out = apply(params, hidden)
  return out, seen


def _kernel_path(module_path) -> str:
  return "/".join((*module_path, "kernel"))


@functools.lru_cache(maxsize=16)
def _hessian_step(apply: Callable, paths: tuple, mesh, axis_name: str):
  """The jitted ``step(params, hidden, acc) -> acc`` of :func:`block_hessians`.

  Cached on its arguments, so the blocks of one model (same ``apply``, same
  kernel paths and shapes) share one compiled program instead of tracing and
  compiling a new closure per block.
  """
  name = axis_name if mesh is not None else None

  def step(params, hidden, acc):
    _, seen = _dense_inputs(apply, params, hidden)
    found = {_kernel_path(k): v for k, v in seen.items()}
    out = {}
    for p in paths:
      if p not in found:
        raise ValueError(f"{p}: no nn.Dense layer of the block has this "
                         f"kernel (found {sorted(found)})")
      h, n = acc[p]
      for x in found[p]:
        h, n = _hessian.hessian_update(h, n, x, axis_name=name, path=p)
      out[p] = (h, n)
    return out

  if mesh is None:
    return jax.jit(step)
  return jax.jit(jax.shard_map(step, mesh=mesh,
                               in_specs=(P(), P(axis_name), P()),
                               out_specs=P(), check_vma=False))


def block_hessians(apply: Callable, params, batches: Sequence[jax.Array],
                   paths: Sequence[str], *, mesh=None,
                   axis_name: str = "data"):
  """Running-average Hessians of the kernels ``paths`` of one block.

  Args:
    apply: ``apply(params, hidden) -> hidden`` with Flax ``nn.Dense`` layers.
    params: the block's (float) parameters.
    batches: calibration inputs of the block, each ``(batch, ...)``.
    paths: ``/``-joined kernel paths (``"attn/q/kernel"``) to collect.
    mesh: shard each batch's leading axis over ``mesh``'s ``axis_name``; the
      per-device sums are ``psum``-ed (``hessian_update(axis_name=...)``).
    axis_name: the mesh axis of the batch.

  Returns:
    ``{path: (h, n)}``: the average ``2 X^T X / n`` and the row count ``n``.
  """
  paths = tuple(paths)
  if not paths:
    return {}
  leaves = {_select.path_str(k): v for k, v in
            jax.tree_util.tree_flatten_with_path(params)[0]}
  acc = {}
  for p in paths:
    d = leaves[p].shape[0]
    acc[p] = (jnp.zeros((d, d), jnp.float32), jnp.zeros((), jnp.float32))
  try:
    fn = _hessian_step(apply, paths, mesh, axis_name)
  except TypeError:   # an unhashable `apply`: no cache, one compile per call
    fn = _hessian_step.__wrapped__(apply, paths, mesh, axis_name)
  for x in batches:
    if mesh is not None:
      x = jax.device_put(x, NamedSharding(mesh, P(axis_name)))
    acc = fn(params, x, acc)
  return acc


def _run(apply, params, batches):
  fn = jax.jit(apply)
  return [fn(params, x) for x in batches]


def calibrate_sequential(apply: Callable, blocks: Sequence[Any],
                         inputs: Sequence[jax.Array], rules, *,
                         sequential: bool = True, mesh=None,
                         axis_name: str = "data", progress: bool = True,
                         desc: str = "blocks"):
  """Compress a model block by block from calibration batches.

  Args:
    apply: ``apply(block_params, hidden) -> hidden``, one block of the model,
      written with Flax linen ``nn.Dense`` layers (their inputs are recorded
      with ``nn.intercept_methods``; a kernel's path is its module's path
      inside the block plus ``"kernel"``, e.g. ``"attn/q/kernel"``). All
      blocks share ``apply``; pass ``functools.partial``/closures otherwise.
    blocks: each block's parameters (a Flax ``params`` dict), in order.
    inputs: the calibration batches of the first block, each
      ``(batch, ...)``, e.g. embedded tokens ``(batch, seq, width)``.
    rules: which kernels get which method, in any ``cx.per_leaf`` form, e.g.
      ``{r"attn/": GPTQ(4), r"mlp/": SparseGPT(0.5)}`` (first match wins; a
      rule matching no kernel of any block is an error) or one method for
      every kernel. Methods: :class:`GPTQ`, :class:`RTN`,
      :class:`SparseGPT`, :class:`Wanda`, :class:`Magnitude`. Leaves no rule
      matches are left as they are.
    sequential: feed each compressed block's outputs to the next block (True,
      "true sequential"), or the float block's outputs (False: one pass over
      the float model).
    mesh: a ``jax.sharding.Mesh``: every batch is sharded over its leading
      axis and the Hessians ``psum``-ed across devices.
    axis_name: the mesh axis of the batch.
    progress: a tqdm bar over blocks.
    desc: the bar's label.

  Returns:
    ``(compressed, info)``: the blocks' parameters with each selected kernel
    replaced by its compressed node (``GroupQuantizedArray``,
    ``cx.prune.MaskedArray``), and ``info`` with ``seconds`` (wall time) and
    per kernel ``"block_i/path"`` the relative output error
    ``||X W - X W_hat||^2 / ||X W||^2`` on the block's calibration inputs.

  Example:
    >>> import flax.linen as nn
    >>> class Block(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     return x + nn.Dense(8, name="fc")(jax.nn.relu(x))
    >>> blk = Block()
    >>> xs = [jax.random.normal(jax.random.key(i), (4, 8)) for i in range(2)]
    >>> ps = [blk.init(jax.random.key(9 + i), xs[0])["params"] for i in range(3)]
    >>> apply = lambda p, h: blk.apply({"params": p}, h)
    >>> out, info = cx.oneshot.calibrate_sequential(
    ...     apply, ps, xs, {"fc/kernel": cx.oneshot.GPTQ(bits=4)}, progress=False)
    >>> type(out[0]["fc"]["kernel"]).__name__
    'GroupQuantizedArray'
  """
  from tqdm.auto import tqdm
  start = time.time()
  rule_list = _rules.as_rules(rules)
  batches = list(inputs)
  compressed, info = [], {}
  used: set = set()
  values = ([r.value for r in rule_list] if rule_list is not None else
            [rules] if hasattr(rules, "needs_hessian") else None)
  # Calibration-free methods alone (RTN, magnitude): no block needs running.
  needs_data = values is None or any(
      getattr(v, "needs_hessian", True) for v in values)
  for i, params in enumerate(tqdm(blocks, desc=desc, disable=not progress,
                                  leave=False)):
    methods = _rules.per_leaf(params, rules if rule_list is None else
                              _unchecked(rule_list, used),
                              default=_select.SKIP, name="method")
    todo = {_select.path_str(k): m for k, m in
            jax.tree_util.tree_flatten_with_path(
                methods, is_leaf=_select.is_skip)[0]
            if not _select.is_skip(m)}
    need_h = [p for p, m in todo.items() if m.needs_hessian]
    hs = block_hessians(apply, params, batches, need_h, mesh=mesh,
                        axis_name=axis_name)

    def compress_leaf(path, w, m):
      name = _select.path_str(path)
      if name not in todo:
        return w
      h = hs[name][0] if name in hs else None
      node = m.compress(w, h, path=f"block_{i}/{name}")
      if h is not None:
        d = w - node.materialize()
        info[f"block_{i}/{name}"] = float(
            jnp.sum(d * (h @ d)) / jnp.maximum(jnp.sum(w * (h @ w)), 1e-30))
      return node

    new = jax.tree_util.tree_map_with_path(
        compress_leaf, params, methods, is_leaf=_select.is_skip)
    compressed.append(new)
    if needs_data and i + 1 < len(blocks):
      batches = _run(apply, _node.materialize(new) if sequential else params,
                     batches)
  if rule_list is not None:
    unused = [r for r in rule_list if id(r) not in used]
    if unused:
      raise ValueError(f"method: rule {unused[0]} matches no kernel of any "
                       "block")
  info["seconds"] = time.time() - start
  return compressed, info


def _unchecked(rules, used: set):
  """Rules that record which of them matched, checked once over all blocks."""
  def value(path, leaf):
    for r in rules:
      if r.matches(path, leaf):
        used.add(id(r))
        return r.value
    return _select.SKIP
  return value
