"""Step-time overhead of the cx.optim transforms, and AdaComp's compression.

LeNet-300-100, batch 128, CPU. Every ratio is against the plain optimizer
step (SGD, momentum 0.9) timed in the same run, interleaved round by round:
the median over the rounds of the two times' ratio within a round, with its
quartiles (the machine is shared and noisy):

* gradual magnitude pruning step (mask updates every 100 steps included),
* weight-sharing step,
* DiffQ step (noisy forward, size penalty, partitioned Adam on the logits),
  through ``cx.Plan([(rule, cx.methods.DiffQ(...))])``,
* the pruning and weight-sharing steps again through a ``cx.Plan``
  (``Magnitude``, ``KMeans``): the method layer's cost over the transforms,
* AdaComp data-parallel step on 8 host devices vs the dense data-parallel
  step on the same 8 devices (and, for context, the same at batch 1024,
  where the fixed per-weight cost of the residual weighs less),

then AdaComp's measured FC compression rate and test accuracy against dense
data-parallel training for the same number of steps.

  python benchmarks/optim.py --quick        # digits, few steps
  python benchmarks/optim.py --dataset /work/shared/data/mnist.npz
"""

from __future__ import annotations

import argparse
import os
import sys

if "--xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

import compressax as cx  # noqa: E402
from experiments import distributed_adacomp as dist  # noqa: E402
from benchmarks._timing import _ratio, _timeit  # noqa: E402


def _single_device_steps(x, y, sizes):
  """Closures running one training step of each single-device variant."""
  params = dist.init_mlp(jax.random.key(0), sizes)
  loss = dist.loss_fn
  sgd = optax.sgd(0.05, momentum=0.9)
  variants = {
      "plain": sgd,
      "prune_magnitude": cx.optim.prune_magnitude(
          sgd, final_sparsity=0.9, begin_step=0, end_step=10_000,
          frequency=100),
      "weight_sharing": cx.optim.weight_sharing(sgd, bits=5),
  }
  fns = {}
  for name, tx in variants.items():
    def make(tx=tx):
      @jax.jit
      def step(p, s):
        u, s = tx.update(jax.grad(loss)(p, x, y), s, p)
        return optax.apply_updates(p, u), s
      box = [params, tx.init(params)]
      def run():
        box[0], box[1] = step(*box)
        return box[0]
      return run
    fns[name] = make()

  # The same transforms driven by the method layer: a cx.Plan over the
  # {"params", "aux"} tree (what a user of cx.methods runs).
  M = cx.methods
  big = lambda path, w: w.ndim == 2 and w.size * 4 >= 0.01 * 2**20  # DiffQ's 0.01 MB rule
  plans = {
      "plan_prune": (cx.Plan(M.Magnitude(0.9, begin_step=0, end_step=10_000,
                                         frequency=100)), loss),
      "plan_weight_sharing": (cx.Plan(M.KMeans(bits=5)), loss),
      "diffq": (cx.Plan([(big, M.DiffQ(size_penalty=1e-2, group_size=16))]),
                None),
  }
  for name, (plan, _) in plans.items():
    def make(plan=plan):
      tx = plan.optimizer(sgd)
      plan_loss = plan.loss(loss)

      @jax.jit
      def step(t, s, key):
        key, sub = jax.random.split(key)
        u, s = tx.update(jax.grad(plan_loss)(t, sub, x, y), s, t)
        return optax.apply_updates(t, u), s, key

      train = plan.init(params, jax.random.key(2))
      box = [train, tx.init(train), jax.random.key(1)]
      def run():
        box[0], box[1], box[2] = step(*box)
        return box[0]
      return run
    fns[name] = make()
  return fns


def _data_parallel_steps(x, y, sizes, n_dev, bin_size_fc):
  mesh = Mesh(np.array(jax.devices()[:n_dev]), (dist.AXIS,))
  opt = optax.sgd(0.05, momentum=0.9)
  fns = {}
  for name, comp in (("dp_dense", None),
                     ("dp_adacomp", cx.optim.adacomp(bin_size_fc=bin_size_fc,
                                                     axis_name=dist.AXIS))):
    def make(comp=comp):
      step = dist.make_step(mesh, opt, comp)
      box = list(dist.init_states(mesh, dist.init_mlp(jax.random.key(0),
                                                      sizes), opt, comp))
      def run():
        box[0], box[1], box[2], loss, _ = step(*box, x, y)
        # Synchronous steps (see dist.train): both variants pay the same.
        return jax.block_until_ready(loss)
      return run
    fns[name] = make()
  return fns


