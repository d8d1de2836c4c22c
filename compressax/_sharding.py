"""Keeping a leaf's sharding through a transform (private).

Two kinds of sharded input reach the transforms:

* **Explicit mesh axes** (``jax.make_mesh(..., axis_types=Explicit)``, the
  default of current JAX): the sharding is part of the array's type, traced
  or not (``jax.typeof(x).sharding``). Operations whose sharding JAX cannot
  infer (a reshape that mixes sharded axes, a sort along a sharded axis, an
  SVD, a gather) raise ``ShardingTypeError``; they run here on a replicated
  copy (:func:`replicated`), and results are put back in the input's
  sharding (:func:`like`).
* **A classic** ``Mesh`` **with** ``NamedSharding`` **arrays** (automatic
  axes): XLA's partitioner picks the sharding of every intermediate and of
  the result. For a concrete input the result is put back in the input's
  sharding (a ``device_put``); inside a user's ``jit`` the input's sharding is
  not visible to the library, and ``jit``'s ``in_shardings``/``out_shardings``
  or the propagation decide.

Unsharded inputs pass through every function here unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from compressax import _checks

__all__: list[str] = []


def explicit(x) -> NamedSharding | None:
  """``x``'s sharding when it is split over explicit mesh axes, else ``None``.

  For a concrete array the concrete ``NamedSharding`` (usable outside a mesh
  context), for a tracer the abstract one from its type.
  """
  if not isinstance(x, (jax.Array, Tracer)):
    return None
  try:
    s = jax.typeof(x).sharding
  except TypeError:
    return None
  if not isinstance(s, NamedSharding) or all(a is None for a in s.spec):
    return None
  concrete = getattr(x, "sharding", None) if _checks.is_concrete(x) else None
  return concrete if isinstance(concrete, NamedSharding) else s


def _classic(x) -> jax.sharding.Sharding | None:
  """A concrete array's sharding over several devices (classic mesh)."""
  if not isinstance(x, jax.Array) or not _checks.is_concrete(x):
    return None
  s = x.sharding
  return None if len(s.device_set) < 2 else s


def replicated(x):
  """``x`` replicated over its mesh when it is split.

  Split means: over explicit axes (by type, traced or not), a concrete array
  on a classic mesh, or a tracer under a classic mesh set with
  ``jax.set_mesh`` (a sharding constraint). For operations JAX cannot shard by type (sorts and cumulative sums along
  a split axis, SVDs, reshapes mixing split axes) and for float reductions
  that must add in the unsharded order (so results stay bit-identical).
  """
  s = explicit(x)
  if s is not None:
    return jax.sharding.reshard(x, NamedSharding(s.mesh, P()))
  s = _classic(x)
  if isinstance(s, NamedSharding) and not s.is_fully_replicated:
    # A concrete array on a classic mesh: XLA would split the work (and the
    # order of float sums) by the layout.
    return jax.device_put(x, NamedSharding(s.mesh, P()))
  mesh = jax.sharding.get_abstract_mesh()
  if (not _checks.is_concrete(x) and not mesh.empty
      and all(t == AxisType.Auto for t in mesh.axis_types)):
    # Traced under a classic mesh set with `jax.set_mesh`: ask the
    # partitioner for the same (it cannot be asked without a mesh).
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P()))
  return x


def take(table, idx, mode: str = "fill"):
  """``jnp.take(table, idx, axis=0)`` of a replicated table, laid out like
  ``idx`` when that is split over explicit mesh axes."""
  s = explicit(idx)
  if s is None:
    return jnp.take(table, idx, axis=0, mode=mode)
  spec = spec_tuple(s, np.ndim(idx)) + (None,) * (np.ndim(table) - 1)
  return table.at[idx].get(out_sharding=NamedSharding(s.mesh, P(*spec)),
                           mode=mode)


def _axes(spec) -> tuple[str, ...]:
  """The mesh axes a spec splits over, in order."""
  out = []
  for entry in spec:
    if entry is not None:
      out.extend(entry if isinstance(entry, tuple) else (entry,))
  return tuple(out)


