"""Writes the Colab notebooks of this folder (nbformat 4) from the cells below.

Edit the cells here, then run ``python colab/build_notebooks.py``; the
notebooks are plain JSON written with the ``json`` module (no nbformat
dependency). ``tests/test_notebooks.py`` runs each one top to bottom, the
install cell included (it installs nothing where compressax is importable).
"""

from __future__ import annotations

import json
import pathlib

HERE = pathlib.Path(__file__).resolve().parent
REPO = "https://github.com/compressax/compressax"
COLAB = "https://colab.research.google.com/github/" + REPO.split("github.com/")[1]


def badge(name: str) -> str:
  """The Open-in-Colab badge of ``colab/name`` on the main branch."""
  return (f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
          f"({COLAB}/blob/main/colab/{name})")


RUNTIME_MD = """\
**Runtime.** Everything here runs on a CPU. For a GPU or TPU in Colab, choose
*Runtime > Change runtime type* and pick a GPU (e.g. T4) or a TPU before running the
first cell; `jax.devices()` below shows what JAX found."""

INSTALL_MD = """\
The next cell installs compressax with its `experiments` extra (scikit-learn,
matplotlib) when something is missing: from the checkout (`pip install -e`) when this
notebook runs inside one, from the published package otherwise (Colab). When everything
is already importable it installs nothing. Colab already has JAX, Flax and Optax; if pip
upgrades one of them, restart the runtime once."""

INSTALL = """\
import importlib.util, pathlib, subprocess, sys

# The checkout this notebook runs in, if any: a parent folder with pyproject.toml and compressax/.
root = next((d for d in [pathlib.Path.cwd(), *pathlib.Path.cwd().parents]
             if (d / "pyproject.toml").is_file() and (d / "compressax" / "__init__.py").is_file()), None)
missing = [m for m in ("compressax", "jax", "flax", "optax", "sklearn", "matplotlib")
           if importlib.util.find_spec(m) is None]
if missing:
    cmd = [sys.executable, "-m", "pip", "install", "-q",
           *(["-e", f"{root}[experiments]"] if root else ["compressax[experiments]"])]
    print("missing", missing, "->", " ".join(cmd))
    subprocess.check_call(cmd)
    if root:  # an editable install is importable only after a restart; the checkout is now
        sys.path.insert(0, str(root))
    importlib.invalidate_caches()
else:
    print("compressax and its dependencies are installed" + (f" (checkout: {root})" if root else ""))"""

DATA = """\
from sklearn.datasets import load_digits

digits = load_digits()  # 1,797 8x8 images, bundled with scikit-learn (no download)
x_all = (digits.data / 16.0).astype(np.float32)
y_all = digits.target.astype(np.int32)
perm = np.random.default_rng(0).permutation(len(x_all))
n_test = len(x_all) // 5
x_test, y_test = x_all[perm[:n_test]], y_all[perm[:n_test]]
x_train, y_train = x_all[perm[n_test:]], y_all[perm[n_test:]]
print("train", x_train.shape, "test", x_test.shape)"""

MODEL = """\
class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(256)(x))
        x = nn.relu(nn.Dense(128)(x))
        return nn.Dense(10)(x)

model = MLP()
params = model.init(jax.random.key(0), x_train[:1])  # {'params': {'Dense_0': ...}}

def accuracy(params, x=x_test, y=y_test):
    return jnp.mean(jnp.argmax(model.apply(params, x), -1) == y)

def cross_entropy(params, x, y):
    logits = model.apply(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

train_x, train_y = jnp.asarray(x_train), jnp.asarray(y_train)

def batch(step, size=128):
    idx = jax.random.randint(jax.random.fold_in(jax.random.key(1), step), (size,), 0, len(x_train))
    return train_x[idx], train_y[idx]"""


def md(text: str) -> dict:
  return {"cell_type": "markdown", "metadata": {}, "source": _lines(text)}


def code(text: str) -> dict:
  return {"cell_type": "code", "execution_count": None, "metadata": {},
          "outputs": [], "source": _lines(text)}


def _lines(text: str) -> list[str]:
  lines = text.strip("\n").split("\n")
  return [line + "\n" for line in lines[:-1]] + lines[-1:]


