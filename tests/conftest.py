"""Test configuration: fail loudly on broadcasting, dtype and sharding bugs.

* 8 host CPU devices, so sharded code paths run on a laptop.
* ``jax_numpy_rank_promotion="raise"``: implicit rank broadcasting is an error.
* ``jax_numpy_dtype_promotion="strict"``: implicit dtype promotion is an error.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")

import jax  # noqa: E402  (after XLA_FLAGS)

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

import hypothesis  # noqa: E402

hypothesis.settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow])
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
  """Drop JAX's compiled programs after each test module.

  The whole suite runs in one process and compiles thousands of XLA:CPU
  programs. Each keeps its code mapped, and a long run approaches the
  kernel's per-process limit on memory maps (``vm.max_map_count``, 65530 by
  default), past which XLA's compiler crashes. Modules do not share programs
  they rely on, so clearing between modules only costs recompiles.
  """
  yield
  jax.clear_caches()
  gc.collect()
