"""PQK (Kim, Chang, Kwak 2021) on LeNet-300-100 and LeNet-5.

PQK's two phases on top of this library's Deep Compression pipeline
(:mod:`experiments.deep_compression`; its flags are all here), in the
paper's order (``--pqk-stage shared``; the default order is below):

1. **Phase 1, iterative pruning and quantization-aware training**: the dense
   baseline, ``--prune-iters`` rounds of magnitude pruning and retraining
   (``cx.methods.Magnitude``), then k-means weight sharing of the kept weights
   with ``--share-epochs`` of centroid training (``cx.methods.KMeans``;
   trained quantization). The value each weight had just before the round
   that pruned it is kept: these are PQK's *unimportant* weights.
2. **Phase 2, knowledge distillation inside the network** (``--pqk-epochs``):
   the teacher is the student with the unimportant weights put back
   (``cx.distill.pqk_teacher``: the student's shared weights where the mask
   keeps, the unimportant ones where it prunes); teacher and student train
   together on ``cx.distill.pqk_loss``: the teacher's cross-entropy plus the
   student's ``alpha * KD + (1 - alpha) * CE`` against the teacher's logits.
   The student's centroids train through the weight-sharing optimizer (its
   pruned weights stay zero); the unimportant weights by SGD
   (``--teacher-lr``). No pre-trained teacher is used: the dense baseline is
   only the starting point, as in the paper.

The file written (``model.cx``) is the student; its test error is measured
from the file, and ``results.json`` also records the teacher's error.

By default (``--pqk-stage pruned``) phase 2 runs before weight sharing, on
the pruned float weights (the last pruning round's masks held), and the
centroids are shared and fine-tuned (``--share-epochs``) after it; with
``--pqk-stage shared`` it runs in PQK's order, after weight sharing, on the
shared student. On MNIST the default is the order that helps
(docs/results.md): distilling into weights already tied to 32-64 shared
values raised LeNet-300-100's error (1.62% -> 1.69%), distilling before
sharing lowered it (1.62% -> 1.43%).

Run ``python -m experiments.pqk`` (LeNet-300-100 on the bundled digits, about
a minute) or, on MNIST at the Deep Compression paper's setting::

  python -m experiments.pqk --model lenet300 --dataset npz:../shared/data/mnist.npz \\
      --epochs 20 --prune-iters 3 --prune-epochs 30 --share-epochs 5 --pqk-epochs 10

References:
  Kim, Chang, Kwak, *PQK: Model Compression via Pruning, Quantization, and
  Knowledge Distillation*, Interspeech 2021. https://arxiv.org/abs/2106.14681
"""

from __future__ import annotations

import os
import sys
import time

import jax
import numpy as np
import optax

import compressax as cx
from experiments import deep_compression as dc
from experiments import train as train_lib

MODULE = "experiments.pqk"


def _add_arguments(p):
  p.add_argument("--pqk-epochs", type=int, default=5,
                 help="phase 2: epochs of joint teacher/student training")
  p.add_argument("--pqk-alpha", type=float, default=0.5,
                 help="weight of the student's distillation term (cx.distill.pqk_loss)")
  p.add_argument("--pqk-temperature", type=float, default=4.0,
                 help="distillation temperature of phase 2")
  p.add_argument("--teacher-lr", type=float, default=0.01,
                 help="SGD learning rate of the unimportant weights in phase 2")
  p.add_argument("--teacher-warmup", type=int, default=0,
                 help="epochs of training only the unimportant weights (the "
                      "teacher's cross-entropy, the student held) before phase 2")
  p.add_argument("--pqk-stage", choices=("shared", "pruned"), default="pruned",
                 help="where phase 2 runs: on the pruned float student before "
                      "weight sharing (pruned; then --share-epochs of centroid "
                      "training; the order that helps on MNIST) or on the "
                      "pruned, weight-shared student (shared; PQK's order)")
  p.add_argument("--teacher-grad", choices=("shared", "own"), default="shared",
                 help="what the teacher's cross-entropy trains: the shared "
                      "important weights too (shared, PQK's joint training) or "
                      "only its own unimportant weights (own)")


