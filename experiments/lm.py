"""A small transformer language model on tiny-shakespeare (issue 14).

The model the transformer experiments compress (``experiments.diffq_lm``):

* **Data**: ``../shared/data/tinyshakespeare.txt``, split 90/10 by
  character (the first 90% trains), lower-cased and split into words
  (letters with inner apostrophes), newlines and single punctuation marks.
  The vocabulary is the ``--vocab`` - 1 most frequent tokens of the training
  split plus ``<unk>`` (id 0); at 10,000 it covers 99.4% of the training
  tokens. ``--level char`` is the character-level variant (every character
  of the training split, no ``<unk>``).
* **Model** (:class:`WordLM`): a GPT-style decoder in Flax linen: token and
  learned position embeddings, pre-LayerNorm blocks of causal multi-head
  attention (``query``/``key``/``value``/``out`` ``nn.Dense`` kernels) and a
  GELU MLP (``fc1``/``fc2``), a final LayerNorm and the output layer tied to
  the token embedding (``embed.attend``). At the defaults (vocabulary 10,000,
  4 blocks, width 256, MLP 512) the embedding table is 2.56M of the model's
  4.7M parameters.
* **Training** (:func:`train`): AdamW with linear warm-up and cosine decay,
  random windows of ``--context`` tokens, dropout. The trained float
  parameters are cached (``cx.save``, no pickle) under
  ``~/.cache/compressax/lm`` keyed by the data file's SHA-256, the
  configuration and the training flags, so the experiments that compress the
  model train it once.

``python -m experiments.lm`` trains (or loads) the model and writes
``results.json`` (validation loss in nats per token and perplexity) and a
plot of the loss curves.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import time
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import compressax as cx
from experiments import train as train_lib
from experiments.llm.models import CACHE

MODULE = "experiments.lm"
DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    "..", "shared", "data", "tinyshakespeare.txt")
UNK = "<unk>"
_WORDS = re.compile(r"[a-z]+(?:'[a-z]+)*|\n|[^\sa-z]")

PyTree = Any


# ------------------------------------------------------------------ data

def words(text: str) -> list[str]:
  """Lower-cased words (inner apostrophes kept), newlines and punctuation marks."""
  return _WORDS.findall(text.lower())


class Corpus(NamedTuple):
  """Token ids of the two splits and the vocabulary (id ``i`` is ``vocab[i]``)."""
  train: np.ndarray
  val: np.ndarray
  vocab: tuple[str, ...]


def load_corpus(path: str = DATA, vocab_size: int = 10_000,
                level: str = "word") -> Corpus:
  """Tiny-shakespeare as token ids, split 90/10 by character.

  Args:
    path: the text file.
    vocab_size: the vocabulary's size, ``<unk>`` (id 0) included
      (``level="word"`` only).
    level: ``"word"`` (see :func:`words`) or ``"char"``.

  Raises:
    ValueError: for a vocabulary under 2 entries or an unknown level.
  """
  if level not in ("word", "char"):
    raise ValueError(f"level must be 'word' or 'char', got {level!r}")
  with open(path, encoding="utf-8") as f:
    text = f.read()
  cut = int(0.9 * len(text))
  if level == "char":
    vocab = tuple(sorted(set(text[:cut])))
    index = {c: i for i, c in enumerate(vocab)}
    enc = lambda s: np.asarray([index.get(c, 0) for c in s], np.int32)
    return Corpus(enc(text[:cut]), enc(text[cut:]), vocab)
  if vocab_size < 2:
    raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
  train_words = words(text[:cut])
  counts = collections.Counter(train_words)
  # Ties broken by the word, so the vocabulary does not depend on dict order.
  top = sorted(counts, key=lambda w: (-counts[w], w))[:vocab_size - 1]
  vocab = (UNK, *top)
  index = {w: i for i, w in enumerate(vocab)}
  enc = lambda ws: np.asarray([index.get(w, 0) for w in ws], np.int32)
  return Corpus(enc(train_words), enc(words(text[cut:])), vocab)


def file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


# ----------------------------------------------------------------- model

@dataclasses.dataclass(frozen=True)
class LMConfig:
  vocab: int = 10_000
  width: int = 256
  layers: int = 4
  heads: int = 4
  ffn: int = 512
  context: int = 128
  dropout: float = 0.1


class Block(nn.Module):
  """Pre-LayerNorm causal self-attention and GELU MLP, with biases."""
  config: LMConfig

  @nn.compact
  def __call__(self, x, train: bool):
    c = self.config
    b, t, d = x.shape
    hd = d // c.heads
    h = nn.LayerNorm(name="ln1")(x)
    split = lambda y: y.reshape(b, t, c.heads, hd)
    q = split(nn.Dense(d, name="query")(h))
    k = split(nn.Dense(d, name="key")(h))
    v = split(nn.Dense(d, name="value")(h))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
    causal = jnp.tril(jnp.ones((1, 1, t, t), bool))
    att = jax.nn.softmax(jnp.where(causal, logits, -1e30), axis=-1)
    att = nn.Dropout(c.dropout, deterministic=not train)(att)
    y = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, t, d)
    x = x + nn.Dropout(c.dropout, deterministic=not train)(nn.Dense(d, name="out")(y))
    h = nn.LayerNorm(name="ln2")(x)
    h = nn.Dense(d, name="fc2")(nn.gelu(nn.Dense(c.ffn, name="fc1")(h)))
    return x + nn.Dropout(c.dropout, deterministic=not train)(h)


class WordLM(nn.Module):
  """GPT-style decoder with the output layer tied to the token embedding.

  ``apply(params, tokens, train=False)`` maps ``(batch, seq)`` int tokens,
  ``seq <= config.context``, to ``(batch, seq, vocab)`` logits.
  """
  config: LMConfig

  @nn.compact
  def __call__(self, tokens, train: bool = False):
    c = self.config
    embed = nn.Embed(c.vocab, c.width, name="embed",
                     embedding_init=nn.initializers.normal(0.02))
    pos = self.param("pos_embedding", nn.initializers.normal(0.02),
                     (c.context, c.width))
    x = embed(tokens) + pos[None, :tokens.shape[1]]
    x = nn.Dropout(c.dropout, deterministic=not train)(x)
    for i in range(c.layers):
      x = Block(c, name=f"block{i}")(x, train)
    return embed.attend(nn.LayerNorm(name="ln_f")(x))


def init(config: LMConfig, seed: int = 0) -> PyTree:
  model = WordLM(config)
  return model.init(jax.random.PRNGKey(seed),
                    jnp.zeros((1, config.context), jnp.int32))


def token_nll(model, params, tokens, *, train=False, key=None) -> jax.Array:
  """Mean next-token negative log-likelihood (nats) over ``tokens[:, 1:]``."""
  rngs = {"dropout": key} if train else None
  logits = model.apply(params, tokens[:, :-1], train=train, rngs=rngs)
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, tokens[:, 1:]).mean()


# ------------------------------------------------------- train / evaluate

def windows(ids: np.ndarray, context: int) -> np.ndarray:
  """Non-overlapping windows of ``context + 1`` tokens (each predicts ``context``)."""
  n = (len(ids) - 1) // context
  idx = np.arange(n)[:, None] * context + np.arange(context + 1)[None, :]
  return ids[idx]


def random_windows(ids: np.ndarray, context: int, batch: int,
                   rng: np.random.Generator) -> np.ndarray:
  starts = rng.integers(0, len(ids) - context - 1, size=batch)
  return ids[starts[:, None] + np.arange(context + 1)[None, :]]


_EVAL_CACHE: dict = {}


def evaluate(model, params: PyTree, ids: np.ndarray, batch: int = 32) -> float:
  """Mean validation NLL (nats per token) over every non-overlapping window.

  Compressed leaves are decoded (``cx.materialize``) first; the last batch is
  padded and its padding weighted out, so one shape compiles.
  """
  params = cx.materialize(params)
  ctx = model.config.context
  w = windows(ids, ctx)
  key = (model, batch)
  if key not in _EVAL_CACHE:
    def nll_sum(p, x, valid):
      logits = model.apply(p, x[:, :-1])
      nll = optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:])
      return jnp.sum(nll.sum(-1) * valid)
    _EVAL_CACHE[key] = jax.jit(nll_sum)
  f = _EVAL_CACHE[key]
  total = 0.0
  for i in range(0, len(w), batch):
    x = w[i:i + batch]
    valid = np.ones(batch, np.float32)
    valid[len(x):] = 0
    x = np.concatenate([x, np.zeros((batch - len(x), ctx + 1), x.dtype)])
    total += float(f(params, x, valid))
  return total / (len(w) * ctx)


def cosine_adamw(lr: float, steps: int, warmup: int, weight_decay: float = 0.1):
  """AdamW with linear warm-up to ``lr`` and cosine decay to 0.1 ``lr``."""
  sched = optax.warmup_cosine_decay_schedule(0.0, lr, min(warmup, steps - 1),
                                             steps, end_value=0.1 * lr)
  return optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(sched, b2=0.98, weight_decay=weight_decay))


LMLossFn = Callable[[PyTree, jax.Array, jax.Array], jax.Array]


def jit_step(tx: optax.GradientTransformation, loss_fn: Callable[..., jax.Array]):
  """``step(params, opt_state, *batch) -> (params, opt_state, loss)``, jitted."""
  @jax.jit
  def step(p, s, *batch):
    loss, g = jax.value_and_grad(loss_fn)(p, *batch)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss
  return step


def train(model, params: PyTree, tx: optax.GradientTransformation,
          ids: np.ndarray, *, steps: int, batch: int, seed: int,
          loss_fn: LMLossFn | None = None, val: np.ndarray | None = None,
          eval_every: int = 0, quiet: bool = False, desc: str = "train"):
  """``steps`` steps of ``tx`` on random windows of ``ids``.

  Args:
    model: a :class:`WordLM`.
    params: the initial tree (any tree ``loss_fn`` takes).
    tx: the optimizer.
    ids: the training token ids.
    steps, batch: optimizer steps and windows per step.
    seed: windows are drawn by ``np.random.default_rng(seed)``, dropout keys
      folded from ``PRNGKey(seed)``: the same seed gives the same run.
    loss_fn: ``loss_fn(params, windows, key)``; default :func:`token_nll`
      with dropout.
    val, eval_every: validation ids and how often (in steps) to measure
      them; ``0``: never.
    quiet: no progress bar.

  Returns:
    ``(params, history)``; ``history`` has ``step``/``loss`` (mean training
    loss per ``eval_every`` or 100 steps) and ``val_step``/``val_loss``.
  """
  if loss_fn is None:
    loss_fn = lambda p, x, key: token_nll(model, p, x, train=True, key=key)
  step = jit_step(tx, loss_fn)
  state = tx.init(params)
  rng = np.random.default_rng(seed)
  key = jax.random.fold_in(jax.random.PRNGKey(seed), 0x1A)
  every = eval_every or 100
  hist = {"step": [], "loss": [], "val_step": [], "val_loss": []}
  losses = []
  with train_lib.progress(steps, desc, quiet) as bar:
    for i in range(steps):
      x = random_windows(ids, model.config.context, batch, rng)
      params, state, loss = step(params, state, x, jax.random.fold_in(key, i))
      losses.append(loss)
      bar.update(1)
      if (i + 1) % every == 0 or i + 1 == steps:
        hist["step"].append(i + 1)
        hist["loss"].append(float(jnp.mean(jnp.stack(losses))))
        losses = []
        post = {"loss": hist["loss"][-1]}
        if val is not None and eval_every and ((i + 1) % eval_every == 0 or i + 1 == steps):
          hist["val_step"].append(i + 1)
          hist["val_loss"].append(evaluate(model, params, val))
          post["val"] = hist["val_loss"][-1]
        bar.set_postfix(post)
  return params, hist


# ----------------------------------------------------------------- cache

def add_lm_args(p: argparse.ArgumentParser) -> None:
  """The model's, the data's and the float training's flags."""
  p.add_argument("--data", default=DATA, help="the tiny-shakespeare text file")
  p.add_argument("--level", choices=("word", "char"), default="word",
                 help="word-level (the issue's model) or character-level tokens")
  p.add_argument("--vocab", type=int, default=10_000,
                 help="vocabulary size, <unk> included (word level)")
  p.add_argument("--width", type=int, default=256, help="model width")
  p.add_argument("--layers", type=int, default=4, help="transformer blocks")
  p.add_argument("--heads", type=int, default=4, help="attention heads")
  p.add_argument("--ffn", type=int, default=512, help="MLP hidden width")
  p.add_argument("--context", type=int, default=128, help="tokens per window")
  p.add_argument("--dropout", type=float, default=0.1, help="dropout rate")
  p.add_argument("--steps", type=int, default=2000, help="float training steps")
  p.add_argument("--batch", type=int, default=16, help="windows per step")
  p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
  p.add_argument("--warmup", type=int, default=100, help="warm-up steps")
  p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay")
  p.add_argument("--cache", default=os.path.join(CACHE, "lm"),
                 help="directory of the cached float models")
  p.add_argument("--retrain", action="store_true",
                 help="train even if the cache holds this model")


