"""Summarize several runs' ``results.json`` as a Markdown table (mean and spread).

Every number in ``docs/results.md`` comes from a run's ``results.json``; this
command aggregates seeds::

  python -m experiments.summarize runs/dc-mnist-lenet300-s*/results.json

It prints one row per run and, for two or more runs, a ``mean ± std`` row
(sample standard deviation, ``ddof=1``) with the min-max range.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

MODULE = "experiments.summarize"
COLUMNS = (  # (header, key, format)
    ("seed", "seed", "{}"),
    ("baseline error", "baseline_test_error", "{:.2%}"),
    ("test error", "test_error", "{:.2%}"),
    ("file bytes", "file_bytes", "{:,.0f}"),
    ("ratio", "ratio", "{:.1f}x"),
    ("wall s", "wall_time_s", "{:.0f}"),
)


def load(paths: list[str]) -> list[dict]:
  runs = []
  for path in paths:
    with open(path) as f:
      try:
        runs.append(json.load(f))
      except json.JSONDecodeError as e:
        raise SystemExit(f"{path}: not a results.json ({e})") from None
  return runs


def table(runs: list[dict]) -> str:
  """The Markdown table: one row per run, then mean ± std and range."""
  head = "| " + " | ".join(h for h, _, _ in COLUMNS) + " |"
  rows = [head, "|" + "---|" * len(COLUMNS)]
  for r in runs:
    rows.append("| " + " | ".join(
        fmt.format(r[key]) if key in r else "-" for _, key, fmt in COLUMNS) + " |")
  if len(runs) > 1:
    cells = []
    for _, key, fmt in COLUMNS:
      values = [r[key] for r in runs if key in r]
      if key == "seed" or len(values) < 2:
        cells.append(f"{len(runs)} seeds" if key == "seed" else "-")
        continue
      mean, std = statistics.mean(values), statistics.stdev(values)
      cells.append(f"{fmt.format(mean)} ± {fmt.format(std)} "
                   f"({fmt.format(min(values))}-{fmt.format(max(values))})")
    rows.append("| " + " | ".join(cells) + " |")
  return "\n".join(rows)


def main(argv: list[str] | None = None) -> str:
  parser = argparse.ArgumentParser(prog=f"python -m {MODULE}",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("results", nargs="+", help="results.json files")
  args = parser.parse_args(argv)
  runs = load(args.results)
  first = runs[0]
  print(f"{first.get('experiment', '?')}: {first.get('model')} on "
        f"{first.get('dataset')}; command of the first run: "
        f"`{first.get('command')}`")
  out = table(runs)
  print(out)
  return out


if __name__ == "__main__":
  main(sys.argv[1:])