def parse_args(argv=None):
  args = dc.parse_args(argv, module=MODULE, doc=__doc__, experiment="pqk",
                       add_arguments=_add_arguments)
  if not 0.0 <= args.pqk_alpha <= 1.0:
    raise SystemExit(f"--pqk-alpha must be in [0, 1], got {args.pqk_alpha}")
  if args.pqk_epochs < 1:
    raise SystemExit(f"--pqk-epochs must be >= 1, got {args.pqk_epochs}")
  return args


def kept_mask(params):
  """``True`` at the kept weights of every pruned kernel; 0-d ``True`` elsewhere."""
  selected = {cx.path_str(kp) for kp, _ in cx.selected_leaves(params)}
  return jax.tree_util.tree_map_with_path(
      lambda kp, w: (np.asarray(w) != 0) if cx.path_str(kp) in selected
      else np.ones((), bool), params)


def joint(student: optax.GradientTransformation,
          teacher: optax.GradientTransformation) -> optax.GradientTransformation:
  """``student`` on ``tree["train"]`` and ``teacher`` on ``tree["u"]``."""

  def init(tree):
    return student.init(tree["train"]), teacher.init(tree["u"])

  def update(grads, state, tree=None):
    get = (lambda k: None) if tree is None else (lambda k: tree[k])
    us, s0 = student.update(grads["train"], state[0], get("train"))
    uu, s1 = teacher.update(grads["u"], state[1], get("u"))
    return {"train": us, "u": uu}, (s0, s1)

  return optax.GradientTransformation(init, update)


class _Net:
  """The student (``net="student"``) or the teacher of a phase-2 tree."""

  def __init__(self, model, plan, mask, net="student"):
    self.model, self.plan, self.mask, self.net = model, plan, mask, net

  def params(self, tree):
    student = self.plan.view(tree["train"])
    if self.net == "student":
      return student
    return cx.distill.pqk_teacher(student, tree["u"], self.mask)

  def apply(self, tree, x, **kwargs):
    return self.model.apply(self.params(tree), x, **kwargs)


def distill_phase(model, plan, train, tx, state, unimportant, ds, args, curves):
  """Phase 2: the student and its in-network teacher trained together."""
  mask = kept_mask(plan.view(train))
  student, teacher = _Net(model, plan, mask), _Net(model, plan, mask, "teacher")

  def logits(tree, x, key):
    rngs = {"dropout": key}
    s = student.params(tree)
    shared = s if args.teacher_grad == "shared" else jax.lax.stop_gradient(s)
    t = cx.distill.pqk_teacher(shared, tree["u"], mask)
    return (model.apply(s, x, train=True, rngs=rngs),
            model.apply(t, x, train=True, rngs=rngs))

  def loss_fn(tree, x, y, key):
    s, t = logits(tree, x, key)
    return cx.distill.pqk_loss(s, t, y, alpha=args.pqk_alpha,
                               temperature=args.pqk_temperature).mean()

  tree = {"train": train, "u": unimportant}
  before = train_lib.evaluate(teacher, tree, ds.x_test, ds.y_test)
  dc._log(args, f"  phase 2: teacher (unimportant weights put back) error "
                f"{before:.4f}")
  if args.teacher_warmup:
    warm = dc._sgd(args, ds, args.teacher_lr, args.teacher_warmup)
    tree, _, hist = train_lib.fit(
        teacher, tree, joint(optax.set_to_zero(), warm), ds,
        epochs=args.teacher_warmup, batch_size=args.batch_size,
        seed=args.seed + 150, quiet=args.quiet, desc="teacher warm-up",
        loss_fn=lambda t, x, y, k: cx.distill.cross_entropy(
            logits(t, x, k)[1], y).mean())
    curves["pqk teacher warm-up"] = hist["test_error"]
  teacher_tx = dc._sgd(args, ds, args.teacher_lr, args.pqk_epochs)
  tree, _, hist = train_lib.fit(
      student, tree, joint(tx, teacher_tx), ds, epochs=args.pqk_epochs,
      batch_size=args.batch_size, seed=args.seed + 200, quiet=args.quiet,
      desc="pqk", loss_fn=loss_fn, opt_state=(state, teacher_tx.init(tree["u"])))
  curves["pqk (student)"] = hist["test_error"]
  teacher_error = train_lib.evaluate(teacher, tree, ds.x_test, ds.y_test)
  dc._log(args, f"  phase 2 ({args.pqk_epochs} epochs): student "
                f"{hist['test_error'][-1]:.4f}, teacher {teacher_error:.4f}")
  return tree["train"], {"teacher_error_before": before,
                         "teacher_error": teacher_error}


