"""Test error against file size for every MNIST method, on one figure.

Reads the ``results.json`` of finished runs (any experiment of this
directory) and plots each run's test error (measured from its ``model.cx``)
against its file bytes, one panel per model, one marker per method, with the
Pareto front of all points and the issue's targets (80x at 1.64% for
LeNet-300-100, 100x at 0.80% for LeNet-5) drawn in. Experiments that write
several files (``runs`` in ``results.json``: DiffQ's lambdas, quantized
distillation's methods, low-rank budgets) give one point per file.

Each argument is ``LABEL=GLOB`` (the runs of one method) or a bare ``GLOB``
(labelled by the experiment name)::

  python -m experiments.pareto "Deep Compression=runs/dcm-*/results.json" \\
      "PQK=runs/pqk-*/results.json" --out docs/img/mnist-pareto.png

Prints the points as a table and writes them next to the figure
(``.json``).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import numpy as np

from experiments import train as train_lib

# The targets of the MNIST issue: (ratio, error ceiling) per model.
TARGETS = {"lenet300": (80.0, 0.0164), "lenet5": (100.0, 0.0080)}
TITLES = {"lenet300": "LeNet-300-100", "lenet5": "LeNet-5"}


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog="python -m experiments.pareto", description=__doc__,
      formatter_class=train_lib.HelpFormatter)
  p.add_argument("runs", nargs="+", help="LABEL=GLOB or GLOB of results.json files")
  p.add_argument("--dataset", default="mnist",
                 help="keep runs whose dataset contains this string")
  p.add_argument("--out", default="runs/pareto/mnist-pareto.png",
                 help="the figure (PNG); the points go to the same name .json")
  p.add_argument("--max-error", type=float, default=0.03,
                 help="upper limit of the error axis")
  return p.parse_args(argv)


def points(specs, dataset: str) -> list[dict]:
  """One dict per stored file: label, model, file_bytes, ratio, test_error, source."""
  out = []
  for spec in specs:
    label, pattern = spec.split("=", 1) if "=" in spec else (None, spec)
    files = sorted(glob.glob(pattern))
    if not files:
      raise SystemExit(f"{spec}: no file matches {pattern!r}")
    for path in files:
      with open(path) as f:
        res = json.load(f)
      if dataset not in str(res.get("dataset", "")):
        continue
      name = label or res.get("experiment", os.path.basename(os.path.dirname(path)))
      runs = res.get("runs") if isinstance(res.get("runs"), list) else None
      for run in runs or [res]:
        if "file_bytes" not in run or "test_error" not in run:
          continue
        dense = run.get("dense_fp32_bytes", res["dense_fp32_bytes"])
        out.append({
            "label": f"{name}: {run['method']}" if runs and "method" in run else name,
            "model": res["model"], "file_bytes": int(run["file_bytes"]),
            "ratio": dense / run["file_bytes"], "test_error": float(run["test_error"]),
            "dense_fp32_bytes": dense, "source": path})
  return out


def front(pts: list[dict]) -> list[dict]:
  """The points no other point beats in both file size and error."""
  best, out = np.inf, []
  for p in sorted(pts, key=lambda p: (p["file_bytes"], p["test_error"])):
    if p["test_error"] < best:
      out.append(p)
      best = p["test_error"]
  return out


def plot(path: str, pts: list[dict], max_error: float) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker

  models = [m for m in TARGETS if any(p["model"] == m for p in pts)]
  models += sorted({p["model"] for p in pts} - set(models))
  fig, axes = plt.subplots(1, len(models), figsize=(9 * len(models), 5.5),
                           squeeze=False)
  markers = "osD^v<>phX*P"
  labels = sorted({p["label"] for p in pts})
  colors = plt.get_cmap("tab20").colors
  style = {lab: (markers[i % len(markers)], colors[(2 * i) % 20 + (2 * i) // 20 % 2])
           for i, lab in enumerate(labels)}
  for ax, model in zip(axes[0], models):
    mine = [p for p in pts if p["model"] == model]
    for lab in labels:
      sel = [p for p in mine if p["label"] == lab]
      if sel:
        m, c = style[lab]
        ax.scatter([p["file_bytes"] / 1024 for p in sel],
                   [100 * p["test_error"] for p in sel], marker=m, color=c,
                   label=lab, s=40, alpha=0.85)
    f = front(mine)
    ax.step([p["file_bytes"] / 1024 for p in f], [100 * p["test_error"] for p in f],
            where="post", color="k", lw=0.8, alpha=0.5, label="Pareto front")
    if model in TARGETS:
      ratio, err = TARGETS[model]
      dense = mine[0]["dense_fp32_bytes"]
      ax.axhline(100 * err, color="gray", ls="--", lw=0.8)
      ax.axvline(dense / ratio / 1024, color="gray", ls=":", lw=0.8)
      ax.annotate(f"target: {ratio:.0f}x at {100 * err:.2f}%",
                  (dense / ratio / 1024, 100 * err), fontsize=8,
                  xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    low = min(p["test_error"] for p in mine)
    ax.set_ylim(100 * 0.9 * low, 100 * max_error)
    ax.set_xlabel("file size (KiB, log)")
    ax.set_ylabel("test error (%) from model.cx")
    ax.set_title(f"{TITLES.get(model, model)} on MNIST")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  pts = points(args.runs, args.dataset)
  if not pts:
    raise SystemExit("no run matched")
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  plot(args.out, pts, args.max_error)
  with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
    json.dump(pts, f, indent=1)
  print(f"{'model':9} {'method':40} {'bytes':>9} {'ratio':>7} {'error':>7}  front")
  for model in sorted({p["model"] for p in pts}):
    mine = [p for p in pts if p["model"] == model]
    on = {id(p) for p in front(mine)}
    for p in sorted(mine, key=lambda p: p["file_bytes"]):
      print(f"{model:9} {p['label'][:40]:40} {p['file_bytes']:9,} {p['ratio']:6.1f}x "
            f"{100 * p['test_error']:6.2f}%  {'*' if id(p) in on else ''}")
  print(f"plot: {args.out}")
  return pts


if __name__ == "__main__":
  main(sys.argv[1:])
