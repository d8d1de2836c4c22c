"""Quantized distillation (Polino, Pascanu, Alistarh 2018) on the MNIST-size models.

Every stage goes through compressax's public API:

1. **Teacher**: train a wide model (default ``teacher_mlp``, 1200-1200 with
   dropout) at full precision.
2. **Baseline student**: the same student architecture trained normally at
   full precision (``baseline_test_error``).
3. **Quantized distillation**: a fresh student keeps float32 shadow weights;
   each step runs it on ``q(w)`` (uniform quantization with buckets of 256,
   straight-through gradient) and minimises
   ``0.7 T^2 KL(teacher/T || student/T) + 0.3 CE`` with ``T = 2``
   (``cx.optim.quantized_distillation_loss``), SGD with Nesterov momentum.
4. **Final quantization**: ``cx.optim.finalize`` turns the shadow weights into
   ``QuantizedArray`` nodes (integer codes plus per-bucket scales), written
   with ``cx.io.save``; ``test_error`` is measured on the decoded file.

Run ``python -m experiments.quantized_distillation`` (digits, about a
minute), or on MNIST::

  python -m experiments.quantized_distillation \\
      --dataset npz:../shared/data/mnist.npz --teacher-epochs 20 --epochs 20

References:
  Polino, Pascanu, Alistarh, *Model compression via distillation and
  quantization*, ICLR 2018. https://arxiv.org/abs/1802.05668
  Hinton, Vinyals, Dean, *Distilling the knowledge in a neural network*,
  2015. https://arxiv.org/abs/1503.02531
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax

import compressax as cx
from experiments import models as models_lib
from experiments import train as train_lib

MODULE = "experiments.quantized_distillation"


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  train_lib.add_common_args(p, model="lenet300", dataset="digits", epochs=15,
                            batch_size=64, lr=0.05)
  p.add_argument("--teacher", default="teacher_mlp",
                 choices=sorted(models_lib.MODELS))
  p.add_argument("--teacher-epochs", type=int, default=15)
  p.add_argument("--teacher-lr", type=float, default=0.05)
  p.add_argument("--bits", type=int, default=4, help="bits per student weight")
  p.add_argument("--bucket-size", type=int, default=256,
                 help="values per quantization bucket (0: one per tensor)")
  p.add_argument("--alpha", type=float, default=0.7,
                 help="weight of the distillation term (0: plain QAT)")
  p.add_argument("--temperature", type=float, default=2.0)
  p.add_argument("--no-plot", action="store_true")
  args = p.parse_args(argv)
  args.argv = list(sys.argv[1:] if argv is None else argv)
  if not 1 <= args.bits <= 16:
    p.error(f"--bits must be in [1, 16], got {args.bits}")
  if args.bucket_size < 0:
    p.error("--bucket-size must be >= 0")
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


def distillation_loss(model, teacher, teacher_params, args):
  """``loss_fn(params, x, y, key)`` for :func:`experiments.train.fit`."""
  bucket = args.bucket_size or None

  def loss_fn(params, x, y, key):
    t_logits = jax.lax.stop_gradient(teacher.apply(teacher_params, x))

    def apply_fn(p, inputs):
      return model.apply(p, inputs, train=True, rngs={"dropout": key})

    return cx.optim.quantized_distillation_loss(
        params, apply_fn, x, y, t_logits, bits=args.bits, bucket_size=bucket,
        alpha=args.alpha, temperature=args.temperature)
  return loss_fn


def main(argv=None) -> dict:
  args = parse_args(argv)
  start = time.time()
  model, ds, init_params = train_lib.setup(args)
  _log(args, f"Quantized distillation: {args.teacher} -> {args.model} at "
             f"{args.bits} bits on {args.dataset}")
  curves = {}

  teacher = models_lib.get_model(args.teacher, ds.num_classes)
  teacher_params = models_lib.init(teacher, ds.image_shape,
                                   train_lib.prng_key(args.seed + 7))
  teacher_params, _, hist = train_lib.fit(
      teacher, teacher_params, _sgd(args.teacher_lr, args.teacher_epochs, ds, args), ds,
      epochs=args.teacher_epochs, batch_size=args.batch_size, seed=args.seed + 7,
      quiet=args.quiet, desc="teacher")
  curves["teacher"] = hist["test_error"]
  teacher_error = train_lib.evaluate(teacher, teacher_params, ds.x_test, ds.y_test)
  _log(args, f"  teacher {args.teacher}: test error {teacher_error:.4f}")

  base_params, _, hist = train_lib.fit(
      model, init_params, _sgd(args.lr, args.epochs, ds, args), ds, epochs=args.epochs,
      batch_size=args.batch_size, seed=args.seed, quiet=args.quiet,
      desc="student fp32")
  curves["student fp32"] = hist["test_error"]
  baseline_error = train_lib.evaluate(model, base_params, ds.x_test, ds.y_test)
  _log(args, f"  student {args.model} fp32: test error {baseline_error:.4f}")

  params, _, hist = train_lib.fit(
      model, init_params, _sgd(args.lr, args.epochs, ds, args), ds, epochs=args.epochs,
      batch_size=args.batch_size, seed=args.seed, quiet=args.quiet,
      desc=f"quantized distillation {args.bits}b",
      loss_fn=distillation_loss(model, teacher, teacher_params, args))
  curves[f"quantized distillation {args.bits}b"] = hist["test_error"]

  tree = cx.optim.finalize(params, args.bits, bucket_size=args.bucket_size or None)
  plot = None
  if not args.no_plot:
    os.makedirs(args.out, exist_ok=True)
    plot = os.path.join(args.out, "test_error.png")
    train_lib.plot_curves(plot, curves, title=f"Quantized distillation: {args.model}")
  results = train_lib.write_results(
      args.out, tree, model=model, ds=ds, args=args,
      baseline_test_error=baseline_error, start_time=start, module=MODULE,
      extra={
          "experiment": "quantized_distillation",
          "teacher": args.teacher, "teacher_test_error": teacher_error,
          "teacher_params": models_lib.param_count(teacher_params),
          "bits": args.bits, "bucket_size": args.bucket_size,
          "alpha": args.alpha, "temperature": args.temperature,
          "epochs": {"teacher": args.teacher_epochs, "student": args.epochs},
          "curves": curves, "plot": plot,
      })
  print(cx.io.size_report(results["file"]))
  print(json.dumps({k: v for k, v in results.items()
                    if k not in ("curves", "size_report")}, indent=1))
  print(f"wrote {results['file']} ({results['file_bytes']} bytes, "
        f"{results['ratio']:.1f}x smaller than fp32; test error "
        f"{results['test_error']:.4f}, fp32 student {baseline_error:.4f}, "
        f"teacher {teacher_error:.4f})")
  return results


if __name__ == "__main__":
  main(sys.argv[1:])
