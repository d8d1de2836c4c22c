"""Input validation shared by every module.

Errors name the leaf and the constraint, e.g.
``ValueError: params['Dense_0']['kernel']: sparsity must be in [0, 1), got 1.2``.

Checks on *values* (bits, sparsity, NaN/Inf) run only when the value is
concrete. Under ``jit``/``vmap`` a traced hyperparameter cannot be inspected;
each public function documents what it does with an out-of-range traced value
(usually: clipped into the valid range).
"""

from __future__ import annotations

from typing import Any, NoReturn

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer


def is_concrete(x) -> bool:
  """True if ``x`` holds a value now (not a tracer inside jit/vmap/grad)."""
  return not isinstance(x, Tracer)


def where_str(path) -> str:
  """``path`` as shown in errors; strings pass through, key paths are rendered."""
  if isinstance(path, str):
    return path
  from compressax._select import display_path
  return display_path(path)


def fail(path, message: str, exc: type[Exception] = ValueError) -> NoReturn:
  raise exc(f"{where_str(path)}: {message}")


def check_floating(path, x) -> None:
  """Compression acts on floating-point leaves; ints and bools are an error."""
  dtype = getattr(x, "dtype", None)
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    fail(path, f"expected a floating-point array, got dtype {dtype}; integer "
               "and bool leaves cannot be compressed (exclude them with `where`)",
         TypeError)


def check_finite(path, x) -> None:
  """NaN/Inf weights are an error (only checked when ``x`` is concrete)."""
  if not is_concrete(x) or not np.size(x):
    return
  # NumPy, not jnp: inside a jit trace jnp ops on a closed-over concrete array
  # would themselves be traced. float32 view: NumPy's isfinite lacks bf16 loops.
  finite = np.isfinite(np.asarray(x).astype(np.float32, copy=False))
  if not finite.all():
    n = int(finite.size - finite.sum())
    fail(path, f"contains {n} NaN/Inf value(s); compression needs finite weights")


def check_range(path, name: str, value, lo, hi, *, lo_open=False, hi_open=False,
                integer=False) -> None:
  """Check ``lo <= value <= hi`` (open ends as asked) for concrete values."""
  if value is None or not is_concrete(value):
    return
  arr = np.asarray(value)
  if integer and not np.all(np.equal(np.mod(arr, 1), 0)):
    fail(path, f"{name} must be an integer, got {value}")
  bad_lo = np.any(arr <= lo) if lo_open else np.any(arr < lo)
  bad_hi = np.any(arr >= hi) if hi_open else np.any(arr > hi)
  if bad_lo or bad_hi or np.any(np.isnan(arr.astype(float))):
    interval = ("(" if lo_open else "[") + f"{lo}, {hi}" + (")" if hi_open else "]")
    fail(path, f"{name} must be in {interval}, got {value}")


def check_bits(path, bits, lo: int = 1, hi: int = 16) -> None:
  check_range(path, "bits", bits, lo, hi, integer=True)


def check_sparsity(path, sparsity) -> None:
  check_range(path, "sparsity", sparsity, 0.0, 1.0, hi_open=True)


def check_axis(path, axis: int, ndim: int) -> int:
  """Normalise ``axis`` for an ``ndim``-array, or fail naming the leaf."""
  if not -ndim <= axis < ndim:
    fail(path, f"axis {axis} is out of range for an array of rank {ndim}")
  return axis % ndim


def check_same_structure(path, a: Any, b: Any, what: str = "mask") -> None:
  from compressax._select import is_leaf
  ta = jax.tree_util.tree_structure(a, is_leaf=is_leaf)
  tb = jax.tree_util.tree_structure(b, is_leaf=is_leaf)
  if ta != tb:
    fail(path, f"the {what} tree does not match the params tree:\n"
               f"  params: {ta}\n  {what}: {tb}")


def check_tree(tree: Any, what: str = "params") -> None:
  """A Flax module where a pytree of arrays belongs is a ``TypeError``.

  Flax ``nnx`` modules are pytrees themselves, so without this check a module
  would be walked silently (its RNG counts and batch statistics taken for
  weights) or fail deep inside with a structure error. Only the type of the
  root is looked at, so the check is free.

  Raises:
    TypeError: saying what to pass instead.
  """
  for cls in type(tree).__mro__:
    module = getattr(cls, "__module__", "") or ""
    if cls.__name__ == "Module" and module.startswith("flax."):
      kind = "nnx" if ".nnx" in module else "linen"
      raise TypeError(
          f"{what}: got a Flax {kind} Module ({type(tree).__name__}) where a "
          "pytree of arrays belongs; pass nnx.state(model) (or the state of "
          "nnx.split(model)) for an nnx model, or the linen variables / "
          "params dict (variables = model.init(key, x); variables['params'])")


def check_leaf(path, x, hint: str = "") -> None:
  """An array (not a tree) belongs here; a dict, list or tuple says so."""
  if isinstance(x, (dict, list, tuple)) or not hasattr(x, "shape"):
    fail(path, f"expected one array, got a {type(x).__name__}{hint}",
         TypeError)