def setup(args) -> tuple[WordLM, Corpus, LMConfig]:
  corpus = load_corpus(args.data, args.vocab, args.level)
  config = LMConfig(vocab=len(corpus.vocab), width=args.width, layers=args.layers,
                    heads=args.heads, ffn=args.ffn, context=args.context,
                    dropout=args.dropout)
  if args.width % args.heads:
    raise ValueError(f"--width {args.width} is not a multiple of --heads {args.heads}")
  return WordLM(config), corpus, config


def add_model_seed_arg(p: argparse.ArgumentParser) -> None:
  """``--model-seed``, for experiments that fine-tune the cached float model."""
  p.add_argument("--model-seed", type=int, default=None,
                 help="seed of the float model (default: --seed); fix it to vary only "
                      "the fine-tuning")


def model_seed(args) -> int:
  """The float model's seed: ``--model-seed`` where given, else ``--seed``."""
  seed = getattr(args, "model_seed", None)
  return args.seed if seed is None else seed


def _cache_key(args, config: LMConfig) -> str:
  train = {k: getattr(args, k) for k in ("steps", "batch", "lr", "warmup", "weight_decay")}
  spec = {"data": file_sha256(args.data), "level": args.level,
          "config": dataclasses.asdict(config), "train": {**train, "seed": model_seed(args)}}
  return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def pretrained(args, model: WordLM, corpus: Corpus) -> tuple[PyTree, dict]:
  """The float model of these flags: from the cache, or trained and cached.

  Returns:
    ``(params, info)``; ``info`` has ``val_loss``, ``history``,
    ``train_time_s`` and ``cache`` (the file), as recorded when trained.
  """
  os.makedirs(args.cache, exist_ok=True)
  stem = os.path.join(args.cache, f"{args.level}lm-{_cache_key(args, model.config)}")
  if not args.retrain and os.path.exists(stem + ".cx") and os.path.exists(stem + ".json"):
    with open(stem + ".json") as f:
      info = json.load(f)
    return cx.load(stem + ".cx"), info
  start = time.time()
  seed = model_seed(args)
  params = init(model.config, seed)
  tx = cosine_adamw(args.lr, args.steps, args.warmup, args.weight_decay)
  params, hist = train(model, params, tx, corpus.train, steps=args.steps,
                       batch=args.batch, seed=seed, val=corpus.val,
                       eval_every=max(args.steps // 10, 1), quiet=args.quiet,
                       desc="float LM")
  info = {"val_loss": evaluate(model, params, corpus.val), "history": hist,
          "train_time_s": time.time() - start, "cache": stem + ".cx"}
  cx.save(stem + ".cx", params)
  with open(stem + ".json", "w") as f:
    json.dump(info, f)
  return params, info


def param_count(tree) -> int:
  return sum(int(np.prod(np.shape(x))) for x in
             jax.tree_util.tree_leaves(cx.materialize(tree)))


def plot_history(path: str, hist: dict, title: str) -> None:
  """PNG of the training and validation loss against the step."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot(hist["step"], hist["loss"], label="train (dropout on)")
  ax.plot(hist["val_step"], hist["val_loss"], marker="o", label="validation")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats per token)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# ------------------------------------------------------------------ main

def parse_args(argv=None):
  p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__,
                              formatter_class=train_lib.HelpFormatter)
  add_lm_args(p)
  p.add_argument("--seed", type=int, default=0, help="initialization, windows, dropout")
  p.add_argument("--out", default="runs/lm", help="output directory")
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  args = p.parse_args(argv)
  args.argv = list(sys.argv[1:] if argv is None else argv)
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  model, corpus, config = setup(args)
  params, info = pretrained(args, model, corpus)
  # Measured again on the cached file's weights, not copied from the record.
  val = evaluate(model, params, corpus.val)
  n = param_count(params)
  results = {
      "experiment": "lm", "level": args.level, "config": dataclasses.asdict(config),
      "params": n, "embedding_params": config.vocab * config.width,
      "train_tokens": int(len(corpus.train)), "val_tokens": int(len(corpus.val)),
      "val_loss": val, "val_perplexity": math.exp(val),
      "train_time_s": info["train_time_s"], "cache": info["cache"],
      "history": info["history"], "seed": args.seed,
      "command": train_lib.command_line(MODULE, args.argv),
      "jax_backend": jax.default_backend()}
  os.makedirs(args.out, exist_ok=True)
  plot_history(os.path.join(args.out, "loss.png"), info["history"],
               f"{args.level}-level LM on tiny-shakespeare")
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  print(f"{args.level}-level LM: {n:,} parameters ({config.vocab * config.width:,} "
        f"in the embedding), validation loss {val:.4f} nats per token, "
        f"perplexity {math.exp(val):.1f} (trained in {info['train_time_s']:.0f} s; "
        f"cached at {info['cache']})")
  print(f"wrote {os.path.join(args.out, 'results.json')}")
  return results


if __name__ == "__main__":
  main(sys.argv[1:])