def notebook(cells: list[dict]) -> dict:
  return {
      "nbformat": 4,
      "nbformat_minor": 5,
      "metadata": {
          "kernelspec": {"name": "python3", "display_name": "Python 3",
                         "language": "python"},
          "language_info": {"name": "python"},
          "colab": {"provenance": []},
      },
      "cells": [dict(c, id=f"cell-{i}") for i, c in enumerate(cells)],
  }


QUICKSTART = [
    md(badge("quickstart.ipynb")),
    md("""\
# compressax quickstart

Train a small Flax MLP on scikit-learn's digits, then compress it with
[compressax](REPO):

1. quantize it at every bit width from 1 to 8 in one `jax.vmap` over `bits`
   (`cx.quantize.uniform`),
2. prune it with `cx.prune.magnitude_mask`,
3. store 4-bit codes under a pruning mask in a real file with `cx.save`, reload it with
   `cx.load`, and see where the bytes go with `cx.size_report`,
4. train a conv net with a different method per layer from one `cx.Plan` (k-means
   sharing, low-rank + 8 bits, 2:4 + 4 bits, DiffQ) and write it to one file,
5. plot accuracy against bits.

compressax works on the parameter pytree itself: no module is rewritten.""".replace(
        "REPO", REPO)),
    md(RUNTIME_MD),
    md(INSTALL_MD),
    code(INSTALL),
    code("""\
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import flax.linen as nn
import matplotlib.pyplot as plt
import compressax as cx

print(jax.devices())"""),
    md("## Data and a float32 model"),
    code(DATA),
    code(MODEL),
    code("""\
tx = optax.adam(1e-3)
opt_state = tx.init(params)

@jax.jit
def train_step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(cross_entropy)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

for step in range(int(os.environ.get("COMPRESSAX_NOTEBOOK_STEPS", 300))):
    params, opt_state, loss = train_step(params, opt_state, *batch(step))
print(f"loss {float(loss):.3f}, float32 test accuracy {float(accuracy(params)):.3f}")"""),
    md("""\
## Quantization at every bit width, in one `vmap`

`cx.quantize.apply` maps a quantizer over the weight matrices (the default `where=`
rule skips biases). `bits` may be a traced array, so `jax.vmap` evaluates all bit widths
at once. Each bucket of 256 weights gets its own min/max range, as in Polino et al.
(2018)."""),
    code("""\
def accuracy_at_bits(params, bits):
    quantizer = functools.partial(cx.quantize.uniform, bits=bits, bucket_size=256)
    return accuracy(cx.quantize.apply(params, quantizer))

bit_widths = jnp.arange(1, 9)
acc_bits = jax.jit(jax.vmap(accuracy_at_bits, in_axes=(None, 0)))(params, bit_widths)
for b, a in zip(bit_widths.tolist(), acc_bits.tolist()):
    print(f"{b} bits: test accuracy {a:.3f}")"""),
    md("""\
## Magnitude pruning

`cx.prune.magnitude_mask` keeps exactly `n - floor(s * n)` weights of each kernel (or,
with `scope="global"`, of all kernels together). The sparsity may be traced too."""),
    code("""\
def accuracy_at_sparsity(params, s):
    mask = cx.prune.magnitude_mask(params, s, scope="global")
    return accuracy(cx.prune.apply_mask(params, mask))

sparsities = jnp.array([0.0, 0.5, 0.7, 0.8, 0.9, 0.95])
acc_sparse = jax.jit(jax.vmap(accuracy_at_sparsity, in_axes=(None, 0)))(params, sparsities)
for s, a in zip(sparsities.tolist(), acc_sparse.tolist()):
    print(f"sparsity {s:.2f}: test accuracy {a:.3f}")"""),
    md("""\
## A real compressed file

`cx.quantize.quantize` gives `QuantizedArray` nodes (integer codes plus per-bucket scale
and offset); `cx.prune.apply_mask` wraps them in `MaskedArray` nodes. `cx.save` stores
the kept codes bit-packed or entropy coded and the mask as relative indices, and
`cx.size_report` reads the sizes back from the file. The pruned model is not retrained
here; see `compression_aware_training.ipynb` for that."""),
    code("""\
quantized = cx.quantize.apply(params, functools.partial(cx.quantize.quantize, bits=4, bucket_size=256))
mask = cx.prune.magnitude_mask(params, 0.7)
compressed = cx.prune.apply_mask(quantized, mask)

nbytes = cx.save("digits_mlp.cx", compressed)
print(f"wrote digits_mlp.cx: {nbytes} bytes ({os.path.getsize('digits_mlp.cx')} on disk)")

restored = cx.load("digits_mlp.cx")  # plain NumPy arrays, bit-identical to cx.materialize
print("4 bits + 70% pruned, reloaded: test accuracy", f"{float(accuracy(restored)):.3f}")
print("same in memory:               test accuracy", f"{float(accuracy(cx.materialize(compressed))):.3f}")
print()
print(cx.size_report("digits_mlp.cx"))"""),
    md("""\
## One plan, several methods

A `cx.Plan` picks a compression method per leaf by rules (a regex on the `/` path,
first match wins) and runs the same lifecycle for all of them: the training view, the
penalties, one optimizer, and `finalize` to stored nodes (see `docs/design.md`). Here a
small conv net on the same digits gets k-means weight sharing on the conv kernel,
8-bit low-rank factors on the first Dense, 2:4 sparsity plus 4-bit codes on the
second, and DiffQ's learned bits on the head; it trains with one optax optimizer and
is written to one file."""),
    code("""\
class ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x.reshape(-1, 8, 8, 1))).reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(128)(x))
        x = nn.relu(nn.Dense(64)(x))
        return nn.Dense(10, name="head")(x)

net = ConvNet()
net_params = net.init(jax.random.key(0), x_train[:1])
M = cx.methods
plan = cx.Plan([
    (r"Conv_0/kernel", M.KMeans(bits=4)),
    (r"Dense_0/kernel", M.LowRank(rank=16) >> M.Uniform(8)),
    (r"Dense_1/kernel", M.NM(2, 4) >> M.Uniform(4, symmetric=True)),
    (r"head/kernel", M.DiffQ(size_penalty=1e-2, group_size=16)),
])
print(plan)

def net_loss(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(net.apply(p, x), y).mean()

train = plan.init(net_params, jax.random.key(1))   # {"params": ..., "aux": ...}
loss_fn = plan.loss(net_loss)                      # the task on the training view + penalties
tx = plan.optimizer(optax.adam(3e-3))              # pruning/sharing wrappers + the logits' Adam
opt_state = tx.init(train)

@jax.jit
def plan_step(train, opt_state, key, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(train, key, x, y)
    updates, opt_state = tx.update(grads, opt_state, train)
    return optax.apply_updates(train, updates), opt_state, loss

for step in range(int(os.environ.get("COMPRESSAX_NOTEBOOK_STEPS", 600))):
    train, opt_state, loss = plan_step(train, opt_state, jax.random.key(step), *batch(step))

final = plan.finalize(train)                       # every method's stored node
nbytes = cx.save("digits_convnet.cx", final)
restored = cx.load("digits_convnet.cx")
net_acc = lambda p: float(jnp.mean(jnp.argmax(net.apply(p, x_test), -1) == y_test))
print(f"wrote digits_convnet.cx: {nbytes} bytes; test accuracy from the file {net_acc(restored):.3f}")
print(cx.size_report("digits_convnet.cx"))"""),
    md("## Accuracy against bits and sparsity"),
    code("""\
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
ax1.plot(bit_widths, acc_bits, "o-", label="uniform, buckets of 256")
ax1.axhline(float(accuracy(params)), color="gray", ls="--", label="float32")
ax1.set_xlabel("bits per weight"); ax1.set_ylabel("test accuracy"); ax1.legend()
ax2.plot(sparsities, acc_sparse, "o-", label="global magnitude, no retraining")
ax2.set_xlabel("sparsity"); ax2.set_ylabel("test accuracy"); ax2.legend()
fig.tight_layout()
plt.show()"""),
]

