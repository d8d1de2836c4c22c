"""DiffQ: differentiable model compression via pseudo-quantization noise.

Train with :func:`noisy` weights and a :func:`model_size` penalty on bit
logits from :func:`init_logits`, then :func:`quantize` for real.

References:
  Défossez, Adi, Synnaeve, 2021. https://arxiv.org/abs/2104.09987
"""

from compressax.diffq import _bits
from compressax.diffq import _noise
from compressax.diffq import _quantize
from compressax.diffq import _size
from compressax.diffq._bits import *  # noqa: F401,F403
from compressax.diffq._noise import *  # noqa: F401,F403
from compressax.diffq._quantize import *  # noqa: F401,F403
from compressax.diffq._size import *  # noqa: F401,F403

# The union of the private modules' __all__, in a form type checkers follow.
__all__ = []
__all__ += _bits.__all__
__all__ += _noise.__all__
__all__ += _size.__all__
__all__ += _quantize.__all__
