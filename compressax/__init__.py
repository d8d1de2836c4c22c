"""compressax: model compression for JAX.

``import compressax as cx``. Pure functions over parameter pytrees (Flax linen
params, ``nnx.State``, plain dicts), Optax transforms for compression-aware
training, and real compressed files.
"""

from compressax import distill
from compressax import diffq
from compressax import io
from compressax import lowrank
from compressax import oneshot
from compressax import methods
from compressax import optim
from compressax import prune
from compressax import quantize
from compressax import weightless
from compressax import run
from compressax._node import CompressedLeaf
from compressax._plan import Plan
from compressax._rules import Rule
from compressax._rules import per_leaf
from compressax._node import compressed_leaf
from compressax._node import is_compressed
from compressax._node import materialize
from compressax._node import storage_bits
from compressax._select import SKIP
from compressax._select import Skip
from compressax._select import default_rule
from compressax._select import is_skip
from compressax._select import map_selected
from compressax._select import path_str
from compressax._select import select
from compressax._select import selected_leaves
from compressax.io import CorruptFileError
from compressax.io import load
from compressax.io import save
from compressax.io import size_report

__version__ = "0.1.0"

__all__ = [
    "CompressedLeaf",
    "CorruptFileError",
    "Plan",
    "Rule",
    "SKIP",
    "Skip",
    "compressed_leaf",
    "default_rule",
    "diffq",
    "distill",
    "io",
    "is_compressed",
    "is_skip",
    "load",
    "lowrank",
    "map_selected",
    "materialize",
    "oneshot",
    "methods",
    "optim",
    "path_str",
    "per_leaf",
    "prune",
    "quantize",
    "run",
    "save",
    "select",
    "selected_leaves",
    "size_report",
    "storage_bits",
    "weightless",
]
