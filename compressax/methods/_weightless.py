"""Weightless: a pruned, clustered leaf stored in a Bloomier filter, frozen.

See :mod:`compressax.weightless` for the encoding and the layer-by-layer
freeze-and-retrain loop.
"""

from __future__ import annotations

import dataclasses

from compressax.methods._base import Method

__all__ = ["Weightless"]


@dataclasses.dataclass(frozen=True)
class Weightless(Method):
  """Weightless: store a pruned, clustered leaf as a Bloomier filter.

  The leaf must already be pruned (exact zeros) and clustered (its distinct
  nonzero values are the clusters, at most ``2^bits - 1``), as Deep
  Compression's pruning and weight sharing leave it. Finalize:
  ``cx.weightless.encode`` (a ``cx.weightless.BloomierArray``); optimizer
  wrapper: ``cx.weightless.freeze`` (the leaf gets no updates, so a plan
  trains the other leaves around it); view: the leaf itself.
  ``cx.weightless.freeze_and_retrain`` runs the paper's loop: encode a
  leaf, set it to its decoded values (false positives included), freeze it
  and retrain the rest, layer by layer. Finalize encodes the leaf it is
  given: give it the clustered leaf, not the decoded one (whose false
  positives would become keys).

  Attributes:
    bits: ``t``, bits per cell; pruned weights decode to a cluster with
      probability ``K / 2^t``.
    hashes: ``k``, cells per position.
    overhead: cells per kept weight (before 32 extra cells); default
      just above the peeling threshold of ``hashes``.
    seed: the first hash seed tried (the node records the one used).

  References:
    Reagen et al., *Weightless: Lossy weight encoding for deep neural
    network compression*, ICML 2018. https://arxiv.org/abs/1711.04686
  """
  bits: int = 8
  hashes: int = 3
  overhead: float | None = None
  seed: int = 0

  def __post_init__(self):
    for name in ("bits", "hashes", "seed"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"Weightless: {name} must be a Python int, got {v!r}")
    if not 1 <= self.bits <= 16 or not 2 <= self.hashes <= 8:
      raise ValueError(f"Weightless: bits must be in [1, 16] and hashes in "
                       f"[2, 8], got {self.bits} and {self.hashes}")

  def wrap(self, inner, where):
    from compressax import weightless as _weightless
    return _weightless.freeze(inner, where)

  def finalize(self, path, w, aux):
    from compressax import weightless as _weightless
    return _weightless.encode(w, bits=self.bits, hashes=self.hashes,
                              seed=self.seed, overhead=self.overhead, path=path)
