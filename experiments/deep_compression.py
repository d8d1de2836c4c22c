"""Deep Compression (Han, Mao, Dally 2016) on LeNet-300-100 and LeNet-5.

The three-stage pipeline, every stage through compressax's public API:

1. **Baseline**: train the dense model (SGD, Nesterov momentum 0.9).
2. **Pruning**: a ``cx.Plan`` of ``cx.methods.Magnitude`` per layer (rules
   ``{"ip1": Magnitude(0.92), ...}`` from the paper's kept fractions) for each
   of ``--prune-iters`` rounds of prune-then-retrain: the round's Magnitude
   prunes at its first step and holds the mask while the model retrains, so
   pruned weights stay exactly zero.
3. **Trained quantization**: a ``cx.Plan`` of ``cx.methods.KMeans(bits,
   pruned=True)`` per layer: 1-D k-means of the kept weights only (linear
   init, as in the paper), then centroid fine-tuning through
   ``cx.optim.weight_sharing`` (each centroid's gradient the sum over its
   cluster) with the zeros held.
4. **Entropy coding**: ``plan.finalize`` gives ``MaskedArray(CodebookArray)``
   nodes and ``cx.save`` writes them with relative-index position coding and
   Huffman/ANS coding of codes and gaps.

The reported ``test_error`` is measured on the weights decoded from the
written file (see :mod:`experiments.train`).

Beyond the paper, for smaller files at the same error: ``--keep`` and
``--bits`` set kept fractions and bit widths per layer regex;
``--share-init`` picks the k-means init per layer (a ``KMeans`` rule per
layer); ``--distill-alpha`` retrains (pruning and centroid stages) against
the dense baseline's logits with ``cx.distill.polino_loss``; ``--bias-bits``
stores the biases as ``cx.quantize`` codes instead of float32.

Run ``python -m experiments.deep_compression`` (LeNet-300-100 on the bundled
digits, about a minute) or, for the paper's MNIST numbers::

  python -m experiments.deep_compression --model lenet300 \\
      --dataset npz:../shared/data/mnist.npz --epochs 20 --prune-epochs 30 \\
      --share-epochs 10

Paper (MNIST): LeNet-300-100 1.64% -> 1.58% error at 40x (1070 KB -> 27 KB);
LeNet-5 0.80% -> 0.74% at 39x (1720 KB -> 44 KB).

References:
  Han, Mao, Dally, *Deep Compression: Compressing Deep Neural Networks with
  Pruning, Trained Quantization and Huffman Coding*, ICLR 2016.
  https://arxiv.org/abs/1510.00149
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

import jax
import numpy as np
import optax

import compressax as cx
from experiments import train as train_lib

MODULE = "experiments.deep_compression"

# Kept fraction per layer (Han et al. 2016, Tables 2 and 3).
KEEP = {
    "lenet300": {"ip1": 0.08, "ip2": 0.09, "ip3": 0.26},
    "lenet5": {"conv1": 0.66, "conv2": 0.12, "ip1": 0.08, "ip2": 0.19},
    "teacher_mlp": {"ip1": 0.08, "ip2": 0.09, "ip3": 0.26},
}
# Bits per shared weight: 6 for LeNet-300-100, 8 conv / 5 FC for LeNet-5.
BITS = {
    "lenet300": {"ip": 6},
    "lenet5": {"conv": 8, "ip": 5},
    "teacher_mlp": {"ip": 6},
}


def _parse_layer_map(text: str, cast, flag: str) -> dict:
  """``"ip1=0.08,ip2=0.09"`` -> ``{"ip1": 0.08, "ip2": 0.09}``."""
  out = {}
  for item in filter(None, (s.strip() for s in text.split(","))):
    name, sep, value = item.partition("=")
    if not sep or not name:
      raise argparse.ArgumentTypeError(
          f"{flag}: expected LAYER=VALUE[,LAYER=VALUE...], got {item!r}")
    try:
      out[name.strip()] = cast(value)
    except ValueError:
      raise argparse.ArgumentTypeError(
          f"{flag}: bad value {value!r} for layer {name!r}") from None
  return out


def parse_args(argv=None, *, module: str = MODULE, doc: str = __doc__,
               experiment: str = "deep_compression",
               add_arguments=None) -> argparse.Namespace:
  """The pipeline's flags; ``add_arguments(parser)`` adds an experiment's own."""
  p = train_lib.experiment_parser(
      module, doc, model="lenet300", dataset="digits", epochs=15,
      batch_size=64, lr=0.05)
  p.add_argument("--keep", default=None,
                 help="kept fraction per layer, e.g. 'ip1=0.08,ip2=0.09,ip3=0.26' "
                      "(layer names are path regexes; default: the paper's)")
  p.add_argument("--bits", default=None,
                 help="bits per shared weight by layer regex, e.g. 'conv=8,ip=5' "
                      "(default: the paper's)")
  p.add_argument("--prune-iters", type=int, default=3,
                 help="prune-retrain rounds to reach the kept fractions")
  p.add_argument("--prune-epochs", type=int, default=15,
                 help="retraining epochs in total over the pruning rounds")
  p.add_argument("--prune-lr", type=float, default=0.01,
                 help="learning rate of the retraining after each pruning round")
  p.add_argument("--share-epochs", type=int, default=5,
                 help="centroid fine-tuning epochs")
  p.add_argument("--share-init", default="linear",
                 help="k-means init of weight sharing: linear (the paper's), "
                      "density or companding, or per layer regex, e.g. "
                      "'ip1=companding,ip=linear' (first match wins)")
  p.add_argument("--share-lr", type=float, default=3e-4,
                 help="centroid learning rate (gradients are cluster sums)")
  p.add_argument("--weight-decay", type=float, default=5e-4,
                 help="L2 weight decay of the baseline and pruning stages")
  p.add_argument("--distill-alpha", type=float, default=0.0,
                 help="retrain the pruned and shared model against the dense "
                      "baseline's logits: loss = alpha * KD + (1 - alpha) * CE "
                      "(cx.distill.polino_loss; 0, the paper: plain CE)")
  p.add_argument("--distill-temperature", type=float, default=4.0,
                 help="softmax temperature of --distill-alpha")
  p.add_argument("--bias-bits", type=int, default=0,
                 help="store the unpruned leaves (biases) as affine uniform "
                      "codes of this many bits (cx.quantize.quantize); 0, the "
                      "paper: float32")
  p.add_argument("--constant-lr", action="store_true",
                 help="no cosine decay of the learning rate within a stage")
  p.add_argument("--no-plot", action="store_true",
                 help="do not write the PNG plot")
  if add_arguments is not None:
    add_arguments(p)
  args = p.parse_args(argv)
  args.argv = list(sys.argv[1:] if argv is None else argv)
  args.keep = (_parse_layer_map(args.keep, float, "--keep") if args.keep
               else KEEP[args.model])
  args.bits = (_parse_layer_map(args.bits, int, "--bits") if args.bits
               else BITS[args.model])
  inits = ("linear", "density", "companding")
  if "=" in args.share_init:
    args.share_init = _parse_layer_map(args.share_init, str, "--share-init")
    bad = {k: v for k, v in args.share_init.items() if v not in inits}
  else:
    bad = {} if args.share_init in inits else {"": args.share_init}
  if bad:
    p.error(f"--share-init: unknown init {bad}; choose from {inits}")
  for name, k in args.keep.items():
    if not 0.0 < k <= 1.0:
      p.error(f"--keep: kept fraction of {name!r} must be in (0, 1], got {k}")
  if args.prune_iters < 1:
    p.error("--prune-iters must be >= 1")
  if not 0.0 <= args.distill_alpha <= 1.0:
    p.error(f"--distill-alpha must be in [0, 1], got {args.distill_alpha}")
  if args.distill_temperature <= 0:
    p.error(f"--distill-temperature must be > 0, got {args.distill_temperature}")
  if not (args.bias_bits == 0 or 2 <= args.bias_bits <= 16):
    p.error(f"--bias-bits must be 0 (float32) or in [2, 16], got {args.bias_bits}")
  if args.out is None:
    args.out = train_lib.default_out(experiment, args)
  return args


def _sgd(args, ds, lr, epochs, weight_decay=0.0):
  """SGD (Nesterov 0.9), cosine-decayed over the stage's ``epochs``."""
  steps = epochs * train_lib.steps_per_epoch(ds, args.batch_size)
  return train_lib.sgd(lr, weight_decay=weight_decay,
                       decay_steps=None if args.constant_lr else steps)


