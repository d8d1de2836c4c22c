"""Weightless (Reagen et al. 2018) after Deep Compression, on LeNet-300-100.

The pipeline, every stage through compressax's public API:

1. **Deep Compression** (``experiments.deep_compression``, the same flags):
   baseline, pruning rounds, k-means weight sharing with trained centroids.
   Or ``--from FILE``: start from a ``model.cx`` that experiment wrote.
2. **Re-clustering** (``--recluster-bits``, optional): the layers to encode
   are shared again at fewer clusters (a ``cx.methods.KMeans(pruned=True)``
   plan, ``--share-epochs`` of centroid training): a Bloomier filter of
   ``t``-bit cells decodes a pruned weight to a cluster with probability
   ``K / 2^t``, so Weightless wants few clusters.
3. **Weightless**: ``cx.weightless.freeze_and_retrain`` encodes the layers of
   ``--layers`` one by one (``cx.methods.Weightless(bits=--cell-bits)``),
   freezes each at its decoded values, false positives included, and
   retrains the rest: ``--retrain-mode centroids`` trains the other kernels'
   centroids (``cx.methods.KMeans(pruned=True)``) and the biases for
   ``--retrain-epochs``; ``free`` trains the other kernels' kept weights with
   their masks held (``cx.optim.prune_fixed``) for ``--retrain-epochs``, then
   shares them again (``--reshare-epochs`` of centroid training).

Two files are written: ``dc.cx``, the model right before encoding (every
layer in Deep Compression's encoding), and ``model.cx``, the same model with
the encoded layers as ``cx.weightless.BloomierArray``; with
``--recluster-bits`` also ``pipeline.cx``, the Deep Compression model before
re-clustering. Both test errors are
measured on the weights decoded from the files; ``results.json`` compares
the encoded layers' bytes both ways (the file's payload bytes of the leaf,
``cx.size_report``), and against ``pipeline.cx`` and the ``--from`` file.

Run ``python -m experiments.weightless`` (LeNet-300-100 on the bundled
digits) or, on MNIST::

  python -m experiments.weightless --dataset npz:../shared/data/mnist.npz \\
      --epochs 20 --prune-epochs 30 --share-epochs 10

Paper: up to 496x on one layer, and 1.51x smaller than Deep Compression's
encoding of the same layer at the same accuracy.

References:
  Reagen et al., *Weightless: Lossy weight encoding for deep neural network
  compression*, ICML 2018. https://arxiv.org/abs/1711.04686
  Han, Mao, Dally, *Deep Compression*, ICLR 2016.
  https://arxiv.org/abs/1510.00149
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import jax
import numpy as np

import compressax as cx
from experiments import deep_compression as dc
from experiments import train as train_lib

MODULE = "experiments.weightless"


def parse_args(argv=None):
  """Weightless's flags; every other flag is ``experiments.deep_compression``'s."""
  argv = list(sys.argv[1:] if argv is None else argv)
  p = argparse.ArgumentParser(
      prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0],
      epilog="All flags of python -m experiments.deep_compression are accepted "
             "too (--model, --dataset, --seed, --out, --epochs, --keep, --bits, "
             "--share-epochs, ...).", formatter_class=train_lib.HelpFormatter)
  p.add_argument("--layers", default="ip1",
                 help="comma-separated path regexes of the kernels to encode, in "
                      "order (each must match one kernel)")
  p.add_argument("--cell-bits", type=int, default=5,
                 help="t: bits per Bloomier cell (false positives: K / 2^t)")
  p.add_argument("--hashes", type=int, default=3, help="k: cells XORed per weight")
  p.add_argument("--filter-seed", type=int, default=0,
                 help="first hash seed tried (the file records the one used)")
  p.add_argument("--recluster-bits", type=int, default=None,
                 help="share the encoded layers again at 2^bits clusters before "
                      "encoding (default: keep Deep Compression's clusters)")
  p.add_argument("--retrain-epochs", type=int, default=4,
                 help="epochs of retraining after each encoded layer")
  p.add_argument("--retrain-mode", choices=("centroids", "free"),
                 default="centroids",
                 help="centroids: train the other kernels' centroids (and the "
                      "biases) for --retrain-epochs; free: train their kept "
                      "weights with the masks held (at --prune-lr) for "
                      "--retrain-epochs, then share them again (k-means and "
                      "--reshare-epochs of centroid training)")
  p.add_argument("--reshare-epochs", type=int, default=2,
                 help="centroid epochs after a free retraining")
  p.add_argument("--retrain-lr", type=float, default=None,
                 help="learning rate of that retraining (default: --share-lr)")
  p.add_argument("--from", dest="start", default=None,
                 help="start from this model.cx of experiments.deep_compression "
                      "(same --model and --dataset) instead of running it")
  wl, rest = p.parse_known_args(argv)
  if "-h" in argv or "--help" in argv:
    p.print_help()
    print()
  args = dc.parse_args(rest + ["--no-plot"])
  for k, v in vars(wl).items():
    setattr(args, k, v)
  args.argv = argv
  args.layers = [s.strip() for s in args.layers.split(",") if s.strip()]
  if not args.layers:
    p.error("--layers: name at least one kernel")
  if not 1 <= args.cell_bits <= 16 or not 2 <= args.hashes <= 8:
    p.error("--cell-bits must be in [1, 16] and --hashes in [2, 8]")
  if args.retrain_epochs < 0:
    p.error("--retrain-epochs must be >= 0")
  if args.recluster_bits is not None and \
      (1 << args.recluster_bits) > (1 << args.cell_bits) - 1:
    p.error(f"--recluster-bits {args.recluster_bits}: 2^bits clusters do not "
            f"fit {args.cell_bits}-bit cells (at most 2^t - 1)")
  if args.start is not None and args.distill_alpha:
    p.error("--distill-alpha needs the baseline: not with --from")
  if args.retrain_lr is None:
    args.retrain_lr = args.share_lr
  if "--out" not in rest:
    args.out = train_lib.default_out("weightless", args)
  return args


def _log(args, msg):
  if not args.quiet:
    print(msg, flush=True)


def _kernel_paths(params, patterns):
  """The kernel path each ``--layers`` regex matches (exactly one each)."""
  kernels = [cx.path_str(kp) for kp, _ in cx.selected_leaves(params)]
  out = []
  for pat in patterns:
    hits = [k for k in kernels if re.search(pat, k)]
    if len(hits) != 1:
      raise SystemExit(f"--layers: {pat!r} matches {hits or 'no kernel'}; the "
                       f"kernels are {kernels}")
    out.append(hits[0])
  return out


def _exact(path):
  return f"^{re.escape(path)}$"


def _shared_tree(params, bits_of):
  """Dense clustered kernels -> ``MaskedArray(CodebookArray)`` (exact codebooks)."""
  def leaf(kp, w):
    return cx.methods.KMeans(bits=bits_of(cx.path_str(kp)), pruned=True).finalize(
        kp, w, {})
  return cx.map_selected(leaf, params)


def _leaf_bytes(report, path):
  leaf = {s.path: s for s in report.leaves}[path]
  return leaf.value_bytes + leaf.index_bytes


def _bits_of(args, encoded):
  table = dc._by_layer(args.bits, "--bits")

  def fn(path):
    if path in encoded and args.recluster_bits is not None:
      return args.recluster_bits
    return table(path, None)
  return fn


def _start(model, ds, params, args, curves):
  """The pruned, shared model: Deep Compression's stages, or ``--from``.

  Returns ``(tree, baseline error, its error, retraining loss)``; with
  ``--from`` the baseline error is the one in the ``results.json`` beside
  the file (None without one).
  """
  if args.start is not None:
    tree = cx.load(args.start, keep_compressed=True)
    err = train_lib.evaluate(model, tree, ds.x_test, ds.y_test)
    _log(args, f"  from {args.start}: test error {err:.4f}")
    side = os.path.join(os.path.dirname(args.start), "results.json")
    baseline = None
    if os.path.exists(side):
      with open(side) as f:
        baseline = json.load(f).get("baseline_test_error")
    return tree, baseline, err, None
  params, _, hist = train_lib.fit(
      model, params, dc._sgd(args, ds, args.lr, args.epochs, args.weight_decay),
      ds, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
      quiet=args.quiet, desc="baseline")
  curves["baseline"] = hist["test_error"]
  baseline = train_lib.evaluate(model, params, ds.x_test, ds.y_test)
  _log(args, f"  baseline: test error {baseline:.4f}")
  loss_fn = dc.distill_loss(model, params, args)
  pruned = dc.prune_and_retrain(model, params, ds, args, curves, loss_fn)
  tree, _ = dc.share_and_finetune(model, pruned, ds, args, curves, loss_fn)
  err = train_lib.evaluate(model, tree, ds.x_test, ds.y_test)
  _log(args, f"  Deep Compression: test error {err:.4f}")
  return tree, baseline, err, loss_fn


def _recluster(model, tree, ds, args, encoded, curves, loss_fn):
  """The encoded layers shared again at ``2^--recluster-bits`` clusters."""
  params = cx.materialize(tree)
  bits_of = _bits_of(args, encoded)  # the other kernels keep their codebooks
  plan = cx.Plan({_exact(cx.path_str(kp)): cx.methods.KMeans(
      bits=bits_of(cx.path_str(kp)), pruned=True)
      for kp, _ in cx.selected_leaves(params)}, where=cx.default_rule)
  train = plan.init(params)
  tx = plan.optimizer(dc._sgd(args, ds, args.share_lr, args.share_epochs))
  state = tx.init(train)
  train, _, hist = dc._fit(model, plan, train, tx, ds, args,
                           epochs=args.share_epochs, seed=args.seed + 300,
                           desc="recluster", loss_fn=loss_fn, opt_state=state)
  curves["recluster"] = hist["test_error"]
  return train["params"]


def _free_retrain(model, params, frozen, ds, args, stage, curves, loss_fn):
  """The kept weights of the kernels not yet encoded, trained with masks held.

  ``cx.optim.prune_fixed`` holds every kernel's zeros, ``cx.weightless.freeze``
  the encoded kernels; the biases train freely. Weight sharing follows.
  """
  masks = cx.map_selected(lambda kp, w, f: np.asarray(True) if f else
                          np.asarray(w) != 0, params, frozen,
                          unselected=np.asarray(True))
  tx = cx.weightless.freeze(cx.optim.prune_fixed(
      dc._sgd(args, ds, args.prune_lr, args.retrain_epochs), masks), frozen)
  params, _, hist = train_lib.fit(
      model, params, tx, ds, epochs=args.retrain_epochs,
      batch_size=args.batch_size, seed=args.seed + 500 + stage,
      quiet=args.quiet, desc=f"free retrain {stage}", loss_fn=loss_fn)
  curves[f"weightless {stage}"] += hist["test_error"]
  return params


def weightless_stage(model, params, ds, args, encoded, bits_of, curves, loss_fn):
  """``cx.weightless.freeze_and_retrain`` over ``encoded``; returns the tree."""
  method = cx.methods.Weightless(bits=args.cell_bits, hashes=args.hashes,
                                 seed=args.filter_seed)
  plan = cx.Plan([(_exact(p), method) for p in encoded], where=cx.default_rule)
  kernels = [cx.path_str(kp) for kp, _ in cx.selected_leaves(params)]
  stage = [0]

  def retrain(p, frozen):
    stage[0] += 1
    frozen_paths = {cx.path_str(kp) for kp, f in
                    jax.tree_util.tree_leaves_with_path(frozen) if f}
    err = train_lib.evaluate(model, p, ds.x_test, ds.y_test)
    _log(args, f"  encoded {sorted(frozen_paths)}: test error {err:.4f} "
               "before retraining")
    curves[f"weightless {stage[0]}"] = [err]
    if not args.retrain_epochs:
      return p
    if args.retrain_mode == "free":
      p = _free_retrain(model, p, frozen, ds, args, stage[0], curves, loss_fn)
    rules = [(_exact(k), method) for k in kernels if k in frozen_paths]
    rules += [(_exact(k), cx.methods.KMeans(bits=bits_of(k), pruned=True))
              for k in kernels if k not in frozen_paths]
    rplan = cx.Plan(rules, where=cx.default_rule)
    train = rplan.init(p)
    epochs = args.retrain_epochs if args.retrain_mode == "centroids" \
        else args.reshare_epochs
    tx = rplan.optimizer(dc._sgd(args, ds, args.retrain_lr, epochs))
    state = tx.init(train)
    train, _, hist = dc._fit(model, rplan, train, tx, ds, args, epochs=epochs,
                             seed=args.seed + 400 + stage[0],
                             desc=f"retrain {stage[0]}", loss_fn=loss_fn,
                             opt_state=state)
    curves[f"weightless {stage[0]}"] += hist["test_error"]
    return train["params"]  # the weight-sharing wrapper keeps them on the codebooks

  out = cx.weightless.freeze_and_retrain(params, plan, retrain)
  rest = [k for k in kernels if k not in encoded]
  return cx.map_selected(
      lambda kp, w: cx.methods.KMeans(bits=bits_of(cx.path_str(kp)),
                                      pruned=True).finalize(kp, w, {}),
      out, where=lambda path, leaf: path in rest)


def _layer_stats(node, dense_before):
  """Kept weights, false positives and the filter's parameters of one layer."""
  decoded = np.asarray(node.materialize())
  keep = np.asarray(dense_before) != 0
  fp = int(np.count_nonzero(decoded[~keep]))
  zeros = int((~keep).sum())
  return {"kept": int(keep.sum()), "clusters": node.n_clusters,
          "cell_bits": node.bits, "hashes": node.hashes, "cells": node.n_cells,
          "seed": node.seed, "storage_bits": node.storage_bits(),
          "false_positives": fp, "false_positive_rate": fp / max(1, zeros),
          "expected_rate": cx.weightless.false_positive_rate(node.n_clusters,
                                                             node.bits)}


