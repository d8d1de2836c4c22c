"""The lifecycle every compression method follows, and composition.

A method is a frozen dataclass: its whole configuration, given once. A
:class:`compressax.Plan` assigns methods to leaves by rules and drives the
same five steps for every one of them, per leaf:

1. ``init(path, w, key) -> aux``: the method's trainable side state for the
   leaf (DiffQ's bit logits, LSQ's step, trained points, low-rank factors;
   ``{}`` when it has none).
2. ``view(w, aux, key) -> w'``: the weight as the training forward pass sees
   it (fake quantization with a straight-through gradient, DiffQ noise, ...),
   differentiable with respect to ``w`` and ``aux``.
3. ``penalty(w, aux) -> scalar``: a differentiable term added to the loss
   (DiffQ's size penalty); ``0`` by default.
4. ``wrap(inner, where) -> GradientTransformation``: an Optax wrapper that
   the method needs around the optimizer (pruning masks, weight sharing),
   acting on the leaves ``where`` selects; ``inner`` itself by default.
   ``aux_optimizer()`` may give the side state its own optimizer.
5. ``finalize(path, w, aux) -> node``: a storable compressed node whose
   ``materialize()`` is what ``view`` fed the model (bit for bit, for the
   deterministic views).

Methods compose on one leaf with ``>>`` (:class:`Chain`): ``NM(2, 4) >>
Uniform(4)`` prunes 2:4 and stores the kept weights as 4-bit codes;
``LowRank(rank=16) >> Uniform(8)`` stores 8-bit factors.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from compressax import prune as _prune

__all__ = ["Chain", "Method"]


@dataclasses.dataclass(frozen=True)
class Method:
  """Base class of compression methods (see the module docstring)."""

  def init(self, path, w, key) -> Any:
    del path, w, key
    return {}

  def view(self, w, aux, key) -> jax.Array:
    del aux, key
    return w

  def penalty(self, w, aux) -> jax.Array:
    del w, aux
    return jnp.zeros((), jnp.float32)

  def wrap(self, inner: optax.GradientTransformation, where
           ) -> optax.GradientTransformation:
    del where
    return inner

  def aux_optimizer(self) -> optax.GradientTransformation | None:
    return None

  def finalize(self, path, w, aux):
    raise NotImplementedError(f"{type(self).__name__}.finalize")

  def __rshift__(self, then: "Method") -> "Chain":
    if not isinstance(then, Method):
      return NotImplemented
    return Chain(self, then)

  # Methods that change which weights exist (pruning) and those that change
  # how a weight is represented (low rank) declare it, so Chain knows how to
  # put a second method after them.
  prunes = False
  factors = False

  def keep(self, w) -> jax.Array:
    """For pruning methods: the kept positions of the trained ``w``."""
    raise NotImplementedError

  def assemble(self, w, u, v) -> jax.Array:
    """For factoring methods: the dense view of ``w`` from factors ``u``, ``v``."""
    raise NotImplementedError

  def node(self, w, u, v) -> Any:
    """For factoring methods: the stored node of ``w`` from factors ``u``, ``v``."""
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Chain(Method):
  """``first`` then ``then`` on the same leaf (also written ``first >> then``).

  Two compositions are defined:

  * ``first`` prunes (``Magnitude``, ``NM``, ``Channel``): its wrapper keeps
    the pruned weights at zero, ``then`` quantizes (the view is ``then``'s view
    with pruned positions held at zero) and the stored node is a
    ``cx.prune.MaskedArray`` over ``then``'s node, so only kept values and
    their positions are written.
  * ``first`` factors (``LowRank``): ``then`` applies to each factor, in the
    view (``then.view(u) @ then.view(v)``) and in the stored
    ``cx.lowrank.LowRankArray``.

  Attributes:
    first: the pruning or factoring method.
    then: the method applied after it (a quantizer).
  """
  first: Method
  then: Method

  def __post_init__(self):
    if not (self.first.prunes or self.first.factors):
      raise ValueError(
          f"{type(self).__name__}: a chain starts with a pruning method "
          f"(Magnitude, NM, Channel) or LowRank, got {self.first!r}")
    if self.then.prunes or self.then.factors or isinstance(self.then, Chain):
      raise ValueError(
          f"Chain: the second method must be a quantizer (Uniform, LSQ, "
          f"KMeans, Points, DiffQ), got {self.then!r}")
    if self.first.prunes and type(self.then).__name__ == "KMeans":
      raise ValueError(
          "Chain: pruning >> KMeans trains both through optimizer wrappers; "
          "run them as two phases (prune, then a Plan with KMeans over the "
          "pruned params) as Deep Compression does")

  def init(self, path, w, key):
    if self.first.prunes:
      return self.then.init(path, w, key)
    k1, k2, k3 = jax.random.split(key, 3) if key is not None else (None,) * 3
    fa = self.first.init(path, w, k1)
    return {"factors": fa, "u": self.then.init(path, fa["u"], k2),
            "v": self.then.init(path, fa["v"], k3)}

  def view(self, w, aux, key):
    if self.first.prunes:
      return jnp.where(self.first.keep(w), self.then.view(w, aux, key),
                       jnp.zeros_like(w))
    ku, kv = jax.random.split(key) if key is not None else (None, None)
    u = self.then.view(aux["factors"]["u"], aux["u"], ku)
    v = self.then.view(aux["factors"]["v"], aux["v"], kv)
    return self.first.assemble(w, u, v)

  def penalty(self, w, aux):
    if self.first.prunes:
      return self.then.penalty(w, aux)
    return (self.then.penalty(aux["factors"]["u"], aux["u"])
            + self.then.penalty(aux["factors"]["v"], aux["v"]))

  def wrap(self, inner, where):
    return self.first.wrap(self.then.wrap(inner, where), where)

  def aux_optimizer(self):
    return self.then.aux_optimizer()

  def finalize(self, path, w, aux):
    if self.first.prunes:
      mask = self.first.keep(w)
      value = self.then.finalize(path, w, aux)
      return _prune.MaskedArray(value, mask, tuple(w.shape), w.dtype)
    u = self.then.finalize(path, aux["factors"]["u"], aux["u"])
    v = self.then.finalize(path, aux["factors"]["v"], aux["v"])
    return self.first.node(w, u, v)
