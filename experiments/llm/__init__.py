"""Pretrained transformers (SmolLM2, MiniLM) for ``experiments.oneshot``."""
