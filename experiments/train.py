"""Shared training, evaluation, CLI flags and the results contract.

Every experiment:

1. parses the common flags (:func:`add_common_args`) and builds the model and
   data (:func:`setup`);
2. trains with :func:`fit`, a jitted step over any Optax transform chain
   (compressax's pruning and weight-sharing transforms included);
3. writes its compressed parameters with ``compressax.io.save`` and a
   ``results.json`` via :func:`write_results`. The reported ``test_error`` is
   measured on the weights *as decoded* by ``compressax.io.load`` from the
   written file, never on the in-memory weights, so the number and the file
   agree by construction.

``results.json`` holds at least: ``model``, ``dataset``, ``test_error`` and
``baseline_test_error`` (fractions on the full test split), ``file_bytes``
(``os.path.getsize`` of ``model.cx``), ``dense_fp32_bytes`` (4 x parameter
count), ``ratio`` (= dense_fp32_bytes / file_bytes), ``seed``, ``command``
and ``wall_time_s``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import compressax as cx
from experiments import data as data_lib
from experiments import models as models_lib

__all__ = ["add_common_args", "experiment_parser", "HelpFormatter", "train_baseline", "setup", "cross_entropy", "make_train_step",
           "fit", "evaluate", "sgd", "steps_per_epoch", "write_results", "command_line", "progress", "prng_key",
           "plot_curves"]

PyTree = Any
LossFn = Callable[[PyTree, jax.Array, jax.Array, jax.Array], jax.Array]


def add_common_args(parser: argparse.ArgumentParser, *, model: str = "lenet300",
                    dataset: str = "digits", epochs: int = 10,
                    batch_size: int = 64, lr: float = 1e-3) -> None:
  """The flags every experiment takes; defaults are the experiment's."""
  parser.add_argument("--model", default=model, choices=sorted(models_lib.MODELS),
                      help="the network to train and compress")
  parser.add_argument("--dataset", default=dataset,
                      help="'digits' (bundled with scikit-learn), 'npz:PATH' "
                           "(Keras layout, e.g. npz:../shared/data/mnist.npz) "
                           "or 'tfds:NAME' (TensorFlow Datasets)")
  parser.add_argument("--seed", type=int, default=0,
                      help="seed of the initialization, shuffles and dropout")
  parser.add_argument("--out", default=None,
                      help="output directory (default runs/EXPERIMENT/MODEL-DATASET-seedSEED)")
  parser.add_argument("--epochs", type=int, default=epochs,
                      help="epochs of baseline training")
  parser.add_argument("--batch-size", type=int, default=batch_size,
                      help="training examples per step")
  parser.add_argument("--lr", type=float, default=lr, help="baseline learning rate")
  parser.add_argument("--eval-batch-size", type=int, default=1000,
                      help="test examples per evaluation call")
  parser.add_argument("--quiet", action="store_true",
                      help="no progress bars or per-stage logs")


class HelpFormatter(argparse.RawDescriptionHelpFormatter,
                    argparse.ArgumentDefaultsHelpFormatter):
  """The description as written, and each flag's default after its help.

  A default of None means "derived from other flags", which the flag's help
  says in words, and a switch is off by default, so neither is printed.
  """

  def _get_help_string(self, action):
    if action.default is None or action.nargs == 0:  # store_true: 'off'
      return action.help
    return super()._get_help_string(action)


def experiment_parser(module: str, doc: str, **defaults) -> argparse.ArgumentParser:
  """``python -m module``'s parser: the module doc's first paragraph, common flags.

  ``defaults`` are the experiment's defaults of :func:`add_common_args`.
  """
  parser = argparse.ArgumentParser(
      prog=f"python -m {module}", description=doc.split("\n\n")[0],
      formatter_class=HelpFormatter)
  add_common_args(parser, **defaults)
  return parser


def train_baseline(model, params: PyTree, ds: data_lib.Dataset,
                   args: argparse.Namespace, desc: str = "baseline"
                   ) -> tuple[PyTree, float]:
  """``--epochs`` of cosine-decayed SGD at ``--lr``; returns params and test error."""
  steps = steps_per_epoch(ds, args.batch_size)
  params, _, _ = fit(
      model, params, sgd(args.lr, decay_steps=args.epochs * steps),
      ds, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
      quiet=args.quiet, desc=desc, eval_every_epoch=False)
  return params, evaluate(model, params, ds.x_test, ds.y_test,
                          args.eval_batch_size)


def default_out(experiment: str, args: argparse.Namespace) -> str:
  tag = os.path.splitext(os.path.basename(args.dataset.split(":", 1)[-1]))[0]
  return os.path.join("runs", experiment, f"{args.model}-{tag}-seed{args.seed}")


