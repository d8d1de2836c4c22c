"""Running SmolLM2-135M from compressed kernels: tokens/s, memory, perplexity.

Every block kernel of SmolLM2-135M (``experiments/llm/models.py``; the
embedding, tied head and norms stay float32) is stored as

* ``float32``: the dense kernels (the baseline);
* ``int8``: weight-only int8, symmetric per output column (``cx.oneshot.rtn``
  ``bits=8, symmetric=True``), dequantized at use;
* ``int4-g128``: weight-only 4-bit, asymmetric, groups of 128 input rows
  (``rtn`` ``bits=4, group_size=128``), two codes per byte, dequantized at use;
* ``int4-all``: ``int4-g128``, and the tied embedding table too: kept as
  the head's kernel ``E.T (576, 49152)``, 4-bit in groups of 128 along the
  width (one grid per token); the embedding lookup decodes the tokens'
  columns (``cx.run.columns``), the head decodes ``VOCAB_TILE`` vocabulary
  columns at a time;
* ``w8a8``: the int8 kernels with int8 per-token activations, integer
  matmuls (``cx.run.pack(..., activations=8)``);
* ``w8a8-smooth``: W8A8 with SmoothQuant's smoothing (``cx.run.w8a8``,
  ``alpha`` 0.5), the activation scale of each input channel being its RMS
  over ``CALIB_WINDOWS`` windows of 512 tokens from the first 90% of
  tiny-shakespeare in the float model (``sqrt(diag(h) / 2)`` of
  ``cx.oneshot.block_hessians``, block by block);
* ``sparse-2of4``, ``sparse-0.5``: magnitude-pruned kernels (2 of every 4
  input rows per column, ``cx.prune.nm_mask``; half of each kernel,
  ``cx.prune.magnitude_mask``) as ``cx.prune.MaskedArray`` nodes (float32
  values and a bool mask in memory), decoded at use: what masks buy on a
  dense CPU matmul (not in the default ``--variants``);

written with ``cx.save`` and evaluated by a fresh process per variant and
batch size that reads the file with ``cx.load(keep_compressed=True)`` and runs
the jitted forward with ``cx.run.intercept()`` (each kernel decoded at its
layer). The forward is the evaluation: summed next-token NLL of ``(batch,
context)`` windows, the head computed ``VOCAB_TILE`` vocabulary columns at a
time for all positions with a running log-sum-exp (the same function for
every variant; before this, the head ran 128 positions at a time over the
whole vocabulary). Measured per process:

* ``xla``: XLA's ``compiled.memory_analysis()``: argument + temp + output
  bytes of the compiled forward (what the forward needs, runtime excluded);
* ``rss_eval``: the peak resident set size sampled every 2 ms during one call
  after a warm-up call (the process as it evaluates: runtime, codes, buffers);
* ``maxrss``: ``ru_maxrss`` of the whole process (file loading included);
* ``ppl``: perplexity on ``--ppl-windows`` windows of the last 10% of
  tiny-shakespeare (the windows of ``experiments.oneshot``). For the
  compressed variants also ``ppl_materialized``: the same kernels
  materialized to float32 first.

``tokens/s`` comes from one more process per batch size that holds every
variant: ``batch * context`` over the median wall time of ``--repeats``
calls of each, after a warm-up call, the variants called round-robin (the
order rotated each round), so that a shared machine's load moves all of them
together.

``qwix-*`` rows run Qwix's PTQ provider (``qwix.quantize_model`` on the block,
``qwix.quantize_params``) on the same model, formats and batches (int4 with
tiles of 64: Qwix needs tiles that divide the 576 input rows), quantizing
in the worker from the float32 file (so their ``maxrss`` includes the float
weights; ``rss_eval`` and ``xla`` are comparable).

Run ``python benchmarks/inference.py`` (``--context``, ``--batches``,
``--repeats``, ``--variants``, ``--ppl-windows`` for quicker runs; needs the
``llm`` extra and, for the qwix rows, ``qwix`` from the ``bench`` extra).
Results go to ``runs/inference/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import compressax as cx  # noqa: E402
from experiments.llm import models as models_lm  # noqa: E402

VARIANTS = ["float32", "int8", "int4-g128", "int4-all", "w8a8", "w8a8-smooth",
            "qwix-int8", "qwix-int4-g64",
            "qwix-w8a8", "sparse-2of4", "sparse-0.5"]
DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    "..", "shared", "data", "tinyshakespeare.txt")
CHUNK = 128   # positions of Qwix's example input
CALIB_WINDOWS = 8
VOCAB_TILE = 4096


def act_scales(model, params, windows):
  """Per block, ``{kernel path: RMS of each input channel}`` in the float model."""
  x = jnp.concatenate([model.embed(params, jnp.asarray(w[None])) for w in windows])
  out = []
  for p in params["blocks"]:
    paths = [cx.path_str(k) for k, _ in jax.tree_util.tree_flatten_with_path(p)[0]
             if cx.path_str(k).endswith("kernel")]
    hs = cx.oneshot.block_hessians(model.block_apply, p, [x], paths)
    out.append({k: jnp.sqrt(jnp.diagonal(h) / 2) for k, (h, _) in hs.items()})
    x = model.block_apply(p, x)
  return out


def compress(variant: str, params, calib=None):
  """The params of a variant: block kernels as nodes (or float32).

  ``calib``: ``(model, windows)`` for the variants that calibrate."""
  if variant == "float32":
    return params
  if variant == "w8a8-smooth":
    model, windows = calib
    scales = act_scales(model, params, windows)
    blocks = [cx.map_selected(lambda p, w, a=a: cx.run.w8a8(w, a[cx.path_str(p)], path=p), b)
              for b, a in zip(params["blocks"], scales)]
    return dict(params, blocks=blocks)
  if variant.startswith("sparse-"):
    blocks = params["blocks"]
    if variant == "sparse-2of4":
      mask = [cx.map_selected(lambda p, w: cx.prune.nm_mask(w, 2, 4, axis=0), b,
                              unselected=np.bool_(True)) for b in blocks]
    else:
      mask = cx.prune.magnitude_mask(blocks, float(variant.split("-")[1]))
    return dict(params, blocks=cx.prune.mask_to_nodes(blocks, mask))
  kw = {"int8": dict(bits=8, symmetric=True), "w8a8": dict(bits=8, symmetric=True),
        "int4-g128": dict(bits=4, group_size=128),
        "int4-all": dict(bits=4, group_size=128)}[variant]
  blocks = [cx.map_selected(lambda p, w: cx.oneshot.rtn(w, **kw, path=p), b)
            for b in params["blocks"]]
  blocks = cx.run.pack(blocks, activations=8 if variant == "w8a8" else None)
  if variant == "int4-all":   # the tied table as the head's kernel (width, vocab)
    table = cx.run.pack(cx.oneshot.rtn(params["embed"].T, **kw, path="embed"))
    return dict(params, blocks=blocks, embed=table)
  return dict(params, blocks=blocks)


def to_tree(params):
  return dict(params, blocks={f"block_{i:02d}": b for i, b in enumerate(params["blocks"])})


def from_tree(tree):
  return dict(tree, blocks=[tree["blocks"][k] for k in sorted(tree["blocks"])])


def embed(table, tokens):
  """Rows of the tied table: ``(vocab, d)`` dense, or a ``(d, vocab)`` node."""
  if cx.is_compressed(table):
    return jnp.moveaxis(cx.run.columns(table, tokens), 0, -1)
  return jnp.take(table, tokens, axis=0)


def head_tile(table, start):
  """Columns ``start:start + VOCAB_TILE`` of the tied head's kernel ``E.T``,
  as floats ``(d, VOCAB_TILE)``: sliced from a dense ``(vocab, d)`` table, or
  decoded from a compressed ``(d, vocab)`` node (only those columns)."""
  if cx.is_compressed(table):
    return cx.run.columns(table, start + jnp.arange(VOCAB_TILE, dtype=jnp.int32))
  return jax.lax.dynamic_slice_in_dim(table, start, VOCAB_TILE, axis=0).T


def make_nll(model, block_apply):
  """Summed next-token NLL of ``tokens (batch, context)``, head in vocabulary tiles.

  The head runs over ``VOCAB_TILE`` vocabulary columns at a time for every
  position at once, with a running log-sum-exp, so the logits of one tile
  are alive, and a compressed table is decoded once per forward, a tile at a
  time (the same function for every variant)."""
  cfg = model.cfg

  def nll(params, tokens):
    table = params["embed"]
    x = embed(table, tokens)
    for p in params["blocks"]:
      x = block_apply(p, x)
    x = models_lm.RMSNorm(cfg.eps).apply({"params": params["norm"]}, x)
    b, s, d = x.shape
    h = x.reshape(b * s, d)
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros((b, 1), tokens.dtype)], axis=1)
    targets = targets.reshape(-1)
    weight = jnp.tile((jnp.arange(s) < s - 1).astype(jnp.float32), b)
    vocab = cfg.vocab
    if vocab % VOCAB_TILE:
      raise ValueError(f"vocabulary {vocab} is not a multiple of VOCAB_TILE={VOCAB_TILE}")

    def tile(carry, start):
      m, se, hit = carry
      lg = h @ head_tile(table, start)                        # (positions, tile)
      m_new = jnp.maximum(m, jnp.max(lg, axis=-1))
      se = se * jnp.exp(m - m_new) + jnp.sum(jnp.exp(lg - m_new[:, None]), axis=-1)
      ids = start + jnp.arange(VOCAB_TILE, dtype=targets.dtype)
      hit = hit + jnp.sum(jnp.where(targets[:, None] == ids[None, :], lg, 0.0), axis=-1)
      return (m_new, se, hit), None

    n = h.shape[0]
    init = (jnp.full((n,), -jnp.inf, h.dtype), jnp.zeros((n,), h.dtype),
            jnp.zeros((n,), h.dtype))
    starts = jnp.arange(0, vocab, VOCAB_TILE, dtype=jnp.int32)
    (m, se, hit), _ = jax.lax.scan(tile, init, starts)
    return jnp.sum((m + jnp.log(se) - hit) * weight)

  return nll


def _rss() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Sampler:
  """The peak RSS over a stretch of time, sampled every 2 ms in a thread."""

  def __enter__(self):
    self.peak, self._stop = _rss(), threading.Event()
    self._t = threading.Thread(target=self._run, daemon=True)
    self._t.start()
    return self

  def _run(self):
    while not self._stop.wait(0.002):
      self.peak = max(self.peak, _rss())

  def __exit__(self, *exc):
    self._stop.set()
    self._t.join()


def _qwix_setup(variant, model, params):
  import qwix
  fmt = variant.removeprefix("qwix-")
  rule = dict(module_path=r"(q|k|v|o|gate|up|down)")
  if fmt == "int8":
    rule.update(weight_qtype=jnp.int8)
  elif fmt == "int4-g64":
    # Qwix needs tiles that divide the axis: 576 rows are not a multiple of 128.
    rule.update(weight_qtype=jnp.int4, tile_size=64)
  else:
    rule.update(weight_qtype=jnp.int8, act_qtype=jnp.int8, act_batch_axes=(0, 1))
  x = jnp.zeros((1, CHUNK, model.cfg.width))
  qblock = qwix.quantize_model(model.block, qwix.PtqProvider([qwix.QuantizationRule(**rule)]))
  abstract = jax.eval_shape(qblock.init, jax.random.key(0), x)["params"]
  blocks = [qwix.quantize_params(b, abstract) for b in params["blocks"]]
  return dict(params, blocks=blocks), lambda p, h: qblock.apply({"params": p}, h)


def _ppl(sums, context) -> float:
  return float(np.exp(sum(sums) / (len(sums) * (context - 1))))


def _load(args, variant, model):
  """``(params, block_apply)`` of a variant, read from its file."""
  qwix_run = variant.startswith("qwix-")
  name = "float32" if qwix_run else variant
  tree = cx.load(os.path.join(args.out, f"{name}.cx"), keep_compressed=True)
  params = jax.tree.map(jnp.asarray, from_tree(tree))
  del tree
  if qwix_run:
    return _qwix_setup(variant, model, params)
  return params, model.block_apply


def _model(args):
  with open(os.path.join(args.out, "config.json")) as f:
    return models_lm.Llama(models_lm.LlamaConfig(**json.load(f)))


def _tokens(args):
  windows = np.load(os.path.join(args.out, "windows.npy"))
  return windows, jnp.asarray(np.resize(windows, (args.batch, args.context)))


def speed_worker(args) -> dict:
  """Every variant in one process, timed round-robin (the load moves together)."""
  model = _model(args)
  _, tokens = _tokens(args)
  runs = {}
  for v in args.variants.split(","):
    params, block_apply = _load(args, v, model)
    with cx.run.intercept():
      f = jax.jit(make_nll(model, block_apply)).lower(params, tokens).compile()
    f(params, tokens).block_until_ready()
    runs[v] = (f, params)
  times = {v: [] for v in runs}
  order = list(runs)
  for r in range(args.repeats):
    for v in order[r % len(order):] + order[:r % len(order)]:
      f, params = runs[v]
      t = time.perf_counter()
      f(params, tokens).block_until_ready()
      times[v].append(time.perf_counter() - t)
  return {"variant": "speed", "batch": args.batch, "context": args.context,
          "seconds": {v: float(np.median(t)) for v, t in times.items()},
          "all_seconds": times}


def worker(args) -> dict:
  """One variant at one batch size, in its own process: memory, perplexity."""
  out = {"variant": args.variant, "batch": args.batch, "context": args.context}
  model = _model(args)
  qwix_run = args.variant.startswith("qwix-")
  params, block_apply = _load(args, args.variant, model)
  out["param_bytes"] = sum(int(a.nbytes) for a in jax.tree.leaves(params))
  windows, tokens = _tokens(args)
  nll = make_nll(model, block_apply)
  with cx.run.intercept():
    compiled = jax.jit(nll).lower(params, tokens).compile()
  mem = compiled.memory_analysis()
  out["xla_bytes"] = int(mem.argument_size_in_bytes + mem.temp_size_in_bytes
                         + mem.output_size_in_bytes)
  out["xla_temp_bytes"] = int(mem.temp_size_in_bytes)
  compiled(params, tokens).block_until_ready()
  with _Sampler() as s:
    compiled(params, tokens).block_until_ready()
  out["rss_eval_bytes"] = s.peak
  if args.ppl_windows:
    evals = [jnp.asarray(w[None]) for w in windows[:args.ppl_windows]]
    with cx.run.intercept():
      f = compiled if args.batch == 1 else jax.jit(nll)
      out["ppl"] = _ppl([float(f(params, w)) for w in evals], args.context)
    if args.variant != "float32" and not qwix_run:
      dense, f = cx.materialize(params), jax.jit(nll)
      if cx.is_compressed(params["embed"]):   # kept as (width, vocab)
        dense["embed"] = dense["embed"].T
      out["ppl_materialized"] = _ppl([float(f(dense, w)) for w in evals], args.context)
  out["maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  return out


def floor_worker(args) -> dict:
  """The runtime alone: jax and compressax imported, one tiny jitted call."""
  jax.jit(lambda x: x + 1)(jnp.ones(4)).block_until_ready()
  return {"variant": "runtime", "rss_bytes": _rss(),
          "maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def prepare(args, variants):
  os.makedirs(args.out, exist_ok=True)
  model, params, tok = models_lm.load("smollm2-135m", args.cache)
  with open(os.path.join(args.out, "config.json"), "w") as f:
    f.write(models_lm.config_json(model))
  text = open(args.data, encoding="utf-8").read()
  ids = np.asarray(tok.encode(text[int(0.9 * len(text)):]).ids, np.int32)
  n = len(ids) // args.context
  np.save(os.path.join(args.out, "windows.npy"),
          ids[:n * args.context].reshape(n, args.context))
  train = np.asarray(tok.encode(text[:int(0.9 * len(text))]).ids, np.int32)
  starts = np.linspace(0, len(train) - 512, CALIB_WINDOWS).astype(int)
  calib = (model, [train[i:i + 512] for i in starts])
  for v in {"float32"} | {v for v in variants if not v.startswith("qwix-")}:
    cx.save(os.path.join(args.out, f"{v}.cx"), to_tree(compress(v, params, calib)))
  return {"variant": "prepare"}


def table(rows, floor, speed) -> str:
  """Ratios to float32 at the same batch; tokens/s from the median call, and
  the ratio of the fastest calls beside it (robust to a burst of load)."""
  base = {r["batch"]: r for r in rows if r["variant"] == "float32"}
  lines = ["| variant | batch | tokens/s | x float32 | x float32 (fastest calls) | "
           "params (MB) | XLA bytes (MB) | x float32 | RSS eval (MB) | "
           "RSS - runtime, x float32 | ppl | ppl materialized |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    b = base.get(r["batch"])
    if b is None or "error" in r or "tokens_per_s" not in r:
      lines.append(f"| {r['variant']} | {r['batch']} | {r.get('error', 'not measured')} |"
                   + " |" * 9)
      continue
    times = speed[r["batch"]]["all_seconds"]
    fastest = min(times["float32"]) / min(times[r["variant"]])
    net = (r["rss_eval_bytes"] - floor) / (b["rss_eval_bytes"] - floor)
    ppl = f"{r['ppl']:.3f}" if "ppl" in r else ""
    pm = f"{r['ppl_materialized']:.3f}" if "ppl_materialized" in r else ""
    lines.append(
        f"| {r['variant']} | {r['batch']} | {r['tokens_per_s']:.1f} | "
        f"{r['tokens_per_s'] / b['tokens_per_s']:.2f} | {fastest:.2f} | "
        f"{r['param_bytes'] / 1e6:.0f} | {r['xla_bytes'] / 1e6:.0f} | "
        f"{r['xla_bytes'] / b['xla_bytes']:.3f} | {r['rss_eval_bytes'] / 1e6:.0f} | "
        f"{net:.2f} | {ppl} | {pm} |")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--context", type=int, default=512, help="tokens per window")
  p.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
  p.add_argument("--repeats", type=int, default=3, help="timed calls per measurement")
  p.add_argument("--variants",
                 default=",".join(v for v in VARIANTS if not v.startswith("sparse-")),
                 help=f"comma-separated variants, of {','.join(VARIANTS)}")
  p.add_argument("--ppl-windows", type=int, default=4,
                 help="perplexity windows (measured at the first batch size; 0: none)")
  p.add_argument("--data", default=DATA, help="tiny-shakespeare")
  p.add_argument("--cache", default=models_lm.CACHE, help="model file cache")
  p.add_argument("--out", default="runs/inference", help="output directory")
  p.add_argument("--table", action="store_true",
                 help="print the table of the results.json in --out and exit")
  p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  p.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  variants = args.variants.split(",")
  if "float32" not in variants:
    variants = ["float32"] + variants
  if args.worker:
    args.variant = args.worker
    out = (floor_worker(args) if args.worker == "runtime" else
           prepare(args, variants) if args.worker == "prepare" else
           speed_worker(args) if args.worker == "speed" else worker(args))
    print(json.dumps(out))
    return
  if args.table:   # print the table of an earlier run's results.json
    with open(os.path.join(args.out, "results.json")) as f:
      r = json.load(f)
    print(table(r["rows"], r["runtime"]["rss_bytes"],
                {int(k): v for k, v in r["speed"].items()}))
    return
  batches = [int(b) for b in args.batches.split(",")]
  start = time.time()
  rows = []
  common = ["--context", str(args.context), "--repeats", str(args.repeats),
            "--out", args.out, "--cache", args.cache, "--variants", ",".join(variants),
            "--data", args.data]
  # Large blocks freed by a worker go back to the OS (glibc would otherwise
  # keep them as heap, and resident).
  env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")

  def run(variant, batch, ppl, only=None):
    # Workers start from this small process (ru_maxrss survives fork and exec).
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", variant,
           "--batch", str(batch), "--ppl-windows", str(ppl)] + common
    if only is not None:
      cmd[cmd.index("--variants") + 1] = ",".join(only)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode:
      errors = [ln for ln in r.stderr.splitlines() if "Error" in ln] or ["failed"]
      return {"variant": variant, "batch": batch, "error": errors[-1][:200]}
    return json.loads(r.stdout.strip().splitlines()[-1])

  prep = run("prepare", 1, 0)
  if "error" in prep:
    raise SystemExit(f"prepare failed: {prep['error']}")
  load = os.getloadavg()
  floor = run("runtime", 1, 0)
  speed = {}
  for i, batch in enumerate(batches):
    for v in variants:
      rows.append(run(v, batch, args.ppl_windows if i == 0 else 0))
      print(json.dumps(rows[-1]), flush=True)
    ok = [r["variant"] for r in rows if r["batch"] == batch and "error" not in r]
    speed[batch] = run("speed", batch, 0, ok)
    print(json.dumps(speed[batch]), flush=True)
    for r in rows:
      if r["batch"] == batch and r["variant"] in speed[batch].get("seconds", {}):
        r["seconds"] = speed[batch]["seconds"][r["variant"]]
        r["tokens_per_s"] = batch * args.context / r["seconds"]
  result = {"command": "python benchmarks/inference.py " + " ".join(argv or sys.argv[1:]),
            "loadavg_start": load, "loadavg_end": os.getloadavg(), "speed": speed,
            "cpus": os.cpu_count(), "jax": jax.__version__, "runtime": floor, "rows": rows,
            "wall_time_s": time.time() - start}
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(result, f, indent=2)
  print(table(rows, floor["rss_bytes"], speed))
  print(f"load average {load} -> {result['loadavg_end']}; {os.cpu_count()} CPUs")


if __name__ == "__main__":
  main()
