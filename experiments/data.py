"""Image classification data sets for the experiments, behind one interface.

``load_dataset(spec)`` returns a :class:`Dataset` of NumPy arrays: images as
float32 NHWC in [0, 1] (``x / 255`` for 8-bit images, ``x / 16`` for the
scikit-learn digits; no other normalization) and int32 labels. Specs:

* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images),
  split deterministically into 80% train / 20% test, stratified by class with
  a fixed seed. Needs no download, so it is the default for smoke runs.
* ``npz:PATH``: a Keras-layout ``.npz`` with ``x_train, y_train, x_test,
  y_test`` (e.g. MNIST's ``mnist.npz``); images ``(N, H, W)`` or
  ``(N, H, W, C)``, uint8 in [0, 255] or float in [0, 1].
* ``tfds:NAME``: a TensorFlow Datasets data set with ``train``/``test`` splits
  (needs ``pip install 'compressax[tfds]'``: tensorflow-datasets and the
  TensorFlow it reads with, and either the prepared files in
  ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``, or a network to download
  them; without them it fails in seconds with a :class:`DatasetUnavailable`
  saying what is missing).

:func:`batches` yields ``jax.Array`` minibatches in a seeded shuffled order.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator, NamedTuple

import jax.numpy as jnp
import numpy as np

__all__ = ["Dataset", "DatasetUnavailable", "load_dataset", "load_or_exit",
           "batches", "upsample_digits", "fit_to_shape"]

_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


class Dataset(NamedTuple):
  """Train and test splits: float32 NHWC images in [0, 1], int32 labels."""
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int
  image_shape: tuple[int, int, int]


def load_dataset(spec: str) -> Dataset:
  """Load a data set by spec: ``digits``, ``npz:PATH`` or ``tfds:NAME``.

  Args:
    spec: which data set (see the module docstring).

  Returns:
    A :class:`Dataset`.

  Raises:
    FileNotFoundError: if an ``npz:`` file does not exist.
    ValueError: if the spec is unknown or the file's contents are malformed
      (the message names the file and what was expected).
    ImportError: for ``tfds:`` when tensorflow-datasets is not installed.
    DatasetUnavailable: for ``tfds:`` when TensorFlow, or both the prepared
      files and a network, are missing (checked in seconds, before loading).
  """
  if spec == "digits":
    return _load_digits()
  if spec.startswith("npz:"):
    return _load_npz(spec[len("npz:"):])
  if spec.startswith("tfds:"):
    return _load_tfds(spec[len("tfds:"):])
  raise ValueError(f"unknown dataset spec {spec!r}; expected 'digits', "
                   "'npz:PATH' or 'tfds:NAME'")


def _as_images(x: np.ndarray, scale: float, where: str) -> np.ndarray:
  """``(N, H, W[, C])`` -> float32 NHWC in [0, 1]."""
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4:
    raise ValueError(f"{where}: expected images of shape (N, H, W) or "
                     f"(N, H, W, C), got shape {x.shape}")
  return (x.astype(np.float32) / np.float32(scale)).astype(np.float32)


def _as_labels(y: np.ndarray, n: int, where: str) -> np.ndarray:
  y = np.asarray(y)
  if y.ndim == 2 and y.shape[1] == 1:
    y = y[:, 0]
  if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"{where}: expected {n} integer labels of shape ({n},), "
                     f"got dtype {y.dtype} shape {y.shape}")
  if n and y.min() < 0:
    raise ValueError(f"{where}: labels must be >= 0, got min {y.min()}")
  return y.astype(np.int32)


def _make(x_train, y_train, x_test, y_test, where: str) -> Dataset:
  if x_train.shape[1:] != x_test.shape[1:]:
    raise ValueError(f"{where}: train images {x_train.shape[1:]} and test "
                     f"images {x_test.shape[1:]} differ in shape")
  num_classes = int(max(y_train.max(initial=0), y_test.max(initial=0))) + 1
  return Dataset(x_train, y_train, x_test, y_test, num_classes,
                 tuple(int(d) for d in x_train.shape[1:]))


def _load_digits() -> Dataset:
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split
  bunch = load_digits()
  x = bunch.images.astype(np.float32)[..., None] / np.float32(16.0)
  y = bunch.target.astype(np.int32)
  x_tr, x_te, y_tr, y_te = train_test_split(
      x, y, test_size=DIGITS_TEST_FRACTION, stratify=y,
      random_state=DIGITS_SPLIT_SEED)
  return _make(x_tr.astype(np.float32), y_tr, x_te.astype(np.float32), y_te,
               "digits")


def _load_npz(path: str) -> Dataset:
  expected = (f"a Keras-layout .npz with arrays {', '.join(_NPZ_KEYS)} "
              "(images (N, H, W[, C]) uint8 or float in [0, 1], integer labels)")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"dataset file {path!r} not found; expected {expected}")
  try:
    f = np.load(path, allow_pickle=False)
  except Exception as e:  # zipfile.BadZipFile, OSError, the pickle refusal
    raise ValueError(f"{path}: cannot be read as .npz ({type(e).__name__}: {e}); "
                     f"expected {expected}") from e
  if not isinstance(f, np.lib.npyio.NpzFile):
    raise ValueError(f"{path}: holds a single .npy array, not an archive; "
                     f"expected {expected}")
  with f:
    missing = [k for k in _NPZ_KEYS if k not in f.files]
    if missing:
      raise ValueError(f"{path}: missing array(s) {missing} (has {f.files}); "
                       f"expected {expected}")
    arrays = {k: f[k] for k in _NPZ_KEYS}
  out = []
  for split in ("train", "test"):
    x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
    where = f"{path}: x_{split}"
    if np.issubdtype(x.dtype, np.integer):
      scale = 255.0
    elif np.issubdtype(x.dtype, np.floating):
      scale = 1.0
    else:
      raise ValueError(f"{where}: expected uint8 or float images, got {x.dtype}")
    images = _as_images(x, scale, where)
    if images.size and (images.min() < 0 or images.max() > 1):
      raise ValueError(f"{where}: pixel values outside [0, {scale:g}]")
    out += [images, _as_labels(y, images.shape[0], f"{path}: y_{split}")]
  return _make(*out, path)


class DatasetUnavailable(RuntimeError):
  """A data set that cannot be had here; the message says what it needs."""


# TFDS prepares a data set by downloading it (its own mirror and most sources
# are on this host) and reads it with TensorFlow. Both are checked up front, so
# that a machine without them fails in seconds with one line, instead of
# retrying the download for minutes.
TFDS_PROBE_URL = "https://storage.googleapis.com"
TFDS_PROBE_TIMEOUT_S = 5.0
TFDS_MODULES = ("tensorflow", "importlib_resources")  # tfds imports both lazily


def _reachable(url: str, timeout: float) -> bool:
  """Whether ``url`` answers at all within ``timeout`` seconds (no retries)."""
  import urllib.error
  import urllib.request
  try:
    urllib.request.urlopen(urllib.request.Request(url, method="HEAD"),
                           timeout=timeout).close()
  except urllib.error.HTTPError:
    return True  # an HTTP answer, even an error status: the host is there
  except (OSError, ValueError):
    return False
  return True


@contextlib.contextmanager
def _quiet(logger: str):
  """Only errors from ``logger`` inside the block."""
  log = logging.getLogger(logger)
  level = log.level
  log.setLevel(logging.ERROR)
  try:
    yield
  finally:
    log.setLevel(level)


def _missing_modules(names) -> list[str]:
  import importlib.util
  return [m for m in names if importlib.util.find_spec(m) is None]


def _load_tfds(name: str) -> Dataset:
  where = f"tfds:{name}"
  alternatives = "or use --dataset npz:PATH or digits"
  extra = ("the tfds extra: `pip install 'compressax[tfds]'`, in a checkout "
           "`pip install -e '.[tfds]'`")
  try:
    import tensorflow_datasets as tfds  # heavy and optional: import lazily
  except ImportError as e:
    raise ImportError(f"{where} needs tensorflow-datasets ({e}): {extra}; "
                      f"{alternatives}") from e
  try:
    with _quiet("absl"):  # not tfds' "Variant folder ... has no dataset_info.json"
      builder = tfds.builder(name)  # data dir: $TFDS_DATA_DIR or ~/tensorflow_datasets
      prepared = builder.is_prepared()
  except ModuleNotFoundError as e:
    raise ImportError(f"{where}: tensorflow-datasets needs the module "
                      f"{e.name!r}: {extra}") from e
  except ValueError as e:  # tfds' DatasetNotFoundError
    raise ValueError(f"{where}: TensorFlow Datasets has no data set {name!r} "
                     f"({type(e).__name__})") from None
  needs = []
  missing = _missing_modules(TFDS_MODULES)
  if missing:
    needs.append(f"the module(s) {', '.join(missing)} ({extra})")
  if not prepared and not _reachable(TFDS_PROBE_URL,
                                                  TFDS_PROBE_TIMEOUT_S):
    needs.append(f"its prepared files in {builder.data_dir} (set "
                 f"TFDS_DATA_DIR) or a connection to {TFDS_PROBE_URL} to "
                 f"download them (none within {TFDS_PROBE_TIMEOUT_S:g} s)")
  if needs:
    raise DatasetUnavailable(f"{where} needs {' and '.join(needs)}; "
                             f"{alternatives}")
  splits = tfds.as_numpy(tfds.load(name, split=["train", "test"], batch_size=-1,
                                   as_supervised=True))
  out = []
  for split, (x, y) in zip(("train", "test"), splits):
    where = f"tfds:{name}[{split}]"
    scale = 255.0 if np.issubdtype(x.dtype, np.integer) else 1.0
    images = _as_images(np.asarray(x), scale, where)
    out += [images, _as_labels(np.asarray(y), images.shape[0], where)]
  return _make(*out, f"tfds:{name}")


def load_or_exit(spec: str) -> Dataset:
  """:func:`load_dataset` for a command line: a data set that cannot be had
  ends the program with one line (``error: --dataset SPEC: ...``), no traceback.
  """
  try:
    return load_dataset(spec)
  except (DatasetUnavailable, OSError, ImportError, ValueError) as e:
    msg = str(e) if str(e).startswith(spec) else f"--dataset {spec}: {e}"
    raise SystemExit(f"error: {msg}") from None


def upsample_digits(x: np.ndarray) -> np.ndarray:
  """8x8 digits -> 28x28: nearest-neighbour 3x upsampling, then 2 pixels of pad.

  LeNet-5's two VALID 5x5 convolutions and 2x2 pools need at least 16x16
  inputs and its published parameter count (431,080) assumes 28x28, so the
  digits are brought to MNIST's geometry (a 24x24 digit in a 28x28 frame, as
  MNIST centres a 20x20 digit with margins).
  """
  if x.shape[1:3] != (8, 8):
    raise ValueError(f"upsample_digits expects (N, 8, 8, C) images, got {x.shape}")
  up = np.repeat(np.repeat(x, 3, axis=1), 3, axis=2)
  return np.pad(up, ((0, 0), (2, 2), (2, 2), (0, 0)))


def fit_to_shape(ds: Dataset, image_shape: tuple[int, int, int] | None) -> Dataset:
  """Bring ``ds`` to a model's required input shape (None: any shape).

  Only the 8x8 -> 28x28 digits upsampling (:func:`upsample_digits`) is
  supported; any other mismatch is an error.
  """
  if image_shape is None or tuple(ds.image_shape) == tuple(image_shape):
    return ds
  if ds.image_shape[:2] == (8, 8) and tuple(image_shape[:2]) == (28, 28) \
      and ds.image_shape[2] == image_shape[2]:
    return ds._replace(x_train=upsample_digits(ds.x_train),
                       x_test=upsample_digits(ds.x_test),
                       image_shape=tuple(image_shape))
  raise ValueError(f"the model needs {tuple(image_shape)} images, the data set "
                   f"has {ds.image_shape}")


def batches(x: np.ndarray, y: np.ndarray, batch_size: int, *, seed: int | None = 0,
            drop_remainder: bool = True) -> Iterator[tuple[jnp.ndarray, jnp.ndarray]]:
  """Minibatches ``(x, y)`` as ``jax.Array``, in a seeded shuffled order.

  Args:
    x: images, leading axis the examples.
    y: labels, same length.
    batch_size: examples per batch (clipped to the data set size).
    seed: shuffle seed (the same seed gives the same order); None: no shuffle.
    drop_remainder: drop the last incomplete batch (keeps shapes static so
      the jitted step compiles once).

  Yields:
    ``(x_batch, y_batch)`` pairs.
  """
  n = len(x)
  if len(y) != n:
    raise ValueError(f"x has {n} examples but y has {len(y)}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  batch_size = min(batch_size, n)
  order = np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)
  stop = n - n % batch_size if drop_remainder else n
  for i in range(0, stop, batch_size):
    idx = order[i:i + batch_size]
    yield jnp.asarray(x[idx]), jnp.asarray(y[idx])
