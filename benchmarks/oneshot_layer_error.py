"""Per-layer error of calibration-free quantizers on SmolLM2-135M: RTN vs HQQ.

For the ``--kernels`` of block ``--block`` (inputs: the float model's hidden
states on ``--windows`` 512-token windows of the first 90% of
tiny-shakespeare), at 3 and 4 bits in groups of ``--group-size``:

* ``weight``: ``||dW||_F / ||W||_F``;
* ``output``: ``sqrt(tr(dW^T H dW) / tr(W^T H W))`` with ``H`` the block's
  calibration Hessian (``cx.oneshot.block_hessians``), the relative error of
  the layer's output on those inputs.

``dW`` is ``materialize() - W`` for ``cx.oneshot.rtn`` (GPTQ's zero-point
grid) and ``cx.oneshot.hqq``. Run ``python benchmarks/oneshot_layer_error.py``
(needs the ``llm`` extra; the model file is fetched into the cache).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import compressax as cx  # noqa: E402
from experiments import oneshot  # noqa: E402
from experiments.llm import models as models_lm  # noqa: E402


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--block", type=int, default=5)
  p.add_argument("--kernels", default="q,down")
  p.add_argument("--windows", type=int, default=4)
  p.add_argument("--group-size", type=int, default=64)
  p.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..",
                                                "shared", "data", "tinyshakespeare.txt"))
  p.add_argument("--cache", default=models_lm.CACHE)
  args = p.parse_args(argv)
  model, params, tok = models_lm.load("smollm2-135m", args.cache)
  train, _ = oneshot.split_text(args.data)
  ids = oneshot.lm_windows(tok, train, 512)[:args.windows]
  x = jnp.concatenate([model.embed(params, jnp.asarray(i[None])) for i in ids])
  for b in params["blocks"][:args.block]:
    x = model.block_apply(b, x)
  block = params["blocks"][args.block]
  names = args.kernels.split(",")
  hs = cx.oneshot.block_hessians(model.block_apply, block, [x],
                                 [f"{n}/kernel" for n in names])
  print(f"block {args.block}, groups of {args.group_size}, {args.windows} windows")
  for n in names:
    w = block[n]["kernel"]
    wn = np.asarray(w, np.float64)
    h = np.asarray(hs[f"{n}/kernel"][0], np.float64)
    base = np.trace(wn.T @ h @ wn)
    for bits in (3, 4):
      for label, fn in (("rtn", cx.oneshot.rtn), ("hqq", cx.oneshot.hqq)):
        d = np.asarray(fn(w, bits=bits, group_size=args.group_size).materialize(),
                       np.float64) - wn
        print(f"{n:5s} {bits} bits {label}: weight {np.linalg.norm(d) / np.linalg.norm(wn):.4f}"
              f"  output {np.sqrt(np.trace(d.T @ h @ d) / base):.4f}")


if __name__ == "__main__":
  main()
