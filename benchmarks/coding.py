"""Entropy coding and file I/O benchmark for compressax.io.

1. Coding efficiency: a 1M-element leaf of 5-bit codes (k-means codes of
   Gaussian weights, Deep Compression style, and a discretized Laplace).
   Encoded bits / empirical entropy for canonical Huffman and ANS (tables
   included; target <= 1.01), against raw 5-bit packing and zlib/lzma of the
   packed codes, all measured in this run. Encode/decode throughput in MB/s of
   input symbols (one byte per symbol).
2. Files: save/load time of a 100M-parameter 4-bit tree (10 leaves of 10M
   uint8 codes plus per-row float32 scales in a toy QuantizedArray-like node),
   against np.save of the same tree as dense float32. Peak memory is measured
   two ways and reported relative to the dense float32 tree (4 bytes/param):
   tracemalloc (every NumPy allocation is traced) and the process's peak RSS
   (VmHWM, reset through /proc/self/clear_refs before each step), the latter
   also counting JAX buffers made when `load` materializes.
3. A Deep Compression LeNet-300-100-like file (MaskedArray of 6-bit
   CodebookArray at 8%/9%/26% kept): bytes per mask for the raw-size index
   width in C order vs the coded-size width vs the best scan order, manifest
   JSON vs zlib, and the file's ratio vs dense float32.

Run: python benchmarks/coding.py [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import lzma
import os
import tempfile
import time
import tracemalloc
import zlib

import jax
import jax.numpy as jnp
import numpy as np

import compressax as cx
from compressax import io


def kmeans_codes(n, bits, rng):
  """Deep Compression weight sharing: 1-D k-means, linear init, on N(0, 1)."""
  w = rng.normal(size=n).astype(np.float64)
  c = np.linspace(w.min(), w.max(), 1 << bits)
  for _ in range(15):
    codes = np.searchsorted((c[1:] + c[:-1]) / 2, w)
    sums = np.bincount(codes, weights=w, minlength=c.size)
    cnt = np.bincount(codes, minlength=c.size)
    c = np.where(cnt > 0, sums / np.maximum(cnt, 1), c)
  return np.searchsorted((c[1:] + c[:-1]) / 2, w).astype(np.uint8)


def laplace_codes(n, bits, rng):
  half = 1 << (bits - 1)
  return np.clip(np.round(rng.laplace(0, 3.0, n)) + half, 0, 2 * half - 1).astype(np.uint8)


def best_time(fn, repeat=3):
  best, out = float("inf"), None
  for _ in range(repeat):
    t = time.perf_counter()
    out = fn()
    best = min(best, time.perf_counter() - t)
  return best, out


def coding(n, quick):
  rng = np.random.default_rng(0)
  print(f"== 1. entropy coding of {n:,} 5-bit codes ==")
  print(f"{'distribution':<12} {'H b/sym':>8} {'coder':<8} {'bits/H':>7} "
        f"{'enc MB/s':>9} {'dec MB/s':>9}")
  mb = n / 1e6
  for name, make in [("k-means", kmeans_codes), ("laplace", laplace_codes)]:
    x = make(n, 5, rng)
    counts = np.bincount(x, minlength=32)
    h = io.entropy_bits(counts)
    rows = []
    te, packed = best_time(lambda: io.pack_bits(x, 5))
    td, _ = best_time(lambda: io.unpack_bits(packed, 5, n))
    rows.append(("raw 5b", 8 * packed.size, te, td))
    lengths = io.huffman_code_lengths(counts)
    te, (stream, bb) = best_time(lambda: io.huffman_encode(x, lengths))
    td, y = best_time(lambda: io.huffman_decode(stream, lengths, bb, n))
    assert np.array_equal(y, x)
    rec, pay = io.encode_symbols(x, 5)  # best-of, as save() stores it
    table = len(io.pack_bits(lengths, 5)) + len(io.pack_bits(bb, int(bb.max()).bit_length()))
    rows.append(("huffman", 8 * (stream.size + table), te, td))
    q = np.where(counts > 0, np.maximum(1, np.rint(counts * (65536 / n))), 0).astype(np.int64)
    te, words = best_time(lambda: io.ans_encode(x, q))
    td, y = best_time(lambda: io.ans_decode(words, q, n))
    assert np.array_equal(y, x)
    rows.append(("ans", 8 * (4 * words.size + len(io.pack_bits(q, int(q.max()).bit_length()))), te, td))
    te, z = best_time(lambda: zlib.compress(packed.tobytes(), 9), 1)
    td, _ = best_time(lambda: zlib.decompress(z), 1)
    rows.append(("zlib-9", 8 * len(z), te, td))
    if not quick:
      te, z = best_time(lambda: lzma.compress(packed.tobytes()), 1)
      td, _ = best_time(lambda: lzma.decompress(z), 1)
      rows.append(("lzma", 8 * len(z), te, td))
    for coder, nbits, te, td in rows:
      print(f"{name:<12} {h / n:8.4f} {coder:<8} {nbits / h:7.4f} {mb / te:9.1f} "
            f"{mb / td:9.1f}")
    print(f"{name:<12} save() picks {rec['coder']}: {8 * len(pay) / h:.4f} x entropy, "
          f"{8 * len(pay) / n:.3f} bits/weight (vs 5 raw)")


@cx.compressed_leaf
@dataclasses.dataclass(frozen=True)
class BenchQuantized(cx.CompressedLeaf):
  """codes * scale per row (a stand-in for cx.quantize.QuantizedArray)."""
  codes: jax.Array
  scale: jax.Array
  shape: tuple = dataclasses.field(metadata=dict(static=True))
  dtype: np.dtype = dataclasses.field(metadata=dict(static=True))

  def materialize(self):
    c = jnp.asarray(self.codes).astype(jnp.float32) - 7.5
    return (c * jnp.asarray(self.scale)).astype(self.dtype)


def _rss_reset():
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def _rss(field):
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field):
        return int(line.split()[1]) * 1024
  return 0


def measured(fn):
  """(seconds, result, tracemalloc peak bytes, RSS peak increase bytes)."""
  ok = _rss_reset()
  rss0 = _rss("VmRSS:")
  tracemalloc.start()
  tracemalloc.reset_peak()
  t = time.perf_counter()
  out = fn()
  dt = time.perf_counter() - t
  _, peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  rss_peak = _rss("VmHWM:") - rss0 if ok else float("nan")
  return dt, out, peak, rss_peak


def files(leaves, per_leaf):
  rows, cols = 1000, per_leaf // 1000
  params = leaves * per_leaf
  dense_bytes = 4 * params
  print(f"\n== 2. save/load of a {params / 1e6:.0f}M-parameter 4-bit tree "
        f"({leaves} leaves of {rows}x{cols} uint8 codes + per-row scales) ==")
  rng = np.random.default_rng(1)
  tree = {}
  for i in range(leaves):
    w = rng.normal(size=(rows, cols)).astype(np.float32)
    scale = (np.abs(w).max(axis=1, keepdims=True) / 7.5).astype(np.float32)
    codes = np.clip(np.round(w / scale + 7.5), 0, 15).astype(np.uint8)
    tree[f"layer_{i}"] = {"kernel": BenchQuantized(codes, scale, (rows, cols),
                                                   np.dtype(np.float32))}
    del w
  d = tempfile.mkdtemp()
  path = os.path.join(d, "model.cx")
  res = {}
  res["save"] = measured(lambda: io.save(path, tree))
  dt, _, peak, rss = measured(lambda: io.load(path, keep_compressed=True))
  res["load (keep_compressed)"] = (dt, None, peak, rss)
  dt, loaded, peak, rss = measured(lambda: io.load(path))
  res["load (materialize)"] = (dt, None, peak, rss)
  ok = all(np.array_equal(loaded[k]["kernel"], np.asarray(v["kernel"].materialize()))
           for k, v in tree.items())
  del loaded  # free the dense copy before the baseline
  dense = {k: np.asarray(v["kernel"].materialize()) for k, v in tree.items()}
  npz = os.path.join(d, "dense.npz")
  base_save = measured(lambda: np.savez(npz, **dense))  # noqa: F821 (called now)
  del dense
  base_load = measured(lambda: dict(np.load(npz)))
  size = os.path.getsize(path)
  print(f"file {size / 1e6:.1f} MB vs dense float32 {dense_bytes / 1e6:.0f} MB "
        f"({dense_bytes / size:.2f}x; np.savez file {os.path.getsize(npz) / 1e6:.0f} MB); "
        f"materialized load bit-exact: {ok}")
  print(f"{'step':<26} {'seconds':>8} {'MB/s dense':>10} {'peak NumPy':>11} {'peak RSS':>9}"
        "   (peaks as a fraction of the dense float32 tree)")
  for name, (dt, _, peak, rss) in list(res.items()) + [
      ("baseline np.savez fp32", base_save), ("baseline np.load fp32", base_load)]:
    print(f"{name:<26} {dt:8.2f} {dense_bytes / 1e6 / dt:10.0f} "
          f"{peak / dense_bytes:11.2f} {rss / dense_bytes:9.2f}")
  print("(load (materialize) builds the dense float32 tree through JAX: its RSS peak "
        "includes that output, which tracemalloc does not see)")
  print(io.size_report(path).__str__().splitlines()[-1])
  for f in os.listdir(d):
    os.remove(os.path.join(d, f))
  os.rmdir(d)


def lenet_tree(rng, bits=6):
  """LeNet-300-100-like pruned, weight-shared tree (Deep Compression Table 1).

  Magnitude-pruned Gaussian weights at 8%/9%/26% kept, ``bits``-bit k-means
  codes of the kept weights, dense float32 biases.
  """
  tree = {}
  for name, (fan_in, fan_out, keep) in {
      "ip1": (784, 300, 0.08), "ip2": (300, 100, 0.09), "ip3": (100, 10, 0.26)}.items():
    w = rng.normal(size=(fan_in, fan_out)) / np.sqrt(fan_in)
    mask = np.abs(w) >= np.quantile(np.abs(w), 1 - keep)
    kept = w[mask]
    c = np.linspace(kept.min(), kept.max(), 1 << bits)  # linear init, 1-D k-means
    for _ in range(20):
      codes = np.searchsorted((c[1:] + c[:-1]) / 2, kept)
      cnt = np.bincount(codes, minlength=c.size)
      c = np.where(cnt > 0, np.bincount(codes, kept, c.size) / np.maximum(cnt, 1), c)
    full = np.zeros(w.shape, np.uint8)
    full[mask] = np.searchsorted((c[1:] + c[:-1]) / 2, kept)
    value = cx.quantize.CodebookArray(full, c.astype(np.float32), w.shape,
                                      np.dtype(np.float32))
    tree[name] = {"kernel": cx.prune.MaskedArray(value, mask, w.shape,
                                                 np.dtype(np.float32)),
                  "bias": (0.01 * rng.normal(size=fan_out)).astype(np.float32)}
  return tree


def deep_compression_file():
  """Where the bytes of a LeNet-300-100 file go, and what each coding choice saves.

  Baselines measured in this run: the mask coded in C order with the width
  chosen by raw size (``best_index_bits``, or a bitmap if smaller) and the
  manifest as plain JSON.
  """
  import json
  print("\n== 3. Deep Compression LeNet-300-100-like file (6-bit codes) ==")
  tree = lenet_tree(np.random.default_rng(2))
  blob = b"".join(io._format._encode(tree))
  report = io.size_report(tree)
  manifest, _ = io._format.parse(blob, "mem")
  plain = len(json.dumps(manifest, separators=(",", ":")).encode())
  print(f"{'layer':<6} {'kept':>6} {'mask C/raw-rule':>15} {'C/coded':>8} "
        f"{'chosen':>7} {'order':>6} {'bits/kept':>9}")
  saved = 0
  for name in ("ip1", "ip2", "ip3"):
    mask = np.asarray(tree[name]["kernel"].mask)
    flat = mask.reshape(-1)
    old = _old_mask_nbytes(flat)
    c_only = len(io._codec.encode_mask([flat])[2])
    k, _, pay = io._codec.encode_mask([flat, mask.T.reshape(-1)])
    saved += old - len(pay)
    print(f"{name:<6} {int(mask.sum()):>6} {old:>15,} {c_only:>8,} {len(pay):>7,} "
          f"{'C' if k == 0 else 'F':>6} {8 * len(pay) / mask.sum():9.2f}")
  stored = report.overhead_bytes - 24
  saved += plain - stored
  dense = report.dense_fp32_bytes
  print(f"manifest: {plain:,} B JSON -> {stored:,} B zlib-9")
  print(f"file: {report.file_bytes:,} B = {report.ratio:.1f}x vs dense float32 "
        f"({dense:,} B); with the baselines' mask and manifest coding "
        f"{report.file_bytes + saved:,} B = {dense / (report.file_bytes + saved):.1f}x")


def _old_mask_nbytes(flat):
  b, _ = io.best_index_bits(flat)
  rel = io.encode_symbols(io.relative_index_encode(flat, b), b)[1]
  return min(len(rel), len(io.encode_symbols(flat.astype(np.uint8), 1)[1]))


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="small smoke-size run")
  args = ap.parse_args()
  coding(100_000 if args.quick else 1_000_000, args.quick)
  if args.quick:
    files(10, 1_000_000)
  else:
    files(10, 10_000_000)
  deep_compression_file()


if __name__ == "__main__":
  main()
