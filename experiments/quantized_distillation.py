"""Quantized distillation vs differentiable quantization (Polino et al. 2018).

A ``teacher_mlp`` (1200-1200, dropout) teaches a LeNet-300-100 student. At
each bit width of ``--bits`` (default 2 and 4) five methods produce a really
quantized student, saved to ``DIR/runs/METHOD-{bits}bit.cx`` with
``cx.io.save`` and evaluated from the loaded file:

* ``ptq``: the fp32 student (trained on labels) quantized post-training with
  one range per tensor (``Uniform(bits)``: ``QuantizedArray``, no buckets);
* ``ptq_bucket``: the same with buckets of 256 values (Polino's k = 256);
* ``qat``: the student trained from the same init on ``plan.view`` weights
  (``Uniform(bits, bucket_size=256)``: ``uniform_ste``), labels only, no
  teacher;
* ``qdistill``: quantized distillation, ``0.7 T^2 KL + 0.3 CE``, ``T = 2``
  (``cx.distill.polino_loss`` on ``plan.view``), SGD Nesterov 0.9, buckets of
  256;
* ``diffquant``: differentiable quantization. It starts from the *distilled*
  fp32 student, keeps its weights fixed, and learns ``2^bits`` points per
  tensor in the bucket-scaled [0, 1] domain (``Points(2 ** bits,
  bucket_size=256)``, initialised at the quantiles of the scaled weights;
  the view is ``cx.quantize.nearest_point``). Loss: by default the paper's,
  distillation (``T^2 KL``, T = 2) from the model's own fp32 copy;
  ``--dq-target teacher`` distills from the teacher instead. The points are
  trained by their own SGD with Nesterov momentum 0.9 (``--dq-lr``,
  cosine-decayed), re-sorted and clipped to [0, 1] after every step
  (``Points(learning_rate=...)``: ``cx.optim.diff_quant_points``); the
  weights get ``optax.set_to_zero`` as the plan's inner optimizer.

Every method is a ``cx.Plan`` over the kernels (the library's default
selection): ``cx.methods.Uniform`` for the first four, ``cx.methods.Points``
for the fifth; none uses the deprecated ``cx.optim`` parameter maps.

Storage of ``diffquant``: ``cx.quantize.quantize_points`` stores each
kernel as a ``cx.quantize.PointsArray`` (uint codes, the tensor's float32
points, and float32 ``alpha``/``beta`` per bucket; ``numel * ceil(log2 K) +
32 K + 64 * buckets`` bits before the file's entropy coding), whose
``materialize()`` equals ``nearest_point`` bit for bit. Biases stay float32
in every method (the library's default selection: weight matrices).

Also trained, errors only: ``teacher``, ``student_fp32`` (the
``baseline_test_error``) and ``student_distilled_fp32``. ``results.json``
follows the experiments' contract with ``model.cx`` = the ``qdistill``
student at 4 bits (else the largest bit width), plus ``runs`` and
``ordering`` (methods by error per bit width and the paper's claims checked).

Run ``python -m experiments.quantized_distillation`` (digits, about two
minutes on two cores), or on MNIST::

  python -m experiments.quantized_distillation \\
      --dataset npz:../shared/data/mnist.npz --teacher-epochs 10 --epochs 10

References:
  Polino, Pascanu, Alistarh, *Model compression via distillation and
  quantization*, ICLR 2018. https://arxiv.org/abs/1802.05668
  Hinton, Vinyals, Dean, *Distilling the knowledge in a neural network*,
  2015. https://arxiv.org/abs/1503.02531
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import compressax as cx
from experiments import models as models_lib
from experiments import train as train_lib

MODULE = "experiments.quantized_distillation"
METHODS = ("ptq", "ptq_bucket", "qat", "qdistill", "diffquant")


def parse_args(argv=None) -> argparse.Namespace:
  p = train_lib.experiment_parser(
      MODULE, __doc__, model="lenet300", dataset="digits", epochs=15,
      batch_size=64, lr=0.05)
  p.add_argument("--teacher", default="teacher_mlp",
                 choices=sorted(models_lib.MODELS),
                 help="the larger float model distilled from")
  p.add_argument("--teacher-epochs", type=int, default=15,
                 help="epochs of teacher training")
  p.add_argument("--teacher-lr", type=float, default=0.05,
                 help="learning rate of teacher training")
  p.add_argument("--bits", type=int, nargs="+", default=[2, 4],
                 help="bit widths to compare")
  p.add_argument("--bucket-size", type=int, default=256,
                 help="values per bucket for all bucketed methods")
  p.add_argument("--alpha", type=float, default=0.7,
                 help="weight of the distillation term")
  p.add_argument("--temperature", type=float, default=2.0,
                 help="softmax temperature of the distillation term")
  p.add_argument("--dq-epochs", type=int, default=None,
                 help="epochs of point training (default: --epochs)")
  p.add_argument("--dq-lr", type=float, default=1e-4,
                 help="SGD rate of the points (Polino: ~1e-5 on larger nets)")
  p.add_argument("--dq-init", default="quantiles", choices=["quantiles", "uniform"],
                 help="initial quantization points: weight quantiles or an "
                      "even grid")
  p.add_argument("--dq-target", default="self", choices=["self", "teacher"],
                 help="distill the points from the model's own fp32 copy "
                      "(paper default) or from the teacher")
  p.add_argument("--no-plot", action="store_true",
                 help="do not write the PNG plot")
  args = p.parse_args(argv)
  args.argv = list(sys.argv[1:] if argv is None else argv)
  for b in args.bits:
    if not 1 <= b <= 8:
      p.error(f"--bits must be in [1, 8], got {b}")
  args.bits = sorted(set(args.bits))
  if args.bucket_size < 1:
    p.error("--bucket-size must be >= 1")
  if args.dq_epochs is None:
    args.dq_epochs = args.epochs
  if args.out is None:
    args.out = train_lib.default_out("quantized_distillation", args)
  return args


def _sgd(lr, epochs, ds, args):
  """SGD with Nesterov momentum 0.9 (Polino), cosine-decayed over the stage."""
  return train_lib.sgd(
      lr, decay_steps=epochs * train_lib.steps_per_epoch(ds, args.batch_size))


def _log(args, msg):
  if not args.quiet:
    print(msg, flush=True)


def _dropout_apply(model, key):
  return lambda p, x: model.apply(p, x, train=True, rngs={"dropout": key})


def uniform_plan(bits: int, bucket_size: int | None) -> cx.Plan:
  """Polino's uniform quantizer on every kernel (biases stay float32)."""
  return cx.Plan(cx.methods.Uniform(bits, bucket_size=bucket_size))


