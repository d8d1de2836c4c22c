"""What an int8 matmul buys on this backend: int8 x int8 -> int32 against float32.

W8A8 (``cx.run.matmul`` on a kernel packed with ``activations=8``) can only
be faster than float32 if the backend's int8 dot is. This measures the dot
alone on SmolLM2-135M's kernel shapes at ``--tokens`` rows (16 x 128 =
2,048 by default: batch 16, context 128), and the whole W8A8 layer
(per-token activation quantization, int8 dot, rescale) as ``cx.run.matmul``
runs it, each as a ratio of float32's time in the same process:

* ``f32``: ``x @ w``, float32;
* ``int8 dot``: ``lax.dot_general(x_q, w_q, preferred_element_type=int32)``;
* ``w8a8 layer``: ``cx.run.matmul(x, node)`` for a W8A8 node;
* ``weight-only int8``: ``cx.run.matmul(x, node)`` for the same codes
  dequantized at use.

Each XLA:CPU configuration runs in its own process (XLA reads ``XLA_FLAGS``
once): the default, and the experimental library fusions this jaxlib has
(oneDNN, XNNPACK, YNNPACK for dots). Timings are the median of ``--repeats``
calls after a warm-up, the variants called round-robin. Run
``python benchmarks/int8_dot.py``; results in ``runs/int8_dot/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONFIGS = {
    "default": "",
    "onednn-dot": "--xla_cpu_experimental_onednn_fusion_type=individual_dot",
    "xnnpack-dot": "--xla_cpu_experimental_xnn_fusion_type=individual_dot",
    "ynnpack-dot": "--xla_cpu_experimental_ynn_fusion_type=individual_dot",
}
# SmolLM2-135M's block kernels (d_in, d_out): q/o, k/v, gate/up, down.
SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576)]


def worker(args) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax import lax

  import compressax as cx

  rng = np.random.default_rng(0)
  dn = (((1,), (0,)), ((), ()))
  f32 = jax.jit(lambda x, w: x @ w)
  i8 = jax.jit(lambda x, w: lax.dot_general(x, w, dn, preferred_element_type=jnp.int32))
  run = jax.jit(cx.run.matmul)
  out = {}
  for d_in, d_out in SHAPES:
    x = jnp.asarray(rng.standard_normal((args.tokens, d_in)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((d_in, d_out)) / np.sqrt(d_in), jnp.float32)
    node = cx.oneshot.rtn(w, bits=8, symmetric=True)
    calls = {
        "f32": (f32, (x, w)),
        "int8 dot": (i8, (cx.run.quantize_tokens(x)[0],
                          cx.run.pack(node, activations=8).int8()[0])),
        "w8a8 layer": (run, (x, cx.run.pack(node, activations=8))),
        "weight-only int8": (run, (x, cx.run.pack(node))),
    }
    for f, a in calls.values():
      jax.block_until_ready(f(*a))
    times = {k: [] for k in calls}
    names = list(calls)
    for r in range(args.repeats):
      for k in names[r % len(names):] + names[:r % len(names)]:
        f, a = calls[k]
        t = time.perf_counter()
        jax.block_until_ready(f(*a))
        times[k].append(time.perf_counter() - t)
    med = {k: float(np.median(v)) for k, v in times.items()}
    out[f"{d_in}x{d_out}"] = {"seconds": med,
                              "x_f32": {k: med["f32"] / v for k, v in med.items()}}
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tokens", type=int, default=2048, help="rows of x (batch * context)")
  p.add_argument("--repeats", type=int, default=15, help="timed calls per variant")
  p.add_argument("--configs", default=",".join(CONFIGS),
                 help=f"comma-separated XLA:CPU configurations, of {','.join(CONFIGS)}")
  p.add_argument("--out", default="runs/int8_dot", help="output directory")
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.worker:
    print(json.dumps(worker(args)))
    return
  os.makedirs(args.out, exist_ok=True)
  load = os.getloadavg()
  results = {}
  for name in args.configs.split(","):
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " "
                                      + CONFIGS[name]).strip())
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker",
                        "--tokens", str(args.tokens), "--repeats", str(args.repeats)],
                       capture_output=True, text=True, env=env)
    if r.returncode:
      results[name] = {"error": (r.stderr.strip().splitlines() or ["failed"])[-1][:300]}
      print(f"{name}: {results[name]['error']}")
      continue
    results[name] = json.loads(r.stdout.strip().splitlines()[-1])
    for shape, v in results[name].items():
      ratios = ", ".join(f"{k} {x:.2f}x" for k, x in v["x_f32"].items() if k != "f32")
      print(f"{name:12s} {shape:9s} f32 {1e3 * v['seconds']['f32']:.1f} ms; "
            f"speed vs f32: {ratios}", flush=True)
  result = {"command": "python benchmarks/int8_dot.py " + " ".join(argv or sys.argv[1:]),
            "tokens": args.tokens, "loadavg_start": load, "loadavg_end": os.getloadavg(),
            "cpus": os.cpu_count(), "results": results}
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(result, f, indent=2)
  print(f"load average {load} -> {result['loadavg_end']}; {os.cpu_count()} CPUs")


if __name__ == "__main__":
  main()
