"""Bad input gets a clear error (naming the leaf), never a hang or a crash deep inside."""

import contextlib
import signal

import jax.numpy as jnp
import numpy as np
import pytest

import compressax as cx


# --------------------------------------------------------------- entropy coding

@contextlib.contextmanager
def _deadline(seconds):
  """Fail (instead of hanging the suite) if the body runs past ``seconds``."""
  def boom(*_):
    raise TimeoutError(f"still running after {seconds}s")
  old = signal.signal(signal.SIGALRM, boom)
  signal.alarm(seconds)
  try:
    yield
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("counts,max_len", [
    ([5, 3], 0), ([1, 1, 1], 1), ([1] * 5, 2), ([4, 0, 0, 1, 2, 9, 1, 1, 1], 2),
    (list(range(1, 2 ** 10 + 2)), 10), ([7], 0),
])
def test_huffman_max_len_too_short_raises(counts, max_len):
  with _deadline(10), pytest.raises(ValueError, match="max_len"):
    cx.io.huffman_code_lengths(np.array(counts), max_len=max_len)


@pytest.mark.parametrize("counts,max_len", [
    ([5, 3], 1), ([1, 1, 1], 2), ([1] * 4, 2), (list(range(1, 2 ** 10 + 1)), 10),
    ([7], 1), ([0, 0], 0),
])
def test_huffman_max_len_just_long_enough_fits(counts, max_len):
  lengths = cx.io.huffman_code_lengths(np.array(counts), max_len=max_len)
  present = np.asarray(counts) > 0
  assert lengths.max(initial=0) <= max_len
  assert np.all((lengths > 0) == present)
  if present.sum() > 1:
    assert np.sum(2.0 ** -lengths[present]) <= 1  # Kraft: a prefix code


@pytest.mark.parametrize("counts", [[-1, 3], [2, -5, 1], [1.0, np.nan],
                                    [1, np.inf], [[1, 2], [3, 4]]])
def test_entropy_bits_and_huffman_reject_bad_counts(counts):
  with pytest.raises(ValueError, match="counts"):
    cx.io.entropy_bits(np.array(counts))
  with pytest.raises(ValueError, match="counts"):
    cx.io.huffman_code_lengths(np.array(counts))


def test_entropy_bits_of_valid_counts_unchanged():
  assert cx.io.entropy_bits([2, 2]) == 4.0
  assert cx.io.entropy_bits([0, 5]) == 0.0
  assert cx.io.entropy_bits([]) == 0.0


# ------------------------------------------------------------ obscure errors

def test_bad_where_regex_is_a_value_error_naming_it():
  params = {"Dense_0": {"kernel": jnp.ones((2, 2))}}
  with pytest.raises(ValueError, match=r"where='\('.*regular expression"):
    cx.select(params, where="(")
  with pytest.raises(ValueError, match=r"where='\[a'"):
    cx.prune.magnitude_mask(params, 0.5, where="[a")


@pytest.mark.parametrize("bin_size", [0, -3, 2.5, True])
def test_adacomp_compress_bad_bin_size(bin_size):
  g = jnp.ones((4, 4))
  with pytest.raises(ValueError, match="bin_size"):
    cx.optim.adacomp_compress(jnp.zeros_like(g), g, bin_size)


def test_matrix_shape_of_a_scalar_shape():
  with pytest.raises(ValueError, match="matrix_shape"):
    cx.lowrank.matrix_shape(())
  assert cx.lowrank.matrix_shape((3, 4, 5)) == (12, 5)


def test_init_points_errors_name_the_leaf():
  params = {"Dense_0": {"kernel": jnp.ones((4, 4))}}
  with pytest.raises(ValueError, match=r"params\['Dense_0'\]\['kernel'\].*n_points"):
    cx.optim.init_points(params, 0)


@pytest.mark.parametrize("fn", [cx.quantize.uniform, cx.quantize.uniform_ste,
                                cx.quantize.quantize])
def test_quantize_a_tree_is_a_type_error_pointing_to_apply(fn):
  tree = {"Dense_0": {"kernel": jnp.ones((4, 4))}}
  with pytest.raises(TypeError, match=r"cx\.quantize\.apply.*cx\.map_selected"):
    fn(tree, 4)
  node = cx.quantize.quantize(jnp.ones((4, 4)), 4)
  with pytest.raises(TypeError, match=r"cx\.quantize\.apply"):
    fn(node, 4)


def test_quantize_still_takes_nested_lists():
  q = cx.quantize.uniform([[0.0, 1.0], [2.0, 3.0]], 8)
  np.testing.assert_allclose(q, jnp.array([[0.0, 1.0], [2.0, 3.0]]), atol=1e-6)