def student_loss(model, args, *, plan=None, teacher=None, teacher_params=None):
  """``loss_fn(train, x, y, key)``: CE or Polino's loss, fp32 or on ``plan.view``.

  Without a plan ``train`` is the params; with one it is ``plan.init``'s tree
  and the student runs on ``plan.view(train)`` (fake-quantized kernels,
  straight-through gradient to the float32 shadow weights).
  """
  def loss_fn(train, x, y, key):
    apply_fn = _dropout_apply(model, key)
    q = train if plan is None else plan.view(train)
    if teacher is None:
      return train_lib.cross_entropy(apply_fn(q, x), y)
    t_logits = jax.lax.stop_gradient(teacher.apply(teacher_params, x))
    return jnp.mean(cx.distill.polino_loss(
        apply_fn(q, x), t_logits, y, alpha=args.alpha,
        temperature=args.temperature))
  return loss_fn


def _cosine(lr: float, steps: int):
  """``train_lib.sgd``'s cosine decay to 0 over ``steps``, as a schedule."""
  total = float(max(steps, 1))

  def schedule(count):
    t = jnp.minimum(count.astype(jnp.float32) / total, 1.0)
    return lr * 0.5 * (1.0 + jnp.cos(jnp.pi * t))
  return schedule


def train_points(model, params, teacher, teacher_params, ds, bits, args):
  """Differentiable quantization: learn points for fixed ``params``.

  Returns:
    ``(tree, shift)``: the params with ``cx.quantize.PointsArray`` kernels, and
    the largest distance any point moved from its initial value.
  """
  steps = args.dq_epochs * train_lib.steps_per_epoch(ds, args.batch_size)
  plan = cx.Plan(cx.methods.Points(
      2 ** bits, bucket_size=args.bucket_size, init_method=args.dq_init,
      straight_through=False, learning_rate=_cosine(args.dq_lr, steps)))
  # The fixed weights ride along in the trained tree with a zero update:
  # closed over, they would be jit constants that XLA constant-folds (slow).
  train = plan.init(params)
  tx = plan.optimizer(optax.set_to_zero())

  def loss_fn(tree, x, y, key):
    del y, key
    w = jax.lax.stop_gradient(tree["params"])
    target = (model.apply(w, x) if args.dq_target == "self"
              else teacher.apply(teacher_params, x))
    q = plan.view({"params": w, "aux": tree["aux"]})
    return jnp.mean(cx.distill.kd_loss(model.apply(q, x),
                                       jax.lax.stop_gradient(target),
                                       temperature=args.temperature))

  trained, _, _ = train_lib.fit(
      model, train, tx, ds, epochs=args.dq_epochs,
      batch_size=args.batch_size, seed=args.seed + 11, quiet=args.quiet,
      desc=f"diffquant {bits}b", loss_fn=loss_fn, eval_every_epoch=False)
  sel = jax.tree_util.tree_leaves(trained["aux"])
  if sel and not all(bool(jnp.all(jnp.isfinite(p))) for p in sel):
    raise FloatingPointError("diffquant: points diverged; lower --dq-lr")
  shift = max(float(jnp.max(jnp.abs(p - p0)))
              for p, p0 in zip(sel, jax.tree_util.tree_leaves(train["aux"])))
  return plan.finalize(trained), shift