def rows_sharding(x, n: int) -> NamedSharding | None:
  """A sharding for ``(n, ...)`` rows cut from ``x``: the first axis split
  over every mesh axis that splits ``x`` (in order), or ``None`` when ``x``
  is not split over explicit axes or ``n`` does not divide evenly."""
  s = explicit(x)
  if s is None:
    return None
  axes = _axes(s.spec)
  if n % int(np.prod([s.mesh.shape[a] for a in axes])):
    return None
  return NamedSharding(s.mesh, P(axes))


def whole_groups(x, axis: int, group: int):
  """``x`` with ``axis`` unsplit unless every shard holds whole groups.

  For a reshape that cuts ``axis`` into ``(length // group, group)``: the
  shards of an explicit axis must hold whole groups for it to stay local.
  """
  s = explicit(x)
  if s is None:
    return x
  spec = list(spec_tuple(s, np.ndim(x)))
  entry = spec[axis]
  if entry is None:
    return x
  names = entry if isinstance(entry, tuple) else (entry,)
  if (np.shape(x)[axis] // group) % int(np.prod([s.mesh.shape[a] for a in names])):
    spec[axis] = None
    return jax.sharding.reshard(x, NamedSharding(s.mesh, P(*spec)))
  return x


def ravel(x):
  """``jnp.ravel(x)``, still split over ``x``'s explicit mesh axes.

  Row-major order does not depend on the layout, so this is only a
  (collective) relayout: no value changes.
  """
  if explicit(x) is None:
    return jnp.ravel(x)
  target = rows_sharding(x, int(np.size(x)))
  if target is None:
    return jnp.ravel(replicated(x))
  return jnp.reshape(x, (-1,), out_sharding=target)


def unravel(flat, x):
  """``flat.reshape(x.shape)`` in ``x``'s sharding (see :func:`like`)."""
  s = explicit(x)
  if s is not None:
    return jnp.reshape(flat, np.shape(x), out_sharding=s)
  return like(jnp.reshape(flat, np.shape(x)), x)


def like(y, x):
  """``y`` (of ``x``'s shape) in ``x``'s sharding; ``y`` unchanged otherwise."""
  s = explicit(x)
  if s is not None:
    if jax.typeof(y).sharding.spec != jax.typeof(x).sharding.spec:
      y = jax.sharding.reshard(y, s)
    return y
  s = _classic(x)
  if s is not None and _checks.is_concrete(y) and not (
      isinstance(y, jax.Array) and y.sharding.is_equivalent_to(s, np.ndim(y))):
    y = jax.device_put(y, s)
  return y


def named(x) -> NamedSharding | None:
  """``x``'s ``NamedSharding`` if it is split (explicit axes, or concrete)."""
  s = explicit(x) or _classic(x)
  return s if isinstance(s, NamedSharding) else None


def spec_tuple(s: NamedSharding, ndim: int) -> tuple:
  """A sharding's spec padded with ``None`` to ``ndim`` entries."""
  return tuple(s.spec) + (None,) * (ndim - len(s.spec))


def like_spec(y, x, spec_fn):
  """``y`` sharded by ``spec_fn(x's spec as a tuple of ndim entries)``.

  For results of another shape than ``x`` (low-rank factors), laid out
  after ``x``'s sharding. ``y`` is unchanged when ``x`` is unsharded.
  """
  s = named(x)
  if s is None:
    return y
  target = NamedSharding(s.mesh, P(*spec_fn(spec_tuple(s, np.ndim(x)))))
  if explicit(x) is not None:
    return jax.sharding.reshard(y, target)
  if _checks.is_concrete(y):
    return jax.device_put(y, target)
  return y


def replicate_like(y, x):
  """``y`` replicated over ``x``'s mesh (small side arrays: scales, codebooks)."""
  return like_spec(y, x, lambda spec: ())
