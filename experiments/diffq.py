"""DiffQ: learned per-group bit widths vs uniform QAT (Défossez et al. 2021).

The paper's intent on an MNIST-size model (default LeNet-5):

1. **Baseline**: train the model at full precision (Adam).
2. **DiffQ**, one run per ``lambda`` in ``--lambdas``: starting from the
   baseline, fine-tune a ``cx.Plan`` of ``cx.methods.DiffQ(size_penalty=
   lambda, group_size=...)``: pseudo-quantization noise on the weights in
   the view (``cx.diffq.noisy``) and the loss ``task + lambda *
   model_size_MB`` (``plan.loss``; ``cx.diffq.model_size``); one bit logit
   per group of ``--group-size`` weights, trained by its own Adam
   (``--logit-lr``, paper: 1e-3; ``plan.optimizer``), the model by Adam
   (``--lr``). Then truly quantize (``plan.finalize``: ``cx.diffq.quantize``,
   rounded bits, ``DiffQArray`` nodes).
3. **Uniform QAT**, one run per ``--qat-bits``: the same fine-tuning with
   the forward pass on ``cx.methods.Uniform(bits)`` weights
   (``cx.quantize.uniform_ste``, one min/max range per tensor, like DiffQ's),
   then ``plan.finalize`` (``cx.quantize.quantize``).

Both methods quantize the same leaves, one rule (:func:`quantized_leaf`):
the kernels of at least 0.01 MB (DiffQ's rule; LeNet-5's 2 KB ``conv1``
kernel and all biases stay fp32).
Every run is written with ``cx.io.save`` to ``DIR/runs/*.cx`` and its test
error measured on the weights decoded from that file. ``DIR/model.cx`` (and
the top-level fields of ``results.json``) is the DiffQ model of
``--save-lambda``, by default the largest lambda (the smallest DiffQ file).
``results.json`` has a ``runs`` list (method, lambda or bits, file_bytes,
ratio, test_error, mean_bits); ``DIR/pareto.png`` plots test error against
file bytes.

The default logit rate is 0.05, not the paper's 1e-3: on the 8x8 digits
(upsampled to 28x28, 22 steps per epoch) Adam moves a logit by at most about
the learning rate per step and the bits need on the order of a thousand steps
to fall from 8 to 4, so at 1e-3 every lambda ends near 8 bits (a flat curve).
With many more steps, e.g. on MNIST, the paper's rate can be used::

  python -m experiments.diffq --dataset npz:../shared/data/mnist.npz \\
      --epochs 10 --qat-epochs 10 --logit-lr 1e-3 --lambdas 0 1e-2 1e-1 1 10

References:
  Défossez, Adi, Synnaeve, *Differentiable Model Compression via Pseudo
  Quantization Noise*, 2021. https://arxiv.org/abs/2104.09987
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np
import optax

import compressax as cx
from experiments import train as train_lib

MODULE = "experiments.diffq"


def parse_args(argv=None) -> argparse.Namespace:
  p = train_lib.experiment_parser(
      MODULE, __doc__, model="lenet5", dataset="digits", epochs=5,
      batch_size=64, lr=1e-3)
  p.add_argument("--lambdas", type=float, nargs="+",
                 default=[0.0, 1e-2, 1e-1, 1.0],
                 help="size penalties, per MB of model")
  p.add_argument("--qat-bits", type=int, nargs="*", default=[2, 4, 8],
                 help="bit widths of the uniform-QAT runs")
  p.add_argument("--qat-epochs", type=int, default=5,
                 help="fine-tuning epochs of every DiffQ and QAT run")
  p.add_argument("--group-size", type=int, default=16,
                 help="weights per bit logit (0: one per tensor)")
  p.add_argument("--logit-lr", type=float, default=0.05,
                 help="learning rate of the bit logits' own Adam (paper: 1e-3, "
                      "which needs thousands of steps; see the module doc)")
  p.add_argument("--init-bits", type=float, default=8.0,
                 help="bits every group starts from (the bit logits' init)")
  p.add_argument("--b-min", type=float, default=2.0,
                 help="fewest bits a group can learn")
  p.add_argument("--b-max", type=float, default=15.0,
                 help="most bits a group can learn")
  p.add_argument("--noise", choices=("uniform", "gaussian"), default="uniform",
                 help="distribution of the pseudo-quantization noise")
  p.add_argument("--save-lambda", type=float, default=None,
                 help="lambda whose DiffQ model is DIR/model.cx (default: "
                      "the largest of --lambdas)")
  p.add_argument("--no-plot", action="store_true",
                 help="do not write the PNG plot")
  args = p.parse_args(argv)
  args.argv = list(sys.argv[1:] if argv is None else argv)
  if any(lam < 0 for lam in args.lambdas):
    p.error(f"--lambdas must be >= 0, got {args.lambdas}")
  if any(not 1 <= b <= 16 for b in args.qat_bits):
    p.error(f"--qat-bits must lie in [1, 16], got {args.qat_bits}")
  if args.group_size < 0:
    p.error("--group-size must be >= 0")
  if not 1 <= args.b_min < args.init_bits < args.b_max <= 15:
    p.error("need 1 <= --b-min < --init-bits < --b-max <= 15")
  if args.save_lambda is None:
    args.save_lambda = max(args.lambdas)
  if args.save_lambda not in args.lambdas:
    p.error(f"--save-lambda {args.save_lambda} is not one of --lambdas "
            f"{args.lambdas}")
  if args.out is None:
    args.out = train_lib.default_out("diffq", args)
  return args


def _log(args, msg):
  if not args.quiet:
    print(msg, flush=True)


# DiffQ's rule: kernels under 0.01 MB (2^20 bytes) at fp32 stay float.
MIN_SIZE_MB = 0.01


def quantized_leaf(path: str, leaf) -> bool:
  """The leaves both methods quantize: kernels of at least 0.01 MB at fp32."""
  return cx.default_rule(path, leaf) and leaf.size * 4 >= MIN_SIZE_MB * 2 ** 20


def _task_loss(model):
  def task(params, x, y):
    return train_lib.cross_entropy(model.apply(params, x, train=False), y)
  return task


def diffq_method(lam: float, args) -> cx.methods.DiffQ:
  """DiffQ at size penalty ``lam`` with the flags' settings, given once."""
  return cx.methods.DiffQ(
      size_penalty=lam, group_size=args.group_size, init_bits=args.init_bits,
      b_min=args.b_min, b_max=args.b_max, noise=args.noise,
      logit_learning_rate=args.logit_lr)