def main(argv=None) -> dict:
  args = parse_args(argv)
  start = time.time()
  model, ds, params = train_lib.setup(args)
  curves = {}
  dc._log(args, f"PQK: {args.model} on {args.dataset} "
                f"({len(ds.x_train)} train / {len(ds.x_test)} test images)")
  params, baseline_error = dc.train_baseline(model, params, ds, args, curves)
  params, unimportant = dc.prune_and_retrain(model, params, ds, args, curves,
                                             dc.distill_loss(model, params, args),
                                             track_pruned=True)
  pruned_error = train_lib.evaluate(model, params, ds.x_test, ds.y_test)
  dc._log(args, f"  pruned + retrained: test error {pruned_error:.4f}")

  if args.pqk_stage == "pruned":  # phase 2 on the float pruned weights
    held = dc.prune_plan(args, args.prune_iters)  # the last round's masks, held
    train = held.init(params)
    tx = held.optimizer(dc._sgd(args, ds, args.prune_lr, args.pqk_epochs,
                                args.weight_decay))
    train, teacher = distill_phase(model, held, train, tx, tx.init(train),
                                   unimportant, ds, args, curves)
    params = held.view(train)
  shared_stage = args.pqk_stage == "shared"
  epochs = args.share_epochs + args.pqk_epochs * shared_stage  # one cosine schedule
  plan, train, tx, state, kmeans_error = dc.share(model, params, ds, args, epochs)
  if args.share_epochs:
    train, state, hist = dc._fit(model, plan, train, tx, ds, args,
                                 epochs=args.share_epochs, seed=args.seed + 100,
                                 desc="share", opt_state=state)
    curves["share"] = hist["test_error"]
  shared_error = train_lib.evaluate(model, plan.view(train), ds.x_test, ds.y_test)
  dc._log(args, f"  pruned and shared: test error {shared_error:.4f}")
  if shared_stage:
    train, teacher = distill_phase(model, plan, train, tx, state, unimportant,
                                   ds, args, curves)
  tree = dc.quantize_biases(plan.finalize(train), args.bias_bits)

  os.makedirs(args.out, exist_ok=True)
  plot = None
  if not args.no_plot:
    plot = os.path.join(args.out, "test_error.png")
    train_lib.plot_curves(plot, curves, title=f"PQK: {args.model}")
  stats = cx.prune.sparsity_stats(tree)
  results = train_lib.write_results(
      args.out, tree, model=model, ds=ds, args=args,
      baseline_test_error=baseline_error, start_time=start, module=MODULE,
      extra={
          "experiment": "pqk",
          "pruned_test_error": pruned_error,
          "kmeans_test_error": kmeans_error,
          "phase1_test_error": shared_error,
          **teacher,
          "pqk": {"alpha": args.pqk_alpha, "temperature": args.pqk_temperature,
                  "epochs": args.pqk_epochs, "teacher_lr": args.teacher_lr,
                  "teacher_warmup": args.teacher_warmup,
                  "teacher_grad": args.teacher_grad, "stage": args.pqk_stage},
          "keep": args.keep, "bits": args.bits,
          "bias_bits": args.bias_bits or None,
          "kept_fraction": stats["global"]["kept"] / stats["global"]["size"],
          "kept_per_layer": {k: v["kept"] / v["size"]
                             for k, v in stats["leaves"].items()},
          "epochs": {"baseline": args.epochs, "prune": args.prune_epochs,
                     "prune_iters": args.prune_iters, "share": args.share_epochs,
                     "pqk": args.pqk_epochs},
          "curves": curves,
          "plot": plot,
      })
  print(dc.size_table(results["file"]))
  print(f"results: {os.path.join(args.out, 'results.json')}")
  print(f"wrote {results['file']} ({results['file_bytes']} bytes, "
        f"{results['ratio']:.1f}x smaller than fp32; test error "
        f"{results['test_error']:.4f}, baseline {results['baseline_test_error']:.4f}; "
        f"teacher {teacher['teacher_error']:.4f})")
  return results


if __name__ == "__main__":
  main(sys.argv[1:])