def comparable_margin(err_a: float, err_b: float, n: int) -> float:
  """Two binomial standard errors of the mean error, on ``n`` test examples."""
  p = (err_a + err_b) / 2
  return 2 * math.sqrt(max(p * (1 - p), 1.0 / n) / n)


def ordering(runs: list[dict], baselines: dict, n_test: int) -> dict:
  """Methods sorted by error per bit width and the paper's claims checked.

  "Comparable" means within :func:`comparable_margin`; "beats" means a
  strictly lower error.
  """
  out = {}
  for bits in sorted({r["bits"] for r in runs}):
    err = {r["method"]: r["test_error"] for r in runs if r["bits"] == bits}
    ranked = sorted(err, key=lambda m: (err[m], METHODS.index(m)))
    margin = comparable_margin(err["qdistill"], err["diffquant"], n_test)
    claims = {
        "qdistill_beats_diffquant": err["qdistill"] < err["diffquant"],
        "qdistill_diffquant_comparable": abs(err["qdistill"] - err["diffquant"]) <= margin,
        "qdistill_beats_qat": err["qdistill"] < err["qat"],
    }
    # The paper's claims: 2 bits -> qdistill beats diffquant; 4 bits -> comparable.
    paper = ("qdistill_beats_diffquant" if bits <= 2 else
             "qdistill_diffquant_comparable" if bits >= 4 else None)
    out[f"{bits}bit"] = {
        "by_error": [[m, err[m]] for m in ranked],
        "comparable_margin": margin, "claims": claims,
        "paper_claim": paper,
        "paper_claim_holds": None if paper is None else claims[paper],
    }
  out["distilled_fp32_beats_fp32"] = (baselines["student_distilled_fp32"]
                                      < baselines["student_fp32"])
  return out


