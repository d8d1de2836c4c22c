"""One-shot compression of pretrained layers from calibration data.

No retraining: each layer is compressed on its own from a few calibration
inputs. Flax layout throughout: a kernel ``w`` of shape ``(d_in, d_out)``,
``y = x @ w``, and the layer Hessian over ``d_in`` is ``H = 2 X^T X``.

* :func:`hessian`, :func:`hessian_update`: ``H`` of a batch, or running over
  batches (``psum`` across devices inside ``shard_map``).
* :func:`gptq`: quantization with error compensation (Frantar et al. 2023),
  :func:`rtn` the round-to-nearest baseline on the same grid; both give a
  :class:`GroupQuantizedArray`.
* :func:`sparsegpt`: pruning (unstructured or N:M), optionally joint with
  quantization (Frantar & Alistarh 2023); gives a ``cx.prune.MaskedArray``.
* :func:`wanda_mask`: the Wanda mask ``|w| * ||x||`` (Sun et al. 2024).
* :func:`hqq`: calibration-free half-quadratic quantization (Badri & Shaji
  2023), on a float-zero grid.

* :func:`calibrate_sequential`: a whole model, block by block, each kernel
  with the method (:class:`GPTQ`, :class:`RTN`, :class:`SparseGPT`,
  :class:`Wanda`, :class:`Magnitude`) a rule gives it.

The magnitude baseline is ``cx.prune.magnitude_mask`` / ``cx.prune.nm_mask``.
"""

from compressax.oneshot._gptq import gptq
from compressax.oneshot._grid import GroupQuantizedArray
from compressax.oneshot._grid import rtn
from compressax.oneshot._hessian import hessian
from compressax.oneshot._hessian import hessian_update
from compressax.oneshot._hqq import hqq
from compressax.oneshot._pipeline import GPTQ
from compressax.oneshot._pipeline import HQQ
from compressax.oneshot._pipeline import Magnitude
from compressax.oneshot._pipeline import RTN
from compressax.oneshot._pipeline import SparseGPT
from compressax.oneshot._pipeline import Wanda
from compressax.oneshot._pipeline import block_hessians
from compressax.oneshot._pipeline import calibrate_sequential
from compressax.oneshot._sparsegpt import sparsegpt
from compressax.oneshot._wanda import wanda_mask

__all__ = [
    "GPTQ",
    "GroupQuantizedArray",
    "HQQ",
    "Magnitude",
    "RTN",
    "SparseGPT",
    "Wanda",
    "block_hessians",
    "calibrate_sequential",
    "gptq",
    "hessian",
    "hessian_update",
    "hqq",
    "rtn",
    "sparsegpt",
    "wanda_mask",
]