def _by_layer(table: dict, flag: str):
  """``(path, leaf) -> value`` from the first matching layer regex."""
  compiled = [(re.compile(k), v) for k, v in table.items()]

  def fn(path, leaf):
    for rx, b in compiled:
      if rx.search(path):
        return b
    raise ValueError(f"{path}: no {flag} entry matches this layer "
                     f"(have {list(table)})")
  return fn


def distill_loss(model, teacher_params, args):
  """The retraining loss against the dense baseline (None: plain CE).

  ``cx.distill.polino_loss`` of the student's logits and the frozen
  teacher's (the trained dense baseline of this run), averaged over the batch.
  """
  if not args.distill_alpha:
    return None
  teacher = jax.lax.stop_gradient(teacher_params)

  def loss_fn(params, x, y, key):
    rngs = {"dropout": key}
    student = model.apply(cx.materialize(params), x, train=True, rngs=rngs)
    target = model.apply(teacher, x, train=False)
    return cx.distill.polino_loss(
        student, target, y, alpha=args.distill_alpha,
        temperature=args.distill_temperature).mean()
  return loss_fn


def quantize_biases(tree, bits: int):
  """Unpruned float leaves (biases) -> ``cx.quantize.QuantizedArray``."""
  if not bits:
    return tree

  def leaf(x):
    if isinstance(x, cx.CompressedLeaf) or np.size(x) < 2:
      return x
    return cx.quantize.quantize(x, bits)
  return jax.tree_util.tree_map(leaf, tree,
                                is_leaf=lambda x: isinstance(x, cx.CompressedLeaf))


