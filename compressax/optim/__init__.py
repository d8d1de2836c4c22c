"""Optax gradient transformations for compression-aware training."""
__all__ = []