def main(argv=None) -> dict:
  args = parse_args(argv)
  start = time.time()
  model, ds, init = train_lib.setup(args)
  curves: dict = {}
  _log(args, f"Weightless: {args.model} on {args.dataset} "
             f"({len(ds.x_train)} train / {len(ds.x_test)} test images)")
  tree, baseline, dc_error, loss_fn = _start(model, ds, init, args, curves)
  params = cx.materialize(tree)
  encoded = _kernel_paths(params, args.layers)
  bits_of = _bits_of(args, encoded)
  os.makedirs(args.out, exist_ok=True)
  start_bytes = None
  if args.start is not None:
    start_bytes = {p: _leaf_bytes(cx.size_report(args.start), p) for p in encoded}
  pipeline = None
  if args.recluster_bits is not None:  # the pipeline's own file, for comparison
    pipeline = train_lib.saved_run(os.path.join(args.out, "pipeline.cx"),
                                   dc.quantize_biases(tree, args.bias_bits),
                                   model, ds, args)
    pipeline["report"] = cx.size_report(pipeline["file"])
    params = _recluster(model, tree, ds, args, encoded, curves, loss_fn)
  before = dc.quantize_biases(_shared_tree(params, bits_of), args.bias_bits)
  dc_run = train_lib.saved_run(os.path.join(args.out, "dc.cx"), before, model,
                               ds, args)
  dc_report = cx.size_report(dc_run["file"])
  _log(args, f"  Deep Compression file: {dc_run['file_bytes']} bytes, test error "
             f"{dc_run['test_error']:.4f}")

  out = weightless_stage(model, params, ds, args, encoded, bits_of, curves,
                         loss_fn)
  out = dc.quantize_biases(out, args.bias_bits)
  results = train_lib.write_results(
      args.out, out, model=model, ds=ds, args=args,
      baseline_test_error=np.nan if baseline is None else baseline,
      start_time=start, module=MODULE, extra={"experiment": "weightless"})
  report = cx.size_report(results["file"])
  flat = dict(jax.tree_util.tree_leaves_with_path(
      out, is_leaf=cx.is_compressed))
  layers = {}
  for kp, node in flat.items():
    path = cx.path_str(kp)
    if path not in encoded:
      continue
    dense_before = dict(jax.tree_util.tree_leaves_with_path(params))[kp]
    wl_bytes, dc_bytes = _leaf_bytes(report, path), _leaf_bytes(dc_report, path)
    layers[path] = {**_layer_stats(node, dense_before),
                    "weightless_bytes": wl_bytes, "dc_bytes": dc_bytes,
                    "dc_over_weightless": dc_bytes / wl_bytes}
    if pipeline is not None:
      layers[path]["pipeline_bytes"] = _leaf_bytes(pipeline["report"], path)
      layers[path]["pipeline_over_weightless"] = \
          layers[path]["pipeline_bytes"] / wl_bytes
    if start_bytes is not None:
      layers[path]["from_bytes"] = start_bytes[path]
      layers[path]["from_over_weightless"] = start_bytes[path] / wl_bytes
  results.update({
      "layers": layers, "order": encoded,
      "deep_compression": {"file": dc_run["file"], "file_bytes": dc_run["file_bytes"],
                           "ratio": dc_run["ratio"], "test_error": dc_run["test_error"],
                           "pipeline_test_error": dc_error},
      "pipeline": None if pipeline is None else {
          k: pipeline[k] for k in ("file", "file_bytes", "ratio", "test_error")},
      "from": args.start, "recluster_bits": args.recluster_bits,
      "retrain_epochs": args.retrain_epochs, "retrain_lr": args.retrain_lr,
      "keep": args.keep, "bits": args.bits, "bias_bits": args.bias_bits or None,
      "epochs": {"baseline": args.epochs, "prune": args.prune_epochs,
                 "prune_iters": args.prune_iters, "share": args.share_epochs},
      "curves": curves,
      "paper": {"best_layer_ratio": 496, "over_deep_compression": 1.51}})
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(results, f, indent=2, default=train_lib._json_default)
  print(report)
  for path, s in layers.items():
    print(f"{path}: {s['kept']} kept, {s['clusters']} clusters, t={s['cell_bits']}, "
          f"m={s['cells']}: {s['weightless_bytes']} B (Deep Compression "
          f"{s['dc_bytes']} B, {s['dc_over_weightless']:.2f}x); false positives "
          f"{s['false_positive_rate']:.4f} (expected {s['expected_rate']:.4f})")
  print(f"Deep Compression file {dc_run['file_bytes']} B, test error "
        f"{dc_run['test_error']:.4f}; Weightless file {results['file_bytes']} B "
        f"({results['ratio']:.1f}x), test error {results['test_error']:.4f}")
  print(f"results: {os.path.join(args.out, 'results.json')}")
  return results


if __name__ == "__main__":
  main(sys.argv[1:])