def _log(args, msg):
  if not args.quiet:
    print(msg, flush=True)


class _Viewed:
  """``model`` applied to a plan's training tree ``{"params", "aux"}``.

  The forward pass sees ``plan.view(train)`` (for Magnitude and KMeans the
  params themselves), so ``train_lib.fit`` can train and evaluate the tree
  that ``plan.optimizer`` updates.
  """

  def __init__(self, model, plan: cx.Plan):
    self.model, self.plan = model, plan

  def apply(self, tree, x, **kwargs):
    return self.model.apply(self.plan.view(tree), x, **kwargs)


def _cross_entropy(model):
  def loss_fn(params, x, y, key):
    logits = model.apply(params, x, train=True, rngs={"dropout": key})
    return train_lib.cross_entropy(logits, y)
  return loss_fn


def _fit(model, plan, train, tx, ds, args, *, epochs, seed, desc,
         loss_fn=None, opt_state=None):
  """``train_lib.fit`` of a plan's tree with ``plan.loss`` and ``tx``."""
  loss = plan.loss(loss_fn or _cross_entropy(model))
  return train_lib.fit(
      _Viewed(model, plan), train, tx, ds, epochs=epochs,
      batch_size=args.batch_size, seed=seed, quiet=args.quiet, desc=desc,
      loss_fn=lambda t, x, y, key: loss(t, key, x, y, key),
      opt_state=opt_state)


def _zero_step(tx, state, train):
  """``train`` after one update of ``tx`` with zero gradients.

  With an inner optimizer that moves nothing, this applies only what the
  plan's wrappers do on their own at that step: the pruning masks.
  """
  zeros = jax.tree_util.tree_map(np.zeros_like, train)
  updates, _ = tx.update(zeros, state, train)
  return optax.apply_updates(train, updates)


def prune_plan(args, round_: int) -> cx.Plan:
  """Round ``round_`` (1-based): keep ``keep ** (round_ / n)`` of each layer."""
  frac = round_ / args.prune_iters
  return cx.Plan({layer: cx.methods.Magnitude(sparsity=1.0 - keep ** frac)
                  for layer, keep in args.keep.items()}, where=cx.default_rule)