def _accuracy(dataset, train_steps, bin_size, n_seeds, n_dev):
  """Dense vs AdaComp test accuracy after the same steps, over seeds."""
  seeds = range(n_seeds)
  print(f"\naccuracy after {train_steps} steps (batch 128, {n_dev} devices, "
        f"L_T = {bin_size} for FC), seeds {list(seeds)}:")
  acc = {False: [], True: []}
  ratios, fractions = [], []
  for seed in seeds:
    for compress in (False, True):
      res = dist.train(dataset, steps=train_steps, batch=128,
                       compress=compress, bin_size_fc=bin_size, seed=seed)
      acc[compress].append(res["accuracy"])
      if compress:
        ratios.append(res["fc_ratio"])
        fractions.append(res["sent_fraction"])
    print(f"  seed {seed}: dense {acc[False][-1]:.4f}  adacomp "
          f"{acc[True][-1]:.4f}  FC compression {ratios[-1]:.1f}x", flush=True)

  def spread(v):
    return f"{np.mean(v):.4f} ({np.min(v):.4f}-{np.max(v):.4f})"
  gap = 100 * (np.mean(acc[False]) - np.mean(acc[True]))
  print(f"  dense    test acc {spread(acc[False])}")
  print(f"  adacomp  test acc {spread(acc[True])}  FC compression "
        f"{np.mean(ratios):.1f}x (sent {100 * np.mean(fractions):.2f}% of "
        f"elements; paper ~200x)")
  print(f"  accuracy gap (dense - adacomp, mean over seeds): {gap:.2f} points "
        f"(target <= 0.30: {'ok' if gap <= 0.3 else 'MISSED'})")


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--dataset", default="/work/shared/data/mnist.npz",
                  help="'digits' or the path of a Keras-layout mnist.npz")
  ap.add_argument("--quick", action="store_true",
                  help="sklearn digits, few steps")
  ap.add_argument("--steps", type=int, default=None,
                  help="training steps of the accuracy comparison")
  ap.add_argument("--bin-size-fc", type=int, default=500)
  ap.add_argument("--seeds", type=int, default=3,
                  help="seeds of the accuracy comparison (mean and range)")
  ap.add_argument("--skip-accuracy", action="store_true",
                  help="timings only")
  args = ap.parse_args()
  dataset = "digits" if args.quick else args.dataset
  n_time, rounds = (10, 5) if args.quick else (20, 21)
  train_steps = args.steps or (150 if args.quick else 2000)
  bin_size = 50 if args.quick and args.bin_size_fc == 500 else args.bin_size_fc

  (xtr, ytr), _ = dist.load(dataset)
  # Timing always uses LeNet-300-100 on 784-wide inputs (digits are padded).
  x = np.zeros((128, 784), np.float32)
  x[:, :xtr.shape[1]] = xtr[:128]
  y = ytr[:128]
  sizes = (784, 300, 100, 10)
  n_dev = len(jax.devices())
  print(f"jax {jax.__version__}, {n_dev} {jax.devices()[0].platform} devices, "
        f"dataset {dataset}, LeNet-300-100, batch 128")
  if not args.skip_accuracy:
    _accuracy(dataset, train_steps, bin_size, args.seeds, n_dev)

  t = _timeit(_single_device_steps(x, y, sizes), n_time, rounds)
  print(f"\nplain SGD step: {np.median(t['plain']) * 1e3:.2f} ms  (ratios: "
        f"median over {rounds} rounds of the paired ratio, [quartiles])")
  targets = {"prune_magnitude": 1.10, "weight_sharing": 1.30, "diffq": 1.50,
             "plan_prune": 1.10, "plan_weight_sharing": 1.30}
  for name, target in targets.items():
    r, q1, q3 = _ratio(t, name, "plain")
    print(f"  {name:20s} {np.median(t[name]) * 1e3:7.2f} ms  {r:5.2f}x "
          f"[{q1:.2f}-{q3:.2f}]  (target <= {target:.2f}x: "
          f"{'ok' if r <= target else 'MISSED'})")

  print("  (DiffQ's uniform noise: 16-bit grid, seeded counter hash; see "
        "compressax/diffq/_noise.py)")

  for b in ((128,) if args.quick else (128, 1024)):
    xb = np.zeros((b, 784), np.float32)
    xb[:, :xtr.shape[1]] = xtr[np.arange(b) % len(xtr)]
    yb = ytr[np.arange(b) % len(ytr)]
    t = _timeit(_data_parallel_steps(xb, yb, sizes, n_dev, bin_size), n_time,
                rounds)
    r, q1, q3 = _ratio(t, "dp_adacomp", "dp_dense")
    label = "" if b == 128 else "  [context only: batch 1024, no target]"
    print(f"\ndense data-parallel step ({n_dev} devices, batch {b}): "
          f"{np.median(t['dp_dense']) * 1e3:.2f} ms{label}")
    verdict = (f"(target <= 1.50x: {'ok' if r <= 1.5 else 'MISSED'})"
               if b == 128 else "")
    print(f"  adacomp          {np.median(t['dp_adacomp']) * 1e3:7.2f} ms  "
          f"{r:5.2f}x [{q1:.2f}-{q3:.2f}]  {verdict}")


if __name__ == "__main__":
  main()
