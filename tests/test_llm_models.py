"""experiments.llm.models and experiments.oneshot on tiny random checkpoints.

The files are written here in the real formats (GGUF with Q4_1/Q8_0 tensors,
safetensors + tokenizer.json in a zip) with tiny configs: no real weights.
"""

import json
import os
import zipfile

import gguf  # the test extra installs gguf, tokenizers, safetensors: no skip
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy as safetensors_numpy
import tokenizers

import compressax as cx
from experiments.llm import models as M
from experiments import oneshot

CFG = M.LlamaConfig(vocab=0, width=32, layers=2, heads=4, kv_heads=2, ffn=64,
                    rope_base=1e4, eps=1e-5)
MERGES = ["h e", "Ġ t", "Ġt he", "o u"]


def tiny_vocab():
  alphabet = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())
  return alphabet + [m.replace(" ", "") for m in MERGES]


def write_gguf(path):
  """A tiny llama GGUF (Q4_1 kernels, Q8_0 embedding); returns float (out, in) weights."""
  rng = np.random.default_rng(0)
  tokens = tiny_vocab()
  Q = gguf.GGMLQuantizationType
  w = gguf.GGUFWriter(path, "llama")
  c = CFG
  hd = c.width // c.heads
  w.add_block_count(c.layers)
  w.add_context_length(64)
  w.add_embedding_length(c.width)
  w.add_feed_forward_length(c.ffn)
  w.add_head_count(c.heads)
  w.add_head_count_kv(c.kv_heads)
  w.add_rope_freq_base(c.rope_base)
  w.add_layer_norm_rms_eps(c.eps)
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("smollm")
  w.add_token_list(tokens)
  w.add_token_merges(MERGES)
  ref = {}

  def put(name, a, qtype):
    a = a.astype(np.float32)
    if qtype is None:
      w.add_tensor(name, a)
      ref[name] = a
    else:
      q = gguf.quants.quantize(a, qtype)
      w.add_tensor(name, q, raw_dtype=qtype)
      ref[name] = gguf.quants.dequantize(q, qtype)

  put("token_embd.weight", rng.normal(0, 0.5, (len(tokens), c.width)), Q.Q8_0)
  put("output_norm.weight", 1 + 0.1 * rng.normal(size=c.width), None)
  shapes = {"attn_q": (c.width, c.width), "attn_k": (c.kv_heads * hd, c.width),
            "attn_v": (c.kv_heads * hd, c.width), "attn_output": (c.width, c.width),
            "ffn_gate": (c.ffn, c.width), "ffn_up": (c.ffn, c.width),
            "ffn_down": (c.width, c.ffn)}
  for i in range(c.layers):
    for n, s in shapes.items():
      put(f"blk.{i}.{n}.weight", rng.normal(0, 0.2, s), Q.Q4_1)
    put(f"blk.{i}.attn_norm.weight", 1 + 0.1 * rng.normal(size=c.width), None)
    put(f"blk.{i}.ffn_norm.weight", 1 + 0.1 * rng.normal(size=c.width), None)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return ref


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
  d = tmp_path_factory.mktemp("cache")
  path = d / "smollm2-135m" / os.path.basename(M.WHEELS["smollm2-135m"][2])
  path.parent.mkdir()
  ref = write_gguf(str(path))
  return d, path, ref


def test_gguf_loader(tiny_gguf):
  _, path, ref = tiny_gguf
  model, params, tok = M.load_gguf(str(path))
  assert model.cfg.width == 32 and model.cfg.kv_heads == 2 and model.cfg.layers == 2
  # (out, in) tensors become Flax (in, out) kernels, dequantized exactly.
  np.testing.assert_array_equal(params["blocks"][1]["down"]["kernel"],
                                ref["blk.1.ffn_down.weight"].T)
  np.testing.assert_array_equal(params["blocks"][0]["k"]["kernel"],
                                ref["blk.0.attn_k.weight"].T)
  np.testing.assert_array_equal(params["embed"], ref["token_embd.weight"])
  enc = tok.encode("he the 12")
  assert enc.tokens == ["he", "Ġthe", "Ġ", "1", "2"]    # digits one by one
  assert tok.decode(enc.ids) == "he the 12"
  logits = model(params, jnp.asarray([[1, 2, 3, 4, 5]]))
  assert logits.shape == (1, 5, len(tiny_vocab()))
  later = model(params, jnp.asarray([[1, 2, 3, 9, 9]]))
  np.testing.assert_allclose(logits[:, :3], later[:, :3], rtol=1e-5, atol=1e-5)  # causal