TRAINING = [
    md(badge("compression_aware_training.ipynb")),
    md(f"""\
# Compression-aware training with Optax

`cx.optim` transforms wrap any Optax optimizer and keep the params compressed by
themselves. This notebook trains a small Flax MLP on scikit-learn's digits with

* **gradual magnitude pruning** (`cx.optim.prune_magnitude`, Zhu and Gupta's cubic
  schedule) around an `optax.chain` (gradient clipping, then Adam), and
* **quantization-aware training**: the forward pass sees 4-bit weights
  (`cx.optim.quantized_params`, straight-through gradient), the optimizer updates
  full-precision shadow weights (Polino et al.),

then writes the 4-bit, pruned model with `cx.save` and checks that the file computes
what the model was trained to compute. Library: [compressax]({REPO})."""),
    md(RUNTIME_MD),
    md(INSTALL_MD),
    code(INSTALL),
    code("""\
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import flax.linen as nn
import matplotlib.pyplot as plt
import compressax as cx

print(jax.devices())"""),
    md("## Data and model"),
    code(DATA),
    code(MODEL),
    md("""\
## The optimizer

`prune_magnitude` recomputes the mask every `frequency` steps between `begin_step` and
`end_step` (steps 50 to 250 of 400, every 25) and holds it afterwards; pruned weights are exactly zero after every
`optax.apply_updates`. The quantizer is symmetric (`symmetric=True`), so zero is one of
its levels and a pruned weight stays zero after quantization."""),
    code("""\
BITS, BUCKET, FINAL_SPARSITY = 4, 256, 0.9
STEPS = int(os.environ.get("COMPRESSAX_NOTEBOOK_STEPS", 400))
SCHEDULE = dict(final_sparsity=FINAL_SPARSITY, begin_step=STEPS // 8,
                end_step=STEPS * 5 // 8, frequency=STEPS // 16)  # 50, 250, 25 for 400 steps

inner = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
tx = cx.optim.prune_magnitude(inner, **SCHEDULE)
state = tx.init(params)

def seen_by_model(params):  # the 4-bit weights of the forward pass
    return cx.optim.quantized_params(params, BITS, bucket_size=BUCKET, symmetric=True)

def qat_loss(params, x, y):
    return cross_entropy(seen_by_model(params), x, y)

@jax.jit
def train_step(params, state, x, y):
    loss, grads = jax.value_and_grad(qat_loss)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

history = []
for step in range(STEPS):
    params, state, loss = train_step(params, state, *batch(step))
    if (step + 1) % SCHEDULE["frequency"] == 0:  # after step + 1 updates
        sparsity = cx.prune.sparsity_stats(state.masks)["global"]["sparsity"]
        acc = float(accuracy(seen_by_model(params)))
        history.append((step + 1, sparsity, acc))
        print(f"step {step + 1:4d}  loss {float(loss):.3f}  sparsity {sparsity:.3f}  4-bit test accuracy {acc:.3f}")"""),
    code("""\
# The update at step count t applies the schedule's sparsity at t, so after t + 1 updates
# (the x axis, as in `history`) the mask has polynomial_schedule(t).
steps, sparsity, acc = zip(*history)
schedule = [float(cx.prune.polynomial_schedule(t, **SCHEDULE)) for t in range(STEPS)]
fig, ax = plt.subplots(figsize=(7, 3.5))
ax.plot(range(1, STEPS + 1), schedule, color="gray", label="polynomial schedule")
ax.plot(steps, sparsity, "o", label="mask sparsity")
ax.plot(steps, acc, "s-", label="4-bit test accuracy")
ax.set_xlabel("optimizer steps taken"); ax.set_ylabel("fraction (sparsity, accuracy)")
ax.set_ylim(0, 1.02); ax.legend()
fig.tight_layout()
plt.show()"""),
    md("""\
## The compressed artifact

`cx.optim.finalize` quantizes the shadow weights into `QuantizedArray` nodes that
materialize to exactly what the forward pass saw; the mask from the optimizer state
turns them into `MaskedArray` nodes, stored as kept codes plus a sparse index."""),
    code("""\
nodes = cx.optim.finalize(params, BITS, bucket_size=BUCKET, symmetric=True)
compressed = cx.prune.apply_mask(nodes, state.masks)
for a, b in zip(jax.tree.leaves(cx.materialize(compressed)), jax.tree.leaves(seen_by_model(params))):
    assert np.array_equal(np.asarray(a), np.asarray(b))  # the file holds what was trained

nbytes = cx.save("digits_mlp_qat_pruned.cx", compressed)
restored = cx.load("digits_mlp_qat_pruned.cx")
print(f"file: {nbytes} bytes; reloaded test accuracy {float(accuracy(restored)):.3f}")
print(cx.size_report("digits_mlp_qat_pruned.cx"))"""),
]


def main() -> None:
  for name, cells in [("quickstart.ipynb", QUICKSTART),
                      ("compression_aware_training.ipynb", TRAINING)]:
    path = HERE / name
    path.write_text(json.dumps(notebook(cells), indent=1, ensure_ascii=False) + "\n")
    print("wrote", path)


if __name__ == "__main__":
  main()
