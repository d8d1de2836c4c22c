"""Quantization methods: uniform QAT, LSQ, k-means sharing, points, DiffQ.

Each is a frozen config over the per-leaf kernels of ``cx.quantize`` and
``cx.diffq``; see :mod:`compressax.methods._base` for the lifecycle.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from compressax import _checks
from compressax import diffq as _diffq
from compressax import quantize as _quantize
from compressax.quantize._codebook import codes_dtype
from compressax.methods._base import Method

__all__ = ["DiffQ", "KMeans", "LSQ", "Points", "Uniform"]

_ALL = lambda path, leaf: True  # noqa: E731 (a single-leaf tree: take it)


@jax.custom_vjp
def _clip_unit(p):
  """``clip(p, 0, 1)`` with a straight-through gradient."""
  return jnp.clip(p, 0.0, 1.0)


_clip_unit.defvjp(lambda p: (_clip_unit(p), None), lambda _, g: (g,))


def _check_bits(name: str, bits, lo: int = 1, hi: int = 16) -> None:
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
    raise TypeError(f"{name}: bits must be a Python int, got {bits!r}")
  if not lo <= bits <= hi:
    raise ValueError(f"{name}: bits must be in [{lo}, {hi}], got {bits}")


@dataclasses.dataclass(frozen=True)
class Uniform(Method):
  """Uniform quantization-aware training (Polino et al.'s quantizer).

  View: ``cx.quantize.uniform_ste`` (fake quantization, straight-through
  gradient); finalize: ``cx.quantize.quantize`` (codes plus scales), whose
  ``materialize()`` equals the view's forward value bit for bit.

  Attributes:
    bits: bits per weight, in ``[1, 16]`` (``[2, 16]`` when symmetric).
    bucket_size: Polino's buckets (256 in the paper), or ``None``.
    symmetric: a grid symmetric around 0 (zero is exactly representable,
      which keeps pruned weights at zero in ``NM(2, 4) >> Uniform(4, ...)``).
    axis: per-channel scales along these axes, or ``None``.
    scale_dtype: ``None`` (float32 scales) or ``"float16"``/``"bfloat16"``:
      scales rounded to and stored in that dtype, as GPTQ checkpoints do.

  References:
    Polino, Pascanu, Alistarh, ICLR 2018. https://arxiv.org/abs/1802.05668
  """
  bits: int = 8
  bucket_size: int | None = None
  symmetric: bool = False
  axis: Any = None
  scale_dtype: Any = None

  def __post_init__(self):
    _check_bits("Uniform", self.bits, 2 if self.symmetric else 1)

  def _kw(self) -> dict[str, Any]:
    return dict(bucket_size=self.bucket_size, symmetric=self.symmetric,
                axis=self.axis, scale_dtype=self.scale_dtype)

  def view(self, w, aux, key):
    return _quantize.uniform_ste(w, self.bits, **self._kw())

  def finalize(self, path, w, aux):
    return _quantize.quantize(w, self.bits, path=path, **self._kw())


@dataclasses.dataclass(frozen=True)
class LSQ(Method):
  """Learned step size quantization: the step is trained with the weights.

  Init: ``cx.quantize.lsq_init`` (``2 mean|w| / sqrt(Q_P)``); view:
  ``cx.quantize.lsq`` (its step gradient scaled by ``1/sqrt(N Q_P)``);
  finalize: ``cx.quantize.lsq_quantize`` (:class:`~compressax.quantize.LSQArray`).

  References:
    Esser et al., ICLR 2020. https://arxiv.org/abs/1902.08153
  """
  bits: int = 4
  signed: bool = True

  def __post_init__(self):
    _check_bits("LSQ", self.bits, 2 if self.signed else 1)

  def init(self, path, w, key):
    return {"step": _quantize.lsq_init(w, self.bits, signed=self.signed,
                                       path=path)}

  def view(self, w, aux, key):
    return _quantize.lsq(w, aux["step"], self.bits, signed=self.signed)

  def finalize(self, path, w, aux):
    return _quantize.lsq_quantize(w, aux["step"], self.bits,
                                  signed=self.signed, path=path)


@dataclasses.dataclass(frozen=True)
class KMeans(Method):
  """Trained weight sharing (Deep Compression stage 2).

  The leaf is clustered once into ``2^bits`` shared values; from then on the
  assignment is fixed and the centroids train (``cx.optim.weight_sharing``
  wraps the optimizer; the params stay on the codebook). Finalize stores the
  leaf's distinct values as a ``cx.quantize.CodebookArray`` (exact: the
  trained params take at most ``2^bits`` values), or re-clusters a leaf that
  was never trained under the wrapper.

  With ``pruned=True`` (after a pruning phase) the exact zeros are the
  pruning mask: only the kept weights are clustered and trained, the zeros
  stay zero, and the stored node is a ``cx.prune.MaskedArray`` over the
  codebook, as in the paper (prune, then share the survivors).

  Attributes:
    bits: index bits (``2^bits`` clusters; Deep Compression: 8 conv, 5 FC).
    kmeans_init: k-means initialization (``"linear"``, the paper's best).
    iters: k-means iterations.
    pruned: treat exact zeros as pruned (see above).

  References:
    Han, Mao, Dally, ICLR 2016. https://arxiv.org/abs/1510.00149
  """
  bits: int = 5
  kmeans_init: str = "linear"
  iters: int = 30
  pruned: bool = False

  def __post_init__(self):
    _check_bits("KMeans", self.bits, 1, 16)

  def wrap(self, inner, where):
    from compressax import optim as _optim  # local: optim imports methods' users
    from compressax import _select
    def pruned_mask(params):
      return jax.tree_util.tree_map(
          lambda x, s: x if _select.is_skip(x) else (
              np.asarray(x) != 0 if s else np.asarray(True)),
          params, _select.select(params, where), is_leaf=_select.is_leaf)

    return _optim.weight_sharing(inner, bits=self.bits,
                                 kmeans_init=self.kmeans_init,
                                 kmeans_iters=self.iters, where=where,
                                 mask=pruned_mask if self.pruned else None)

  def _codebook(self, values, k):
    uniq, codes = np.unique(values.reshape(-1), return_inverse=True)
    if uniq.size > k:
      return None
    return _quantize.CodebookArray(
        jnp.asarray(codes.reshape(values.shape).astype(codes_dtype(k))),
        jnp.asarray(uniq), tuple(values.shape), np.dtype(values.dtype))

  def finalize(self, path, w, aux):
    _checks.check_finite(path, w)
    k = 1 << self.bits
    values = np.asarray(w)
    if self.pruned:
      from compressax import prune as _prune
      keep = values != 0
      # Codes of pruned positions point at a kept value (never stored).
      fill = values[keep][0] if keep.any() else values.dtype.type(0)
      node = self._codebook(np.where(keep, values, fill), k)
      if node is None:
        node = _quantize.weight_share(jnp.asarray(values[keep]), k,
                                      init=self.kmeans_init, iters=self.iters)
        codes = np.zeros(values.shape, np.asarray(node.codes).dtype)
        codes[keep] = np.asarray(node.codes).reshape(-1)
        node = _quantize.CodebookArray(jnp.asarray(codes), node.centroids,
                                       tuple(values.shape), np.dtype(values.dtype))
      return _prune.MaskedArray(node, jnp.asarray(keep), tuple(values.shape),
                                np.dtype(values.dtype))
    node = self._codebook(values, k)
    if node is None:  # never trained under the wrapper: cluster now
      node = _quantize.weight_share(w, k, init=self.kmeans_init, iters=self.iters)
    return node


@dataclasses.dataclass(frozen=True)
class Points(Method):
  """Polino's differentiable quantization: trained points per leaf.

  Init: ``cx.quantize.points_init`` (uniform points in the scaled ``[0, 1]``
  domain); view: ``cx.quantize.nearest_point`` (the gradient flows to the
  points, and with ``straight_through`` to the weights too); finalize:
  ``cx.quantize.quantize_points``. The points get their own optimizer when
  ``learning_rate`` is set, as in the paper: SGD with Nesterov momentum 0.9
  (lr about 1e-5), the points re-sorted and clipped to ``[0, 1]`` after
  every step (``cx.optim.diff_quant_points``).

  Attributes:
    n_points: points per tensor (``2 ** bits``; per-tensor counts, e.g. from
      ``cx.quantize.allocate_points``, are one rule per path).
    bucket_size: as in ``cx.quantize.nearest_point``.
    init_method: ``"uniform"`` or ``"quantiles"`` (``cx.quantize.points_init``).
    straight_through: pass the gradient to the weights too.
    learning_rate: the points' own SGD rate, a float or an Optax schedule;
      ``None``: the points train with the plan's inner optimizer.

  References:
    Polino, Pascanu, Alistarh, ICLR 2018. https://arxiv.org/abs/1802.05668
  """
  n_points: int = 16
  bucket_size: int | None = 256
  init_method: str = "uniform"
  straight_through: bool = True
  learning_rate: float | optax.Schedule | None = None

  def init(self, path, w, key):
    return {"points": _quantize.points_init(
        w, self.n_points, method=self.init_method,
        bucket_size=self.bucket_size)}

  @staticmethod
  def _points(aux):
    # Trained points may leave [0, 1] or cross: the view and the stored node
    # use them clipped to the scaled domain (and sorted, as nearest_point does).
    # The clip passes the gradient straight through, so a point lying on a
    # bound gets its whole gradient (jnp.clip would halve it there).
    return _clip_unit(aux["points"])

  def view(self, w, aux, key):
    return _quantize.nearest_point(w, self._points(aux),
                                   bucket_size=self.bucket_size,
                                   straight_through=self.straight_through)

  def aux_optimizer(self):
    if self.learning_rate is None:
      return None
    from compressax import optim as _optim  # local: optim imports methods' users
    return _optim.diff_quant_points(
        optax.sgd(self.learning_rate, momentum=0.9, nesterov=True))

  def finalize(self, path, w, aux):
    return _quantize.quantize_points(w, self._points(aux),
                                     bucket_size=self.bucket_size, path=path)


@dataclasses.dataclass(frozen=True)
class DiffQ(Method):
  """DiffQ: bits learned per group under pseudo-quantization noise.

  Init: one bit logit per ``group_size`` weights at ``init_bits``; view:
  ``cx.diffq.noisy``; penalty: ``size_penalty * cx.diffq.model_size`` (MB);
  finalize: ``cx.diffq.quantize`` (a ``DiffQArray``). The settings are given
  once here, so the logits, the noise, the penalty and the stored codes can
  never disagree. The logits get their own Adam (the paper: lr 1e-3).

  Attributes:
    size_penalty: lambda per MB of the size term (the paper: 1e-3 to 10).
    group_size: weights per bit logit (the paper: 16).
    init_bits, b_min, b_max: initial bits and their range.
    noise: ``"uniform"`` (the paper) or ``"gaussian"`` (reference code).
    logit_learning_rate: Adam learning rate of the logits.

  References:
    Défossez, Adi, Synnaeve, 2021. https://arxiv.org/abs/2104.09987
  """
  size_penalty: float = 1e-2
  group_size: int = 16
  init_bits: float = 8.0
  b_min: float = 2
  b_max: float = 15
  noise: str = "uniform"
  logit_learning_rate: float = 1e-3

  def __post_init__(self):
    if not self.size_penalty >= 0:
      raise ValueError(f"DiffQ: size_penalty must be >= 0, got "
                       f"{self.size_penalty}")
    if self.noise not in ("uniform", "gaussian"):
      raise ValueError(f"DiffQ: noise must be 'uniform' or 'gaussian', got "
                       f"{self.noise!r}")
    _diffq.init_logits({"w": jnp.zeros((1, 1))}, group_size=self.group_size,
                       init_bits=self.init_bits, b_min=self.b_min,
                       b_max=self.b_max, min_size=0)  # validates the config

  def _kw(self) -> dict[str, Any]:
    return dict(group_size=self.group_size, b_min=self.b_min, b_max=self.b_max)

  def init(self, path, w, key):
    _checks.check_floating(path, w)
    _checks.check_finite(path, w)
    logits = _diffq.init_logits({"w": w}, init_bits=self.init_bits,
                                min_size=0, where=_ALL, **self._kw())
    return {"logits": logits["w"]}

  def view(self, w, aux, key):
    if key is None:
      raise ValueError("DiffQ's training view draws noise: pass a PRNG key "
                       "to Plan.view / Plan.loss")
    return _diffq.noisy({"w": w}, {"w": aux["logits"]}, key, noise=self.noise,
                        **self._kw())["w"]

  def size_mb(self, w, aux):
    """The leaf's differentiable size in MB (``cx.diffq.model_size``)."""
    return _diffq.model_size({"w": w}, {"w": aux["logits"]}, **self._kw())

  def penalty(self, w, aux):
    return self.size_penalty * self.size_mb(w, aux)

  def aux_optimizer(self):
    return optax.adam(self.logit_learning_rate)

  def finalize(self, path, w, aux):
    del path
    return _diffq.quantize({"w": w}, {"w": aux["logits"]}, **self._kw())["w"]
