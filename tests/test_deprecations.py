"""Superseded public names keep working for a release, warning once each."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import compressax as cx


def _params():
  return {"d": {"kernel": jax.random.normal(jax.random.key(0), (16, 8)),
                "bias": jnp.zeros(8)}}


SUPERSEDED = {
    "quantized_params": (lambda p: cx.optim.quantized_params(p, 4), "Uniform"),
    "finalize": (lambda p: cx.optim.finalize(p, 4), "Uniform"),
    "diffq_init": (lambda p: cx.optim.diffq_init(p, min_size=0), "DiffQ"),
    "diffq_optimizer": (lambda p: cx.optim.diffq_optimizer(optax.sgd(0.1)), "DiffQ"),
    "diffq_loss": (lambda p: cx.optim.diffq_loss(lambda q: 0.0, penalty=1.0), "DiffQ"),
    "lsq_init_steps": (lambda p: cx.optim.lsq_init_steps(p, 4), "LSQ"),
    "init_points": (lambda p: cx.optim.init_points(p, 4), "Points"),
}


@pytest.mark.parametrize("name", sorted(SUPERSEDED))
def test_superseded_names_warn_and_name_the_replacement(name):
  call, method = SUPERSEDED[name]
  with pytest.warns(DeprecationWarning,
                    match=rf"cx\.optim\.{name} is deprecated.*cx\.methods\.{method}"):
    call(_params())


def test_superseded_results_are_unchanged():
  """The deprecated path and the method give the same stored node."""
  p = _params()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    old = cx.optim.finalize(p, 4)["d"]["kernel"]
  plan = cx.Plan(cx.methods.Uniform(4))
  new = plan.finalize(plan.init(p))["d"]["kernel"]
  np.testing.assert_array_equal(old.codes, new.codes)
  np.testing.assert_array_equal(old.materialize(), new.materialize())


def test_prune_nm_without_axis_warns_about_the_default():
  """Issue 11 item 4: N:M defaults disagreed silently (-1 here, -2 elsewhere)."""
  with pytest.warns(DeprecationWarning, match="pass axis= explicitly"):
    tx = cx.optim.prune_nm(optax.sgd(0.1), 2, 4)
  p = {"k": jnp.ones((4, 8))}
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    cx.optim.prune_nm(optax.sgd(0.1), 2, 4, axis=-2).init(p)
  assert cx.methods.NM().axis == -2
  del tx


@jax.numpy_dtype_promotion("standard")  # DiffQ logits train with optax.adam
def test_methods_do_not_call_deprecated_names():
  """The method layer runs on the kernels, not on the superseded wrappers."""
  p = _params()
  plan = cx.Plan([("d/kernel", cx.methods.DiffQ()),])
  plan2 = cx.Plan({"d/kernel": cx.methods.NM(2, 4) >> cx.methods.LSQ(3)})
  with warnings.catch_warnings():
    warnings.simplefilter("error", DeprecationWarning)
    for pl in (plan, plan2, cx.Plan(cx.methods.Points(4, bucket_size=None))):
      t = pl.init(p, jax.random.key(0))
      tx = pl.optimizer(optax.sgd(0.1))
      s = tx.init(t)
      g = jax.grad(lambda t: jnp.sum(pl.view(t, jax.random.key(1))["d"]["kernel"] ** 2))(t)
      tx.update(g, s, t)
      pl.finalize(t)