def prune_and_retrain(model, params, ds, args, curves, loss_fn=None, *,
                      track_pruned: bool = False):
  """Stage 1: reach the per-layer kept fractions in ``--prune-iters`` rounds.

  Round ``i`` is a plan of ``Magnitude(1 - keep ** (i / n))`` per layer (a
  geometric path to the target), so the last round lands exactly on the
  paper's fractions. Magnitude prunes at the round's first step and holds
  the mask while the model retrains.

  With ``track_pruned``, returns ``(params, before)`` where ``before`` holds
  each pruned weight's value just before the round that pruned it (PQK's
  unimportant weights) and the retrained value elsewhere.
  """
  before = params
  epochs = [args.prune_epochs // args.prune_iters
            + (i < args.prune_epochs % args.prune_iters)
            for i in range(args.prune_iters)]
  for i in range(args.prune_iters):
    plan = prune_plan(args, i + 1)
    train = plan.init(params)
    # The mask the round's first step takes, applied now: the error before
    # retraining, and the first gradient is the pruned model's.
    prune_only = plan.optimizer(optax.set_to_zero())
    train = _zero_step(prune_only, prune_only.init(train), train)
    before = jax.tree_util.tree_map(
        lambda b, old, new: np.where((np.asarray(old) != 0) & (np.asarray(new) == 0),
                                     old, b), before, params, train["params"])
    err = train_lib.evaluate(model, train["params"], ds.x_test, ds.y_test)
    _log(args, f"  prune round {i + 1}/{args.prune_iters}: kept "
               f"{_kept(train['params']):.4f} of weights, error before "
               f"retraining {err:.4f}")
    tx = plan.optimizer(
        _sgd(args, ds, args.prune_lr, epochs[i], args.weight_decay))
    train, _, hist = _fit(
        model, plan, train, tx, ds, args,
        epochs=epochs[i], seed=args.seed + 1 + i,
        desc=f"prune {i + 1}/{args.prune_iters}", loss_fn=loss_fn)
    params = train["params"]
    curves[f"prune {i + 1}"] = hist["test_error"]
  if track_pruned:
    before = jax.tree_util.tree_map(
        lambda b, p: np.where(np.asarray(p) != 0, p, b), before, params)
    return params, before
  return params


def _kept(params) -> float:
  stats = cx.prune.sparsity_stats(params)["global"]
  return stats["kept"] / max(1, stats["size"])


def share_plan(params, args) -> cx.Plan:
  """``KMeans(bits, pruned=True)`` per layer, from ``--bits`` and ``--share-init``.

  One init for all layers: the rules are ``--bits``' own
  (``{"ip": KMeans(bits=6, pruned=True)}``). Inits per layer: one rule per
  kernel, with the first matching ``--bits`` and ``--share-init`` entries.
  """
  method = lambda bits, init: cx.methods.KMeans(  # noqa: E731
      bits=bits, kmeans_init=init, pruned=True)
  bits_of = _by_layer(args.bits, "--bits")
  kernels = [cx.path_str(kp) for kp, _ in cx.selected_leaves(params)]
  if isinstance(args.share_init, dict):
    init_of = _by_layer(args.share_init, "--share-init")
    rules = [(f"^{re.escape(p)}$", method(bits_of(p, None), init_of(p, None)))
             for p in kernels]
  else:
    for p in kernels:  # every kernel is shared: name one without --bits
      bits_of(p, None)
    rules = {rx: method(b, args.share_init) for rx, b in args.bits.items()}
  return cx.Plan(rules, where=cx.default_rule)


def _shared(train, opt_state):
  """``train`` with every shared leaf on its codebook (``shared_params``)."""
  states = optax.tree_utils.tree_get_all_with_path(
      opt_state, "WeightSharingState",
      filtering=lambda _, v: isinstance(v, cx.optim.WeightSharingState))
  for _, ws in states:  # one per distinct KMeans method
    sel = jax.tree_util.tree_map(lambda c: np.ndim(c) > 0, ws.codes)
    train = cx.optim.shared_params(train, ws, where=sel)
  return train


def share(model, params, ds, args, epochs: int):
  """K-means weight sharing of the kept weights (the centroid stage's start).

  Returns ``(plan, train, tx, state, error after k-means)``: the plan of
  :func:`share_plan`, its training tree, the centroid optimizer for
  ``epochs`` epochs and its state (whose init ran k-means).
  """
  plan = share_plan(params, args)
  train = plan.init(params)
  tx = plan.optimizer(_sgd(args, ds, args.share_lr, epochs))
  state = tx.init(train)  # k-means of the kept weights
  err = train_lib.evaluate(model, _shared(train, state)["params"], ds.x_test,
                           ds.y_test)
  _log(args, f"  weight sharing: error after k-means {err:.4f}")
  return plan, train, tx, state, err


