"""Step-time overhead of compression-aware training on the word-level LM.

The model of ``experiments.lm`` at its defaults (vocabulary 10,000, 4
blocks, width 256, MLP 512, tied output; 4.7M parameters), batch 16 windows
of 128 tokens, dropout on, one CPU device. Every ratio is against the plain
AdamW step (``experiments.lm.cosine_adamw``) timed in the same run,
interleaved round by round (``benchmarks/_timing.py``: the median over the
rounds of the paired ratio, with its quartiles). The compression-aware steps
are those of ``experiments.diffq_lm``, on the same leaves (every matrix, the
embeddings included):

* uniform QAT: the forward pass on ``cx.methods.Uniform(4)`` codes
  (straight-through), ``plan.optimizer`` around the same AdamW;
* DiffQ: ``cx.methods.DiffQ`` (group 16): noisy weights, the size penalty,
  the bit logits' own Adam.

Targets (the optim benchmark's): QAT <= 1.10x, DiffQ <= 1.50x.

  python benchmarks/lm_train.py           # the issue's model
  python benchmarks/lm_train.py --quick   # a tiny model, a few rounds
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import compressax as cx  # noqa: E402
from benchmarks._timing import _ratio, _timeit  # noqa: E402
from experiments import diffq_lm  # noqa: E402
from experiments import lm  # noqa: E402

TARGETS = {"qat4": 1.10, "diffq": 1.50}


def steps(config: lm.LMConfig, batch: int) -> dict:
  """One closure per variant; each runs one jitted training step in place."""
  model = lm.WordLM(config)
  params = lm.init(config)
  rng = np.random.default_rng(0)
  x = rng.integers(0, config.vocab, (batch, config.context + 1)).astype(np.int32)
  key = jax.random.PRNGKey(0)
  inner = lm.cosine_adamw(1e-4, 10_000, 10)
  qat = cx.Plan([(diffq_lm.quantized_leaf, cx.methods.Uniform(4))])
  dq = cx.Plan([(diffq_lm.quantized_leaf, cx.methods.DiffQ(size_penalty=0.03))])
  variants = {
      "plain": (params, inner,
                lambda p, x, k: lm.token_nll(model, p, x, train=True, key=k)),
      "qat4": (qat.init(params), qat.optimizer(inner), diffq_lm.qat_loss(model, qat)),
      "diffq": (dq.init(params), dq.optimizer(inner), diffq_lm.diffq_loss(model, dq)),
  }
  fns = {}
  for name, (p0, tx, loss_fn) in variants.items():
    def make(p0=p0, tx=tx, loss_fn=loss_fn):
      step = lm.jit_step(tx, loss_fn)
      state = [p0, tx.init(p0)]
      keys = iter(jax.random.split(key, 100_000))

      def run():
        state[:] = step(*state, x, next(keys))[:2]
        return state[0]
      return run
    fns[name] = make()
  return fns


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true", help="a tiny model, a few rounds")
  ap.add_argument("--rounds", type=int, default=None, help="timing rounds (default 9)")
  ap.add_argument("--steps", type=int, default=None, help="steps per round (default 4)")
  args = ap.parse_args(argv)
  if args.quick:
    config = lm.LMConfig(vocab=500, width=32, layers=1, heads=2, ffn=64, context=16)
    batch, rounds, n = 4, args.rounds or 3, args.steps or 3
  else:
    config, batch, rounds, n = lm.LMConfig(), 16, args.rounds or 9, args.steps or 4
  print(f"jax {jax.__version__}, {jax.devices()[0].platform}; word-level LM "
        f"{config}, batch {batch}")
  with jax.numpy_dtype_promotion("standard"):
    t = _timeit(steps(config, batch), n, rounds)
  print(f"plain AdamW step: {np.median(t['plain']) * 1e3:.1f} ms (ratios: median "
        f"over {rounds} rounds of the paired ratio, [quartiles])")
  out = {}
  for name, target in TARGETS.items():
    r, q1, q3 = _ratio(t, name, "plain")
    out[name] = r
    print(f"  {name:6s} {np.median(t[name]) * 1e3:8.1f} ms  {r:5.2f}x [{q1:.2f}-{q3:.2f}]"
          f"  (target <= {target:.2f}x: {'ok' if r <= target else 'MISSED'})")
  return out


if __name__ == "__main__":
  main()
