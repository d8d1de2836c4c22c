"""Every experiment's command line explains itself.

Each ``python -m experiments.NAME`` parser: its usage line names that
command, every flag has a help string, and ``--help`` shows every default
that is a value (defaults of None are derived, and the help says from what).
"""

from __future__ import annotations

import argparse
import importlib
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOT_COMMANDS = {"__init__", "data", "models", "train"}
COMMANDS = sorted(p.stem for p in (ROOT / "experiments").glob("*.py")
                  if p.stem not in NOT_COMMANDS)


class _Captured(Exception):
  pass


def _parser(name: str, monkeypatch) -> argparse.ArgumentParser:
  """The parser ``experiments.NAME`` builds, caught as it starts parsing."""
  module = importlib.import_module(f"experiments.{name}")
  seen = []

  def capture(self, args=None, namespace=None):
    seen.append(self)
    raise _Captured

  monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
  entry = getattr(module, "parse_args", None) or module.main
  with pytest.raises(_Captured):
    entry([])
  return seen[0]


def test_every_experiment_is_covered():
  assert {"deep_compression", "diffq", "lowrank", "quantized_distillation",
          "sweep", "repeat", "summarize", "distributed_adacomp"} <= set(COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_usage_names_the_command(name, monkeypatch):
  parser = _parser(name, monkeypatch)
  assert parser.prog == f"python -m experiments.{name}"
  assert parser.format_usage().startswith(f"usage: python -m experiments.{name} ")


@pytest.mark.parametrize("name", COMMANDS)
def test_every_flag_has_help_and_help_shows_defaults(name, monkeypatch):
  parser = _parser(name, monkeypatch)
  text = " ".join(parser.format_help().split())  # undo the line wrapping
  no_help = [a.dest for a in parser._actions
             if not a.help or a.help == argparse.SUPPRESS]
  assert not no_help, f"experiments.{name}: flags without help: {no_help}"
  for action in parser._actions:
    if action.default in (None, argparse.SUPPRESS) or action.nargs == 0:
      continue  # derived defaults (said in words), switches, --help
    shown = f"(default: {action.default})"
    assert shown in text, f"experiments.{name} {action.option_strings}: no {shown}"


def test_help_runs_as_a_command():
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.deep_compression", "--help"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  text = " ".join(proc.stdout.split())
  assert text.startswith("usage: python -m experiments.deep_compression")
  assert "--prune-lr PRUNE_LR learning rate" in text and "(default: 0.01)" in text


def test_distributed_adacomp_takes_the_shared_dataset_specs(monkeypatch):
  from experiments import distributed_adacomp as dist
  args = dist.parse_args([])
  assert args.dataset == "npz:../shared/data/mnist.npz"  # relative, as in the README
  (xtr, ytr), (xte, yte) = dist.load("digits")
  assert xtr.shape[1:] == (64,) and xte.shape[1:] == (64,)
  assert len(xtr) == len(ytr) == 1437 and len(xte) == len(yte) == 360
  with pytest.raises(SystemExit, match=r"^error: .*nope\.npz.* not found"):
    dist.main(["--dataset", "npz:nope.npz", "--steps", "1"])
