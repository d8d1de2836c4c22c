"""Product quantization as a method: codes held, codebooks trained."""

from __future__ import annotations

import dataclasses
from typing import cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from compressax import _checks
from compressax import quantize as _quantize
from compressax.methods._base import Method
from compressax.quantize import _product
from compressax.quantize._codebook import codes_dtype

__all__ = ["ProductQuantize"]


def _hold_codes(aux):
  """``aux`` with zero updates at every ``"codes"`` entry (nested too)."""
  def zero(kp, u):
    last = kp[-1] if kp else None
    if isinstance(last, jax.tree_util.DictKey) and getattr(last, "key", None) == "codes":
      return jnp.zeros_like(u)
    return u
  return jax.tree_util.tree_map_with_path(zero, aux)


@dataclasses.dataclass(frozen=True)
class ProductQuantize(Method):
  """Task-aware product quantization of a 2-D leaf's rows.

  Init: ``cx.quantize.product`` (k-means per column chunk, started from the
  plan's init key); from then on the assignment of every row is held, as
  ``KMeans`` holds its clusters, and the codebooks train through the task
  loss. The side state is ``{"codebooks": (m, K, d / m) float32, "codes":
  (rows, m)}``; the codes are kept as float32 integers so that ``jax.grad``
  over the whole tree works, they get no gradient (the view stops it), and
  the method's optimizer wrapper zeroes their updates whatever the inner
  optimizer does (momentum, weight decay). The dense leaf itself is not used
  after init (as with ``LowRank``). View: the gathered table
  (differentiable w.r.t. the codebooks: each codeword gets the summed
  gradient of the rows that use it); finalize:
  ``cx.quantize.ProductQuantizedArray``, whose ``materialize()`` equals the
  view bit for bit.

  Attributes:
    subvectors: m, the column chunks (must divide the leaf's columns).
    bits: bits per code, ``K = 2**bits`` codewords per chunk, in [1, 16].
    iters: Lloyd steps at init.

  References:
    Jégou, Douze, Schmid, *Product quantization for nearest neighbor
    search*, IEEE TPAMI 2011. https://doi.org/10.1109/TPAMI.2010.57
  """
  subvectors: int
  bits: int
  iters: int = 25

  def __post_init__(self):
    for name, lo, hi in (("subvectors", 1, None), ("bits", 1, 16), ("iters", 0, None)):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"ProductQuantize: {name} must be a Python int, got {v!r}")
      if v < lo or (hi is not None and v > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"ProductQuantize: {name} must be in {rng}, got {v}")

  def init(self, path, w, key):
    if key is None:
      _checks.fail(path, "ProductQuantize draws its k-means start: pass a PRNG "
                         "key to Plan.init")
    node = _quantize.product(w, subvectors=self.subvectors, bits=self.bits,
                             key=key, iters=self.iters, path=path)
    return {"codebooks": node.codebooks,
            "codes": node.codes.astype(jnp.float32)}

  def view(self, w, aux, key):
    del key
    return _product.gather_rows(aux["codes"], aux["codebooks"]).astype(
        w.dtype).reshape(w.shape)

  def wrap(self, inner, where):
    from compressax.optim import _base  # local: optim imports methods' users
    inner = optax.with_extra_args_support(_base.check_inner(inner, "ProductQuantize"))
    sel = where["params"]  # Plan passes {"params": bool tree, "aux": ...}
    treedef = jax.tree_util.tree_structure(sel)

    def update(updates, state, params=None, **extra):
      new, state = inner.update(updates, state, params, **extra)
      new = cast(dict, new)  # the Plan's {"params": ..., "aux": ...} tree
      flags = treedef.flatten_up_to(sel)
      aux = [_hold_codes(a) if s else a
             for a, s in zip(treedef.flatten_up_to(new["aux"]), flags)]
      return {**new, "aux": treedef.unflatten(aux)}, state

    return optax.GradientTransformationExtraArgs(inner.init, update)

  def finalize(self, path, w, aux):
    books = aux["codebooks"]
    _checks.check_finite(path, books)
    codes = jnp.asarray(aux["codes"]).astype(codes_dtype(1 << self.bits))
    return _quantize.ProductQuantizedArray(codes, books, tuple(w.shape),
                                           np.dtype(w.dtype), int(self.bits))
