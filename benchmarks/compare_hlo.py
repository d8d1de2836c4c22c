"""Is the compiled AdaComp data-parallel step the same program in two checkouts?

A step-time ratio that moves between two sessions may be the code or the machine.
This compiles `experiments.distributed_adacomp`'s data-parallel step (LeNet-300-100,
batch 128, 8 host devices, dense and AdaComp) in each checkout, in a fresh process
each, and compares XLA's optimized HLO after renaming every instruction and
dropping source metadata. Identical programs mean a changed ratio is not the code.

  git worktree add /tmp/old <commit>
  python benchmarks/compare_hlo.py /tmp/old .
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

_DUMP = r"""
import os, sys
os.environ["XLA_FLAGS"] = " --xla_force_host_platform_device_count=8"
sys.path.insert(0, sys.argv[1])
import jax, numpy as np, optax
from jax.sharding import Mesh
import compressax as cx
from experiments import distributed_adacomp as dist
assert cx.__file__.startswith(os.path.abspath(sys.argv[1])), cx.__file__
x = np.zeros((128, 784), np.float32)
y = np.arange(128) % 10
mesh = Mesh(np.array(jax.devices()[:8]), (dist.AXIS,))
opt = optax.sgd(0.05, momentum=0.9)
for name, comp in (("dense", None),
                   ("adacomp", cx.optim.adacomp(bin_size_fc=500, axis_name=dist.AXIS))):
  step = dist.make_step(mesh, opt, comp)
  state = dist.init_states(mesh, dist.init_mlp(jax.random.key(0)), opt, comp)
  with open(os.path.join(sys.argv[2], name + ".hlo"), "w") as f:
    f.write(step.lower(*state, x, y).compile().as_text())
"""


def normalize(hlo: str) -> list[str]:
  """Optimized HLO text without names, source metadata or the stack-frame tables."""
  out = []
  for line in hlo.splitlines():
    if re.match(r"^(FileNames|FunctionNames|FileLocations|StackFrames)\b", line) or \
        re.match(r"^\d+ ", line) or not line.strip():
      continue
    line = re.sub(r", metadata=\{.*\}$", "", line)
    line = re.sub(r"stack_frame_id=\d+", "", line)
    line = re.sub(r"%[\w.-]+", "%X", line)
    line = re.sub(r"\b(\w+)\.\d+:", r"\1:", line)  # parameter names of computations
    out.append(line)
  return out


def ops(lines: list[str]) -> collections.Counter:
  return collections.Counter(m for line in lines for m in re.findall(r" ([a-z][\w-]*)\(", line))


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("old", help="root of the first checkout")
  ap.add_argument("new", nargs="?", default=".", help="root of the second (default: .)")
  args = ap.parse_args()
  texts = {}
  for label, root in (("old", args.old), ("new", args.new)):
    with tempfile.TemporaryDirectory() as d:
      subprocess.run([sys.executable, "-c", _DUMP, os.path.abspath(root), d], check=True)
      for name in ("dense", "adacomp"):
        with open(os.path.join(d, name + ".hlo")) as f:
          texts[label, name] = normalize(f.read())
  same = True
  for name in ("dense", "adacomp"):
    a, b = texts["old", name], texts["new", name]
    oa, ob = ops(a), ops(b)
    diff = {k: (oa[k], ob[k]) for k in sorted(set(oa) | set(ob)) if oa[k] != ob[k]}
    print(f"{name:8s} instructions {sum(oa.values())} vs {sum(ob.values())}; "
          f"normalized HLO {'identical' if a == b else 'DIFFERS'}"
          + (f"; op counts differ: {diff}" if diff else ""))
    same &= a == b
  sys.exit(0 if same else 1)


if __name__ == "__main__":
  main()