def prng_key(seed: int) -> jax.Array:
  """The experiments' PRNG key: the ``rbg`` implementation.

  Deterministic for a seed on a given backend, like the default threefry, but
  its programs compile several times faster on CPU, which dominates the
  short runs (init of a 1200x1200 layer: about 2 s instead of 5 s).
  """
  return jax.random.key(seed, impl="rbg")


def setup(args: argparse.Namespace):
  """Model, data (brought to the model's input shape) and initial variables."""
  ds = data_lib.load_or_exit(args.dataset)  # one line if it cannot be had
  ds = data_lib.fit_to_shape(ds, models_lib.input_shape(args.model))
  model = models_lib.get_model(args.model, ds.num_classes)
  variables = models_lib.init(model, ds.image_shape, prng_key(args.seed))
  return model, ds, variables


def sgd(lr: float, *, momentum: float = 0.9, weight_decay: float = 0.0,
        decay_steps: int | None = None) -> optax.GradientTransformation:
  """Caffe-style SGD: L2 weight decay, Nesterov momentum, cosine-decayed rate.

  The cosine schedule is written with explicit float32 casts, so it also runs
  under ``jax_numpy_dtype_promotion="strict"`` (optax's own schedules mix the
  int32 step count with Python floats there).

  Args:
    lr: the initial learning rate.
    momentum: Nesterov momentum.
    weight_decay: L2 coefficient added to the gradient (0: none).
    decay_steps: steps over which the rate decays to 0 (None: constant).
  """
  if decay_steps is None:
    schedule = lr
  else:
    total = float(max(decay_steps, 1))

    def schedule(count):
      t = jnp.minimum(count.astype(jnp.float32) / total, 1.0)
      return lr * 0.5 * (1.0 + jnp.cos(jnp.pi * t))
  tx = optax.sgd(schedule, momentum=momentum, nesterov=True)
  if weight_decay:
    tx = optax.chain(optax.add_decayed_weights(weight_decay), tx)
  return tx


def steps_per_epoch(ds: data_lib.Dataset, batch_size: int) -> int:
  """Optimizer steps in one epoch (the last incomplete batch is dropped)."""
  return len(ds.x_train) // min(batch_size, len(ds.x_train))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy against integer labels."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _logits(model, params, x, *, train=False, key=None):
  # Compressed leaves (masks, codebooks) are materialized for the forward
  # pass; dense trees pass through unchanged.
  rngs = {"dropout": key} if train and key is not None else None
  return model.apply(cx.materialize(params), x, train=train, rngs=rngs)


def make_train_step(model, tx: optax.GradientTransformation,
                    loss_fn: LossFn | None = None):
  """A jitted ``step(params, opt_state, x, y, key) -> (params, opt_state, loss)``.

  Args:
    model: a Flax linen module.
    tx: any Optax transformation (chains of compressax transforms included);
      it is given ``params`` so that masking/weight-sharing transforms can
      read them.
    loss_fn: ``loss_fn(params, x, y, key) -> scalar``; default: cross-entropy
      of ``model`` in training mode.
  """
  if loss_fn is None:
    def loss_fn(params, x, y, key):
      return cross_entropy(_logits(model, params, x, train=True, key=key), y)

  @jax.jit
  def step(params, opt_state, x, y, key):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def progress(total: int, desc: str, quiet: bool):
  """A tqdm bar on stderr, disabled with ``quiet`` or when not a TTY."""
  from tqdm.auto import tqdm
  return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True,
              disable=quiet or not sys.stderr.isatty())


def fit(model, params: PyTree, tx: optax.GradientTransformation,
        ds: data_lib.Dataset, *, epochs: int, batch_size: int, seed: int,
        quiet: bool = False, desc: str = "train", loss_fn: LossFn | None = None,
        opt_state=None, eval_every_epoch: bool = True,
        eval_batch_size: int = 1000) -> tuple[PyTree, Any, dict]:
  """Train ``params`` with ``tx`` for ``epochs`` epochs over ``ds``.

  Shuffles are seeded by ``(seed, epoch)``; dropout keys come from ``seed``.

  Returns:
    ``(params, opt_state, history)`` with ``history`` holding per-epoch
    ``loss`` (mean train loss) and ``test_error`` (if ``eval_every_epoch``).
  """
  step = make_train_step(model, tx, loss_fn)
  if opt_state is None:
    opt_state = tx.init(params)
  steps = steps_per_epoch(ds, batch_size)
  key = jax.random.fold_in(prng_key(seed), 0x5EED)
  history = {"loss": [], "test_error": []}
  with progress(epochs * steps, desc, quiet) as bar:
    for epoch in range(epochs):
      losses = []
      for i, (x, y) in enumerate(data_lib.batches(
          ds.x_train, ds.y_train, batch_size, seed=seed * 1000 + epoch)):
        k = jax.random.fold_in(key, epoch * steps + i)
        params, opt_state, loss = step(params, opt_state, x, y, k)
        losses.append(loss)
        bar.update(1)
      history["loss"].append(float(jnp.mean(jnp.stack(losses))))
      if eval_every_epoch:
        err = evaluate(model, params, ds.x_test, ds.y_test, eval_batch_size)
        history["test_error"].append(err)
        bar.set_postfix(loss=history["loss"][-1], err=err)
  return params, opt_state, history


