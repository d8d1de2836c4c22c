"""Pruning benchmark: global magnitude masking at scale, and a vmapped sparsity sweep.

Run ``python benchmarks/prune_lowrank.py`` (``--quick`` for a smoke-size run).

(1) Global magnitude masking of a float32 pytree (default 10 leaves x 10M =
    100M weights) with ``cx.prune.magnitude_mask(..., scope="global")``, jitted,
    timed after a warm-up. Each variant runs in a fresh subprocess and reports
    its peak resident memory above the memory held just before the call, as a
    multiple of the params' own size. The baseline is the same exact mask
    found with a full sort of all |w| (the method the library uses for
    small trees, and ``method="sort"``); the library switches to a 32-step
    bisection on the float bit pattern for large trees.
(2) A sweep of 32 sparsity levels on LeNet-300-100 (random weights and
    inputs): mask, prune and evaluate the loss, as one jitted ``jax.vmap``
    call vs 32 calls of the same jitted function.
(3) One layer-scope mask of LeNet-300-100 (jitted), threshold by sort vs by
    bisection (``magnitude_mask(method=...)``): why ``cx.optim.prune_magnitude``
    bisects, while (2) under ``vmap`` keeps the default sort.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np


def _rss_bytes(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
  # Writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS.
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def child(n_leaves: int, leaf_size: int, method: str, sparsity: float, repeats: int):
  """Runs in a fresh process; prints one JSON line."""
  import jax
  import jax.numpy as jnp

  import compressax as cx

  rng = np.random.default_rng(0)
  cols = 5000
  params = {}
  for i in range(n_leaves):
    host = rng.standard_normal((leaf_size // cols, cols), dtype=np.float32)
    params[f"layer_{i}"] = {"kernel": jnp.asarray(host)}
    del host
  jax.block_until_ready(params)
  param_bytes = n_leaves * leaf_size * 4
  f = jax.jit(lambda p: cx.prune.magnitude_mask(p, sparsity, scope="global",
                                               method=method))
  ma = f.lower(params).compile().memory_analysis()
  xla_extra = (ma.temp_size_in_bytes + ma.output_size_in_bytes) if ma else -1
  mask = jax.block_until_ready(f(params))  # compile + warm-up
  kept = sum(int(m.sum()) for m in jax.tree.leaves(mask))
  del mask
  times, peaks = [], []
  for _ in range(repeats):
    base = _rss_bytes("VmRSS")
    exact_peak = _reset_peak()
    t0 = time.perf_counter()
    mask = jax.block_until_ready(f(params))
    times.append(time.perf_counter() - t0)
    peaks.append(_rss_bytes("VmHWM") - base)
    del mask
  n = n_leaves * leaf_size
  print(json.dumps(dict(seconds=min(times), peak_extra=max(peaks), param_bytes=param_bytes,
                        kept=kept, expected=n - int(np.floor(sparsity * n)),
                        exact_peak=exact_peak, xla_extra=xla_extra)))


def run_child(args, method):
  cmd = [sys.executable, __file__, "--child", method, "--leaves", str(args.leaves),
         "--leaf-size", str(args.leaf_size), "--repeats", str(args.repeats)]
  out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  return json.loads(out.stdout.strip().splitlines()[-1])


def global_masking(args):
  n = args.leaves * args.leaf_size
  print(f"(1) global magnitude mask, sparsity 0.9, {args.leaves} leaves x "
        f"{args.leaf_size:,} float32 = {n / 1e6:.0f}M weights "
        f"({n * 4 / 2**20:.0f} MiB), CPU, jitted, best of {args.repeats} after warm-up")
  print("    memory: peak RSS (VmHWM, reset via /proc/self/clear_refs) minus RSS just "
        "before the call, in a fresh subprocess per variant; XLA CPU buffers are host "
        "memory so RSS sees them (jax memory_stats() is None on CPU); pages freed by the "
        "warm-up run may be reused, so the XLA plan's temp+output bytes are printed too")
  res = {m: run_child(args, m) for m in ("bisect", "sort")}
  for m, r in res.items():
    extra = r["peak_extra"] / r["param_bytes"]
    label = "library (bisection)" if m == "bisect" else "baseline (full sort)"
    print(f"    {label:22s} {r['seconds']:7.2f} s   peak extra {extra:4.2f}x params, "
          f"total with params {1 + extra:4.2f}x (XLA plan: temp+output "
          f"{r['xla_extra'] / r['param_bytes']:4.2f}x)   kept {r['kept']:,} "
          f"(exact: {r['kept'] == r['expected']})"
          + ("" if r["exact_peak"] else "   [peak not resettable: upper bound]"))
  print(f"    speed-up bisection vs sort: {res['sort']['seconds'] / res['bisect']['seconds']:.2f}x;"
        f" memory ratio sort/bisection: "
        f"{res['sort']['peak_extra'] / max(res['bisect']['peak_extra'], 1):.2f}x")


def sweep(args):
  import jax
  import jax.numpy as jnp

  import compressax as cx

  sizes = (784, 300, 100, 10)
  keys = jax.random.split(jax.random.key(0), 5)
  params = {f"Dense_{i}": {"kernel": jax.random.normal(keys[i], (a, b)) / np.sqrt(a),
                           "bias": jnp.zeros(b)}
            for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))}
  x = jax.random.normal(keys[3], (args.batch, 784))
  y = jax.random.randint(keys[4], (args.batch,), 0, 10)

  # params and data are arguments, not closed-over constants, so XLA cannot
  # constant-fold the sort of |w| at compile time.
  def loss_at(s, params, x, y):
    p = cx.prune.apply_mask(params, cx.prune.magnitude_mask(params, s, scope=args.scope))
    h = x
    for i in range(3):
      h = h @ p[f"Dense_{i}"]["kernel"] + p[f"Dense_{i}"]["bias"]
      h = jax.nn.relu(h) if i < 2 else h
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(h), y[:, None], axis=1))

  sps = jnp.linspace(0.0, 0.97, 32, dtype=jnp.float32)
  one = jax.jit(loss_at)
  batched = jax.jit(jax.vmap(loss_at, in_axes=(0, None, None, None)))
  jax.block_until_ready(batched(sps, params, x, y))
  jax.block_until_ready(one(sps[0], params, x, y))

  def best(fn):
    ts = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      ts.append(time.perf_counter() - t0)
    return min(ts)

  sps_list = list(sps)  # slicing outside the timed loop
  t_vmap = best(lambda: batched(sps, params, x, y))
  t_loop = best(lambda: [one(s, params, x, y) for s in sps_list])
  same = np.allclose(np.asarray(batched(sps, params, x, y)),
                     np.asarray([one(s, params, x, y) for s in sps_list]), rtol=1e-5)
  print(f"(2) LeNet-300-100 ({sum(a * b for a, b in zip(sizes[:-1], sizes[1:])):,} weights), "
        f"{args.scope} magnitude mask + prune + loss on {args.batch} inputs, 32 sparsities, "
        f"best of {args.repeats}")
  print(f"    one jitted vmap call {t_vmap * 1e3:8.1f} ms   32 jitted calls {t_loop * 1e3:8.1f} ms"
        f"   ratio loop/vmap {t_loop / t_vmap:.2f}x   same losses: {same}")


def small_threshold(args):
  import jax

  import compressax as cx

  sizes = (784, 300, 100, 10)
  keys = jax.random.split(jax.random.key(1), 3)
  params = {f"Dense_{i}": {"kernel": jax.random.normal(keys[i], (a, b))}
            for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))}
  times, masks = {}, {}
  for method in ("sort", "bisect"):
    fn = jax.jit(lambda p, s, m=method: cx.prune.magnitude_mask(
        p, s, scope="layer", method=m))
    masks[method] = jax.block_until_ready(fn(params, 0.9))
    ts = []
    for _ in range(max(args.repeats, 5)):
      t0 = time.perf_counter()
      for _ in range(10):
        out = fn(params, 0.9)
      jax.block_until_ready(out)
      ts.append((time.perf_counter() - t0) / 10)
    times[method] = min(ts)
  same = all(np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(masks["sort"]), jax.tree.leaves(masks["bisect"])))
  print("(3) one layer-scope mask of LeNet-300-100 (266,200 weights), jitted, best of "
        f"{max(args.repeats, 5)}x10 calls")
  print(f"    sort {times['sort'] * 1e3:7.2f} ms   bisection {times['bisect'] * 1e3:7.2f} ms"
        f"   sort/bisection {times['sort'] / times['bisect']:.2f}x   same masks: {same}")


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="smoke-size run")
  ap.add_argument("--leaves", type=int, default=10)
  ap.add_argument("--leaf-size", type=int, default=10_000_000)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--batch", type=int, default=256)
  ap.add_argument("--scope", default="layer", choices=["layer", "global"])
  ap.add_argument("--child", choices=["bisect", "sort"], help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.child:
    child(args.leaves, args.leaf_size, args.child, 0.9, args.repeats)
    return
  if args.quick:
    args.leaf_size, args.repeats, args.batch = 1_000_000, 2, 64
  global_masking(args)
  sweep(args)
  small_threshold(args)


if __name__ == "__main__":
  main()
