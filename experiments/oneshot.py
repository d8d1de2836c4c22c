"""One-shot compression of a pretrained transformer from calibration data.

Compresses every block kernel of SmolLM2-135M (``--model smollm2-135m``) or
all-MiniLM-L6-v2 (``--model minilm-l6``) with ``cx.oneshot.calibrate_sequential``
(GPTQ, RTN, SparseGPT, Wanda or magnitude; ``--method none`` is the float
baseline), writes ``model.cx`` and ``results.json``, and measures the model
*decoded from model.cx*.

SmolLM2: perplexity on the last 10% of tiny-shakespeare, non-overlapping
windows of ``--context`` tokens (no BOS); calibration: ``--calib-tokens``
tokens in random windows of the first 90%. The float model is the
dequantized Q4_1 checkpoint. MiniLM: calibration on lines of the first 90%;
on ``--eval-lines`` lines of the last 10%, the mean cosine similarity of the
compressed model's sentence embeddings to the float model's and the recall@10
of each line's float nearest neighbours (``perplexity`` is then absent).
Embeddings, norms and biases stay float32.

Example:
  python -m experiments.oneshot --model smollm2-135m --method gptq --bits 4
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import compressax as cx
from experiments.llm import models as models_lm
from experiments import train as train_lib

MODULE = "experiments.oneshot"
DATA = "../shared/data/tinyshakespeare.txt"   # beside the checkout, as the MNIST file


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog=f"python -m {MODULE}",
                              description=__doc__.split("\n\n")[0],
                              formatter_class=train_lib.HelpFormatter)
  p.add_argument("--model", default="smollm2-135m", choices=sorted(models_lm.WHEELS),
                 help="the pretrained model")
  p.add_argument("--method", default="gptq",
                 choices=["none", "rtn", "gptq", "hqq", "sparsegpt", "wanda", "magnitude"],
                 help="the one-shot method of every block kernel (none: float)")
  p.add_argument("--bits", type=int, default=4, help="bits (rtn, gptq, hqq; sparsegpt joint)")
  p.add_argument("--group-size", type=int, default=None,
                 help="input rows per grid (default: one grid per output column)")
  p.add_argument("--act-order", action="store_true", help="GPTQ rows by descending diag H")
  p.add_argument("--joint", action="store_true",
                 help="sparsegpt: also quantize the kept weights to --bits (joint mode)")
  p.add_argument("--sparsity", type=float, default=0.5, help="fraction pruned")
  p.add_argument("--n-m", default=None, help="N:M pattern, keep N of M (e.g. 2:4)")
  p.add_argument("--one-pass", action="store_true",
                 help="calibrate every block on the float model's activations")
  p.add_argument("--data", default=DATA, help="the text file (run from the repo root)")
  p.add_argument("--context", type=int, default=512, help="tokens per window")
  p.add_argument("--calib-tokens", type=int, default=8192, help="calibration tokens")
  p.add_argument("--max-eval-windows", type=int, default=None,
                 help="evaluate only the first N windows (quick runs)")
  p.add_argument("--eval-batch", type=int, default=4, help="windows per forward call")
  p.add_argument("--eval-lines", type=int, default=2000,
                 help="minilm: held-out lines for the cosine and the neighbour recall")
  p.add_argument("--recall-k", type=int, default=10,
                 help="minilm: neighbours per line for the recall")
  p.add_argument("--baseline-from", default=None,
                 help="a --method none run's results.json to take the float baseline "
                      "from (same model, context and windows) instead of measuring it")
  p.add_argument("--seed", type=int, default=0, help="calibration windows' seed")
  p.add_argument("--cache", default=models_lm.CACHE, help="model file cache")
  p.add_argument("--out", default=None, help="output directory "
                 "(default runs/oneshot/MODEL-METHOD-SETTINGS)")
  p.add_argument("--quiet", action="store_true", help="no progress bars")
  return p


def method_of(args):
  """The ``cx.oneshot`` method for every block kernel, or None."""
  nm = tuple(int(v) for v in args.n_m.split(":")) if args.n_m else None
  sp = None if nm else args.sparsity
  o = cx.oneshot
  return {"none": None,
          "rtn": o.RTN(args.bits, group_size=args.group_size),
          "gptq": o.GPTQ(args.bits, group_size=args.group_size, act_order=args.act_order),
          "hqq": o.HQQ(args.bits, group_size=args.group_size),
          "sparsegpt": o.SparseGPT(sparsity=sp, n_m=nm,
                                   bits=args.bits if args.joint else None),
          "wanda": o.Wanda(sparsity=sp, n_m=nm),
          "magnitude": o.Magnitude(sparsity=sp, n_m=nm)}[args.method]


def tag(args) -> str:
  if args.method == "none":
    return "float"
  if args.method in ("rtn", "gptq", "hqq"):
    t = f"{args.method}-{args.bits}b" + (f"-g{args.group_size}" if args.group_size else "")
    t += "-act" if args.act_order else ""
  else:
    t = f"{args.method}-" + (args.n_m.replace(":", "of") if args.n_m else f"{args.sparsity:g}")
    t += f"-{args.bits}b" if args.joint and args.method == "sparsegpt" else ""
  return t + ("-onepass" if args.one_pass else "")


def split_text(path: str):
  text = open(path, encoding="utf-8").read()
  cut = int(0.9 * len(text))
  return text[:cut], text[cut:]


def lm_windows(tok, text: str, context: int) -> np.ndarray:
  ids = np.asarray(tok.encode(text).ids, np.int32)
  n = len(ids) // context
  return ids[:n * context].reshape(n, context)


def perplexity(model, params, windows: np.ndarray, batch: int, quiet: bool) -> float:
  """exp(mean NLL) over every predicted token of the windows."""
  f = jax.jit(lambda p, x: models_lm.nll(model, p, x))
  total = 0.0
  with train_lib.progress(len(windows), "eval", quiet) as bar:
    for i in range(0, len(windows), batch):
      total += float(f(params, jnp.asarray(windows[i:i + batch])))
      bar.update(len(windows[i:i + batch]))
  return math.exp(total / (len(windows) * (windows.shape[1] - 1)))


def neighbour_recall(ref, emb, k: int) -> float:
  """Mean recall@k of each row's ``k`` nearest rows of ``ref`` among ``emb``'s.

  Rows are unit-norm embeddings; neighbours by cosine similarity, a row never
  its own neighbour. For every row ``i``: ``|N_k^ref(i) & N_k^emb(i)| / k``.
  """
  ref, emb = np.asarray(ref, np.float64), np.asarray(emb, np.float64)
  n = len(ref)
  if not 0 < k < n:
    raise ValueError(f"recall_k must be in [1, {n - 1}] for {n} lines, got {k}")

  def top(e):
    sim = e @ e.T
    np.fill_diagonal(sim, -np.inf)
    return np.argpartition(-sim, k - 1, axis=1)[:, :k]

  a, b = top(ref), top(emb)
  hits = [len(np.intersect1d(a[i], b[i])) for i in range(n)]
  return float(np.mean(hits)) / k


def bert_batches(tok, lines, context: int, batch: int):
  tok.enable_truncation(context)
  tok.enable_padding(length=context)
  out = []
  for i in range(0, len(lines), batch):
    enc = tok.encode_batch(lines[i:i + batch])
    out.append((np.asarray([e.ids for e in enc], np.int32),
                np.asarray([e.attention_mask for e in enc], np.float32)))
  return out


def to_tree(params):
  """The saved tree: string keys throughout (blocks as ``block_00`` ...)."""
  out = dict(params)
  out["blocks"] = {f"block_{i:02d}": b for i, b in enumerate(params["blocks"])}
  return out


def from_tree(tree):
  out = dict(tree)
  out["blocks"] = [tree["blocks"][k] for k in sorted(tree["blocks"])]
  return out


def main(argv: list[str] | None = None) -> dict:
  args = parser().parse_args(argv)
  args.argv = sys.argv[1:] if argv is None else argv
  start = time.time()
  out_dir = args.out or os.path.join("runs", "oneshot", f"{args.model}-{tag(args)}")
  model, params, tok = models_lm.load(args.model, args.cache)
  train_text, test_text = split_text(args.data)
  rng = np.random.default_rng(args.seed)
  is_lm = args.model == "smollm2-135m"
  if is_lm:
    ids = lm_windows(tok, train_text, args.context)
    pick = rng.choice(len(ids), size=max(1, args.calib_tokens // args.context), replace=False)
    calib = [model.embed(params, jnp.asarray(ids[j][None])) for j in sorted(pick)]
    evals = lm_windows(tok, test_text, args.context)[:args.max_eval_windows]
  else:
    lines = [s for s in train_text.split("\n") if s.strip()]
    pick = rng.choice(len(lines), size=min(len(lines), args.calib_tokens // 16), replace=False)
    calib = [model.embed(params, jnp.asarray(t), jnp.asarray(m))
             for t, m in bert_batches(tok, [lines[j] for j in sorted(pick)], 64, 64)]
    test_lines = [s for s in test_text.split("\n") if s.strip()]
    evals = bert_batches(tok, test_lines[:args.eval_lines], 64, 64)[:args.max_eval_windows]

  method = method_of(args)
  info = {"seconds": 0.0}
  compressed = params
  if method is not None:
    blocks, info = cx.oneshot.calibrate_sequential(
        model.block_apply, params["blocks"], calib, method,
        sequential=not args.one_pass, progress=not args.quiet)
    compressed = dict(params, blocks=blocks)

  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, "model.cx")
  cx.save(path, to_tree(compressed))
  decoded = from_tree(cx.load(path))
  file_bytes = os.path.getsize(path)
  dense = 4 * sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(params))
  results = {"model": args.model, "dataset": os.path.basename(args.data),
             "method": args.method, "settings": tag(args),
             "test_error": None, "baseline_test_error": None,
             "file": path, "file_bytes": file_bytes, "dense_fp32_bytes": dense,
             "ratio": dense / file_bytes, "seed": args.seed,
             "compress_time_s": info["seconds"], "calib_tokens": args.calib_tokens,
             "context": args.context, "eval_windows": len(evals),
             "layer_errors": {k: v for k, v in info.items() if k != "seconds"}}
  if is_lm:
    t0 = time.time()
    results["perplexity"] = perplexity(model, decoded, evals, args.eval_batch, args.quiet)
    results["eval_time_s"] = time.time() - t0   # compile included
    if method is None:
      results["baseline_perplexity"] = results["perplexity"]
    elif args.baseline_from:
      with open(args.baseline_from) as f:
        base = json.load(f)
      assert base["eval_windows"] == len(evals) and base["context"] == args.context
      results["baseline_perplexity"] = base["perplexity"]
    else:
      results["baseline_perplexity"] = perplexity(model, params, evals, args.eval_batch,
                                                  args.quiet)
    results["delta_perplexity"] = results["perplexity"] - results["baseline_perplexity"]
  else:
    f = jax.jit(model.__call__)
    emb = np.concatenate([np.asarray(f(decoded, t, m)) for t, m in evals])
    ref = np.concatenate([np.asarray(f(params, t, m)) for t, m in evals])
    results["eval_lines"] = len(ref)
    results["mean_cosine_to_float"] = float(np.mean(np.sum(emb * ref, axis=-1)))
    results["recall_k"] = args.recall_k
    results["neighbour_recall"] = neighbour_recall(ref, emb, args.recall_k)
  results["command"] = train_lib.command_line(MODULE, args.argv)
  results["wall_time_s"] = time.time() - start
  # Peak resident memory of the whole command (Linux: KiB), load and evaluation included.
  results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  results["jax_backend"] = jax.default_backend()
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  show = {k: results[k] for k in ("settings", "perplexity", "baseline_perplexity",
                                  "mean_cosine_to_float", "neighbour_recall",
                                  "file_bytes", "ratio",
                                  "compress_time_s", "eval_time_s") if k in results}
  print(json.dumps(show))
  print(os.path.join(out_dir, "results.json"))
  return results


if __name__ == "__main__":
  main()
