"""2:4 sparsity + 4-bit codes on MiniLM, fine-tuned by distillation (issue 14).

Wang et al. (2022) compress pre-trained transformers (BERT, wav2vec2, ViT) to
4-bit weights with 50% fine-grained N:M sparsity, "16x", with a
zero-preserving quantizer and sparsity-aware fine-tuning under distillation
from the float model. Here, on all-MiniLM-L6-v2 (the loader of
``experiments.oneshot``) and tiny-shakespeare lines:

1. **Student**: every encoder kernel (``q k v o up down`` of the 6 blocks)
   under ``cx.methods.NM(2, 4) >> cx.methods.Uniform(4, symmetric=True,
   axis=-1)`` in one ``cx.Plan``: 2 of every 4 weights along the input axis
   kept, the kept weights on a symmetric 4-bit grid with one scale per output
   channel (zero is a grid point, so the pruned weights stay exactly zero:
   the zero-preserving quantizer), straight-through gradients. Embeddings,
   LayerNorms and biases stay float32. ``--init magnitude`` starts from the
   float weights (the 2:4 mask by magnitude, Wang et al.); ``--init oneshot``
   from the one-shot SparseGPT 2:4 + 4-bit model of step 3.
2. **Distillation**: ``--steps`` of AdamW on random batches of training
   lines (first 90% of the text, ``--context`` tokens): the mean over blocks
   of the hidden-state MSE (``cx.distill.hint_loss``, padding masked) plus
   ``--emb-weight`` times the sentence embeddings' cosine distance
   (``cx.distill.cosine_loss``), against the float model.
3. **One-shot baseline**: ``python -m experiments.oneshot --model minilm-l6
   --method sparsegpt --n-m 2:4 --joint --bits 4`` run into ``DIR/oneshot``
   (skip with ``--no-oneshot``).

Both are measured as in ``experiments.oneshot``, on the weights decoded from
their ``model.cx``: the mean cosine to the float model's embeddings and
recall@10 of the float nearest neighbours on the first ``--eval-lines``
non-empty lines of the last 10%; and the encoder kernels' bytes in the file
(``cx.size_report``) against their float32 bytes. ``results.json`` has both
and the loss curve (``DIR/loss.png``).

References:
  Wang, Wang, Cai, Chen, Jiao, Zhang, Zhao, Wang, *Deep Compression of
  Pre-trained Transformer Models*, NeurIPS 2022.
  https://openreview.net/forum?id=ijVH3GyGgrp
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import compressax as cx
from experiments import lm as lm_lib
from experiments import oneshot as oneshot_lib
from experiments import train as train_lib
from experiments.llm import models as models_lm

MODULE = "experiments.bert_nm"
KERNELS = r"^blocks/.*/kernel$"


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__,
                              formatter_class=train_lib.HelpFormatter)
  p.add_argument("--n-m", default="2:4", help="keep N of every M along the input axis")
  p.add_argument("--bits", type=int, default=4, help="bits of the kept weights' codes")
  p.add_argument("--scale-dtype", choices=("float32", "float16", "bfloat16"),
                 default="float32", help="dtype the per-channel scales are stored in")
  p.add_argument("--init", choices=("magnitude", "oneshot"), default="magnitude",
                 help="start from the float weights or from the one-shot model")
  p.add_argument("--steps", type=int, default=600, help="distillation steps")
  p.add_argument("--batch", type=int, default=32, help="lines per step")
  p.add_argument("--context", type=int, default=32,
                 help="tokens per training line (evaluation: 64, as experiments.oneshot)")
  p.add_argument("--lr", type=float, default=1e-4, help="peak AdamW learning rate")
  p.add_argument("--emb-weight", type=float, default=1.0,
                 help="weight of the embedding cosine term (hidden-state MSE: 1)")
  p.add_argument("--eval-lines", type=int, default=2000,
                 help="held-out lines for the cosine and the neighbour recall")
  p.add_argument("--recall-k", type=int, default=10, help="neighbours per line")
  p.add_argument("--no-oneshot", action="store_true",
                 help="skip the one-shot baseline (--init magnitude only)")
  p.add_argument("--data", default=oneshot_lib.DATA, help="the text file")
  p.add_argument("--cache", default=models_lm.CACHE, help="model file cache")
  p.add_argument("--seed", type=int, default=0, help="batches' seed")
  p.add_argument("--out", default=None, help="output directory (default runs/bert_nm-...)")
  p.add_argument("--quiet", action="store_true", help="no progress bars")
  args = p.parse_args(argv)
  args.argv = list(sys.argv[1:] if argv is None else argv)
  try:
    args.nm = tuple(int(v) for v in args.n_m.split(":"))
    assert len(args.nm) == 2 and 0 < args.nm[0] <= args.nm[1]
  except (ValueError, AssertionError):
    p.error(f"--n-m must be N:M with 0 < N <= M, got {args.n_m!r}")
  if not 2 <= args.bits <= 16:
    p.error(f"--bits must lie in [2, 16] (a symmetric grid), got {args.bits}")
  if args.steps < 1:
    p.error("--steps must be >= 1")
  if args.init == "oneshot" and args.no_oneshot:
    p.error("--init oneshot needs the one-shot run (drop --no-oneshot)")
  if args.out is None:
    scales = "" if args.scale_dtype == "float32" else f"-{args.scale_dtype}"
    args.out = (f"runs/bert_nm-{args.n_m.replace(':', 'of')}-{args.bits}b{scales}-"
                f"{args.init}")
  return args


def plan_of(n: int, m: int, bits: int, scale_dtype: str = "float32") -> cx.Plan:
  """Every encoder kernel: N:M along the input axis, then symmetric per-channel
  codes (scales stored in ``scale_dtype``)."""
  return cx.Plan([(KERNELS, cx.methods.NM(n, m) >> cx.methods.Uniform(
      bits, symmetric=True, axis=-1, scale_dtype=scale_dtype))])


def hidden_states(model, params, tokens, mask):
  """Every block's output ``(batch, seq, width)`` and the sentence embeddings."""
  x = model.embed(params, tokens, mask)
  hs = []
  for p in params["blocks"]:
    x = model.block_apply(p, x)
    hs.append(x[..., :-1])
  return hs, model.head(params, x)


