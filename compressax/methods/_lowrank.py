"""Low-rank factorization as a method: the factors are trained."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from compressax import lowrank as _lowrank
from compressax.methods._base import Method

__all__ = ["LowRank"]


@dataclasses.dataclass(frozen=True)
class LowRank(Method):
  """The leaf as two trained factors, ``W = (u @ v).reshape(shape)``.

  Init: the truncated SVD (``cx.lowrank.factorize``) at ``rank``, or at the
  smallest rank keeping ``energy`` of the squared Frobenius norm. The factors
  are the trained side state (the dense leaf is not used after init); view:
  ``u @ v``; finalize: ``cx.lowrank.LowRankArray``. ``LowRank(...) >>
  Uniform(8)`` trains and stores 8-bit factors.

  References:
    Eo, Kang, Rhee, 2021 (BSR); Denton et al., NeurIPS 2014.
    https://arxiv.org/abs/1404.0736
  """
  rank: int | None = None
  energy: float | None = None

  factors = True

  def __post_init__(self):
    if (self.rank is None) == (self.energy is None):
      raise ValueError("LowRank needs exactly one of rank= and energy=")

  def init(self, path, w, key):
    rank = self.rank
    if rank is None:
      rank = _lowrank.rank_for_energy(w, self.energy, path=path)
    node = _lowrank.factorize(w, int(rank), path=path).compact()
    return {"u": node.u, "v": node.v}

  def assemble(self, w, u, v):
    return (u @ v).reshape(w.shape).astype(w.dtype)

  def view(self, w, aux, key):
    return self.assemble(w, aux["u"], aux["v"])

  def node(self, w, u, v):
    """The stored node for factors ``u``, ``v`` (arrays or compressed nodes)."""
    return _lowrank.LowRankArray(u, v, tuple(w.shape), jnp.dtype(w.dtype),
                                 int(u.shape[-1]))

  def finalize(self, path, w, aux):
    return self.node(w, aux["u"], aux["v"])

