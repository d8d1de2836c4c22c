"""Running compressed models without materializing them.

A model whose kernels are compressed nodes runs with each kernel decoded
inside the jitted forward, at the layer that uses it, so memory holds the
codes plus one layer's float weights instead of the float model:

* :func:`matmul` / :func:`dot_general`: ``x @ w`` for a compressed ``w``,
  weight-only (decoded at use, bit for bit ``x @ w.materialize()``) or W8A8
  (int8 activations with per-token scales times int8 weights with
  per-column scales, int32 accumulation).
* :class:`QuantizedKernel` and :func:`pack`: GPTQ/RTN/HQQ kernels in their
  run-time layout (4-bit codes two to a byte), optionally marked W8A8;
  :func:`w8a8` for W8A8 kernels with SmoothQuant's smoothing factors;
  :func:`columns` for an embedding lookup from a tied table kept as the
  head's kernel.
* Flax: :func:`intercept` (linen ``nn.Dense``), :class:`CompressedParam`
  and :func:`set_compressed` (nnx), :func:`promote_dtype` for layers'
  ``promote_dtype=`` hook.
"""

from compressax.run._flax import CompressedParam
from compressax.run._flax import intercept
from compressax.run._flax import set_compressed
from compressax.run._kernel import QuantizedKernel
from compressax.run._kernel import columns
from compressax.run._kernel import decode
from compressax.run._kernel import pack
from compressax.run._kernel import w8a8
from compressax.run._matmul import dot_general
from compressax.run._matmul import matmul
from compressax.run._matmul import promote_dtype
from compressax.run._matmul import quantize_tokens

__all__ = [
    "CompressedParam",
    "QuantizedKernel",
    "columns",
    "decode",
    "dot_general",
    "intercept",
    "matmul",
    "pack",
    "promote_dtype",
    "quantize_tokens",
    "set_compressed",
    "w8a8",
]
