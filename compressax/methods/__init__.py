"""Compression methods: one frozen config and one lifecycle per technique.

``cx.methods.Uniform(bits=4)`` and the others are given to a
:class:`compressax.Plan` by rules; each runs the same five steps per leaf
(init, view, penalty, optimizer wrapper, finalize to a stored node), and
methods compose on one leaf with ``>>``. See ``docs/design.md``.
"""

from compressax.methods._ajpq import AJPQ
from compressax.methods._base import Chain
from compressax.methods._base import Method
from compressax.methods._lowrank import LowRank
from compressax.methods._prune import Channel
from compressax.methods._prune import Magnitude
from compressax.methods._prune import NM
from compressax.methods._product import ProductQuantize
from compressax.methods._quant import DiffQ
from compressax.methods._quant import KMeans
from compressax.methods._quant import LSQ
from compressax.methods._quant import Points
from compressax.methods._quant import Uniform
from compressax.methods._weightless import Weightless

__all__ = ["AJPQ", "Chain", "Channel", "DiffQ", "KMeans", "LSQ", "LowRank",
           "Magnitude", "Method", "NM", "Points", "ProductQuantize", "Uniform",
           "Weightless"]
