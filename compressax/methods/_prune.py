"""Pruning methods: gradual magnitude, N:M and channel pruning.

Pruning acts through the optimizer: the method's ``wrap`` puts a
``cx.optim`` pruning wrapper around the inner optimizer, which keeps the
pruned weights exactly zero after every update. So the view is the params
themselves, and ``finalize`` reads the mask off the trained weights (a
weight is kept where it is nonzero; a kept weight that trained to exactly 0
is stored as pruned, which materializes to the same value).
"""

from __future__ import annotations

import dataclasses


from compressax import _checks
from compressax import prune as _prune
from compressax.methods._base import Method

__all__ = ["Channel", "Magnitude", "NM"]


def _int(name: str, v) -> None:
  if isinstance(v, bool) or not isinstance(v, int):
    raise TypeError(f"{name} must be a Python int, got {v!r}")


class _Pruning(Method):
  prunes = True

  def keep(self, w):
    return w != 0

  def finalize(self, path, w, aux):
    _checks.check_finite(path, w)
    return _prune.MaskedArray(w, self.keep(w), tuple(w.shape), w.dtype)


@dataclasses.dataclass(frozen=True)
class Magnitude(_Pruning):
  """Gradual magnitude pruning on Zhu and Gupta's cubic schedule.

  With the defaults the leaf is pruned once, at the first step, to
  ``sparsity``, and fine-tuned with the mask held (Deep Compression's
  prune-then-retrain). ``begin_step < end_step`` ramps the sparsity up.

  Attributes:
    sparsity: the final fraction of zeros, in ``[0, 1)``.
    begin_step, end_step, frequency: the schedule (``cx.optim.prune_magnitude``).
    initial_sparsity, power: the ramp's start and exponent (3 in the paper).

  References:
    Zhu, Gupta, 2017. https://arxiv.org/abs/1710.01878
  """
  sparsity: float = 0.5
  begin_step: int = 0
  end_step: int = 0
  frequency: int = 1
  initial_sparsity: float = 0.0
  power: int = 3

  def __post_init__(self):
    _checks.check_sparsity("Magnitude", self.sparsity)
    for k in ("begin_step", "end_step", "frequency"):
      _int(f"Magnitude: {k}", getattr(self, k))

  def wrap(self, inner, where):
    from compressax import optim as _optim
    return _optim.prune_magnitude(
        inner, final_sparsity=self.sparsity, begin_step=self.begin_step,
        end_step=self.end_step, frequency=self.frequency,
        initial_sparsity=self.initial_sparsity, power=self.power, where=where)


@dataclasses.dataclass(frozen=True)
class NM(_Pruning):
  """N:M structured sparsity: keep ``n`` of every ``m`` along ``axis``.

  The default ``axis=-2`` groups along the input dimension of Dense
  ``(in, out)`` and conv ``(..., in, out)`` kernels, the layout sparse tensor
  cores use and the one of Wang et al. 2022. The stored mask is
  ``cx.prune.nm_mask`` of the trained weights: exactly ``n`` of each ``m``.

  References:
    Mishra et al., 2021. https://arxiv.org/abs/2104.08378
  """
  n: int = 2
  m: int = 4
  axis: int = -2
  begin_step: int = 0
  frequency: int = 1

  def __post_init__(self):
    for k in ("n", "m", "axis", "begin_step", "frequency"):
      _int(f"NM: {k}", getattr(self, k))
    if not 0 < self.n <= self.m:
      raise ValueError(f"NM: need 0 < n <= m, got n={self.n}, m={self.m}")

  def keep(self, w):
    return _prune.nm_mask(w, self.n, self.m, axis=self.axis)

  def wrap(self, inner, where):
    from compressax import optim as _optim
    return _optim.prune_nm(inner, self.n, self.m, axis=self.axis,
                           begin_step=self.begin_step,
                           frequency=self.frequency, where=where)


@dataclasses.dataclass(frozen=True)
class Channel(_Pruning):
  """Structured pruning of whole output channels, by L1 or L2 norm.

  At ``begin_step`` the ``sparsity`` fraction of channels along ``axis`` with
  the smallest norm is pruned (``cx.prune.channel_mask``) and held.

  References:
    Li et al., *Pruning Filters for Efficient ConvNets*, ICLR 2017.
    https://arxiv.org/abs/1608.08710
  """
  sparsity: float = 0.5
  norm: str = "l1"
  axis: int = -1
  begin_step: int = 0

  def __post_init__(self):
    _checks.check_sparsity("Channel", self.sparsity)
    if self.norm not in ("l1", "l2"):
      raise ValueError(f"Channel: norm must be 'l1' or 'l2', got {self.norm!r}")
    _int("Channel: begin_step", self.begin_step)

  def wrap(self, inner, where):
    from compressax.optim import _pruning

    def new_masks(after, count):
      del count
      return _prune.channel_mask(after, self.sparsity, norm=self.norm,
                                 axis=self.axis, where=where,
                                 include_bias=False)

    return _pruning._masked_training(  # pylint: disable=protected-access
        inner, "Channel", lambda p: _pruning._all_kept(p, where), new_masks,
        lambda count: count == self.begin_step)
