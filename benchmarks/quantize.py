"""Cost of quantization-aware training and of k-means weight sharing.

1. Per-step time of a jitted LeNet-300-100 (Dense 784-300-100-10, ReLU)
   SGD step, batch 128, on CPU, with every kernel fake-quantized by
   ``cx.quantize.uniform_ste`` (4 and 8 bits), as a ratio to the plain step
   measured in the same run. Qwix's quantized training (``qwix.QtProvider``,
   int8/int4 weight rules on the same linen model) is measured alongside when
   qwix is installed (a benchmark-only dependency: ``pip install qwix``).
2. ``cx.quantize.kmeans`` on 10M float32 weights into 256 clusters against
   scikit-learn's ``KMeans`` (n_init=1), timing and inertia.

Run ``python benchmarks/quantize.py`` (``--quick`` for a smoke-size run,
``--only kmeans`` or ``--only qat`` for one section, ``--sklearn-full`` to fit
scikit-learn's KMeans on all 10M points instead of a 1M subsample).
Timings are medians over many steps after warm-up, interleaved across
variants so that load on a shared machine hits all of them alike.
"""

from __future__ import annotations

import argparse
import functools
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import compressax as cx  # noqa: E402


class LeNet300100(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(300)(x))
    x = nn.relu(nn.Dense(100)(x))
    return nn.Dense(10)(x)


def make_step(apply_fn, params_fn, opt):
  """A jitted SGD step; ``params_fn`` maps the float params to the used ones."""

  def loss(params, x, y):
    logits = apply_fn(params_fn(params), x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(params, opt_state, x, y):
    value, grads = jax.value_and_grad(loss)(params, x, y)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  return step


def time_steps(variants, params, opt_state, x, y, *, warmup, rounds, per_round):
  """Per-step seconds of each variant: ``{name: [round][step]}``.

  Variants take turns, ``per_round`` steps each, so that a burst of load on a
  shared machine lands on all of them alike.
  """
  state = {}
  for name, step in variants.items():
    p, s = params, opt_state
    for _ in range(warmup):
      p, s, v = step(p, s, x, y)
    jax.block_until_ready(v)
    state[name] = (p, s)
  times = {name: np.zeros((rounds, per_round)) for name in variants}
  for r in range(rounds):
    for name, step in variants.items():
      p, s = state[name]
      for i in range(per_round):
        t0 = time.perf_counter()
        p, s, v = step(p, s, x, y)
        jax.block_until_ready((p, v))
        times[name][r, i] = time.perf_counter() - t0
      state[name] = (p, s)
  return times


def qwix_variants(model, opt):
  try:
    import qwix  # pylint: disable=import-outside-toplevel
  except ImportError:
    print("  qwix: not installed (pip install qwix); skipping its rows")
    return {}
  out = {}
  for bits, qtype in ((8, jnp.int8), (4, jnp.int4)):
    rule = qwix.QtRule(module_path=".*", weight_qtype=qtype)
    qmodel = qwix.quantize_model(model, qwix.QtProvider([rule]))
    out[f"qwix QT int{bits} (absmax, per channel)"] = make_step(
        qmodel.apply, lambda p: p, opt)
  return out


def bench_qat(quick: bool):
  print("== QAT step, LeNet-300-100, batch 128, SGD, CPU ==")
  model = LeNet300100()
  kx, ky, kp = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (128, 784))
  y = jax.random.randint(ky, (128,), 0, 10)
  params = model.init(kp, x[:1])
  opt = optax.sgd(0.01)
  opt_state = opt.init(params)

  def fq(bits, **kw):
    quantizer = functools.partial(cx.quantize.uniform_ste, bits=bits, **kw)
    return lambda p: cx.quantize.apply(p, quantizer)

  variants = {"plain": make_step(model.apply, lambda p: p, opt)}
  for bits in (8, 4):
    variants[f"cx uniform_ste {bits}b (affine, per tensor)"] = make_step(
        model.apply, fq(bits), opt)
    variants[f"cx uniform_ste {bits}b (symmetric, per channel)"] = make_step(
        model.apply, fq(bits, symmetric=True, axis=-1), opt)
  variants.update(qwix_variants(model, opt))

  if quick:
    kw = dict(warmup=3, rounds=3, per_round=5)
  else:
    kw = dict(warmup=50, rounds=100, per_round=20)
  times = time_steps(variants, params, opt_state, x, y, **kw)
  print(f"  {kw['rounds']} interleaved rounds of {kw['per_round']} steps per "
        f"variant after {kw['warmup']} warm-up steps; ratio = median over "
        "rounds of (round median / plain's round median)")
  base = np.median(times["plain"], axis=1)
  for name, t in times.items():
    ratio = np.median(np.median(t, axis=1) / base)
    print(f"  {name:44s} {np.median(t) * 1e6:9.1f} us/step   {ratio:5.3f}x plain")


