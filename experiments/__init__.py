"""Reproductions of the compression papers with compressax.

Each experiment is a module run as ``python -m experiments.NAME``; they share
data loading (:mod:`experiments.data`), the models (:mod:`experiments.models`)
and the training loop, CLI flags and results contract
(:mod:`experiments.train`). Every run writes ``DIR/model.cx`` with
``compressax.io.save`` and ``DIR/results.json`` whose ``test_error`` is
measured on the weights as decoded from that file.
"""
