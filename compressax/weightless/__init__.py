"""Weightless: lossy encoding of sparse, clustered layers in Bloomier filters.

``cx.weightless.encode`` stores a pruned, clustered layer (Deep Compression's
``MaskedArray`` over a ``CodebookArray``, or a dense array of a few distinct
values and zeros) as a :class:`BloomierArray`: only the kept weights' cluster
indices, in ``m`` cells of ``t`` bits, no positions. Pruned weights decode to
a random cluster with probability ``K / 2^t`` (:func:`false_positive_rate`);
:func:`freeze_and_retrain` encodes layer after layer and retrains the rest
around those errors (``cx.methods.Weightless`` is the method of a
``cx.Plan``).

References:
  Reagen et al., *Weightless: Lossy weight encoding for deep neural network
  compression*, ICML 2018. https://arxiv.org/abs/1711.04686
"""

from compressax.weightless._bloomier import BloomierArray
from compressax.weightless._bloomier import encode
from compressax.weightless._bloomier import false_positive_rate
from compressax.weightless._retrain import freeze
from compressax.weightless._retrain import freeze_and_retrain

__all__ = ["BloomierArray", "encode", "false_positive_rate", "freeze",
           "freeze_and_retrain"]
