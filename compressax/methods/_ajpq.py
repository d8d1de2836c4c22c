"""AJPQ: pruning as 0-bit quantization, DiffQ's learned bits extended down to 0.

Each group of ``group_size`` weights (flattened, as in ``cx.diffq``) has one
bit logit; its bits ``b = b_max * sigmoid(logit)`` lie in ``(0, b_max)``. A
group whose bits round to 0 is pruned: it stores no codes, and its positions
cost what the file's sparse coding of the mask costs. Pruning and mixed
precision are therefore one learned decision, traded against the loss by one
differentiable size penalty that sees both.

References:
  PAPERS.md section 9, *AJPQ: pruning as 0-bit quantization* (bits allocated
  per channel or group, mixed precision with 0).
  Défossez, Adi, Synnaeve, *Differentiable Model Compression via Pseudo
  Quantization Noise*, 2021 (the noise, the logits and the size penalty
  extended here). https://arxiv.org/abs/2104.09987
  van Baalen et al., *Bayesian Bits: Unifying Quantization and Pruning*,
  NeurIPS 2020 (a related gated formulation with 0 bits as pruning).
  https://arxiv.org/abs/2005.07093
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from compressax import _checks
from compressax import prune as _prune
from compressax.diffq import _bits
from compressax.diffq import _noise
from compressax.diffq import _size
from compressax.diffq._quantize import DiffQArray
from compressax.diffq._quantize import _top
from compressax.methods._base import Method

__all__ = ["AJPQ"]

_MB_BITS = 8 * 2 ** 20


def _number(x) -> bool:
  return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class AJPQ(Method):
  """Pruning as 0-bit quantization: learned bits per group, 0 bits = pruned.

  Init: one bit logit per ``group_size`` weights at ``init_bits``; bits are
  ``b = b_max * sigmoid(logit)``, in ``(0, b_max)``.

  View (needs a PRNG key): ``gate * (w + Delta * u)`` per group, with
  ``gate = clip(b, 0, 1)``, DiffQ's uniform pseudo-quantization noise ``u``
  (``cx.diffq.noisy``'s counter hash, seeded by the key) and step
  ``Delta = (max w - min w) / (2^max(b, 1) - 1)`` over the whole tensor.
  Gradients reach ``w`` (gated identity plus DiffQ's range rule) and the
  logits (through ``Delta`` above 1 bit, through the gate below it).

  Penalty: ``size_penalty * size_mb(w, aux)``, the differentiable size

      sum_g n_g b_g + sum_g gate_g (4 + index_bits) + 64  bits,

  the payload, each kept group's stored 4-bit width, each kept group's
  position cost (``index_bits``) and the tensor's float32 range, in MB
  (2^20 bytes) as ``DiffQ.size_mb``.

  Finalize: ``bits = round(b)``; a group at 0 bits is pruned. The node is a
  ``cx.prune.MaskedArray`` (the kept groups' positions) over a
  ``cx.diffq.DiffQArray`` whose range ``[lo, hi]`` is the kept weights'
  (pruned ones do not widen it); pruned groups get the placeholder width 1
  and code 0. The file writes the mask and only the kept codes, each at its
  group's width (the placeholder widths remain in the entropy-coded widths
  field). ``materialize()`` is the deterministic reading of the view: no
  noise, the gate rounded.

  Attributes:
    size_penalty: lambda per MB of the size term (DiffQ's range: 1e-3 to 10).
    group_size: weights per bit logit, ``>= 1`` (DiffQ: 16).
    init_bits: the bits every group starts from, in ``(0, b_max)``;
      ``None``: ``b_max / 2``.
    b_max: the most bits a group can learn, in ``[1, 15]``.
    index_bits: bits per kept group charged for its position: an estimate
      of what the sparse coding of a group mask costs (a bitmap over groups
      costs 1 per group; the file's mask coder chooses its own layout).
    logit_learning_rate: Adam learning rate of the logits (DiffQ: 1e-3).
    hard_gate: the view uses the rounded gate (0 or 1: kept iff ``b >= 0.5``,
      as finalize decides) with the gradient of ``clip(b, 0, 1)`` passed
      straight through, so training sees the pruning the file will hold
      (a soft gate lets groups settle at fractions that rounding changes).
    min_bits: the width of a kept group at ``b = 1``; above the gate the
      widths shift by ``min_bits - 1`` (noise at ``max(b, 1) + min_bits - 1``
      bits, payload ``n_g (min_bits gate + max(b - 1, 0))``, stored width
      ``round(b) + min_bits - 1``), so a group is either pruned or stored
      at ``min_bits`` or more (1: the plain formulation above; a per-tensor
      range at 1 or 2 bits has no level near 0). ``b_max + min_bits - 1``
      must not exceed 15.

  Raises:
    ValueError: at construction, for a config out of range (naming it); at
      ``init``/``finalize``, for NaN/Inf weights (naming the leaf path).
    TypeError: for an integer or bool leaf (naming the leaf path).

  References:
    PAPERS.md section 9 (AJPQ, pruning as 0-bit quantization); DiffQ,
    Défossez et al. 2021, https://arxiv.org/abs/2104.09987; Bayesian Bits,
    van Baalen et al. 2020, https://arxiv.org/abs/2005.07093
  """
  size_penalty: float = 1e-2
  group_size: int = 16
  init_bits: float | None = None
  b_max: float = 8.0
  index_bits: float = 1.0
  logit_learning_rate: float = 1e-3
  hard_gate: bool = False
  min_bits: int = 1

  def __post_init__(self):
    def bad(name, want):
      raise ValueError(f"AJPQ: {name} must be {want}, got "
                       f"{getattr(self, name)!r}")
    if not _number(self.size_penalty) or not 0 <= self.size_penalty < math.inf:
      bad("size_penalty", "a finite number >= 0")
    if (isinstance(self.group_size, bool)
        or not isinstance(self.group_size, (int, np.integer)) or self.group_size < 1):
      bad("group_size", "an int >= 1")
    if not _number(self.b_max) or not 1 <= self.b_max <= _bits.MAX_BITS:
      bad("b_max", f"in [1, {_bits.MAX_BITS}]")
    if self.init_bits is not None and (
        not _number(self.init_bits) or not 0 < self.init_bits < self.b_max):
      bad("init_bits", f"in (0, b_max={self.b_max})")
    if not _number(self.index_bits) or not 0 <= self.index_bits < math.inf:
      bad("index_bits", "a finite number >= 0")
    if not _number(self.logit_learning_rate) or not self.logit_learning_rate > 0:
      bad("logit_learning_rate", "> 0")
    if not isinstance(self.hard_gate, (bool, np.bool_)):
      bad("hard_gate", "a bool")
    if (isinstance(self.min_bits, bool) or not isinstance(self.min_bits, (int, np.integer))
        or not 1 <= self.min_bits <= _bits.MAX_BITS + 1 - self.b_max):
      bad("min_bits", f"an int in [1, 16 - b_max = {_bits.MAX_BITS + 1 - self.b_max:g}]")

  def init(self, path, w, key):
    del key
    _checks.check_floating(path, w)
    _checks.check_finite(path, w)
    init = float(self.b_max) / 2 if self.init_bits is None else float(self.init_bits)
    t = init / float(self.b_max)
    g = _bits.n_groups(int(np.size(w)), self.group_size)
    return {"logits": jnp.full((g,), math.log(t / (1.0 - t)), jnp.float32)}

  def bits(self, aux) -> jax.Array:
    """Per-group fractional bits ``b_max * sigmoid(logit)`` (NaN logit: ``b_max``)."""
    return _bits.logit_bits(aux["logits"], 0.0, float(self.b_max))

  def view(self, w, aux, key):
    if key is None:
      raise ValueError("AJPQ's training view draws noise: pass a PRNG key "
                       "to Plan.view / Plan.loss")
    seeds = jax.random.bits(key, (2,), jnp.uint32)
    return _view_leaf(jnp.asarray(w), aux["logits"], seeds, float(self.b_max),
                      float(self.min_bits - 1), group_size=self.group_size,
                      hard=bool(self.hard_gate))

  def size_mb(self, w, aux) -> jax.Array:
    """The leaf's differentiable size in MB (see the class docstring)."""
    counts = _bits.group_counts(int(np.size(w)), self.group_size)
    b = self.bits(aux)
    gate = jnp.clip(b, 0.0, 1.0)
    payload = b if self.min_bits == 1 else (
        self.min_bits * gate + jnp.maximum(b - 1.0, 0.0))
    total = (jnp.sum(jnp.asarray(counts, jnp.float32) * payload)
             + jnp.sum(gate) * (_size.WIDTH_BITS + float(self.index_bits))
             + float(_size.RANGE_BITS))
    return total / _MB_BITS

  def penalty(self, w, aux):
    return self.size_penalty * self.size_mb(w, aux)

  def aux_optimizer(self):
    return optax.adam(self.logit_learning_rate)

  def finalize(self, path, w, aux):
    _checks.check_floating(path, w)
    _checks.check_finite(path, w)
    w = jnp.asarray(w)
    codes, widths, lo, hi, keep = _finalize_leaf(
        w, aux["logits"], float(self.b_max), float(self.min_bits - 1),
        group_size=self.group_size)
    value = DiffQArray(codes=codes, bits=widths, lo=lo, hi=hi, shape=tuple(w.shape),
                       dtype=np.dtype(w.dtype), group_size=self.group_size)
    return _prune.MaskedArray(value, keep, tuple(w.shape),
                              np.dtype(w.dtype))


# Jitted so that eager and jitted callers run the same compiled arithmetic.
@functools.partial(jax.jit, static_argnames=("group_size", "hard"))
def _view_leaf(w, logit, seeds, b_max, shift, *, group_size, hard):
  b = _bits.logit_bits(logit, 0.0, b_max)
  gate = jnp.clip(b, 0.0, 1.0)
  if hard:  # exact: round(g) - g and the sum are exact for g in [0, 1]
    gate = gate + jax.lax.stop_gradient(jnp.round(gate) - gate)
  gate = _bits.expand(gate, w.shape, group_size)
  # DiffQ's noisy leaf at max(b, 1) bits: its custom gradient carries the
  # range rule to `w` and d/d(bits) to the logits above 1 bit.
  noisy = _noise._uniform_noisy(w, jnp.maximum(b, 1.0) + shift, seeds, group_size, 0)
  return (gate * jnp.asarray(noisy, jnp.float32)).astype(w.dtype)


@functools.partial(jax.jit, static_argnames=("group_size",))
def _finalize_leaf(w, logit, b_max, shift, *, group_size):
  bits = jnp.round(_bits.logit_bits(logit, 0.0, b_max))
  kept = bits >= 1
  bits = jnp.clip(bits + shift, 0, _bits.MAX_BITS)
  keep = _bits.expand(kept, w.shape, group_size)
  x = w.astype(jnp.float32)
  any_kept = jnp.any(kept)
  lo = jnp.where(any_kept, jnp.min(jnp.where(keep, x, jnp.inf)), 0.0)
  hi = jnp.where(any_kept, jnp.max(jnp.where(keep, x, -jnp.inf)), 0.0)
  # A constant (or empty) kept set has no range: its levels are 0, read as lo.
  span = jnp.where(hi > lo, hi - lo, 1.0)
  widths = jnp.where(kept, bits, 1.0)
  top = _top(widths, w.shape, group_size)
  levels = jnp.clip(jnp.round((x - lo) / span * top), 0.0, top)
  levels = jnp.where(keep, levels, 0.0)
  return (levels.astype(jnp.uint16), widths.astype(jnp.uint8), lo, hi, keep)