def distill_loss(model, teacher, plan: cx.Plan, emb_weight: float):
  """``loss(train, tokens, mask)``: hidden-state MSE over blocks + cosine term."""
  def loss(train, tokens, mask):
    student = oneshot_lib.from_tree(plan.view(train))
    hs, es = hidden_states(model, student, tokens, mask)
    ht, et = jax.lax.stop_gradient(hidden_states(model, teacher, tokens, mask))
    w = mask / jnp.maximum(jnp.sum(mask), 1.0)
    hid = sum(jnp.sum(cx.distill.hint_loss(s, t) * w) for s, t in zip(hs, ht)) / len(hs)
    return hid + emb_weight * jnp.mean(cx.distill.cosine_loss(es, et))
  return loss


def distill(model, teacher, start, batches, args, plan: cx.Plan):
  """``args.steps`` AdamW steps on ``batches`` (a list of (tokens, mask)); returns
  ``(finalized tree, losses)``."""
  train = plan.init(oneshot_lib.to_tree(start))
  tx = plan.optimizer(lm_lib.cosine_adamw(args.lr, args.steps, max(args.steps // 10, 1),
                                          weight_decay=0.01))
  step = lm_lib.jit_step(tx, distill_loss(model, teacher, plan, args.emb_weight))
  state = tx.init(train)
  rng = np.random.default_rng(args.seed)
  losses = []
  with train_lib.progress(args.steps, "distill", args.quiet) as bar:
    for _ in range(args.steps):
      tokens, mask = batches[rng.integers(len(batches))]
      train, state, loss = step(train, state, tokens, mask)
      losses.append(float(loss))
      bar.update(1)
      bar.set_postfix(loss=losses[-1])
  return plan.finalize(train), losses


def line_batches(tok, lines, context: int, batch: int, rng) -> list:
  """Lines shuffled by ``rng`` into batches of ``batch`` (the last dropped)."""
  order = rng.permutation(len(lines))
  lines = [lines[i] for i in order[:len(lines) // batch * batch]]
  return oneshot_lib.bert_batches(tok, lines, context, batch)


def embed_all(model, params, batches) -> np.ndarray:
  f = jax.jit(model.__call__)
  return np.concatenate([np.asarray(f(params, t, m)) for t, m in batches])


def kernel_bytes(path: str) -> tuple[int, int]:
  """(bytes in the file, float32 bytes) of the encoder kernels."""
  rows = [s for s in cx.size_report(path).leaves if re.search(KERNELS, s.path)]
  return (sum(s.value_bytes + s.index_bytes for s in rows),
          4 * sum(s.params for s in rows))


def measure(model, float_params, path: str, evals, ref: np.ndarray, k: int) -> dict:
  """What the file holds: cosine and recall of its decoded embeddings, bytes."""
  decoded = oneshot_lib.from_tree(cx.load(path))
  emb = embed_all(model, decoded, evals)
  kb, kf = kernel_bytes(path)
  dense = 4 * sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(float_params))
  size = os.path.getsize(path)
  return {"file": path, "file_bytes": size, "dense_fp32_bytes": dense, "ratio": dense / size,
          "kernel_bytes": kb, "kernel_fp32_bytes": kf, "kernel_ratio": kf / kb,
          "mean_cosine_to_float": float(np.mean(np.sum(emb * ref, axis=-1))),
          "neighbour_recall": oneshot_lib.neighbour_recall(ref, emb, k)}


def plot_loss(path: str, losses: list[float], title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot(np.arange(1, len(losses) + 1), losses, lw=0.6, alpha=0.5, label="step")
  w = max(len(losses) // 20, 1)
  if len(losses) >= w:
    smooth = np.convolve(losses, np.ones(w) / w, mode="valid")
    ax.plot(np.arange(w, len(losses) + 1), smooth, label=f"mean of {w}")
  ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.set_ylabel("distillation loss")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> dict:
  args = parse_args(argv)
  start_time = time.time()
  model, params, tok = models_lm.load("minilm-l6", args.cache)
  train_text, test_text = oneshot_lib.split_text(args.data)
  rng = np.random.default_rng(args.seed)
  train_lines = [s for s in train_text.split("\n") if s.strip()]
  test_lines = [s for s in test_text.split("\n") if s.strip()][:args.eval_lines]
  batches = line_batches(tok, train_lines, args.context, args.batch, rng)
  evals = oneshot_lib.bert_batches(tok, test_lines, 64, 64)
  ref = embed_all(model, params, evals)

  results = {"experiment": "bert_nm", "model": "minilm-l6", "n_m": args.n_m,
             "bits": args.bits, "scale_dtype": args.scale_dtype, "init": args.init,
             "steps": args.steps,
             "eval_lines": len(ref), "recall_k": args.recall_k}
  start = params
  if not args.no_oneshot:
    flags = ["--model", "minilm-l6", "--method", "sparsegpt", "--n-m", args.n_m,
             "--joint", "--bits", str(args.bits), "--eval-lines", str(args.eval_lines),
             "--recall-k", str(args.recall_k), "--data", args.data, "--cache", args.cache,
             "--out", os.path.join(args.out, "oneshot")] + (["--quiet"] if args.quiet else [])
    one = oneshot_lib.main(flags)
    results["oneshot"] = {**measure(model, params, one["file"], evals, ref, args.recall_k),
                          "command": one["command"]}
    if args.init == "oneshot":
      start = oneshot_lib.from_tree(cx.load(one["file"]))

  n, m = args.nm
  plan = plan_of(n, m, args.bits, args.scale_dtype)
  before = os.path.join(args.out, "start.cx")
  os.makedirs(args.out, exist_ok=True)
  cx.save(before, plan.finalize(plan.init(oneshot_lib.to_tree(start))))
  results["start"] = measure(model, params, before, evals, ref, args.recall_k)
  tree, losses = distill(model, params, start, batches, args, plan)
  path = os.path.join(args.out, "model.cx")
  cx.save(path, tree)
  results.update(measure(model, params, path, evals, ref, args.recall_k))
  results["losses"] = losses
  png = os.path.join(args.out, "loss.png")
  plot_loss(png, losses, f"MiniLM {args.n_m} + {args.bits}-bit, distillation")
  results.update(plot=png, seed=args.seed, command=train_lib.command_line(MODULE, args.argv),
                 wall_time_s=time.time() - start_time, jax_backend=jax.default_backend())
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  rows = [("start (no training)", results["start"]), ("distilled", results)]
  if "oneshot" in results:
    rows.insert(0, ("one-shot sparsegpt", results["oneshot"]))
  print(f"{'model':<22} {'cosine':>7} {'recall@' + str(args.recall_k):>9} "
        f"{'kernel B':>11} {'kernel x':>8} {'file B':>11}")
  for name, r in rows:
    print(f"{name:<22} {r['mean_cosine_to_float']:>7.4f} {r['neighbour_recall']:>9.3f} "
          f"{r['kernel_bytes']:>11,} {r['kernel_ratio']:>8.2f} {r['file_bytes']:>11,}")
  print(f"wrote {os.path.join(args.out, 'results.json')}")
  return results


if __name__ == "__main__":
  main(sys.argv[1:])