def bit_logits(plan: cx.Plan, train) -> dict:
  """The ``cx.diffq`` logits tree of a DiffQ plan's tree: ``cx.SKIP`` where float."""
  _, treedef = jax.tree_util.tree_flatten(train["params"],
                                          is_leaf=cx.is_compressed)
  aux = treedef.flatten_up_to(train["aux"])
  return treedef.unflatten([a if cx.is_skip(a) else a["logits"] for a in aux])


def run_diffq(model, params, ds, lam: float, args):
  """Fine-tune with noise and a size penalty; return the quantized tree."""
  plan = cx.Plan([(quantized_leaf, diffq_method(lam, args))])
  objective = plan.loss(_task_loss(model))
  train, _, _ = train_lib.fit(
      model, plan.init(params), plan.optimizer(optax.adam(args.lr)), ds,
      epochs=args.qat_epochs, batch_size=args.batch_size, seed=args.seed + 1,
      quiet=True, eval_every_epoch=False,
      loss_fn=lambda t, x, y, key: objective(t, key, x, y))
  return plan.finalize(train), bit_logits(plan, train)


def run_qat(model, params, ds, bits: int, args):
  """Fine-tune on uniform STE-quantized weights; return the quantized tree."""
  plan = cx.Plan([(quantized_leaf, cx.methods.Uniform(bits))])
  task = _task_loss(model)

  def loss_fn(t, x, y, key):
    del key
    return task(plan.view(t), x, y)

  train, _, _ = train_lib.fit(
      model, plan.init(params), plan.optimizer(optax.adam(args.lr)), ds,
      epochs=args.qat_epochs, batch_size=args.batch_size, seed=args.seed + 1,
      quiet=True, eval_every_epoch=False, loss_fn=loss_fn)
  return plan.finalize(train)


def mean_bits(tree) -> float:
  """Average stored bits per weight over the quantized leaves."""
  total = count = 0
  for leaf in jax.tree_util.tree_leaves(tree, is_leaf=cx.is_compressed):
    if isinstance(leaf, cx.diffq.DiffQArray):
      g = leaf.group_size or leaf.size
      sizes = np.minimum(g, leaf.size - g * np.arange(leaf.bits.shape[0]))
      total += float(np.sum(sizes * np.asarray(leaf.bits, np.int64)))
      count += leaf.size
    elif isinstance(leaf, cx.quantize.QuantizedArray):
      total += float(leaf.bits) * leaf.size
      count += leaf.size
  return total / max(count, 1)


