"""Distillation losses in the style of optax.losses."""
__all__ = []
