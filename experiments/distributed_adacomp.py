"""Data-parallel LeNet-300-100 with AdaComp gradient compression.

Every device of a 1-D ``("data",)`` mesh takes its slice of the batch,
computes its local gradient, compresses it with AdaComp against its *own*
residual, and only the sent values cross devices (``lax.pmean`` inside
``cx.optim.adacomp(axis_name="data")``). The optimizer then runs replicated
on the averaged compressed gradient. The dense baseline is the same step with
``lax.pmean`` of the raw gradients.

On a CPU host, fake 8 devices first::

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
    python -m experiments.distributed_adacomp --dataset npz:../shared/data/mnist.npz

(run as ``python -m``, it sets that flag itself when it is missing).
``--dataset`` takes the other experiments' specs: ``digits``, ``npz:PATH`` or
``tfds:NAME`` (images are flattened).

See docs/distributed.md for running the same code on a TPU pod slice.

References:
  Chen et al., *AdaComp*, AAAI 2018. https://arxiv.org/abs/1712.02679
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any, Callable

if __name__ == "__main__" and "--xla_force_host_platform_device_count" not in \
    os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import compressax as cx  # noqa: E402
from experiments import data as data_lib  # noqa: E402
from experiments import train as train_lib  # noqa: E402

AXIS = "data"
MODULE = "experiments.distributed_adacomp"
DEFAULT_DATASET = "npz:../shared/data/mnist.npz"


def init_mlp(key, sizes=(784, 300, 100, 10)) -> dict:
  """LeNet-300-100 (or any MLP) as ``{"Dense_i": {"kernel", "bias"}}``."""
  params = {}
  for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
    key, sub = jax.random.split(key)
    params[f"Dense_{i}"] = {
        "kernel": jax.random.normal(sub, (fan_in, fan_out)) * np.sqrt(
            2.0 / fan_in).astype(np.float32),
        "bias": jnp.zeros((fan_out,))}
  return params


def apply_mlp(params: dict, x) -> jax.Array:
  n = len(params)
  for i in range(n):
    layer = params[f"Dense_{i}"]
    x = x @ layer["kernel"] + layer["bias"][None]
    if i < n - 1:
      x = jax.nn.relu(x)
  return x


def loss_fn(params, x, y) -> jax.Array:
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      apply_mlp(params, x), y))


def load(dataset: str, loader=data_lib.load_dataset):
  """``((x_train, y_train), (x_test, y_test))`` of a ``--dataset`` spec.

  The specs of :func:`experiments.data.load_dataset` (``digits``,
  ``npz:PATH``, ``tfds:NAME``), images flattened to float32 vectors in
  [0, 1]. A bare path ending in ``.npz`` is read as ``npz:PATH``.
  ``loader`` loads the spec (:func:`experiments.data.load_or_exit` on the
  command line).
  """
  if dataset.endswith(".npz") and not dataset.startswith("npz:"):
    dataset = "npz:" + dataset
  ds = loader(dataset)
  flat = lambda x: x.reshape(len(x), -1)  # noqa: E731
  return (flat(ds.x_train), ds.y_train), (flat(ds.x_test), ds.y_test)


def make_step(mesh: Mesh, opt: optax.GradientTransformation,
              compressor: optax.GradientTransformation | None,
              loss: Callable[..., Any] = loss_fn):
  """A jitted data-parallel step.

  ``step(params, comp_state, opt_state, x, y) -> (params, comp_state,
  opt_state, loss, stats)``: ``params`` and ``opt_state`` are replicated,
  ``comp_state`` is stacked along a leading device axis (each device's own
  residual), ``x, y`` are split along the batch; ``stats`` is
  ``(n_devices, 3)``: each device's sent elements, sent bits and dense bits
  of this step over the compressed leaves (zeros for the dense baseline).

  Args:
    mesh: a mesh with a ``"data"`` axis.
    opt: the optimizer, replicated.
    compressor: ``cx.optim.adacomp(axis_name="data")``, or ``None`` for the
      dense baseline (``pmean`` of the gradients).
    loss: ``loss(params, x, y) -> scalar``.
  """

  def local(params, comp_state, opt_state, x, y):
    # Differentiate a device-varying copy: the gradient of the replicated
    # (invariant) params would already be all-reduced by shard_map's
    # transpose, and the point is to compress *before* any reduction.
    mine = jax.lax.pcast(params, AXIS, to="varying")
    value, grads = jax.value_and_grad(loss)(mine, x, y)
    stats = jnp.zeros((1, 3), jnp.float32)
    if compressor is None:
      sent = jax.lax.pmean(grads, AXIS)
    else:
      mine = jax.tree.map(lambda a: a[0], comp_state)
      sent, mine = compressor.update(grads, mine)
      comp_state = jax.tree.map(lambda a: a[None], mine)
      stats = _compressed_totals(mine)[None]
    updates, opt_state = opt.update(sent, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, comp_state, opt_state, jax.lax.pmean(value, AXIS), stats

  fn = jax.shard_map(local, mesh=mesh,
                     in_specs=(P(), P(AXIS), P(), P(AXIS), P(AXIS)),
                     out_specs=(P(), P(AXIS), P(), P(), P(AXIS)))
  return jax.jit(fn, donate_argnums=(0, 1, 2))


def _compressed_totals(state: cx.optim.AdaCompState) -> jax.Array:
  """This device's ``[sent elements, sent bits, dense bits]`` this step.

  Over the compressed leaves; per device (no extra collective in the step),
  one array (every step output is a buffer per device); sum on the host.
  """
  chosen = np.array([not cx.is_skip(r) for r in
                     jax.tree.leaves(state.residual, is_leaf=cx.is_skip)])
  return jnp.stack([jnp.sum(state.sent.astype(jnp.float32)[chosen]),
                    jnp.sum(state.bits[0][chosen]),
                    jnp.sum(state.bits[1][chosen])])


def init_states(mesh: Mesh, params, opt, compressor):
  """Replicated params and optimizer state; per-device compressor state."""
  n = mesh.shape[AXIS]
  rep = NamedSharding(mesh, P())
  comp = compressor.init(params) if compressor is not None else {}
  comp = jax.tree.map(lambda a: jnp.stack([a] * n), comp)
  return (jax.device_put(params, rep),
          jax.device_put(comp, NamedSharding(mesh, P(AXIS))),
          jax.device_put(opt.init(params), rep))


def accuracy(params, x, y) -> float:
  pred = jnp.argmax(jax.jit(apply_mlp)(params, x), -1)
  return float(jnp.mean(pred == y))


def train(dataset: str | tuple = "digits", *, steps: int = 200, batch: int = 128,
          lr: float = 0.1, compress: bool = True, bin_size_fc: int = 500,
          seed: int = 0, devices: int | None = None, log_every: int = 0
          ) -> dict:
  """Train data-parallel on ``devices`` devices; returns figures.

  ``dataset`` is a ``--dataset`` spec or what :func:`load` returned.

  Returns:
    ``{"accuracy", "loss", "fc_ratio", "sent_fraction", "seconds"}``;
    ``fc_ratio`` is dense bits over sent bits summed over all steps, devices
    and compressed leaves (the kernels; AdaComp's accounting, see
    ``cx.optim.adacomp``); ``sent_fraction`` is the fraction of their
    elements sent.
  """
  (xtr, ytr), (xte, yte) = load(dataset) if isinstance(dataset, str) else dataset
  n = devices or len(jax.devices())
  mesh = Mesh(np.array(jax.devices()[:n]), (AXIS,))
  sizes = (xtr.shape[1], 300, 100, 10) if xtr.shape[1] > 64 else (64, 32, 10)
  params = init_mlp(jax.random.key(seed), sizes)
  opt = optax.sgd(lr, momentum=0.9)
  comp = cx.optim.adacomp(bin_size_fc=bin_size_fc, axis_name=AXIS) \
      if compress else None
  step = make_step(mesh, opt, comp)
  params, cstate, ostate = init_states(mesh, params, opt, comp)
  rng = np.random.default_rng(seed)
  bits = dense = sent = total = 0.0
  t0 = time.perf_counter()
  for i in range(steps):
    b = rng.integers(0, len(xtr), batch)
    params, cstate, ostate, loss, stats = step(params, cstate, ostate,
                                               xtr[b], ytr[b])
    # One step in flight at a time: with many queued collective programs,
    # XLA's in-process CPU all-reduce can starve on an oversubscribed host.
    jax.block_until_ready(loss)
    if compress:
      k, b, d = (float(v) for v in np.sum(np.asarray(stats), axis=0))
      bits += b
      dense += d
      sent += k
      total += d / 32
    if log_every and i % log_every == 0:
      print(f"step {i:5d}  loss {float(loss):.4f}")
  seconds = time.perf_counter() - t0
  return {"accuracy": accuracy(params, xte, yte), "loss": float(loss),
          "fc_ratio": dense / bits if bits else float("nan"),
          "sent_fraction": sent / total if total else float("nan"),
          "seconds": seconds, "params": params, "comp_state": cstate}


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(prog=f"python -m {MODULE}",
                               description=__doc__.split("\n\n")[0],
                               formatter_class=train_lib.HelpFormatter)
  ap.add_argument("--dataset", default=DEFAULT_DATASET,
                  help="'digits' (bundled with scikit-learn), 'npz:PATH' "
                       "(Keras layout) or 'tfds:NAME' (TensorFlow Datasets)")
  ap.add_argument("--steps", type=int, default=1000,
                  help="training steps of each run (dense, then AdaComp)")
  ap.add_argument("--batch", type=int, default=128,
                  help="global batch, split evenly over the devices")
  ap.add_argument("--lr", type=float, default=0.1,
                  help="SGD learning rate (momentum 0.9)")
  ap.add_argument("--bin-size-fc", type=int, default=500,
                  help="AdaComp's bin size L_T of the dense layers")
  ap.add_argument("--seed", type=int, default=0,
                  help="seed of the initialization and the batches")
  return ap.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  data = load(args.dataset, data_lib.load_or_exit)  # one line if it cannot be had
  print(f"{len(jax.devices())} devices: {jax.devices()[0].platform}")
  for compress in (False, True):
    r = train(data, steps=args.steps, batch=args.batch, lr=args.lr,
              compress=compress, bin_size_fc=args.bin_size_fc, seed=args.seed,
              log_every=max(1, args.steps // 5))
    name = "adacomp" if compress else "dense"
    print(f"{name:8s} accuracy {r['accuracy']:.4f}  FC compression "
          f"{r['fc_ratio']:.1f}x  ({r['seconds']:.1f} s)")


if __name__ == "__main__":
  main()
