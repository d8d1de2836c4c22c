"""Low-rank compression with BSR rank selection (Eo, Kang, Rhee 2021).

Compares, at the same parameter budget, per-layer ranks found by BSR's beam
search (``cx.lowrank.bsr_ranks``) with one uniform rank fraction for every
layer (``cx.lowrank.ranks_for_ratio``):

1. **Baseline**: train the model (default LeNet-300-100) at full precision.
2. For each budget in ``--budgets`` (the fraction of the factorized kernels'
   parameters kept, ``sum_l r_l (m_l + n_l) <= budget * sum_l m_l n_l``) and
   each method, choose the ranks (``{path: rank}``), make them the rules of
   a ``cx.Plan`` (``{path: cx.methods.LowRank(rank=r)}``): ``plan.init``
   **factorizes** the kernels by truncated SVD (``cx.lowrank.factorize``)
   into trained side state ``u, v``, and the factors are **fine-tuned** with
   ``plan.optimizer`` under ``plan.loss``: the forward pass sees ``u @ v``,
   so the gradients reach the factors and the model is trained in factored
   form (biases train too).
3. ``plan.finalize`` gives ``cx.lowrank.LowRankArray`` kernels; each
   fine-tuned model is written with ``cx.io.save`` to
   ``DIR/runs/METHOD-BUDGET.cx`` and its test error measured on the weights
   decoded from that file.

``DIR/model.cx`` (and the top-level fields of ``results.json``) is the BSR
model at ``--save-budget``, by default the smallest budget (the most
compressed point). ``results.json`` has a ``runs`` list with one entry per
(method, budget); ``DIR/error_vs_budget.png`` plots test error against the
budget, one line per method.

BSR's beam search needs an objective: ``--bsr-objective loss`` (default)
scores an allocation by the cross-entropy of the factorized model on a fixed
subset of the *training* set (never the test set); ``proxy`` uses the
size-weighted discarded singular-value energy (``cx.lowrank.proxy_loss``).
BSR's modified-stable-rank regularizer is not used here.

Run ``python -m experiments.lowrank`` (digits, about a minute on CPU), or on MNIST::

  python -m experiments.lowrank --dataset npz:../shared/data/mnist.npz \\
      --epochs 20 --finetune-epochs 5

References:
  Eo, Kang, Rhee, *A Highly Effective Low-Rank Compression of Deep Neural
  Networks with Modified Beam-Search and Modified Stable Rank*, 2021.
  https://arxiv.org/abs/2111.15179
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import compressax as cx
from experiments import train as train_lib

MODULE = "experiments.lowrank"
METHODS = ("bsr", "uniform")


def parse_args(argv=None) -> argparse.Namespace:
  p = train_lib.experiment_parser(
      MODULE, __doc__, model="lenet300", dataset="digits", epochs=10,
      batch_size=64, lr=0.05)
  p.add_argument("--budgets", type=float, nargs="+",
                 default=[0.1, 0.2, 0.3, 0.4, 0.5],
                 help="parameter budgets of the factorized kernels, in (0, 1]")
  p.add_argument("--save-budget", type=float, default=None,
                 help="budget whose BSR model is DIR/model.cx (default: the "
                      "smallest of --budgets)")
  p.add_argument("--finetune-epochs", type=int, default=3,
                 help="epochs of fine-tuning the factors at each budget")
  p.add_argument("--finetune-lr", type=float, default=0.01,
                 help="learning rate of the factor fine-tuning")
  p.add_argument("--beam-width", type=int, default=4,
                 help="rank assignments kept per step of the BSR beam search")
  p.add_argument("--grid", type=int, default=16,
                 help="rank levels per layer in the beam search")
  p.add_argument("--bsr-objective", choices=("loss", "proxy"), default="loss",
                 help="beam-search score: train-subset loss or SVD energy")
  p.add_argument("--bsr-examples", type=int, default=1000,
                 help="training examples scored by --bsr-objective loss")
  p.add_argument("--no-plot", action="store_true",
                 help="do not write the PNG plot")
  args = p.parse_args(argv)
  args.argv = list(sys.argv[1:] if argv is None else argv)
  if any(not 0 < b <= 1 for b in args.budgets):
    p.error(f"--budgets must lie in (0, 1], got {args.budgets}")
  if args.save_budget is None:
    args.save_budget = min(args.budgets)
  if args.save_budget not in args.budgets:
    p.error(f"--save-budget {args.save_budget} is not one of --budgets "
            f"{args.budgets}")
  if args.finetune_epochs < 0 or args.epochs < 0:
    p.error("epochs must be >= 0")
  if args.out is None:
    args.out = train_lib.default_out("lowrank", args)
  return args


def _log(args, msg):
  if not args.quiet:
    print(msg, flush=True)


def _bsr_eval_fn(model, ds, args):
  """Beam-search objective: cross-entropy on a fixed training subset."""
  n = min(args.bsr_examples, len(ds.x_train))
  idx = np.random.default_rng(args.seed).permutation(len(ds.x_train))[:n]
  x, y = jnp.asarray(ds.x_train[idx]), jnp.asarray(ds.y_train[idx])
  # Dense shapes do not depend on the ranks, so this compiles once.
  loss = jax.jit(lambda p: train_lib.cross_entropy(model.apply(p, x), y))
  return lambda params_lr: float(loss(cx.materialize(params_lr)))


def choose_ranks(method: str, params, budget: float, args, eval_fn=None):
  """``{path: rank}`` meeting ``budget`` by BSR beam search or uniformly."""
  if method == "uniform":
    return cx.lowrank.ranks_for_ratio(params, budget)
  return cx.lowrank.bsr_ranks(params, budget, beam_width=args.beam_width,
                              eval_fn=eval_fn, grid=args.grid)


def rank_plan(ranks: dict) -> cx.Plan:
  """``cx.Plan`` with one ``cx.methods.LowRank(rank=r)`` rule per ``{path: r}``.

  A rule's pattern is a regex searched in the path, so each path is anchored
  (``params/Dense_1/kernel`` must not take ``params/Dense_10/kernel``).
  """
  return cx.Plan({f"^{re.escape(path)}$": cx.methods.LowRank(rank=int(r))
                  for path, r in ranks.items()})


def finetune(model, plan: cx.Plan, params, ds, args):
  """``plan.init`` (SVD factors), then fine-tune the factors and biases.

  Returns ``(plan.finalize(train), test error before fine-tuning)``.
  """
  train = plan.init(params)
  # Dense weights: the evaluation program compiles once for all runs.
  before = train_lib.evaluate(model, plan.view(train), ds.x_test, ds.y_test,
                              args.eval_batch_size)
  steps = train_lib.steps_per_epoch(ds, args.batch_size)
  tx = plan.optimizer(train_lib.sgd(args.finetune_lr,
                                    decay_steps=args.finetune_epochs * steps))

  def task(view, x, y, key):
    logits = model.apply(view, x, train=True, rngs={"dropout": key})
    return train_lib.cross_entropy(logits, y)

  loss = plan.loss(task)
  train, _, _ = train_lib.fit(
      model, train, tx, ds, epochs=args.finetune_epochs,
      batch_size=args.batch_size, seed=args.seed + 1, quiet=True,
      eval_every_epoch=False,
      loss_fn=lambda t, x, y, key: loss(t, key, x, y, key))
  return plan.finalize(train), before


def kept_fraction(ranks: dict, params) -> float:
  """``sum r (m + n) / sum m n`` over the factorized leaves."""
  kept = dense = 0
  for keypath, leaf in cx.selected_leaves(params):
    m, n = cx.lowrank.matrix_shape(leaf.shape)
    kept += ranks[cx.path_str(keypath)] * (m + n)
    dense += m * n
  return kept / dense


def plot_budgets(path: str, runs: list[dict], baseline: float, title: str) -> None:
  """PNG of test error against budget, one line per method."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for method in METHODS:
    pts = sorted((r["budget"], r["test_error"]) for r in runs
                 if r["method"] == method)
    if pts:
      ax.plot(*zip(*pts), marker="o", label=method)
  ax.axhline(baseline, color="gray", ls="--", label="fp32 baseline")
  ax.set_xlabel("parameter budget of the factorized kernels")
  ax.set_ylabel("test error (decoded file)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def table(runs: list[dict], baseline: float) -> str:
  lines = [f"{'method':<8} {'budget':>6} {'kept':>6} {'file_bytes':>10} "
           f"{'ratio':>6} {'error':>7}  ranks",
           f"{'fp32':<8} {'':>6} {'':>6} {'':>10} {'1.0':>6} {baseline:>7.4f}"]
  for r in runs:
    lines.append(f"{r['method']:<8} {r['budget']:>6.2f} {r['kept_fraction']:>6.3f} "
                 f"{r['file_bytes']:>10d} {r['ratio']:>6.2f} "
                 f"{r['test_error']:>7.4f}  "
                 + " ".join(str(v) for v in r["ranks"].values()))
  return "\n".join(lines)


def main(argv=None) -> dict:
  args = parse_args(argv)
  start = time.time()
  model, ds, params = train_lib.setup(args)
  _log(args, f"Low-rank (BSR vs uniform rank): {args.model} on {args.dataset}, "
             f"budgets {args.budgets}")
  params, baseline = train_lib.train_baseline(model, params, ds, args)
  _log(args, f"  baseline {args.model} fp32: test error {baseline:.4f}")

  eval_fn = (_bsr_eval_fn(model, ds, args) if args.bsr_objective == "loss"
             else None)
  runs, saved_tree = [], None
  settings = [(b, m) for b in args.budgets for m in METHODS]
  with train_lib.progress(len(settings), "budgets", args.quiet) as bar:
    for budget, method in settings:
      ranks = choose_ranks(method, params, budget, args, eval_fn)
      tree, before = finetune(model, rank_plan(ranks), params, ds, args)
      run = train_lib.saved_run(
          os.path.join(args.out, "runs", f"{method}-{budget:g}.cx"),
          tree, model, ds, args)
      runs.append({"method": method, "budget": budget, "ranks": ranks,
                   "kept_fraction": kept_fraction(ranks, params),
                   "test_error_before_finetune": before, **run})
      if method == "bsr" and budget == args.save_budget:
        saved_tree = tree
      bar.update(1)
      bar.set_postfix(method=method, budget=budget, err=run["test_error"])

  plot = None
  if not args.no_plot:
    os.makedirs(args.out, exist_ok=True)
    plot = os.path.join(args.out, "error_vs_budget.png")
    plot_budgets(plot, runs, baseline, f"Low-rank {args.model} on {args.dataset}")
  results = train_lib.write_results(
      args.out, saved_tree, model=model, ds=ds, args=args,
      baseline_test_error=baseline, start_time=start, module=MODULE,
      extra={"experiment": "lowrank", "method": "bsr",
             "budget": args.save_budget, "budgets": args.budgets,
             "saved": f"bsr at budget {args.save_budget:g}",
             "epochs": {"baseline": args.epochs,
                        "finetune": args.finetune_epochs},
             "bsr": {"objective": args.bsr_objective,
                     "beam_width": args.beam_width, "grid": args.grid},
             "runs": runs, "plot": plot})
  print(table(runs, baseline))
  print(f"wrote {results['file']} (BSR at budget {args.save_budget:g}: "
        f"{results['file_bytes']} bytes, {results['ratio']:.2f}x smaller than "
        f"fp32; test error {results['test_error']:.4f}, fp32 {baseline:.4f})")
  if plot:
    print(f"wrote {plot}")
  print(f"wrote {os.path.join(args.out, 'results.json')}")
  return results


if __name__ == "__main__":
  main(sys.argv[1:])