def plot_pareto(path: str, runs: list[dict], baseline: float, title: str,
                series=(("diffq", "lambda"), ("qat", "bits")), *,
                y: str = "test_error", ylabel: str = "test error (decoded file)"
                ) -> None:
  """PNG of ``run[y]`` against file bytes, one line per ``(method, tag key)``."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for method, key in series:
    pts = sorted((r["file_bytes"], r[y], r[key]) for r in runs
                 if r["method"] == method)
    if not pts:
      continue
    xs, ys, tags = zip(*pts)
    ax.plot(xs, ys, marker="o", label=method)
    for px, py, t in pts:
      ax.annotate(f"{'λ' if key == 'lambda' else 'bits'}={t:g}", (px, py), fontsize=7,
                  textcoords="offset points", xytext=(3, 3))
  ax.axhline(baseline, color="gray", ls="--", label="fp32 baseline")
  ax.set_xscale("log")
  ax.set_xlabel("file bytes (model.cx)")
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def table(runs: list[dict], baseline: float, dense: int) -> str:
  lines = [f"{'method':<6} {'setting':>12} {'mean_bits':>9} {'file_bytes':>10} "
           f"{'ratio':>6} {'error':>7}",
           f"{'fp32':<6} {'':>12} {32:>9.2f} {dense:>10d} {1:>6.2f} "
           f"{baseline:>7.4f}"]
  for r in runs:
    setting = (f"lambda={r['lambda']:g}" if r["method"] == "diffq"
               else f"bits={r['bits']}")
    lines.append(f"{r['method']:<6} {setting:>12} {r['mean_bits']:>9.2f} "
                 f"{r['file_bytes']:>10d} {r['ratio']:>6.2f} "
                 f"{r['test_error']:>7.4f}")
  return "\n".join(lines)


def main(argv=None) -> dict:
  args = parse_args(argv)
  start = time.time()
  model, ds, params = train_lib.setup(args)
  _log(args, f"DiffQ vs uniform QAT: {args.model} on {args.dataset}, lambdas "
             f"{args.lambdas}, QAT bits {args.qat_bits}")
  params, _, _ = train_lib.fit(
      model, params, optax.adam(args.lr), ds, epochs=args.epochs,
      batch_size=args.batch_size, seed=args.seed, quiet=args.quiet,
      desc="baseline", eval_every_epoch=False)
  baseline = train_lib.evaluate(model, params, ds.x_test, ds.y_test,
                                args.eval_batch_size)
  _log(args, f"  baseline {args.model} fp32: test error {baseline:.4f}")

  runs, saved_tree = [], None
  settings = [("diffq", lam) for lam in args.lambdas] + \
             [("qat", b) for b in args.qat_bits]
  with train_lib.progress(len(settings), "runs", args.quiet) as bar:
    for method, value in settings:
      if method == "diffq":
        tree, logits = run_diffq(model, params, ds, value, args)
        entry = {"method": "diffq", "lambda": value,
                 "model_size_mb": float(cx.diffq.model_size(
                     params, logits, group_size=args.group_size,
                     b_min=args.b_min, b_max=args.b_max, exact=True))}
        name = f"diffq-lambda{value:g}.cx"
        if value == args.save_lambda:
          saved_tree = tree
      else:
        tree = run_qat(model, params, ds, value, args)
        entry = {"method": "qat", "bits": value}
        name = f"qat-{value}bit.cx"
      run = train_lib.saved_run(os.path.join(args.out, "runs", name), tree, model, ds, args)
      entry.update(mean_bits=mean_bits(tree), **run)
      runs.append(entry)
      bar.update(1)
      bar.set_postfix(method=method, value=value, err=run["test_error"])

  plot = None
  if not args.no_plot:
    os.makedirs(args.out, exist_ok=True)
    plot = os.path.join(args.out, "pareto.png")
    plot_pareto(plot, runs, baseline, f"DiffQ vs QAT: {args.model} on {args.dataset}")
  results = train_lib.write_results(
      args.out, saved_tree, model=model, ds=ds, args=args,
      baseline_test_error=baseline, start_time=start, module=MODULE,
      extra={"experiment": "diffq", "method": "diffq",
             "lambda": args.save_lambda,
             "saved": f"diffq at lambda {args.save_lambda:g}",
             "mean_bits": mean_bits(saved_tree),
             "group_size": args.group_size, "logit_lr": args.logit_lr,
             "init_bits": args.init_bits, "noise": args.noise,
             "epochs": {"baseline": args.epochs, "finetune": args.qat_epochs},
             "runs": runs, "plot": plot})
  print(table(runs, baseline, results["dense_fp32_bytes"]))
  print(f"wrote {results['file']} (DiffQ at lambda {args.save_lambda:g}: "
        f"{results['file_bytes']} bytes, {results['ratio']:.2f}x smaller than "
        f"fp32, {results['mean_bits']:.2f} bits per quantized weight; test "
        f"error {results['test_error']:.4f}, fp32 {baseline:.4f})")
  if plot:
    print(f"wrote {plot}")
  print(f"wrote {os.path.join(args.out, 'results.json')}")
  return results


if __name__ == "__main__":
  main(sys.argv[1:])
