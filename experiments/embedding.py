"""Task-aware vs post-hoc compression of an LM's embedding table (issue 14).

The on-device NLU paper this follows compresses the word-embedding table
jointly with the task (task-aware) to 97.4% smaller (about 38x) for under
3.7% degradation, and finds that task-aware beats compressing the table after
training. Here the table is the 10,000 x 256 token embedding of
``experiments.lm``'s word-level model, which is also its output layer
(tied), so compressing it compresses both.

For every method and every target ratio in ``--ratios`` (the table's float32
bytes over its bytes in the file), the setting is the largest that fits the
ratio:

* ``lowrank``: rank ``r`` factors (``cx.methods.LowRank``: truncated SVD,
  float32 factors), the largest ``r`` with ``r (V + d) * 4`` bytes in budget;
* ``pq``: product quantization of the rows (``cx.methods.ProductQuantize``:
  ``m`` chunks, ``K = 2**bits`` codewords each; codes plus float32
  codebooks), the ``(m, bits)`` with the most bytes in budget;
* ``diffq``: DiffQ's learned bits (``cx.methods.DiffQ``, groups of
  ``--group-size``, at least 1 bit) started at ``b = floor(32 / ratio)``
  bits; only ratios up to 32x (DiffQ stores at least one bit per weight).

and each is run two ways:

* **post-hoc**: the trained float model's table compressed once (the SVD,
  the k-means, or uniform codes at ``b`` bits), nothing retrained;
* **task-aware**: the same method inside the training loop of the whole
  model (``cx.Plan`` view, ``--finetune-steps`` of AdamW on the LM loss, the
  factors or codebooks trained through it; DiffQ with its size penalty
  ``--diffq-lambda``, its bits learned), then finalized. The control is the
  float model after the same fine-tuning (``float_finetuned_val_loss``).

Every model is saved with ``cx.save``; the validation loss is measured on
the decoded file, and the table's bytes are its payload in the file
(``cx.size_report``). ``results.json`` lists every run; ``DIR/embedding.png``
plots relative validation-loss increase against the table's ratio.

References:
  Jégou, Douze, Schmid, *Product quantization for nearest neighbor search*,
  TPAMI 2011. Défossez, Adi, Synnaeve, *Differentiable Model Compression via
  Pseudo Quantization Noise*, 2021. https://arxiv.org/abs/2104.09987
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax

import compressax as cx
from experiments import diffq_lm
from experiments import lm as lm_lib
from experiments import train as train_lib

MODULE = "experiments.embedding"
TABLE = "params/embed/embedding"
METHODS = ("lowrank", "pq", "diffq")


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__,
                              formatter_class=train_lib.HelpFormatter)
  lm_lib.add_lm_args(p)
  p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                 help="table compressions to run")
  p.add_argument("--ratios", type=float, nargs="+", default=[10.0, 20.0, 38.0, 50.0],
                 help="target compression ratios of the table")
  p.add_argument("--finetune-steps", type=int, default=300,
                 help="training steps of every task-aware run")
  p.add_argument("--finetune-lr", type=float, default=3e-4,
                 help="peak AdamW learning rate of the task-aware runs")
  p.add_argument("--group-size", type=int, default=16, help="DiffQ: weights per bit logit")
  p.add_argument("--diffq-lambda", type=float, default=0.3,
                 help="DiffQ: size penalty per MB of the table")
  p.add_argument("--pq-iters", type=int, default=25, help="Lloyd iterations of the PQ init")
  lm_lib.add_model_seed_arg(p)
  p.add_argument("--seed", type=int, default=0,
                 help="every run's windows and keys; the float model's too unless --model-seed")
  p.add_argument("--out", default=None, help="output directory (default: runs/embedding-...)")
  p.add_argument("--quiet", action="store_true", help="no progress bars")
  p.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
  args = p.parse_args(argv)
  args.argv = list(sys.argv[1:] if argv is None else argv)
  if any(not r > 1 for r in args.ratios):
    p.error(f"--ratios must be > 1, got {args.ratios}")
  if args.finetune_steps < 1:
    p.error("--finetune-steps must be >= 1")
  if args.out is None:
    args.out = f"runs/embedding-{args.level}-s{args.seed}"
  return args


def setting(method: str, ratio: float, rows: int, cols: int) -> dict | None:
  """The largest setting of ``method`` whose table fits ``ratio``; None if none does."""
  budget = rows * cols * 4 / ratio
  if method == "lowrank":
    r = int(budget // ((rows + cols) * 4))
    return {"rank": r} if r >= 1 else None
  if method == "pq":
    fits = [(rows * m * b / 8 + (2 ** b) * cols * 4, b, m)
            for m in range(1, cols + 1) if cols % m == 0
            for b in range(1, 13) if 2 ** b <= rows
            if rows * m * b / 8 + (2 ** b) * cols * 4 <= budget]
    if not fits:
      return None
    _, b, m = max(fits)
    return {"subvectors": m, "bits": b}
  b = int(32 // ratio)
  return {"bits": b} if b >= 1 else None


def method_of(method: str, s: dict, args, task_aware: bool) -> cx.methods.Method:
  if method == "lowrank":
    return cx.methods.LowRank(rank=s["rank"])
  if method == "pq":
    return cx.methods.ProductQuantize(s["subvectors"], s["bits"], iters=args.pq_iters)
  if not task_aware:
    return cx.methods.Uniform(s["bits"])
  return cx.methods.DiffQ(size_penalty=args.diffq_lambda, group_size=args.group_size,
                          init_bits=s["bits"] + 0.5, b_min=1, b_max=15,
                          logit_learning_rate=0.05)


def compress(model, corpus, params, method: str, s: dict, args, task_aware: bool):
  """The model with its table compressed one of the two ways."""
  m = method_of(method, s, args, task_aware)
  plan = cx.Plan([(TABLE, m)])
  train = plan.init(params, key=jax.random.PRNGKey(args.seed))
  if not task_aware:
    return plan.finalize(train)
  loss = (diffq_lm.diffq_loss(model, plan) if method == "diffq"
          else diffq_lm.qat_loss(model, plan))
  tx = plan.optimizer(lm_lib.cosine_adamw(args.finetune_lr, args.finetune_steps,
                                          args.finetune_steps // 10))
  train, _ = lm_lib.train(model, train, tx, corpus.train, steps=args.finetune_steps,
                          batch=args.batch, seed=args.seed + 1, loss_fn=loss,
                          quiet=args.quiet, desc=f"{method} task-aware")
  return plan.finalize(train)


def table_bytes(path: str) -> int:
  """The table's payload bytes in the file (values and indices)."""
  leaf = {s.path: s for s in cx.size_report(path).leaves}[TABLE]
  return leaf.value_bytes + leaf.index_bytes