_PREDICT_CACHE: dict = {}


def evaluate(model, params: PyTree, x: np.ndarray, y: np.ndarray,
             batch_size: int = 1000) -> float:
  """Error fraction of ``model`` on all of ``(x, y)``, in fixed-size batches.

  The last batch is zero-padded to ``batch_size`` (and the padding ignored)
  so the prediction function compiles once.
  """
  predict = _PREDICT_CACHE.get(model)
  if predict is None:
    predict = jax.jit(lambda p, xb: jnp.argmax(_logits(model, p, xb), axis=-1))
    _PREDICT_CACHE[model] = predict
  n = len(x)
  batch_size = min(batch_size, n)
  wrong = 0
  for i in range(0, n, batch_size):
    xb = x[i:i + batch_size]
    m = len(xb)
    if m < batch_size:
      xb = np.concatenate([xb, np.zeros((batch_size - m, *xb.shape[1:]), xb.dtype)])
    pred = np.asarray(predict(params, jnp.asarray(xb)))[:m]
    wrong += int(np.sum(pred != y[i:i + m]))
  return wrong / n


def command_line(module: str, argv: list[str] | None = None) -> str:
  """The command that ran this experiment, as a shell line."""
  argv = sys.argv[1:] if argv is None else argv
  return shlex.join(["python", "-m", module, *argv])


def saved_run(path: str, tree: PyTree, model, ds: data_lib.Dataset,
              args: argparse.Namespace) -> dict:
  """Save ``tree`` to ``path``, reload it, and measure what the file holds.

  Returns:
    ``file``, ``file_bytes`` (``os.path.getsize``), ``dense_fp32_bytes``,
    ``ratio`` and ``test_error`` of the weights decoded by ``cx.io.load``.
  """
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  cx.io.save(path, tree)
  loaded = cx.io.load(path)
  file_bytes = os.path.getsize(path)
  dense = 4 * models_lib.param_count(loaded)
  return {"file": path, "file_bytes": file_bytes, "dense_fp32_bytes": dense,
          "ratio": dense / file_bytes,
          "test_error": evaluate(model, loaded, ds.x_test, ds.y_test,
                                 args.eval_batch_size)}


def write_results(out_dir: str, tree: PyTree, *, model, ds: data_lib.Dataset,
                  args: argparse.Namespace, baseline_test_error: float,
                  start_time: float, module: str,
                  extra: dict | None = None) -> dict:
  """Save ``tree`` to ``out_dir/model.cx``, re-evaluate it from disk, write JSON.

  Args:
    out_dir: the run's output directory (created).
    tree: the parameters to save (may hold compressed leaves).
    model: the Flax module the parameters belong to.
    ds: the data set (the full test split is evaluated).
    args: the parsed flags (``model``, ``dataset``, ``seed``, ...).
    baseline_test_error: test error of the uncompressed model of this run.
    start_time: ``time.time()`` at the start of the run.
    module: the experiment's module name, for the ``command`` field.
    extra: more JSON-able fields to record.

  Returns:
    The results dict (also written to ``out_dir/results.json``).
  """
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, "model.cx")
  run = saved_run(path, tree, model, ds, args)
  report = cx.io.size_report(path)
  results = {
      "model": args.model,
      "dataset": args.dataset,
      "test_error": run["test_error"],
      "baseline_test_error": float(baseline_test_error),
      "file": path,
      "file_bytes": run["file_bytes"],
      "dense_fp32_bytes": run["dense_fp32_bytes"],
      "ratio": run["ratio"],
      "seed": args.seed,
      "command": command_line(module, getattr(args, "argv", None)),
      "wall_time_s": time.time() - start_time,
      "jax_backend": jax.default_backend(),
      "size_report": {
          "overhead_bytes": report.overhead_bytes,
          "leaves": [dataclasses.asdict(leaf) for leaf in report.leaves]},
  }
  results.update(extra or {})
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(results, f, indent=2, default=_json_default)
  return results


def _json_default(o):
  if isinstance(o, (np.generic, jax.Array)):
    return np.asarray(o).tolist()
  raise TypeError(f"not JSON-able: {type(o).__name__}")


def plot_curves(path: str, curves: dict[str, list[float]], *, xlabel: str = "epoch",
                ylabel: str = "test error", title: str = "") -> None:
  """Write a PNG line plot of named curves (matplotlib, Agg backend)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  start = 0
  for name, ys in curves.items():
    ax.plot(range(start + 1, start + len(ys) + 1), ys, marker=".", label=name)
    start += len(ys)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
