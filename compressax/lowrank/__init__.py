"""Low-rank factorization: truncated SVD, rank selection, BSR beam search."""

from compressax.lowrank._bsr import bsr_ranks
from compressax.lowrank._bsr import proxy_loss
from compressax.lowrank._bsr import stable_rank_penalty
from compressax.lowrank._rank import rank_for_energy
from compressax.lowrank._rank import rank_for_stable_rank
from compressax.lowrank._rank import ranks_for_ratio
from compressax.lowrank._rank import singular_values
from compressax.lowrank._rank import stable_rank
from compressax.lowrank._svd import LowRankArray
from compressax.lowrank._svd import factorize
from compressax.lowrank._svd import factorize_tree
from compressax.lowrank._svd import matrix_shape

__all__ = [
    "LowRankArray",
    "bsr_ranks",
    "factorize",
    "factorize_tree",
    "matrix_shape",
    "proxy_loss",
    "rank_for_energy",
    "rank_for_stable_rank",
    "ranks_for_ratio",
    "singular_values",
    "stable_rank",
    "stable_rank_penalty",
]
