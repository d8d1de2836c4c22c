"""DiffQ: differentiable model compression via pseudo-quantization noise."""
__all__ = []
