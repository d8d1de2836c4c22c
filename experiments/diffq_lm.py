"""DiffQ on a word-level transformer LM vs uniform QAT (issue 14).

Défossez et al. (2021) report their language model about 8x smaller (about
4 bits per weight) for about +0.5 perplexity, with bits learned per group.
Here, on the word-level LM of ``experiments.lm`` (tiny-shakespeare):

1. **Float model**: trained once and cached (``experiments.lm.pretrained``,
   the same flags as ``python -m experiments.lm``).
2. **DiffQ**, one run per ``lambda`` in ``--lambdas``: from the float model,
   ``--finetune-steps`` of AdamW on a ``cx.Plan`` of
   ``cx.methods.DiffQ(size_penalty=lambda, group_size=...)`` over every
   matrix (:func:`quantized_leaf`: the token and position embeddings, tied to
   the output layer, and every ``nn.Dense`` kernel; LayerNorms and biases stay
   float32): pseudo-quantization noise in the forward pass and the loss
   ``NLL + lambda * model_size_MB``; the bit logits by their own Adam
   (``--logit-lr``). Then ``plan.finalize`` (rounded bits, ``DiffQArray``).
3. **Uniform QAT**, one run per ``--qat-bits``: the same fine-tuning with the
   forward pass on ``cx.methods.Uniform(bits)`` weights (straight-through,
   one min/max range per tensor, like DiffQ's), then ``plan.finalize``.

Every run is written with ``cx.save`` to ``DIR/runs/*.cx``, and its
validation loss is measured on the weights ``cx.load`` decodes from that
file. ``results.json`` lists the runs (method, lambda or bits, file bytes,
ratio to float32, mean bits, validation loss and its relative increase over
the float model); ``DIR/pareto.png`` plots validation loss against file
bytes; ``DIR/model.cx`` is the DiffQ model of ``--save-lambda`` (default: the
largest lambda).

Run ``python -m experiments.diffq_lm`` (the defaults of the issue's model;
the float model takes about 15 minutes on 2 CPU cores the first time).

References:
  Défossez, Adi, Synnaeve, *Differentiable Model Compression via Pseudo
  Quantization Noise*, 2021. https://arxiv.org/abs/2104.09987
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp

import compressax as cx
from experiments import diffq as diffq_lib
from experiments import lm as lm_lib
from experiments import train as train_lib

MODULE = "experiments.diffq_lm"


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__,
                              formatter_class=train_lib.HelpFormatter)
  lm_lib.add_lm_args(p)
  p.add_argument("--lambdas", type=float, nargs="+", default=[0.01, 0.03, 0.1],
                 help="DiffQ size penalties, per MB of model")
  p.add_argument("--qat-bits", type=int, nargs="*", default=[2, 3, 4, 8],
                 help="bit widths of the uniform-QAT runs")
  p.add_argument("--finetune-steps", type=int, default=500,
                 help="fine-tuning steps of every DiffQ and QAT run")
  p.add_argument("--finetune-lr", type=float, default=3e-4,
                 help="peak AdamW learning rate of the fine-tuning")
  p.add_argument("--group-size", type=int, default=16,
                 help="weights per bit logit (0: one per tensor)")
  p.add_argument("--logit-lr", type=float, default=0.05,
                 help="learning rate of the bit logits' own Adam")
  p.add_argument("--init-bits", type=float, default=8.0,
                 help="bits every group starts from")
  p.add_argument("--b-min", type=float, default=2.0, help="fewest bits a group can learn")
  p.add_argument("--b-max", type=float, default=15.0, help="most bits a group can learn")
  p.add_argument("--save-lambda", type=float, default=None,
                 help="lambda whose DiffQ model is DIR/model.cx (default: the largest)")
  lm_lib.add_model_seed_arg(p)
  p.add_argument("--seed", type=int, default=0,
                 help="every run's windows and noise; the float model's too unless --model-seed")
  p.add_argument("--out", default=None, help="output directory (default: runs/diffq_lm-...)")
  p.add_argument("--quiet", action="store_true", help="no progress bars")
  p.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
  args = p.parse_args(argv)
  args.argv = list(sys.argv[1:] if argv is None else argv)
  if any(not lam >= 0 for lam in args.lambdas):
    p.error(f"--lambdas must be >= 0, got {args.lambdas}")
  if any(not 1 <= b <= 16 for b in args.qat_bits):
    p.error(f"--qat-bits must lie in [1, 16], got {args.qat_bits}")
  if args.group_size < 0:
    p.error("--group-size must be >= 0")
  if args.finetune_steps < 1:
    p.error("--finetune-steps must be >= 1")
  if not 1 <= args.b_min < args.init_bits < args.b_max <= 15:
    p.error("need 1 <= --b-min < --init-bits < --b-max <= 15")
  if args.save_lambda is None:
    args.save_lambda = max(args.lambdas)
  if args.save_lambda not in args.lambdas:
    p.error(f"--save-lambda {args.save_lambda} is not one of --lambdas {args.lambdas}")
  if args.out is None:
    args.out = f"runs/diffq_lm-{args.level}-s{args.seed}"
  return args


def quantized_leaf(path: str, leaf) -> bool:
  """Every floating matrix, the embeddings included; LayerNorms and biases stay float."""
  dtype = getattr(leaf, "dtype", None)
  return (dtype is not None and jnp.issubdtype(dtype, jnp.floating)
          and len(getattr(leaf, "shape", ())) >= 2)


def _finetune(model, corpus, train, plan, loss_fn, args, desc):
  tx = plan.optimizer(lm_lib.cosine_adamw(args.finetune_lr, args.finetune_steps,
                                          args.finetune_steps // 10))
  train, _ = lm_lib.train(model, train, tx, corpus.train, steps=args.finetune_steps,
                          batch=args.batch, seed=args.seed + 1, loss_fn=loss_fn,
                          quiet=args.quiet, desc=desc)
  return plan.finalize(train), train


def diffq_loss(model, plan: cx.Plan):
  """``loss(train, windows, key)``: NLL of the noisy view (dropout on) + penalty."""
  objective = plan.loss(lambda p, x, key: lm_lib.token_nll(model, p, x, train=True,
                                                           key=key))

  def loss_fn(t, x, key):
    k_noise, k_drop = jax.random.split(key)
    return objective(t, k_noise, x, k_drop)
  return loss_fn


def qat_loss(model, plan: cx.Plan):
  """``loss(train, windows, key)``: NLL of the straight-through view (dropout on)."""
  return lambda t, x, key: lm_lib.token_nll(model, plan.view(t), x, train=True, key=key)


def diffq_plan(lam: float, args) -> cx.Plan:
  return cx.Plan([(quantized_leaf, cx.methods.DiffQ(
      size_penalty=lam, group_size=args.group_size, init_bits=args.init_bits,
      b_min=args.b_min, b_max=args.b_max, logit_learning_rate=args.logit_lr))])


def run_diffq(model, corpus, params, lam: float, args):
  """Fine-tune under noise and a size penalty; return the quantized tree."""
  plan = diffq_plan(lam, args)
  tree, train = _finetune(model, corpus, plan.init(params), plan,
                          diffq_loss(model, plan), args, f"diffq lambda={lam:g}")
  return tree, diffq_lib.bit_logits(plan, train)


def run_qat(model, corpus, params, bits: int, args):
  """Fine-tune on straight-through uniform codes; return the quantized tree."""
  plan = cx.Plan([(quantized_leaf, cx.methods.Uniform(bits))])
  tree, _ = _finetune(model, corpus, plan.init(params), plan, qat_loss(model, plan),
                      args, f"qat {bits} bits")
  return tree


def saved_run(path: str, tree, model, corpus, float_loss: float) -> dict:
  """Save, reload and measure: file bytes, ratio and the decoded model's loss."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  cx.save(path, tree)
  loaded = cx.load(path)
  size = os.path.getsize(path)
  dense = 4 * lm_lib.param_count(loaded)
  val = lm_lib.evaluate(model, loaded, corpus.val)
  return {"file": path, "file_bytes": size, "dense_fp32_bytes": dense,
          "ratio": dense / size, "val_loss": val, "val_perplexity": math.exp(val),
          "rel_increase": val / float_loss - 1}


