"""Pruning masks: magnitude (layer/global), N:M, structured, random, schedules.

Masks are ``bool`` pytrees with the params' structure (True = kept); leaves a
mask does not touch hold a 0-d ``True``. Every count is exact: ``n - floor(s*n)``
weights kept, ties broken by position.
"""

from compressax.prune._distribution import erk_sparsity
from compressax.prune._distribution import layer_sparsities
from compressax.prune._distribution import sparsity_from_patterns
from compressax.prune._distribution import uniform_sparsity
from compressax.prune._magnitude import magnitude_mask
from compressax.prune._magnitude import random_mask
from compressax.prune._mask import MaskedArray
from compressax.prune._mask import apply_mask
from compressax.prune._mask import mask_to_nodes
from compressax.prune._mask import sparsity_stats
from compressax.prune._nm import nm_mask
from compressax.prune._nm import nm_mask_tree
from compressax.prune._schedule import polynomial_schedule
from compressax.prune._structured import channel_mask
from compressax.prune._structured import shrink

__all__ = [
    "MaskedArray",
    "apply_mask",
    "channel_mask",
    "erk_sparsity",
    "layer_sparsities",
    "magnitude_mask",
    "mask_to_nodes",
    "nm_mask",
    "nm_mask_tree",
    "polynomial_schedule",
    "random_mask",
    "shrink",
    "sparsity_from_patterns",
    "sparsity_stats",
    "uniform_sparsity",
]