def rotate_half_rope(x, base):
  """Hugging Face's rope on the original rows: pairs (i, i + d/2)."""
  seq, dim = x.shape[1], x.shape[-1]
  inv = base ** (-np.arange(0, dim, 2) / dim)
  ang = np.arange(seq)[:, None] * inv[None]
  cos = np.concatenate([np.cos(ang)] * 2, -1)[None, :, None]
  sin = np.concatenate([np.sin(ang)] * 2, -1)[None, :, None]
  rot = np.concatenate([-x[..., dim // 2:], x[..., :dim // 2]], -1)
  return x * cos + rot * sin


def test_interleaved_rope_on_gguf_rows_is_rotate_half_on_hf_rows():
  heads, hd, d_in = 2, 8, 6
  rng = np.random.default_rng(1)
  w_hf = rng.normal(size=(heads * hd, d_in))                   # (out, in)
  # llama.cpp's convert permute: each head's halves interleaved.
  w_gg = w_hf.reshape(heads, 2, hd // 2, d_in).swapaxes(1, 2).reshape(w_hf.shape)
  x = rng.normal(size=(1, 5, d_in))
  q_hf = rotate_half_rope((x @ w_hf.T).reshape(1, 5, heads, hd), 1e4)
  q_gg = np.asarray(M.rope(jnp.asarray((x @ w_gg.T).reshape(1, 5, heads, hd),
                                       jnp.float32), 1e4))
  want = q_hf.reshape(1, 5, heads, 2, hd // 2).swapaxes(-1, -2).reshape(q_hf.shape)
  np.testing.assert_allclose(q_gg, want, rtol=1e-4, atol=1e-4)


def test_experiment_on_tiny_gguf(tiny_gguf, tmp_path):
  cache, _, _ = tiny_gguf
  text = tmp_path / "text.txt"
  text.write_text("he the tout ou he the thou\n" * 120)
  out = tmp_path / "run"
  res = oneshot.main(["--model", "smollm2-135m", "--method", "gptq", "--bits", "3",
                      "--cache", str(cache), "--data", str(text), "--context", "32",
                      "--calib-tokens", "64", "--max-eval-windows", "3",
                      "--out", str(out), "--quiet"])
  saved = json.loads((out / "results.json").read_text())
  assert saved["perplexity"] == res["perplexity"] and saved["eval_windows"] == 3
  assert saved["file_bytes"] == os.path.getsize(out / "model.cx")
  assert saved["peak_rss_mb"] > 0
  assert len(saved["layer_errors"]) == 2 * 7
  model, params, tok = M.load_gguf(str(cache / "smollm2-135m" / os.path.basename(
      M.WHEELS["smollm2-135m"][2])))
  decoded = oneshot.from_tree(cx.load(str(out / "model.cx")))
  q = decoded["blocks"][0]["q"]["kernel"]
  assert len(np.unique(np.asarray(q)[:, 0])) <= 8                 # 3-bit columns
  _, test_text = oneshot.split_text(str(text))
  win = oneshot.lm_windows(tok, test_text, 32)[:3]
  assert oneshot.perplexity(model, decoded, win, 4, True) == pytest.approx(
      saved["perplexity"], rel=1e-6)


def write_minilm(path):
  rng = np.random.default_rng(2)
  c = M.BertConfig(vocab=12, width=16, layers=2, heads=4, ffn=32, positions=80)
  w = {"embeddings.word_embeddings.weight": rng.normal(size=(c.vocab, c.width)),
       "embeddings.position_embeddings.weight": rng.normal(size=(c.positions, c.width)),
       "embeddings.token_type_embeddings.weight": rng.normal(size=(2, c.width)),
       "embeddings.LayerNorm.weight": np.ones(c.width),
       "embeddings.LayerNorm.bias": np.zeros(c.width)}
  lin = {"attention.self.query": (c.width, c.width), "attention.self.key": (c.width, c.width),
         "attention.self.value": (c.width, c.width),
         "attention.output.dense": (c.width, c.width),
         "intermediate.dense": (c.ffn, c.width), "output.dense": (c.width, c.ffn)}
  for i in range(c.layers):
    for n, s in lin.items():
      w[f"encoder.layer.{i}.{n}.weight"] = rng.normal(0, 0.3, s)
      w[f"encoder.layer.{i}.{n}.bias"] = rng.normal(0, 0.1, s[:1])
    for n in ("attention.output.LayerNorm", "output.LayerNorm"):
      w[f"encoder.layer.{i}.{n}.weight"] = np.ones(c.width)
      w[f"encoder.layer.{i}.{n}.bias"] = np.zeros(c.width)
  w = {k: v.astype(np.float32) for k, v in w.items()}
  vocab = {t: i for i, t in enumerate(
      ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "he", "the", "thou", "art", "o", "!", ",", "a"])}
  tok = tokenizers.Tokenizer(tokenizers.models.WordPiece(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
  tok.post_processor = tokenizers.processors.TemplateProcessing(
      single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("model.safetensors", safetensors_numpy.save(w))
    z.writestr("tokenizer.json", tok.to_str())
    z.writestr("config.json", json.dumps({"num_attention_heads": 4}))
  return w


def test_minilm_loader_and_experiment(tmp_path):
  path = tmp_path / "minilm-l6" / "model.zip"
  path.parent.mkdir()
  w = write_minilm(str(path))
  model, params, tok = M.load_minilm(str(path))
  np.testing.assert_array_equal(params["blocks"][1]["up"]["kernel"],
                                w["encoder.layer.1.intermediate.dense.weight"].T)
  ids = jnp.asarray([tok.encode("thou art he").ids])
  mask = jnp.ones(ids.shape, jnp.float32)
  e = model(params, ids, mask)
  np.testing.assert_allclose(jnp.linalg.norm(e, axis=-1), 1.0, rtol=1e-5)
  padded = model(params, jnp.concatenate([ids, jnp.zeros((1, 3), ids.dtype)], 1),
                 jnp.concatenate([mask, jnp.zeros((1, 3))], 1))
  np.testing.assert_allclose(padded, e, rtol=1e-4, atol=1e-5)  # padding ignored
  text = tmp_path / "text.txt"
  text.write_text("thou art he, o the a!\nhe the thou\n" * 60)
  res = oneshot.main(["--model", "minilm-l6", "--method", "sparsegpt", "--n-m", "2:4",
                      "--cache", str(tmp_path), "--data", str(text),
                      "--calib-tokens", "256", "--out", str(tmp_path / "run"), "--quiet"])
  assert 0 < res["mean_cosine_to_float"] <= 1.0 + 1e-5
  held_out = [s for s in oneshot.split_text(str(text))[1].split("\n") if s.strip()]
  assert 0 <= res["neighbour_recall"] <= 1 and res["eval_lines"] == len(held_out)
  assert len(res["layer_errors"]) == 2 * 6
  joint = oneshot.main(["--model", "minilm-l6", "--method", "sparsegpt", "--n-m", "2:4",
                        "--joint", "--bits", "4", "--cache", str(tmp_path),
                        "--data", str(text), "--calib-tokens", "256", "--recall-k", "3",
                        "--out", str(tmp_path / "joint"), "--quiet"])
  assert joint["settings"] == "sparsegpt-2of4-4b"
  kernel = oneshot.from_tree(cx.load(str(tmp_path / "joint" / "model.cx")))[
      "blocks"][0]["q"]["kernel"]
  col = np.asarray(kernel)[:, 0]
  assert np.mean(col == 0) >= 0.5 and len(np.unique(col)) <= 16   # 2:4 and 4-bit


def _recall_reference(ref, emb, k):
  """Brute force: each row's k most similar other rows, by a full sort."""
  out = []
  for i in range(len(ref)):
    def top(e):
      sim = [(-float(e[i] @ e[j]), j) for j in range(len(e)) if j != i]
      return {j for _, j in sorted(sim)[:k]}
    out.append(len(top(ref) & top(emb)) / k)
  return float(np.mean(out))


@pytest.mark.parametrize("noise", [0.0, 0.3, 3.0])
def test_neighbour_recall_matches_brute_force(noise):
  rng = np.random.default_rng(int(noise * 10))
  ref = rng.normal(size=(40, 8))
  emb = ref + noise * rng.normal(size=ref.shape)
  ref /= np.linalg.norm(ref, axis=1, keepdims=True)
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  got = oneshot.neighbour_recall(ref, emb, 5)
  assert got == pytest.approx(_recall_reference(ref, emb, 5), abs=1e-12)
  if noise == 0.0:
    assert got == 1.0
  with pytest.raises(ValueError, match="recall_k"):
    oneshot.neighbour_recall(ref, emb, 40)
