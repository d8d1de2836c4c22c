"""Optax gradient transformations for compression-aware training.

Each transform is a factory returning an ``optax.GradientTransformation`` that
wraps (or is chained with) any inner Optax optimizer and keeps the params
compressed by itself: no second post-update call is needed.
"""

from compressax.optim._adacomp import AdaCompState
from compressax.optim._adacomp import adacomp
from compressax.optim._adacomp import adacomp_compress
from compressax.optim._adacomp import adacomp_residual
from compressax.optim._adacomp import compression_stats
from compressax.optim._diffq import diffq_finalize
from compressax.optim._diffq import diffq_init
from compressax.optim._diffq import diffq_loss
from compressax.optim._diffq import diffq_optimizer
from compressax.optim._diffquant import diff_quant_points
from compressax.optim._diffquant import gradient_norms
from compressax.optim._diffquant import init_points
from compressax.optim._diffquant import points_quantized
from compressax.optim._find import find_state
from compressax.optim._lsq import lsq_init_steps
from compressax.optim._lsq import lsq_params
from compressax.optim._pruning import PruneState
from compressax.optim._pruning import prune_fixed
from compressax.optim._pruning import prune_magnitude
from compressax.optim._pruning import prune_nm
from compressax.optim._qat import finalize
from compressax.optim._qat import quantized_distillation_loss
from compressax.optim._qat import quantized_params
from compressax.optim._weight_sharing import WeightSharingState
from compressax.optim._weight_sharing import shared_params
from compressax.optim._weight_sharing import snap_to_codebook
from compressax.optim._weight_sharing import weight_sharing

__all__ = [
    "AdaCompState",
    "PruneState",
    "WeightSharingState",
    "adacomp",
    "adacomp_compress",
    "adacomp_residual",
    "compression_stats",
    "diff_quant_points",
    "diffq_finalize",
    "diffq_init",
    "diffq_loss",
    "diffq_optimizer",
    "finalize",
    "find_state",
    "gradient_norms",
    "init_points",
    "lsq_init_steps",
    "lsq_params",
    "points_quantized",
    "prune_fixed",
    "prune_magnitude",
    "prune_nm",
    "quantized_distillation_loss",
    "quantized_params",
    "shared_params",
    "snap_to_codebook",
    "weight_sharing",
]