def share_and_finetune(model, params, ds, args, curves, loss_fn=None):
  """Stage 2: k-means weight sharing of the kept weights, then centroid training.

  Returns the compressed tree (``plan.finalize``: ``MaskedArray(CodebookArray)``
  at every shared layer, biases dense) and the error right after k-means.
  """
  plan, train, tx, state, err = share(model, params, ds, args, args.share_epochs)
  train, _, hist = _fit(model, plan, train, tx, ds, args,
                        epochs=args.share_epochs, seed=args.seed + 100,
                        desc="share", loss_fn=loss_fn, opt_state=state)
  curves["share"] = hist["test_error"]
  _log(args, f"  centroid fine-tuning ({args.share_epochs} epochs): test error "
             f"{(hist['test_error'] or [err])[-1]:.4f}")
  return plan.finalize(train), err


def train_baseline(model, params, ds, args, curves):
  """The dense baseline (SGD, ``--epochs``): ``(params, test error)``."""
  params, _, hist = train_lib.fit(
      model, params, _sgd(args, ds, args.lr, args.epochs, args.weight_decay),
      ds, epochs=args.epochs,
      batch_size=args.batch_size, seed=args.seed, quiet=args.quiet, desc="baseline")
  curves["baseline"] = hist["test_error"]
  baseline_error = train_lib.evaluate(model, params, ds.x_test, ds.y_test)
  _log(args, f"  baseline: test error {baseline_error:.4f}")
  return params, baseline_error


def main(argv=None) -> dict:
  args = parse_args(argv)
  start = time.time()
  model, ds, params = train_lib.setup(args)
  curves = {}
  _log(args, f"Deep Compression: {args.model} on {args.dataset} "
             f"({len(ds.x_train)} train / {len(ds.x_test)} test images)")

  params, baseline_error = train_baseline(model, params, ds, args, curves)

  loss_fn = distill_loss(model, params, args)
  params = prune_and_retrain(model, params, ds, args, curves, loss_fn)
  pruned_error = train_lib.evaluate(model, params, ds.x_test, ds.y_test)
  _log(args, f"  pruned + retrained: test error {pruned_error:.4f}")

  tree, kmeans_error = share_and_finetune(model, params, ds, args, curves,
                                          loss_fn)
  tree = quantize_biases(tree, args.bias_bits)

  os.makedirs(args.out, exist_ok=True)
  plot = None
  if not args.no_plot:
    plot = os.path.join(args.out, "test_error.png")
    train_lib.plot_curves(plot, curves, title=f"Deep Compression: {args.model}")
  stats = cx.prune.sparsity_stats(tree)
  results = train_lib.write_results(
      args.out, tree, model=model, ds=ds, args=args,
      baseline_test_error=baseline_error, start_time=start, module=MODULE,
      extra={
          "experiment": "deep_compression",
          "pruned_test_error": pruned_error,
          "kmeans_test_error": kmeans_error,
          "keep": args.keep, "bits": args.bits,
          "distill": ({"alpha": args.distill_alpha,
                       "temperature": args.distill_temperature}
                      if args.distill_alpha else None),
          "bias_bits": args.bias_bits or None,
          "share_init": args.share_init,
          "kept_fraction": stats["global"]["kept"] / stats["global"]["size"],
          "kept_per_layer": {k: v["kept"] / v["size"]
                             for k, v in stats["leaves"].items()},
          "epochs": {"baseline": args.epochs, "prune": args.prune_epochs,
                     "prune_iters": args.prune_iters, "share": args.share_epochs},
          "curves": curves,
          "plot": plot,
          "paper": {"lenet300": {"error": 0.0158, "ratio": 40},
                    "lenet5": {"error": 0.0074, "ratio": 39}}.get(args.model),
      })
  print(size_table(results["file"]))
  print(f"results: {os.path.join(args.out, 'results.json')}")
  if plot:
    print(f"plot: {plot}")
  print(f"wrote {results['file']} ({results['file_bytes']} bytes, "
        f"{results['ratio']:.1f}x smaller than fp32; test error "
        f"{results['test_error']:.4f}, baseline {results['baseline_test_error']:.4f})")
  return results


def size_table(path: str) -> str:
  """The per-layer size table of a written file (``cx.io.size_report``)."""
  return str(cx.io.size_report(path))


if __name__ == "__main__":
  main(sys.argv[1:])