def plot_bars(path, runs, baselines, title):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  bit_list = sorted({r["bits"] for r in runs})
  fig, ax = plt.subplots(figsize=(7, 4))
  width = 0.8 / len(bit_list)
  for j, bits in enumerate(bit_list):
    errs = {r["method"]: r["test_error"] for r in runs if r["bits"] == bits}
    xs = np.arange(len(METHODS)) + (j - (len(bit_list) - 1) / 2) * width
    ax.bar(xs, [100 * errs[m] for m in METHODS], width, label=f"{bits} bits")
  for (name, err), ls in zip(baselines.items(), (":", "--", "-.")):
    ax.axhline(100 * err, color="k", ls=ls, lw=1, label=f"{name} (fp32)")
  ax.set_xticks(np.arange(len(METHODS)), METHODS)
  ax.set_ylabel("test error (%)")
  ax.set_title(title)
  ax.legend(fontsize=8)
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _save_eval(path, tree, model, ds, args) -> tuple[float, int]:
  run = train_lib.saved_run(path, tree, model, ds, args)
  return run["test_error"], run["file_bytes"]


def main(argv=None) -> dict:
  args = parse_args(argv)
  start = time.time()
  model, ds, init_params = train_lib.setup(args)
  _log(args, f"Quantized distillation vs differentiable quantization: "
             f"{args.teacher} -> {args.model} at {args.bits} bits on {args.dataset}")

  def fit(params, lr, epochs, desc, loss_fn=None, seed=args.seed, m=model,
          plan=None):
    tx = _sgd(lr, epochs, ds, args)
    tx = tx if plan is None else plan.optimizer(tx)
    return train_lib.fit(m, params, tx, ds, epochs=epochs,
                         batch_size=args.batch_size, seed=seed, quiet=args.quiet,
                         desc=desc, loss_fn=loss_fn, eval_every_epoch=False)[0]

  def ev(m, params):
    return train_lib.evaluate(m, params, ds.x_test, ds.y_test, args.eval_batch_size)

  teacher = models_lib.get_model(args.teacher, ds.num_classes)
  teacher_params = models_lib.init(teacher, ds.image_shape,
                                   train_lib.prng_key(args.seed + 7))
  teacher_params = fit(teacher_params, args.teacher_lr, args.teacher_epochs,
                       "teacher", seed=args.seed + 7, m=teacher)
  baselines = {"teacher": ev(teacher, teacher_params)}
  base_params = fit(init_params, args.lr, args.epochs, "student fp32",
                    loss_fn=student_loss(model, args))
  baselines["student_fp32"] = ev(model, base_params)
  kd = dict(teacher=teacher, teacher_params=teacher_params)
  dist_params = fit(init_params, args.lr, args.epochs, "student distilled fp32",
                    loss_fn=student_loss(model, args, **kd))
  baselines["student_distilled_fp32"] = ev(model, dist_params)
  for name, err in baselines.items():
    _log(args, f"  {name}: test error {err:.4f}")

  dense_bytes = 4 * models_lib.param_count(init_params)
  run_dir = os.path.join(args.out, "runs")
  os.makedirs(run_dir, exist_ok=True)
  runs, trees, shifts = [], {}, {}
  for bits in args.bits:
    per_tensor = uniform_plan(bits, None)
    trees[("ptq", bits)] = per_tensor.finalize(per_tensor.init(base_params))
    plan = uniform_plan(bits, args.bucket_size)
    trees[("ptq_bucket", bits)] = plan.finalize(plan.init(base_params))
    # QAT and quantized distillation train plan.init's tree: the float32
    # shadow weights (and the Uniform method's empty side state).
    qat = fit(plan.init(init_params), args.lr, args.epochs, f"qat {bits}b",
              loss_fn=student_loss(model, args, plan=plan), plan=plan)
    trees[("qat", bits)] = plan.finalize(qat)
    qd = fit(plan.init(init_params), args.lr, args.epochs, f"qdistill {bits}b",
             loss_fn=student_loss(model, args, plan=plan, **kd), plan=plan)
    trees[("qdistill", bits)] = plan.finalize(qd)
    trees[("diffquant", bits)], shifts[str(bits)] = train_points(
        model, dist_params, teacher, teacher_params, ds, bits, args)
    for method in METHODS:
      path = os.path.join(run_dir, f"{method}-{bits}bit.cx")
      err, nbytes = _save_eval(path, trees[(method, bits)], model, ds, args)
      runs.append({"method": method, "bits": bits, "test_error": err,
                   "file": path, "file_bytes": nbytes, "ratio": dense_bytes / nbytes})
      _log(args, f"  {method:>10} {bits}b: test error {err:.4f}, {nbytes} bytes")

  main_bits = 4 if 4 in args.bits else max(args.bits)
  order = ordering(runs, baselines, len(ds.y_test))
  plot = None
  if not args.no_plot:
    plot = os.path.join(args.out, "test_error.png")
    plot_bars(plot, runs, baselines, f"{args.teacher} -> {args.model}, {args.dataset}")
  results = train_lib.write_results(
      args.out, trees[("qdistill", main_bits)], model=model, ds=ds, args=args,
      baseline_test_error=baselines["student_fp32"], start_time=start, module=MODULE,
      extra={
          "experiment": "quantized_distillation",
          "model_cx_method": f"qdistill-{main_bits}bit",
          "teacher": args.teacher,
          "teacher_params": models_lib.param_count(teacher_params),
          "baselines": baselines, "runs": runs, "ordering": order,
          "bits": args.bits, "bucket_size": args.bucket_size,
          "alpha": args.alpha, "temperature": args.temperature,
          "diffquant": {"start": "student_distilled_fp32", "init": args.dq_init,
                        "target": args.dq_target, "lr": args.dq_lr,
                        "max_point_shift": shifts,
                        "points_per_tensor": {str(b): 2 ** b for b in args.bits}},
          "epochs": {"teacher": args.teacher_epochs, "student": args.epochs,
                     "diffquant": args.dq_epochs},
          "plot": plot,
      })
  print(summary_table(results))
  return results


