"""Distillation losses in the style of optax.losses.

Every loss returns per-example values (shape ``batch``, no reduction; take the
mean yourself), computed in float32 from any floating input dtype.
"""

from compressax.distill._features import cosine_loss
from compressax.distill._features import ensemble_teacher
from compressax.distill._features import hint_loss
from compressax.distill._losses import alpha_divergence
from compressax.distill._losses import cross_entropy
from compressax.distill._losses import kd_loss
from compressax.distill._losses import kl_divergence
from compressax.distill._losses import polino_loss
from compressax.distill._pqk import pqk_loss
from compressax.distill._pqk import pqk_teacher

__all__ = [
    "alpha_divergence",
    "cosine_loss",
    "cross_entropy",
    "ensemble_teacher",
    "hint_loss",
    "kd_loss",
    "kl_divergence",
    "polino_loss",
    "pqk_loss",
    "pqk_teacher",
]