def table(runs: list[dict], float_loss: float, dense: int) -> str:
  lines = [f"{'method':<6} {'setting':>13} {'bits':>5} {'file_bytes':>10} "
           f"{'ratio':>6} {'val_loss':>8} {'ppl':>7} {'+loss':>7}",
           f"{'fp32':<6} {'':>13} {32:>5.2f} {dense:>10d} {1:>6.2f} "
           f"{float_loss:>8.4f} {math.exp(float_loss):>7.1f} {0:>6.2%}"]
  for r in runs:
    setting = (f"lambda={r['lambda']:g}" if r["method"] == "diffq" else f"bits={r['bits']}")
    lines.append(f"{r['method']:<6} {setting:>13} {r['mean_bits']:>5.2f} "
                 f"{r['file_bytes']:>10d} {r['ratio']:>6.2f} {r['val_loss']:>8.4f} "
                 f"{r['val_perplexity']:>7.1f} {r['rel_increase']:>6.2%}")
  return "\n".join(lines)


def main(argv=None) -> dict:
  args = parse_args(argv)
  start = time.time()
  model, corpus, config = lm_lib.setup(args)
  params, info = lm_lib.pretrained(args, model, corpus)
  float_run = saved_run(os.path.join(args.out, "runs", "float32.cx"), params, model,
                        corpus, 1.0)
  float_loss = float_run["val_loss"]
  if not args.quiet:
    print(f"float {args.level}-level LM: validation loss {float_loss:.4f}, "
          f"{float_run['file_bytes']:,} bytes", flush=True)

  runs, saved = [], None
  settings = ([("diffq", lam) for lam in args.lambdas] +
              [("qat", b) for b in args.qat_bits])
  for method, value in settings:
    t0 = time.time()
    if method == "diffq":
      tree, logits = run_diffq(model, corpus, params, value, args)
      entry = {"method": "diffq", "lambda": value,
               "model_size_mb": float(cx.diffq.model_size(
                   params, logits, group_size=args.group_size, b_min=args.b_min,
                   b_max=args.b_max, exact=True))}
      name = f"diffq-lambda{value:g}.cx"
      if value == args.save_lambda:
        saved = tree
    else:
      tree = run_qat(model, corpus, params, value, args)
      entry = {"method": "qat", "bits": value}
      name = f"qat-{value}bit.cx"
    entry.update(mean_bits=diffq_lib.mean_bits(tree),
                 **saved_run(os.path.join(args.out, "runs", name), tree, model,
                             corpus, float_loss),
                 wall_time_s=time.time() - t0)
    runs.append(entry)
    if not args.quiet:
      print(f"  {name}: {entry['file_bytes']:,} bytes ({entry['ratio']:.2f}x), "
            f"{entry['mean_bits']:.2f} bits, validation loss {entry['val_loss']:.4f} "
            f"({entry['rel_increase']:+.2%})", flush=True)

  os.makedirs(args.out, exist_ok=True)
  model_path = os.path.join(args.out, "model.cx")
  final = saved_run(model_path, saved, model, corpus, float_loss)
  plot = None
  if not args.no_plot:
    plot = os.path.join(args.out, "pareto.png")
    diffq_lib.plot_pareto(plot, runs, float_loss,
                          f"DiffQ vs QAT: {args.level}-level LM, tiny-shakespeare",
                          y="val_loss", ylabel="validation loss (decoded file, nats)")
  results = {
      "experiment": "diffq_lm", "model": f"{args.level}lm", "dataset": "tinyshakespeare",
      "config": dataclasses.asdict(config),
      "float_val_loss": float_loss, "float_train_time_s": info["train_time_s"],
      "float_cache": info["cache"], "lambda": args.save_lambda,
      "mean_bits": diffq_lib.mean_bits(saved), **final,
      "group_size": args.group_size, "logit_lr": args.logit_lr,
      "init_bits": args.init_bits, "finetune_steps": args.finetune_steps,
      "finetune_lr": args.finetune_lr, "runs": runs, "plot": plot,
      "seed": args.seed, "model_seed": lm_lib.model_seed(args),
      "command": train_lib.command_line(MODULE, args.argv),
      "wall_time_s": time.time() - start, "jax_backend": jax.default_backend()}
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  print(table(runs, float_loss, float_run["dense_fp32_bytes"]))
  print(f"wrote {model_path} (DiffQ at lambda {args.save_lambda:g}: "
        f"{final['file_bytes']:,} bytes, {final['ratio']:.2f}x smaller than float32, "
        f"validation loss {final['val_loss']:.4f} vs float {float_loss:.4f})")
  if plot:
    print(f"wrote {plot}")
  print(f"wrote {os.path.join(args.out, 'results.json')}")
  return results


if __name__ == "__main__":
  main(sys.argv[1:])
