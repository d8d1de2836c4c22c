"""Sweep in one jit: a trained LeNet-300-100 at bits x sparsity settings.

1. Train the model (``train.fit``, SGD with Nesterov momentum, cosine rate).
2. Evaluate every setting of the grid ``--bits`` x ``--sparsities`` (36 by
   default) in ONE compiled call, ``jax.jit(jax.vmap(eval_one))``, where
   ``eval_one(bits, sparsity)`` (both traced) is

   * ``cx.prune.magnitude_mask(params, sparsity)``: per-layer (``scope=
     "layer"``) magnitude masks of the kernels; biases are kept;
   * ``cx.prune.apply_mask``;
   * ``cx.quantize.uniform(kernel, bits, symmetric=True, axis=-1)``: a
     *symmetric* grid, one scale per output channel. Symmetric, because its
     grid has an exact zero (code ``2^(bits-1) - 1`` dequantizes to
     ``0 * scale``), so pruned weights stay exactly zero after quantization
     and nothing has to be re-masked; an affine min/max grid has no zero level
     in general. The price is one unused code of ``2^bits`` (``2^bits - 1``
     levels);
   * the test error on the full test split (a ``lax.scan`` over batches).

   The same settings are also evaluated one by one (one ``jit`` of
   ``eval_one`` compiled once, called in a Python loop) and the two timings
   are printed as a ratio (measured once per run, reported, not asserted).
3. Store every setting as a real file, ``DIR/settings/b{bits}-s{sparsity}.cx``
   (``cx.io.save``), its nodes made by the method layer: the kernels pruned
   by the vmapped call's own mask, then ``plan.finalize`` of ``cx.Plan(
   cx.methods.Magnitude(s) >> cx.methods.Uniform(bits, symmetric=True,
   axis=-1))`` (the chain's one-shot form: no training, the mask is the
   pre-pruned kernel's nonzeros), which stores each kernel as a
   ``cx.prune.MaskedArray`` over a ``cx.quantize.QuantizedArray`` (only the
   kept codes and their positions); at sparsity 0 the plan is the
   ``Uniform`` alone (a plain ``QuantizedArray``). Biases stay dense float32.
   ``file_bytes`` is ``os.path.getsize``. ``QuantizedArray.materialize``
   equals ``uniform`` bit for bit, so each file holds exactly the weights
   that were evaluated: every file is decoded and compared with the vmapped
   weights of its setting (an error if one differs), and ``--verify``
   settings are also re-evaluated from their files (``results.json``:
   ``verified``).
4. Plot test error vs file bytes (log x, colour = bits, Pareto front drawn)
   to ``DIR/pareto.png``.

``DIR/model.cx`` is the chosen setting: of the Pareto-optimal settings (no
other setting has a smaller-or-equal file and a lower error) whose test error
is at most the baseline's plus ``--tolerance`` (1 point), the one with the
smallest file; if none is within tolerance, the Pareto setting with the
lowest error. ``results.json`` follows the common contract (``test_error``
measured on ``model.cx`` as decoded) plus ``settings`` (bits, sparsity,
test_error, file_bytes, ratio for every setting), ``pareto``, ``chosen``,
``timing`` and ``verified``.

Run ``python -m experiments.sweep`` (digits, under a minute) or on MNIST::

  python -m experiments.sweep --dataset npz:../shared/data/mnist.npz

References:
  Han, Mao, Dally, *Deep Compression*, ICLR 2016,
  https://arxiv.org/abs/1510.00149 (pruning then quantization).
  Polino, Pascanu, Alistarh, *Model compression via distillation and
  quantization*, ICLR 2018, https://arxiv.org/abs/1802.05668 (uniform grids).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import compressax as cx
from experiments import models as models_lib
from experiments import train as train_lib

MODULE = "experiments.sweep"
DEFAULT_BITS = (2, 3, 4, 5, 6, 8)
DEFAULT_SPARSITIES = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95)
# Per output channel: a Dense kernel is (in, out), a Conv kernel (..., out).
QUANT_AXIS = -1


def _bits_arg(text: str) -> int:
  try:
    b = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"--bits: {text!r} is not an integer")
  if not 2 <= b <= 16:
    raise argparse.ArgumentTypeError(
        f"--bits: {b} outside [2, 16] (a symmetric grid needs >= 2 bits)")
  return b


def _sparsity_arg(text: str) -> float:
  try:
    s = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"--sparsities: {text!r} is not a number")
  if not 0.0 <= s < 1.0:
    raise argparse.ArgumentTypeError(f"--sparsities: {s} outside [0, 1)")
  return s


def parse_args(argv=None) -> argparse.Namespace:
  p = train_lib.experiment_parser(
      MODULE, __doc__, model="lenet300", dataset="digits", epochs=10,
      batch_size=64, lr=0.05)
  p.add_argument("--bits", type=_bits_arg, nargs="+", default=list(DEFAULT_BITS),
                 help="bit widths of the symmetric per-channel grid, in [2, 16]")
  p.add_argument("--sparsities", type=_sparsity_arg, nargs="+",
                 default=list(DEFAULT_SPARSITIES),
                 help="fractions of each kernel pruned, in [0, 1)")
  p.add_argument("--tolerance", type=float, default=0.01,
                 help="model.cx: smallest Pareto setting with error <= "
                      "baseline + this (a fraction: 0.01 is 1 point)")
  p.add_argument("--verify", type=int, default=3,
                 help="settings re-evaluated from their files (smallest "
                      "file, chosen, largest file)")
  p.add_argument("--no-plot", action="store_true",
                 help="do not write the PNG plot")
  args = p.parse_args(argv)
  args.argv = sys.argv[1:] if argv is None else list(argv)
  args.bits = sorted(set(args.bits))
  args.sparsities = sorted(set(args.sparsities))
  if args.out is None:
    args.out = train_lib.default_out("sweep", args)
  return args


def grid(bits, sparsities) -> tuple[np.ndarray, np.ndarray]:
  """All ``(bits, sparsity)`` pairs, bits-major: int32 and float32 vectors."""
  b, s = np.meshgrid(np.asarray(bits, np.int32),
                     np.asarray(sparsities, np.float32), indexing="ij")
  return b.reshape(-1), s.reshape(-1)


# -- the compressed weights, traced -------------------------------------------

def _is_kernel_mask(m) -> bool:
  return jnp.ndim(m) > 0


def prune_quantize(params, bits, sparsity):
  """Dense weights of one setting: magnitude-prune, then symmetric-quantize.

  Args:
    params: ``{'params': ...}`` of the model (float32).
    bits: bits per kernel weight (may be traced).
    sparsity: fraction of each kernel pruned (may be traced).

  Returns:
    ``(weights, mask)``: the dense pruned-and-quantized tree (biases as they
    are) and the mask tree of :func:`cx.prune.magnitude_mask`.
  """
  mask = cx.prune.magnitude_mask(params, sparsity, scope="layer")
  pruned = cx.prune.apply_mask(params, mask)
  weights = jax.tree_util.tree_map(
      lambda x, m: (cx.quantize.uniform(x, bits, symmetric=True, axis=QUANT_AXIS)
                    if _is_kernel_mask(m) else x), pruned, mask)
  return weights, mask


def batched_test_set(x: np.ndarray, y: np.ndarray, batch_size: int):
  """``(nb, B, ...)`` images and ``(nb, B)`` labels, padded with label -1.

  A padded example never matches a prediction (argmax >= 0), so counting
  correct predictions needs no separate validity mask.
  """
  n = len(x)
  batch_size = min(batch_size, n)
  nb = -(-n // batch_size)
  pad = nb * batch_size - n
  xp = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
  yp = np.concatenate([y, np.full((pad,), -1, y.dtype)])
  return (xp.reshape(nb, batch_size, *x.shape[1:]),
          yp.reshape(nb, batch_size).astype(np.int32))


def make_eval_one(model, n_test: int):
  """``eval_one(params, xb, yb, bits, sparsity) -> wrong`` (int32 count)."""
  def eval_one(params, xb, yb, bits, sparsity):
    weights, _ = prune_quantize(params, bits, sparsity)

    def body(correct, batch):
      xi, yi = batch
      pred = jnp.argmax(model.apply(weights, xi), axis=-1)
      return correct + jnp.sum(pred == yi, dtype=jnp.int32), None

    correct, _ = jax.lax.scan(body, jnp.zeros((), jnp.int32), (xb, yb))
    return n_test - correct
  return eval_one


# -- the stored files ---------------------------------------------------------

_MASK_JIT = jax.jit(lambda params, s: cx.prune.magnitude_mask(params, s))
_WEIGHTS_JIT = jax.jit(jax.vmap(prune_quantize, in_axes=(None, 0, 0)))


def setting_plan(bits: int, sparsity: float) -> cx.Plan:
  """The method-layer plan of one setting, for the kernels (the default rule).

  ``Magnitude(s) >> Uniform(bits, symmetric=True, axis=-1)``: stored as a
  ``MaskedArray`` over a ``QuantizedArray``; ``Uniform`` alone at sparsity 0.
  """
  quant = cx.methods.Uniform(int(bits), symmetric=True, axis=QUANT_AXIS)
  if sparsity == 0:
    return cx.Plan(quant)
  return cx.Plan(cx.methods.Magnitude(float(sparsity)) >> quant)


def compressed_tree(params, bits: int, sparsity: float, mask=None):
  """The stored tree of one setting: MaskedArray(QuantizedArray) kernels.

  The kernels are pruned by ``mask`` (the vmapped call's mask of the setting;
  by default recomputed with the sparsity traced, a jitted argument, so that
  it is that mask), then ``setting_plan(bits, sparsity).finalize`` stores
  them: ``Magnitude``'s stored mask is the pre-pruned kernel's nonzeros and
  ``Uniform`` quantizes after masking, as in the vmapped call. No training
  step runs, so ``Magnitude``'s optimizer wrapper is not used.
  """
  if mask is None:
    mask = _MASK_JIT(params, jnp.float32(sparsity))
  pruned = cx.prune.apply_mask(params, mask)
  plan = setting_plan(bits, sparsity)
  return plan.finalize(plan.init(pruned))


def _take(stacked, i: int):
  """Setting ``i`` of a tree stacked by the vmapped call."""
  return jax.tree_util.tree_map(lambda x: x[i], stacked)


def check_decodes_to(path: str, weights, setting: str) -> None:
  """Raise unless the file at ``path`` decodes to ``weights`` bit for bit."""
  loaded = cx.io.load(path)
  if (jax.tree_util.tree_structure(loaded)
      != jax.tree_util.tree_structure(weights)):
    raise AssertionError(f"{path} ({setting}): the file's tree is not the "
                         "params' tree")
  for (kp, got), want in zip(jax.tree_util.tree_leaves_with_path(loaded),
                             jax.tree_util.tree_leaves(weights)):
    if not np.array_equal(np.asarray(got), np.asarray(want)):
      raise AssertionError(
          f"{path} ({setting}): {cx.path_str(kp)} decodes to other weights "
          "than the vmapped evaluation's")


def setting_path(out: str, bits: int, sparsity: float) -> str:
  return os.path.join(out, "settings", f"b{int(bits)}-s{float(sparsity):g}.cx")


# -- Pareto front and choice --------------------------------------------------

def pareto_front(settings: list[dict]) -> list[dict]:
  """Settings no other setting beats: smaller-or-equal file and lower error.

  Sorted by file size; each member has a strictly lower error than every
  setting with a smaller-or-equal file.
  """
  order = sorted(settings, key=lambda r: (r["file_bytes"], r["test_error"]))
  front, best = [], float("inf")
  for r in order:
    if r["test_error"] < best:
      front.append(r)
      best = r["test_error"]
  return front


def choose(front: list[dict], baseline: float, tolerance: float) -> dict:
  """The smallest Pareto setting within ``tolerance`` of ``baseline``.

  Falls back to the Pareto setting of lowest error (the largest file of the
  front) when none is within tolerance.
  """
  ok = [r for r in front if r["test_error"] <= baseline + tolerance + 1e-12]
  return ok[0] if ok else front[-1]


# -- main ---------------------------------------------------------------------

def _log(args, msg: str) -> None:
  if not args.quiet:
    print(msg, flush=True)


def main(argv=None) -> dict:
  args = parse_args(argv)
  start = time.time()
  model, ds, params = train_lib.setup(args)
  bits_vec, sps_vec = grid(args.bits, args.sparsities)
  _log(args, f"Sweep: {args.model} on {args.dataset}, {len(bits_vec)} settings "
             f"(bits {args.bits} x sparsity {args.sparsities})")
  params, baseline = train_lib.train_baseline(model, params, ds, args, desc="train")
  _log(args, f"  baseline fp32 test error {baseline:.4f}")

  n_test = len(ds.y_test)
  xb, yb = batched_test_set(ds.x_test, ds.y_test, args.eval_batch_size)
  xb, yb = jnp.asarray(xb), jnp.asarray(yb)
  eval_one = make_eval_one(model, n_test)
  timing = time_sweep(eval_one, params, xb, yb, bits_vec, sps_vec)
  wrong = timing.pop("wrong")
  _log(args, f"  one vmapped jit: {timing['vmap_s']:.3f} s; {len(bits_vec)} "
             f"jitted calls in a loop: {timing['loop_s']:.3f} s; loop/vmap = "
             f"{timing['loop_over_vmap']:.2f}x (compile: vmap "
             f"{timing['vmap_compile_s']:.2f} s, single "
             f"{timing['single_compile_s']:.2f} s)")

  dense_bytes = 4 * models_lib.param_count(params)
  # The weights and masks of every setting, from the vmapped pure kernels the
  # evaluation ran (prune_quantize, traced bits and sparsity).
  stacked, masks = _WEIGHTS_JIT(params, jnp.asarray(bits_vec),
                                jnp.asarray(sps_vec))
  settings = []
  with train_lib.progress(len(bits_vec), "write settings", args.quiet) as bar:
    for i, (b, s, w) in enumerate(zip(bits_vec.tolist(), sps_vec.tolist(),
                                      wrong.tolist())):
      s = float(np.float32(s))
      path = setting_path(args.out, b, s)
      os.makedirs(os.path.dirname(path), exist_ok=True)
      cx.io.save(path, compressed_tree(params, b, s, mask=_take(masks, i)))
      check_decodes_to(path, _take(stacked, i), f"b{b} s{s:g}")
      size = os.path.getsize(path)
      settings.append({"bits": int(b), "sparsity": round(s, 6),
                       "test_error": int(w) / n_test, "file_bytes": size,
                       "ratio": dense_bytes / size, "file": path})
      bar.update(1)

  front = pareto_front(settings)
  chosen = choose(front, baseline, args.tolerance)
  verified = verify(model, ds, args, settings, chosen)
  plot = None
  if not args.no_plot:
    plot = os.path.join(args.out, "pareto.png")
    plot_pareto(plot, settings, front, chosen, baseline,
                f"{args.model} on {args.dataset}: {len(settings)} settings, one jit")
  tree = compressed_tree(params, chosen["bits"], chosen["sparsity"],
                         mask=_take(masks, settings.index(chosen)))
  results = train_lib.write_results(
      args.out, tree, model=model, ds=ds, args=args,
      baseline_test_error=baseline, start_time=start, module=MODULE,
      extra={"experiment": "sweep", "epochs": args.epochs,
             "quantizer": {"symmetric": True, "axis": QUANT_AXIS},
             "tolerance": args.tolerance,
             "chosen": {k: chosen[k] for k in ("bits", "sparsity", "test_error",
                                                "file_bytes")},
             "settings": settings,
             "pareto": [{"bits": r["bits"], "sparsity": r["sparsity"]}
                        for r in front],
             "timing": timing, "verified": verified, "plot": plot})
  print(table(front, baseline))
  print(f"vmap vs loop over {len(settings)} settings: {timing['vmap_s']:.3f} s "
        f"vs {timing['loop_s']:.3f} s ({timing['loop_over_vmap']:.2f}x)")
  print(f"wrote {results['file']} (b{chosen['bits']} s{chosen['sparsity']:g}: "
        f"{results['file_bytes']} bytes, {results['ratio']:.1f}x smaller than "
        f"fp32; test error {results['test_error']:.4f}, fp32 {baseline:.4f})")
  if plot:
    print(f"wrote {plot}")
  print(f"wrote {os.path.join(args.out, 'results.json')}")
  if not all(v["equal"] for v in verified):
    print("WARNING: a vmapped error differs from its file's error: "
          f"{verified}", file=sys.stderr)
  return results


def time_sweep(eval_one, params, xb, yb, bits_vec, sps_vec) -> dict:
  """Run the sweep as one vmapped jit and as a loop of jitted calls; time both.

  Each is compiled (and run) once first; the reported times are one further
  run each, on the same inputs.
  """
  bits_vec, sps_vec = jnp.asarray(bits_vec), jnp.asarray(sps_vec)
  batched = jax.jit(jax.vmap(eval_one, in_axes=(None, None, None, 0, 0)))
  single = jax.jit(eval_one)

  t0 = time.perf_counter()
  wrong = batched(params, xb, yb, bits_vec, sps_vec).block_until_ready()
  vmap_first = time.perf_counter() - t0
  t0 = time.perf_counter()
  wrong = batched(params, xb, yb, bits_vec, sps_vec).block_until_ready()
  vmap_s = time.perf_counter() - t0

  t0 = time.perf_counter()
  single(params, xb, yb, bits_vec[0], sps_vec[0]).block_until_ready()
  single_first = time.perf_counter() - t0
  pairs = list(zip(bits_vec, sps_vec))  # sliced outside the timed loop
  t0 = time.perf_counter()
  looped = [single(params, xb, yb, b, s) for b, s in pairs]
  looped = np.asarray(jax.block_until_ready(jnp.stack(looped)))
  loop_s = time.perf_counter() - t0
  return {"wrong": np.asarray(wrong), "vmap_s": vmap_s, "loop_s": loop_s,
          "loop_over_vmap": loop_s / vmap_s,
          "vmap_compile_s": max(vmap_first - vmap_s, 0.0),
          "single_compile_s": max(single_first - loop_s / len(looped), 0.0),
          "loop_equals_vmap": bool(np.array_equal(looped, np.asarray(wrong))),
          "backend": jax.default_backend()}


def verify(model, ds, args, settings, chosen) -> list[dict]:
  """Re-evaluate up to ``args.verify`` settings from their files."""
  by_size = sorted(settings, key=lambda r: r["file_bytes"])
  picks = []
  for r in (by_size[0], chosen, by_size[-1], *by_size[1:-1]):
    if r not in picks:
      picks.append(r)
  out = []
  for r in picks[:max(args.verify, 0)]:
    loaded = cx.io.load(r["file"])
    err = train_lib.evaluate(model, loaded, ds.x_test, ds.y_test,
                             args.eval_batch_size)
    out.append({"bits": r["bits"], "sparsity": r["sparsity"],
                "vmapped_error": r["test_error"], "file_error": err,
                "equal": err == r["test_error"]})
  return out


def table(front: list[dict], baseline: float) -> str:
  """The Pareto front as a text table (smallest file first)."""
  head = ("bits", "sparsity", "test error", "vs fp32", "file bytes", "ratio")
  body = [(str(r["bits"]), f"{r['sparsity']:g}", f"{100 * r['test_error']:.2f}%",
           f"{100 * (r['test_error'] - baseline):+.2f}", f"{r['file_bytes']:,}",
           f"{r['ratio']:.1f}x") for r in front]
  widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
  fmt = lambda r: "  ".join(c.rjust(w) for c, w in zip(r, widths))  # noqa: E731
  return "\n".join([f"Pareto front (fp32 baseline {100 * baseline:.2f}%):",
                    fmt(head), "-" * len(fmt(head)), *map(fmt, body)])


def plot_pareto(path, settings, front, chosen, baseline, title) -> None:
  """Test error vs file bytes (log x), coloured by bits, front as a step line."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  bits = sorted({r["bits"] for r in settings})
  cmap = plt.get_cmap("viridis", max(len(bits), 2))
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for i, b in enumerate(bits):
    pts = [r for r in settings if r["bits"] == b]
    ax.scatter([r["file_bytes"] for r in pts], [100 * r["test_error"] for r in pts],
               color=cmap(i), label=f"{b} bits", s=28, zorder=3)
  ax.step([r["file_bytes"] for r in front], [100 * r["test_error"] for r in front],
          where="post", color="black", lw=1, label="Pareto front", zorder=2)
  ax.scatter([chosen["file_bytes"]], [100 * chosen["test_error"]], s=140,
             facecolors="none", edgecolors="red", lw=1.5, label="model.cx",
             zorder=4)
  ax.axhline(100 * baseline, color="gray", ls="--", label="fp32 baseline")
  ax.set_xscale("log")
  ax.set_xlabel("file bytes (cx.io.save)")
  ax.set_ylabel("test error (%)")
  ax.set_title(title, fontsize="medium")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize="small", ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  main(sys.argv[1:])