def summary_table(results: dict) -> str:
  """The runs and baselines as a plain-text table, plus the ordering."""
  lines = [f"{'method':<24}{'bits':>5}{'test error':>12}{'bytes':>10}{'ratio':>8}"]
  for name, err in results["baselines"].items():
    lines.append(f"{name:<24}{32:>5}{err:>12.4f}{'':>10}{'':>8}")
  for r in results["runs"]:
    lines.append(f"{r['method']:<24}{r['bits']:>5}{r['test_error']:>12.4f}"
                 f"{r['file_bytes']:>10}{r['ratio']:>8.1f}")
  for key, o in results["ordering"].items():
    if isinstance(o, dict):
      ranked = " < ".join(f"{m} {e:.4f}" for m, e in o["by_error"])
      lines.append(f"{key}: {ranked}")
      if o["paper_claim"]:
        lines.append(f"  paper: {o['paper_claim']} -> "
                     f"{'holds' if o['paper_claim_holds'] else 'does NOT hold'}"
                     f" (margin {o['comparable_margin']:.4f})")
      lines.append(f"  qdistill beats qat: {o['claims']['qdistill_beats_qat']}")
  lines.append(f"diffquant max point shift from init: "
               f"{results['diffquant']['max_point_shift']}")
  lines.append(f"distilled fp32 beats fp32: "
               f"{results['ordering']['distilled_fp32_beats_fp32']}")
  lines.append(f"model.cx = {results['model_cx_method']}, test error "
               f"{results['test_error']:.4f}, {results['file_bytes']} bytes, "
               f"{results['ratio']:.1f}x; wall {results['wall_time_s']:.0f} s")
  return "\n".join(lines)


if __name__ == "__main__":
  main(sys.argv[1:])