def inertia_1d(x, centroids):
  """Sum of squared distances to the nearest centroid (float64, 1-D)."""
  c = np.sort(np.asarray(centroids, np.float64))
  mids = (c[:-1] + c[1:]) / 2
  idx = np.searchsorted(mids, x)
  return float(np.sum((x - c[idx]) ** 2))


def bench_kmeans(quick: bool, sklearn_full: bool = False):
  n, k = (200_000, 256) if quick else (10_000_000, 256)
  print(f"== k-means: {n:,} float32 weights into {k} clusters ==")
  try:
    kmeans = cx.quantize.kmeans
  except AttributeError:
    print("  cx.quantize.kmeans is not available yet; skipping")
    return
  # Gaussian weights with 5% of them three times wider: heavy-ish tails.
  w = jax.random.normal(jax.random.key(1), (n,), jnp.float32)
  wide = jax.random.uniform(jax.random.key(2), (n,)) < 0.05
  w = w * (1 + 2 * wide.astype(jnp.float32))
  w64 = np.asarray(w, np.float64)
  # (init, max iters, tol): Deep Compression's default start with a fixed
  # iteration count, and the MSE-oriented starts run to convergence.
  configs = [("linear", 30, 0.0), ("companding", 300, 1e-6),
             ("kmeans++", 300, 1e-6)]
  key = jax.random.key(0)
  results = {}
  for init, iters, tol in configs:
    run = functools.partial(kmeans, init=init, iters=iters, tol=tol, key=key)
    jax.block_until_ready(run(w, k))  # compile
    t0 = time.perf_counter()
    cents, codes = jax.block_until_ready(run(w, k))
    t = time.perf_counter() - t0
    results[init] = (t, inertia_1d(w64, cents))
    used = len(np.unique(np.asarray(codes)))
    print(f"  cx.quantize.kmeans (init={init!r}, iters<={iters}, tol={tol:g}): "
          f"{t:7.2f} s, inertia {results[init][1]:.6g}, {used} clusters used")
  try:
    from sklearn.cluster import KMeans  # pylint: disable=import-outside-toplevel
  except ImportError:
    print("  scikit-learn not installed; skipping its row")
    return
  # scikit-learn's Lloyd costs O(N K) per iteration (no 1-D shortcut), so on
  # 10M points it is fitted on a 1M random subsample (unless --sklearn-full;
  # about 200 s on 2 cores); its centroids are then scored on all points.
  sub = n if sklearn_full else min(n, 1_000_000)
  rng = np.random.default_rng(0)
  sample = w64 if sub == n else rng.choice(w64, sub, replace=False)
  note = "full data" if sub == n else f"fit on a {sub:,}-point random subsample"
  t0 = time.perf_counter()
  km = KMeans(k, n_init=1, random_state=0).fit(
      sample.reshape(-1, 1).astype(np.float32))
  t_sk = time.perf_counter() - t0
  in_sk = inertia_1d(w64, km.cluster_centers_.ravel())
  print(f"  sklearn KMeans (k-means++, n_init=1, default max_iter=300/tol, {note}, "
        f"{km.n_iter_} iters): {t_sk:7.2f} s, inertia on all {n:,} points {in_sk:.6g}")
  for init, (t_cx, in_cx) in results.items():
    print(f"  init={init!r}: time ratio cx/sklearn {t_cx / t_sk:.4f}x, "
          f"inertia ratio cx/sklearn {in_cx / in_sk:.4f}")
  if sub < n:
    # Like for like on the subsample scikit-learn saw: both fitted on it.
    c_sub, _ = kmeans(jnp.asarray(sample, jnp.float32), k, init="companding",
                      iters=300, tol=1e-6)
    in_cx_sub = inertia_1d(sample, c_sub)
    in_sk_sub = inertia_1d(sample, km.cluster_centers_.ravel())
    print(f"  on the {sub:,}-point subsample itself: inertia ratio "
          f"cx(companding)/sklearn {in_cx_sub / in_sk_sub:.4f}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="smoke-size run")
  parser.add_argument("--only", choices=("qat", "kmeans"),
                      help="run one section only")
  parser.add_argument("--sklearn-full", action="store_true",
                      help="fit scikit-learn's KMeans on all points (slow)")
  args = parser.parse_args()
  print(f"jax {jax.__version__}, devices {jax.devices()}")
  if args.only in (None, "qat"):
    bench_qat(args.quick)
  if args.only in (None, "kmeans"):
    bench_kmeans(args.quick, args.sklearn_full)


if __name__ == "__main__":
  main()
