"""GPTQ: cx.oneshot.gptq against the reference algorithm written in PyTorch.

For a 576x1536 kernel (SmolLM2's FFN up projection, Flax ``(d_in, d_out)``)
and a 2048x2048 one, with a Hessian from 2048 random correlated calibration
tokens: the wall time of ``cx.oneshot.gptq`` (jitted, after a warm-up call)
and of the reference code's ``fasterquant`` loop (IST-DASLab/gptq, per output
channel asymmetric min/max grid, lazy blocks of 128, damp 0.01; PyTorch on
CPU, float32), measured in the same run, and both layer errors
``||X W - X W_hat||^2 / ||X W||^2``. Same bits, grid and order, so the errors
should agree to float rounding ("weights differing": entries of the two
quantized kernels further apart than rtol 1e-4: a rounding tie decided the
other way moves a weight by one grid step).

Run ``python benchmarks/oneshot.py`` (needs ``pip install torch``;
``--bits 3``, ``--group-size 128``, ``--repeats N``).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import compressax as cx  # noqa: E402


def torch_gptq(w_out_in, h, bits: int, group_size: int = -1, blocksize: int = 128,
               percdamp: float = 0.01):
  """The reference ``GPTQ.fasterquant`` on a ``(out, in)`` weight, float32."""
  import torch
  W = w_out_in.clone().float()
  H = h.clone().float()
  maxq = 2 ** bits - 1
  columns = W.shape[1]

  def find_params(x):
    xmin = torch.minimum(x.min(1).values, torch.zeros(x.shape[0]))
    xmax = torch.maximum(x.max(1).values, torch.zeros(x.shape[0]))
    both = (xmin == 0) & (xmax == 0)
    xmin[both], xmax[both] = -1, 1
    scale = (xmax - xmin) / maxq
    return scale.unsqueeze(1), torch.round(-xmin / scale).unsqueeze(1)

  def quant(x, scale, zero):
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return scale * (q - zero)

  scale, zero = find_params(W)
  dead = torch.diag(H) == 0
  H[dead, dead] = 1
  W[:, dead] = 0
  H += percdamp * torch.mean(torch.diag(H)) * torch.eye(columns)
  H = torch.linalg.cholesky(H)
  H = torch.cholesky_inverse(H)
  Hinv = torch.linalg.cholesky(H, upper=True)
  Q = torch.zeros_like(W)
  for i1 in range(0, columns, blocksize):
    i2 = min(i1 + blocksize, columns)
    W1 = W[:, i1:i2].clone()
    Q1 = torch.zeros_like(W1)
    Err1 = torch.zeros_like(W1)
    Hinv1 = Hinv[i1:i2, i1:i2]
    for i in range(i2 - i1):
      w = W1[:, i]
      d = Hinv1[i, i]
      if group_size != -1 and (i1 + i) % group_size == 0:
        scale, zero = find_params(W[:, i1 + i:i1 + i + group_size])
      q = quant(w.unsqueeze(1), scale, zero).flatten()
      Q1[:, i] = q
      err1 = (w - q) / d
      W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
      Err1[:, i] = err1
    Q[:, i1:i2] = Q1
    W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
  return Q


def median_time(fn, repeats: int):
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--bits", type=int, default=4)
  p.add_argument("--group-size", type=int, default=None)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--tokens", type=int, default=2048)
  args = p.parse_args()
  import torch
  torch.set_num_threads(os.cpu_count() or 1)
  rng = np.random.default_rng(0)
  print(f"bits {args.bits}, group {args.group_size}, {args.tokens} tokens, "
        f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}")
  print("| kernel (d_in x d_out) | cx.oneshot.gptq s | PyTorch reference s | ratio | "
        "cx error | reference error | weights differing |")
  print("|---|---|---|---|---|---|---|")
  for d_in, d_out in [(576, 1536), (2048, 2048)]:
    mix = rng.normal(size=(d_in, d_in)) / np.sqrt(d_in)
    x = (rng.normal(size=(args.tokens, d_in)) @ (np.eye(d_in) + mix)).astype(np.float32)
    w = (rng.normal(size=(d_in, d_out)) / np.sqrt(d_in)).astype(np.float32)
    h = np.asarray(cx.oneshot.hessian(jnp.asarray(x))) / args.tokens
    wj, hj = jnp.asarray(w), jnp.asarray(h)
    f = jax.jit(lambda w, h: cx.oneshot.gptq(w, h, bits=args.bits,
                                             group_size=args.group_size).materialize())
    ours = np.asarray(f(wj, hj))                   # warm-up: compile
    t_ours = median_time(lambda: f(wj, hj).block_until_ready(), args.repeats)
    wt, ht = torch.from_numpy(w.T.copy()), torch.from_numpy(h)
    g = args.group_size or -1
    ref = torch_gptq(wt, ht, args.bits, g).numpy().T
    t_ref = median_time(lambda: torch_gptq(wt, ht, args.bits, g), args.repeats)
    y = x @ w

    def err(wh):
      return float(np.sum((y - x @ wh) ** 2) / np.sum(y ** 2))
    print(f"| {d_in} x {d_out} | {t_ours:.3f} | {t_ref:.3f} | {t_ref / t_ours:.2f}x | "
          f"{err(ours):.5f} | {err(ref):.5f} | {np.mean(~np.isclose(ours, ref, rtol=1e-4, atol=1e-6)):.3%} |")


if __name__ == "__main__":
  main()
