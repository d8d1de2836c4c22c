"""``--dataset tfds:NAME`` fails in seconds, in one line, where it cannot work.

TensorFlow Datasets retries a download for minutes when there is no network.
``experiments.data`` checks first: the prepared files, a connection to the
download host (one try, a short timeout) and the modules tfds needs. These
tests use a stand-in ``tensorflow_datasets`` module (CI's venv has none) and a
local socket that never answers, so they need no network.
"""

from __future__ import annotations

import socket
import sys
import time
import types

import numpy as np
import pytest

from experiments import data as data_lib


class _Builder:
  def __init__(self, prepared: bool, data_dir: str):
    self._prepared, self.data_dir = prepared, data_dir

  def is_prepared(self) -> bool:
    return self._prepared


def _fake_tfds(monkeypatch, *, prepared: bool, data_dir: str = "/nowhere/mnist/3.0.1"):
  """A stand-in tensorflow_datasets; records whether ``load`` was called."""
  calls = []
  fake = types.ModuleType("tensorflow_datasets")

  def builder(name):
    if name != "mnist":
      raise ValueError(f"DatasetNotFoundError: {name}")
    return _Builder(prepared, data_dir)

  def load(name, **kw):
    calls.append((name, kw))
    rng = np.random.default_rng(0)
    return [(rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8),
             rng.integers(0, 10, (n,), dtype=np.int64)) for n in (12, 4)]

  fake.builder, fake.load, fake.as_numpy = builder, load, lambda x: x
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
  return calls


@pytest.fixture
def silent_host(monkeypatch):
  """A local TCP port that accepts connections and never answers."""
  srv = socket.socket()
  srv.bind(("127.0.0.1", 0))
  srv.listen(8)
  monkeypatch.setattr(data_lib, "TFDS_PROBE_URL",
                      f"http://127.0.0.1:{srv.getsockname()[1]}")
  monkeypatch.setattr(data_lib, "TFDS_PROBE_TIMEOUT_S", 0.5)
  yield
  srv.close()


def test_no_data_and_no_network_fails_fast_in_one_line(monkeypatch, silent_host):
  calls = _fake_tfds(monkeypatch, prepared=False)
  monkeypatch.setattr(data_lib, "_missing_modules", lambda names: [])
  t0 = time.monotonic()
  with pytest.raises(data_lib.DatasetUnavailable) as info:
    data_lib.load_dataset("tfds:mnist")
  assert time.monotonic() - t0 < 5
  msg = str(info.value)
  assert "\n" not in msg
  for part in ("tfds:mnist", "/nowhere/mnist/3.0.1", "TFDS_DATA_DIR",
               "within 0.5 s", "npz:PATH"):
    assert part in msg, (part, msg)
  assert not calls  # the download was never tried


def test_missing_tensorflow_is_named_even_with_prepared_data(monkeypatch):
  calls = _fake_tfds(monkeypatch, prepared=True)
  monkeypatch.setattr(data_lib, "_missing_modules",
                      lambda names: [n for n in names if n == "tensorflow"])
  with pytest.raises(data_lib.DatasetUnavailable,
                     match=r"tfds:mnist needs the module\(s\) tensorflow .*compressax\[tfds\]"):
    data_lib.load_dataset("tfds:mnist")
  assert not calls


def test_prepared_data_loads(monkeypatch):
  calls = _fake_tfds(monkeypatch, prepared=True)
  monkeypatch.setattr(data_lib, "_missing_modules", lambda names: [])
  ds = data_lib.load_dataset("tfds:mnist")
  assert [c[1]["split"] for c in calls] == [["train", "test"]]
  assert ds.x_train.shape == (12, 28, 28, 1) and ds.x_test.shape == (4, 28, 28, 1)
  assert ds.x_train.dtype == np.float32 and 0 <= ds.x_train.min() <= ds.x_train.max() <= 1
  assert ds.y_train.dtype == np.int32


def test_unknown_tfds_name_is_a_value_error(monkeypatch):
  _fake_tfds(monkeypatch, prepared=True)
  with pytest.raises(ValueError, match="tfds:nope: TensorFlow Datasets has no data set"):
    data_lib.load_dataset("tfds:nope")


def test_reachable_is_one_short_try(silent_host):
  t0 = time.monotonic()
  assert not data_lib._reachable(data_lib.TFDS_PROBE_URL, 0.5)
  assert time.monotonic() - t0 < 3
  closed = socket.socket()
  closed.bind(("127.0.0.1", 0))
  port = closed.getsockname()[1]
  closed.close()
  assert not data_lib._reachable(f"http://127.0.0.1:{port}", 0.5)  # refused


def test_command_line_prints_one_line(monkeypatch, silent_host):
  from experiments import deep_compression
  _fake_tfds(monkeypatch, prepared=False)
  with pytest.raises(SystemExit) as info:
    deep_compression.main(["--dataset", "tfds:mnist", "--quiet", "--no-plot"])
  msg = str(info.value.code)
  assert msg.startswith("error: tfds:mnist needs") and "\n" not in msg, msg


def test_real_tfds_without_data_or_network_fails_fast(monkeypatch, tmp_path, silent_host):
  pytest.importorskip("tensorflow_datasets")
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  t0 = time.monotonic()
  with pytest.raises((data_lib.DatasetUnavailable, ImportError)) as info:
    data_lib.load_dataset("tfds:mnist")
  assert time.monotonic() - t0 < 30  # mostly importing tfds
  assert "\n" not in str(info.value) and "tfds:mnist" in str(info.value)
