"""Repeat an experiment over the values of one flag and over seeds; tabulate, plot.

(Formerly ``experiments.sweep``; that name now belongs to the one-``jit``
bits x sparsity sweep, :mod:`experiments.sweep`.)

Every run is the experiment's own ``main`` with its own ``DIR/model.cx`` and
``results.json``, so each point of the sweep is a real file whose size and
decoded test error are measured, not estimated. Flags the sweep does not know
are passed through to the experiment.

Example (accuracy vs size of Deep Compression as the bits per weight drop)::

  python -m experiments.repeat --experiment deep_compression \\
      --flag bits --values ip=3 ip=4 ip=5 ip=6 --seeds 0 1 -- --quiet

writes ``runs/repeat/deep_compression-bits/{sweep.json, sweep.png}``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import sys

from experiments import train as train_lib

MODULE = "experiments.repeat"
EXPERIMENTS = ("deep_compression", "quantized_distillation")


def parse_args(argv=None):
  p = argparse.ArgumentParser(prog=f"python -m {MODULE}",
                              description=__doc__.split("\n\n")[0],
                              formatter_class=train_lib.HelpFormatter)
  p.add_argument("--experiment", required=True, choices=EXPERIMENTS,
                 help="the experiment to run (experiments.NAME)")
  p.add_argument("--flag", required=True,
                 help="the experiment's flag to vary, without dashes (e.g. bits)")
  p.add_argument("--values", nargs="+", required=True,
                 help="the values of --flag, one run each (per seed)")
  p.add_argument("--seeds", nargs="+", type=int, default=[0],
                 help="the seeds of every value")
  p.add_argument("--out", default=None, help="default runs/repeat/EXPERIMENT-FLAG")
  args, rest = p.parse_known_args(argv)
  if rest and rest[0] == "--":
    rest = rest[1:]
  for reserved in ("--seed", "--out", f"--{args.flag}"):
    if reserved in rest:
      p.error(f"{reserved} is set by the sweep; do not pass it through")
  args.rest = rest
  if args.out is None:
    args.out = os.path.join("runs", "repeat", f"{args.experiment}-{args.flag}")
  return args


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  experiment = importlib.import_module(f"experiments.{args.experiment}")
  flag = "--" + args.flag.replace("_", "-")
  rows = []
  for value in args.values:
    for seed in args.seeds:
      tag = "".join(c if c.isalnum() or c in "-_." else "_" for c in value)
      out = os.path.join(args.out, f"{args.flag}={tag}-seed{seed}")
      run_argv = [flag, value, "--seed", str(seed), "--out", out, *args.rest]
      print(f"== {args.experiment} {shlex.join(run_argv)}", flush=True)
      res = experiment.main(run_argv)
      rows.append({"value": value, "seed": seed, "out": out,
                   **{k: res[k] for k in ("test_error", "baseline_test_error",
                                          "file_bytes", "dense_fp32_bytes",
                                          "ratio", "wall_time_s")}})
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "sweep.json"), "w") as f:
    json.dump({"experiment": args.experiment, "flag": args.flag,
               "command": train_lib.command_line(
                   MODULE, sys.argv[1:] if argv is None else argv),
               "runs": rows}, f, indent=2)
  _plot(os.path.join(args.out, "sweep.png"), rows, args)
  print(table(rows, args.flag))
  print(f"wrote {os.path.join(args.out, 'sweep.json')}")
  return rows


def table(rows: list[dict], flag: str) -> str:
  head = (flag, "seed", "test error", "baseline", "file bytes", "ratio")
  body = [(r["value"], str(r["seed"]), f"{100 * r['test_error']:.2f}%",
           f"{100 * r['baseline_test_error']:.2f}%", f"{r['file_bytes']:,}",
           f"{r['ratio']:.1f}x") for r in rows]
  widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
  fmt = lambda r: "  ".join(c.rjust(w) for c, w in zip(r, widths))  # noqa: E731
  return "\n".join([fmt(head), "-" * len(fmt(head)), *map(fmt, body)])


def _plot(path: str, rows: list[dict], args) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for value in args.values:
    pts = [r for r in rows if r["value"] == value]
    ax.scatter([r["ratio"] for r in pts], [100 * r["test_error"] for r in pts],
               label=f"{args.flag}={value}")
  base = [100 * r["baseline_test_error"] for r in rows]
  ax.axhline(sum(base) / len(base), color="gray", ls="--", label="baseline (mean)")
  ax.set_xlabel("compression ratio (dense fp32 bytes / file bytes)")
  ax.set_ylabel("test error (%)")
  ax.set_title(f"{args.experiment}: sweep over {args.flag}")
  ax.grid(alpha=0.3)
  ax.legend(fontsize="small")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  main(sys.argv[1:])