def plot(path: str, runs: list[dict], title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.5, 4))
  for i, method in enumerate(METHODS):
    for how, style in (("post-hoc", "--"), ("task-aware", "-")):
      pts = sorted((r["table_ratio"], 100 * r["rel_increase"]) for r in runs
                   if r["method"] == method and r["how"] == how)
      if pts:
        ax.plot(*zip(*pts), style, marker="o", color=f"C{i}", label=f"{method}, {how}")
  ax.axhline(3.7, color="gray", ls=":", label="+3.7% (the paper's bound)")
  ax.axvline(38, color="gray", ls="-.", lw=0.8)
  ax.set_xscale("log")
  ax.set_yscale("symlog", linthresh=1)
  # Below 0 only if a run is better than float.
  ax.set_ylim(bottom=min([0.0] + [100 * r["rel_increase"] for r in runs]))
  ax.set_xlabel("embedding table: float32 bytes / bytes in the file")
  ax.set_ylabel("validation loss increase over float (%)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> dict:
  args = parse_args(argv)
  start = time.time()
  model, corpus, config = lm_lib.setup(args)
  params, info = lm_lib.pretrained(args, model, corpus)
  float_path = os.path.join(args.out, "runs", "float32.cx")
  float_run = diffq_lm.saved_run(float_path, params, model, corpus, 1.0)
  float_loss, float_table = float_run["val_loss"], table_bytes(float_path)
  # The control: the same fine-tuning without compression, which the
  # task-aware runs also get.
  tx = lm_lib.cosine_adamw(args.finetune_lr, args.finetune_steps, args.finetune_steps // 10)
  tuned, _ = lm_lib.train(model, params, tx, corpus.train, steps=args.finetune_steps,
                          batch=args.batch, seed=args.seed + 1, quiet=args.quiet,
                          desc="float fine-tuned")
  tuned_loss = lm_lib.evaluate(model, tuned, corpus.val)
  rows, cols = config.vocab, config.width
  runs = []
  for method in args.methods:
    for ratio in args.ratios:
      s = setting(method, ratio, rows, cols)
      if s is None:
        if not args.quiet:
          print(f"  {method} at {ratio:g}x: no setting fits", flush=True)
        continue
      for how in ("post-hoc", "task-aware"):
        t0 = time.time()
        tree = compress(model, corpus, params, method, s, args, how == "task-aware")
        name = f"{method}-{ratio:g}x-{how}.cx"
        run = diffq_lm.saved_run(os.path.join(args.out, "runs", name), tree, model,
                                 corpus, float_loss)
        tb = table_bytes(run["file"])
        entry = {"method": method, "how": how, "target_ratio": ratio, "setting": s,
                 "table_bytes": tb, "table_ratio": float_table / tb, **run,
                 "wall_time_s": time.time() - t0}
        runs.append(entry)
        if not args.quiet:
          print(f"  {name}: table {tb:,} B ({entry['table_ratio']:.1f}x), "
                f"validation loss {run['val_loss']:.4f} ({run['rel_increase']:+.2%})",
                flush=True)
  os.makedirs(args.out, exist_ok=True)
  png = None
  if not args.no_plot and runs:
    png = os.path.join(args.out, "embedding.png")
    plot(png, runs, f"{args.level}-level LM: embedding table, post-hoc vs task-aware")
  results = {
      "experiment": "embedding", "model": f"{args.level}lm", "dataset": "tinyshakespeare",
      "float_val_loss": float_loss, "float_table_bytes": float_table,
      "float_finetuned_val_loss": tuned_loss,
      "float_file_bytes": float_run["file_bytes"], "float_cache": info["cache"],
      "finetune_steps": args.finetune_steps, "finetune_lr": args.finetune_lr,
      "diffq_lambda": args.diffq_lambda, "runs": runs, "plot": png, "seed": args.seed,
      "model_seed": lm_lib.model_seed(args),
      "command": train_lib.command_line(MODULE, args.argv),
      "wall_time_s": time.time() - start, "jax_backend": jax.default_backend()}
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  print(f"{'method':<8} {'how':<10} {'setting':<26} {'table B':>9} {'ratio':>6} "
        f"{'val loss':>8} {'+loss':>7}")
  print(f"{'float32':<8} {'':<10} {'':<26} {float_table:>9,} {1:>6.1f} "
        f"{float_loss:>8.4f} {0:>6.2%}")
  print(f"{'float32':<8} {'fine-tune':<10} {'':<26} {float_table:>9,} {1:>6.1f} "
        f"{tuned_loss:>8.4f} {tuned_loss / float_loss - 1:>6.2%}")
  for r in runs:
    s = ",".join(f"{k}={v}" for k, v in r["setting"].items())
    print(f"{r['method']:<8} {r['how']:<10} {s:<26} {r['table_bytes']:>9,} "
          f"{r['table_ratio']:>6.1f} {r['val_loss']:>8.4f} {r['rel_increase']:>6.2%}")
  if png:
    print(f"wrote {png}")
  print(f"wrote {os.path.join(args.out, 'results.json')}")
  return results


if __name__ == "__main__":
  main(sys.argv[1:])
