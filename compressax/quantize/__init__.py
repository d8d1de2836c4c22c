"""Quantization: uniform (per bucket, per channel), STE, LSQ, k-means, codebooks, product."""

# Each private module defines its own __all__; this namespace is their union.
from compressax.quantize import _apply
from compressax.quantize import _codebook
from compressax.quantize import _kmeans
from compressax.quantize import _lsq
from compressax.quantize import _points
from compressax.quantize import _product
from compressax.quantize import _uniform
from compressax.quantize._apply import *  # noqa: F401,F403
from compressax.quantize._codebook import *  # noqa: F401,F403
from compressax.quantize._kmeans import *  # noqa: F401,F403
from compressax.quantize._lsq import *  # noqa: F401,F403
from compressax.quantize._points import *  # noqa: F401,F403
from compressax.quantize._product import *  # noqa: F401,F403
from compressax.quantize._uniform import *  # noqa: F401,F403

# (+= each module's list: a form type checkers follow.)
__all__ = []
__all__ += _uniform.__all__
__all__ += _apply.__all__
__all__ += _lsq.__all__
__all__ += _kmeans.__all__
__all__ += _codebook.__all__
__all__ += _points.__all__
__all__ += _product.__all__
